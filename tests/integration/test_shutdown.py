"""Graceful shutdown on SIGTERM: the server stops accepting, lets the
Predicts it already accepted finish, ends event streams at once, stops the
running job between two steps (FAILED with a clear reason, since it has no
resumable checkpoint: --checkpoint_every_steps=0 here; test_job_resume.py
covers a job with one), exits 0, and restarts into a valid state: queued jobs
still run, published families still serve."""
import signal
import threading
import time

import grpc

from server_harness import Client, Server, make_rows, tsv_bytes

GRACE_MS = 30000


def big_request(inf, n=1024):
    return inf.PredictRequest(inputs=[
        inf.PredictInput(family="keep", task="K", text=f"good movie number {i} was very fine")
        for i in range(n)])


def test_sigterm_drains_predicts_and_fails_running_job_with_reason(pb, tmp_path, tiny_model):
    j = pb.jobs_pb2
    inf = pb.inference_pb2
    # One row per device batch, so a 1024-input Predict takes a while to drain.
    extra = ["--max_batch_size=1", "--max_queue=8192", f"--shutdown_grace_ms={GRACE_MS}",
             "--checkpoint_every_steps=0"]
    s = Server(tmp_path / "data", tiny_model, extra=extra).start()
    c = Client(pb, s.channel())
    ds = c.upload("d", tsv_bytes(make_rows(48)))
    first = c.create_job("keep", "K", ds.id, steps=6)
    assert c.wait_state(first.id, {j.SUCCEEDED, j.FAILED}).state == j.SUCCEEDED
    ref = c.inference.Predict(big_request(inf, 3), timeout=60).predictions

    long_job = c.create_job("long", "L", ds.id, steps=100000)
    queued = c.create_job("after", "A", ds.id, steps=4)  # waits behind the long one
    stream_end = {}

    def follow():
        n = 0
        try:
            for _ in c.jobs.StreamJobEvents(j.StreamJobEventsRequest(job_id=long_job.id),
                                            timeout=300):
                n += 1
        except grpc.RpcError as e:
            stream_end["error"] = e.code()
        stream_end["events"] = n
        stream_end["t"] = time.time()

    follower = threading.Thread(target=follow)
    follower.start()
    c.wait_state(long_job.id, {j.RUNNING})
    # Calibrate: how long one big Predict takes while the job trains.
    t0 = time.time()
    assert len(c.inference.Predict(big_request(inf), timeout=120).predictions) == 1024
    one = time.time() - t0

    futures = [c.inference.Predict.future(big_request(inf), timeout=120) for _ in range(4)]
    time.sleep(min(0.5, one * 0.3))
    assert not all(f.done() for f in futures), "Predicts finished before SIGTERM: calibrate"
    t_term = time.time()
    s.proc.send_signal(signal.SIGTERM)
    # New calls are refused while the accepted ones drain.
    time.sleep(0.3)
    fresh = grpc.insecure_channel(f"127.0.0.1:{s.port}")
    try:
        with __import__("pytest").raises(grpc.RpcError) as refused:
            inf_stub = pb.inference_pb2_grpc.InferenceServiceStub(fresh)
            inf_stub.Predict(big_request(inf, 1), timeout=5)
        draining = s.proc.poll() is None
    finally:
        fresh.close()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value

    for f in futures:  # every accepted Predict completes with all its answers
        preds = f.result(timeout=GRACE_MS / 1000 + 30).predictions
        assert len(preds) == 1024 and all(p.task == "K" for p in preds)
    rc = s.proc.wait(timeout=GRACE_MS / 1000 + 30)
    t_exit = time.time()
    follower.join(timeout=30)
    assert rc == 0, "\n".join(s.stderr_lines[-20:])
    assert draining, "the server had exited before the refused call: drain took no time"
    # The open event stream ended promptly instead of holding the shutdown for the grace.
    assert stream_end.get("events", 0) >= 3, stream_end
    assert stream_end["t"] - t_term < 10, stream_end
    assert t_exit - t_term < GRACE_MS / 1000, "shutdown waited the whole grace period"
    assert any("stopped" in line for line in s.stderr_lines), s.stderr_lines[-10:]

    s2 = Server(tmp_path / "data", tiny_model).start()
    try:
        c2 = Client(pb, s2.channel())
        job = c2.jobs.GetJob(j.GetJobRequest(job_id=long_job.id), timeout=10).job
        assert job.state == j.FAILED, job
        assert "shut down" in job.failure_reason and "signal 15" in job.failure_reason, job
        assert job.step > 0
        # The queued job survived the shutdown and runs now.
        assert c2.wait_state(queued.id, {j.SUCCEEDED, j.FAILED}).state == j.SUCCEEDED
        after = c2.inference.Predict(big_request(inf, 3), timeout=60).predictions
        for x, y in zip(after, ref):
            assert x.label == y.label
            assert max(abs(a - b) for a, b in zip(x.scores, y.scores)) < 1e-5
        states = {jj.state for jj in c2.jobs.ListJobs(j.ListJobsRequest(page_size=100)).jobs}
        assert states <= {j.SUCCEEDED, j.FAILED}, states
    finally:
        s2.stop()
    assert s2.proc.returncode == 0


def test_sigterm_when_idle_exits_zero_quickly(pb, tmp_path, tiny_model):
    s = Server(tmp_path / "data", tiny_model).start()
    Client(pb, s.channel())
    t0 = time.time()
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(timeout=30) == 0
    assert time.time() - t0 < 5
