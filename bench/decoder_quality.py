"""Decoder quality on the commonsense sets (issue 18): the whole table in one
command, every row over the sets ARC-Easy, BoolQ and OpenBookQA
(../shared/data/commonsense/, or $METATT_SHARED_DIR), every row run once per
seed, the table as mean +- std over seeds.

The table needs the GPU protocol (the issue's: 500 training rows and the
first 500 test rows per set, 125 steps of 8 = 2 epochs, three seeds):

  .venv/bin/python bench/decoder_quality.py --protocol gpu --out bench/results/gpu-decoder

A CPU session can run the stated, SHORTENED protocol instead (200 training
rows, the first 100 test rows, 32 steps of 8 = 1.3 epochs; three seeds):

  .venv/bin/python bench/decoder_quality.py --protocol cpu          # --seeds 0 for one seed

Cost of the cpu preset, measured 2026-12-07 on the 2-core CPU shared with
other work (load average 7-8, one thread a run): a MetaTT-4D ARC-Easy run
trains at 13.6 s a step (0.59 examples/s; PEFT 14.5 s) and scores its 100
test rows in about 95 s, about 9 minutes in all. A seed of the whole table is
672 training steps (3 x 32 for each single-set row, 96 for multi-task, 192 +
96 for the add-task row) and 18 set evaluations: about 3 hours, so three
seeds take about 9 hours there. The GPU preset has not been timed.

Explicit flags override a preset (--steps, --train_limit, --max_eval,
--batch_size, --seeds, --device, ...); the protocol actually run is written
into the JSON and above the md table. --resume reuses every run whose
result.json exists (a killed table goes on where it stopped); the JSON and md
are rewritten after every finished run. --merge A.json,B.json combines the
cells of earlier invocations (a later file wins a cell both have) and runs
nothing. --jobs N runs N runs side by side (on a GPU, e.g. --jobs 4; on a
shared CPU keep 1). Every process runs under `nice -n 10` with
OMP_NUM_THREADS=--threads.

Rows (all through `metatt-train` except PEFT; the same prompts: the model's
chat template over the instruction; scoring: the first answer1..5 /
true|false of the greedy generation, up to --max_new_tokens, against
`answer`, server/training/eval_scores.h ExtractAnswer):

  zero_shot        the base model (--eval_only: a fresh MetaTT adapter with
                   the ze-* init adds exactly zero). Greedy and seed-free:
                   run once per set and shown under every seed (std 0).
  metatt4d         MetaTT-4D, the recipe's default rank and projections
                   (16; q,k,v,o), lr = the recipe's (2.5e-3) or --lr
  multitask_4p1d   one (4+1)D family over all the chosen sets in ONE run
                   (--task=A,B,C --form=4+1d), n_sets x --steps so every set
                   gets the single-set budget; each set's score from that
                   run's result.json
  new_task_frozen  for each set: a (4+1)D family trained on the other sets
                   ((n_sets - 1) x --steps; its own evaluation cut to one
                   row, it is not a cell), then the set added with
                   --base_family=<that family> (shared cores frozen, only
                   the new task slice trains, at the recipe's add-task lr)
  lora_r8          our LoRA r=8, alpha 16, on q,v, lr --lora_lr (1e-3)
  peft_lora_r8     Hugging Face PEFT LoRA r=8, alpha 16, on q_proj,v_proj
                   over transformers' LlamaForCausalLM (fp32), lr --lora_lr:
                   bench/decoder_quality_peft.py. The same training rows as
                   metatt-train picks (that script REPRODUCES metatt-train's
                   seeded --train_limit subset and its batch order from the
                   same seed, nothing is written in between), the same
                   chat-template tokens and truncation, completion-only loss,
                   the same steps, batch, AdamW and warm-up/linear-decay
                   schedule, clipping, max length and scoring.
                   tests/python/test_decoder_quality.py checks rows, batches
                   and token ids against the built binaries.

Output (--out, default bench/results/cpu-decoder, with --protocol gpu
bench/results/gpu-decoder): decoder_quality.json and
decoder_quality.md; each run's log.txt and result.json under
runs/<row>/seed<k>/<set>/ (multitask: .../all/; the add-task bases:
.../base_without_<set>/).
"""
import argparse
import concurrent.futures
import json
import os
import pathlib
import platform
import subprocess
import sys
import threading
import time

import bench_args
from quality_bench import summarize

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "cpu-decoder"
SETS = ["ARC-Easy", "BoolQ", "OpenBookQA"]
ALL_ROWS = ["zero_shot", "metatt4d", "multitask_4p1d", "new_task_frozen", "lora_r8", "peft_lora_r8"]
WARMUP_RATIO = 0.06  # metatt-train's recipe default, passed to both sides explicitly

PRESETS = {
    # The protocol: 500/500 per set, 2 epochs of the 500 rows at batch 8.
    "gpu": {"train_limit": 500, "max_eval": 500, "steps": 125, "batch_size": 8, "max_length": 256,
            "max_new_tokens": 16, "seeds": "0,1,2", "device": "auto"},
    # Shortened to fit a 2-core CPU: 200 rows, first 100 test rows, 32 steps of 8.
    "cpu": {"train_limit": 200, "max_eval": 100, "steps": 32, "batch_size": 8, "max_length": 256,
            "max_new_tokens": 16, "seeds": "0,1,2", "device": "cpu"},
}
PRESET_NOTES = {
    "gpu": "the issue's protocol: 500 seeded training rows and the first 500 test rows per set, "
           "125 steps of 8 (2 epochs), three seeds",
    "cpu": "SHORTENED for a 2-core CPU: 200 seeded training rows and the first 100 test rows per "
           "set, 32 steps of 8 (1.3 epochs); the issue's protocol is --protocol gpu",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", choices=sorted(PRESETS), default="cpu",
                   help="preset of the flags below left unset")
    p.add_argument("--model_dir", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    p.add_argument("--build_dir", default=os.environ.get("METATT_BUILD_DIR", str(ROOT / "build")))
    p.add_argument("--data_dir", default=os.path.join(bench_args.shared_dir(), "data", "commonsense"))
    p.add_argument("--sets", default=",".join(SETS))
    p.add_argument("--rows", default=",".join(ALL_ROWS))
    p.add_argument("--train_limit", type=int, help="seeded random training rows per set (0: all)")
    p.add_argument("--max_eval", type=int, help="first N test rows per set (0: all)")
    p.add_argument("--steps", type=int, help="optimizer steps of a single-set run")
    p.add_argument("--batch_size", type=int)
    p.add_argument("--max_length", type=int)
    p.add_argument("--max_new_tokens", type=int)
    p.add_argument("--seeds", help="comma-separated; every row runs each")
    p.add_argument("--seed", type=int, help="one seed (the old flag; = --seeds N)")
    p.add_argument("--device", help="auto|cpu|cuda (metatt-train and PEFT)")
    p.add_argument("--lr", type=float, default=None,
                   help="MetaTT rows' lr (default: metatt-train's recipe default)")
    p.add_argument("--lora_lr", type=float, default=1e-3, help="our LoRA and PEFT rows")
    p.add_argument("--threads", type=int, default=1, help="OMP/torch threads per run")
    p.add_argument("--nice", type=int, default=10)
    p.add_argument("--jobs", type=int, default=1, help="runs side by side")
    p.add_argument("--parallel", action="store_true", help="(old flag) = --jobs 3")
    p.add_argument("--resume", action="store_true", help="reuse a run whose result.json exists")
    p.add_argument("--deadline_s", type=float, default=0,
                   help="start no new run after this many seconds (0: none)")
    p.add_argument("--merge", default="",
                   help="comma-separated decoder_quality.json files: run nothing, combine their cells")
    p.add_argument("--out", default=None,
                   help="default bench/results/cpu-decoder (gpu protocol: bench/results/gpu-decoder)")
    args = p.parse_args(argv)
    preset = PRESETS[args.protocol]
    overridden = []
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
        elif getattr(args, k) != v:
            overridden.append(k)
    if args.seed is not None:
        args.seeds = str(args.seed)
        overridden.append("seeds")
    if args.parallel:
        args.jobs = max(args.jobs, 3)
    args.overridden = sorted(set(overridden))
    if args.out is None:
        args.out = str(OUT if args.protocol == "cpu" else OUT.parent / "gpu-decoder")
    return args


def canonical_sets(spec):
    by_lower = {s.lower(): s for s in SETS}
    out = []
    for s in (x.strip() for x in spec.split(",")):
        if s and s.lower() not in by_lower:
            raise SystemExit(f"--sets: unknown set '{s}' (use {', '.join(SETS)})")
        if s:
            out.append(by_lower[s.lower()])
    return out


def protocol_of(args, sets, rows, seeds):
    return {"protocol": args.protocol, "note": PRESET_NOTES[args.protocol],
            "overridden_flags": args.overridden, "sets": sets, "rows": rows, "seeds": seeds,
            "train_limit": args.train_limit, "max_eval": args.max_eval, "steps": args.steps,
            "batch_size": args.batch_size, "max_length": args.max_length,
            "max_new_tokens": args.max_new_tokens, "warmup_ratio": WARMUP_RATIO,
            "metatt_lr": args.lr or "recipe default", "lora_lr": args.lora_lr,
            "device": args.device, "threads": args.threads, "jobs": args.jobs,
            "model": pathlib.Path(args.model_dir).name, "machine": platform.node(),
            "cpu_count": os.cpu_count()}


def env_of(args):
    return dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))


def launch(args, cmd, run_dir):
    """Runs cmd (nice'd) with its output in run_dir/log.txt; returns result.json.
    With --resume an existing result.json is reused."""
    run_dir = pathlib.Path(run_dir)
    done = run_dir / "result.json"
    if args.resume and done.exists():
        print(f"= reusing {done}", flush=True)
        return json.loads(done.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    if done.exists():
        done.unlink()
    cmd = ["nice", "-n", str(args.nice)] + [str(c) for c in cmd]
    print("+ " + " ".join(cmd), flush=True)
    t0 = time.time()
    with open(run_dir / "log.txt", "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env_of(args)).returncode
    if rc != 0 or not done.exists():
        tail = (run_dir / "log.txt").read_text()[-1500:]
        raise RuntimeError(f"exit {rc}, see {run_dir / 'log.txt'}:\n{tail}")
    res = json.loads(done.read_text())
    res["wall_seconds"] = round(time.time() - t0, 1)
    done.write_text(json.dumps(res, indent=2))
    return res


def train_cmd(args, seed, flags, run_dir):
    return [pathlib.Path(args.build_dir) / "server" / "training" / "metatt-train",
            f"--model_dir={args.model_dir}", f"--device={args.device}",
            f"--commonsense_dir={args.data_dir}", f"--train_limit={args.train_limit}",
            f"--max_eval={args.max_eval}", f"--steps={args.steps}",
            f"--batch_size={args.batch_size}", f"--max_length={args.max_length}",
            f"--max_new_tokens={args.max_new_tokens}", "--eval_every=0",
            f"--warmup_ratio={WARMUP_RATIO}", f"--seed={seed}", "--log_every=10",
            f"--out={run_dir}"] + flags


def peft_cmd(args, seed, task, run_dir):
    return [sys.executable, ROOT / "bench" / "decoder_quality_peft.py", f"--set={task}",
            f"--model_dir={args.model_dir}", f"--data_dir={args.data_dir}",
            f"--train_limit={args.train_limit}", f"--max_eval={args.max_eval}",
            f"--steps={args.steps}", f"--batch_size={args.batch_size}", f"--lr={args.lora_lr}",
            f"--warmup_ratio={WARMUP_RATIO}", f"--max_length={args.max_length}",
            f"--max_new_tokens={args.max_new_tokens}", f"--seed={seed}",
            f"--threads={args.threads}", f"--device={args.device}", f"--out={run_dir}"]


def row_units(args, row, sets, runs, seed, first_seed=True):
    """[(row, [sets recorded], thunk)] for one row and seed (zero_shot: only
    for the first seed, its cells are recorded under every seed)."""
    base = pathlib.Path(runs) / row / f"seed{seed}"
    lr = [f"--lr={args.lr}"] if args.lr else []
    n = len(sets)

    def steps(k):  # k sets in one run: k x the single-set budget
        return [f"--steps={args.steps * k}"]

    units = []
    if row == "multitask_4p1d":
        if n < 2:
            raise SystemExit("multitask_4p1d needs at least two sets")
        d = base / "all"
        units.append((row, sets, lambda: launch(args, train_cmd(
            args, seed, [f"--task={','.join(sets)}", "--form=4+1d"] + lr + steps(n), d), d)))
        return units
    if row == "zero_shot" and not first_seed:
        return units
    for t in sets:
        d = base / t
        if row == "zero_shot":
            # Seed-free (no training, greedy): one run per set, shared by every seed.
            zd = pathlib.Path(runs) / row / t
            thunk = (lambda t=t, zd=zd: launch(args, train_cmd(
                args, 0, [f"--task={t}", "--eval_only"], zd), zd))
        elif row == "metatt4d":
            thunk = (lambda t=t, d=d: launch(args, train_cmd(
                args, seed, [f"--task={t}", "--adapter=metatt", "--form=4d"] + lr, d), d))
        elif row == "lora_r8":
            thunk = (lambda t=t, d=d: launch(args, train_cmd(
                args, seed, [f"--task={t}", "--adapter=lora", "--rank=8", "--alpha=16",
                             "--projections=q,v", f"--lr={args.lora_lr}"], d), d))
        elif row == "peft_lora_r8":
            thunk = (lambda t=t, d=d: launch(args, peft_cmd(args, seed, t, d), d))
        elif row == "new_task_frozen":
            if n < 2:
                raise SystemExit("new_task_frozen needs at least two sets")

            def thunk(t=t, d=d):
                others = [o for o in sets if o != t]
                bd = base / f"base_without_{t}"
                # The base family's own evaluation is not a cell: one row, one token.
                launch(args, train_cmd(args, seed, [f"--task={','.join(others)}", "--form=4+1d"] +
                                       lr + steps(len(others)), bd) +
                       ["--max_eval=1", "--max_new_tokens=1"], bd)
                return launch(args, train_cmd(args, seed, [f"--task={t}", f"--base_family={bd}"], d), d)
        else:
            raise SystemExit(f"unknown row '{row}' (use {', '.join(ALL_ROWS)})")
        units.append((row, [t], thunk))
    return units


def params_cell(cells):
    total = sorted({c.get("adapter_parameters") for c in cells if c.get("adapter_parameters") is not None})
    train = sorted({c.get("trainable_adapter_parameters") for c in cells
                    if c.get("trainable_adapter_parameters") is not None})
    if not total:
        return ""
    s = "/".join(f"{x:,}" for x in total) + (" MIXED" if len(total) > 1 else "")
    if train and train != total:
        s += " (trains " + "/".join(f"{x:,}" for x in train) + ")"
    return s


def write_outputs(args, protocol, table, rows, sets, seeds, errors, skipped, extra=None):
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(table, rows, sets, seeds, mean_key="set_mean")
    doc = {"protocol": protocol, "summary": summary, "rows": table, "errors": errors,
           "skipped": skipped, "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    doc.update(extra or {})
    tmp = out / "decoder_quality.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, out / "decoder_quality.json")

    def cell(v):
        if v["mean"] is None:
            return "n/a"
        return (f"{100 * v['mean']:.1f} ± {100 * v['std']:.1f}" +
                (f" ({v['n']})" if v["n"] < len(seeds) else ""))

    p = protocol
    lines = [f"Decoder quality, protocol `{p['protocol']}` ({p['note']}). "
             f"Run: sets {', '.join(sets)}; train_limit {p['train_limit']}, max_eval {p['max_eval']}, "
             f"steps {p['steps']} x batch {p['batch_size']} per set (multi-task and add-task bases: "
             f"sets x steps), max_length {p['max_length']}, max_new_tokens {p['max_new_tokens']}, "
             f"warm-up {p['warmup_ratio']}, MetaTT lr {p['metatt_lr']}, LoRA/PEFT lr {p['lora_lr']}, "
             f"seeds {','.join(map(str, seeds))}, device {p['device']}, {p['threads']} thread(s) per run, "
             f"{p['jobs']} run(s) side by side" +
             (f"; flags overriding the preset: {', '.join(p['overridden_flags'])}"
              if p.get("overridden_flags") else "") + ".",
             "",
             "Cells: test answer accuracy (%) at the end of training, mean ± std over seeds "
             "((n) when fewer seeds finished); mean = the mean over sets per seed, then over seeds. "
             "zero_shot is seed-free (one run per set).",
             "",
             "| row | " + " | ".join(sets) + " | mean | adapter params | train tokens/s (median) |",
             "|---|" + "---|" * (len(sets) + 3)]
    for row in rows:
        cells = [c for t in table.get(row, {}).values() for c in t.values()]
        tps = sorted(c["train_tokens_per_second"] for c in cells if c.get("train_tokens_per_second"))
        tps_s = f"{tps[len(tps) // 2]:.0f}" if tps else ""
        params = "0" if row == "zero_shot" and cells else params_cell(cells)
        lines.append(f"| {row} | " + " | ".join(cell(summary[row][t]) for t in sets) +
                     f" | {cell(summary[row]['set_mean'])} | {params} | {tps_s} |")
    if errors or skipped:
        lines += ["", f"errors: {errors}", f"skipped (deadline): {skipped}"]
    (out / "decoder_quality.md").write_text("\n".join(lines) + "\n")
    return lines


def cell_of(row, task, res, run_dir, batch):
    m = res.get("final_eval", {}).get("metrics", {}).get(task, {})
    losses = res.get("losses") or []
    steps = res.get("steps") or 0
    eps = res.get("train_examples_per_second")
    return {"score": m.get("answer_accuracy"), "metrics": m,
            "adapter_parameters": 0 if row == "zero_shot" else res.get("adapter_parameters"),
            "trainable_adapter_parameters": None if row == "zero_shot" else
            res.get("trainable_adapter_parameters"),
            "steps": steps, "train_tokens_per_second": res.get("train_tokens_per_second"),
            # Training only (the trainer's examples/s; "seconds" includes the final eval).
            "train_examples_per_second": eps,
            "seconds_per_step": round(batch / eps, 2) if eps and steps else None,
            "final_train_loss": losses[-1] if losses else None,
            "wall_seconds": res.get("wall_seconds"), "run_dir": str(run_dir)}


def merge(args):
    sets = canonical_sets(args.sets)
    rows = [r for r in args.rows.split(",") if r]
    seeds = [int(x) for x in args.seeds.split(",") if x != ""]
    table, sources = {}, []
    for path in args.merge.split(","):
        doc = json.loads(pathlib.Path(path).read_text())
        sources.append({"file": path, "protocol": doc.get("protocol")})
        for row, per in doc.get("rows", {}).items():
            for t, cells in per.items():
                table.setdefault(row, {}).setdefault(t, {}).update(cells)
    protos = {json.dumps({k: v for k, v in (s["protocol"] or {}).items()
                          if k in ("train_limit", "max_eval", "steps", "batch_size", "max_length",
                                   "max_new_tokens")}, sort_keys=True) for s in sources}
    if len(protos) > 1:
        print("WARNING: the merged files ran different protocols:", protos)
    protocol = dict(sources[-1]["protocol"] or protocol_of(args, sets, rows, seeds))
    protocol.update(sets=sets, rows=rows, seeds=seeds)
    lines = write_outputs(args, protocol, table, rows, sets, seeds, [], [],
                          {"merged_from": sources})
    print("\n".join(lines))


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        return merge(args)
    sets = canonical_sets(args.sets)
    rows = [r for r in args.rows.split(",") if r]
    seeds = [int(x) for x in args.seeds.split(",") if x != ""]
    for r in rows:
        if r not in ALL_ROWS:
            raise SystemExit(f"--rows: unknown row '{r}' (use {', '.join(ALL_ROWS)})")
    runs = pathlib.Path(args.out) / "runs"
    protocol = protocol_of(args, sets, rows, seeds)
    print("protocol: " + json.dumps(protocol), flush=True)
    table, errors, skipped = {}, [], []
    lock = threading.Lock()
    t_start = time.time()

    def go(unit):
        row, recorded, seed, thunk = unit
        if args.deadline_s > 0 and time.time() - t_start > args.deadline_s:
            with lock:
                skipped.extend(f"{row}/{t}/seed{seed}" for t in recorded)
                write_outputs(args, protocol, table, rows, sets, seeds, errors, skipped)
            return
        try:
            res = thunk()
        except Exception as e:  # keep the other runs; the error is in the JSON
            with lock:
                errors.append(f"{row}/{','.join(recorded)}/seed{seed}: {e}")
                write_outputs(args, protocol, table, rows, sets, seeds, errors, skipped)
            print(f"ERROR {row} {','.join(recorded)} seed {seed}: {e}", flush=True)
            return
        with lock:
            for t in recorded:
                if row == "zero_shot":  # seed-free: the one run stands for every seed
                    for s in seeds:
                        table.setdefault(row, {}).setdefault(t, {})[str(s)] = cell_of(
                            row, t, res, runs / row / t, args.batch_size)
                    continue
                run_dir = runs / row / f"seed{seed}" / ("all" if row == "multitask_4p1d" else t)
                table.setdefault(row, {}).setdefault(t, {})[str(seed)] = cell_of(row, t, res, run_dir, args.batch_size)
            write_outputs(args, protocol, table, rows, sets, seeds, errors, skipped)
            scores = ", ".join(f"{t} {100 * table[row][t][str(seed)]['score']:.1f}"
                               if table[row][t][str(seed)]["score"] is not None else f"{t} n/a"
                               for t in recorded)
            print(f"[{time.time() - t_start:6.0f}s] {row} seed {seed}: {scores}", flush=True)

    # Seed-major: a deadline or a kill leaves whole seeds of every row.
    units = [(name, rec, seed, thunk) for seed in seeds for row in rows
             for (name, rec, thunk) in row_units(args, row, sets, runs, seed, seed == seeds[0])]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(go, units))
    lines = write_outputs(args, protocol, table, rows, sets, seeds, errors, skipped)
    print("\n".join(lines))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
