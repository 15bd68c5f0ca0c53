"""LoRA as a family form, and PEFT folders in and out, on the real
metatt-server with all-MiniLM-L6-v2 and the real `peft` package:

* a job with form lora trains and publishes a LoRA family, served in the same
  mixed batch as a MetaTT family;
* ExportFamily of it writes a PEFT folder that peft.PeftModel.from_pretrained
  loads onto transformers' BertModel: its hidden states equal our encoder's
  with the same folder (metatt-lora-forward), and PEFT + the exported head
  reproduce the server's Predict scores;
* ImportFamily takes a PEFT LoRA made by peft (random B != 0) with a head
  beside it, and serves what PEFT computes; it survives a restart."""
import json
import subprocess
import sys

import grpc
import pytest

from server_harness import ROOT, Server, build_dir, make_rows, tsv_bytes

sys.path.insert(0, str(ROOT / "client" / "python"))

from metatt_client import Client, MetattError  # noqa: E402
from metatt_client.client import inference_pb2, jobs_pb2  # noqa: E402
from metatt_client.export import load_family  # noqa: E402

MINILM = ROOT / "models" / "all-MiniLM-L6-v2"
TEXTS = ["the movie was very good", "awful plot and a bad actor", "a nice film",
         ("the story was sad", "really quite poor")]
PROJ = ["q", "k", "v", "o", "ffn_up", "ffn_down"]


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModel, AutoTokenizer
    return AutoModel, AutoTokenizer.from_pretrained(str(MINILM))


@pytest.fixture(scope="module")
def lora_family(mc, tmp_path_factory):
    p = tmp_path_factory.mktemp("ds") / "train.tsv"
    p.write_bytes(tsv_bytes(make_rows(48, seed=5)))
    ds = mc.upload(p, name="sent", text_column="sentence", label_column="label")
    job = mc.submit(family="lr", task="SENT", dataset_id=ds.id, form="lora", ranks=(4,),
                    projections=PROJ, max_steps=6, batch_size=8, learning_rate=1e-2,
                    max_length=32, eval_every=0)
    done = mc.wait(job.id, timeout=600)
    assert done.state == jobs_pb2.SUCCEEDED, done
    return ds


def scores(mc, family, task="SENT"):
    import torch
    return torch.tensor([list(p.scores) for p in mc.predict(family, task, TEXTS)])


def hidden_ours(folder, enc, tmp_path):
    """Our encoder + our LoRA read from `folder` (metatt-lora-forward)."""
    import torch
    from safetensors.torch import load_file, save_file

    tool = build_dir() / "server" / "model" / "metatt-lora-forward"
    if not tool.exists():
        pytest.fail(f"{tool} not built")
    inp, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file({k: v.to(torch.int64).contiguous() for k, v in enc.items()}, str(inp))
    r = subprocess.run([str(tool), f"--model_dir={MINILM}", f"--adapter_dir={folder}",
                        f"--inputs={inp}", f"--output={out}"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return load_file(str(out))["hidden"]


def test_lora_job_serves_and_exports_a_peft_folder(mc, lora_family, hf, tmp_path):
    import torch

    fam = mc.get_family("lr").versions[-1]
    assert fam.form == "lora" and list(fam.ranks) == [4]
    # 6 layers x (4 x (384 + 384) + (384 + 1536) + (1536 + 384)) x r = 4
    assert fam.adapter_parameters == 6 * 4 * (4 * 768 + 2 * 1920)
    want = scores(mc, "lr")

    out = tmp_path / "peft"
    names = mc.export_family("lr", out)
    assert sorted(names) == ["adapter_config.json", "adapter_model.safetensors", "family.json",
                             "heads.safetensors"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    assert sorted(cfg["target_modules"]) == sorted(
        ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"])

    from peft import PeftModel
    AutoModel, tok = hf
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(str(MINILM)), str(out)).eval()
    enc = tok(["the movie was very good", "awful plot and a bad actor , really"],
              padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = model(**enc).last_hidden_state
        base = AutoModel.from_pretrained(str(MINILM)).eval()(**enc).last_hidden_state
    ours = hidden_ours(out, enc, tmp_path)
    m = enc["attention_mask"].bool()
    print(f"PEFT vs our encoder, hidden states: max abs diff "
          f"{(theirs - ours)[m].abs().max().item():.2e}")
    assert (theirs - ours)[m].abs().max().item() < 1e-4
    assert (theirs - base)[m].abs().max().item() > 1e-3  # the LoRA moved them

    # PEFT + the exported head reproduce Predict.
    lf = load_family(out)
    assert lf.form == "lora" and lf.task_names == ["SENT"]
    got = lf.predict(lf.apply_to(AutoModel.from_pretrained(str(MINILM))), tok, "SENT", TEXTS)
    print(f"PEFT + head vs Predict: max abs diff {(got - want).abs().max().item():.2e}")
    assert (got - want).abs().max().item() < 1e-4

    # A LoRA family takes no added task (it has no task core).
    with pytest.raises(MetattError) as e:
        mc.submit(family="lr", task="MORE", dataset_id=lora_family.id, kind="add_task",
                  max_steps=2)
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "lora" in str(e.value)


def test_lora_and_metatt_families_in_one_mixed_batch(mc, lora_family):
    job = mc.submit(family="tt", task="SENT", dataset_id=lora_family.id, form="4d", ranks=(4,),
                    max_steps=3, batch_size=8, max_length=32, eval_every=0)
    assert mc.wait(job.id, timeout=600).state == jobs_pb2.SUCCEEDED
    inputs = []
    for t in TEXTS[:3]:
        inputs.append(inference_pb2.PredictInput(family="lr", task="SENT", text=t))
        inputs.append(inference_pb2.PredictInput(family="tt", task="SENT", text=t))
    mixed = mc.predict_mixed(inputs)
    sep_lr, sep_tt = scores(mc, "lr")[:3], scores(mc, "tt")[:3]
    for i in range(3):
        assert list(mixed[2 * i].scores) == pytest.approx(sep_lr[i].tolist(), abs=1e-5)
        assert list(mixed[2 * i + 1].scores) == pytest.approx(sep_tt[i].tolist(), abs=1e-5)


def test_metattctl_export_import_both_formats(mc, minilm_server, lora_family, tmp_path):
    """metattctl families export / import: a LoRA family (PEFT folder) and a
    MetaTT family (family.json + cores.safetensors) round-trip."""
    ctl = build_dir() / "client" / "metattctl"
    if not ctl.exists():
        pytest.fail(f"{ctl} not built")
    if "tt" not in {f.name for f in mc.list_families().families}:
        job = mc.submit(family="tt", task="SENT", dataset_id=lora_family.id, form="4d",
                        ranks=(4,), max_steps=3, batch_size=8, max_length=32, eval_every=0)
        assert mc.wait(job.id, timeout=600).state == jobs_pb2.SUCCEEDED
    server = f"--server=127.0.0.1:{minilm_server.port}"
    for family, files in (("lr", ["adapter_config.json", "adapter_model.safetensors",
                                  "family.json", "heads.safetensors"]),
                          ("tt", ["cores.safetensors", "family.json"])):
        out = tmp_path / family
        r = subprocess.run([str(ctl), server, "families", "export", family, str(out)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert sorted(p.name for p in out.iterdir()) == files
        r = subprocess.run([str(ctl), server, "--json", "families", "import", str(out),
                            f"--family={family}-ctl"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        v = json.loads(r.stdout.strip().splitlines()[-1])
        assert v["family"] == f"{family}-ctl" and v["version"] == "1"
        assert (scores(mc, f"{family}-ctl") - scores(mc, family)).abs().max().item() < 1e-6
    r = subprocess.run([str(ctl), server, "families", "import", str(tmp_path / "tt"),
                        "--family=tt-ctl"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "ALREADY_EXISTS" in r.stderr


def make_peft_folder(path, seed=7):
    """A PEFT LoRA made by peft on MiniLM, B random (not PEFT's zero init),
    and a 3-label head beside it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModel

    torch.manual_seed(seed)
    model = get_peft_model(AutoModel.from_pretrained(str(MINILM)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "output.dense"],
                                      lora_dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.05)
    model.save_pretrained(str(path))
    head = {"TOPIC.weight": torch.randn(3, 384) * 0.2, "TOPIC.bias": torch.randn(3) * 0.1}
    save_file(head, str(path / "heads.safetensors"))
    return model.eval(), head


def test_import_a_peft_folder_trained_elsewhere(mc, minilm_server, minilm_data, hf, tmp_path):
    import torch

    folder = tmp_path / "elsewhere"
    model, head = make_peft_folder(folder)
    AutoModel, tok = hf
    # Without family.json the folder names no family: the request must.
    with pytest.raises(MetattError) as e:
        mc.import_family(folder)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "family" in str(e.value)
    v = mc.import_family(folder, family="peftimp")
    assert v.version == 1 and v.form == "lora"
    assert [(t.name, t.num_labels) for t in v.tasks] == [("TOPIC", 3)]

    def expected():
        rows = []
        for t in TEXTS:
            a, b = (t, None) if isinstance(t, str) else t
            enc = tok(a, b, return_tensors="pt")
            with torch.no_grad():
                h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (h * m).sum(1) / m.sum(1)
            rows.append(torch.softmax(pooled @ head["TOPIC.weight"].t() + head["TOPIC.bias"], -1))
        return torch.cat(rows)

    want = expected()
    got = scores(mc, "peftimp", "TOPIC")
    print(f"imported PEFT folder, Predict vs PEFT: max abs diff {(got - want).abs().max().item():.2e}")
    assert (got - want).abs().max().item() < 1e-4
    # A broken folder is refused naming the file.
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (bad / f).write_bytes((folder / f).read_bytes())
    with pytest.raises(MetattError) as e:
        mc.import_family(bad, family="broken")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "heads.safetensors" in str(e.value)

    # Published LoRA families reload from disk after a restart.
    before_lr = scores(mc, "lr")
    minilm_server.stop()
    s2 = Server(minilm_data, MINILM).start()
    try:
        c2 = Client(f"127.0.0.1:{s2.port}", timeout=120)
        assert (scores(c2, "peftimp", "TOPIC") - want).abs().max().item() < 1e-5
        assert (scores(c2, "lr") - before_lr).abs().max().item() < 1e-5
        c2.close()
    finally:
        s2.stop()

