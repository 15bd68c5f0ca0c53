#!/usr/bin/env python3
"""Chaos run of the real metatt-server (issue 17, "Continuous assurance").

Several tenants (bearer tokens, one client thread each) send a mix of
uploads, training jobs, add-task jobs, Predicts and listings, while faults
are injected at seeded moments:

  kill9       SIGKILL the server, restart it on the same data directory
  sigterm     graceful stop (SIGTERM), restart
  disk_full   fill the data directory's file system (a tmpfs of --tmpfs_mb
              mounted for the run; root only, else this fault is skipped and
              the JSON says so) for a few seconds, then free it
  store_pause hold SQLite's write lock (BEGIN EXCLUSIVE from another process)
              for a few seconds: the embedded store stalls

After every restart and at the end, everything the server acknowledged is
checked: each uploaded dataset (GetDataset as its tenant, same sha256), each
job CreateJob answered (GetJob finds it), each family version a job
published (GetFamily lists it). Figures in the JSON: requests served (OK
answers), faults injected by kind, acknowledged objects lost or corrupt (must
be 0), jobs interrupted by a kill or SIGTERM and how they ended (resumed to
SUCCEEDED, FAILED with the reason), jobs left non-terminal at the end, errors
by gRPC code, unexpected server exits.

    nice -n 10 .venv/bin/python tests/chaos/chaos.py --minutes 30 --seed 1 \\
        --out bench/results/cpu-chaos/chaos.json

Uses a tiny random BERT (2 layers, hidden 32; as tests/integration's
tiny_model) so that jobs finish in seconds on the CPU, and a copy of
$METATT_BUILD_DIR/server/metatt-server (default build/) taken at the start.
Exit status 1 when anything acknowledged is lost or corrupt, or a job is
left non-terminal."""
import argparse
import collections
import hashlib
import json
import os
import pathlib
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "integration"))
sys.path.insert(0, str(ROOT / "tests" / "chaos"))


def sha256(b):
    return hashlib.sha256(b).hexdigest()


class Chaos:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.server = None
        self.generation = 0  # bumped at every restart
        self.channels = {}
        self.served = collections.Counter()   # rpc -> OK answers
        self.errors = collections.Counter()   # "RPC CODE" -> count
        self.faults = collections.Counter()
        self.fault_log = []
        self.skipped_faults = collections.Counter()
        self.datasets = {}   # id -> (tenant, sha256)
        self.jobs = {}       # id -> {"tenant", "kind", "family", "state", "interrupted"}
        self.versions = set()  # (tenant, family, version) published by a SUCCEEDED job
        self.families = collections.defaultdict(set)  # tenant -> families with a version
        self.lost = []
        self.corrupt = []
        self.unexpected_exits = 0
        self.checks = 0

    # ---- server ---------------------------------------------------------------------
    def start_server(self):
        from server_harness import Server
        extra = [f"--auth_tokens={self.tokens_file}", "--checkpoint_every_steps=5",
                 "--max_queued_jobs=64", "--shutdown_grace_ms=2000", "--num_threads=1"]
        s = Server(self.data, self.model, extra=extra)
        s.start(timeout=180)
        with self.lock:
            self.server = s
            self.generation += 1
            import grpc
            self.channels = {}
            for t, tok in self.tokens.items():
                from server_harness import with_token
                self.channels[t] = with_token(grpc.insecure_channel(f"127.0.0.1:{s.port}"), tok)
        return s

    def client(self, tenant):
        from server_harness import Client
        with self.lock:
            ch = self.channels.get(tenant)
        return Client(self.pb, ch) if ch is not None else None

    def call(self, name, fn):
        """Runs one RPC; counts it as served or as an error by code. None on error."""
        import grpc
        try:
            r = fn()
            with self.lock:
                self.served[name] += 1
            return r
        except grpc.RpcError as e:
            with self.lock:
                self.errors[f"{name} {e.code().name}"] += 1
            return None

    # ---- client threads ----------------------------------------------------------------
    def worker(self, tenant, seed):
        from server_harness import make_rows, tsv_bytes
        rng = random.Random(seed)
        j = self.pb.jobs_pb2
        inf = self.pb.inference_pb2
        k = 0
        while not self.stop.is_set():
            k += 1
            c = self.client(tenant)
            if c is None:
                time.sleep(0.2)
                continue
            with self.lock:
                mine_ds = [i for i, (t, _) in self.datasets.items() if t == tenant]
                fams = sorted(self.families[tenant])
                running = sum(1 for x in self.jobs.values()
                              if x["tenant"] == tenant and x["state"] not in TERMINAL)
            r = rng.random()
            if r < 0.25 or not mine_ds:
                raw = tsv_bytes(make_rows(rng.randint(16, 120), seed=rng.randint(0, 10 ** 6)))
                d = self.call("UploadDataset", lambda: c.upload(f"{tenant}-d{k}", raw, chunk=512))
                if d is not None:
                    with self.lock:
                        self.datasets[d.id] = (tenant, sha256(raw))
            elif r < 0.40 and running < 2:
                fam = f"f{rng.randint(0, 2)}"
                add = fam in fams and rng.random() < 0.6
                task = f"t{k}" if add else "t0"
                kind = j.ADD_TASK if add else j.TRAIN_FAMILY
                if not add and fam in fams:
                    time.sleep(0.1)
                    continue  # a family trains once; then tasks are added
                ds = rng.choice(mine_ds)
                job = self.call("CreateJob", lambda: c.create_job(
                    fam, task, ds, steps=rng.randint(150, 600), kind=kind, seed=rng.randint(1, 99)))
                if job is not None:
                    with self.lock:
                        self.jobs[job.id] = {"tenant": tenant, "kind": "add_task" if add else "train",
                                             "family": fam, "state": "QUEUED", "interrupted": 0,
                                             "reason": ""}
            elif r < 0.80 and fams:
                fam = rng.choice(fams)
                req = inf.PredictRequest(inputs=[
                    inf.PredictInput(family=fam, tasks=inf.TaskList(all=True),
                                     text=" ".join(rng.choice(["good", "bad", "movie", "plot"])
                                                   for _ in range(4)))])
                self.call("Predict", lambda: c.inference.Predict(req, timeout=30))
            else:
                self.call("ListJobs", lambda: c.jobs.ListJobs(j.ListJobsRequest(page_size=20),
                                                              timeout=30))
            time.sleep(rng.uniform(0.05, 0.3))

    def monitor_jobs(self):
        """Follows every job to its end; a SUCCEEDED job's version is acknowledged."""
        j = self.pb.jobs_pb2
        with self.lock:
            live = [(i, x["tenant"]) for i, x in self.jobs.items() if x["state"] not in TERMINAL]
        for job_id, tenant in live:
            c = self.client(tenant)
            if c is None:
                return
            got = self.call("GetJob", lambda: c.jobs.GetJob(j.GetJobRequest(job_id=job_id),
                                                            timeout=10).job)
            if got is None:
                continue
            state = j.JobState.Name(got.state)
            with self.lock:
                rec = self.jobs[job_id]
                rec["state"] = state
                rec["reason"] = got.failure_reason
                if state == "SUCCEEDED" and got.result_version > 0:
                    self.versions.add((tenant, got.result_family, got.result_version))
                    self.families[tenant].add(got.result_family)

    # ---- faults ---------------------------------------------------------------------
    def mark_running_interrupted(self):
        with self.lock:
            for x in self.jobs.values():
                if x["state"] in ("RUNNING", "VALIDATING", "QUEUED"):
                    x["interrupted"] += 1

    def restart(self, how):
        s = self.server
        with self.lock:
            self.channels = {}
        self.monitor_jobs_safe()
        self.mark_running_interrupted()
        if how == "kill9":
            s.kill9()
        else:
            s.proc.send_signal(signal.SIGTERM)
            try:
                s.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                s.kill9()
        self.start_server()
        self.check_acknowledged(f"after {how}")

    def monitor_jobs_safe(self):
        try:
            self.monitor_jobs()
        except Exception as e:  # noqa: BLE001 - a fault mid-call
            print("monitor:", e, flush=True)

    def disk_full(self, hold):
        if not self.tmpfs:
            self.skipped_faults["disk_full"] += 1
            return False
        filler = self.data / "chaos-filler"
        st = os.statvfs(self.data)
        free = st.f_bavail * st.f_frsize
        try:
            with open(filler, "wb") as f:
                chunk = b"\0" * (1 << 20)
                for _ in range(free // len(chunk) + 1):
                    f.write(chunk)
        except OSError:
            pass  # ENOSPC: full
        time.sleep(hold)
        filler.unlink(missing_ok=True)
        return True

    def store_pause(self, hold):
        db = sqlite3.connect(str(self.data / "metatt.db"), timeout=30, isolation_level=None)
        try:
            db.execute("BEGIN EXCLUSIVE")
            time.sleep(hold)
            db.execute("ROLLBACK")
        finally:
            db.close()

    # ---- checks ---------------------------------------------------------------------
    def check_acknowledged(self, when):
        import grpc
        d, j, ad = self.pb.datasets_pb2, self.pb.jobs_pb2, self.pb.adapters_pb2
        self.checks += 1
        with self.lock:
            datasets = dict(self.datasets)
            jobs = {i: x["tenant"] for i, x in self.jobs.items()}
            versions = set(self.versions)
        for ds_id, (tenant, digest) in datasets.items():
            c = self.client(tenant)
            try:
                got = c.datasets.GetDataset(d.GetDatasetRequest(dataset_id=ds_id), timeout=30).dataset
            except grpc.RpcError as e:
                self.lost.append({"when": when, "dataset": ds_id, "code": e.code().name,
                                  "error": e.details()})
                continue
            files = list((self.data / "datasets" / ds_id).glob("data.*"))
            if got.sha256 != digest or not files or sha256(files[0].read_bytes()) != digest:
                self.corrupt.append({"when": when, "dataset": ds_id})
        for job_id, tenant in jobs.items():
            c = self.client(tenant)
            try:
                c.jobs.GetJob(j.GetJobRequest(job_id=job_id), timeout=30)
            except grpc.RpcError as e:
                self.lost.append({"when": when, "job": job_id, "code": e.code().name})
        by_family = collections.defaultdict(set)
        for tenant, fam, v in versions:
            by_family[(tenant, fam)].add(v)
        for (tenant, fam), vs in by_family.items():
            c = self.client(tenant)
            try:
                f = c.adapters.GetFamily(ad.GetFamilyRequest(family=fam), timeout=30).family
                have = {x.version for x in f.versions}
            except grpc.RpcError as e:
                have = set()
                print(f"GetFamily {fam}: {e.code().name} {e.details()}", flush=True)
            for v in sorted(vs - have):
                self.lost.append({"when": when, "family": fam, "tenant": tenant, "version": v})

    # ---- the run --------------------------------------------------------------------
    def run(self):
        import grpc  # noqa: F401
        from server_harness import WORDS, load_stubs, write_tiny_bert

        a = self.args
        self.work = pathlib.Path(tempfile.mkdtemp(prefix="metatt-chaos-"))
        self.pb = load_stubs(self.work / "stubs")
        src = pathlib.Path(os.environ.get("METATT_BUILD_DIR", ROOT / "build")) / "server" / "metatt-server"
        (self.work / "bin" / "server").mkdir(parents=True)
        shutil.copy2(src, self.work / "bin" / "server" / "metatt-server")
        self.binary = {"path": str(src), "sha256": sha256(src.read_bytes())[:16],
                       "modified_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(src.stat().st_mtime)),
                       "git_head": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                                  capture_output=True, text=True).stdout.strip()}
        os.environ["METATT_BUILD_DIR"] = str(self.work / "bin")
        self.model = write_tiny_bert(self.work / "model", WORDS)
        self.data = self.work / "data"
        self.data.mkdir()
        self.tmpfs = False
        if a.tmpfs_mb > 0 and os.geteuid() == 0:
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={a.tmpfs_mb}m", "tmpfs",
                                str(self.data)], capture_output=True, text=True)
            self.tmpfs = r.returncode == 0
            if not self.tmpfs:
                print("tmpfs mount failed (disk_full skipped):", r.stderr.strip(), flush=True)
        self.tokens = {f"tenant{i}": f"chaos-token-{i}-{a.seed}-0123456789" for i in range(a.tenants)}
        cfg = {"tokens": [{"tenant": t, "role": "user", "token_sha256": sha256(tok.encode())}
                          for t, tok in self.tokens.items()]}
        self.tokens_file = self.work / "tokens.json"
        self.tokens_file.write_text(json.dumps(cfg))

        t_start = time.time()
        self.start_server()
        threads = [threading.Thread(target=self.worker, args=(t, a.seed * 1000 + i), daemon=True)
                   for i, t in enumerate(self.tokens)]
        for t in threads:
            t.start()
        end = t_start + a.minutes * 60
        next_fault = time.time() + self.rng.uniform(a.min_gap, a.max_gap)
        kinds = ["kill9", "sigterm", "disk_full", "store_pause"]
        weights = [0.35, 0.25, 0.2, 0.2]
        while time.time() < end:
            time.sleep(1.0)
            if self.server.proc.poll() is not None:  # died on its own: a finding
                self.unexpected_exits += 1
                print("server exited unexpectedly:\n" + "\n".join(self.server.stderr_lines[-20:]),
                      flush=True)
                self.mark_running_interrupted()
                self.start_server()
                self.check_acknowledged("after an unexpected exit")
                continue
            self.monitor_jobs_safe()
            if time.time() < next_fault:
                continue
            kind = self.rng.choices(kinds, weights)[0]
            hold = round(self.rng.uniform(2, 8), 1)
            at = round(time.time() - t_start, 1)
            print(f"[{at:7.1f}s] fault {kind}" + (f" ({hold} s)" if kind in ("disk_full", "store_pause") else ""),
                  flush=True)
            if kind in ("kill9", "sigterm"):
                self.restart(kind)
                done = True
            elif kind == "disk_full":
                done = self.disk_full(hold)
            else:
                self.store_pause(hold)
                done = True
            if done:
                self.faults[kind] += 1
                self.fault_log.append({"t": at, "kind": kind,
                                       **({"hold_s": hold} if kind in ("disk_full", "store_pause") else {})})
            next_fault = time.time() + self.rng.uniform(a.min_gap, a.max_gap)

        # Drain: no new requests; jobs get --drain_s to finish.
        self.stop.set()
        for t in threads:
            t.join(timeout=60)
        deadline = time.time() + a.drain_s
        while time.time() < deadline:
            self.monitor_jobs_safe()
            with self.lock:
                if all(x["state"] in TERMINAL for x in self.jobs.values()):
                    break
            time.sleep(2)
        # The final check, after one more restart (nothing in memory helps).
        self.restart("sigterm")
        self.monitor_jobs_safe()
        self.server.stop()
        wall = time.time() - t_start
        return self.report(wall)

    def report(self, wall):
        with self.lock:
            jobs = list(self.jobs.values())
        interrupted = [x for x in jobs if x["interrupted"]]
        ends = collections.Counter(x["state"] for x in jobs)
        out = {
            "seed": self.args.seed, "minutes_requested": self.args.minutes,
            "wall_seconds": round(wall, 1), "tenants": self.args.tenants,
            "model": "random tiny BERT (2 layers, hidden 32), CPU",
            "binary": self.binary,
            "requests_served": sum(self.served.values()),
            "served_by_rpc": dict(sorted(self.served.items())),
            "faults_injected": sum(self.faults.values()),
            "faults_by_kind": dict(self.faults),
            "faults_skipped": dict(self.skipped_faults),
            "disk_full_on_tmpfs_mb": self.args.tmpfs_mb if self.tmpfs else None,
            "acknowledged": {"datasets": len(self.datasets), "jobs": len(jobs),
                             "family_versions": len(self.versions)},
            "acknowledged_lost": len(self.lost), "acknowledged_corrupt": len(self.corrupt),
            "lost": self.lost[:50], "corrupt": self.corrupt[:50],
            "acknowledged_checks": self.checks,
            "jobs_by_end_state": dict(ends),
            "jobs_interrupted_by_a_restart": len(interrupted),
            "jobs_resumed_to_success": sum(1 for x in interrupted if x["state"] == "SUCCEEDED"),
            "jobs_interrupted_failed": sum(1 for x in interrupted if x["state"] == "FAILED"),
            "failure_reasons": collections.Counter(
                _reason(x["reason"]) for x in jobs if x["state"] == "FAILED").most_common(12),
            "jobs_non_terminal_at_end": sum(1 for x in jobs if x["state"] not in TERMINAL),
            "errors_by_code": dict(sorted(self.errors.items())),
            "unexpected_server_exits": self.unexpected_exits,
            "fault_log": self.fault_log,
        }
        return out

    def cleanup(self):
        if getattr(self, "tmpfs", False):
            subprocess.run(["umount", str(self.data)], capture_output=True)
        shutil.rmtree(getattr(self, "work", "/nonexistent"), ignore_errors=True)


TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}


def _reason(text):
    """A failure reason without its paths, ids and numbers (for counting)."""
    import re
    text = re.sub(r"/\S+", "<path>", text.split(";")[0])
    text = re.sub(r"\b(job|ds)_[0-9a-f]+", "<id>", text)
    return re.sub(r"\d+", "N", text)[:120]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tenants", type=int, default=3)
    ap.add_argument("--min_gap", type=float, default=15, help="seconds between faults, at least")
    ap.add_argument("--max_gap", type=float, default=45, help="... and at most")
    ap.add_argument("--tmpfs_mb", type=int, default=256, help="data dir tmpfs (root; 0 = none)")
    ap.add_argument("--drain_s", type=float, default=180, help="time for jobs to end after the run")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    c = Chaos(args)
    try:
        rep = c.run()
    finally:
        if c.server is not None and c.server.proc and c.server.proc.poll() is None:
            c.server.kill9()
        c.cleanup()
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rep, indent=1) + "\n")
    print(json.dumps({k: v for k, v in rep.items() if k not in ("fault_log", "lost", "corrupt")},
                     indent=1))
    bad = rep["acknowledged_lost"] or rep["acknowledged_corrupt"] or rep["jobs_non_terminal_at_end"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
