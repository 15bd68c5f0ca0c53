"""Generate on the real binary with the real decoder (SmolLM2-135M-Instruct,
models/ from scripts/setup.sh): a server started with a Llama --model_dir is
a decoder server. The base model streams and answers unary calls alike;
Predict is refused there (and Generate on an encoder server); a two-task
family (random cores in the family format, metatt-random-family, imported
over the API) streams two tasks at once, each exactly as alone; a stream
cancelled mid-way frees its slot; after a restart the family generates the
same text again."""
import os
import pathlib
import re
import subprocess
import threading
import time

import grpc
import pytest

from server_harness import ROOT, Server, build_dir, import_family, metric

SMOL = ROOT / "models" / "SmolLM2-135M-Instruct"
PROMPT = "What is the capital of France?"


def _require_model():
    if not (SMOL / "model.safetensors").exists():
        pytest.skip("models/SmolLM2-135M-Instruct not set up (scripts/setup.sh)")


def _random_family(out, tasks=2):
    exe = build_dir() / "server" / "runtime" / "metatt-random-family"
    if not exe.exists():
        pytest.fail(f"{exe} not built: cmake --build <build> --target metatt-random-family")
    r = subprocess.run([str(exe), f"--model_dir={SMOL}", f"--out={out}", f"--tasks={tasks}",
                        "--rank=4", "--std=0.5", "--seed=3"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr


def _request(pb, family="", task="", max_tokens=12, **kw):
    i = pb.inference_pb2
    return i.GenerateRequest(
        family=family, task=task, max_tokens=max_tokens,
        messages=i.ChatMessages(messages=[i.ChatMessage(role="user", content=PROMPT)]), **kw)


def _stream(stub, req, timeout=300):
    chunks = list(stub.GenerateStream(req, timeout=timeout))
    return "".join(c.text for c in chunks), chunks


@pytest.fixture
def decoder_server(tmp_path):
    _require_model()
    s = Server(tmp_path / "data", SMOL, extra=["--num_threads=2"]).start(timeout=300)
    yield s
    s.stop()


def test_base_model_streams_unary_and_errors(pb, decoder_server):
    ch = decoder_server.channel()
    inf = pb.inference_pb2_grpc.InferenceServiceStub(ch)
    text, chunks = _stream(inf, _request(pb))
    assert "Paris" in text, text
    last = chunks[-1]
    assert last.finish_reason in ("stop", "length")
    assert last.usage.prompt_tokens > 10  # the chat template's system prompt and turn markers
    assert last.usage.completion_tokens == sum(len(c.token_ids) for c in chunks)
    assert last.usage.completion_tokens <= 12
    assert len([c for c in chunks if c.text]) > 2, "text must arrive in several chunks"
    # The unary form answers the same text (greedy).
    r = inf.Generate(_request(pb), timeout=300)
    assert r.text == text and r.finish_reason == last.finish_reason
    assert r.usage.completion_tokens == last.usage.completion_tokens
    # A stop sequence ends the text before it.
    r2 = inf.Generate(_request(pb, stop=["Paris"]), timeout=300)
    assert r2.finish_reason == "stop" and "Paris" not in r2.text and text.startswith(r2.text)
    # Predict on a decoder server: refused, naming the model kind.
    i = pb.inference_pb2
    with pytest.raises(grpc.RpcError) as e:
        inf.Predict(i.PredictRequest(inputs=[i.PredictInput(task="x", text="hi")]), timeout=30)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "decoder" in e.value.details() and "Generate" in e.value.details()
    # Unknown family / task, over-long prompt (names the limit), bad sampling.
    with pytest.raises(grpc.RpcError) as e:
        inf.Generate(_request(pb, family="nope", task="t0"), timeout=30)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        inf.Generate(i.GenerateRequest(prompt="word " * 9000, max_tokens=4), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "8192" in e.value.details() and "prompt" in e.value.details(), e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        inf.Generate(_request(pb, top_p=1.5), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in e.value.details()
    # Metrics: generated tokens and time to first token.
    assert metric(decoder_server, "metatt_generated_tokens_total") >= 2 * last.usage.completion_tokens
    assert metric(decoder_server, "metatt_time_to_first_token_seconds_count") >= 3


def test_two_tasks_at_once_cancel_and_restart(pb, tmp_path):
    _require_model()
    fam_dir = tmp_path / "fam"
    _random_family(fam_dir)
    s = Server(tmp_path / "data", SMOL, extra=["--num_threads=2"]).start(timeout=300)
    try:
        ch = s.channel()
        v = import_family(pb, ch, fam_dir, "gen")
        assert [t.name for t in v.tasks] == ["t0", "t1"]
        inf = pb.inference_pb2_grpc.InferenceServiceStub(ch)
        # Each task alone first.
        alone = {t: _stream(inf, _request(pb, "gen", t))[0] for t in ("t0", "t1")}
        base = _stream(inf, _request(pb))[0]
        assert alone["t0"] != alone["t1"] and base not in (alone["t0"], alone["t1"]), alone
        # Two streams of two tasks at once: the same text each (greedy).
        got = {}

        def run(task):
            text, chunks = _stream(inf, _request(pb, "gen", task))
            got[task] = text
            assert chunks[-1].task == task and chunks[-1].family == "gen"

        threads = [threading.Thread(target=run, args=(t,)) for t in ("t0", "t1")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == alone
        # A stream cancelled mid-way: the server ends the sequence (finish
        # "cancelled" in the metrics) and keeps serving.
        before = metric(s, "metatt_generate_requests_total", 'finish_reason="cancelled"')
        call = inf.GenerateStream(_request(pb, "gen", "t1", max_tokens=400), timeout=300)
        n = 0
        for c in call:
            n += len(c.token_ids)
            if n >= 3:
                break
        call.cancel()
        deadline = time.time() + 60
        while time.time() < deadline:
            if metric(s, "metatt_generate_requests_total", 'finish_reason="cancelled"') > before:
                break
            time.sleep(0.2)
        assert metric(s, "metatt_generate_requests_total",
                       'finish_reason="cancelled"') == before + 1
        t0 = time.time()
        assert _stream(inf, _request(pb, "gen", "t0"))[0] == alone["t0"]
        assert time.time() - t0 < 60
        # The generated-token counter did not count the 400 tokens asked for.
        assert metric(s, "metatt_generated_tokens_total") < 200
    finally:
        s.stop()
    # Restart: the family is reloaded and generates the same text.
    s = Server(tmp_path / "data", SMOL, extra=["--num_threads=2"]).start(timeout=300)
    try:
        inf = pb.inference_pb2_grpc.InferenceServiceStub(s.channel())
        assert inf.Generate(_request(pb, "gen", "t1"), timeout=300).text == alone["t1"]
    finally:
        s.stop()


def test_generate_on_an_encoder_server_is_refused(pb, client):
    i = pb.inference_pb2
    with pytest.raises(grpc.RpcError) as e:
        client.inference.Generate(i.GenerateRequest(prompt="hi"), timeout=30)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "encoder" in e.value.details() and "Predict" in e.value.details()


def test_cli_and_python_client_generate(decoder_server):
    import sys
    sys.path.insert(0, str(ROOT / "client" / "python"))
    from metatt_client import Client

    # metattctl generate streams the text to the terminal, the usage to stderr.
    exe = build_dir() / "client" / "metattctl"
    if not exe.exists():
        pytest.fail(f"binary {exe} not built: cmake --build <build> --target metattctl")
    r = subprocess.run([str(exe), "generate", f"--server=127.0.0.1:{decoder_server.port}",
                        f"--chat={PROMPT}", "--max_tokens=12"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert re.search(r"base model: (stop|length), \d+ prompt \+ \d+ completion tokens", r.stderr), r.stderr
    # The Python client: an iterator of chunks; the unary form gives the same text.
    with Client(f"127.0.0.1:{decoder_server.port}") as c:
        msgs = [("user", PROMPT)]
        chunks = list(c.generate(messages=msgs, max_tokens=12))
        text = "".join(ch.text for ch in chunks)
        assert text.strip() == r.stdout.strip()
        assert chunks[-1].finish_reason in ("stop", "length")
        assert c.generate_text(messages=[{"role": "user", "content": PROMPT}],
                               max_tokens=12).text == text
        # Seeded sampling repeats itself.
        a = c.generate_text(prompt="Once upon a time", max_tokens=10, temperature=0.9, top_k=40,
                            seed=5)
        b = c.generate_text(prompt="Once upon a time", max_tokens=10, temperature=0.9, top_k=40,
                            seed=5)
        assert a.text == b.text and a.usage.completion_tokens == 10
        # Leaving the loop early cancels the stream.
        it = c.generate(prompt="Count to one hundred:", max_tokens=300)
        next(it)
        it.close()


def test_family_of_the_other_model_kind(pb, tmp_path, tiny_model):
    """An encoder family in the store of a decoder server: Generate names why."""
    _require_model()
    exe = build_dir() / "server" / "runtime" / "metatt-random-family"
    r = subprocess.run([str(exe), f"--model_dir={tiny_model}", f"--out={tmp_path / 'enc'}",
                        "--tasks=1", "--rank=2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    data = tmp_path / "data"
    s = Server(data, tiny_model).start()
    try:
        import_family(pb, s.channel(), tmp_path / "enc", "enc")
    finally:
        s.stop()
    s = Server(data, SMOL, extra=["--num_threads=2"]).start(timeout=300)
    try:
        inf = pb.inference_pb2_grpc.InferenceServiceStub(s.channel())
        with pytest.raises(grpc.RpcError) as e:
            inf.Generate(_request(pb, "enc", "t0"), timeout=60)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, "\n".join(s.stderr_lines)
        assert "encoder family" in e.value.details() and "decoder" in e.value.details()
    finally:
        s.stop()
