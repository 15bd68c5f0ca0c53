"""The OpenAI-compatible HTTP gateway (metatt-http) driven by the official
`openai` Python package and by curl, against the real metatt-server on the
real base model (all-MiniLM-L6-v2) with bearer tokens: upload a file, create
a job, list its events until it succeeds, list models, classify, cancel a
job, a wrong key (401), errors naming the field, another tenant, and the
gateway's TLS rules."""
import json
import socket
import subprocess
import time

import openai
import pytest
import requests

from http_harness import Gateway, gateway_binary, wait_job_events
from server_harness import ROOT, Server, make_rows, token_entry, write_tokens

MODEL_DIR = ROOT / "models" / "all-MiniLM-L6-v2"
BASE = "all-MiniLM-L6-v2"
TOKEN = "acme-token-0123456789abcdef"
OTHER = "other-token-0123456789abcdef"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if not (MODEL_DIR / "model.safetensors").exists():
        pytest.fail(f"{MODEL_DIR} missing: run scripts/setup.sh")
    d = tmp_path_factory.mktemp("http")
    tokens = write_tokens(d / "tokens.json", [token_entry("acme", TOKEN, "user"),
                                              token_entry("other", OTHER, "user")])
    server = Server(d / "data", MODEL_DIR, extra=[f"--auth_tokens={tokens}"]).start()
    gw = Gateway(server.port).start()
    yield server, gw, d
    gw.stop()
    server.stop()


def oai(gw, key=TOKEN):
    return openai.OpenAI(base_url=gw.url, api_key=key, max_retries=0, timeout=60)


def jsonl(rows):
    return "".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in rows).encode()


def wait_status(client, job_id, statuses, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} never reached {statuses}: {job}")


def test_openai_sdk_file_job_events_models_classify(stack, tmp_path):
    _, gw, _ = stack
    client = oai(gw)
    f = client.files.create(file=("train.jsonl", jsonl(make_rows(40, seed=3))),
                            purpose="fine-tune")
    assert f.object == "file" and f.purpose == "fine-tune" and f.filename == "train.jsonl"
    assert f.bytes > 0 and f.model_extra["metatt"]["rows"] == 40
    assert client.files.retrieve(f.id).id == f.id
    assert f.id in [x.id for x in client.files.list()]

    # OpenAI's hyper-parameters (n_epochs 1 over 40 rows at batch 8 = 5 steps)
    # plus MetaTT's own in the extension object.
    job = client.fine_tuning.jobs.create(
        model=BASE, training_file=f.id, suffix="sent:SENT",
        hyperparameters={"n_epochs": 1, "batch_size": 8, "learning_rate_multiplier": 2},
        extra_body={"metatt": {"adapter": {"ranks": [4]}, "hparams": {"max_length": 32}}})
    assert job.object == "fine_tuning.job" and job.status in ("queued", "validating_files",
                                                              "running")
    assert job.model == BASE and job.training_file == f.id
    spec = job.model_extra["metatt"]["spec"]
    assert spec["hparams"]["max_steps"] == "5" and spec["hparams"]["batch_size"] == "8"
    assert spec["family"] == "sent" and spec["tasks"][0]["task_name"] == "SENT"
    assert job.hyperparameters.learning_rate_multiplier == pytest.approx(2.0)

    # Poll the events until the job succeeded (newest first, as OpenAI lists them).
    events, messages = wait_job_events(client, job.id)
    assert messages[0].startswith("Job succeeded"), messages
    assert messages[-1].startswith("Job queued"), messages
    assert any(e.type == "metrics" and e.data["step"] >= 1 for e in events.data)
    # Cursor paging: 3 at a time gives the same events in the same order.
    paged = [e.id for e in client.fine_tuning.jobs.list_events(job.id, limit=3)]
    assert paged == [e.id for e in events.data]

    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded" and done.fine_tuned_model == "sent:SENT"
    assert done.finished_at is not None
    assert job.id in [j.id for j in client.fine_tuning.jobs.list()]

    ids = [m.id for m in client.models.list()]
    assert ids[0] == BASE and "sent:SENT" in ids
    m = client.models.retrieve("sent:SENT")
    assert m.model_extra["metatt"]["labels"] == ["0", "1"]
    assert m.model_extra["metatt"]["kind"] == "encoder"
    # An encoder family cannot chat: 400 naming `model` (the server's
    # FAILED_PRECONDITION says to use Predict).
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="sent:SENT",
                                       messages=[{"role": "user", "content": "hi"}])
    assert e.value.param == "model" and "Predict" in e.value.message, e.value.message

    # Classification (requests): two inputs, one a sentence pair.
    r = requests.post(gw.url + "/classifications", headers={"Authorization": f"Bearer {TOKEN}"},
                      json={"model": "sent:SENT",
                            "input": ["the movie was very good",
                                      {"text": "awful plot", "text_pair": "bad actor"}]},
                      timeout=60)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["index"] for d in data] == [0, 1]
    for d in data:
        assert d["model"] == "sent:SENT" and d["label"] in ("0", "1")
        assert sum(d["scores"]) == pytest.approx(1.0, abs=1e-4)

    # A second task on the same family: model = the family, suffix = the task.
    # learning_rate_multiplier scales the rate an added task gets by default
    # (4x its form's: server/training/recipe.h), and reads back as given.
    job2 = client.fine_tuning.jobs.create(
        model="sent", training_file=f.id, suffix="SENT2",
        hyperparameters={"learning_rate_multiplier": 1},
        extra_body={"metatt": {"hparams": {"max_steps": 2000, "batch_size": 8,
                                           "max_length": 32}}})
    assert job2.model_extra["metatt"]["spec"]["kind"] == "ADD_TASK"
    assert job2.model_extra["metatt"]["spec"]["hparams"]["learning_rate"] == pytest.approx(1e-2)
    assert job2.hyperparameters.learning_rate_multiplier == pytest.approx(1.0)
    cancelled = client.fine_tuning.jobs.cancel(job2.id)
    assert cancelled.id == job2.id
    assert wait_status(client, job2.id, {"cancelled"}, timeout=120).status == "cancelled"

    # Another tenant sees none of it.
    other = oai(gw, OTHER)
    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.jobs.retrieve(job.id)
    assert [x.id for x in other.files.list()] == []


def test_openai_sdk_trains_a_lora_family(stack):
    """form lora through the extension object: a LoRA family, classified over
    HTTP with the same scores as gRPC Predict."""
    import sys
    server, gw, _ = stack
    client = oai(gw)
    f = client.files.create(file=("lora.jsonl", jsonl(make_rows(32, seed=4))),
                            purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=BASE, training_file=f.id, suffix="lsent:SENT",
        extra_body={"metatt": {"adapter": {"form": "lora", "ranks": [4],
                                           "projections": ["q", "v", "o"]},
                               "hparams": {"max_steps": 4, "batch_size": 8, "max_length": 32}}})
    assert job.model_extra["metatt"]["spec"]["adapter"]["form"] == "lora"
    done = wait_status(client, job.id, {"succeeded", "failed", "cancelled"})
    assert done.status == "succeeded", done
    assert "lsent:SENT" in [m.id for m in client.models.list()]
    r = requests.post(gw.url + "/classifications", headers={"Authorization": f"Bearer {TOKEN}"},
                      json={"model": "lsent:SENT", "input": ["the movie was very good"]},
                      timeout=60)
    assert r.status_code == 200, r.text
    sys.path.insert(0, str(ROOT / "client" / "python"))
    from metatt_client import Client
    with Client(f"127.0.0.1:{server.port}", token=TOKEN) as c:
        assert c.get_family("lsent").versions[-1].form == "lora"
        want = list(c.predict("lsent", "SENT", ["the movie was very good"])[0].scores)
    assert r.json()["data"][0]["scores"] == pytest.approx(want, abs=1e-6)


def _raw_exchange(port, payloads, timeout=10):
    """Sends each payload on one TCP connection (stopping if the server has
    closed it) and returns every byte the server wrote until it closed the
    connection or went quiet for `timeout` seconds."""
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        for p in payloads:
            try:
                s.sendall(p)
            except OSError:
                break
            time.sleep(0.5)
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
        except OSError:  # a reset after the close, or the quiet timeout
            pass
    return got


@pytest.mark.parametrize("purpose,token,param", [
    ("batch", TOKEN, "purpose"),                          # refused at the file part
    ("fine-tune", "wrong-key-0123456789abcdef", None),    # refused by the server (401)
    ("fine-tune", "cl\u00e9-0123456789abcdef", None),     # refused before reading (401)
])
def test_rejected_upload_does_not_poison_the_connection(stack, purpose, token, param):
    """An upload refused before its body is read (purpose is not fine-tune, a
    wrong or malformed key) used to leave the rest of the body on the socket; on a
    kept-alive connection the next request was parsed from those bytes and
    answered with httplib's bare 400. The gateway reads a refused body to its
    end, so the next request on the connection gets its own answer."""
    _, gw, _ = stack
    boundary = "metattboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n"
            f"{purpose}\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"t.jsonl\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            ).encode() + jsonl(make_rows(2000, seed=5)) + f"\r\n--{boundary}--\r\n".encode()
    assert len(body) > 64 * 1024  # far more than one read of the server's buffer
    upload = (f"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
              f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
              f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    models = f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    got = _raw_exchange(gw.port, [upload, models.encode()]).decode("utf-8", "replace")
    head, _, rest = got.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 400 " if param else "HTTP/1.1 401 "), got[:500]
    length = int(next(line.split(":", 1)[1] for line in head.split("\r\n")
                      if line.lower().startswith("content-length:")))
    assert json.loads(rest[:length])["error"]["param"] == param, rest[:length]
    # The next reply on the connection is the model list (streamed in chunks),
    # and nothing else follows it.
    second = rest[length:]
    assert second.startswith("HTTP/1.1 200 "), second[:500]
    assert f'"id":"{BASE}"' in second and second.count("HTTP/1.1 ") == 1, second[:1000]


def test_errors_in_openai_shape(stack):
    _, gw, _ = stack
    with pytest.raises(openai.AuthenticationError) as e:
        oai(gw, "wrong-key-0123456789abcdef").models.list()
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"

    client = oai(gw)
    with pytest.raises(openai.NotFoundError) as e:
        client.fine_tuning.jobs.create(model=BASE, training_file="file-nope", suffix="x:y")
    assert e.value.param == "training_file"
    with pytest.raises(openai.NotFoundError) as e:
        client.fine_tuning.jobs.create(model="no-such-model", training_file="f", suffix="y")
    assert e.value.param == "model" and e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model=BASE, training_file="f", suffix="x",
                                       hyperparameters={"n_epochs": "lots"})
    assert e.value.param == "hyperparameters.n_epochs"
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=("t.jsonl", b'{"text": "a", "label": 1}\n'), purpose="batch")
    assert e.value.param == "purpose"
    # Chat and text completions need a decoder: this gateway fronts an encoder
    # server, whose Generate refuses (FAILED_PRECONDITION naming the model
    # kind): 400 naming `model`, streamed or not (test_http_generate.py
    # covers decoder servers).
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=BASE, stream=stream,
                                           messages=[{"role": "user", "content": "hi"}])
        assert e.value.param == "model" and e.value.code == "failed_precondition"
        assert "encoder" in e.value.message and "Predict" in e.value.message, e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=BASE, prompt="hi")
    assert e.value.param == "model" and "encoder" in e.value.message
    # Chat-format JSONL uploads as a generation dataset; a job on this
    # encoder server fails, naming the model kind.
    chat = "".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                            {"role": "assistant", "content": "a"}]}) + "\n"
                   for i in range(8)).encode()
    f = client.files.create(file=("chat.jsonl", chat), purpose="fine-tune")
    assert f.model_extra["metatt"]["label_kind"] == "generation" and f.model_extra["metatt"][
        "rows"] == 8
    job = client.fine_tuning.jobs.create(model=BASE, training_file=f.id, suffix="chat:x")
    failed = wait_status(client, job.id, {"failed", "succeeded", "cancelled"}, timeout=120)
    assert failed.status == "failed" and "generation dataset" in failed.error.message, failed
    assert "encoder" in failed.error.message
    # A malformed file: the server names the bad line, nothing is stored.
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=("bad.jsonl", b'{"text": "a", "label": 1}\nnot json\n'),
                            purpose="fine-tune")
    assert "2" in e.value.message and e.value.param == "file"


def curl(*args):
    r = subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_curl_smoke(stack, tmp_path):
    _, gw, _ = stack
    auth = ["-H", f"Authorization: Bearer {TOKEN}"]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"text": t, "text_pair": "the film", "label": l}) + "\n"
                            for t, l in make_rows(16, seed=5)))
    f = json.loads(curl(*auth, "-F", "purpose=fine-tune", "-F", f"file=@{path}",
                        gw.url + "/files"))
    assert f.get("object") == "file" and f["metatt"]["rows"] == 16, f
    models = json.loads(curl(*auth, gw.url + "/models"))
    assert models["object"] == "list" and models["data"][0]["id"] == BASE
    job = json.loads(curl(*auth, "-H", "Content-Type: application/json", "-d",
                          json.dumps({"model": BASE, "training_file": f["id"], "suffix": "pairs",
                                      "metatt": {"hparams": {"max_steps": 2000}}}),
                          gw.url + "/fine_tuning/jobs"))
    assert job["object"] == "fine_tuning.job" and job["metatt"]["spec"]["tasks"][0][
        "task_name"] == "default", job
    c = json.loads(curl(*auth, "-X", "POST", gw.url + f"/fine_tuning/jobs/{job['id']}/cancel"))
    assert c["id"] == job["id"]
    # The file part before purpose: a wrong or missing purpose still refuses
    # the upload (the half-sent stream is cancelled: nothing is stored).
    before = len(json.loads(curl(*auth, gw.url + "/files"))["data"])
    bad = json.loads(curl(*auth, "-F", f"file=@{path}", "-F", "purpose=batch", gw.url + "/files"))
    assert bad["error"]["param"] == "purpose", bad
    none = json.loads(curl(*auth, "-F", f"file=@{path}", gw.url + "/files"))
    assert none["error"]["param"] == "purpose" and "required" in none["error"]["message"]
    assert len(json.loads(curl(*auth, gw.url + "/files"))["data"]) == before
    code = curl("-o", "/dev/null", "-w", "%{http_code}", gw.url + "/models")
    assert code == "401"
    missing = json.loads(curl(*auth, gw.url + "/nothing/here"))
    assert missing["error"]["code"] == "unknown_url"


def test_gateway_tls_rules(stack, tmp_path):
    server, _, _ = stack
    r = subprocess.run([str(gateway_binary()), "--listen=0.0.0.0:0",
                        f"--server=127.0.0.1:{server.port}"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "not a loopback address" in r.stderr
    r = subprocess.run([str(gateway_binary()), "--listen=127.0.0.1:0", "--server=10.1.2.3:50051"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--server_tls_ca" in r.stderr

    # HTTPS through cpp-httplib's SSLServer with a self-signed certificate.
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", "gw.key", "-out", "gw.pem"], cwd=tmp_path, check=True,
                   capture_output=True)
    gw = Gateway(server.port, extra=[f"--tls_cert={tmp_path / 'gw.pem'}",
                                     f"--tls_key={tmp_path / 'gw.key'}"]).start()
    try:
        url = f"https://127.0.0.1:{gw.port}/v1/models"
        out = json.loads(curl("--cacert", str(tmp_path / "gw.pem"), "-H",
                              f"Authorization: Bearer {TOKEN}", url))
        assert out["data"][0]["id"] == BASE
        plain = subprocess.run(["curl", "-sS", f"http://127.0.0.1:{gw.port}/v1/models"],
                               capture_output=True, text=True, timeout=30)
        assert plain.returncode != 0 or "error" in plain.stdout or plain.stdout == ""
    finally:
        gw.stop()


BIG = 12000  # more than one ListTasks page (10,000): /v1/models streams both


@pytest.fixture(scope="module")
def big_stack(tmp_path_factory, tiny_model):
    from server_harness import publish_bench_family

    data = tmp_path_factory.mktemp("http_big") / "data"
    publish_bench_family(data, tiny_model, "big", BIG)
    server = Server(data, tiny_model).start()
    gw = Gateway(server.port, extra=["--base_model=tiny"]).start()
    yield server, gw
    gw.stop()
    server.stop()


def test_models_stream_every_task_of_a_large_family(big_stack):
    _, gw = big_stack
    r = requests.get(gw.url + "/models", stream=True, timeout=120)
    assert r.status_code == 200 and r.headers.get("Transfer-Encoding") == "chunked"
    ids = [m["id"] for m in json.loads(r.content)["data"]]
    assert ids[0] == "tiny" and len(ids) == BIG + 1 and len(set(ids)) == BIG + 1
    assert ids[-1] == f"big:task{BIG - 1}"
    client = oai(gw, "no-tokens-on-this-server")
    assert len(list(client.models.list())) == BIG + 1
    last = client.models.retrieve(f"big:task{BIG - 1}")
    assert last.model_extra["metatt"]["task_index"] == BIG - 1
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("big:no-such-task")

    # Several tasks of the family on each input, one call: rows input-major.
    out = requests.post(gw.url + "/classifications", timeout=60, json={
        "model": ["big:task0", "big:task1", f"big:task{BIG - 1}"],
        "input": ["good movie", "bad plot"]}).json()
    assert [(d["index"], d["model"]) for d in out["data"]] == [
        (i, m) for i in (0, 1) for m in ("big:task0", "big:task1", f"big:task{BIG - 1}")]
