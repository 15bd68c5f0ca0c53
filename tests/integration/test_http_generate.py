"""Chat and text completions through the OpenAI-compatible gateway
(metatt-http) in front of a real decoder server: a tiny random Llama
(transformers-made, SmolLM2's tokenizer and chat template) with a random
two-task MetaTT family (metatt-random-family, imported over gRPC), bearer
tokens on, --max_running_sequences=1. Driven by the official `openai`
package and by curl:

* streamed chat chunks concatenate to the text of the unary gRPC Generate
  for the same greedy or seeded settings; the first chunk carries the role,
  include_usage adds the usage chunk; the unary form; text completions;
* errors in OpenAI's shape naming the field (unknown model 404, bad
  temperature, n > 1, top_k in the `metatt` extension), a wrong key 401;
* `curl -N` shows the server-sent events and `[DONE]`;
* a client that leaves mid-stream cancels the gRPC call: the server counts a
  cancelled sequence and serves the next request at once (one slot);
* the fine-tuning flow of the SDK with chat-format JSONL on the decoder:
  upload, job, events, succeeded, then a chat completion of the new task.

The encoder-family refusal (400 naming `model`) is in test_http_openai.py,
whose gateway fronts an encoder server."""
import json
import os
import pathlib
import subprocess
import time

import grpc
import openai
import pytest
import requests

from http_harness import Gateway, make_tiny_decoder, wait_job_events
from server_harness import (ROOT, Server, build_dir, import_family, metric, token_entry,
                            with_token, write_tokens)

SMOL = ROOT / "models" / "SmolLM2-135M-Instruct"
TOKEN = "acme-token-0123456789abcdef"
BASE = "tiny-llama"
QUESTION = "Which option is apple?"


@pytest.fixture(scope="module")
def stack(pb, tmp_path_factory):
    if not (SMOL / "tokenizer.json").exists():
        pytest.skip("models/SmolLM2-135M-Instruct not set up (scripts/setup.sh)")
    d = tmp_path_factory.mktemp("http_gen")
    model = make_tiny_decoder(d / "tiny", SMOL, max_positions=8192)
    exe = build_dir() / "server" / "runtime" / "metatt-random-family"
    if not exe.exists():
        pytest.fail(f"{exe} not built: cmake --build <build> --target metatt-random-family")
    r = subprocess.run([str(exe), f"--model_dir={model}", f"--out={d / 'fam'}", "--tasks=2",
                        "--rank=4", "--std=0.5", "--seed=3"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    tokens = write_tokens(d / "tokens.json", [token_entry("acme", TOKEN, "user")])
    server = Server(d / "data", model, extra=[f"--auth_tokens={tokens}", "--num_threads=1",
                                              "--max_running_sequences=1"]).start(timeout=300)
    ch = with_token(server.channel(), TOKEN)
    v = import_family(pb, ch, d / "fam", "gen")
    assert [t.name for t in v.tasks] == ["t0", "t1"]
    gw = Gateway(server.port, extra=[f"--base_model={BASE}"]).start()
    yield server, gw, ch
    gw.stop()
    server.stop()


def oai(gw, key=TOKEN):
    return openai.OpenAI(base_url=gw.url, api_key=key, max_retries=0, timeout=120)


def grpc_generate(pb, ch, family, task, chat=True, text=QUESTION, **kw):
    i = pb.inference_pb2
    stub = pb.inference_pb2_grpc.InferenceServiceStub(ch)
    if chat:
        kw["messages"] = i.ChatMessages(messages=[i.ChatMessage(role="user", content=text)])
    else:
        kw["prompt"] = text
    return stub.Generate(i.GenerateRequest(family=family, task=task, **kw), timeout=120)


def test_chat_stream_equals_grpc_generate(pb, stack):
    _, gw, ch = stack
    client = oai(gw)
    want = grpc_generate(pb, ch, "gen", "t0", max_tokens=48, temperature=0)
    assert want.usage.completion_tokens > 0
    stream = client.chat.completions.create(
        model="gen:t0", messages=[{"role": "user", "content": QUESTION}], max_tokens=48,
        temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    content = [c for c in chunks if c.choices]
    assert content[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in content[1:])
    assert all(c.object == "chat.completion.chunk" and c.model == "gen:t0" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert len(content) >= 2, "tokens must arrive in several events"
    assert "".join(c.choices[0].delta.content or "" for c in content) == want.text
    assert content[-1].choices[0].finish_reason == want.finish_reason
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    # include_usage: one more chunk, no choices, the usage.
    assert not chunks[-1].choices
    assert chunks[-1].usage.completion_tokens == want.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == want.usage.prompt_tokens
    assert chunks[-1].usage.total_tokens == (want.usage.prompt_tokens +
                                             want.usage.completion_tokens)

    # The unary form: the same text, finish reason and usage.
    r = client.chat.completions.create(
        model="gen:t0", messages=[{"role": "user", "content": QUESTION}], max_tokens=48,
        temperature=0)
    assert r.object == "chat.completion" and r.model == "gen:t0"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.completion_tokens == want.usage.completion_tokens

    # Another task of the family answers differently; seeded sampling with
    # top_k (the metatt extension) is the same over HTTP and gRPC.
    other = client.chat.completions.create(
        model="gen:t1", messages=[{"role": "user", "content": QUESTION}], max_tokens=48,
        temperature=0)
    assert other.choices[0].message.content == grpc_generate(
        pb, ch, "gen", "t1", max_tokens=48, temperature=0).text
    assert other.choices[0].message.content != want.text
    seeded = grpc_generate(pb, ch, "gen", "t1", max_tokens=24, temperature=0.9, top_p=0.95,
                           top_k=40, seed=5)
    got = client.chat.completions.create(
        model="gen:t1", messages=[{"role": "user", "content": QUESTION}], max_tokens=24,
        temperature=0.9, top_p=0.95, seed=5, stream=True, extra_body={"metatt": {"top_k": 40}})
    assert "".join(c.choices[0].delta.content or "" for c in got if c.choices) == seeded.text

    # The base model without an adapter: the model id /v1/models lists first.
    ids = [m.id for m in client.models.list()]
    assert ids[0] == BASE and "gen:t0" in ids and "gen:t1" in ids
    assert client.models.retrieve("gen:t0").model_extra["metatt"]["kind"] == "decoder"
    base = client.chat.completions.create(
        model=BASE, messages=[{"role": "user", "content": QUESTION}], max_completion_tokens=16,
        temperature=0)
    assert base.choices[0].message.content == grpc_generate(
        pb, ch, "", "", max_tokens=16, temperature=0).text
    assert base.usage.completion_tokens <= 16


def test_text_completions_and_stop(pb, stack):
    _, gw, ch = stack
    client = oai(gw)
    want = grpc_generate(pb, ch, "gen", "t0", chat=False, text="Once upon a time",
                         max_tokens=32, temperature=0)
    r = client.completions.create(model="gen:t0", prompt="Once upon a time", max_tokens=32,
                                  temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == want.usage.prompt_tokens
    s = client.completions.create(model="gen:t0", prompt="Once upon a time", max_tokens=32,
                                  temperature=0, stream=True)
    pieces = list(s)
    assert all(p.object == "text_completion" for p in pieces)
    assert "".join(p.choices[0].text for p in pieces) == want.text
    assert pieces[-1].choices[0].finish_reason == want.finish_reason
    # A stop sequence (a piece of the greedy text) ends the text before it.
    assert len(want.text) > 4
    cut = want.text[2:4]
    stopped = client.completions.create(model="gen:t0", prompt="Once upon a time",
                                        max_tokens=32, temperature=0, stop=[cut])
    assert stopped.choices[0].finish_reason == "stop"
    assert cut not in stopped.choices[0].text and want.text.startswith(stopped.choices[0].text)


def test_errors_name_the_field(stack):
    _, gw, _ = stack
    client = oai(gw)
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gen:no-such-task", messages=msgs)
    assert e.value.param == "model" and e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope:t0", messages=msgs, stream=True)
    assert e.value.param == "model" and e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4o", prompt="hi")
    assert e.value.param == "model" and e.value.code == "model_not_found"
    # Ranges are the server's: its INVALID_ARGUMENT names the field.
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gen:t0", messages=msgs, temperature=-1)
    assert e.value.param == "temperature" and e.value.code == "invalid_argument"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gen:t0", messages=msgs, top_p=2, stream=True)
    assert e.value.param == "top_p"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gen:t0", messages=msgs,
                                       extra_body={"metatt": {"top_k": -3}})
    assert e.value.param == "metatt.top_k"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gen:t0", messages=msgs, max_completion_tokens=0)
    assert e.value.param == "max_completion_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gen:t0", messages=msgs, n=2)
    assert e.value.param == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gen:t0", messages=[{"role": "", "content": "x"}])
    assert e.value.param == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="gen:t0", prompt="x" * 100, max_tokens=4,
                                  extra_body={"metatt": {"no_such": 1}})
    assert e.value.param == "metatt.no_such"
    r = requests.post(gw.url + "/chat/completions", headers={"Authorization": f"Bearer {TOKEN}"},
                      json={"model": "gen:t0"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = requests.post(gw.url + "/completions", headers={"Authorization": f"Bearer {TOKEN}"},
                      json={"model": "gen:t0", "prompt": [1, 2, 3]}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    # A wrong key: 401 from the server's token check, in the SDK's type.
    with pytest.raises(openai.AuthenticationError) as e:
        oai(gw, "wrong-key-0123456789abcdef").chat.completions.create(
            model="gen:t0", messages=msgs, stream=True)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"


def test_curl_streams_server_sent_events(stack):
    _, gw, _ = stack
    body = {"model": "gen:t0", "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 24, "temperature": 0, "stream": True}
    r = subprocess.run(["curl", "-sS", "-N", "-D", "-", gw.url + "/chat/completions",
                        "-H", f"Authorization: Bearer {TOKEN}",
                        "-H", "Content-Type: application/json", "-d", json.dumps(body)],
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    head, _, events = r.stdout.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200") and "Content-Type: text/event-stream" in head, head
    lines = [x for x in events.split("\n") if x]
    assert all(x.startswith("data: ") for x in lines), lines
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(x[6:]) for x in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert events.count("\n\n") == len(lines)  # one blank line after every event
    # The unary form over curl: the same text.
    body["stream"] = False
    one = json.loads(subprocess.run(
        ["curl", "-sS", gw.url + "/chat/completions", "-H", f"Authorization: Bearer {TOKEN}",
         "-H", "Content-Type: application/json", "-d", json.dumps(body)],
        capture_output=True, text=True, timeout=120).stdout)
    assert one["choices"][0]["message"]["content"] == "".join(
        c["choices"][0]["delta"]["content"] for c in chunks)


def test_client_leaving_mid_stream_frees_the_slot(pb, stack):
    """--max_running_sequences=1: a stream of thousands of tokens whose client
    closes the connection after three events. The gateway cancels the gRPC
    call, so the server ends the sequence as cancelled and the next request
    runs at once instead of waiting for the abandoned one to finish."""
    server, gw, ch = stack
    client = oai(gw)
    msgs = [{"role": "user", "content": "Count to ten thousand."}]
    # Greedy decoding of this request runs to its length (no end-of-text):
    # what the abandoned stream would have cost.
    t0 = time.time()
    full = grpc_generate(pb, ch, "gen", "t0", text=msgs[0]["content"], max_tokens=6000,
                         temperature=0)
    full_s = time.time() - t0
    assert full.finish_reason == "length" and full.usage.completion_tokens == 6000
    cancelled = metric(server, "metatt_generate_requests_total", 'finish_reason="cancelled"')
    stream = client.chat.completions.create(model="gen:t0", messages=msgs, max_tokens=6000,
                                            temperature=0, stream=True)
    n = 0
    for _ in stream:
        n += 1
        if n == 3:
            break
    stream.close()  # the SDK closes the HTTP connection
    left = time.time()
    deadline = left + 60
    while time.time() < deadline:
        if metric(server, "metatt_generate_requests_total",
                  'finish_reason="cancelled"') > cancelled:
            break
        time.sleep(0.05)
    freed_s = time.time() - left
    assert metric(server, "metatt_generate_requests_total",
                  'finish_reason="cancelled"') == cancelled + 1
    assert metric(server, "metatt_generate_in_flight") == 0
    # The one slot is free: a follow-up runs now.
    t1 = time.time()
    r = client.chat.completions.create(model="gen:t1", messages=[{"role": "user",
                                                                  "content": "hi"}],
                                       max_tokens=4, temperature=0)
    follow_s = time.time() - t1
    assert r.usage.completion_tokens >= 1
    print(f"\nfull 6000-token generation {full_s:.2f} s; slot freed {freed_s:.2f} s after the "
          f"client left; follow-up answered in {follow_s:.2f} s")
    assert freed_s < full_s / 2 and follow_s < full_s / 2


def chat_rows(n):
    """Chat-format JSONL lines: the answer repeats the question's word."""
    words = ["apple", "river", "stone", "cloud", "tiger", "piano"]
    rows = []
    for k in range(n):
        w = words[k % len(words)]
        rows.append({"messages": [{"role": "user", "content": f"Say the word {w}."},
                                  {"role": "assistant", "content": f"{w}"}]})
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_sdk_fine_tunes_a_decoder_family_from_chat_jsonl(pb, stack):
    _, gw, ch = stack
    client = oai(gw)
    f = client.files.create(file=("chat.jsonl", chat_rows(24)), purpose="fine-tune")
    assert f.model_extra["metatt"]["label_kind"] == "generation"
    assert f.model_extra["metatt"]["rows"] == 24
    job = client.fine_tuning.jobs.create(
        model=BASE, training_file=f.id, suffix="chat:words",
        hyperparameters={"n_epochs": 1, "batch_size": 4},
        extra_body={"metatt": {"adapter": {"form": "4+1d", "ranks": [4]},
                               "hparams": {"max_length": 64}}})
    assert job.model_extra["metatt"]["spec"]["hparams"]["max_steps"] == "6"
    events, messages = wait_job_events(client, job.id)
    assert messages[0].startswith("Job succeeded"), messages
    assert any(e.type == "metrics" and e.data.get("step") == 6 for e in events.data), messages
    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded" and done.fine_tuned_model == "chat:words"
    assert "chat:words" in [m.id for m in client.models.list()]
    want = grpc_generate(pb, ch, "chat", "words", text="Say the word tiger.", max_tokens=8,
                         temperature=0)
    got = client.chat.completions.create(
        model=done.fine_tuned_model, messages=[{"role": "user", "content": "Say the word tiger."}],
        max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in got if c.choices) == want.text
    assert want.usage.completion_tokens >= 1
