"""Tenants on the real server: bearer tokens from a tokens file, isolation of
every RPC of every service (another tenant's object is NOT_FOUND with the same
message as a missing one; lists do not leak), the admin role, quotas and
global limits naming the limit."""
import hashlib

import grpc
import pytest

from server_harness import (Client, Server, make_rows, tenant_clients, token_entry, tsv_bytes,
                            with_token, write_tokens)

TOKENS = {"acme": "acme-token-0123456789", "beta": "beta-token-0123456789",
          "ops": "ops-admin-token-012345", "quota": "quota-token-012345678"}


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("tenants")
    write_tokens(d / "tokens.json",
                 [token_entry("acme", TOKENS["acme"], "user"),
                  token_entry("beta", TOKENS["beta"], "user"),
                  token_entry("ops", TOKENS["ops"], "admin"), token_entry("quota", TOKENS["quota"])],
                 tenants={"quota": {"max_dataset_bytes": 3000, "max_concurrent_jobs": 1}})
    s = Server(d / "data", tiny_model, extra=[
        f"--auth_tokens={d / 'tokens.json'}", "--max_predict_inputs=4",
        "--max_job_batch_size=16", "--max_sequence_length=64", "--max_upload_bytes=100000",
        "--max_request_bytes=1000000"]).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def clients(pb, srv):
    return tenant_clients(pb, srv, TOKENS)


@pytest.fixture(scope="module")
def world(pb, clients):
    """Tenant acme owns a dataset, a finished job and a trained family."""
    a = clients["acme"]
    ds = a.upload("acme-data", tsv_bytes(make_rows(32)))
    job = a.create_job("fam-acme", "SENT", ds.id, steps=6)
    done = a.wait_state(job.id, {pb.jobs_pb2.SUCCEEDED, pb.jobs_pb2.FAILED}, timeout=240)
    assert done.state == pb.jobs_pb2.SUCCEEDED, done.failure_reason
    return {"dataset": ds.id, "job": job.id, "family": "fam-acme"}


def not_found(fn, *args, **kw):
    with pytest.raises(grpc.RpcError) as e:
        r = fn(*args, **kw)
        if hasattr(r, "__iter__") and not hasattr(r, "ListFields"):
            list(r)  # server streams fail on the first read
    assert e.value.code() == grpc.StatusCode.NOT_FOUND, e.value.details()
    return e.value.details()


def same_message(foreign, missing, real_id, fake_id):
    """The message for another tenant's object is the one for a missing id."""
    assert foreign.replace(real_id, "<id>") == missing.replace(fake_id, "<id>"), (foreign, missing)


def test_datasets_are_isolated(pb, clients, world):
    d = pb.datasets_pb2
    b, a, admin = clients["beta"], clients["acme"], clients["ops"]
    ds = world["dataset"]
    foreign = not_found(b.datasets.GetDataset, d.GetDatasetRequest(dataset_id=ds))
    missing = not_found(b.datasets.GetDataset, d.GetDatasetRequest(dataset_id="ds-nope"))
    same_message(foreign, missing, ds, "ds-nope")
    not_found(b.datasets.DeleteDataset, d.DeleteDatasetRequest(dataset_id=ds))
    assert a.datasets.GetDataset(d.GetDatasetRequest(dataset_id=ds)).dataset.id == ds  # still there
    assert ds not in [x.id for x in b.datasets.ListDatasets(d.ListDatasetsRequest()).datasets]
    # UploadDataset: B's upload is B's alone.
    mine = b.upload("beta-data", tsv_bytes(make_rows(16, seed=1)))
    assert [x.id for x in b.datasets.ListDatasets(d.ListDatasetsRequest()).datasets] == [mine.id]
    assert mine.id not in [x.id for x in a.datasets.ListDatasets(d.ListDatasetsRequest()).datasets]
    not_found(a.datasets.GetDataset, d.GetDatasetRequest(dataset_id=mine.id))
    every = {x.id for x in admin.datasets.ListDatasets(d.ListDatasetsRequest()).datasets}
    assert {ds, mine.id} <= every
    assert admin.datasets.GetDataset(d.GetDatasetRequest(dataset_id=ds)).dataset.id == ds


def test_jobs_are_isolated(pb, clients, world):
    j = pb.jobs_pb2
    b, admin = clients["beta"], clients["ops"]
    job = world["job"]
    foreign = not_found(b.jobs.GetJob, j.GetJobRequest(job_id=job))
    missing = not_found(b.jobs.GetJob, j.GetJobRequest(job_id="job-nope"))
    same_message(foreign, missing, job, "job-nope")
    not_found(b.jobs.CancelJob, j.CancelJobRequest(job_id=job))
    not_found(b.jobs.StreamJobEvents, j.StreamJobEventsRequest(job_id=job), timeout=10)
    assert job not in [x.id for x in b.jobs.ListJobs(j.ListJobsRequest()).jobs]
    assert job not in [x.id for x in b.jobs.ListJobs(j.ListJobsRequest(state=j.SUCCEEDED)).jobs]
    # CreateJob cannot use A's dataset nor add a task to A's family.
    msg = not_found(b.create_job, "fam-beta", "T", world["dataset"], steps=2)
    assert world["dataset"] in msg
    mine = b.upload("beta-add", tsv_bytes(make_rows(16, seed=2)))
    not_found(b.create_job, world["family"], "T2", mine.id, steps=2, kind=j.ADD_TASK)
    # The admin sees A's job.
    assert admin.jobs.GetJob(j.GetJobRequest(job_id=job)).job.id == job
    assert job in [x.id for x in admin.jobs.ListJobs(j.ListJobsRequest()).jobs]


def test_families_tasks_and_predict_are_isolated(pb, clients, world):
    ad, inf = pb.adapters_pb2, pb.inference_pb2
    a, b, admin = clients["acme"], clients["beta"], clients["ops"]
    fam = world["family"]
    assert fam not in [f.name for f in b.adapters.ListFamilies(ad.ListFamiliesRequest()).families]
    foreign = not_found(b.adapters.GetFamily, ad.GetFamilyRequest(family=fam))
    missing = not_found(b.adapters.GetFamily, ad.GetFamilyRequest(family="fam-nope"))
    same_message(foreign, missing, fam, "fam-nope")
    not_found(b.adapters.ListTasks, ad.ListTasksRequest(family=fam))
    not_found(b.adapters.DeleteTask, ad.DeleteTaskRequest(family=fam, task="SENT"))
    not_found(b.adapters.ExportFamily, ad.ExportFamilyRequest(family=fam), timeout=30)
    assert [t.name for t in a.adapters.ListTasks(ad.ListTasksRequest(family=fam)).tasks] == ["SENT"]

    # Predict: naming A's family, or "" (B has no family yet), is NOT_FOUND.
    req = inf.PredictRequest(inputs=[inf.PredictInput(family=fam, task="SENT", text="good movie")])
    foreign = not_found(b.inference.Predict, req, timeout=30)
    missing = not_found(b.inference.Predict, inf.PredictRequest(inputs=[
        inf.PredictInput(family="fam-nope", task="SENT", text="good movie")]), timeout=30)
    same_message(foreign, missing, fam, "fam-nope")
    not_found(b.inference.Predict, inf.PredictRequest(inputs=[
        inf.PredictInput(task="SENT", text="good movie")]), timeout=30)
    assert len(a.inference.Predict(req, timeout=30).predictions) == 1
    # A's "" is A's only family.
    assert a.inference.Predict(inf.PredictRequest(inputs=[
        inf.PredictInput(task="SENT", text="good movie")]), timeout=30).predictions[0].task == "SENT"

    # ImportFamily: B imports a copy of A's export; the copy is B's alone.
    chunks = list(a.adapters.ExportFamily(ad.ExportFamilyRequest(family=fam), timeout=30))

    def parts():
        yield ad.ImportFamilyRequest(family="fam-beta-copy")
        for c in chunks:
            yield ad.ImportFamilyRequest(chunk=c)

    v = b.adapters.ImportFamily(parts(), timeout=60).version
    assert v.family == "fam-beta-copy"
    assert [f.name for f in b.adapters.ListFamilies(ad.ListFamiliesRequest()).families] == [
        "fam-beta-copy"]
    assert "fam-beta-copy" not in [
        f.name for f in a.adapters.ListFamilies(ad.ListFamiliesRequest()).families]
    not_found(a.adapters.GetFamily, ad.GetFamilyRequest(family="fam-beta-copy"))
    # B's "" now resolves to B's own family, never A's.
    p = b.inference.Predict(inf.PredictRequest(inputs=[
        inf.PredictInput(task="SENT", text="good movie")]), timeout=30)
    assert p.predictions[0].task == "SENT"
    # Family names are per tenant: an admin sees other tenants' families by
    # their keys "<tenant>~<name>" and names them so (issue 17, hole 3).
    names = {f.name for f in admin.adapters.ListFamilies(ad.ListFamiliesRequest()).families}
    assert {f"acme~{fam}", "beta~fam-beta-copy"} <= names
    got = admin.adapters.GetFamily(ad.GetFamilyRequest(family=f"acme~{fam}")).family
    assert got.name == f"acme~{fam}"


def test_missing_or_bad_token_is_unauthenticated(pb, srv, world):
    raw = srv.channel()
    d, j, ad, inf = pb.datasets_pb2, pb.jobs_pb2, pb.adapters_pb2, pb.inference_pb2
    for channel in (raw, with_token(raw, "not-a-token"), with_token(raw, hashlib.sha256(TOKENS["acme"].encode()).hexdigest())):
        c = Client(pb, channel)
        calls = [
            lambda: c.datasets.GetDataset(d.GetDatasetRequest(dataset_id=world["dataset"])),
            lambda: c.datasets.ListDatasets(d.ListDatasetsRequest()),
            lambda: c.datasets.DeleteDataset(d.DeleteDatasetRequest(dataset_id=world["dataset"])),
            lambda: c.upload("x", tsv_bytes(make_rows(4))),
            lambda: c.jobs.GetJob(j.GetJobRequest(job_id=world["job"])),
            lambda: c.jobs.ListJobs(j.ListJobsRequest()),
            lambda: c.jobs.CancelJob(j.CancelJobRequest(job_id=world["job"])),
            lambda: list(c.jobs.StreamJobEvents(j.StreamJobEventsRequest(job_id=world["job"]))),
            lambda: c.create_job("f", "t", world["dataset"]),
            lambda: c.adapters.ListFamilies(ad.ListFamiliesRequest()),
            lambda: c.adapters.GetFamily(ad.GetFamilyRequest(family=world["family"])),
            lambda: c.adapters.ListTasks(ad.ListTasksRequest(family=world["family"])),
            lambda: c.adapters.DeleteTask(ad.DeleteTaskRequest(family=world["family"], task="S")),
            lambda: list(c.adapters.ExportFamily(ad.ExportFamilyRequest(family=world["family"]))),
            lambda: c.adapters.ImportFamily(iter([ad.ImportFamilyRequest(family="x")])),
            lambda: c.inference.Predict(inf.PredictRequest(inputs=[
                inf.PredictInput(family=world["family"], task="SENT", text="good")])),
        ]
        for call in calls:
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value.details()
    # Health stays reachable for probes without a token.
    health = raw.unary_unary("/grpc.health.v1.Health/Check",
                             request_serializer=lambda b: b, response_deserializer=lambda b: b)
    assert health(b"", timeout=10) == b"\x08\x01"  # SERVING
    # The dataset survived the unauthenticated delete.
    a = Client(pb, with_token(raw, TOKENS["acme"]))
    assert a.datasets.GetDataset(d.GetDatasetRequest(dataset_id=world["dataset"])).dataset.id


def test_quotas_and_limits_name_the_limit(pb, clients, world):
    j, inf = pb.jobs_pb2, pb.inference_pb2
    q = clients["quota"]
    ds = q.upload("small", tsv_bytes(make_rows(40)))  # ~1.3 kB of the 3000-byte quota
    with pytest.raises(grpc.RpcError) as e:
        q.upload("more", tsv_bytes(make_rows(80, seed=3)))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_dataset_bytes=3000" in e.value.details()
    # max_concurrent_jobs=1: a second unfinished job is refused.
    first = q.create_job("fam-q1", "T", ds.id, steps=100000)
    try:
        with pytest.raises(grpc.RpcError) as e:
            q.create_job("fam-q2", "T", ds.id, steps=2)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_concurrent_jobs=1" in e.value.details()
    finally:
        q.jobs.CancelJob(j.CancelJobRequest(job_id=first.id))
    q.wait_state(first.id, {j.CANCELLED}, timeout=120)
    # Global limits: INVALID_ARGUMENT naming the flag.
    for hp, name in (({"batch_size": 32}, "max_job_batch_size=16"),
                     ({"max_length": 128}, "max_sequence_length=64")):
        spec = j.JobSpec(family="fam-lim", tasks=[j.JobTask(task_name="T", dataset_id=ds.id)],
                         hparams=j.HyperParams(max_steps=2, **hp))
        with pytest.raises(grpc.RpcError) as e:
            q.jobs.CreateJob(j.CreateJobRequest(spec=spec), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert name in e.value.details()
    a = clients["acme"]
    five = [inf.PredictInput(family=world["family"], task="SENT", text="good")] * 5
    with pytest.raises(grpc.RpcError) as e:
        a.inference.Predict(inf.PredictRequest(inputs=five), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_predict_inputs=4" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        a.upload("huge", b"sentence\tlabel\n" + b"good movie\t1\n" * 10000, chunk=60000)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_upload_bytes=100000" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:  # one message over --max_request_bytes
        a.inference.Predict(inf.PredictRequest(inputs=[
            inf.PredictInput(family=world["family"], task="SENT", text="a" * 1_200_000)]), timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
