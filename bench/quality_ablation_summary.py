#!/usr/bin/env python3
"""Collects quality_bench.py ablation outputs (each --out folder) into one
table: per (row, task) the dev score and the mean training loss of the last
60 steps (a less quantised signal than a 500-row dev score on short runs),
and, where the run kept its cores.safetensors, how far each MetaTT core moved
from its ze-id-id-id start (core_drift: the inner cores' slices and the output
core as ||G - I|| / ||I||, averaged over slices; the zero-started input core
as its norm).

  .venv/bin/python bench/quality_ablation_summary.py OUT.json OUT.md DIR [DIR ...]
"""
import glob
import json
import os
import sys

import numpy as np


def core_drift(path):
    """{core name: drift} for a MetaTT cores.safetensors (see the docstring);
    {} for a file without MetaTT cores (LoRA) or a missing file."""
    if not os.path.exists(path):
        return {}
    from safetensors.numpy import load_file
    drift = {}
    for name, t in sorted(load_file(path).items()):
        if not name.startswith("core."):
            continue
        t = t.astype(np.float64)
        if name == "core.in":
            drift[name + " (norm)"] = float(np.linalg.norm(t))
            continue
        if t.ndim == 2:  # the output core (r x D_out) or a task slice (r x r)
            slices = [t]
        else:  # r x n x r: n slices
            slices = [t[:, i, :] for i in range(t.shape[1])]
        eye = np.eye(*slices[0].shape)
        drift[name] = float(np.mean([np.linalg.norm(x - eye) / np.linalg.norm(eye) for x in slices]))
    return drift


def main():
    out_json, out_md, dirs = sys.argv[1], sys.argv[2], sys.argv[3:]
    rows = []
    for d in dirs:
        settings = json.load(open(os.path.join(d, "quality.json")))["settings"]
        defs = dict(x.split("=", 1) for x in settings.get("row_def", []))
        for f in sorted(glob.glob(os.path.join(d, "runs", "*", "seed*", "*", "result.json"))):
            parts = f.split(os.sep)
            row, seed, task = parts[-4], parts[-3], parts[-2]
            r = json.load(open(f))
            losses = r.get("losses") or []
            m = (r.get("final_eval") or {}).get("metrics", {}).get(task, {})
            primary = "mcc" if task == "CoLA" else ("f1_acc" if task == "MRPC" else
                                                    "pearson_spearman" if task == "STS-B" else "accuracy")
            name = row.split("_at_")[0]
            rows.append({"experiment": os.path.basename(d), "row": row.replace("_at_", "@"), "seed": seed,
                         "task": task, "flags": defs.get(name, name), "score": m.get(primary),
                         "metric": primary, "train_loss_last60": sum(losses[-60:]) / max(1, len(losses[-60:])),
                         "steps": r.get("steps"), "adapter_parameters": r.get("adapter_parameters"),
                         "train_examples_per_second": r.get("train_examples_per_second"),
                         "core_drift": core_drift(os.path.join(os.path.dirname(f), "cores.safetensors"))})
    json.dump({"runs": rows}, open(out_json, "w"), indent=2)
    lines = ["| experiment | row | flags | task | seed | score | train loss (last 60 steps) | core drift |",
             "|---|---|---|---|---|---|---|---|"]
    for x in rows:
        sc = "n/a" if x["score"] is None else f"{100 * x['score']:.1f}"
        drift = ", ".join(f"{k[5:]} {v:.2f}" for k, v in x["core_drift"].items()) or "n/a"
        lines.append(f"| {x['experiment']} | {x['row']} | `{x['flags']}` | {x['task']} | {x['seed'][4:]} | {sc} | "
                     f"{x['train_loss_last60']:.3f} | {drift} |")
    open(out_md, "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
