"""Scale-out: two metatt-server replicas on one PostgreSQL database (started
by the test from Debian's packages, on loopback) and one shared data
directory. A job created on one replica runs exactly once; a Predict on the
other serves the published task; kill -9 of the replica running a job makes
the other fail it with the reason (no resumable checkpoint), and the
survivor keeps training and serving."""
import time

from server_harness import Client, Server, make_rows, tsv_bytes

LEASE_MS = 2000


def replica(pb, shared_dir, model, uri, name):
    s = Server(shared_dir, model, extra=[
        f"--store={uri}", f"--replica_id={name}", f"--job_lease_ms={LEASE_MS}",
        "--job_poll_ms=100", "--registry_poll_ms=200",
        # Without checkpoints: this test checks that a dead replica's job is
        # failed with the reason. (With them the survivor resumes it from the
        # shared data directory; test_job_resume.py covers resuming.)
        "--checkpoint_every_steps=0"]).start()
    return s, Client(pb, s.channel())


def claims(client, job_id):
    """Replica names from the 'claimed by replica X' log events of a finished job."""
    out = []
    j = client.pb.jobs_pb2
    for e in client.jobs.StreamJobEvents(j.StreamJobEventsRequest(job_id=job_id), timeout=120):
        if e.WhichOneof("event") == "log" and e.log.message.startswith("claimed by replica "):
            out.append(e.log.message[len("claimed by replica "):])
    return out


def predict_when_served(client, family, task, text, timeout=30):
    import grpc

    inf = client.pb.inference_pb2
    deadline = time.time() + timeout
    while True:
        try:
            return client.inference.Predict(inf.PredictRequest(inputs=[
                inf.PredictInput(family=family, task=task, text=text)]), timeout=30).predictions[0]
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND or time.time() > deadline:
                raise


def test_two_replicas_on_one_postgresql(pb, tmp_path, tiny_model, postgres):
    j = pb.jobs_pb2
    uri = postgres.create_database("metatt")
    shared = tmp_path / "shared"
    a, ca = replica(pb, shared, tiny_model, uri, "replica-a")
    b, cb = replica(pb, shared, tiny_model, uri, "replica-b")
    servers = {"replica-a": (a, ca), "replica-b": (b, cb)}
    try:
        ds = ca.upload("s", tsv_bytes(make_rows(48)))
        # The dataset uploaded on A is visible on B (one database, one data dir).
        assert cb.datasets.GetDataset(pb.datasets_pb2.GetDatasetRequest(dataset_id=ds.id)).dataset.id == ds.id

        # --- a job created on A runs exactly once, on either replica
        job = ca.create_job("fam", "T1", ds.id, steps=8)
        done = cb.wait_state(job.id, (j.SUCCEEDED, j.FAILED, j.CANCELLED), timeout=300)
        assert done.state == j.SUCCEEDED, done.failure_reason
        holders = claims(cb, job.id)
        assert len(holders) == 1 and holders[0] in servers, holders
        states = [e.state.state for e in cb.events(job.id) if e.WhichOneof("event") == "state"]
        assert states.count(j.RUNNING) == 1 and states[-1] == j.SUCCEEDED, states
        # Same view through both replicas.
        assert ca.jobs.GetJob(j.GetJobRequest(job_id=job.id)).job.state == j.SUCCEEDED

        # --- the replica that did not train serves the new task after publication
        trainer, other = holders[0], "replica-b" if holders[0] == "replica-a" else "replica-a"
        p_other = predict_when_served(servers[other][1], "fam", "T1", "good movie")
        p_trainer = predict_when_served(servers[trainer][1], "fam", "T1", "good movie")
        assert p_other.label == p_trainer.label
        for x, y in zip(p_other.scores, p_trainer.scores):
            assert abs(x - y) < 1e-4

        # --- kill -9 the replica running a job: the other fails it with the reason
        long_job = cb.create_job("doomed", "D", ds.id, steps=100000)
        for e in cb.jobs.StreamJobEvents(j.StreamJobEventsRequest(job_id=long_job.id), timeout=300):
            if e.WhichOneof("event") == "progress":
                break
        holder = claims_so_far(cb, long_job.id)
        assert len(holder) == 1, holder
        dead = holder[0]
        survivor_name = "replica-b" if dead == "replica-a" else "replica-a"
        survivor, cs = servers[survivor_name]
        killed_at = time.time()
        servers[dead][0].kill9()
        failed = cs.wait_state(long_job.id, (j.FAILED, j.SUCCEEDED, j.CANCELLED), timeout=60)
        took = time.time() - killed_at
        assert failed.state == j.FAILED, failed
        assert f"replica {dead} stopped renewing its lease" in failed.failure_reason, failed.failure_reason
        assert "no resumable checkpoint" in failed.failure_reason
        assert took < LEASE_MS / 1000 + 10, took
        # Exactly one replica ever claimed it; the survivor did not rerun it.
        assert claims(cs, long_job.id) == [dead]

        # The survivor keeps serving and training.
        again = predict_when_served(cs, "fam", "T1", "good movie")
        assert again.label == p_trainer.label
        last = cs.create_job("after", "A", ds.id, steps=4)
        fin = cs.wait_state(last.id, (j.SUCCEEDED, j.FAILED, j.CANCELLED), timeout=300)
        assert fin.state == j.SUCCEEDED, fin.failure_reason
        assert claims(cs, last.id) == [survivor_name]
    finally:
        a.stop()
        b.stop()


def claims_so_far(client, job_id):
    """Claims of a job that is still running (reads the event log without following it)."""
    j = client.pb.jobs_pb2
    out = []
    deadline = time.time() + 2
    for e in client.jobs.StreamJobEvents(j.StreamJobEventsRequest(job_id=job_id), timeout=30):
        if e.WhichOneof("event") == "log" and e.log.message.startswith("claimed by replica "):
            out.append(e.log.message[len("claimed by replica "):])
        if e.WhichOneof("event") == "progress" or time.time() > deadline:
            break
    return out
