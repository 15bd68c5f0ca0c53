#!/usr/bin/env python3
"""Many tasks on one input: one Predict call naming N tasks (a TaskList) vs
the same N (input, task) pairs sent as N separate Predict calls, against the
real metatt-server (all-MiniLM-L6-v2) and a published random (4+1)D family
of 100 tasks (metatt-bench-family). N = 1, 10, 100.

Rows measured, each the median over --rounds:
  one_call          one input, a TaskList of N tasks: one call, one batch of N rows
  separate_serial   N calls one after another (one task each)
  separate_parallel N calls at once from N threads (the server's batcher may
                    merge them into batches)
and, from the responses, where the time goes: the model time the server
reports (queue and model seconds per prediction) against the client's wall
time. Writes bench/out/many_tasks.json (--out).
"""
import argparse
import concurrent.futures
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "client" / "python"))
import bench_args  # noqa: E402
from load_bench import start_server  # noqa: E402
from metatt_client import Client  # noqa: E402
from metatt_client.client import inference_pb2  # noqa: E402

TEXT = "the film was a quiet , patient study of people who rarely say what they mean"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", default=str(ROOT / "build"))
    bench_args.model_dir_flag(p)
    p.add_argument("--tasks", default="1,10,100")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--num_threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "many_tasks.json"))
    a = p.parse_args()
    build = pathlib.Path(a.build)
    counts = [int(x) for x in a.tasks.split(",")]
    family_tasks = max(counts)
    results = []
    with tempfile.TemporaryDirectory(prefix="metatt-many-") as tmp:
        data_dir = pathlib.Path(tmp) / "data"
        r = subprocess.run([str(build / "bench" / "metatt-bench-family"), f"--data_dir={data_dir}",
                            f"--model_dir={a.model_dir}", "--family=fam",
                            f"--tasks={family_tasks}"], capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"metatt-bench-family failed: {r.stderr}")
        proc, port = start_server(build / "server" / "metatt-server", data_dir, a.model_dir,
                                  [f"--num_threads={a.num_threads}", "--max_batch_size=128",
                                   "--max_queue=100000"])
        try:
            c = Client(f"127.0.0.1:{port}", timeout=600)
            names = [t.name for t in c.list_tasks("fam")][:family_tasks]

            def call(inputs):
                t0 = time.perf_counter()
                resp = c.inference.Predict(inference_pb2.PredictRequest(inputs=inputs), timeout=600)
                return time.perf_counter() - t0, resp

            def one(task):
                return inference_pb2.PredictInput(family="fam", task=task, text=TEXT)

            call([one(names[0])])  # warm-up
            for n in counts:
                tasks = names[:n]
                listed = inference_pb2.PredictInput(
                    family="fam", text=TEXT, tasks=inference_pb2.TaskList(names=tasks))
                one_call, serial, parallel, model_one, model_serial = [], [], [], [], []
                for _ in range(a.rounds):
                    wall, resp = call([listed])
                    one_call.append(wall)
                    model_one.append(resp.predictions[0].model_seconds)
                    t0 = time.perf_counter()
                    m = 0.0
                    for t in tasks:
                        _, r1 = call([one(t)])
                        m += r1.predictions[0].model_seconds
                    serial.append(time.perf_counter() - t0)
                    model_serial.append(m)
                    t0 = time.perf_counter()
                    with concurrent.futures.ThreadPoolExecutor(max_workers=n) as ex:
                        list(ex.map(lambda t: call([one(t)]), tasks))
                    parallel.append(time.perf_counter() - t0)
                med = statistics.median
                row = {"tasks": n, "one_call_s": med(one_call), "separate_serial_s": med(serial),
                       "separate_parallel_s": med(parallel),
                       "server_model_s_one_call": med(model_one),
                       "server_model_s_separate_serial_sum": med(model_serial),
                       "speedup_vs_serial": med(serial) / med(one_call),
                       "speedup_vs_parallel": med(parallel) / med(one_call)}
                print(json.dumps(row), flush=True)
                results.append(row)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    out = {"benchmark": "many_tasks_per_input", "model": "all-MiniLM-L6-v2", "device": "cpu",
           "family_tasks": family_tasks, "rounds": a.rounds, "num_threads": a.num_threads,
           "loadavg_after": os.getloadavg(), "results": results}
    pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
