#!/usr/bin/env python3
"""HTTP gateway overhead: the same Predict through gRPC (the Python stub) and
through metatt-http's POST /v1/classifications (one keep-alive connection),
one request at a time, against the real metatt-server (all-MiniLM-L6-v2)
and a published random (4+1)D family (metatt-bench-family). Writes
bench/out/http_vs_grpc.json (--out): p50 / p90 latency of each and the
HTTP/gRPC ratio, measured in the same run, interleaved.
"""
import argparse
import http.client
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
from load_bench import start_listening, start_server  # noqa: E402
from metatt_client import Client  # noqa: E402
from metatt_client.client import inference_pb2  # noqa: E402


def pct(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, int(q * (len(v) - 1) + 0.5))]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", default=str(ROOT / "build"))
    bench_args.model_dir_flag(p)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "http_vs_grpc.json"))
    a = p.parse_args()
    build = pathlib.Path(a.build)
    with tempfile.TemporaryDirectory(prefix="metatt-http-bench-") as tmp:
        data_dir = pathlib.Path(tmp) / "data"
        r = subprocess.run([str(build / "bench" / "metatt-bench-family"), f"--data_dir={data_dir}",
                            f"--model_dir={a.model_dir}", "--family=fam", "--tasks=10"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"metatt-bench-family failed: {r.stderr}")
        server, port = start_server(build / "server" / "metatt-server", data_dir, a.model_dir,
                                    ["--num_threads=2"])
        gateway, gport = start_listening([str(build / "server" / "http" / "metatt-http"),
                                          "--listen=127.0.0.1:0", f"--server=127.0.0.1:{port}"],
                                         timeout=60)
        try:
            c = Client(f"127.0.0.1:{port}", timeout=120)
            task = next(iter(c.list_tasks("fam"))).name
            text = "a gorgeous , witty , seductive movie ."
            conn = http.client.HTTPConnection("127.0.0.1", gport, timeout=120)
            body = json.dumps({"model": f"fam:{task}", "input": text})

            def via_http():
                t0 = time.perf_counter()
                conn.request("POST", "/v1/classifications", body=body,
                             headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                if resp.status != 200:
                    sys.exit(f"HTTP {resp.status}: {data[:300]!r}")
                return time.perf_counter() - t0, json.loads(data)

            req = inference_pb2.PredictRequest(
                inputs=[inference_pb2.PredictInput(family="fam", task=task, text=text)])

            def via_grpc():
                t0 = time.perf_counter()
                resp = c.inference.Predict(req, timeout=120)
                return time.perf_counter() - t0, resp

            for _ in range(10):  # warm-up both paths
                via_http()
                via_grpc()
            h, g = [], []
            for _ in range(a.requests):  # interleaved: both see the same machine
                h.append(via_http()[0])
                g.append(via_grpc()[0])
            _, hj = via_http()
            _, gr = via_grpc()
            same = abs(max(hj["data"][0]["scores"]) - max(gr.predictions[0].scores)) < 1e-5 \
                if "data" in hj and hj["data"] and "scores" in hj["data"][0] else None
        finally:
            gateway.terminate()
            server.terminate()
            gateway.wait(timeout=30)
            server.wait(timeout=60)
    out = {"benchmark": "http_vs_grpc_predict", "model": "all-MiniLM-L6-v2", "device": "cpu",
           "requests": a.requests, "loadavg_after": os.getloadavg(),
           "grpc_ms": {"p50": 1e3 * statistics.median(g), "p90": 1e3 * pct(g, 0.9)},
           "http_ms": {"p50": 1e3 * statistics.median(h), "p90": 1e3 * pct(h, 0.9)},
           "http_over_grpc_p50": statistics.median(h) / statistics.median(g),
           "http_minus_grpc_p50_ms": 1e3 * (statistics.median(h) - statistics.median(g)),
           "same_top_score": same}
    print(json.dumps(out, indent=2))
    pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(a.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
