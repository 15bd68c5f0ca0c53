"""Issue 17 hole 9: a job killed mid-way (kill -9) resumes from its last
checkpoint on restart, SUCCEEDS, and publishes exactly the tensors an
uninterrupted run with the same seed publishes (bitwise, CPU)."""
import pathlib
import subprocess
import sys

import grpc
from safetensors.numpy import load_file

from server_harness import ROOT, Client, Server, build_dir, make_rows, tsv_bytes

STEPS = 120
EVERY = 5


def _published_tensors(data_dir: pathlib.Path, family: str):
    files = sorted((data_dir / "families").rglob("*.safetensors"))
    files = [f for f in files if family in f.parts]
    assert files, f"no published tensors of {family} under {data_dir}"
    out = {}
    for f in files:
        for k, v in load_file(str(f)).items():
            out[f"{f.name}:{k}"] = v
    return out


def _logs(events):
    return [e.log.message for e in events if e.WhichOneof("event") == "log"]


def _first_checkpoint(c, j, job_id):
    """Follows the job's events to its first 'checkpoint saved at step K' log
    and returns K (None when the job ended without one)."""
    for e in c.jobs.StreamJobEvents(j.StreamJobEventsRequest(job_id=job_id), timeout=300):
        if e.WhichOneof("event") == "log" and e.log.message.startswith("checkpoint saved at step"):
            return int(e.log.message.split()[-1])
    return None


def _succeeds(c, j, job_id):
    """Waits for the job to end, asserts it SUCCEEDED and returns its log lines."""
    done = c.wait_state(job_id, (j.SUCCEEDED, j.FAILED, j.CANCELLED), timeout=300)
    assert done.state == j.SUCCEEDED, done.failure_reason
    return _logs(c.events(job_id, timeout=60))


def test_kill9_mid_job_resumes_and_matches_uninterrupted_run(pb, tmp_path, tiny_model):
    j = pb.jobs_pb2
    flags = [f"--checkpoint_every_steps={EVERY}", "--num_threads=1"]
    data = tsv_bytes(make_rows(64))

    # Killed at its first checkpoint, then restarted.
    s = Server(tmp_path / "a", tiny_model, extra=flags).start()
    c = Client(pb, s.channel())
    ds = c.upload("s", data)
    job = c.create_job("resumed", "T", ds.id, steps=STEPS, seed=3)
    killed_after = _first_checkpoint(c, j, job.id)
    assert killed_after is not None, "no checkpoint event before the job ended"
    s.kill9()

    s2 = Server(tmp_path / "a", tiny_model, extra=flags).start()
    try:
        c2 = Client(pb, s2.channel())
        logs = _succeeds(c2, j, job.id)
        resumed = [m for m in logs if m.startswith("resumed from step")]
        assert len(resumed) == 1, logs
        step = int(resumed[0].split()[3])
        assert EVERY <= step < STEPS and step >= killed_after, resumed
        # Listed checkpoints: the newest two, with the step's loss.
        cps = c2.jobs.ListJobCheckpoints(j.ListJobCheckpointsRequest(job_id=job.id), timeout=30)
        assert [cp.step for cp in cps.checkpoints] == sorted(cp.step for cp in cps.checkpoints)
        assert cps.checkpoints and cps.checkpoints[-1].step <= STEPS
        assert all("loss" in cp.metrics for cp in cps.checkpoints)
        # metattctl jobs checkpoints ID: the same list as a table.
        ctl = subprocess.run([str(build_dir() / "client" / "metattctl"),
                              f"--server=127.0.0.1:{s2.port}", "jobs", "checkpoints", job.id],
                             capture_output=True, text=True, timeout=60)
        assert ctl.returncode == 0, ctl.stderr
        lines = ctl.stdout.strip().splitlines()
        assert lines[0].split() == ["STEP", "TIME", "METRICS"], ctl.stdout
        assert [ln.split()[0] for ln in lines[1:]] == [
            f"{cp.step}/{STEPS}" for cp in cps.checkpoints], ctl.stdout
        # The HTTP gateway: OpenAI's fine_tuning.job.checkpoint objects, newest
        # first, read with the official client.
        import openai
        from http_harness import Gateway
        gw = Gateway(s2.port).start()
        try:
            oa = openai.OpenAI(base_url=gw.url, api_key="unused", max_retries=0, timeout=60)
            page = oa.fine_tuning.jobs.checkpoints.list(job.id)
            got = [(cp.step_number, cp.metrics.step, cp.fine_tuning_job_id, cp.object)
                   for cp in page.data]
            assert got == [(cp.step, cp.step, job.id, "fine_tuning.job.checkpoint")
                           for cp in reversed(cps.checkpoints)], got
            assert page.data[0].id == f"ftckpt-{job.id}-{cps.checkpoints[-1].step}"
            assert page.data[0].metrics.train_loss == cps.checkpoints[-1].metrics["loss"]
        finally:
            gw.stop()
        # The Python client (client/python).
        sys.path.insert(0, str(ROOT / "client" / "python"))
        from metatt_client import Client as PyClient
        py = PyClient(f"127.0.0.1:{s2.port}", timeout=60)
        assert [cp.step for cp in py.list_checkpoints(job.id)] == [
            cp.step for cp in cps.checkpoints]
        # An unknown job: NOT_FOUND.
        try:
            c2.jobs.ListJobCheckpoints(j.ListJobCheckpointsRequest(job_id="job-nope"), timeout=30)
            raise AssertionError("ListJobCheckpoints of an unknown job succeeded")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND, e
    finally:
        s2.stop()

    # The same job, uninterrupted, in another data directory.
    s3 = Server(tmp_path / "b", tiny_model, extra=flags).start()
    try:
        c3 = Client(pb, s3.channel())
        ds3 = c3.upload("s", data)
        whole = c3.create_job("resumed", "T", ds3.id, steps=STEPS, seed=3)
        assert not any(m.startswith("resumed") for m in _succeeds(c3, j, whole.id))
    finally:
        s3.stop()

    a = _published_tensors(tmp_path / "a", "resumed")
    b = _published_tensors(tmp_path / "b", "resumed")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), f"{k} differs after the resume"


def test_sigterm_leaves_a_checkpointed_job_to_resume(pb, tmp_path, tiny_model):
    """A deploy (SIGTERM) of a server whose job has a checkpoint: the job is
    not failed; the next start resumes it and it SUCCEEDS."""
    j = pb.jobs_pb2
    flags = [f"--checkpoint_every_steps={EVERY}", "--num_threads=1"]
    s = Server(tmp_path / "a", tiny_model, extra=flags).start()
    c = Client(pb, s.channel())
    ds = c.upload("s", tsv_bytes(make_rows(64)))
    job = c.create_job("deployed", "T", ds.id, steps=STEPS, seed=3)
    assert _first_checkpoint(c, j, job.id) is not None, "no checkpoint event before the job ended"
    s.stop()
    assert s.proc.returncode == 0
    s2 = Server(tmp_path / "a", tiny_model, extra=flags).start()
    try:
        c2 = Client(pb, s2.channel())
        logs = _succeeds(c2, j, job.id)
        assert any(m.startswith("server shut down; the job resumes") for m in logs), logs
        assert sum(m.startswith("resumed from step") for m in logs) == 1, logs
    finally:
        s2.stop()
