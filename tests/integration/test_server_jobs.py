"""Cancel, validation and queue behaviour through the real server."""
import grpc
import pytest

from server_harness import make_rows, tsv_bytes


def test_cancel_a_running_job(pb, client):
    j = pb.jobs_pb2
    ds = client.upload("s", tsv_bytes(make_rows(64)))
    job = client.create_job("long", "T", ds.id, steps=100000)
    client.wait_state(job.id, {j.RUNNING})
    stream = client.jobs.StreamJobEvents(j.StreamJobEventsRequest(job_id=job.id), timeout=300)
    for e in stream:  # wait until it really steps
        if e.WhichOneof("event") == "progress":
            break
    client.jobs.CancelJob(j.CancelJobRequest(job_id=job.id))
    last = None
    for e in stream:
        if e.WhichOneof("event") == "state":
            last = e.state.state
    assert last == j.CANCELLED
    done = client.jobs.GetJob(j.GetJobRequest(job_id=job.id)).job
    assert done.state == j.CANCELLED
    assert done.step < 100000
    fams = client.adapters.ListFamilies(pb.adapters_pb2.ListFamiliesRequest()).families
    assert "long" not in [f.name for f in fams]


def test_cancel_a_queued_job_is_immediate(pb, client):
    j = pb.jobs_pb2
    ds = client.upload("s", tsv_bytes(make_rows(32)))
    first = client.create_job("a", "T", ds.id, steps=100000)
    second = client.create_job("b", "T", ds.id, steps=10)
    got = client.jobs.CancelJob(j.CancelJobRequest(job_id=second.id)).job
    assert got.state == j.CANCELLED
    client.jobs.CancelJob(j.CancelJobRequest(job_id=first.id))
    client.wait_state(first.id, {j.CANCELLED})
    listed = client.jobs.ListJobs(j.ListJobsRequest(state=j.CANCELLED)).jobs
    assert {x.id for x in listed} == {first.id, second.id}


def test_invalid_specs_name_the_field(pb, client):
    j = pb.jobs_pb2
    with pytest.raises(grpc.RpcError) as e:
        client.create_job("f", "T", "ds-missing", steps=5)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert "spec.tasks[0].dataset_id" in e.value.details()
    ds = client.upload("s", tsv_bytes(make_rows(8)))
    with pytest.raises(grpc.RpcError) as e:
        client.create_job("bad name!", "T", ds.id)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.family" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        client.create_job("f", "T", ds.id, kind=j.ADD_TASK)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_queue_limit_is_resource_exhausted(pb, tmp_path, tiny_model):
    from server_harness import Client, Server

    s = Server(tmp_path / "data", tiny_model, extra=["--max_queued_jobs=1"]).start()
    try:
        c = Client(pb, s.channel())
        j = pb.jobs_pb2
        ds = c.upload("s", tsv_bytes(make_rows(16)))
        running = c.create_job("a", "T", ds.id, steps=100000)
        c.wait_state(running.id, {j.RUNNING})
        c.create_job("b", "T", ds.id, steps=5)
        with pytest.raises(grpc.RpcError) as e:
            c.create_job("c", "T", ds.id, steps=5)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_queued_jobs=1" in e.value.details()
        c.jobs.CancelJob(j.CancelJobRequest(job_id=running.id))
    finally:
        s.stop()
