"""The PEFT row of the decoder quality table (bench/decoder_quality.py), and
the Python twins of what `metatt-train` does with a commonsense set, so that
the PEFT run sees what our runs see:

* rows: `metatt-train --train_limit=N --seed=S` keeps a seeded random subset
  of each set's train.json (server/training/train_main.cc Subsample: a
  Fisher-Yates pass over the file's rows with std::mt19937_64(S), `rng() % i`
  for i = n..2, then the first N). `subsample()` REPRODUCES that selection
  (`MT19937_64` is the standard engine; its 10,000th draw from the default
  seed is the value the C++ standard names), so nothing is written to disk
  and both sides read the same train.json; test rows are the first
  --max_eval of test.json, as `--max_eval` takes them.
* batches: the trainer's order (server/training/trainer.cc Reshuffle: the
  same Fisher-Yates with a second std::mt19937_64(S), a new pass every epoch,
  the epoch's last batch shorter): `batch_order()`.
* tokens: the model's chat template through `tokenizer.apply_chat_template`
  (user turn = instruction [+ "\\n\\n" + input when the input is not blank],
  assistant turn = output; completion = the full rendering after the prompt),
  as bench/decoder_train_bench.py does; rows longer than --max_length keep
  the completion (at most max_length - 1 tokens) and the prompt's last tokens
  (server/training/lm_objective.cc BuildLmBatch): `encode_example()`,
  `build_row()`. tests/python/test_decoder_quality.py checks these ids and
  labels against `metatt-lm-loss` (the C++ objective) and the row selection
  and batch order against `metatt-train`'s first losses.
* optimisation: AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0), gradient
  clipping at 1.0, linear warm-up over round(0.06 x steps) steps then linear
  decay to 0 (trainer.cc LearningRate), lr 1e-3 (our LoRA recipe's).
* scoring: greedy generation of up to --max_new_tokens from each test prompt
  (left-padded batches of max(batch, 16), prompt cut to its last --max_length
  tokens, stop at eos), decoded without special tokens; the answer is
  `extract_answer()`, the twin of server/training/eval_scores.cc ExtractAnswer.

PEFT LoRA r=8, alpha 16, on q_proj and v_proj of transformers'
LlamaForCausalLM loaded from --model_dir in float32 (dropout 0).

  .venv/bin/python bench/decoder_quality_peft.py --set ARC-Easy --train_limit 200 \\
      --max_eval 100 --steps 32 --seed 0 --out /tmp/peft_arc
writes /tmp/peft_arc/result.json in metatt-train's shape (final_eval.metrics).
"""
import argparse
import json
import math
import os
import pathlib
import sys
import time

ASCII_WS = " \t\n\v\f\r"
_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
MASK64 = (1 << 64) - 1


class MT19937_64:
    """std::mt19937_64: seed(s) then operator()."""
    N, M = 312, 156
    A = 0xB5026F5AA96619E9
    UPPER, LOWER = 0xFFFFFFFF80000000, 0x7FFFFFFF

    def __init__(self, seed=5489):
        mt = [seed & MASK64]
        for i in range(1, self.N):
            prev = mt[-1]
            mt.append((6364136223846793005 * (prev ^ (prev >> 62)) + i) & MASK64)
        self.mt, self.i = mt, self.N

    def _twist(self):
        mt, n, m = self.mt, self.N, self.M
        for k in range(n):
            x = (mt[k] & self.UPPER) | (mt[(k + 1) % n] & self.LOWER)
            xa = x >> 1
            if x & 1:
                xa ^= self.A
            mt[k] = mt[(k + m) % n] ^ xa
        self.i = 0

    def __call__(self):
        if self.i >= self.N:
            self._twist()
        x = self.mt[self.i]
        self.i += 1
        x ^= (x >> 29) & 0x5555555555555555
        x ^= (x << 17) & 0x71D67FFFEDA60000
        x ^= (x << 37) & 0xFFF7EEE000000000
        x ^= x >> 43
        return x & MASK64


def _fisher_yates(items, rng):
    for i in range(len(items), 1, -1):
        j = rng() % i
        items[i - 1], items[j] = items[j], items[i - 1]


def subsample(rows, limit, seed):
    """metatt-train's --train_limit subset (train_main.cc Subsample)."""
    rows = list(rows)
    if limit <= 0 or len(rows) <= limit:
        return rows
    _fisher_yates(rows, MT19937_64(seed))
    return rows[:limit]


def batch_order(n, batch_size, steps, seed):
    """The row indices of each of `steps` batches (trainer.cc TrainStep /
    Reshuffle) over a single task of n rows."""
    rng = MT19937_64(seed)
    order, cursor, out = None, n, []
    for _ in range(steps):
        if cursor >= n:
            order = list(range(n))
            _fisher_yates(order, rng)
            cursor = 0
        end = min(n, cursor + batch_size)
        out.append(order[cursor:end])
        cursor = end
    return out


def warmup_steps(steps, warmup_ratio=0.06):
    """std::llround(ratio * steps) (halves away from zero), at most steps."""
    return min(steps, int(math.floor(warmup_ratio * steps + 0.5)))


def learning_rate(step, lr, steps, warmup):
    """trainer.cc LearningRate (step counts from 0; linear decay on)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * max(0.0, (steps - step) / max(1, steps - warmup))


def extract_answer(generated, gold):
    """eval_scores.cc ExtractAnswer: for a gold answerN, the first of
    answer1..answer5 in the text; for true/false, the first of those; any
    other gold: the gold itself when the stripped text starts with it. ASCII
    case-insensitive, result lower case, "" when nothing is found."""
    text = generated.translate(_LOWER)
    g = gold.strip(ASCII_WS).translate(_LOWER)
    if len(g) == 7 and g.startswith("answer") and "1" <= g[6] <= "5":
        candidates = [f"answer{k}" for k in range(1, 6)]
    elif g in ("true", "false"):
        candidates = ["true", "false"]
    else:
        return g if g and text.strip(ASCII_WS).startswith(g) else ""
    best, found = None, ""
    for c in candidates:
        at = text.find(c)
        if at >= 0 and (best is None or at < best):
            best, found = at, c
    return found


def answer_accuracy(generated, gold):
    n = min(len(generated), len(gold))
    if n == 0:
        return 0.0
    hit = 0
    for out, ans in zip(generated[:n], gold[:n]):
        g = ans.strip(ASCII_WS).translate(_LOWER)
        hit += bool(g) and extract_answer(out, ans) == g
    return hit / n


def user_text(row):
    """The user turn of an instruction-format row (generation_dataset.cc)."""
    inp = row.get("input") or ""
    return row["instruction"] + (("\n\n" + inp) if inp.strip(ASCII_WS) else "")


def encode_prompt(tok, row):
    msgs = [{"role": "user", "content": user_text(row)}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def encode_example(tok, row):
    """(prompt ids, completion ids) of one training row (lm_objective.cc
    MakeChatLmTokenizer)."""
    msgs = [{"role": "user", "content": user_text(row)}]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": row["output"]}],
                                   tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template does not render the prompt followed by the reply")
    return (tok(prompt, add_special_tokens=False)["input_ids"],
            tok(full[len(prompt):], add_special_tokens=False)["input_ids"])


def build_row(prompt, completion, max_length):
    """(ids, labels) of one row after BuildLmBatch's truncation."""
    c = min(len(completion), max_length - 1)
    p = min(len(prompt), max_length - c)
    ids = prompt[len(prompt) - p:] + completion[:c]
    return ids, [-100] * p + completion[:c]


def pad_batch(rows, pad_id):
    """Right-padded input_ids, attention_mask, labels (lists) of (ids, labels) rows."""
    S = max(len(ids) for ids, _ in rows)
    ids = [r[0] + [pad_id] * (S - len(r[0])) for r in rows]
    mask = [[1] * len(r[0]) + [0] * (S - len(r[0])) for r in rows]
    labels = [r[1] + [-100] * (S - len(r[1])) for r in rows]
    return ids, mask, labels


def load_set(data_dir, name, split):
    return json.loads((pathlib.Path(data_dir) / name / f"{split}.json").read_text())


def run(args):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    dev_name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(dev_name)
    t_start = time.time()
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else max(0, tok.eos_token_id)
    eos_id = tok.eos_token_id
    train = subsample(load_set(args.data_dir, args.set, "train"), args.train_limit, args.seed)
    test = load_set(args.data_dir, args.set, "test")
    if args.max_eval > 0:
        test = test[: args.max_eval]
    examples = [build_row(*encode_example(tok, r), args.max_length) for r in train]

    torch.manual_seed(args.seed)
    base = LlamaForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).to(device)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    warm = warmup_steps(args.steps, args.warmup_ratio)
    print(f"PEFT LoRA r=8 alpha 16 on q_proj,v_proj: {n_params} adapter parameters; "
          f"{len(train)} train rows, {len(test)} test rows, {args.steps} steps of {args.batch_size}, "
          f"warm-up {warm}, device {dev_name}", flush=True)
    model.train()
    losses, tokens, secs = [], 0, 0.0
    for step, idx in enumerate(batch_order(len(examples), args.batch_size, args.steps, args.seed)):
        ids, mask, labels = pad_batch([examples[i] for i in idx], pad_id)
        ids_t = torch.tensor(ids, device=device)
        mask_t = torch.tensor(mask, device=device)
        labels_t = torch.tensor(labels, device=device)
        t0 = time.perf_counter()
        lr = learning_rate(step, args.lr, args.steps, warm)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = model(input_ids=ids_t, attention_mask=mask_t, labels=labels_t).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip).item()
        opt.step()
        if dev_name.startswith("cuda"):
            torch.cuda.synchronize()
        secs += time.perf_counter() - t0
        tokens += sum(sum(m) for m in mask)
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0 or step == 0 or step + 1 == args.steps:
            print(f"step {step + 1}/{args.steps} loss {losses[-1]:.5f} lr {lr:.3g} "
                  f"grad_norm {grad_norm:.3g} tokens/s {tokens / secs:.1f}", flush=True)
    train_seconds = secs

    model.eval()
    prompts = []
    for r in test:
        p = encode_prompt(tok, r)
        prompts.append(p[len(p) - min(len(p), args.max_length):])
    generated = []
    eb = max(args.batch_size, 16)
    t0 = time.time()
    with torch.no_grad():
        for s in range(0, len(prompts), eb):
            chunk = prompts[s: s + eb]
            S = max(len(p) for p in chunk)
            ids = torch.tensor([[pad_id] * (S - len(p)) + p for p in chunk], device=device)
            mask = torch.tensor([[0] * (S - len(p)) + [1] * len(p) for p in chunk], device=device)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                                 do_sample=False, eos_token_id=eos_id, pad_token_id=pad_id)
            for row in out[:, S:].tolist():
                if eos_id in row:
                    row = row[: row.index(eos_id)]
                generated.append(tok.decode(row, skip_special_tokens=True))
    eval_seconds = time.time() - t0
    gold = [str(r["answer"]) for r in test]
    exact = sum(g.strip(ASCII_WS) == r["output"].strip(ASCII_WS) for g, r in zip(generated, test))
    metrics = {"answer_accuracy": answer_accuracy(generated, gold),
               "exact_match": exact / max(1, len(test)), "examples": float(len(test))}
    print(f"eval {args.set} answer_accuracy={metrics['answer_accuracy']:.4f} "
          f"exact_match={metrics['exact_match']:.4f} ({eval_seconds:.0f} s)", flush=True)
    res = {"model": "decoder", "adapter": "peft_lora_r8", "steps": args.steps, "losses": losses,
           "final_eval": {"step": args.steps, "score": metrics["answer_accuracy"],
                          "metrics": {args.set: metrics}},
           "adapter_parameters": n_params, "train_tokens_per_second": tokens / max(secs, 1e-9),
           "train_examples_per_second": sum(len(b) for b in batch_order(
               len(examples), args.batch_size, args.steps, args.seed)) / max(secs, 1e-9),
           "seconds": train_seconds, "eval_seconds": eval_seconds,
           "wall_seconds": time.time() - t_start, "device": dev_name,
           "samples": [{"generated": g, "answer": a} for g, a in list(zip(generated, gold))[:5]]}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "result.json.tmp"
    tmp.write_text(json.dumps(res, indent=2))
    os.replace(tmp, out / "result.json")
    print("result " + json.dumps({k: v for k, v in res.items() if k not in ("losses", "samples")}),
          flush=True)
    return res


def main():
    root = pathlib.Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "bench"))
    import bench_args
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_dir", default=str(root / "models" / "SmolLM2-135M-Instruct"))
    p.add_argument("--data_dir", default=os.path.join(bench_args.shared_dir(), "data", "commonsense"))
    p.add_argument("--set", required=True)
    p.add_argument("--train_limit", type=int, default=0)
    p.add_argument("--max_eval", type=int, default=0)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup_ratio", type=float, default=0.06)
    p.add_argument("--grad_clip", type=float, default=1.0)
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--max_new_tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--log_every", type=int, default=10)
    p.add_argument("--out", required=True)
    run(p.parse_args())


if __name__ == "__main__":
    main()
