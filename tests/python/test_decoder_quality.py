"""bench/decoder_quality.py's PEFT row trains on what metatt-train trains on.

bench/decoder_quality_peft.py reproduces three things of `metatt-train` in
Python; each is checked against the built C++ here (no model training):

* the token ids and labels of commonsense rows (chat template, completion
  only, truncation from the prompt's left) equal `metatt-lm-loss`'s batch
  (server/training/lm_objective.cc), at the default max length and a short
  one that truncates;
* the seeded --train_limit subset and the trainer's batch order: the
  per-step losses `metatt-train` reports for a tiny random Llama (adapter at
  its zero init, lr 1e-12, so every step scores the untouched model) equal
  transformers' loss on the batches the Python twin picks, over more than
  one epoch; the file's first rows give a different loss;
* the answer extraction twin follows eval_scores.h ExtractAnswer's documented
  rule (the C++ test's cases and the rule's edges), and the engine is
  std::mt19937_64 (the standard's 10,000th value).

Fails (never skips) when a binary is missing; skips only when set-up has not
laid out models/SmolLM2-135M-Instruct (its tokenizer) or the commonsense data.
"""
import json
import pathlib
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, binary, shared_dir
# The tiny random Llama with SmolLM2's tokenizer, and metatt-lm-loss's batch.
from test_lm_loss_parity import run_ours as lm_loss_batch, tiny_model  # noqa: F401

sys.path.insert(0, str(ROOT / "bench"))
import decoder_quality  # noqa: E402
import decoder_quality_peft as dqp  # noqa: E402

DATA = shared_dir() / "data" / "commonsense"


def test_extract_answer_follows_the_cpp_rule():
    ex = dqp.extract_answer
    # server/training/generation_dataset_test.cc AnswerExtraction cases.
    assert ex("the correct answer is answer3", "answer3") == "answer3"
    assert ex("Answer2, not answer1", "answer1") == "answer2"
    assert ex("the correct answer is false", "true") == "false"
    assert ex("no idea", "answer1") == ""
    assert ex(" Paris, France", "paris") == "paris"
    # Edges of the documented rule.
    assert ex("TRUE or false", " False\n") == "true"         # first of the kind, any case
    assert ex("answer5 then answer4", "answer2") == "answer5"
    assert ex("answer6 is not one", "answer1") == ""         # only answer1..answer5
    assert ex("the answer is answer12", "answer1") == "answer1"  # substring, as text.find
    assert ex("answer1", "true") == ""                       # the gold's kind decides
    assert ex("yes it is", "yes") == "yes" and ex("well, yes", "yes") == ""
    assert ex("anything", "") == "" and ex("anything", "  ") == ""
    assert ex("ÄNSWER1 answer2", "answer1") == "answer2"      # ASCII lower-casing only
    assert dqp.answer_accuracy(["answer1", "answer2 answer1", "true"],
                               ["answer1", "answer1", "false"]) == pytest.approx(1 / 3)


def test_mt19937_64_is_the_standard_engine():
    r = dqp.MT19937_64()
    for _ in range(9999):
        r()
    assert r() == 9981545732273789042  # [rand.predef]: the 10000th draw of default seed


def test_learning_rate_schedule():
    assert dqp.warmup_steps(32) == 2 and dqp.warmup_steps(125) == 8 and dqp.warmup_steps(25) == 2
    lrs = [dqp.learning_rate(s, 1.0, 10, 2) for s in range(10)]
    assert lrs[:3] == [0.5, 1.0, 1.0] and lrs[-1] == pytest.approx(1 / 8)


def test_presets_and_overrides():
    g = decoder_quality.parse_args(["--protocol", "gpu"])
    assert (g.train_limit, g.max_eval, g.steps, g.batch_size, g.seeds) == (500, 500, 125, 8, "0,1,2")
    assert g.overridden == []
    c = decoder_quality.parse_args(["--steps", "4", "--seed", "1"])
    assert (c.protocol, c.train_limit, c.max_eval, c.steps, c.seeds) == ("cpu", 200, 100, 4, "1")
    assert c.overridden == ["seeds", "steps"]


@pytest.fixture(scope="module")
def data_dir():
    if not (DATA / "ARC-Easy" / "train.json").exists():
        pytest.skip(f"{DATA} missing (the shared commonsense data)")
    return DATA


def some_rows():
    rows = []
    for name in decoder_quality.SETS:
        data = dqp.load_set(DATA, name, "train")
        rows += data[:2] + [max(data[:200], key=lambda r: len(r["instruction"]))]
    return rows


@pytest.mark.parametrize("max_length", [256, 40])
def test_prompt_tokens_equal_metatt_lm_loss(tiny_model, data_dir, tmp_path, max_length):
    path, _, tok = tiny_model
    rows = some_rows()
    ours = lm_loss_batch(path, rows, tmp_path, max_length=max_length)
    built = [dqp.build_row(*dqp.encode_example(tok, r), max_length) for r in rows]
    ids, mask, labels = dqp.pad_batch(built, tok.pad_token_id)
    assert ours["input_ids"].tolist() == ids
    assert ours["attention_mask"].tolist() == mask
    assert ours["labels"].tolist() == labels
    if max_length == 40:  # the long rows were cut, their completion kept whole
        assert any(sum(m) == 40 for m in mask)
        for (_, lab), r in zip(built, rows):
            comp = dqp.encode_example(tok, r)[1]
            assert [x for x in lab if x != -100] == comp


def losses_of(hf, tok, rows, batches):
    out = []
    for b in batches:
        ids, mask, labels = dqp.pad_batch([rows[i] for i in b], tok.pad_token_id)
        with torch.no_grad():
            out.append(hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          labels=torch.tensor(labels)).loss.item())
    return out


@pytest.mark.parametrize("task,seed", [("ARC-Easy", 3), ("BoolQ", 0)])
def test_rows_and_batch_order_equal_metatt_train(tiny_model, data_dir, tmp_path, task, seed):
    path, hf, tok = tiny_model
    limit, batch, steps = 12, 4, 5  # 3 batches an epoch: steps 4-5 are the second epoch
    res = subprocess.run([str(binary("server/training/metatt-train")), f"--model_dir={path}",
                          f"--commonsense_dir={DATA}", f"--task={task}", f"--train_limit={limit}",
                          f"--batch_size={batch}", f"--steps={steps}", "--lr=1e-12",
                          "--adapter=lora", "--max_eval=1", "--max_new_tokens=1", "--eval_every=0",
                          f"--seed={seed}", f"--out={tmp_path}"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr
    theirs = json.loads((tmp_path / "result.json").read_text())["losses"]
    train = dqp.load_set(DATA, task, "train")
    picked = [dqp.build_row(*dqp.encode_example(tok, r), 256)
              for r in dqp.subsample(train, limit, seed)]
    mine = losses_of(hf, tok, picked, dqp.batch_order(limit, batch, steps, seed))
    assert mine == pytest.approx(theirs, abs=1e-4)
    # Sensitivity: the file's first rows in order score differently.
    first = [dqp.build_row(*dqp.encode_example(tok, r), 256) for r in train[:limit]]
    other = losses_of(hf, tok, first, [list(range(batch))])
    assert abs(other[0] - theirs[0]) > 1e-3


def test_every_row_gets_the_same_protocol(monkeypatch, tmp_path):
    """The commands the table would run (nothing runs): PEFT and metatt-train
    get the same rows, steps, batch, max length, tokens and seed; multi-task
    and the add-task bases get n_sets x steps."""
    launched = []

    def fake_launch(args, cmd, run_dir):
        flags = {}
        for c in map(str, cmd):  # the last value of a flag wins, as in absl
            k, eq, v = c.partition("=")
            if k.startswith("--"):
                flags[k] = v if eq else True
        launched.append((pathlib.Path(run_dir).relative_to(tmp_path).as_posix(), flags))
        return {}

    monkeypatch.setattr(decoder_quality, "launch", fake_launch)
    args = decoder_quality.parse_args(["--protocol", "gpu", "--out", str(tmp_path)])
    sets = decoder_quality.SETS
    for row in decoder_quality.ALL_ROWS:
        for _, _, thunk in decoder_quality.row_units(args, row, sets, tmp_path / "runs", 2):
            thunk()
    by_dir = dict(launched)
    common = ("--train_limit", "--max_eval", "--batch_size", "--max_length", "--max_new_tokens",
              "--seed", "--warmup_ratio")
    peft = by_dir["runs/peft_lora_r8/seed2/BoolQ"]
    for d in ("runs/lora_r8/seed2/BoolQ", "runs/metatt4d/seed2/BoolQ",
              "runs/new_task_frozen/seed2/BoolQ"):
        assert {k: by_dir[d][k] for k in common + ("--steps",)} == \
            {k: peft[k] for k in common + ("--steps",)}, d
    assert peft["--steps"] == "125" and peft["--seed"] == "2" and peft["--lr"] == "0.001"
    assert by_dir["runs/lora_r8/seed2/BoolQ"]["--lr"] == "0.001"
    assert by_dir["runs/multitask_4p1d/seed2/all"]["--steps"] == "375"
    assert by_dir["runs/multitask_4p1d/seed2/all"]["--task"] == ",".join(sets)
    base = by_dir["runs/new_task_frozen/seed2/base_without_BoolQ"]
    assert base["--steps"] == "250" and base["--task"] == "ARC-Easy,OpenBookQA"
    add = by_dir["runs/new_task_frozen/seed2/BoolQ"]
    assert add["--base_family"].endswith("base_without_BoolQ") and add["--task"] == "BoolQ"
    assert by_dir["runs/zero_shot/BoolQ"]["--eval_only"] is True
    assert len(launched) == 3 + 3 + 1 + 6 + 3 + 3
