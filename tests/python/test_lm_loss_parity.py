"""The causal-LM objective of generation tasks (server/training/lm_objective.cc,
driven through `metatt-lm-loss`) against Hugging Face transformers:

* the prompt and completion token ids equal the chat template rendered by
  the SmolLM2 tokenizer (`apply_chat_template` of the prompt messages with
  `add_generation_prompt=True`, then of the whole conversation);
* the labels are -100 on every prompt and padding token and the input id on
  every completion token;
* our completion-only loss equals `LlamaForCausalLM(input_ids, attention_mask,
  labels=...).loss` (labels -100 on the prompt) on the same weights, fp32,
  within 1e-4, for a tiny random Llama (GQA) with SmolLM2's tokenizer and for
  prompt/completion, instruction and chat records in one right-padded batch.

Fails (never skips) when the binary is missing; skips only when set-up has
not laid out models/SmolLM2-135M-Instruct (its tokenizer files are used).
"""
import json
import os
import pathlib
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from conftest import ROOT, binary

SMOL = pathlib.Path(os.environ.get("METATT_DECODER_DIR", ROOT / "models" / "SmolLM2-135M-Instruct"))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

RECORDS = [
    {"prompt": "What is 2 + 2?", "completion": "4"},
    {"instruction": "Please choose the correct answer to the question: Which is a mammal?\n\n"
                    "Answer1: shark Answer2: whale\n\nAnswer format: answer1/answer2",
     "input": "", "output": "the correct answer is answer2", "answer": "answer2"},
    {"messages": [{"role": "system", "content": "You answer in one word."},
                  {"role": "user", "content": "Colour of the sky?"},
                  {"role": "assistant", "content": "Blue."},
                  {"role": "user", "content": "And grass? Ünïcödé ✓"},
                  {"role": "assistant", "content": "Green, usually.\nSometimes brown."}]},
]


def messages_of(rec):
    if "messages" in rec:
        return rec["messages"][:-1], rec["messages"][-1]["content"]
    if "instruction" in rec:
        prompt = rec["instruction"] + (("\n\n" + rec["input"]) if rec["input"].strip() else "")
        return [{"role": "user", "content": prompt}], rec["output"]
    return [{"role": "user", "content": rec["prompt"]}], rec["completion"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    if not all((SMOL / f).exists() for f in TOKENIZER_FILES[:2]):
        pytest.skip(f"{SMOL} not set up (scripts/setup.sh converts SmolLM2)")
    out = tmp_path_factory.mktemp("tiny_llama")
    tok = AutoTokenizer.from_pretrained(SMOL)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger than the default init so the loss is far from uniform
        for p in hf.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    hf.save_pretrained(out, safe_serialization=True)
    for f in TOKENIZER_FILES:
        if (SMOL / f).exists():
            shutil.copy(SMOL / f, out / f)
    return out, hf, tok


def run_ours(model_path, records, tmp_path, max_length=256):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out.safetensors"
    res = subprocess.run([str(binary("server/training/metatt-lm-loss")), f"--model_dir={model_path}",
                          f"--data={data}", f"--max_length={max_length}", f"--out={out}"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return load_file(str(out))


def test_ids_follow_the_chat_template(tiny_model, tmp_path):
    path, _, tok = tiny_model
    ours = run_ours(path, RECORDS, tmp_path)
    for i, rec in enumerate(RECORDS):
        prompt_msgs, completion = messages_of(rec)
        prompt = tok.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(prompt_msgs + [{"role": "assistant", "content": completion}],
                                       tokenize=False)
        assert full.startswith(prompt)
        want_prompt = tok(prompt, add_special_tokens=False)["input_ids"]
        want_completion = tok(full[len(prompt):], add_special_tokens=False)["input_ids"]
        n = int(ours["attention_mask"][i].sum())
        got = ours["input_ids"][i, :n].tolist()
        assert int(ours["prompt_lengths"][i]) == len(want_prompt)
        assert got == want_prompt + want_completion, i
        assert tok.decode(want_completion).startswith(completion)
        labels = ours["labels"][i].tolist()
        assert labels[:len(want_prompt)] == [-100] * len(want_prompt)
        assert labels[len(want_prompt):n] == want_completion
        assert labels[n:] == [-100] * (len(labels) - n)


def test_completion_only_loss_equals_transformers(tiny_model, tmp_path):
    path, hf, _ = tiny_model
    ours = run_ours(path, RECORDS, tmp_path)
    with torch.no_grad():
        ref = hf(input_ids=ours["input_ids"], attention_mask=ours["attention_mask"],
                 labels=ours["labels"]).loss.item()
        # The same model scoring every token (prompt included) differs: the mask matters.
        all_tokens = torch.where(ours["attention_mask"].bool(), ours["input_ids"],
                                 torch.full_like(ours["input_ids"], -100))
        unmasked = hf(input_ids=ours["input_ids"], attention_mask=ours["attention_mask"],
                      labels=all_tokens).loss.item()
    got = ours["loss"].item()
    print(f"completion-only loss: ours {got:.6f} transformers {ref:.6f} (all tokens {unmasked:.4f})")
    assert abs(got - ref) < 1e-4
    assert abs(unmasked - ref) > 1e-2


def test_truncation_keeps_the_completion(tiny_model, tmp_path):
    path, hf, _ = tiny_model
    ours = run_ours(path, RECORDS[1:2], tmp_path, max_length=24)
    ids, labels = ours["input_ids"][0], ours["labels"][0]
    assert ids.numel() == 24
    n_completion = int((labels != -100).sum())
    assert n_completion > 0 and (labels[-n_completion:] == ids[-n_completion:]).all()
    with torch.no_grad():
        ref = hf(input_ids=ours["input_ids"], attention_mask=ours["attention_mask"],
                 labels=ours["labels"]).loss.item()
    assert abs(ours["loss"].item() - ref) < 1e-4
