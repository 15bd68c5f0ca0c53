#!/usr/bin/env python3
"""Soak (issue 9): N concurrent clients (default 100) predict over loopback
for a bounded time while a fine-tuning job trains on the same server. Reports
errors (must be zero), latency p50/p99 overall and per window, the server's
resident memory (VmRSS from /proc) over time and a verdict on its growth.

  .venv/bin/python bench/soak.py [--seconds 120] [--clients 100] [--model_dir DIR]

Writes bench/out/soak.json. Not part of the test suite. Memory is judged
after a warm-up (the first --warmup seconds, allocator pools and caches fill
there): least-squares slope of RSS over the rest, and the mean of the last
third vs the first third; "flat" when the growth over the measured span is
under max(16 MiB, 2 %) of the starting RSS.
"""
import argparse
import json
import os
import pathlib
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "client" / "python"))
from load_bench import cpu_model, start_server  # noqa: E402 (same folder: one server start-up for both benches)


def percentile(xs, q):
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return None


def slope_per_minute(points):
    """Least-squares slope of (t seconds, bytes) in bytes/minute."""
    n = len(points)
    if n < 2:
        return 0.0
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    den = sum((t - mt) ** 2 for t, _ in points)
    return 60 * sum((t - mt) * (v - mv) for t, v in points) / den if den else 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--warmup", type=float, default=20, help="seconds left out of the memory fit")
    ap.add_argument("--sample_every", type=float, default=2.0)
    ap.add_argument("--build", default=str(ROOT / "build"))
    ap.add_argument("--model_dir", default=str(ROOT / "models" / "all-MiniLM-L6-v2"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "glue" / "SST-2"
                                          / "train.tsv"))
    ap.add_argument("--rows", type=int, default=2000, help="training rows uploaded")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "soak.json"))
    args = ap.parse_args()

    from metatt_client.client import Client, MetattError, inference_pb2, jobs_pb2  # noqa: E402
    from metatt.v1 import inference_pb2_grpc  # noqa: E402 (on sys.path via metatt_client)
    import grpc

    lines = pathlib.Path(args.data).read_text().splitlines()
    header, rows = lines[0], lines[1:args.rows + 1]
    texts = [r.split("\t")[0] for r in rows]
    blob = ("\n".join([header] + rows) + "\n").encode()

    tmp = tempfile.TemporaryDirectory(prefix="metatt-soak-")
    proc, port = start_server(pathlib.Path(args.build) / "server" / "metatt-server",
                              pathlib.Path(tmp.name) / "data", args.model_dir,
                              [f"--device={args.device}"])
    result = {"bench": "soak", "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                                           "device": args.device},
              "clients": args.clients, "seconds": args.seconds, "model_dir": args.model_dir}
    try:
        c = Client(f"127.0.0.1:{port}", timeout=600)
        ds = c.upload(None, "sst2", text_column="sentence", label_column="label", data=blob)
        t0 = time.time()
        first = c.submit("soak", "SST-2", ds.id, max_steps=10, batch_size=8, max_length=64)
        done = c.wait(first.id)
        assert done.state == jobs_pb2.SUCCEEDED, done
        result["setup_train_seconds"] = round(time.time() - t0, 1)
        # The job that trains during the whole soak (cancelled at the end).
        long_job = c.submit("soak", "SST-2b", ds.id, kind="add_task", max_steps=1000000,
                            batch_size=8, max_length=64)
        while c.get_job(long_job.id).state != jobs_pb2.RUNNING:
            time.sleep(0.2)
        steps_at_start = c.get_job(long_job.id).step

        stop = threading.Event()
        lock = threading.Lock()
        lat = []            # (t_end - start, seconds)
        errors = {}
        n_channels = max(1, args.clients // 25)
        chans = [grpc.insecure_channel(f"127.0.0.1:{port}") for _ in range(n_channels)]
        stubs = [inference_pb2_grpc.InferenceServiceStub(ch) for ch in chans]
        start = time.time()

        def client(i):
            rng = random.Random(i)
            stub = stubs[i % len(stubs)]
            while not stop.is_set():
                req = inference_pb2.PredictRequest(inputs=[inference_pb2.PredictInput(
                    family="soak", task="SST-2", text=rng.choice(texts))])
                t = time.time()
                try:
                    stub.Predict(req, timeout=60)
                    ok = True
                except grpc.RpcError as e:
                    ok = False
                    code = e.code().name
                dt = time.time() - t
                with lock:
                    if ok:
                        lat.append((t + dt - start, dt))
                    else:
                        errors[code] = errors.get(code, 0) + 1

        threads = [threading.Thread(target=client, args=(i,), daemon=True)
                   for i in range(args.clients)]
        for th in threads:
            th.start()
        samples = []
        while time.time() - start < args.seconds:
            now = time.time() - start
            with lock:
                window = [d for te, d in lat if te > now - args.sample_every]
                n_total = len(lat)
            samples.append({"t": round(now, 2), "rss_mib": round(rss_bytes(proc.pid) / 2**20, 1),
                            "window_p50_ms": ms(percentile(window, 0.5)),
                            "window_p99_ms": ms(percentile(window, 0.99)),
                            "requests": n_total})
            print(f"t={now:6.1f}s rss={samples[-1]['rss_mib']:8.1f} MiB "
                  f"p50={samples[-1]['window_p50_ms']} p99={samples[-1]['window_p99_ms']} ms "
                  f"requests={n_total} errors={sum(errors.values())}", flush=True)
            time.sleep(args.sample_every)
        stop.set()
        for th in threads:
            th.join(timeout=70)
        elapsed = time.time() - start
        job = c.get_job(long_job.id)
        train_steps = job.step - steps_at_start
        job_state_during = jobs_pb2.JobState.Name(job.state)
        c.cancel(long_job.id)

        d = [x for _, x in lat]
        fit = [(s["t"], s["rss_mib"] * 2**20) for s in samples if s["t"] >= args.warmup]
        third = max(1, len(fit) // 3)
        first_mean = statistics.mean(v for _, v in fit[:third]) if fit else 0
        last_mean = statistics.mean(v for _, v in fit[-third:]) if fit else 0
        slope = slope_per_minute(fit)
        span_min = (fit[-1][0] - fit[0][0]) / 60 if len(fit) > 1 else 0
        growth = slope * span_min
        limit = max(16 * 2**20, 0.02 * first_mean)
        result.update({
            "requests": len(d), "errors": errors, "error_count": sum(errors.values()),
            "throughput_rps": round(len(d) / elapsed, 1),
            "latency_ms": {"p50": ms(percentile(d, 0.5)), "p90": ms(percentile(d, 0.9)),
                           "p99": ms(percentile(d, 0.99)), "max": ms(max(d) if d else None)},
            "training_job": {"state_at_end": job_state_during, "steps_during_soak": train_steps,
                             "steps_per_second": round(train_steps / elapsed, 2)},
            "memory": {"samples": samples, "warmup_seconds": args.warmup,
                       "slope_mib_per_min": round(slope / 2**20, 2),
                       "first_third_mean_mib": round(first_mean / 2**20, 1),
                       "last_third_mean_mib": round(last_mean / 2**20, 1),
                       "fitted_growth_mib": round(growth / 2**20, 1),
                       "limit_mib": round(limit / 2**20, 1),
                       "verdict": "flat" if abs(growth) < limit else "growing"},
        })
        result["verdict"] = ("ok" if result["error_count"] == 0 and job_state_during == "RUNNING"
                             and result["memory"]["verdict"] == "flat" else "FAIL")
    except MetattError as e:
        result["verdict"] = f"FAIL: {e}"
    finally:
        proc.terminate()
        try:
            result["server_exit_code"] = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            result["server_exit_code"] = "killed"
        tmp.cleanup()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    summary = {k: v for k, v in result.items() if k != "memory"}
    summary["memory"] = {k: v for k, v in result.get("memory", {}).items() if k != "samples"}
    print(json.dumps(summary, indent=1))
    print(f"wrote {out}")
    return 0 if result.get("verdict") == "ok" else 1


def ms(x):
    return None if x is None else round(x * 1000, 2)


if __name__ == "__main__":
    sys.exit(main())
