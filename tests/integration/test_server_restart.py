"""kill -9 mid-job, restart: the job ends FAILED with a reason (or resumes),
published families stay intact and keep serving."""
import time

from server_harness import Client, Server, make_rows, tsv_bytes


def test_kill9_mid_job_then_restart(pb, tmp_path, tiny_model):
    j = pb.jobs_pb2
    a = pb.adapters_pb2
    inf = pb.inference_pb2
    s = Server(tmp_path / "data", tiny_model).start()
    c = Client(pb, s.channel())
    ds = c.upload("s", tsv_bytes(make_rows(48)))
    first = c.create_job("kept", "K", ds.id, steps=10)
    states = [e.state.state for e in c.events(first.id) if e.WhichOneof("event") == "state"]
    assert states[-1] == j.SUCCEEDED
    before = c.inference.Predict(inf.PredictRequest(inputs=[
        inf.PredictInput(family="kept", task="K", text="good movie")]), timeout=60).predictions[0]

    long_job = c.create_job("doomed", "D", ds.id, steps=100000)
    for e in c.jobs.StreamJobEvents(j.StreamJobEventsRequest(job_id=long_job.id), timeout=300):
        if e.WhichOneof("event") == "progress":
            break
    s.kill9()

    s2 = Server(tmp_path / "data", tiny_model).start()
    try:
        c2 = Client(pb, s2.channel())
        job = c2.jobs.GetJob(j.GetJobRequest(job_id=long_job.id)).job
        if job.state == j.FAILED:
            assert "restart" in job.failure_reason, job.failure_reason
        else:  # resumed from a checkpoint
            assert job.state in (j.QUEUED, j.VALIDATING, j.RUNNING, j.SUCCEEDED)
            c2.jobs.CancelJob(j.CancelJobRequest(job_id=long_job.id))
        # The event log survived and ends with the recovery decision.
        events = c2.events(long_job.id, timeout=120)
        assert any(e.WhichOneof("event") == "progress" for e in events)

        fams = {f.name: f for f in c2.adapters.ListFamilies(a.ListFamiliesRequest()).families}
        assert "kept" in fams and "doomed" not in fams
        assert [t.name for t in fams["kept"].versions[-1].tasks] == ["K"]
        after = c2.inference.Predict(inf.PredictRequest(inputs=[
            inf.PredictInput(family="kept", task="K", text="good movie")]), timeout=60).predictions[0]
        assert after.label == before.label
        for x, y in zip(after.scores, before.scores):
            assert abs(x - y) < 1e-4
        done = c2.jobs.GetJob(j.GetJobRequest(job_id=first.id)).job
        assert done.state == j.SUCCEEDED
    finally:
        s2.stop()
