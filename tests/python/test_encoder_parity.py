"""Our LibTorch encoder against Hugging Face transformers, fp32, padded
batches with attention masks: the real all-MiniLM-L6-v2 and two tiny random
configs (BERT with gelu_new, RoBERTa-style positions)."""
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, BertConfig, BertModel, RobertaConfig, RobertaModel

from conftest import binary, device, model_dir

TOL = 1e-4


def run_ours(model_path, inputs, tmp_path):
    inp, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(inp))
    subprocess.run([str(binary("server/model/metatt-encode")), f"--model_dir={model_path}",
                    f"--device={device()}", f"--inputs={inp}", f"--out={out}"], check=True)
    return load_file(str(out))


def padded_batch(vocab, batch=5, seq=19, pad_id=0, first_id=None, seed=0, types=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    lengths = torch.tensor([seq, seq - 3, 7, 2, seq - 1][:batch])
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_id))
    if first_id is not None:
        ids[:, 0] = first_id
    tt = torch.zeros_like(ids)
    if types > 1:
        tt[:, seq // 2:] = 1
        tt = tt * mask
    return {"input_ids": ids, "token_type_ids": tt, "attention_mask": mask}


def compare(hf_model, model_path, inputs, tmp_path):
    hf_model.eval()
    with torch.no_grad():
        ref = hf_model(**inputs).last_hidden_state
    ours = run_ours(model_path, inputs, tmp_path)
    diff = (ours["last_hidden_state"] - ref).abs().max().item()
    assert diff < TOL, f"max abs diff {diff}"
    m = inputs["attention_mask"].unsqueeze(-1).float()
    mean_ref = (ref * m).sum(1) / m.sum(1)
    assert (ours["mean_pooled"] - mean_ref).abs().max().item() < TOL
    assert (ours["cls_pooled"] - ref[:, 0]).abs().max().item() < TOL
    return diff


def test_minilm_real_weights(tmp_path):
    path = model_dir()
    hf = AutoModel.from_pretrained(str(path), attn_implementation="eager").float()
    inputs = padded_batch(hf.config.vocab_size, first_id=101)
    diff = compare(hf, path, inputs, tmp_path)
    print(f"MiniLM max abs diff {diff:.2e}")


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu"])
def test_tiny_random_bert(tmp_path, act):
    torch.manual_seed(1)
    cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, hidden_act=act, max_position_embeddings=40,
                     type_vocab_size=2, layer_norm_eps=1e-7)
    hf = BertModel(cfg, add_pooling_layer=False)
    hf.save_pretrained(tmp_path / "m", safe_serialization=True)
    compare(hf, tmp_path / "m", padded_batch(97), tmp_path)


def test_tiny_random_roberta(tmp_path):
    torch.manual_seed(2)
    cfg = RobertaConfig(vocab_size=101, hidden_size=24, num_hidden_layers=3, num_attention_heads=3,
                        intermediate_size=40, max_position_embeddings=40, type_vocab_size=1,
                        pad_token_id=1, layer_norm_eps=1e-5)
    hf = RobertaModel(cfg, add_pooling_layer=False)
    hf.save_pretrained(tmp_path / "m", safe_serialization=True)
    compare(hf, tmp_path / "m", padded_batch(101, pad_id=1, first_id=0, types=1), tmp_path)


def test_bad_model_dir_names_the_problem(tmp_path):
    torch.manual_seed(3)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=20, max_position_embeddings=20)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(tmp_path / "m", safe_serialization=True)
    # Config claims 3 layers: the loader must name the first missing tensor.
    text = (tmp_path / "m" / "config.json").read_text().replace(
        '"num_hidden_layers": 1', '"num_hidden_layers": 3')
    (tmp_path / "m" / "config.json").write_text(text)
    inputs = padded_batch(50)
    save_file(inputs, str(tmp_path / "in.safetensors"))
    r = subprocess.run([str(binary("server/model/metatt-encode")), f"--model_dir={tmp_path / 'm'}",
                        f"--device={device()}", f"--inputs={tmp_path / 'in.safetensors'}",
                        f"--out={tmp_path / 'o.safetensors'}"], capture_output=True, text=True)
    assert r.returncode != 0
    assert "encoder.layer.1.attention.self.query.weight" in r.stderr
