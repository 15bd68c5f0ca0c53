"""Debian's real `prometheus` scrapes a running metatt-server.

The scrape config is deploy/prometheus/prometheus.yml with only the target
(the test server's loopback metrics port) and the intervals (1 s) rewritten;
deploy/prometheus/alerts.yml stays loaded, so Prometheus evaluates every alert
rule against our live series and reports an evaluation error if one is broken.
After real requests (upload, train, predict) the test queries Prometheus's
HTTP API and checks that our counters, gauges and histograms moved."""
import json
import pathlib
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from server_harness import ROOT, Client, Server, make_rows, stop_process, tsv_bytes

DEPLOY = ROOT / "deploy" / "prometheus"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    def __init__(self, workdir: pathlib.Path, target: str, password_file=None):
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus not installed (Debian package `prometheus`; scripts/setup.sh)")
        cfg = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
        cfg["global"]["scrape_interval"] = "1s"
        cfg["global"]["evaluation_interval"] = "1s"
        cfg["rule_files"] = [str(DEPLOY / f) for f in cfg["rule_files"]]  # ours, unchanged
        jobs = [j for j in cfg["scrape_configs"] if j["job_name"] == "metatt"]
        assert len(jobs) == 1, "deploy/prometheus/prometheus.yml: no scrape job 'metatt'"
        jobs[0]["static_configs"] = [{"targets": [target]}]
        # The shipped config authenticates (basic_auth, README "Security"): only
        # the password file's path moves here.
        assert jobs[0]["basic_auth"]["password_file"], "the scrape job must authenticate"
        if password_file is not None:
            jobs[0]["basic_auth"]["password_file"] = str(password_file)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        self.port = free_port()
        self.log = open(workdir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.workdir = workdir

    def api(self, path, **params):
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def wait(self, what, predicate, timeout=60):
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            if self.proc.poll() is not None:
                pytest.fail("prometheus exited:\n" + self.logtail())
            try:
                last = predicate()
                if last:
                    return last
            except (OSError, AssertionError) as e:  # not listening yet
                last = e
            time.sleep(0.25)
        pytest.fail(f"prometheus: timed out waiting for {what} (last: {last})\n" + self.logtail())

    def query(self, expr):
        """Instant vector -> {frozenset(labels): value}."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return {frozenset((k, v) for k, v in r["metric"].items() if k != "__name__"):
                float(r["value"][1]) for r in data["result"]}

    def scalar(self, expr):
        v = self.query(expr)
        return next(iter(v.values())) if len(v) == 1 else None

    def logtail(self):
        self.log.flush()
        return "\n".join((self.workdir / "prometheus.log").read_text().splitlines()[-20:])

    def stop(self):
        if self.proc.poll() is None:
            stop_process(self.proc, 20)
        self.log.close()


def test_prometheus_scrapes_server_and_sees_requests(pb, tmp_path, tiny_model):
    j = pb.jobs_pb2
    inf = pb.inference_pb2
    password = tmp_path / "metrics-password"
    password.write_text("prometheus-test-password-0123\n")
    server = Server(tmp_path / "data", tiny_model,
                    extra=[f"--metrics_password_file={password}"]).start()
    assert server.metrics_port, "server printed no METRICS line"
    prom = Prometheus(tmp_path / "prom", f"127.0.0.1:{server.metrics_port}",
                      password_file=password)
    try:
        def target_up():
            active = prom.api("targets")["activeTargets"]
            up = [t for t in active if t["labels"].get("job") == "metatt" and t["health"] == "up"]
            return up or None
        prom.wait("the metatt target to be up", target_up)
        # Our rule file is loaded and every rule evaluates without error.
        def rules_evaluated():
            groups = prom.api("rules")["groups"]
            rules = [r for g in groups for r in g["rules"]]
            if not rules or any(r.get("health") == "unknown" for r in rules):
                return None
            return rules
        rules = prom.wait("the alert rules to be evaluated", rules_evaluated)
        ours = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
        expected = {r["alert"] for g in ours["groups"] for r in g["rules"]}
        assert {r["name"] for r in rules} == expected
        bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
        assert not bad, bad
        assert prom.scalar('up{job="metatt"}') == 1.0

        # Baseline as Prometheus sees it, before any request.
        def scraped(expr):
            return lambda: prom.query(expr) or None
        prom.wait("metatt_jobs", scraped('metatt_jobs{state="SUCCEEDED"}'))
        assert prom.scalar('metatt_jobs{state="SUCCEEDED"}') == 0.0
        assert prom.scalar("metatt_job_steps_total") == 0.0
        assert prom.scalar("metatt_predict_latency_seconds_count") == 0.0

        # Real requests: upload, train a family, predict (one good, one bad).
        c = Client(pb, server.channel())
        ds = c.upload("prom", tsv_bytes(make_rows(48)))
        job = c.create_job("promfam", "P", ds.id, steps=12)
        done = c.wait_state(job.id, {j.SUCCEEDED, j.FAILED, j.CANCELLED}, timeout=300)
        assert done.state == j.SUCCEEDED, done.failure_reason
        n_ok = 5
        for i in range(n_ok):
            c.inference.Predict(inf.PredictRequest(inputs=[
                inf.PredictInput(family="promfam", task="P", text=f"good movie {i}")]), timeout=60)
        import grpc
        with pytest.raises(grpc.RpcError) as err:
            c.inference.Predict(inf.PredictRequest(inputs=[
                inf.PredictInput(family="no-such-family", task="P", text="x")]), timeout=60)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

        # Prometheus sees the counters move (after its next scrapes).
        prom.wait("predict OK counter", lambda: prom.scalar(
            'metatt_predict_requests_total{code="OK"}') == n_ok)
        prom.wait("predict NOT_FOUND counter", lambda: prom.scalar(
            'metatt_predict_requests_total{code="NOT_FOUND"}') == 1)
        prom.wait("job gauges", lambda: prom.scalar('metatt_jobs{state="SUCCEEDED"}') == 1)
        assert prom.scalar('metatt_jobs{state="RUNNING"}') == 0
        assert prom.scalar("metatt_job_steps_total") == 12
        assert prom.scalar("metatt_predict_latency_seconds_count") == n_ok + 1
        assert prom.scalar("metatt_predict_latency_seconds_sum") > 0
        assert prom.scalar("metatt_batch_size_count") >= n_ok
        assert prom.scalar("metatt_train_loss") > 0
        prom.wait("adapter parameters gauge (sampled every 2 s)",
                  lambda: (prom.scalar('metatt_adapter_parameters{family="promfam"}') or 0) > 0)
        prom.wait("resident tasks gauge", lambda: (prom.scalar("metatt_tasks_resident") or 0) >= 1)
        # A dashboard-style query over the histogram works end to end.
        p99 = prom.scalar("histogram_quantile(0.99, sum by (le) "
                          "(increase(metatt_predict_latency_seconds_bucket[1m])))")
        assert p99 is not None and 0 < p99 <= 5, p99
    finally:
        prom.stop()
        server.stop()
