"""Decoder quality on the commonsense sets (issue 18): the base model
zero-shot vs MetaTT vs our LoRA, all through `metatt-train` (the same
prompts: the model's chat template over the instruction; scoring: the first
answer1..5 / true|false of the greedy generation against `answer`,
server/training/eval_scores.h ExtractAnswer).

CPU protocol (stated; the full protocol belongs on a GPU): per set, a seeded
random subset of --train_limit training rows (default 300), the first
--max_eval test rows (default 200), --steps optimizer steps of --batch_size
rows (default 150 x 8), max length 256 tokens, up to 16 generated tokens,
one seed. Rows:

  zero_shot      the base model, no adapter delta (--eval_only: a fresh
                 MetaTT adapter with the ze-* init adds exactly zero)
  metatt4d       MetaTT-4D, the recipe's default rank and projections
                 (q,k,v,o), lr 2.5e-3 (the recipe default)
  lora_r8        our LoRA r=8 (alpha 16) on q,v, lr 1e-3

Every run is nice'd (nice -n 10) with OMP_NUM_THREADS=--threads (default 1).
Writes bench/results/cpu-decoder/decoder_quality.json (+ .md) and each run's
log and result.json under bench/results/cpu-decoder/runs/.

  .venv/bin/python bench/decoder_quality.py --sets ARC-Easy
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "cpu-decoder"

ROWS = {
    "zero_shot": ["--eval_only"],
    "metatt4d": ["--adapter=metatt", "--form=4d"],
    "lora_r8": ["--adapter=lora", "--rank=8", "--alpha=16", "--projections=q,v", "--lr=1e-3"],
}


def run(row, task, args, run_dir):
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = ["nice", "-n", "10", str(ROOT / "build" / "server" / "training" / "metatt-train"),
           f"--model_dir={args.model_dir}", f"--task={task}", f"--train_limit={args.train_limit}",
           f"--max_eval={args.max_eval}", f"--steps={args.steps}", f"--batch_size={args.batch_size}",
           "--max_length=256", f"--max_new_tokens={args.max_new_tokens}", "--eval_every=0",
           f"--seed={args.seed}", f"--log_every=10", f"--out={run_dir}"] + ROWS[row]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    t0 = time.time()
    with open(run_dir / "log.txt", "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        return {"row": row, "task": task, "error": f"exit {rc}, see {run_dir / 'log.txt'}"}
    res = json.loads((run_dir / "result.json").read_text())
    ev = res.get("final_eval", {}).get("metrics", {}).get(task, {})
    return {"row": row, "task": task, "answer_accuracy": ev.get("answer_accuracy"),
            "eval_examples": ev.get("examples"), "adapter_parameters":
            0 if row == "zero_shot" else res.get("adapter_parameters"),
            "train_tokens_per_second": res.get("train_tokens_per_second"),
            "steps": res.get("steps", 0), "wall_seconds": round(time.time() - t0, 1)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model_dir", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    p.add_argument("--sets", default="ARC-Easy")
    p.add_argument("--rows", default="zero_shot,metatt4d,lora_r8")
    p.add_argument("--train_limit", type=int, default=300)
    p.add_argument("--max_eval", type=int, default=200)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parallel", action="store_true",
                   help="run a set's rows side by side (one process each; on a shared CPU the "
                        "scheduler then gives the benchmark a share per row)")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    protocol = {k: v for k, v in vars(args).items() if k not in ("out",)}
    protocol["max_length"] = 256
    protocol["machine"] = "CPU, 2 cores shared with other work (contended); one seed"
    results = []
    path = out / "decoder_quality.json"
    from concurrent.futures import ThreadPoolExecutor
    for task in args.sets.split(","):
        rows = args.rows.split(",")
        with ThreadPoolExecutor(max_workers=len(rows) if args.parallel else 1) as pool:
            futures = [pool.submit(run, row, task, args, out / "runs" / f"{task}_{row}")
                       for row in rows]
            for f in futures:
                r = f.result()
                results.append(r)
                print(json.dumps(r), flush=True)
                path.write_text(json.dumps({"protocol": protocol, "results": results}, indent=2))
    lines = ["| set | row | answer accuracy | eval rows | adapter params | train tokens/s | steps |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        acc = r.get("answer_accuracy")
        lines.append(f"| {r['task']} | {r['row']} | "
                     f"{'error' if acc is None else f'{100 * acc:.1f}'} | {r.get('eval_examples')} | "
                     f"{r.get('adapter_parameters')} | {r.get('train_tokens_per_second') or '-'} | "
                     f"{r.get('steps')} |")
    (out / "decoder_quality.md").write_text(
        "Protocol: " + json.dumps(protocol) + "\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
