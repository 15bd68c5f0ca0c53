#!/usr/bin/env python3
"""Family listings with a large family (issue 7): time per call of
ListFamilies, GetFamily and ListTasks on a server holding a --tasks-task family
("big", default 20,000, published by metatt-bench-family) and a 3-task one
("small", the baseline measured in the same run). The listings read task
counts from summaries and one version's tasks at most (cached while pages are
read), so big/small should stay near 1 for the calls that show few tasks.

  .venv/bin/python bench/family_listing_bench.py [--tasks 20000] [--calls 20]

Writes bench/out/family_listing.json. Not part of the test suite. "first" is
the first call after the server started (it reads and parses the version);
"median" is over --calls warm calls.
"""
import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))
sys.path.insert(0, str(ROOT / "client" / "python"))

from server_harness import Server, publish_bench_family  # noqa: E402
from metatt_client.client import adapters_pb2, adapters_pb2_grpc  # noqa: E402


def timed(fn, calls):
    t0 = time.perf_counter()
    fn()
    first = (time.perf_counter() - t0) * 1e3
    xs = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        xs.append((time.perf_counter() - t0) * 1e3)
    return {"first_ms": round(first, 2), "median_ms": round(statistics.median(xs), 2),
            "max_ms": round(max(xs), 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=20000)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--model_dir", default=str(ROOT / "models" / "all-MiniLM-L6-v2"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "family_listing.json"))
    a = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = pathlib.Path(tmp) / "data"
        publish_bench_family(data, a.model_dir, "big", a.tasks)
        publish_bench_family(data, a.model_dir, "small", 3, seed=2)
        server = Server(data, a.model_dir).start()
        try:
            stub = adapters_pb2_grpc.AdapterServiceStub(server.channel())
            rpcs = {
                "ListTasks_first_page": lambda f: stub.ListTasks(
                    adapters_pb2.ListTasksRequest(family=f, page_size=100), timeout=120),
                "GetFamily": lambda f: stub.GetFamily(
                    adapters_pb2.GetFamilyRequest(family=f), timeout=120),
            }
            results = {}
            for name, rpc in rpcs.items():
                results[name] = {f: timed(lambda: rpc(f), a.calls) for f in ("big", "small")}
            # A page deep into the big family (the small one has a single page).
            deep = f"1:{a.tasks // 2}"
            results["ListTasks_deep_page"] = {"big": timed(lambda: stub.ListTasks(
                adapters_pb2.ListTasksRequest(family="big", page_size=100, page_token=deep),
                timeout=120), a.calls)}
            results["ListFamilies_both"] = {"big+small": timed(lambda: stub.ListFamilies(
                adapters_pb2.ListFamiliesRequest(), timeout=120), a.calls)}
            for name in rpcs:
                r = results[name]
                r["ratio_big_over_small_median"] = round(
                    r["big"]["median_ms"] / max(r["small"]["median_ms"], 1e-3), 2)
        finally:
            server.stop()
    report = {"tasks": a.tasks, "calls": a.calls, "results": results}
    print(json.dumps(report, indent=2))
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
