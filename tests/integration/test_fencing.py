"""Issue 17 (hardening), hole 4, black-box: PostgreSQL leases are fenced.

Replica A reaches PostgreSQL through a small TCP proxy (below) that holds
every byte in both directions from the moment A's connection sends its
publication statement (the per-family advisory lock of
PostgresStore::PublishFamilyVersion): A pauses during publication, past its
lease. Replica B, direct to the database, takes the job over and fails it.
When the proxy lets A's traffic through again, A's publication and every
other write for the job carry A's stale fencing token (claim epoch) and are
refused: no family version appears, and the job ends once, as B decided.
While the store does not answer, A's health check says NOT_SERVING (store
statement timeout), and SERVING again after."""
import re
import socket
import threading
import time

import grpc

from server_harness import Client, Server, make_rows, tsv_bytes

LEASE_MS = 2000
PUBLISH_MARK = b"pg_advisory_xact_lock(hashtextextended"


class PausingProxy:
    """TCP relay to 127.0.0.1:`port`. pause_on: bytes that, seen in a client
    message, pause the relay (that message held too) until resume()."""

    def __init__(self, port, pause_on=None):
        self.port = port
        self.pause_on = pause_on
        self.paused = threading.Event()
        self.triggered = threading.Event()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.listen_port = self.sock.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.port))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src, dst, from_client):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if (from_client and self.pause_on and not self.triggered.is_set()
                        and self.pause_on in data):
                    self.triggered.set()
                    self.paused.set()
                while self.paused.is_set():
                    time.sleep(0.01)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def resume(self):
        self.paused.clear()

    def close(self):
        self.closed = True
        self.resume()
        self.sock.close()


def health(server):
    ch = server.channel()
    check = ch.unary_unary("/grpc.health.v1.Health/Check",
                           request_serializer=lambda b: b, response_deserializer=lambda b: b)
    r = check(b"", timeout=5)
    return {b"\x08\x01": "SERVING", b"\x08\x02": "NOT_SERVING"}.get(r, repr(r))


def wait_for(pred, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def replica(pb, shared_dir, model, uri, name):
    s = Server(shared_dir, model, extra=[
        f"--store={uri}", f"--replica_id={name}", f"--job_lease_ms={LEASE_MS}",
        "--job_poll_ms=100", "--registry_poll_ms=200"]).start()
    return s, Client(pb, s.channel())


def test_a_replica_paused_past_its_lease_during_publication_is_fenced(
        pb, tmp_path, tiny_model, postgres):
    j, ad = pb.jobs_pb2, pb.adapters_pb2
    uri = postgres.create_database("fenced")
    proxy = PausingProxy(postgres.port, pause_on=PUBLISH_MARK)
    via_proxy = re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{proxy.listen_port}", uri)
    shared = tmp_path / "shared"
    a, ca = replica(pb, shared, tiny_model, via_proxy, "replica-a")
    b = None
    try:
        ds = ca.upload("s", tsv_bytes(make_rows(40)))
        job = ca.create_job("fenced-fam", "T", ds.id, steps=6)
        # A (alone) claims and trains it, and pauses at its publication (A's
        # store calls now wait on the paused connection: ask B from here on).
        assert proxy.triggered.wait(120), "replica A never published"
        paused_at = time.time()
        # B starts and, past A's lease, takes the job over and fails it.
        b, cb = replica(pb, shared, tiny_model, uri, "replica-b")
        failed = cb.wait_state(job.id, {j.FAILED, j.SUCCEEDED, j.CANCELLED}, timeout=60)
        assert failed.state == j.FAILED, failed
        assert "replica replica-a stopped renewing its lease" in failed.failure_reason, \
            failed.failure_reason
        # The store does not answer A: A's health says so.
        wait_for(lambda: health(a) == "NOT_SERVING", 40, "A's health NOT_SERVING")
        print(f"A NOT_SERVING {time.time() - paused_at:.1f} s after the pause")
        assert health(b) == "SERVING"
        proxy.resume()
        wait_for(lambda: health(a) == "SERVING", 40, "A's health SERVING again")
        # A's publication and its writes were refused (stale token or timeout);
        # it never published, and the job ended once.
        time.sleep(3)
        for c in (ca, cb):
            with_code = None
            try:
                c.adapters.GetFamily(ad.GetFamilyRequest(family="fenced-fam"), timeout=10)
            except grpc.RpcError as e:
                with_code = e.code()
            assert with_code == grpc.StatusCode.NOT_FOUND, "the stale replica published"
        final = cb.jobs.GetJob(j.GetJobRequest(job_id=job.id)).job
        assert final.state == j.FAILED and final.failure_reason == failed.failure_reason
        states = [e.state.state for e in cb.events(job.id) if e.WhichOneof("event") == "state"]
        terminal = [s for s in states if s in (j.SUCCEEDED, j.FAILED, j.CANCELLED)]
        assert terminal == [j.FAILED], states
        log = "\n".join(a.stderr_lines)
        assert ("stale fencing token" in log or "statement timeout" in log), log[-3000:]
        print([line for line in a.stderr_lines if "fencing" in line or "timeout" in line][:6])
        # A is back: it trains and publishes again.
        again = ca.create_job("after-fence", "T", ds.id, steps=4)
        done = ca.wait_state(again.id, {j.SUCCEEDED, j.FAILED, j.CANCELLED}, timeout=300)
        assert done.state == j.SUCCEEDED, done.failure_reason
    finally:
        proxy.close()
        a.stop()
        if b is not None:
            b.stop()
