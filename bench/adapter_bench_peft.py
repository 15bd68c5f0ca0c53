"""PEFT LoRA inference throughput in PyTorch, same settings as adapter_bench.cc.

MiniLM (default <repo>/models/all-MiniLM-L6-v2), batch 32, seq 128,
torch.no_grad, 2 threads; base model alone and PEFT LoRA r=8 (alpha 16) on
query/value, unmerged. Rounds are interleaved; medians reported. JSON to
stdout and bench/out/adapter_bench_peft.json.
"""
import argparse
import json
import os
import statistics
import time

import torch

import bench_args


def main():
    ap = argparse.ArgumentParser()
    bench_args.model_dir_flag(ap)
    bench_args.forward_flags(ap, iters=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default="bench/out/adapter_bench_peft.json")
    args = ap.parse_args()

    import peft
    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    # fp32 whatever dtype the weights were saved in (as our encoder runs).
    base = transformers.AutoModel.from_pretrained(args.model_dir).float().to(dev).eval()
    vocab = base.config.vocab_size
    ids = torch.randint(1000, vocab, (args.batch, args.seq)).to(dev)
    mask = torch.ones_like(ids)
    lora = peft.get_peft_model(
        transformers.AutoModel.from_pretrained(args.model_dir).float().to(dev).eval(),
        peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                        lora_dropout=0.0, init_lora_weights=False)).eval()
    cases = {"hf_base": base, "peft_lora_r8_qv_unmerged": lora}
    secs = {k: [] for k in cases}
    with torch.no_grad():
        for r in range(args.warmup + args.iters):
            for name, m in cases.items():
                t0 = time.perf_counter()
                m(input_ids=ids, attention_mask=mask).last_hidden_state.sum().item()
                dt = time.perf_counter() - t0
                if r >= args.warmup:
                    secs[name].append(dt)
    base_s = statistics.median(secs["hf_base"])
    res = {
        "benchmark": "adapter_inference_peft", "model_dir": args.model_dir,
        "batch": args.batch, "seq": args.seq, "threads": args.threads, "iters": args.iters,
        "device": args.device, "torch": torch.__version__, "peft": peft.__version__,
        "results": [{"name": k, "median_s": statistics.median(v), "min_s": min(v),
                     "seq_per_s": args.batch / statistics.median(v),
                     "throughput_vs_base": base_s / statistics.median(v)}
                    for k, v in secs.items()],
    }
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
