"""The Python client package (client/python/metatt_client) against the real
server: upload a file, submit, follow, predict, add a task, errors."""
import sys

import pytest

from server_harness import ROOT, make_rows, tsv_bytes

sys.path.insert(0, str(ROOT / "client" / "python"))

from metatt_client import Client, MetattError  # noqa: E402
from metatt_client.client import jobs_pb2  # noqa: E402


@pytest.fixture
def mc(server):
    c = Client(f"127.0.0.1:{server.port}", timeout=60)
    yield c
    c.close()


def test_upload_submit_follow_predict(mc, tmp_path):
    path = tmp_path / "train.tsv"
    path.write_bytes(tsv_bytes(make_rows(40, seed=1)))
    ds = mc.upload(path, name="sent", text_column="sentence", label_column="label")
    assert ds.num_rows == 40 and list(ds.label_names) == ["0", "1"]
    assert ds.id in [d.id for d in mc.list_datasets()]

    job = mc.submit(family="pc", task="SENT", dataset_id=ds.id, ranks=(4,), max_steps=6,
                    batch_size=8, learning_rate=5e-3, max_length=32)
    assert job.state == jobs_pb2.QUEUED
    events = list(mc.follow(job.id, timeout=300))
    states = [e.state.state for e in events if e.WhichOneof("event") == "state"]
    assert states[0] == jobs_pb2.QUEUED and jobs_pb2.RUNNING in states
    assert states[-1] == jobs_pb2.SUCCEEDED, events[-1]
    assert any(e.WhichOneof("event") == "progress" for e in events)
    assert mc.get_job(job.id).result_family == "pc"

    preds = mc.predict("pc", "SENT", ["the movie was very good", ("awful plot", "bad actor")])
    assert len(preds) == 2
    for p in preds:
        assert p.task == "SENT" and p.label_name in ("0", "1")
        assert sum(p.scores) == pytest.approx(1.0, abs=1e-4)
    by_index = mc.predict("pc", 0, ["the movie was very good"])
    assert list(by_index[0].scores) == pytest.approx(list(preds[0].scores), abs=1e-5)

    # A second task, then both in one mixed request.
    job2 = mc.submit(family="pc", task="SENT2", dataset_id=ds.id, kind="add_task", max_steps=3,
                     batch_size=8, max_length=32)
    assert mc.wait(job2.id, timeout=300).state == jobs_pb2.SUCCEEDED
    inf = sys.modules["metatt.v1.inference_pb2"]
    mixed = mc.predict_mixed([inf.PredictInput(family="pc", task="SENT", text="good film"),
                              inf.PredictInput(family="pc", task="SENT2", text="good film")])
    assert [p.task for p in mixed] == ["SENT", "SENT2"]
    # Both tasks on each text in one call: a list of names, and "*" for all.
    many = mc.predict("pc", ["SENT2", "SENT"], ["good film", "bad film"])
    assert [(p.input_index, p.task) for p in many] == [(0, "SENT2"), (0, "SENT"),
                                                        (1, "SENT2"), (1, "SENT")]
    assert list(many[1].scores) == pytest.approx(list(mixed[0].scores), abs=1e-4)
    assert [p.task for p in mc.predict("pc", "*", ["good film"])] == ["SENT", "SENT2"]
    assert {j.id for j in mc.list_jobs()} >= {job.id, job2.id}
    assert [f.name for f in mc.list_families().families] == ["pc"]


def test_errors_carry_the_grpc_code(mc):
    with pytest.raises(MetattError) as e:
        mc.predict("nofamily", "T", ["good"])
    assert e.value.code.name == "NOT_FOUND"
    assert "nofamily" in str(e.value)
    with pytest.raises(MetattError) as e:
        mc.submit(family="x", task="T", dataset_id="no-such-dataset", max_steps=2)
    assert e.value.code.name == "NOT_FOUND" and "dataset_id" in str(e.value)
    with pytest.raises(MetattError) as e:
        mc.upload(None, name="bad", text_column="sentence", label_column="label",
                  data=b"sentence\tlabel\n\t\n")
    assert e.value.code.name == "INVALID_ARGUMENT"
