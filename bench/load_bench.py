#!/usr/bin/env python3
"""Load benchmark of Predict (issue 7): mixed-task MetaTT serving vs the same
server binary with the adapter switched off (--inference_base_only: encoder +
task heads, no adapter), N concurrent gRPC clients on loopback.

  .venv/bin/python bench/load_bench.py            # writes bench/out/load_bench.json

Steps: metatt-bench-family publishes random (4+1)D families with 1, 100 and
10,000 task slices into a scratch --data_dir; two metatt-server processes are
started on it (adapter on / base only); for every (tasks, clients) pair the C++
load generator metatt-bench-load runs against each server in turn (interleaved,
so drift of a shared machine hits both alike; --rounds times, medians kept)
and its JSON lines are merged:
throughput, p50/p99 latency, mixed/base ratios and the server overhead at p50
(client latency minus the model time the server reports for the request's
batch). Not part of the test suite.
"""
import argparse
import json
import os
import pathlib
import platform
import subprocess
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def start_listening(cmd, timeout=180):
    """Starts `cmd` (metatt-server, metatt-http: both print "LISTENING <port>")
    and returns (process, port); exits naming the command if it never does."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if line.startswith("LISTENING "):
            return proc, int(line.split()[1])
        if not line and proc.poll() is not None:
            break
    proc.kill()
    sys.exit(f"did not start: {' '.join(cmd)}")


def start_server(binary, data_dir, model_dir, extra):
    return start_listening([str(binary), "--listen=127.0.0.1:0", "--metrics_listen=",
                            f"--data_dir={data_dir}", f"--model_dir={model_dir}", *extra])


def median_run(runs):
    """Per-field median over rounds (each field separately); `rounds` keeps all."""
    out = dict(runs[0])
    for k, v in runs[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = statistics.median(r[k] for r in runs)
    out["rounds"] = runs
    return out


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default=str(ROOT / "build"))
    ap.add_argument("--model_dir", default=str(ROOT / "models" / "all-MiniLM-L6-v2"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clients", default="1,16,100")
    ap.add_argument("--tasks", default="1,100,10000")
    ap.add_argument("--seconds", type=float, default=4)
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved base/mixed runs per config; medians are reported")
    ap.add_argument("--warmup_seconds", type=float, default=1)
    ap.add_argument("--words", type=int, default=8, help="words per request sentence")
    ap.add_argument("--max_batch_size", type=int, default=32)
    ap.add_argument("--batch_timeout_ms", type=int, default=2)
    ap.add_argument("--num_threads", type=int, default=0, help="server torch threads (0 = default)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "load_bench.json"))
    a = ap.parse_args()
    build = pathlib.Path(a.build)
    server_bin = build / "server" / "metatt-server"
    family_bin = build / "bench" / "metatt-bench-family"
    load_bin = build / "bench" / "metatt-bench-load"
    for b in (server_bin, family_bin, load_bin):
        if not b.exists():
            sys.exit(f"{b} not built: cmake --build build --target metatt-server "
                     "metatt-bench-family metatt-bench-load")
    clients = [int(x) for x in a.clients.split(",")]
    task_counts = [int(x) for x in a.tasks.split(",")]
    t_start = time.time()
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="metatt-load-") as tmp:
        data_dir = pathlib.Path(tmp) / "data"
        for n in task_counts:
            r = subprocess.run([str(family_bin), f"--data_dir={data_dir}", f"--model_dir={a.model_dir}",
                                f"--family=t{n}", f"--tasks={n}"], capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"metatt-bench-family failed: {r.stderr}")
            print(r.stdout.strip(), flush=True)
        common = [f"--device={a.device}", f"--max_batch_size={a.max_batch_size}",
                  f"--batch_timeout_ms={a.batch_timeout_ms}", f"--num_threads={a.num_threads}",
                  "--max_queue=100000"]
        servers = {}
        try:
            servers["mixed"] = start_server(server_bin, data_dir, a.model_dir, common)
            servers["base"] = start_server(server_bin, data_dir, a.model_dir,
                                           common + ["--inference_base_only"])
            runs = []
            for n in task_counts:
                for c in clients:
                    rounds = {"base": [], "mixed": []}
                    for k in range(a.rounds):
                        # Alternate which mode goes first, so drift hits both.
                        for mode in (("base", "mixed") if k % 2 == 0 else ("mixed", "base")):
                            port = servers[mode][1]
                            r = subprocess.run(
                                [str(load_bin), f"--target=127.0.0.1:{port}", f"--family=t{n}",
                                 f"--tasks={n}", f"--clients={c}", f"--seconds={a.seconds}",
                                 f"--warmup_seconds={a.warmup_seconds}", f"--words={a.words}",
                                 f"--label={mode}"], capture_output=True, text=True)
                            if r.returncode != 0 or not r.stdout.strip():
                                sys.exit(f"metatt-bench-load failed ({mode}, {n} tasks, {c} "
                                         f"clients): {r.stderr[-2000:]}")
                            rounds[mode].append(json.loads(r.stdout.strip().splitlines()[-1]))
                    pair = {mode: median_run(rs) for mode, rs in rounds.items()}
                    b, m = pair["base"], pair["mixed"]
                    row = {
                        "tasks": n, "clients": c, "base": b, "mixed": m,
                        "throughput_ratio_mixed_over_base":
                            m["throughput_rps"] / b["throughput_rps"] if b["throughput_rps"] else None,
                        "latency_p50_ratio_mixed_over_base":
                            m["latency_p50_ms"] / b["latency_p50_ms"] if b["latency_p50_ms"] else None,
                        "latency_p99_ratio_mixed_over_base":
                            m["latency_p99_ms"] / b["latency_p99_ms"] if b["latency_p99_ms"] else None,
                    }
                    runs.append(row)
                    print(f"tasks={n:>6} clients={c:>4} | base {b['throughput_rps']:8.1f} rps "
                          f"p50 {b['latency_p50_ms']:7.2f} p99 {b['latency_p99_ms']:7.2f} ms | "
                          f"mixed {m['throughput_rps']:8.1f} rps p50 {m['latency_p50_ms']:7.2f} "
                          f"p99 {m['latency_p99_ms']:7.2f} ms | ratio "
                          f"{row['throughput_ratio_mixed_over_base']:.3f} | overhead p50 "
                          f"{m['overhead_p50_ms']:.3f} ms (rpc {m['rpc_overhead_p50_ms']:.3f})",
                          flush=True)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
            for proc, _ in servers.values():
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()

    big = max(task_counts)
    most = max(clients)
    sel = [r for r in runs if r["tasks"] == big and r["clients"] == most]
    one = [r for r in runs if r["clients"] == min(clients)]
    result = {
        "benchmark": "load_bench",
        "model": pathlib.Path(a.model_dir).name,
        "device": a.device,
        "machine": {"cpus": os.cpu_count(), "cpu": cpu_model(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                    "note": "server and load generator share the same CPUs"},
        "settings": {k: getattr(a, k) for k in ("seconds", "rounds", "warmup_seconds", "words",
                                                 "max_batch_size", "batch_timeout_ms",
                                                 "num_threads")},
        "runs": runs,
        "targets": {
            "mixed_throughput_over_base_at_max_tasks_and_clients": {
                "tasks": big, "clients": most, "target": 0.97,
                "value": sel[0]["throughput_ratio_mixed_over_base"] if sel else None},
            "server_overhead_p50_ms_single_client": {
                "target": 1.0,
                "values": {str(r["tasks"]): r["mixed"]["overhead_p50_ms"] for r in one}},
        },
        "wall_seconds": time.time() - t_start,
    }
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["targets"], indent=2))
    print(f"wrote {out} ({result['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
