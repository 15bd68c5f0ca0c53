"""Crash consistency: kill -9 the server at seeded random moments (during
uploads, during training, around checkpoint write and publication) over
several rounds; after every restart check that

* every dataset the server acknowledged is listed with the same sha256 and its
  file on disk hashes to it (and every listed dataset has its file);
* every family version the server acknowledged (its job SUCCEEDED) is listed,
  its files hash as before, and it predicts exactly as before; every listed
  version loads (Predict works for each of its tasks);
* every job is in a valid state: FAILED/CANCELLED ones carry a reason, a job
  that was running when killed is FAILED with the restart reason at once, no
  job stays non-terminal (they run to the end after the restart), a SUCCEEDED
  job's family version exists and every published version's job SUCCEEDED;
* no half-written file (.tmp*) is left in datasets/ or families/.

METATT_CRASH_ROUNDS (default 6) and METATT_CRASH_SEED set the rounds and the
seed; the soak command runs many more rounds, e.g.
    METATT_CRASH_ROUNDS=100 .venv/bin/python -m pytest -q tests/integration/test_crash_consistency.py
"""
import hashlib
import os
import pathlib
import random
import threading
import time

import grpc

from server_harness import Client, Server, make_rows, tsv_bytes

ROUNDS = int(os.environ.get("METATT_CRASH_ROUNDS", "6"))
SEED = int(os.environ.get("METATT_CRASH_SEED", "9091"))
MODES = ("upload", "train", "publish", "add_task_publish")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dir_hashes(d: pathlib.Path):
    return {p.name: sha256(p.read_bytes()) for p in sorted(d.iterdir()) if p.is_file()}


class Ledger:
    """What the server acknowledged before each kill."""

    def __init__(self):
        self.lock = threading.Lock()
        self.datasets = {}   # id -> sha256 (server's answer == our bytes)
        self.versions = {}   # (family, version) -> {"files": {...}, "preds": {task: scores}}
        self.in_flight = set()  # jobs seen RUNNING and not finished when killed
        self.jobs = {}       # id -> family kind


def all_jobs(c, pb):
    j = pb.jobs_pb2
    out, token = [], ""
    while True:
        r = c.jobs.ListJobs(j.ListJobsRequest(page_size=100, page_token=token), timeout=10)
        out += list(r.jobs)
        token = r.next_page_token
        if not token:
            return out


def family_versions(c, pb):
    a = pb.adapters_pb2
    out = {}
    for f in c.adapters.ListFamilies(a.ListFamiliesRequest(), timeout=10).families:
        fam = c.adapters.GetFamily(a.GetFamilyRequest(family=f.name), timeout=10).family
        for v in fam.versions:
            out[(fam.name, v.version)] = v
    return out


def predict_scores(c, pb, family, version, tasks):
    inf = pb.inference_pb2
    req = inf.PredictRequest(inputs=[
        inf.PredictInput(family=family, version=version, task=t, text="good film was great")
        for t in tasks])
    preds = c.inference.Predict(req, timeout=30).predictions
    return {p.task: list(p.scores) for p in preds}


def record_version(c, pb, data_dir, ledger, family, version):
    """A SUCCEEDED job's version: hash its files, remember its predictions."""
    key = (family, version)
    with ledger.lock:
        if key in ledger.versions:
            return
    vdir = data_dir / "families" / family / f"v{version}"
    entry = {"files": dir_hashes(vdir), "preds": None}
    try:
        v = family_versions(c, pb)[key]
        entry["preds"] = predict_scores(c, pb, family, version, [t.name for t in v.tasks])
    except (grpc.RpcError, KeyError):
        pass  # killed meanwhile: the predictions are recorded after the restart
    with ledger.lock:
        ledger.versions.setdefault(key, entry)


def check_after_restart(c, pb, data_dir: pathlib.Path, ledger: Ledger, label: str):
    j = pb.jobs_pb2
    problems = []
    # ---- datasets
    listed = {d.id: d for d in c.datasets.ListDatasets(
        pb.datasets_pb2.ListDatasetsRequest(), timeout=10).datasets}
    for ds_id, sha in ledger.datasets.items():
        if ds_id not in listed:
            problems.append(f"acknowledged dataset {ds_id} lost")
        elif listed[ds_id].sha256 != sha:
            problems.append(f"dataset {ds_id}: sha256 {listed[ds_id].sha256} != acknowledged {sha}")
    for ds_id, d in listed.items():
        f = data_dir / "datasets" / ds_id / "data.tsv"
        if not f.is_file():
            problems.append(f"listed dataset {ds_id} has no file {f}")
        elif sha256(f.read_bytes()) != d.sha256 or f.stat().st_size != d.size_bytes:
            problems.append(f"listed dataset {ds_id}: file does not hash to its sha256")
    # ---- no half-written files
    for sub in ("datasets", "families"):
        root = data_dir / sub
        if root.exists():
            left = [str(p.relative_to(data_dir)) for p in root.rglob("*") if ".tmp" in p.name]
            if left:
                problems.append(f"half-written files left after restart: {left}")
    # ---- jobs, right after the restart
    jobs = {x.id: x for x in all_jobs(c, pb)}
    for jid in ledger.in_flight:
        x = jobs.get(jid)
        if x is None:
            problems.append(f"job {jid} lost")
        elif x.state == j.FAILED:
            if "restart" not in x.failure_reason:
                problems.append(f"job {jid} FAILED without the restart reason: {x.failure_reason!r}")
        elif x.state not in (j.QUEUED, j.VALIDATING, j.RUNNING, j.SUCCEEDED):  # resumed
            problems.append(f"job {jid} was running when killed, now {j.JobState.Name(x.state)}")
    ledger.in_flight.clear()
    # Nothing stays stuck: non-terminal jobs (queued before the kill) run to the end.
    deadline = time.time() + 120
    while any(x.state not in (j.SUCCEEDED, j.FAILED, j.CANCELLED) for x in jobs.values()):
        if time.time() > deadline:
            stuck = [(x.id, j.JobState.Name(x.state)) for x in jobs.values()
                     if x.state not in (j.SUCCEEDED, j.FAILED, j.CANCELLED)]
            problems.append(f"jobs stuck after restart: {stuck}")
            break
        time.sleep(0.2)
        jobs = {x.id: x for x in all_jobs(c, pb)}
    versions = family_versions(c, pb)
    for x in jobs.values():
        if x.state in (j.FAILED, j.CANCELLED) and not x.failure_reason:
            problems.append(f"job {x.id} {j.JobState.Name(x.state)} without a reason")
        if x.state == j.SUCCEEDED:
            key = (x.result_family, x.result_version)
            if key not in versions:
                problems.append(f"SUCCEEDED job {x.id}: its version {key} is not listed")
            else:
                record_version(c, pb, data_dir, ledger, *key)
    for key, v in versions.items():
        owner = jobs.get(v.created_by_job)
        if v.created_by_job and (owner is None or owner.state != j.SUCCEEDED):
            state = j.JobState.Name(owner.state) if owner else "missing"
            reason = owner.failure_reason if owner else ""
            problems.append(f"version {key} published by job {v.created_by_job}, which is "
                            f"{state} ({reason!r})")
    # ---- families: acknowledged ones intact, every listed one loads
    for key, v in versions.items():
        vdir = data_dir / "families" / key[0] / f"v{key[1]}"
        # A full version has family.json; an add-task's appended version
        # appended.json (the registry's catalog: server/registry/family_catalog.h).
        has_meta = (vdir / "family.json").is_file() or (vdir / "appended.json").is_file()
        if not has_meta or not list(vdir.glob("*.safetensors")):
            problems.append(f"listed version {key} has no files in {vdir}")
            continue
        try:
            preds = predict_scores(c, pb, key[0], key[1], [t.name for t in v.tasks])
        except grpc.RpcError as e:
            problems.append(f"listed version {key} does not serve: {e.code()} {e.details()}")
            continue
        want = ledger.versions.get(key)
        if want is None:
            continue
        if key not in versions:
            problems.append(f"acknowledged version {key} lost")
            continue
        # Compaction may later add the full files of an appended version; the
        # acknowledged files themselves never change.
        now = dir_hashes(vdir)
        if any(now.get(name) != h for name, h in want["files"].items()):
            problems.append(f"version {key}: files changed since it was acknowledged")
        if want["preds"] is None:
            want["preds"] = preds
        elif any(max(abs(a - b) for a, b in zip(preds[t], want["preds"][t])) > 1e-5
                 for t in want["preds"]):
            problems.append(f"version {key}: predictions changed")
    for key in ledger.versions:
        if key not in versions:
            problems.append(f"acknowledged version {key} lost")
    assert not problems, f"after {label}:\n" + "\n".join(problems)


def run_round(c, pb, data_dir, ledger, rng, rnd, server):
    """Starts uploads and a job, kills the server -9 at a random moment of
    the round's mode. Returns what was happening at the kill."""
    j = pb.jobs_pb2
    mode = MODES[rnd % len(MODES)] if rnd < len(MODES) else rng.choice(MODES)
    stop = threading.Event()
    urng = random.Random(rng.random())  # the upload thread's own

    def uploads():
        k = 0
        while not stop.is_set():
            data = tsv_bytes(make_rows(urng.randint(20, 600), seed=urng.random()))
            try:
                d = c.upload(f"r{rnd}-{k}", data, chunk=urng.choice([64, 512, 4096]))
            except grpc.RpcError:
                return  # killed: not acknowledged
            assert d.sha256 == sha256(data), "server's sha256 differs from the uploaded bytes"
            with ledger.lock:
                ledger.datasets[d.id] = d.sha256
            k += 1

    up = threading.Thread(target=uploads)
    up.start()
    # A job: a new family, or a task added to a family published before.
    ds_id = None
    deadline = time.time() + 30
    while ds_id is None and time.time() < deadline:
        with ledger.lock:
            ds_id = next(iter(ledger.datasets), None)
        time.sleep(0.02)
    assert ds_id, "no dataset acknowledged"
    steps = rng.randint(15, 60)
    with ledger.lock:
        bases = sorted({f for (f, _), _ in ledger.versions.items()})
    if mode == "add_task_publish" and bases:
        spec = j.JobSpec(family=rng.choice(bases), kind=j.ADD_TASK,
                         tasks=[j.JobTask(task_name=f"t{rnd}", dataset_id=ds_id)],
                         hparams=j.HyperParams(max_steps=steps, batch_size=8,
                                               learning_rate=5e-3, max_length=32))
        job = c.jobs.CreateJob(j.CreateJobRequest(spec=spec), timeout=30).job
    else:
        job = c.create_job(f"f{rnd}", "T", ds_id, steps=steps)
    last = {"state": job.state, "step": 0}

    def follow():
        try:
            for e in c.jobs.StreamJobEvents(j.StreamJobEventsRequest(job_id=job.id), timeout=120):
                kind = e.WhichOneof("event")
                if kind == "state":
                    last["state"] = e.state.state
                elif kind == "progress":
                    last["step"] = e.progress.step
        except grpc.RpcError:
            pass

    fol = threading.Thread(target=follow)
    fol.start()
    if mode == "upload":
        time.sleep(rng.uniform(0.02, 1.0))
    elif mode == "train":
        target = rng.randint(1, steps - 2)
        t_end = time.time() + 60
        while last["step"] < target and last["state"] not in (j.SUCCEEDED, j.FAILED) \
                and time.time() < t_end:
            time.sleep(0.005)
    else:  # around checkpoint write and publication: after the last step
        target = steps - rng.randint(0, 2)
        t_end = time.time() + 60
        while last["step"] < target and last["state"] not in (
                j.SUCCEEDED, j.FAILED) and time.time() < t_end:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.05))
    server.kill9()
    stop.set()
    up.join(timeout=30)
    fol.join(timeout=30)
    if last["state"] in (j.VALIDATING, j.RUNNING):
        ledger.in_flight.add(job.id)
    return mode, last


def test_kill9_at_random_moments_keeps_state_consistent(pb, tmp_path, tiny_model):
    rng = random.Random(SEED)
    data_dir = tmp_path / "data"
    ledger = Ledger()
    modes = []
    for rnd in range(ROUNDS + 1):
        s = Server(data_dir, tiny_model).start()
        try:
            c = Client(pb, s.channel())
            check_after_restart(c, pb, data_dir, ledger, f"restart {rnd} (seed {SEED})")
            if rnd == ROUNDS:
                break
            mode, last = run_round(c, pb, data_dir, ledger, rng, rnd, s)
            modes.append((mode, pb.jobs_pb2.JobState.Name(last["state"]), last["step"]))
        finally:
            s.stop()
    print("rounds (mode, job state at kill, step):", modes)
    print(f"acknowledged: {len(ledger.datasets)} datasets, {len(ledger.versions)} versions")
    assert len(ledger.datasets) >= ROUNDS
    assert ledger.versions, "no family version was ever published: kills came too early"
