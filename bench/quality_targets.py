#!/usr/bin/env python3
"""Judge the quality targets (issue 16) from a quality table.

Reads the JSON that `quality_bench.py` (or its `--merge`) writes and applies
the targets' rules in one place, so the README and the notes quote verdicts
instead of working them out by hand:

* efficiency: a single-task MetaTT row with >= 5x (>= 10x) fewer adapter
  parameters than the LoRA baseline is within 0.5 (1.0) points of the
  baseline's five-task mean;
* per task: no task more than 2 points behind the baseline;
* multi-task: the (4+1)D family's mean >= the single-task default's - 0.5;
* add-task: every task added to a family with frozen shared cores is within
  2 points of the same task in the full (4+1)D run.

Rules common to all: two rows are compared on the seeds both ran (every task
of the set, for a mean); a verdict needs at least --min_seeds such seeds,
otherwise the gap is shown as "not judged". A per-task gap smaller than its
seed spread (the larger of the two rows' standard deviations over those
seeds) counts as met. Points are the table's scores x 100.

    python3 bench/quality_targets.py                      # the committed CPU table
    python3 bench/quality_targets.py --table T.json --out /tmp/targets
"""
import argparse
import json
import os
import statistics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = os.path.join(REPO, "bench", "results", "cpu-quality", "quality_table.json")
# Rows with a little less than the factor's saving are listed (marked "below Nx")
# so that a default just short of it shows beside the rows that qualify.
NEAR = 0.95


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", default=TABLE)
    p.add_argument("--out", default="", help="write <out>.json and <out>.md (default: beside --table, "
                                             "quality_targets.*)")
    p.add_argument("--baseline", default="lora_r8")
    p.add_argument("--default_row", default="metatt4d_r16_qkvo", help="the single-task default recipe")
    p.add_argument("--multitask", default="multitask_4p1d")
    p.add_argument("--added", default="new_task_frozen")
    p.add_argument("--exclude", default="peft_",
                   help="comma-separated prefixes of rows that are not MetaTT candidates (besides the "
                        "baseline, multi-task and added rows)")
    p.add_argument("--min_seeds", type=int, default=3)
    return p.parse_args(argv)


def _scores(rows, row, task):
    """seed -> score x 100 for one row and task."""
    return {s: 100 * c["score"] for s, c in rows.get(row, {}).get(task, {}).items()
            if c.get("score") is not None}


def _std(xs):
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _params(rows, row):
    """The row's adapter parameter count, or None if its cells differ."""
    counts = {c.get("adapter_parameters") for per in rows.get(row, {}).values() for c in per.values()}
    counts.discard(None)
    return counts.pop() if len(counts) == 1 else None


def mean_gap(rows, tasks, row, base):
    """base - row on the five-task mean, over the seeds both ran on every task."""
    per_row = [_scores(rows, row, t) for t in tasks]
    per_base = [_scores(rows, base, t) for t in tasks]
    seeds = sorted(set.intersection(*(set(d) for d in per_row + per_base)), key=int)
    if not seeds:
        return {"seeds": [], "gap": None}
    m_row = [statistics.mean(d[s] for d in per_row) for s in seeds]
    m_base = [statistics.mean(d[s] for d in per_base) for s in seeds]
    return {"seeds": seeds, "row_mean": statistics.mean(m_row), "row_std": _std(m_row),
            "base_mean": statistics.mean(m_base), "base_std": _std(m_base),
            "gap": statistics.mean(m_base) - statistics.mean(m_row)}


def task_gap(rows, task, row, base):
    """base - row on one task over the seeds both ran, with the seed spread."""
    a, b = _scores(rows, row, task), _scores(rows, base, task)
    seeds = sorted(set(a) & set(b), key=int)
    if not seeds:
        return {"seeds": [], "gap": None}
    xa, xb = [a[s] for s in seeds], [b[s] for s in seeds]
    return {"seeds": seeds, "row_mean": statistics.mean(xa), "base_mean": statistics.mean(xb),
            "gap": statistics.mean(xb) - statistics.mean(xa), "spread": max(_std(xa), _std(xb))}


def _verdict(gap, allowed, n, min_seeds, spread=None):
    if gap is None or n < min_seeds:
        return "not judged"
    if gap <= allowed + 1e-9 or (spread is not None and gap < spread):
        return "met"
    return "missed"


def judge(doc, args):
    rows, tasks = doc["rows"], [t for t in doc["settings"]["tasks"].split(",") if t]
    base_params = _params(rows, args.baseline)
    special = {args.baseline, args.multitask, args.added}
    prefixes = tuple(p for p in args.exclude.split(",") if p)
    out = {"table": os.path.relpath(args.table, REPO), "baseline": args.baseline, "tasks": tasks,
           "min_seeds": args.min_seeds, "targets": {}}

    for name, factor, allowed in (("5x_within_0.5", 5, 0.5), ("10x_within_1.0", 10, 1.0)):
        cands = []
        for row in rows:
            p = _params(rows, row)
            if row in special or row.startswith(prefixes) or not p or not base_params:
                continue
            ratio = base_params / p
            if ratio < NEAR * factor:
                continue
            g = mean_gap(rows, tasks, row, args.baseline)
            verdict = (f"below {factor}x" if ratio < factor
                       else _verdict(g["gap"], allowed, len(g["seeds"]), args.min_seeds))
            cands.append({"row": row, "params": p, "ratio": ratio, **g, "verdict": verdict})
        cands.sort(key=lambda c: (c["verdict"] not in ("met", "missed"),
                                  c["gap"] if c["gap"] is not None else 1e9))
        judged = [c for c in cands if c["verdict"] in ("met", "missed")]
        verdict = ("met" if any(c["verdict"] == "met" for c in judged)
                   else "missed" if judged else "not judged")
        out["targets"][name] = {"factor": factor, "allowed": allowed, "verdict": verdict,
                                "best": judged[0] if judged else None, "candidates": cands}

    per = _per_task(rows, tasks, args.default_row, args.baseline, 2.0, args.min_seeds)
    out["targets"]["no_task_2_behind"] = {"row": args.default_row, "allowed": 2.0, "per_task": per,
                                          "verdict": _all(per)}

    g = mean_gap(rows, tasks, args.multitask, args.default_row)
    out["targets"]["multitask_within_0.5"] = {
        "row": args.multitask, "reference": args.default_row, "allowed": 0.5, **g,
        "verdict": _verdict(g["gap"], 0.5, len(g["seeds"]), args.min_seeds)}

    per = _per_task(rows, tasks, args.added, args.multitask, 2.0, args.min_seeds)
    gaps = [g["gap"] for g in per.values() if g["gap"] is not None]
    out["targets"]["added_within_2"] = {"row": args.added, "reference": args.multitask, "allowed": 2.0,
                                        "per_task": per, "mean_gap": statistics.mean(gaps) if gaps else None,
                                        "verdict": _all(per)}
    return out


def _per_task(rows, tasks, row, base, allowed, min_seeds):
    """task -> task_gap with its verdict (the seed-spread allowance applies)."""
    per = {t: task_gap(rows, t, row, base) for t in tasks}
    for g in per.values():
        g["verdict"] = _verdict(g["gap"], allowed, len(g["seeds"]), min_seeds, g.get("spread"))
    return per


def _all(per):
    vs = [g["verdict"] for g in per.values()]
    if "missed" in vs:
        return "missed"
    return "met" if vs and all(v == "met" for v in vs) else "not judged"


def _f(x, nd=1):
    return "n/a" if x is None else f"{x:.{nd}f}"


def to_markdown(res):
    t = res["targets"]
    L = [f"Targets judged from `{res['table']}` against `{res['baseline']}` (gaps in points, baseline minus "
         f"row, over the seeds both rows ran; a verdict needs {res['min_seeds']} such seeds; a per-task gap "
         "smaller than its seed spread counts as met). Written by `bench/quality_targets.py`.", ""]
    for name in ("5x_within_0.5", "10x_within_1.0"):
        e = t[name]
        L += [f"**>= {e['factor']}x fewer parameters, within {e['allowed']} of the baseline's mean: "
              f"{e['verdict']}**", "",
              "| row | params | fewer | seeds | row mean | baseline mean | gap | verdict |", "|---|---|---|---|---|---|---|---|"]
        for c in e["candidates"]:
            L.append(f"| {c['row']} | {c['params']} | {c['ratio']:.2f}x | {len(c['seeds'])} | "
                     f"{_f(c.get('row_mean'))} ± {_f(c.get('row_std'))} | {_f(c.get('base_mean'))} ± "
                     f"{_f(c.get('base_std'))} | {_f(c['gap'])} | {c['verdict']} |")
        L.append("")
    for name, title in (("no_task_2_behind", "no task more than 2 points behind the baseline"),
                        ("added_within_2", "an added task within 2 points of the full (4+1)D run")):
        e = t[name]
        ref = e.get("reference", res["baseline"])
        L += [f"**{title} (`{e['row']}` against `{ref}`): {e['verdict']}**"
              + (f" (mean gap {_f(e['mean_gap'])})" if e.get("mean_gap") is not None else ""), "",
              "| task | seeds | row | reference | gap | seed spread | verdict |", "|---|---|---|---|---|---|---|"]
        for task, g in e["per_task"].items():
            L.append(f"| {task} | {len(g['seeds'])} | {_f(g.get('row_mean'))} | {_f(g.get('base_mean'))} | "
                     f"{_f(g['gap'])} | {_f(g.get('spread'))} | {g['verdict']} |")
        L.append("")
    e = t["multitask_within_0.5"]
    L += [f"**multi-task mean >= single-task mean - 0.5 (`{e['row']}` against `{e['reference']}`): "
          f"{e['verdict']}**: {_f(e.get('row_mean'))} ± {_f(e.get('row_std'))} against {_f(e.get('base_mean'))} ± "
          f"{_f(e.get('base_std'))} over seeds {', '.join(e['seeds']) or 'none'} (gap {_f(e['gap'])})", ""]
    return "\n".join(L)


def main(argv=None):
    args = parse_args(argv)
    with open(args.table) as f:
        doc = json.load(f)
    res = judge(doc, args)
    out = args.out or os.path.join(os.path.dirname(args.table), "quality_targets")
    with open(out + ".json", "w") as f:
        json.dump(res, f, indent=2)
    md = to_markdown(res)
    with open(out + ".md", "w") as f:
        f.write(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
