"""Decoder training throughput (issue 18): ours (`metatt-train`, MetaTT and our
LoRA) against Hugging Face PEFT LoRA in PyTorch, side by side in one run.

The same rows for every mode: the first --rows training rows of a
commonsense set (ARC-Easy by default) in the model's chat template (user turn
= instruction [+ input], assistant turn = output), truncated to --max_length
tokens (completion first, then the prompt's last tokens, as
server/training/lm_objective.cc does), batches of --batch_size in file order,
causal-LM loss on the completion tokens only, AdamW, fp32 on the CPU.

tokens/s = real (unpadded) tokens of the batches / summed step time (forward,
backward, optimizer step), over every step: the definition `metatt-train`
reports as train_tokens_per_second (server/training/trainer.cc). Model
loading, tokenisation and evaluation are outside the timed steps.

Modes alternate inside each round (ours MetaTT, ours LoRA, PEFT LoRA, ...) so
that a change in the machine's load falls on all of them; medians are
reported, and ratios against PEFT of the same round.

  .venv/bin/python bench/decoder_train_bench.py --steps 6 --rounds 2 --threads 2 \
      --out bench/results/cpu-decoder/train_throughput.json
"""
import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import bench_args
from decoder_quality_peft import build_row, encode_example, pad_batch

ROOT = pathlib.Path(__file__).resolve().parents[1]

OURS = {
    "ours_metatt": ["--adapter=metatt"],  # the decoder recipe's default form, rank, projections
    "ours_lora_r8": ["--adapter=lora", "--rank=8", "--alpha=16", "--projections=q,v"],
}


def load_rows(args):
    path = pathlib.Path(args.data_dir) / args.set / "train.json"
    rows = json.loads(path.read_text())
    return rows[: args.rows]


def run_ours(mode, args, rows_file, workdir):
    out = pathlib.Path(workdir) / mode
    build = args.build_dir
    if mode.endswith("_prev"):  # the same mode on an earlier build (--prev_build_dir)
        build, mode = args.prev_build_dir, mode[: -len("_prev")]
    cmd = [str(pathlib.Path(build) / "server" / "training" / "metatt-train"),
           f"--model_dir={args.model_dir}", f"--train={rows_file}", "--format=jsonl",
           f"--eval={rows_file}", "--max_eval=1", "--max_new_tokens=1",
           f"--steps={args.steps}", f"--batch_size={args.batch_size}",
           f"--max_length={args.max_length}", "--eval_every=0", "--log_every=1",
           "--warmup_ratio=0", f"--seed={args.seed}", f"--out={out}"] + OURS[mode]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode}: metatt-train failed\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    res = json.loads((out / "result.json").read_text())
    return {"tokens_per_second": res.get("train_tokens_per_second"),
            "adapter_parameters": res.get("adapter_parameters"),
            "final_train_loss": (res.get("losses") or [None])[-1]}


class Peft:
    """PEFT LoRA r=8 (alpha 16) on q_proj, v_proj of LlamaForCausalLM."""

    def __init__(self, args, rows):
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoTokenizer, LlamaForCausalLM
        torch.set_num_threads(args.threads)
        self.torch = torch
        self.args = args
        tok = AutoTokenizer.from_pretrained(args.model_dir)
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        # The same ids and truncation as metatt-train (and decoder_quality's PEFT row).
        self.examples = [build_row(*encode_example(tok, r), args.max_length) for r in rows]
        base = LlamaForCausalLM.from_pretrained(args.model_dir, torch_dtype=torch.float32)
        cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                         lora_dropout=0.0, task_type="CAUSAL_LM")
        self.model = get_peft_model(base, cfg)
        self.params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def run(self):
        torch, args = self.torch, self.args
        torch.manual_seed(args.seed)
        for n, p in self.model.named_parameters():  # a fresh adapter each round
            if "lora_B" in n:
                torch.nn.init.zeros_(p)
        opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-3,
                                weight_decay=0.0)
        self.model.train()
        tokens, secs, loss_v = 0, 0.0, None
        n = len(self.examples)
        for step in range(args.steps):
            batch = [self.examples[(step * args.batch_size + i) % n] for i in range(args.batch_size)]
            ids, mask, labels = (torch.tensor(x) for x in pad_batch(batch, self.pad))
            tokens += int(mask.sum())
            t0 = time.perf_counter()
            out = self.model(input_ids=ids, attention_mask=mask, labels=labels)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            secs += time.perf_counter() - t0
            loss_v = out.loss.item()
        return {"tokens_per_second": tokens / secs, "adapter_parameters": self.params,
                "final_train_loss": loss_v}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_dir", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    p.add_argument("--build_dir", default=str(ROOT / "build"))
    p.add_argument("--data_dir", default=os.path.join(bench_args.shared_dir(), "data",
                                                      "commonsense"))
    p.add_argument("--set", default="ARC-Easy")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", default="ours_metatt,ours_lora_r8,peft_lora_r8",
                   help="ours_metatt, ours_lora_r8, peft_lora_r8; MODE_prev runs an ours MODE "
                        "with the metatt-train of --prev_build_dir (a before/after comparison)")
    p.add_argument("--prev_build_dir", default="")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "decoder_train_bench.json"))
    args = p.parse_args()
    modes = args.modes.split(",")
    rows = load_rows(args)
    with tempfile.TemporaryDirectory() as work:
        rows_file = pathlib.Path(work) / "rows.jsonl"
        rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        peft = Peft(args, rows) if "peft_lora_r8" in modes else None
        runs = []
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        load0 = os.getloadavg()
        for rnd in range(args.rounds):
            for mode in modes:
                t0 = time.time()
                res = peft.run() if mode == "peft_lora_r8" else run_ours(
                    mode, args, rows_file, pathlib.Path(work) / f"r{rnd}")
                res.update(mode=mode, round=rnd, wall_seconds=round(time.time() - t0, 1),
                           load_average=round(os.getloadavg()[0], 2))
                runs.append(res)
                print(f"round {rnd} {mode}: {res['tokens_per_second']:.1f} tokens/s "
                      f"({res['adapter_parameters']} adapter parameters)", flush=True)
    summary = {}
    for mode in modes:
        tps = [r["tokens_per_second"] for r in runs if r["mode"] == mode]
        summary[mode] = {"median_tokens_per_second": round(statistics.median(tps), 1),
                         "runs": [round(t, 1) for t in tps]}
    if "peft_lora_r8" in modes:
        for mode in modes:
            ratios = []
            for rnd in range(args.rounds):
                a = [r for r in runs if r["mode"] == mode and r["round"] == rnd]
                b = [r for r in runs if r["mode"] == "peft_lora_r8" and r["round"] == rnd]
                ratios.append(a[0]["tokens_per_second"] / b[0]["tokens_per_second"])
            summary[mode]["vs_peft_same_round"] = [round(x, 2) for x in ratios]
            summary[mode]["vs_peft_median"] = round(statistics.median(ratios), 2)
    out = {"benchmark": "decoder_train_throughput", "model": pathlib.Path(args.model_dir).name,
           "precision": "float32", "device": "cpu", "machine": platform.node(),
           "cpu_count": os.cpu_count(), "threads": args.threads, "set": args.set,
           "rows": args.rows, "steps": args.steps, "batch_size": args.batch_size,
           "max_length": args.max_length, "started": started,
           "load_average_at_start": [round(x, 2) for x in load0],
           "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
           "runs": runs, "summary": summary}
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.exit(main())
