"""Parity of our LoRA (adapters/lora_adapter.cc) with Hugging Face PEFT.

Builds a tiny random BertModel, wraps it with PEFT LoRA (r=4, alpha=8, query
and value, B initialised non-zero), saves base + adapter, runs PEFT on a
padded batch and compares with `metatt-lora-forward` (our encoder + our LoRA
loaded from the PEFT directory). Fails (never skips) if the binary is missing.
"""
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import build_dir

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

BUILD_DIR = str(build_dir())
TOOL = os.path.join(BUILD_DIR, "server", "model", "metatt-lora-forward")


def _tiny_model(seed):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32, type_vocab_size=2,
        hidden_act="gelu", layer_norm_eps=1e-12)
    model = transformers.BertModel(cfg, add_pooling_layer=False)
    model.eval()
    return model


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.int64)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    types = torch.zeros(3, 10, dtype=torch.int64)
    types[0, 5:] = 1
    return ids, mask, types


def _run_tool(base_dir, adapter_dir, in_path, out_path):
    assert os.path.exists(TOOL), f"{TOOL} is not built (set METATT_BUILD_DIR)"
    cmd = [TOOL, f"--model_dir={base_dir}", f"--adapter_dir={adapter_dir}",
           f"--inputs={in_path}", f"--output={out_path}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return load_file(out_path)["hidden"]


@pytest.mark.parametrize("target,use_rslora", [(["query", "value"], False),
                                               (["query", "key", "value", "dense"], True)])
def test_lora_matches_peft(tmp_path, target, use_rslora):
    model = _tiny_model(0)
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir, safe_serialization=True)
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=target, lora_dropout=0.0,
                           init_lora_weights=False, use_rslora=use_rslora)
    pmodel = peft.get_peft_model(model, lcfg)
    pmodel.eval()
    adapter_dir = tmp_path / "adapter"
    pmodel.save_pretrained(adapter_dir, safe_serialization=True)

    ids, mask, types = _inputs()
    with torch.no_grad():
        want = pmodel(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        with pmodel.disable_adapter():
            base = pmodel(input_ids=ids, attention_mask=mask,
                          token_type_ids=types).last_hidden_state
    # The adapter must matter, or the comparison proves nothing.
    assert (want - base).abs().max().item() > 1e-3

    in_path = tmp_path / "in.safetensors"
    save_file({"input_ids": ids.contiguous(), "attention_mask": mask.contiguous(),
               "token_type_ids": types.contiguous()}, str(in_path))
    got = _run_tool(base_dir, adapter_dir, in_path, tmp_path / "out.safetensors")
    assert got.shape == want.shape
    real = mask.bool()
    diff = (got - want).abs()
    print(f"max |ours - peft| = {diff.max().item():.3e} (real tokens {diff[real].max().item():.3e})")
    assert diff[real].max().item() < 1e-4, diff[real].max().item()
    assert diff.max().item() < 1e-4, diff.max().item()
