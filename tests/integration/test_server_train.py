"""Upload -> create job -> stream events to SUCCEEDED -> predict, end to end."""
import time
import urllib.request

import grpc
import pytest

from server_harness import make_rows, tsv_bytes


def test_upload_train_stream_predict(pb, server, client):
    j = pb.jobs_pb2
    ds = client.upload("sentiment", tsv_bytes(make_rows(64)))
    assert ds.num_rows == 64
    assert list(ds.label_names) == ["0", "1"]
    assert len(ds.sha256) == 64

    job = client.create_job("sent", "SENT", ds.id, steps=30, key="first-try")
    assert job.state == j.QUEUED
    again = client.create_job("sent", "SENT", ds.id, steps=30, key="first-try")
    assert again.id == job.id, "same idempotency key must return the same job"

    events = client.events(job.id)
    states = [e.state.state for e in events if e.WhichOneof("event") == "state"]
    assert states[0] == j.QUEUED
    assert j.RUNNING in states
    assert states[-1] == j.SUCCEEDED, [e for e in events if e.WhichOneof("event") == "state"]
    assert [e.sequence for e in events] == list(range(len(events)))
    progress = [e.progress for e in events if e.WhichOneof("event") == "progress"]
    assert progress, "no progress events"
    assert progress[-1].step <= 30 and progress[-1].total_steps == 30
    assert all(p.loss == p.loss for p in progress)  # no NaN
    checkpoints = [e.checkpoint for e in events if e.WhichOneof("event") == "checkpoint"]
    assert checkpoints and checkpoints[-1].family == "sent" and checkpoints[-1].version == 1

    done = client.jobs.GetJob(j.GetJobRequest(job_id=job.id)).job
    assert done.state == j.SUCCEEDED
    assert done.result_family == "sent" and done.result_version == 1

    a = pb.adapters_pb2
    fams = client.adapters.ListFamilies(a.ListFamiliesRequest()).families
    assert [f.name for f in fams] == ["sent"]
    v = fams[0].versions[-1]
    assert v.form == "4+1d" and v.adapter_parameters > 0
    assert [t.name for t in v.tasks] == ["SENT"]
    tasks = client.adapters.ListTasks(a.ListTasksRequest(family="sent")).tasks
    assert tasks[0].index == 0 and list(tasks[0].label_names) == ["0", "1"]

    inf = pb.inference_pb2
    resp = client.inference.Predict(inf.PredictRequest(inputs=[
        inf.PredictInput(family="sent", task="SENT", text="the movie was very good"),
        inf.PredictInput(family="sent", task_index=0, text="awful plot"),
    ]), timeout=60)
    assert len(resp.predictions) == 2
    for p in resp.predictions:
        assert p.task == "SENT"
        assert p.label_name in ("0", "1")
        assert len(p.scores) == 2 and abs(sum(p.scores) - 1) < 1e-4



def test_metrics_endpoint(pb, server, client):
    assert server.metrics_port, "no METRICS line: /metrics is not served"
    ds = client.upload("s", tsv_bytes(make_rows(32)))
    job = client.create_job("sent", "SENT", ds.id, steps=5)
    client.events(job.id)
    inf = pb.inference_pb2
    client.inference.Predict(inf.PredictRequest(inputs=[
        inf.PredictInput(family="sent", task="SENT", text="good")]), timeout=60)
    names = ("metatt_jobs{state=\"SUCCEEDED\"} 1", "metatt_job_steps_total",
             "metatt_predict_requests_total{code=\"OK\"} 1",
             "metatt_predict_latency_seconds_bucket", "metatt_batch_size",
             "metatt_adapter_parameters{family=\"sent\"}")
    deadline = time.time() + 10  # sampled gauges refresh every 2 s
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as r:
            text = r.read().decode()
        missing = [n for n in names if n not in text]
        if not missing or time.time() > deadline:
            break
        time.sleep(0.5)
    assert not missing, missing


def test_unknown_task_and_family_are_not_found(pb, client):
    inf = pb.inference_pb2
    with pytest.raises(grpc.RpcError) as e:
        client.inference.Predict(inf.PredictRequest(inputs=[
            inf.PredictInput(family="nope", task="nope", text="hello")]), timeout=30)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    a = pb.adapters_pb2
    with pytest.raises(grpc.RpcError) as e:
        client.adapters.GetFamily(a.GetFamilyRequest(family="nope"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    j = pb.jobs_pb2
    with pytest.raises(grpc.RpcError) as e:
        client.jobs.GetJob(j.GetJobRequest(job_id="job-0000"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_unknown_task_in_a_trained_family_is_not_found(pb, client):
    ds = client.upload("s", tsv_bytes(make_rows(32)))
    job = client.create_job("fam", "A", ds.id, steps=5)
    states = [e.state.state for e in client.events(job.id) if e.WhichOneof("event") == "state"]
    assert states[-1] == pb.jobs_pb2.SUCCEEDED
    inf = pb.inference_pb2
    with pytest.raises(grpc.RpcError) as e:
        client.inference.Predict(inf.PredictRequest(inputs=[
            inf.PredictInput(family="fam", task="B", text="good")]), timeout=30)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert "B" in e.value.details()
