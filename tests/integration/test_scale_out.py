"""Scale-out: two metatt-server replicas on one PostgreSQL database (started
by the test from Debian's packages, on loopback).

test_two_replicas_on_one_postgresql: one shared data directory
(--blob_store=data_dir). A job created on one replica runs exactly once; a
Predict on the other serves the published task; kill -9 of the replica
running a job makes the other fail it with the reason (no resumable
checkpoint), and the survivor keeps training and serving.

test_replicas_with_separate_data_dirs_share_bytes_through_postgresql: each
replica has its own data directory (the default --blob_store=postgres: family
versions, datasets and checkpoints live in PostgreSQL's blobs table). A
dataset uploaded and a family trained on A is predicted on B; a task added on
B is served by A; kill -9 of A mid-job (and its data directory wiped) makes B
resume the job from the checkpoint in PostgreSQL."""
import shutil
import time

from server_harness import Client, Server, make_rows, tsv_bytes

LEASE_MS = 2000


def replica(pb, shared_dir, model, uri, name):
    s = Server(shared_dir, model, extra=[
        f"--store={uri}", f"--replica_id={name}", f"--job_lease_ms={LEASE_MS}",
        "--job_poll_ms=100", "--registry_poll_ms=200",
        # Replicas sharing one data directory (the bytes are files there).
        "--blob_store=data_dir",
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


def own_replica(pb, data_dir, model, uri, name, every=5):
    """A replica with its own data directory (default --blob_store: postgres)."""
    s = Server(data_dir, model, extra=[
        f"--store={uri}", f"--replica_id={name}", f"--job_lease_ms={LEASE_MS}",
        "--job_poll_ms=100", "--registry_poll_ms=200", f"--checkpoint_every_steps={every}",
        "--num_threads=1"]).start()
    return s, Client(pb, s.channel())


def first_log(client, job_id, prefix, timeout=300):
    """The first log event of a job whose message starts with `prefix` (None if the job ends first)."""
    j = client.pb.jobs_pb2
    for e in client.jobs.StreamJobEvents(j.StreamJobEventsRequest(job_id=job_id), timeout=timeout):
        if e.WhichOneof("event") == "log" and e.log.message.startswith(prefix):
            return e
        if e.WhichOneof("event") == "state" and e.state.state in (j.SUCCEEDED, j.FAILED, j.CANCELLED):
            return None
    return None


def test_replicas_with_separate_data_dirs_share_bytes_through_postgresql(
        pb, tmp_path, tiny_model, postgres):
    j = pb.jobs_pb2
    uri = postgres.create_database("metatt_blobs")
    dir_a, dir_b = tmp_path / "replica-a", tmp_path / "replica-b"
    a, ca = own_replica(pb, dir_a, tiny_model, uri, "replica-a")
    assert any("blob store: postgresql" in l for l in a.stderr_lines), a.stderr_lines[-20:]
    b = None
    try:
        # --- A alone: a dataset uploaded and a family trained on A.
        ds = ca.upload("s", tsv_bytes(make_rows(48)))
        job = ca.create_job("fam", "T1", ds.id, steps=8)
        done = ca.wait_state(job.id, (j.SUCCEEDED, j.FAILED, j.CANCELLED), timeout=300)
        assert done.state == j.SUCCEEDED, done.failure_reason
        assert claims(ca, job.id) == ["replica-a"]
        p_a = predict_when_served(ca, "fam", "T1", "good movie")

        # --- A busy with a long job (checkpoints every 5 steps); its dataset
        # was uploaded on A too.
        long_job = ca.create_job("long", "L", ds.id, steps=100000)
        assert first_log(ca, long_job.id, "claimed by replica replica-a") is not None

        # --- B starts on an empty data directory of its own and serves A's family.
        b, cb = own_replica(pb, dir_b, tiny_model, uri, "replica-b")
        p_b = predict_when_served(cb, "fam", "T1", "good movie")
        assert p_b.label == p_a.label
        for x, y in zip(p_b.scores, p_a.scores):
            assert abs(x - y) < 1e-4
        # A's dataset is readable on B (same record, bytes from PostgreSQL).
        assert cb.datasets.GetDataset(pb.datasets_pb2.GetDatasetRequest(dataset_id=ds.id)).dataset.id == ds.id

        # --- a task added on B (A is busy, so B runs it) is served by A.
        ds2 = cb.upload("s2", tsv_bytes(make_rows(40, seed=3)))
        add = cb.create_job("fam", "T2", ds2.id, steps=6, kind=j.ADD_TASK)
        fin = cb.wait_state(add.id, (j.SUCCEEDED, j.FAILED, j.CANCELLED), timeout=300)
        assert fin.state == j.SUCCEEDED, fin.failure_reason
        assert claims(cb, add.id) == ["replica-b"]
        q_b = predict_when_served(cb, "fam", "T2", "bad movie")
        q_a = predict_when_served(ca, "fam", "T2", "bad movie")
        assert q_a.label == q_b.label
        for x, y in zip(q_a.scores, q_b.scores):
            assert abs(x - y) < 1e-4

        # --- kill -9 A after a checkpoint of the long job; wipe its data
        # directory: B resumes the job from the checkpoint in PostgreSQL.
        saved = first_log(cb, long_job.id, "checkpoint saved at step")
        assert saved is not None, "the long job ended before its first checkpoint"
        a.kill9()
        shutil.rmtree(dir_a)
        resumed = first_log(cb, long_job.id, "resumed from step", timeout=120)
        assert resumed is not None, [e for e in cb.events(long_job.id, timeout=5)]
        saved_at = int(saved.log.message.split()[-1])
        step = int(resumed.log.message.split()[3])
        assert step >= saved_at > 0, (resumed.log.message, saved.log.message)
        assert claims_so_far(cb, long_job.id)[:1] == ["replica-a"]
        running = cb.wait_state(long_job.id, (j.RUNNING,), timeout=60)
        assert running.state == j.RUNNING
        # Its checkpoints are listed through B (from PostgreSQL), and B keeps writing them.
        assert first_log(cb, long_job.id, f"checkpoint saved at step {step + 5}", timeout=120) is not None
        cps = cb.jobs.ListJobCheckpoints(j.ListJobCheckpointsRequest(job_id=long_job.id), timeout=30)
        assert cps.checkpoints and cps.checkpoints[-1].step >= step, cps
        cb.jobs.CancelJob(j.CancelJobRequest(job_id=long_job.id), timeout=30)
        end = cb.wait_state(long_job.id, (j.SUCCEEDED, j.FAILED, j.CANCELLED), timeout=120)
        assert end.state == j.CANCELLED, end
        # B still serves both tasks.
        assert predict_when_served(cb, "fam", "T1", "good movie").label == p_a.label
    finally:
        a.stop()
        if b is not None:
            b.stop()
