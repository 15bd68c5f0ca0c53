#!/usr/bin/env python3
"""Quality benchmark: GLUE dev metrics for the rows of the quality table.

NOT run by the test suite. Every row runs `metatt-train` (or, for the PEFT
row, a PyTorch + PEFT loop with the same data, steps, batch size, lr, seed,
max length, pooling and warm-up) and reads its result.json. Writes
bench/out/quality.json and bench/out/quality.md.

Rows:
  metatt4d_r8      MetaTT-4D, r = 8
  metatt5d_r8      MetaTT-5D, r = 8
  dmrg_10_to_4     MetaTT-4D from r = 10, swept to 6 then 4 (DMRG schedule)
  multitask_4p1d   MetaTT-(4+1)D, all tasks in one adapter, mixed batches
  new_task_frozen  (4+1)D trained on the other tasks, then each task added
                   with every shared core frozen (task slice + head train)
  lora_r8          our LoRA r = 8 (same library, same trainer)
  peft_lora_r8     Hugging Face PEFT LoRA r = 8 in PyTorch

CPU-only machines: the defaults are STEP-LIMITED (--steps, --train_limit,
--max_eval) so that the whole table runs in tens of minutes on 2 cores; the
numbers are then far from converged GLUE scores and only compare rows with
each other. On a GPU pass --steps 0 --epochs 3 --train_limit 0 --max_eval 0
for full runs.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

import bench_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ["MRPC", "CoLA", "SST-2", "STS-B", "RTE"]
PRIMARY = {"MRPC": "f1_acc", "CoLA": "mcc", "SST-2": "accuracy", "STS-B": "pearson_spearman",
           "RTE": "accuracy"}
TRAIN_ROWS = {"MRPC": 3668, "CoLA": 8551, "SST-2": 67349, "STS-B": 5749, "RTE": 2490}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build_dir", default=os.environ.get("METATT_BUILD_DIR", os.path.join(REPO, "build")))
    bench_args.model_dir_flag(p)
    p.add_argument("--glue_dir", default=os.path.join(bench_args.shared_dir(), "data", "glue"))
    p.add_argument("--tasks", default=",".join(TASKS),
                   help="comma-separated GLUE task names, any case (cola = CoLA)")
    p.add_argument("--resume", action="store_true",
                   help="reuse a run whose out dir already holds result.json (an interrupted "
                        "table goes on where it stopped)")
    p.add_argument("--rows", default="metatt4d_r8,lora_r8,peft_lora_r8,metatt5d_r8,dmrg_10_to_4,"
                                     "multitask_4p1d,new_task_frozen",
                   help="comma-separated; ROW@LR overrides the learning rate of that row")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=300, help="0: use --epochs")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--lr", type=float, default=None,
                   help="MetaTT rows (default: the trainer's default for the form)")
    p.add_argument("--lora_lr", type=float, default=1e-3, help="our LoRA and PEFT rows (best of 5e-4/1e-3)")
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--train_limit", type=int, default=2000)
    p.add_argument("--max_eval", type=int, default=400)
    p.add_argument("--pooling", default="mean")
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # internal (PEFT child)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; every row runs each")
    p.add_argument("--row_def", action="append", default=[],
                   help="NAME=FLAGS: an extra row running metatt-train with FLAGS (space-separated); "
                        "the names multitask_flags and new_task_flags add flags to those rows' runs")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "out"))
    p.add_argument("--jobs", type=int, default=1,
                   help="(row, task) runs at a time; > 1 shares the device, so the table's "
                        "examples/s then come from the separate --throughput_steps runs")
    p.add_argument("--deadline_s", type=float, default=0,
                   help="start no new run after this many seconds (0: none); finished runs are kept")
    p.add_argument("--throughput_steps", type=int, default=0,
                   help="before the table: ours (MetaTT-4D, LoRA) vs PEFT on MRPC for N steps, one at a time")
    p.add_argument("--merge", default="",
                   help="comma-separated quality.json files of earlier invocations (same protocol): "
                        "run nothing, combine their cells (a later file wins a cell both have) and "
                        "write the table for --rows/--tasks/--seeds (row OLD=NEW in --rows renames)")
    p.add_argument("--rescore_sources", action="store_true",
                   help="with --merge: write the end-of-training scores back into the source files")
    p.add_argument("--peft_task", default="", help=argparse.SUPPRESS)  # internal: one PEFT run
    p.add_argument("--peft_out", default="", help=argparse.SUPPRESS)
    return p.parse_args()


def canonical_tasks(spec):
    """'cola,RTE' -> ['CoLA', 'RTE']; an unknown name is an error naming it."""
    by_lower = {t.lower(): t for t in TASKS}
    out = []
    for t in (x.strip() for x in spec.split(",")):
        if not t:
            continue
        if t.lower() not in by_lower:
            raise SystemExit(f"--tasks: unknown task '{t}' (use {', '.join(TASKS)})")
        out.append(by_lower[t.lower()])
    return out


def train_rows(args, task):
    n = TRAIN_ROWS[task]
    return min(n, args.train_limit) if args.train_limit > 0 else n


def common_flags(args):
    return [f"--model_dir={args.model_dir}", f"--device={args.device}", f"--glue_dir={args.glue_dir}",
            f"--steps={args.steps}", f"--epochs={args.epochs}", f"--batch_size={args.batch_size}",
            f"--max_length={args.max_length}", f"--train_limit={args.train_limit}",
            f"--max_eval={args.max_eval}", f"--pooling={args.pooling}", f"--seed={args.seed}",
            "--warmup_ratio=0.06", "--log_every=50"]


def run_train(args, flags, out_dir):
    tool = os.path.join(args.build_dir, "server", "training", "metatt-train")
    cmd = [tool] + common_flags(args) + flags + [f"--out={out_dir}"]
    done = os.path.join(out_dir, "result.json")
    if getattr(args, "resume", False) and os.path.exists(done):
        print("= reusing", done, flush=True)
        with open(done) as f:
            return json.load(f)
    print("+", " ".join(cmd), flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"metatt-train failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    with open(os.path.join(out_dir, "result.json")) as f:
        res = json.load(f)
    res["wall_seconds"] = time.time() - t0
    return res


def metrics_of(res, which="final_eval"):
    """Per-task metrics of a run: "final_eval" (the end of training, the
    table's score: PEFT runs have nothing else) or "best_eval" (the best of
    metatt-train's evaluations every eval_every steps, a choice made on the
    dev set itself, kept as best_score for reference)."""
    ev = res.get(which) or res.get("final_eval") or {}
    return ev.get("metrics", {})


def peft_row(args, task, out_dir):
    """PEFT LoRA r=8 on Q,V in PyTorch with the same data and schedule."""
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from scipy import stats
    from sklearn import metrics as skm
    from transformers import AutoModel, AutoTokenizer, get_linear_schedule_with_warmup

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    def read(path, spec):
        rows = []
        with open(path, encoding="utf-8-sig") as f:
            lines = f.read().split("\n")
        if spec["header"]:
            lines = lines[1:]
        for line in lines:
            if not line.strip():
                continue
            c = line.split("\t")
            lab = c[spec["label"]]
            lab = float(spec["vocab"].index(lab)) if "vocab" in spec else float(lab)
            rows.append((c[spec["text"]], c[spec["pair"]] if spec["pair"] is not None else None, lab))
        return rows

    specs = {"MRPC": dict(header=True, text=3, pair=4, label=0), "CoLA": dict(header=False, text=3, pair=None, label=1),
             "SST-2": dict(header=True, text=0, pair=None, label=1),
             "STS-B": dict(header=True, text=7, pair=8, label=9),
             "RTE": dict(header=True, text=1, pair=2, label=3, vocab=["not_entailment", "entailment"])}
    train = read(os.path.join(args.glue_dir, task, "train.tsv"), specs[task])
    dev = read(os.path.join(args.glue_dir, task, "dev.tsv"), specs[task])
    if args.train_limit > 0 and len(train) > args.train_limit:
        idx = rng.permutation(len(train))[: args.train_limit]
        train = [train[i] for i in idx]
    if args.max_eval > 0:
        dev = dev[: args.max_eval]
    reg = task == "STS-B"
    dev_name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(dev_name)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    base = AutoModel.from_pretrained(args.model_dir).float().to(device)  # fp32, as ours
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                            lora_dropout=0.0, bias="none"))
    hidden = base.config.hidden_size
    head = torch.nn.Linear(hidden, 1 if reg else 2).to(device)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    steps = args.steps if args.steps > 0 else math.ceil(args.epochs * math.ceil(len(train) / args.batch_size))
    opt = torch.optim.AdamW(params, lr=args.lora_lr, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, round(0.06 * steps), steps)

    def encode(batch):
        a = [r[0] for r in batch]
        b = [r[1] for r in batch] if batch[0][1] is not None else None
        return tok(a, b, padding=True, truncation=True, max_length=args.max_length,
                   return_tensors="pt").to(device)

    def pooled(enc):
        h = model(**enc).last_hidden_state
        if args.pooling == "cls":
            return h[:, 0]
        m = enc["attention_mask"].unsqueeze(-1).float()
        return (h * m).sum(1) / m.sum(1).clamp_min(1e-9)

    t0 = time.time()
    order, cur = rng.permutation(len(train)), 0
    losses = []
    for _ in range(steps):
        if cur >= len(order):
            order, cur = rng.permutation(len(train)), 0
        batch = [train[i] for i in order[cur: cur + args.batch_size]]
        cur += args.batch_size
        out = head(pooled(encode(batch)))
        y = torch.tensor([r[2] for r in batch], device=device)
        loss = (torch.nn.functional.mse_loss(out.squeeze(-1), y) if reg
                else torch.nn.functional.cross_entropy(out, y.long()))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    train_seconds = time.time() - t0
    preds = []
    with torch.no_grad():
        for s in range(0, len(dev), 64):
            out = head(pooled(encode(dev[s: s + 64])))
            preds += (out.squeeze(-1) if reg else out.argmax(-1)).tolist()
    y = [r[2] for r in dev]
    if reg:
        p_, s_ = stats.pearsonr(preds, y)[0], stats.spearmanr(preds, y)[0]
        m = {"pearson": p_, "spearman": s_, "pearson_spearman": (p_ + s_) / 2}
    else:
        yi = [int(v) for v in y]
        acc, f1 = skm.accuracy_score(yi, preds), skm.f1_score(yi, preds)
        m = {"accuracy": acc, "f1": f1, "f1_acc": (acc + f1) / 2, "mcc": skm.matthews_corrcoef(yi, preds)}
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    res = {"steps": steps, "losses": losses, "final_eval": {"metrics": {task: m}},
           "adapter_parameters": n_params, "wall_seconds": time.time() - t0,
           "train_examples_per_second": steps * args.batch_size / train_seconds, "device": dev_name}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(res, f, indent=2)
    return res


def run_peft(args, task, out_dir):
    """The PEFT row in its own process (runs may go side by side)."""
    cmd = [sys.executable, os.path.abspath(__file__), f"--peft_task={task}", f"--peft_out={out_dir}",
           f"--model_dir={args.model_dir}", f"--glue_dir={args.glue_dir}", f"--device={args.device}",
           f"--steps={args.steps}", f"--epochs={args.epochs}", f"--batch_size={args.batch_size}",
           f"--lora_lr={args.lora_lr}", f"--max_length={args.max_length}",
           f"--train_limit={args.train_limit}", f"--max_eval={args.max_eval}",
           f"--pooling={args.pooling}", f"--seed={args.seed}"]
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"PEFT run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    with open(os.path.join(out_dir, "result.json")) as f:
        return json.load(f)


# Rows run by metatt-train with these flags (besides the common ones and the
# task). No --lr: the trainer's default for the form applies unless the row
# is named ROW@LR or --lr is given.
SIMPLE_ROWS = {
    "metatt4d_r8": ["--form=4d", "--rank=8"],
    "metatt4d_r4": ["--form=4d", "--rank=4"],
    "metatt4d_r16": ["--form=4d", "--rank=16"],
    "metatt5d_r8": ["--form=5d", "--rank=8"],
    "fixed_r4": ["--form=4d", "--rank=4"],
    "lora_r8": ["--adapter=lora", "--rank=8"],
}


def lr_flags(args, row):
    lr = args.lora_lr if row in ("lora_r8", "peft_lora_r8") else args.lr
    return [f"--lr={lr}"] if lr else []


def row_units(args, row, tasks, runs, seed):
    """(name, [tasks recorded], thunk) for one row and seed: the runs it needs.
    'row@LR' runs the row with learning rate LR (e.g. metatt4d_r8@5e-4)."""
    units = []
    full_row = row
    row, _, lr_s = row.partition("@")
    args = argparse.Namespace(**vars(args))
    args.seed = seed
    if lr_s:
        args.lr = args.lora_lr = float(lr_s)
    runs = os.path.join(runs, full_row.replace("@", "_at_"), f"seed{seed}")
    defs = dict(SIMPLE_ROWS)
    for d in args.row_def:
        name, _, flags = d.partition("=")
        defs[name] = flags.split()
    lrf = lr_flags(args, row)
    mt_flags = ["--form=4+1d", "--rank=8"] + defs.get("multitask_flags", [])

    def per_task_budget(n):
        # A multi-task run draws its batches from the union of n tasks: n times
        # the steps (or the same epochs) gives every task the single-task budget.
        return [f"--steps={args.steps * n}"] if args.steps > 0 else []
    if row == "multitask_4p1d":
        units.append((full_row, tasks, lambda: run_train(
            args, [f"--task={','.join(tasks)}"] + mt_flags + lrf + per_task_budget(len(tasks)),
            os.path.join(runs, "all"))))
        return units
    for t in tasks:
        out_dir = os.path.join(runs, t)
        if row in defs:
            f = [f"--task={t}"] + defs[row] + lrf
        elif row == "dmrg_10_to_4":
            spe = math.ceil(train_rows(args, t) / args.batch_size)
            total = args.steps if args.steps > 0 else args.epochs * spe
            e1, e2 = total / 3 / spe, 2 * total / 3 / spe  # thirds of the run, in epochs
            f = [f"--task={t}", "--form=4d", "--rank=10", f"--rank_schedule={e1:.4f}:6,{e2:.4f}:4"] + lrf
        elif row == "new_task_frozen":
            def thunk(t=t, out_dir=out_dir):
                others = [o for o in tasks if o != t]
                base_dir = os.path.join(runs, f"base_without_{t}")
                run_train(args, [f"--task={','.join(others)}"] + mt_flags + lrf +
                          per_task_budget(len(others)), base_dir)
                return run_train(args, [f"--task={t}", f"--base_family={base_dir}"] +
                                 defs.get("new_task_flags", []) + lrf, out_dir)
            units.append((full_row, [t], thunk))
            continue
        elif row == "peft_lora_r8":
            units.append((full_row, [t], lambda t=t, out_dir=out_dir: run_peft(args, t, out_dir)))
            continue
        else:
            raise SystemExit(f"unknown row {row}")
        units.append((full_row, [t], lambda f=f, out_dir=out_dir: run_train(args, f, out_dir)))
    return units


def throughput(args, runs):
    """Training examples/s, one run at a time on an otherwise idle device."""
    out = {}
    a = argparse.Namespace(**vars(args))
    a.steps, a.max_eval = args.throughput_steps, 64
    for name, thunk in [
        ("metatt4d_r8", lambda d: run_train(a, ["--task=MRPC", "--form=4d", "--rank=8"], d)),
        ("lora_r8", lambda d: run_train(a, ["--task=MRPC", "--adapter=lora", "--rank=8"], d)),
        ("peft_lora_r8", lambda d: run_peft(a, "MRPC", d)),
    ]:
        res = thunk(os.path.join(runs, "throughput", name))
        out[name] = res.get("train_examples_per_second")
    return out


def mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def summarize(table, rows, tasks, seeds, mean_key="task_mean"):
    """row -> {task: {mean, std, n}, mean_key: {...}}: per-task mean/std over
    the seeds, and the mean over tasks computed per seed (complete seeds only),
    then its mean/std. decoder_quality.py's table (sets as tasks) uses it too."""
    out = {}
    for row in rows:
        per = table.get(row, {})
        r = {}
        for t in tasks:
            xs = [per.get(t, {}).get(str(sd), {}).get("score") for sd in seeds]
            m, d = mean_std(xs)
            r[t] = {"mean": m, "std": d, "n": sum(x is not None for x in xs)}
        per_seed = []
        for sd in seeds:
            xs = [per.get(t, {}).get(str(sd), {}).get("score") for t in tasks]
            if all(x is not None for x in xs):
                per_seed.append(sum(xs) / len(xs))
        m, d = mean_std(per_seed)
        r[mean_key] = {"mean": m, "std": d, "n": len(per_seed)}
        out[row] = r
    return out


def write_table(args, table, rows, tasks, seeds, tput, errors, skipped):
    """quality.md: one line per row, mean +- std over seeds per task."""
    summary = summarize(table, rows, tasks, seeds)

    def cell(v):
        if v["mean"] is None:
            return "n/a"
        return f"{100 * v['mean']:.1f} ± {100 * v['std']:.1f}" + (f" ({v['n']})" if v["n"] < len(seeds) else "")

    lines = [f"Quality (GLUE dev, steps={args.steps or 'epochs=' + str(args.epochs)}, "
             f"train_limit={args.train_limit}, max_eval={args.max_eval}, max_length={args.max_length}, "
             f"batch={args.batch_size}, pooling={args.pooling}, seeds={args.seeds}, device={args.device}, "
             f"runs side by side={args.jobs}); cells: dev score at the end of training, mean ± std over "
             "seeds (n if fewer ran)", "",
             "| row | " + " | ".join(f"{t} ({PRIMARY[t]})" for t in tasks) +
             " | mean | adapter params | train ex/s |",
             "|---|" + "---|" * (len(tasks) + 3)]
    for row in rows:
        per = table.get(row, {})
        flat = [v for t in per.values() for v in t.values()]
        # Every cell of a row must have trained the same adapter: a merge of
        # runs whose defaults differed shows up here instead of hiding.
        counts = sorted({v.get("trainable_adapter_parameters") or v.get("adapter_parameters")
                         for v in flat if v.get("adapter_parameters")})
        params = counts[0] if len(counts) == 1 else ("MIXED " + "/".join(map(str, counts)) if counts else "")
        eps = sorted(v["train_examples_per_second"] for v in flat if v.get("train_examples_per_second"))
        eps_s = f"{eps[len(eps) // 2]:.0f}" if eps else ""
        cells = [cell(summary[row][t]) for t in tasks] + [cell(summary[row]["task_mean"])]
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {params} | {eps_s} |")
    if tput:
        lines += ["", "Training examples/s, one run at a time (MRPC, "
                  f"{args.throughput_steps} steps): " +
                  ", ".join(f"{k} {v:.0f}" for k, v in tput.items() if v)]
    if errors or skipped:
        lines += ["", f"errors: {errors}", f"skipped (deadline): {skipped}"]
    with open(os.path.join(args.out, "quality.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def rescore_final(settings, row, task, seed, cell):
    """A cell written before score_kind existed holds the best of the run's
    dev evaluations: rescore it from the run's result.json (under the
    invocation's --out) at the end of training. False if that is gone."""
    if cell.get("score_kind") == "final":
        return True
    runs = os.path.join(settings.get("out", ""), "runs", row, f"seed{seed}")
    for sub in (task, "all"):  # single-task runs, then the multi-task run
        path = os.path.join(runs, sub, "result.json")
        if os.path.exists(path):
            with open(path) as f:
                res = json.load(f)
            m = metrics_of(res).get(task, {})
            if PRIMARY[task] not in m:
                continue
            best = metrics_of(res, "best_eval").get(task, {})
            cell.update({"score": m[PRIMARY[task]], "metrics": m, "score_kind": "final",
                         "best_score": best.get(PRIMARY[task]), "rescored_from": path})
            return True
    return False


def merge(args):
    """--merge: the table of cells measured by earlier invocations."""
    tasks = [t for t in args.tasks.split(",") if t]
    seeds = [int(x) for x in args.seeds.split(",") if x != ""]
    rows, rename = [], {}
    for r in (r for r in args.rows.split(",") if r):
        old, _, new = r.partition("=")
        rows.append(new or old)
        rename[old] = new or old
        rename.setdefault(new or old, new or old)
    table, sources, dropped = {}, [], []
    for path in args.merge.split(","):
        with open(path) as f:
            doc = json.load(f)
        sources.append({"file": path, "settings": doc.get("settings")})
        for row, per in doc.get("rows", {}).items():
            if row not in rename:
                continue
            for t, cells in per.items():
                for seed, cell in list(cells.items()):
                    if not rescore_final(doc.get("settings") or {}, row, t, seed, cell):
                        dropped.append(f"{path}: {row}/{t}/seed{seed}")
                        del cells[seed]
                table.setdefault(rename[row], {}).setdefault(t, {}).update(cells)
        if args.rescore_sources:
            with open(path, "w") as f:
                json.dump(doc, f, indent=2)
    if dropped:
        print("cells left out (no end-of-training score):", dropped)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quality.json"), "w") as f:
        json.dump({"settings": vars(args), "merged_from": sources,
                   "summary": summarize(table, rows, tasks, seeds), "rows": table}, f, indent=2)
    write_table(args, table, rows, tasks, seeds, {}, [], [])


def main():
    args = parse_args()
    if args.peft_task:
        peft_row(args, args.peft_task, args.peft_out)
        return
    if args.merge:
        merge(args)
        return
    import concurrent.futures
    import threading

    t_start = time.time()
    tasks = canonical_tasks(args.tasks)
    rows = [r for r in args.rows.split(",") if r]
    seeds = [int(x) for x in args.seeds.split(",") if x != ""]
    os.makedirs(args.out, exist_ok=True)
    runs = os.path.join(args.out, "runs")
    table = {}  # row -> task -> seed -> {score, metrics, params, seconds}
    errors, skipped = [], []
    lock = threading.Lock()
    tput = throughput(args, runs) if args.throughput_steps > 0 else {}

    def save():
        with open(os.path.join(args.out, "quality.json"), "w") as f:
            json.dump({"settings": vars(args), "training_examples_per_second": tput,
                       "summary": summarize(table, rows, tasks, seeds), "rows": table,
                       "errors": errors, "skipped": skipped}, f, indent=2)

    def record(row, task, seed, res):
        m = metrics_of(res).get(task, {})
        best = metrics_of(res, "best_eval").get(task, {})
        table.setdefault(row, {}).setdefault(task, {})[str(seed)] = {
            "primary_metric": PRIMARY[task], "score": m.get(PRIMARY[task]), "metrics": m,
            "score_kind": "final", "best_score": best.get(PRIMARY[task]),
            "adapter_parameters": res.get("adapter_parameters"),
            "trainable_adapter_parameters": res.get("trainable_adapter_parameters"),
            "seconds": res.get("wall_seconds"),
            "train_examples_per_second": res.get("train_examples_per_second"),
            "ranks": res.get("ranks"), "sweeps": res.get("sweeps")}

    def go(unit):
        row, recorded, seed, thunk = unit
        if args.deadline_s > 0 and time.time() - t_start > args.deadline_s:
            with lock:
                skipped.extend(f"{row}/{t}/seed{seed}" for t in recorded)
                save()
            return
        try:
            res = thunk()
        except Exception as e:  # keep the other rows; the error is in quality.json
            with lock:
                errors.append(f"{row}/{','.join(recorded)}/seed{seed}: {e}")
                save()
            return
        with lock:
            for t in recorded:
                record(row, t, seed, res)
            save()
            done = table[row][recorded[0]][str(seed)]["score"]
            print(f"[{time.time() - t_start:6.0f}s] {row} {','.join(recorded)} seed {seed}: "
                  f"{'n/a' if done is None else f'{100 * done:.1f}'}", flush=True)

    # Seed-major order: a deadline leaves whole seeds of every row, not whole rows.
    units = [(name, rec, seed, thunk) for seed in seeds for row in rows
             for (name, rec, thunk) in row_units(args, row, tasks, runs, seed)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(go, units))
    save()
    write_table(args, table, rows, tasks, seeds, tput, errors, skipped)


if __name__ == "__main__":
    main()
