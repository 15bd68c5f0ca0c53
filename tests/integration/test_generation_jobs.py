"""Generation tasks trained over gRPC on a decoder server (issue 18,
training), end to end on the real binary with a tiny random Llama (GQA,
transformers-made) carrying SmolLM2's tokenizer and chat template:

* a generation dataset (label_kind GENERATION; instruction records, as
  ../shared/data/commonsense/) uploads; a bad record is refused naming its
  line and field; an encoder (classification) dataset is refused on a
  decoder server, naming the model kind;
* a TRAIN_FAMILY job trains a (4+1)D MetaTT family over q,k,v,o,gate,up,down
  with the completion-only loss, evaluates by answer accuracy (greedy
  generation), publishes a head-less family; the loss goes down;
* an ADD_TASK job adds a second task with every shared core frozen;
* both tasks generate (Generate RPC), and after a restart the family loads
  again and generates the same text.

Skips only when set-up has not laid out models/SmolLM2-135M-Instruct (its
tokenizer files are used)."""
import json
import random
import shutil

import grpc
import pytest

from server_harness import ROOT, Client, Server

SMOL = ROOT / "models" / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory):
    if not (SMOL / "tokenizer.json").exists():
        pytest.skip("models/SmolLM2-135M-Instruct not set up (scripts/setup.sh)")
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    out = tmp_path_factory.mktemp("tiny_decoder")
    tok = AutoTokenizer.from_pretrained(SMOL)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (SMOL / f).exists():
            shutil.copy(SMOL / f, out / f)
    return out


def instruction_rows(n, seed):
    """A learnable toy: the answer is the option that repeats the question's word."""
    rng = random.Random(seed)
    words = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "chair"]
    rows = []
    for _ in range(n):
        w = rng.choice(words)
        options = rng.sample([x for x in words if x != w], 3) + [w]
        rng.shuffle(options)
        k = options.index(w) + 1
        rows.append({"instruction": f"Which option is {w}?\n\n" + " ".join(
            f"Answer{i + 1}: {o}" for i, o in enumerate(options)) +
            "\n\nAnswer format: answer1/answer2/answer3/answer4",
            "input": "", "output": f"the correct answer is answer{k}", "answer": f"answer{k}"})
    return rows


def upload_generation(pb, client, name, rows, fmt="instruction"):
    d = pb.datasets_pb2
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    # format stays the harness's TSV: a generation dataset is JSONL or a JSON
    # array whatever the header says (the column fields are ignored).
    return client.upload(name, data, label_kind=d.GENERATION, generation_format=fmt)


def job_spec(pb, family, task, train_id, eval_id, kind=None, steps=12):
    j = pb.jobs_pb2
    return j.JobSpec(
        family=family, kind=kind or j.TRAIN_FAMILY,
        tasks=[j.JobTask(task_name=task, dataset_id=train_id, eval_dataset_id=eval_id)],
        adapter=j.AdapterConfig(form="4+1d", ranks=[4],
                                projections=["q", "k", "v", "o", "gate", "up_proj", "down_proj"]),
        hparams=j.HyperParams(max_steps=steps, batch_size=4, learning_rate=1e-2, eval_every=6,
                              max_length=128, grad_clip=0))


def generate(pb, channel, family, task):
    i = pb.inference_pb2
    stub = pb.inference_pb2_grpc.InferenceServiceStub(channel)
    r = stub.Generate(i.GenerateRequest(
        family=family, task=task, max_tokens=8,
        messages=i.ChatMessages(messages=[i.ChatMessage(role="user", content="Which option is apple?")])),
        timeout=120)
    return r


def test_generation_jobs_end_to_end(pb, tiny_decoder, tmp_path):
    j = pb.jobs_pb2
    d = pb.datasets_pb2
    server = Server(tmp_path / "data", tiny_decoder, extra=["--num_threads=2"]).start(timeout=300)
    try:
        client = Client(pb, server.channel())
        train = upload_generation(pb, client, "toy-train", instruction_rows(48, 0))
        assert train.num_rows == 48 and train.label_kind == d.GENERATION
        test = upload_generation(pb, client, "toy-test", instruction_rows(8, 1))

        # A bad record: refused at upload, naming the line and the field.
        rows = instruction_rows(3, 2)
        del rows[1]["output"]
        with pytest.raises(grpc.RpcError) as e:
            upload_generation(pb, client, "bad", rows)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "line 2" in e.value.details() and "'output'" in e.value.details(), e.value.details()

        # A classification dataset cannot train on a decoder server.
        tsv = client.upload("cls", b"sentence\tlabel\ngood\t1\nbad\t0\nok\t1\nmeh\t0\n")
        job = client.jobs.CreateJob(j.CreateJobRequest(
            spec=job_spec(pb, "cls", "c", tsv.id, "")), timeout=30).job
        done = client.wait_state(job.id, (j.FAILED, j.SUCCEEDED), timeout=120)
        assert done.state == j.FAILED and "decoder" in done.failure_reason, done

        job = client.jobs.CreateJob(j.CreateJobRequest(
            spec=job_spec(pb, "toy", "pick", train.id, test.id)), timeout=30).job
        events = client.events(job.id)
        states = [e.state for e in events if e.WhichOneof("event") == "state"]
        assert states[-1].state == j.SUCCEEDED, states[-1]
        progress = [e.progress for e in events if e.WhichOneof("event") == "progress"]
        assert progress[-1].step == 12
        losses = [p.loss for p in progress]
        assert losses[-1] < losses[0], losses
        evals = [e.eval for e in events if e.WhichOneof("event") == "eval"]
        assert evals and "pick/answer_accuracy" in evals[-1].metrics, evals
        assert 0.0 <= evals[-1].metrics["pick/answer_accuracy"] <= 1.0

        a = pb.adapters_pb2
        fams = client.adapters.ListFamilies(a.ListFamiliesRequest()).families
        fam = [f for f in fams if f.name == "toy"][0]
        assert [t.name for t in fam.versions[-1].tasks] == ["pick"]
        before = generate(pb, server.channel(), "toy", "pick")
        assert before.usage.completion_tokens > 0

        # Add a task: shared cores frozen; the family gets version 2 with both.
        add = upload_generation(pb, client, "toy-add", instruction_rows(24, 3))
        job = client.jobs.CreateJob(j.CreateJobRequest(
            spec=job_spec(pb, "toy", "pick2", add.id, test.id, kind=j.ADD_TASK, steps=6)),
            timeout=30).job
        events = client.events(job.id)
        states = [e.state for e in events if e.WhichOneof("event") == "state"]
        assert states[-1].state == j.SUCCEEDED, states[-1]
        tasks = client.adapters.ListTasks(a.ListTasksRequest(family="toy")).tasks
        assert [t.name for t in tasks] == ["pick", "pick2"]
        r2 = generate(pb, server.channel(), "toy", "pick2")
        assert r2.usage.completion_tokens > 0
        again = generate(pb, server.channel(), "toy", "pick")
        assert again.text == before.text  # the first task is unchanged by the added one
    finally:
        server.stop()

    # Restart: the head-less family loads and generates the same text.
    server = Server(tmp_path / "data", tiny_decoder, extra=["--num_threads=2"]).start(timeout=300)
    try:
        after = generate(pb, server.channel(), "toy", "pick")
        assert after.text == before.text
    finally:
        server.stop()
