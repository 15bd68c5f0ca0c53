"""Issue 17 (hardening), hole 3, black-box on the real metatt-server binary.

Publication is a compare-and-swap: a job publishes only onto the version it
started from (a new family: none), owned by its tenant, checked atomically
with the store's insert; otherwise the job fails with the reason and nothing
is published. Family names are per tenant: tenant B's "x" neither sees nor
collides with tenant A's "x", and B's answers (messages, timing) are the same
whether A has an "x" or not."""
import statistics
import time

import grpc
import pytest

from server_harness import (Server, make_rows, tenant_clients, token_entry, tsv_bytes,
                            write_tokens)

TOKENS = {"acme": "acme-token-names-0123456789", "beta": "beta-token-names-0123456789",
          "ops": "ops-token-names-0123456789"}


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("names")
    write_tokens(d / "tokens.json", [token_entry("acme", TOKENS["acme"]),
                                     token_entry("beta", TOKENS["beta"]),
                                     token_entry("ops", TOKENS["ops"], "admin")])
    s = Server(d / "data", tiny_model, extra=[f"--auth_tokens={d / 'tokens.json'}"]).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def clients(pb, srv):
    return tenant_clients(pb, srv, TOKENS)


def code_and_details(fn):
    try:
        r = fn()
        if hasattr(r, "__iter__") and not hasattr(r, "ListFields"):
            list(r)
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def train(pb, c, family, task="T", steps=6, seed=0, wait=True):
    ds = c.upload(f"{family}-{task}", tsv_bytes(make_rows(32, seed=seed)))
    job = c.create_job(family, task, ds.id, steps=steps)
    if not wait:
        return job
    j = pb.jobs_pb2
    done = c.wait_state(job.id, {j.SUCCEEDED, j.FAILED, j.CANCELLED}, timeout=300)
    assert done.state == j.SUCCEEDED, done.failure_reason
    return done


def export(pb, c, family):
    ad = pb.adapters_pb2
    return list(c.adapters.ExportFamily(ad.ExportFamilyRequest(family=family), timeout=60))


def import_as(pb, c, family, chunks):
    ad = pb.adapters_pb2

    def parts():
        yield ad.ImportFamilyRequest(family=family)
        for ch in chunks:
            yield ad.ImportFamilyRequest(chunk=ch)
    return c.adapters.ImportFamily(parts(), timeout=120).version


def families(pb, c):
    ad = pb.adapters_pb2
    return sorted(f.name for f in c.adapters.ListFamilies(ad.ListFamiliesRequest()).families)


def test_family_names_are_per_tenant(pb, clients):
    ad, inf, j = pb.adapters_pb2, pb.inference_pb2, pb.jobs_pb2
    a, b, admin = clients["acme"], clients["beta"], clients["ops"]
    # B's answers about "x" and "y" before A has either: then A makes "x".
    probes = {
        "get": lambda f: b.adapters.GetFamily(ad.GetFamilyRequest(family=f)),
        "tasks": lambda f: b.adapters.ListTasks(ad.ListTasksRequest(family=f)),
        "export": lambda f: b.adapters.ExportFamily(ad.ExportFamilyRequest(family=f), timeout=30),
        "delete_task": lambda f: b.adapters.DeleteTask(ad.DeleteTaskRequest(family=f, task="T")),
        "predict": lambda f: b.inference.Predict(inf.PredictRequest(inputs=[
            inf.PredictInput(family=f, task="T", text="good movie")]), timeout=30),
    }
    before = {k: code_and_details(lambda: p("x")) for k, p in probes.items()}
    train(pb, a, "x")
    after = {k: code_and_details(lambda: p("x")) for k, p in probes.items()}
    assert after == before, (before, after)
    for k, (code, _) in after.items():
        assert code == grpc.StatusCode.NOT_FOUND, (k, after[k])
    # Timing: B's lookup of A's "x" and of a name nobody has take one path.
    lat = {"x": [], "nobody": []}
    for _ in range(40):
        for name in ("x", "nobody"):
            t0 = time.perf_counter()
            code_and_details(lambda: probes["get"](name))
            lat[name].append(time.perf_counter() - t0)
    mx, mn = statistics.median(lat["x"]), statistics.median(lat["nobody"])
    print(f"GetFamily NOT_FOUND median: A's name {mx * 1e3:.2f} ms, nobody's {mn * 1e3:.2f} ms")
    assert abs(mx - mn) < max(0.002, 0.5 * mn), (mx, mn)

    # B creates its own "x" (a job) and imports a "z" copy of it: no collision.
    b_job = train(pb, b, "x", task="U", seed=3)
    assert b_job.result_family == "x" and b_job.spec.family == "x"
    assert families(pb, a) == ["x"] and families(pb, b) == ["x"]
    a_x = a.adapters.GetFamily(ad.GetFamilyRequest(family="x")).family
    b_x = b.adapters.GetFamily(ad.GetFamilyRequest(family="x")).family
    assert [t.name for t in a_x.versions[0].tasks] == ["T"]
    assert [t.name for t in b_x.versions[0].tasks] == ["U"]
    assert a_x.versions[0].family == "x" == b_x.versions[0].family
    # Importing with "" takes family.json's name into the importer's tenant:
    # B's "x" exists, so it is refused; never written into A's.
    code, details = code_and_details(lambda: import_as(pb, b, "", export(pb, a, "x")))
    assert code == grpc.StatusCode.ALREADY_EXISTS, (code, details)
    assert import_as(pb, b, "z", export(pb, a, "x")).family == "z"
    assert families(pb, a) == ["x"] and families(pb, b) == ["x", "z"]
    # Predict: each tenant's "x" is its own.
    p = lambda c, task: c.inference.Predict(inf.PredictRequest(inputs=[  # noqa: E731
        inf.PredictInput(family="x", task=task, text="good movie")]), timeout=30)
    assert p(a, "T").predictions[0].task == "T"
    assert p(b, "U").predictions[0].task == "U"
    assert code_and_details(lambda: p(b, "T"))[0] == grpc.StatusCode.NOT_FOUND
    # Jobs and events show the caller's names.
    evs = b.events(b_job.id)
    assert [e.checkpoint.family for e in evs if e.WhichOneof("event") == "checkpoint"] == ["x"]
    reasons = [e.state.reason for e in evs if e.WhichOneof("event") == "state"]
    assert any("published x v1" in r for r in reasons), reasons
    assert not any("~" in r for r in reasons), reasons
    # A non-admin cannot reach another tenant's key; an admin names it by key.
    for name in ("acme~x", "beta~x"):
        code, _ = code_and_details(lambda: a.adapters.GetFamily(ad.GetFamilyRequest(family=name)))
        assert code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), code
    assert families(pb, admin) == ["acme~x", "beta~x", "beta~z"]
    got = admin.adapters.GetFamily(ad.GetFamilyRequest(family="acme~x")).family
    assert got.name == "acme~x" and [t.name for t in got.versions[0].tasks] == ["T"]
    # An admin importing under another tenant's key imports for that tenant:
    # B sees "k" by name and serves it; A and the admin's own tenant do not own it.
    assert import_as(pb, admin, "beta~k", export(pb, a, "x")).family == "beta~k"
    assert families(pb, b) == ["k", "x", "z"] and families(pb, a) == ["x"]
    assert b.adapters.GetFamily(ad.GetFamilyRequest(family="k")).family.name == "k"
    assert b.inference.Predict(inf.PredictRequest(inputs=[
        inf.PredictInput(family="k", task="T", text="good movie")]), timeout=30).predictions[0].task == "T"
    # Datasets and jobs: B's lists hold only B's.
    d = pb.datasets_pb2
    a_ds = {x.id for x in a.datasets.ListDatasets(d.ListDatasetsRequest()).datasets}
    b_ds = {x.id for x in b.datasets.ListDatasets(d.ListDatasetsRequest()).datasets}
    assert a_ds and b_ds and not (a_ds & b_ds)
    a_jobs = {x.id for x in a.jobs.ListJobs(j.ListJobsRequest()).jobs}
    b_jobs = {x.id for x in b.jobs.ListJobs(j.ListJobsRequest()).jobs}
    assert b_job.id in b_jobs and b_job.id not in a_jobs and not (a_jobs & b_jobs)


def running(pb, c, job_id):
    j = pb.jobs_pb2
    job = c.wait_state(job_id, {j.RUNNING, j.SUCCEEDED, j.FAILED, j.CANCELLED}, timeout=120)
    assert job.state == j.RUNNING, job
    deadline = time.time() + 60
    while time.time() < deadline:  # past its first steps
        job = c.jobs.GetJob(j.GetJobRequest(job_id=job_id), timeout=10).job
        if job.step >= 2 or job.state != j.RUNNING:
            break
        time.sleep(0.05)
    return job


def test_import_under_a_name_the_job_trains_fails_the_job(pb, clients):
    ad, j = pb.adapters_pb2, pb.jobs_pb2
    a, b = clients["acme"], clients["beta"]
    train(pb, a, "src")
    chunks = export(pb, a, "src")
    # A's own import under the name A's running job trains: the import is v1,
    # the job's publication (from "no family") fails, publishing nothing.
    job = train(pb, a, "y", steps=120, wait=False)
    assert running(pb, a, job.id).state == j.RUNNING
    imported = import_as(pb, a, "y", chunks)
    assert a.jobs.GetJob(j.GetJobRequest(job_id=job.id)).job.state == j.RUNNING,         "the job ended before the import: nothing was tested"
    done = a.wait_state(job.id, {j.SUCCEEDED, j.FAILED, j.CANCELLED}, timeout=300)
    assert done.state == j.FAILED, done
    assert "is at v1, not v0" in done.failure_reason, done.failure_reason
    assert "nothing was published" in done.failure_reason, done.failure_reason
    versions = a.adapters.GetFamily(ad.GetFamilyRequest(family="y")).family.versions
    assert [(v.version, v.created_by_job) for v in versions] == [(1, "import")], versions
    assert imported.version == 1
    # Another tenant importing the name A's job trains changes nothing for A.
    job = train(pb, a, "w", steps=120, wait=False)
    assert running(pb, a, job.id).state == j.RUNNING
    assert import_as(pb, b, "w", chunks).family == "w"
    done = a.wait_state(job.id, {j.SUCCEEDED, j.FAILED, j.CANCELLED}, timeout=300)
    assert done.state == j.SUCCEEDED, done.failure_reason
    a_w = a.adapters.GetFamily(ad.GetFamilyRequest(family="w")).family.versions
    b_w = b.adapters.GetFamily(ad.GetFamilyRequest(family="w")).family.versions
    assert [v.created_by_job for v in a_w] == [job.id]
    assert [v.created_by_job for v in b_w] == ["import"]


def test_delete_task_racing_an_add_task_job_is_not_undone(pb, clients):
    ad, j = pb.adapters_pb2, pb.jobs_pb2
    a = clients["acme"]
    ids = [a.upload(f"m{t}", tsv_bytes(make_rows(24, seed=i))).id for i, t in enumerate("PQ")]
    spec = j.JobSpec(family="m", kind=j.MULTI_TASK,
                     tasks=[j.JobTask(task_name=t, dataset_id=d) for t, d in zip("PQ", ids)],
                     adapter=j.AdapterConfig(form="4+1d", ranks=[4]),
                     hparams=j.HyperParams(max_steps=4, batch_size=8, max_length=32))
    first = a.jobs.CreateJob(j.CreateJobRequest(spec=spec), timeout=30).job
    assert a.wait_state(first.id, {j.SUCCEEDED, j.FAILED}).state == j.SUCCEEDED
    add = a.create_job("m", "R", ids[0], steps=120, kind=j.ADD_TASK)
    assert running(pb, a, add.id).state == j.RUNNING
    v2 = a.adapters.DeleteTask(ad.DeleteTaskRequest(family="m", task="Q"), timeout=60).version
    assert v2.version == 2 and [t.name for t in v2.tasks] == ["P"]
    done = a.wait_state(add.id, {j.SUCCEEDED, j.FAILED, j.CANCELLED}, timeout=300)
    assert done.state == j.FAILED, done
    assert "nothing was published" in done.failure_reason, done.failure_reason
    latest = a.adapters.GetFamily(ad.GetFamilyRequest(family="m")).family
    assert latest.latest_version == 2
    assert [t.name for t in latest.versions[-1].tasks] == ["P"]  # Q stays deleted, no R
