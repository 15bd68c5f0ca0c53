"""The MetaTT export format (adapters/FORMAT.md) read back outside the server:
families trained by the real metatt-server on all-MiniLM-L6-v2 are exported
through the Python client, rebuilt as dense deltas by
metatt_client.export.load_family, merged into transformers' BertModel, and the
exported heads reproduce the server's Predict scores."""
import json
import shutil
import sys

import pytest

from server_harness import ROOT, make_rows, tsv_bytes

sys.path.insert(0, str(ROOT / "client" / "python"))

from metatt_client.client import jobs_pb2  # noqa: E402
from metatt_client.export import FormatError, load_family  # noqa: E402

MINILM = ROOT / "models" / "all-MiniLM-L6-v2"
TEXTS = ["the movie was very good", "awful plot and a bad actor", "a nice film",
         ("the story was sad", "really quite poor")]


@pytest.fixture(scope="module")
def dataset(mc, tmp_path_factory):
    p = tmp_path_factory.mktemp("ds") / "train.tsv"
    p.write_bytes(tsv_bytes(make_rows(48, seed=3)))
    return mc.upload(p, name="sent", text_column="sentence", label_column="label")


def train(mc, **kw):
    job = mc.submit(max_steps=6, batch_size=8, learning_rate=2e-2, max_length=32, eval_every=0,
                    **kw)
    done = mc.wait(job.id, timeout=600)
    assert done.state == jobs_pb2.SUCCEEDED, done


@pytest.fixture(scope="module")
def hf():
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    return AutoModel, AutoTokenizer.from_pretrained(str(MINILM))


def server_scores(mc, family, task):
    return [list(p.scores) for p in mc.predict(family, task, TEXTS)]


@pytest.mark.parametrize("form,projections,pooling", [
    ("4+1d", ["q", "k", "v", "o", "ffn_up", "ffn_down"], "mean"),  # task core, FFN ports
    ("5d", ["q", "v"], "cls"),
    ("4d", ["q", "v", "o"], "mean"),
])
def test_reader_reproduces_predict(mc, dataset, hf, tmp_path, form, projections, pooling):
    import torch

    family = "exp" + form.replace("+", "p")
    if form == "4+1d":
        train(mc, family=family, kind="multi_task", tasks=[("A", dataset.id), ("B", dataset.id)],
              form=form, ranks=(4,), projections=projections, pooling=pooling)
    else:
        train(mc, family=family, task="A", dataset_id=dataset.id, form=form, ranks=(4,),
              projections=projections, pooling=pooling)
    names = mc.export_family(family, tmp_path / "out")
    assert sorted(names) == ["cores.safetensors", "family.json"]
    meta = json.loads((tmp_path / "out" / "family.json").read_text())
    assert meta["format_version"] == 1 and meta["config"]["form"] == form

    fam = load_family(tmp_path / "out")
    assert fam.form == form and fam.pooling == pooling
    AutoModel, tok = hf
    for task in fam.task_names:
        want = server_scores(mc, family, task)
        model = fam.apply_to(AutoModel.from_pretrained(str(MINILM)).eval(), task)
        got = fam.predict(model, tok, task, TEXTS)
        assert got.shape == (len(TEXTS), 2)
        diff = (got - torch.tensor(want)).abs().max().item()
        print(f"reader vs Predict, {form} task {task}: max abs diff {diff:.2e}")
        assert diff < 1e-4, (task, diff)
        # The adapter matters: the base model with the same head differs.
        base = fam.predict(AutoModel.from_pretrained(str(MINILM)).eval(), tok, task, TEXTS)
        assert (base - torch.tensor(want)).abs().max().item() > 1e-3
    if form == "4+1d":  # the task core separates the tasks
        da, db = fam.delta("A", 0, "q"), fam.delta("B", 0, "q")
        assert da.shape == (384, 384) and not torch.allclose(da, db)
        assert fam.delta("A", 2, "ffn_up").shape == (384, 1536)
        assert fam.delta("A", 5, "ffn_down").shape == (1536, 384)


def test_reader_refuses_what_it_cannot_read(mc, dataset, tmp_path):
    src = tmp_path / "src"
    fams = {f.name for f in mc.list_families().families}
    if "exp4d" not in fams:
        train(mc, family="exp4d", task="A", dataset_id=dataset.id, form="4d", ranks=(4,),
              projections=["q", "v"])
    mc.export_family("exp4d", src)
    bad = tmp_path / "v2"
    shutil.copytree(src, bad)
    meta = json.loads((bad / "family.json").read_text())
    meta["format_version"] = 2
    (bad / "family.json").write_text(json.dumps(meta))
    with pytest.raises(FormatError, match="format_version 2"):
        load_family(bad)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(src, corrupt)
    data = bytearray((corrupt / "cores.safetensors").read_bytes())
    data[-1] ^= 1
    (corrupt / "cores.safetensors").write_bytes(bytes(data))
    with pytest.raises(FormatError, match="hash"):
        load_family(corrupt)
    # The exported files import back as a new family that answers the same.
    v = mc.import_family(src, family="exp4d-copy")
    assert v.family == "exp4d-copy" and v.version == 1
    a = server_scores(mc, "exp4d", "A")
    b = server_scores(mc, "exp4d-copy", "A")
    assert sum(a, []) == pytest.approx(sum(b, []), abs=1e-6)
