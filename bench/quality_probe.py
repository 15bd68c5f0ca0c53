#!/usr/bin/env python3
"""Quality probe: a grid of metatt-train runs (task set x variant x seed) for
ablations that the table's fixed rows do not cover, e.g. the gradient clip of
a multi-task (4+1)D family.

NOT run by the test suite. Each variant is NAME=FLAGS (space-separated
metatt-train flags); every variant runs on every task set and seed with the
same protocol flags as bench/quality_bench.py. Writes OUT.json (every run's
per-task score, as it finishes) and OUT.md (mean +- std over seeds).

  bench/quality_probe.py --task_sets=STS-B+CoLA --seeds=0,1,2 --steps=300 \\
      --variant="clip1=--grad_clip=1" --variant="clip0=--grad_clip=0" \\
      --out=bench/results/cpu-quality/clip_probe
"""
import argparse
import concurrent.futures as cf
import json
import os
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_args  # noqa: E402
import quality_bench as qb  # noqa: E402  (same protocol flags, PRIMARY metrics, mean_std)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build_dir", default=os.environ.get("METATT_BUILD_DIR", os.path.join(qb.REPO, "build")))
    bench_args.model_dir_flag(p)
    p.add_argument("--glue_dir", default=os.path.join(bench_args.shared_dir(), "data", "glue"))
    p.add_argument("--task_sets", required=True, help="comma-separated; a set is TASK+TASK+...")
    p.add_argument("--variant", action="append", required=True, help="NAME=FLAGS")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=300, help="per task: a set of n tasks runs n x steps")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_length", type=int, default=64)
    p.add_argument("--train_limit", type=int, default=2000)
    p.add_argument("--max_eval", type=int, default=500)
    p.add_argument("--pooling", default="mean")
    p.add_argument("--device", default="auto")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", required=True, help="path prefix: OUT.json, OUT.md, OUT_runs/")
    return p.parse_args()


def main():
    args = parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    sets = [s.split("+") for s in args.task_sets.split(",")]
    variants = []
    for v in args.variant:
        name, _, flags = v.partition("=")
        variants.append((name, flags.split()))
    runs_dir = args.out + "_runs"
    results = {}
    if os.path.exists(args.out + ".json"):
        with open(args.out + ".json") as f:
            results = json.load(f).get("runs", {})
    lock = threading.Lock()

    def save():
        doc = {"protocol": {k: getattr(args, k) for k in ("steps", "batch_size", "max_length",
                                                          "train_limit", "max_eval", "pooling")},
               "variants": dict((n, " ".join(f)) for n, f in variants), "runs": results}
        with open(args.out + ".json", "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
        write_md(args, sets, variants, seeds, results)

    work = []
    for ts in sets:
        for name, flags in variants:
            for sd in seeds:
                key = f"{'+'.join(ts)}|{name}|{sd}"
                if key in results:
                    continue
                work.append((key, ts, flags, sd))

    def one(item):
        key, ts, flags, sd = item
        a = argparse.Namespace(**vars(args))
        a.seed = sd
        # Protocol steps first, so that a variant's own --steps/--eval_every wins.
        steps = [f"--steps={args.steps * len(ts)}", f"--eval_every={args.steps * len(ts)}"]
        out_dir = os.path.join(runs_dir, key.replace("|", "_"))
        try:
            res = qb.run_train(a, [f"--task={','.join(ts)}"] + steps + flags, out_dir)
        except RuntimeError as e:
            print(f"{key}: FAILED {e}", flush=True)
            return
        ev = res.get("final_eval") or {}
        scores = scores_of(ev, ts)
        with lock:
            results[key] = {"scores": scores, "seconds": res.get("seconds"),
                            "examples_per_second": res.get("train_examples_per_second"),
                            "final_loss": (res.get("losses") or [None])[-1]}
            print(f"{key}: {scores}", flush=True)
            save()

    with cf.ThreadPoolExecutor(max_workers=args.jobs) as ex:
        list(ex.map(one, work))
    save()


def scores_of(ev, ts):
    """Primary score x100 per task of a result.json evaluation: a family run
    (several tasks, or a task added to a family) nests metrics by task."""
    metrics = ev.get("metrics", {})
    scores = {}
    for t in ts:
        m = metrics.get(t) if isinstance(metrics.get(t), dict) else metrics
        scores[t] = 100.0 * m[qb.PRIMARY[t]] if m and qb.PRIMARY[t] in m else None
    return scores


def write_md(args, sets, variants, seeds, results):
    lines = [f"Quality probe (metatt-train, GLUE dev, {args.steps} steps per task in the set, batch "
             f"{args.batch_size}, max_length {args.max_length}, train_limit {args.train_limit}, "
             f"max_eval {args.max_eval}, pooling {args.pooling}, seeds {','.join(map(str, seeds))}); "
             "cells: mean +- std over seeds (n)", ""]
    lines.append("| task set | variant | flags | " + " | ".join(["per-task scores", "set mean"]) + " |")
    lines.append("|---|---|---|---|---|")
    for ts in sets:
        for name, flags in variants:
            cells, per_seed = [], []
            for t in ts:
                xs = [results.get(f"{'+'.join(ts)}|{name}|{sd}", {}).get("scores", {}).get(t) for sd in seeds]
                m, d = qb.mean_std(xs)
                n = sum(x is not None for x in xs)
                cells.append(f"{t} {m:.1f} +- {d:.1f} ({n})" if m is not None else f"{t} -")
            for sd in seeds:
                sc = results.get(f"{'+'.join(ts)}|{name}|{sd}", {}).get("scores", {})
                if sc and all(sc.get(t) is not None for t in ts):
                    per_seed.append(sum(sc[t] for t in ts) / len(ts))
            m, d = qb.mean_std(per_seed)
            mean = f"{m:.1f} +- {d:.1f} ({len(per_seed)})" if m is not None else "-"
            lines.append(f"| {'+'.join(ts)} | {name} | `{' '.join(flags)}` | {'; '.join(cells)} | {mean} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
