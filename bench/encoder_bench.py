#!/usr/bin/env python3
"""Encoder forward: ours (LibTorch, C++) vs transformers (PyTorch) on the same
machine, thread count, model (MiniLM), batch 32, sequence 128. Writes
bench/out/encoder_bench.json with both throughputs and the ratio."""
import argparse
import json
import os
import pathlib
import statistics
import subprocess
import time

import torch
from transformers import AutoModel

import bench_args

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser()
    bench_args.forward_flags(ap, iters=10)
    args = ap.parse_args()
    build = pathlib.Path(os.environ.get("METATT_BUILD_DIR", ROOT / "build"))
    model = bench_args.default_model_dir()
    ours = json.loads(subprocess.run(
        [str(build / "bench" / "metatt-bench-encoder"), f"--model_dir={model}",
         f"--device={args.device}", f"--batch={args.batch}", f"--seq={args.seq}",
         f"--iters={args.iters}", f"--threads={args.threads}"],
        check=True, capture_output=True, text=True).stdout)

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    hf = AutoModel.from_pretrained(model).float().to(dev).eval()  # fp32, as ours
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (args.batch, args.seq), generator=g).to(dev)
    mask = torch.ones_like(ids)
    times = []
    with torch.inference_mode():
        for _ in range(2):
            hf(input_ids=ids, attention_mask=mask)
        for _ in range(args.iters):
            t0 = time.perf_counter()
            hf(input_ids=ids, attention_mask=mask)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    theirs = {"impl": "transformers-pytorch", "attn": hf.config._attn_implementation,
              "median_seconds": med, "sequences_per_second": args.batch / med}
    result = {"model": "all-MiniLM-L6-v2", "batch": args.batch, "seq": args.seq,
              "threads": args.threads, "device": args.device, "ours": ours,
              "transformers": theirs,
              "ratio_ours_over_transformers": ours["sequences_per_second"] / theirs["sequences_per_second"]}
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "encoder_bench.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
