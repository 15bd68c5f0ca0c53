"""Predict over gRPC against the real server (tiny random BERT): mixed-task
batches, a task added while requests stream, cancelled / killed clients, a
full queue, and the inference metrics scraped from /metrics."""
import re
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request

import grpc
import pytest

from server_harness import Client, Server, make_rows, tsv_bytes

TASKS = ("A", "B", "C")


def train_family(pb, client, family="fam", steps=6):
    """A 4+1D family with tasks A, B, C (one MULTI_TASK job, a few steps)."""
    j = pb.jobs_pb2
    ids = [client.upload(f"d{t}", tsv_bytes(make_rows(24, seed=i))).id for i, t in enumerate(TASKS)]
    spec = j.JobSpec(family=family, kind=j.MULTI_TASK,
                     tasks=[j.JobTask(task_name=t, dataset_id=d) for t, d in zip(TASKS, ids)],
                     adapter=j.AdapterConfig(form="4+1d", ranks=[4]),
                     hparams=j.HyperParams(max_steps=steps, batch_size=8, learning_rate=5e-3,
                                           max_length=32))
    job = client.jobs.CreateJob(j.CreateJobRequest(spec=spec), timeout=30).job
    done = client.wait_state(job.id, {j.SUCCEEDED, j.FAILED, j.CANCELLED})
    assert done.state == j.SUCCEEDED, done
    return ids


@pytest.fixture(scope="module")
def served(pb, tmp_path_factory, tiny_model):
    """One server for the module, with family `fam` (tasks A, B, C) trained."""
    s = Server(tmp_path_factory.mktemp("inf") / "data", tiny_model,
               extra=["--metrics_task_labels=2"]).start()
    c = Client(pb, s.channel())
    ids = train_family(pb, c)
    yield s, c, ids
    s.stop()


def inputs(pb, n, seed=0, tasks=TASKS):
    inf = pb.inference_pb2
    rows = make_rows(n, seed=seed)
    out = []
    for i, (text, _) in enumerate(rows):
        if i % 2:
            out.append(inf.PredictInput(family="fam", task=tasks[i % len(tasks)], text=text))
        else:
            out.append(inf.PredictInput(family="fam", task_index=i % len(tasks), text=text))
    return out


def scrape(server):
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as r:
        return r.read().decode()


def value(text, name, **labels):
    """Value of one sample of the text exposition (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if got == {k: str(v) for k, v in labels.items()}:
            return float(m.group(3))
    return 0.0


def test_mixed_batch_matches_one_request_per_task(pb, served):
    _, client, _ = served
    inf = pb.inference_pb2
    ins = inputs(pb, 12, seed=3)
    mixed = client.inference.Predict(inf.PredictRequest(inputs=ins), timeout=60).predictions
    assert len(mixed) == len(ins)
    assert {p.task for p in mixed} == set(TASKS)
    for i, one in enumerate(ins):
        alone = client.inference.Predict(inf.PredictRequest(inputs=[one]), timeout=60).predictions[0]
        assert mixed[i].task == alone.task and mixed[i].task_index == alone.task_index
        assert mixed[i].label == alone.label and mixed[i].label_name == alone.label_name
        assert list(mixed[i].scores) == pytest.approx(list(alone.scores), abs=1e-4)
    # The tasks are really different adapters + heads: the same text differs.
    same_text = [inf.PredictInput(family="fam", task=t, text="the movie was good") for t in TASKS]
    scores = [tuple(p.scores) for p in
              client.inference.Predict(inf.PredictRequest(inputs=same_text), timeout=60).predictions]
    assert len(set(scores)) == len(TASKS)


def test_one_input_many_tasks_in_one_call(pb, served):
    """A task list (or all) on one input answers every task, as separate
    requests would, in one call; inputs x tasks count against the row limit."""
    _, client, _ = served
    inf = pb.inference_pb2
    texts = ["the movie was good", "a very bad plot"]
    listed = [inf.PredictInput(family="fam", text=t, tasks=inf.TaskList(names=["C", "A"]))
              for t in texts]
    got = client.inference.Predict(inf.PredictRequest(inputs=listed), timeout=60).predictions
    assert [(p.input_index, p.task) for p in got] == [(0, "C"), (0, "A"), (1, "C"), (1, "A")]
    for p in got:
        one = inf.PredictInput(family="fam", task=p.task, text=texts[p.input_index])
        alone = client.inference.Predict(inf.PredictRequest(inputs=[one]), timeout=60).predictions[0]
        assert p.label == alone.label and p.task_index == alone.task_index
        assert list(p.scores) == pytest.approx(list(alone.scores), abs=1e-4)
    every = inf.PredictInput(family="fam", text=texts[0], tasks=inf.TaskList(all=True))
    got = client.inference.Predict(inf.PredictRequest(inputs=[every]), timeout=60).predictions
    assert [p.task for p in got] == list(TASKS)
    assert all(p.input_index == 0 for p in got)
    # Errors name the input and the task.
    bad = inf.PredictInput(family="fam", text="x", tasks=inf.TaskList(names=["A", "nope"]))
    with pytest.raises(grpc.RpcError) as e:
        client.inference.Predict(inf.PredictRequest(inputs=[bad]), timeout=60)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert "inputs[0].tasks[1]" in e.value.details() and "nope" in e.value.details()
    both = inf.PredictInput(family="fam", text="x", tasks=inf.TaskList(names=["A"], all=True))
    with pytest.raises(grpc.RpcError) as e:
        client.inference.Predict(inf.PredictRequest(inputs=[both]), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs[0].tasks" in e.value.details()


def test_task_added_mid_stream_is_served_without_restart(pb, served):
    server, client, ids = served
    inf, j = pb.inference_pb2, pb.jobs_pb2
    pid = server.proc.pid
    stop = threading.Event()
    results = {"ok": 0, "failed": []}

    def stream():
        ch = server.channel()
        stub = pb.inference_pb2_grpc.InferenceServiceStub(ch)
        while not stop.is_set():
            try:
                stub.Predict(inf.PredictRequest(inputs=inputs(pb, 2, seed=results["ok"])), timeout=30)
                results["ok"] += 1
            except grpc.RpcError as e:
                results["failed"].append(e.code())
        ch.close()

    t = threading.Thread(target=stream)
    t.start()
    try:
        with pytest.raises(grpc.RpcError) as missing:
            client.inference.Predict(inf.PredictRequest(inputs=[
                inf.PredictInput(family="fam", task="D", text="good movie")]), timeout=30)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        spec = j.JobSpec(family="fam", kind=j.ADD_TASK,
                         tasks=[j.JobTask(task_name="D", dataset_id=ids[0])],
                         hparams=j.HyperParams(max_steps=4, batch_size=8, learning_rate=5e-3,
                                               max_length=32))
        job = client.jobs.CreateJob(j.CreateJobRequest(spec=spec), timeout=30).job
        done = client.wait_state(job.id, {j.SUCCEEDED, j.FAILED, j.CANCELLED})
        assert done.state == j.SUCCEEDED, done
        p = client.inference.Predict(inf.PredictRequest(inputs=[
            inf.PredictInput(family="fam", task="D", text="good movie")]), timeout=30).predictions[0]
        assert p.task == "D" and p.task_index == 3
        before = results["ok"]
        deadline = time.time() + 30
        while results["ok"] < before + 3 and time.time() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        t.join(timeout=60)
    assert results["failed"] == []
    assert results["ok"] > 3
    assert server.proc.pid == pid and server.proc.poll() is None


KILLED_CLIENT = textwrap.dedent("""
    import sys, grpc
    sys.path.insert(0, sys.argv[1])
    from metatt.v1 import inference_pb2 as inf, inference_pb2_grpc as g
    ch = grpc.insecure_channel(sys.argv[2])
    stub = g.InferenceServiceStub(ch)
    futs = [stub.Predict.future(inf.PredictRequest(inputs=[
        inf.PredictInput(family="fam", task_index=i % 3, text="the movie was very good " * 20)
        for i in range(256)]), timeout=60) for _ in range(8)]
    print("sent", flush=True)
    futs[0].result()
""")


def test_cancelled_and_killed_clients_leave_nothing_behind(pb, served, tmp_path):
    server, client, _ = served
    inf = pb.inference_pb2
    big = inf.PredictRequest(inputs=[
        inf.PredictInput(family="fam", task_index=i % 3, text="the movie was very good " * 20)
        for i in range(256)])
    # Cancelled RPCs: many large requests, each cancelled right away.
    futures = [client.inference.Predict.future(big, timeout=60) for _ in range(20)]
    for f in futures:
        f.cancel()
    for f in futures:
        assert f.cancelled() or f.done()
    # A client process killed with requests in flight.
    stubs_dir = sys.modules["metatt.v1.inference_pb2"].__file__.rsplit("/metatt/", 1)[0]
    script = tmp_path / "client.py"
    script.write_text(KILLED_CLIENT)
    proc = subprocess.Popen([sys.executable, str(script), stubs_dir, f"127.0.0.1:{server.port}"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "sent"
    time.sleep(0.05)
    proc.kill()
    proc.wait(timeout=30)
    # The server keeps serving, and its queue drains to 0 (nothing stuck). A
    # request cancelled after it was queued holds its rows until its handler
    # next polls the cancellation (milliseconds, longer on a loaded machine),
    # so a call at that moment may be told "queue full", as any client that
    # meets a full queue is: it retries. Nothing else is tolerated.
    retry_until = time.time() + 20
    while True:
        try:
            ok = client.inference.Predict(inf.PredictRequest(inputs=inputs(pb, 3)), timeout=30)
            break
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.time() > retry_until:
                raise
            time.sleep(0.2)
    assert len(ok.predictions) == 3
    deadline = time.time() + 20
    depth = None
    while time.time() < deadline:
        depth = value(scrape(server), "metatt_queue_depth")
        if depth == 0:
            # Sampled every 2 s: read it once more after the next sample.
            time.sleep(2.5)
            depth = value(scrape(server), "metatt_queue_depth")
            if depth == 0:
                break
        time.sleep(0.2)
    assert depth == 0
    assert server.proc.poll() is None
    # Every abandoned RPC has ended on the server: none is stuck in Predict.
    deadline = time.time() + 30
    while value(scrape(server), "metatt_predict_in_flight") != 0 and time.time() < deadline:
        time.sleep(0.1)
    assert value(scrape(server), "metatt_predict_in_flight") == 0
    ok = client.inference.Predict(inf.PredictRequest(inputs=inputs(pb, 3)), timeout=30)
    assert len(ok.predictions) == 3


def test_queue_full_is_resource_exhausted(pb, tmp_path, tiny_model):
    s = Server(tmp_path / "data", tiny_model, extra=["--max_queue=4"]).start()
    try:
        c = Client(pb, s.channel())
        train_family(pb, c, steps=2)
        inf = pb.inference_pb2
        with pytest.raises(grpc.RpcError) as full:
            c.inference.Predict(inf.PredictRequest(inputs=inputs(pb, 5)), timeout=30)
        assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue" in full.value.details()
        assert len(c.inference.Predict(inf.PredictRequest(inputs=inputs(pb, 4)),
                                       timeout=30).predictions) == 4
        text = scrape(s)
        assert value(text, "metatt_predict_requests_total", code="RESOURCE_EXHAUSTED") == 1
    finally:
        s.stop()


def test_metrics_count_predict_requests_batches_and_tasks(pb, served):
    server, client, _ = served
    inf = pb.inference_pb2
    before = scrape(server)
    for seed in range(3):
        client.inference.Predict(inf.PredictRequest(inputs=inputs(pb, 6, seed=seed)), timeout=60)
    with pytest.raises(grpc.RpcError):
        client.inference.Predict(inf.PredictRequest(inputs=[
            inf.PredictInput(family="fam", task="nope", text="good")]), timeout=30)
    after = scrape(server)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("metatt_predict_requests_total", code="OK") == 3
    assert delta("metatt_predict_requests_total", code="NOT_FOUND") == 1
    assert delta("metatt_predict_latency_seconds_count") == 4
    # 18 rows ran, in at least 3 device batches of 3 distinct tasks each.
    assert delta("metatt_batch_size_sum") == 18
    assert delta("metatt_batch_size_count") >= 3
    assert delta("metatt_batch_tasks_sum") >= 9
    # Per-task input counts: with --metrics_task_labels=2 at most 2 tasks get
    # their own label, the rest (and unknown ones) count under "other".
    per_task = {}
    for line in after.splitlines():
        m = re.match(r'^metatt_predict_inputs_total\{(.*)\} (\S+)$', line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            per_task[(labels["task"], labels["code"])] = float(m.group(2))
    named = {t for t, _ in per_task if t != "other"}
    assert 1 <= len(named) <= 2, per_task
    assert all(t.startswith("fam/") for t in named)
    assert ("other", "OK") in per_task
    total_ok = sum(v for (t, c), v in per_task.items() if c == "OK")
    assert total_ok - sum(value(before, "metatt_predict_inputs_total", task=t, code="OK")
                          for t in named | {"other"}) == 18
    # The unknown task is a later, unlabelled one: it counts under "other".
    assert (per_task.get(("other", "NOT_FOUND"), 0)
            - value(before, "metatt_predict_inputs_total", task="other", code="NOT_FOUND")) == 1
