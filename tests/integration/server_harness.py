"""Helpers of the black-box server tests (tests/integration): the real
metatt-server binary on 127.0.0.1:0, datasets, a typed client. Fixtures are in
conftest.py."""
import hashlib
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

WORDS = ("good great fine nice happy bad awful poor sad ugly movie film plot actor "
         "story scene the a was is very not really quite").split()
POSITIVE = {"good", "great", "fine", "nice", "happy"}


def build_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("METATT_BUILD_DIR", ROOT / "build"))


def server_binary() -> pathlib.Path:
    p = build_dir() / "server" / "metatt-server"
    if not p.exists():
        pytest.fail(f"binary {p} not built: cmake --build <build> --target metatt-server")
    return p


def load_stubs(out):
    """The Python gRPC stubs generated from proto/ into the folder `out`
    (grpc_tools.protoc): a namespace with jobs_pb2, jobs_pb2_grpc,
    datasets_pb2, ... (the `pb` fixture; the chaos runs call it too)."""
    import importlib

    import grpc_tools
    from grpc_tools import protoc

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    rc = protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"-I{include}", f"--python_out={out}",
                      f"--grpc_python_out={out}", *protos])
    assert rc == 0, "grpc_tools.protoc failed"
    sys.path.insert(0, str(out))

    class Mods:
        pass

    m = Mods()
    for name in ("jobs", "datasets", "adapters", "inference"):
        setattr(m, f"{name}_pb2", importlib.import_module(f"metatt.v1.{name}_pb2"))
        setattr(m, f"{name}_pb2_grpc", importlib.import_module(f"metatt.v1.{name}_pb2_grpc"))
    return m


def write_tiny_bert(d, words=WORDS):
    """A random 2-layer BERT (hidden 32, 2 heads) with a small WordPiece
    vocabulary (`words`, letters, punctuation) written to the folder `d`
    (the `tiny_model` fixture; the chaos run uses it too)."""
    import torch
    from transformers import BertConfig, BertModel

    d = pathlib.Path(d)
    d.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(words) + list(letters + ".,!?")
    vocab += ["##" + c for c in letters]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                     type_vocab_size=2)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(d, safe_serialization=True)
    return d


def publish_bench_family(data_dir, model_dir, family, tasks, seed=1):
    """Publishes a random (4+1)D family with `tasks` task slices (task0, task1, ...)
    into `data_dir` with build/bench/metatt-bench-family, without training (as
    bench/load_bench.py does); a server started on `data_dir` loads it."""
    exe = build_dir() / "bench" / "metatt-bench-family"
    if not exe.exists():
        pytest.fail(f"binary {exe} not built: cmake --build <build> --target metatt-bench-family")
    r = subprocess.run([str(exe), f"--data_dir={data_dir}", f"--model_dir={model_dir}",
                        f"--family={family}", f"--tasks={tasks}", f"--seed={seed}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"metatt-bench-family failed: {r.stderr[-2000:]}"


def make_rows(n, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        pool = sorted(POSITIVE) if label else ["bad", "awful", "poor", "sad", "ugly"]
        words = [rng.choice(pool)] + [rng.choice(["the", "movie", "was", "very", "film", "plot"])
                                      for _ in range(rng.randint(2, 6))]
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def tsv_bytes(rows) -> bytes:
    return ("sentence\tlabel\n" + "".join(f"{t}\t{l}\n" for t, l in rows)).encode()


def stop_process(proc, timeout, ask=None):
    """Asks `proc` to stop (`ask()`, else SIGTERM), waits up to `timeout`
    seconds, then kills it."""
    (ask or proc.terminate)()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def drain_stderr(proc, lines):
    """Collects `proc`'s stderr lines into `lines` on a daemon thread."""
    def run():
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))

    threading.Thread(target=run, daemon=True).start()


def read_ready_ports(proc, timeout):
    """Reads `proc`'s stdout until its 'LISTENING <port>' line (the ready
    signal, printed last) or the deadline; returns {"LISTENING": port,
    "METRICS": port} for those of the two it printed (no LISTENING: it did
    not start). metatt-server and metatt-http print them alike."""
    ports = {}
    deadline = time.time() + timeout
    while time.time() < deadline and "LISTENING" not in ports:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        for word in ("LISTENING", "METRICS"):
            if line.startswith(word + " "):
                ports[word] = int(line.split()[1])
    return ports


class Server:
    """One metatt-server process on 127.0.0.1:0."""

    def __init__(self, data_dir, model_dir, extra=(), wrapper=()):
        self.data_dir = pathlib.Path(data_dir)
        self.model_dir = pathlib.Path(model_dir)
        self.extra = list(extra)
        self.wrapper = list(wrapper)  # a command prefix, e.g. strace ... (stop() signals it)
        self.proc = None
        self.port = None
        self.metrics_port = None
        self.stderr_lines = []

    def start(self, timeout=120):
        cmd = [*self.wrapper, str(server_binary()), "--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0",
               f"--data_dir={self.data_dir}", f"--model_dir={self.model_dir}", "--device=cpu",
               *self.extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        drain_stderr(self.proc, self.stderr_lines)
        ports = read_ready_ports(self.proc, timeout)
        self.port = ports.get("LISTENING")
        self.metrics_port = ports.get("METRICS")
        if self.port is None:
            self.stop()
            pytest.fail("metatt-server did not start:\n" + "\n".join(self.stderr_lines[-30:]))
        return self

    def channel(self):
        import grpc

        ch = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        grpc.channel_ready_future(ch).result(timeout=30)
        return ch

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def server_pid(self):
        """The metatt-server's pid (under a wrapper: the wrapper's child)."""
        if not self.wrapper:
            return self.proc.pid
        try:
            children = pathlib.Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            return int(children.read_text().split()[0])
        except (OSError, IndexError, ValueError):
            return self.proc.pid

    def stop(self):
        if self.proc and self.proc.poll() is None:
            stop_process(self.proc, 30, self._ask_wrapped_server if self.wrapper else None)

    def _ask_wrapped_server(self):
        # The wrapper (strace) would detach and leave the server running.
        try:
            os.kill(self.server_pid(), signal.SIGTERM)
        except ProcessLookupError:
            pass


class Client:
    def __init__(self, pb, channel):
        self.pb = pb
        self.jobs = pb.jobs_pb2_grpc.JobServiceStub(channel)
        self.datasets = pb.datasets_pb2_grpc.DatasetServiceStub(channel)
        self.adapters = pb.adapters_pb2_grpc.AdapterServiceStub(channel)
        self.inference = pb.inference_pb2_grpc.InferenceServiceStub(channel)

    def upload(self, name, data: bytes, chunk=100, **header):
        d = self.pb.datasets_pb2
        h = d.DatasetHeader(name=name, format=d.TSV, has_header=True, text_column="sentence",
                            label_column="label", **header)

        def gen():
            yield d.UploadDatasetRequest(header=h)
            for off in range(0, len(data), chunk):
                yield d.UploadDatasetRequest(chunk=data[off:off + chunk])

        return self.datasets.UploadDataset(gen(), timeout=60).dataset

    def create_job(self, family, task, dataset_id, steps=30, kind=None, key="", **hp):
        j = self.pb.jobs_pb2
        spec = j.JobSpec(family=family, kind=kind or j.TRAIN_FAMILY,
                         tasks=[j.JobTask(task_name=task, dataset_id=dataset_id, eval_fraction=0.25)],
                         adapter=j.AdapterConfig(form="4+1d", ranks=[4]),
                         hparams=j.HyperParams(max_steps=steps, batch_size=8, learning_rate=5e-3,
                                               eval_every=10, max_length=32, **hp))
        return self.jobs.CreateJob(j.CreateJobRequest(spec=spec, idempotency_key=key), timeout=30).job

    def events(self, job_id, timeout=600):
        j = self.pb.jobs_pb2
        return list(self.jobs.StreamJobEvents(j.StreamJobEventsRequest(job_id=job_id), timeout=timeout))

    def wait_state(self, job_id, states, timeout=300):
        j = self.pb.jobs_pb2
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.jobs.GetJob(j.GetJobRequest(job_id=job_id), timeout=10).job
            if job.state in states:
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} never reached {states}; last {job}")


def import_family(pb, channel, path, family):
    """ImportFamily of every file of folder `path` as `family`; the version."""
    a = pb.adapters_pb2
    stub = pb.adapters_pb2_grpc.AdapterServiceStub(channel)

    def gen():
        yield a.ImportFamilyRequest(family=family)
        for name in sorted(os.listdir(path)):
            data = (pathlib.Path(path) / name).read_bytes()
            yield a.ImportFamilyRequest(chunk=a.FamilyChunk(file_name=name, file_size=len(data),
                                                            data=data))

    return stub.ImportFamily(gen(), timeout=120).version


def token_entry(tenant, token, role=None):
    """One entry of an --auth_tokens file: the tenant, its role (None: the
    server's default, user) and the SHA-256 of its bearer token."""
    e = {"tenant": tenant, "token_sha256": hashlib.sha256(token.encode()).hexdigest()}
    if role:
        e["role"] = role
    return e


def write_tokens(path, entries, tenants=None):
    """Writes an --auth_tokens file (token_entry entries, optional per-tenant
    quotas) to `path` and returns the path."""
    cfg = {"tokens": list(entries)}
    if tenants:
        cfg["tenants"] = tenants
    path = pathlib.Path(path)
    path.write_text(json.dumps(cfg))
    return path


def tenant_clients(pb, server, tokens):
    """{name: Client} over one channel to `server`, each sending its own
    bearer token (`tokens`: name -> token)."""
    raw = server.channel()
    return {name: Client(pb, with_token(raw, tok)) for name, tok in tokens.items()}


def wait_log(server, needle, timeout=10):
    """Waits until a line of the server's stderr contains `needle`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(needle in line for line in server.stderr_lines):
            return
        time.sleep(0.05)
    raise AssertionError(f"no '{needle}' in the log:\n" + "\n".join(server.stderr_lines[-20:]))


def metric(server, name, labels=""):
    """The sum of the server's /metrics samples whose line starts with `name`
    and contains `labels` (e.g. 'finish_reason="cancelled"')."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics",
                                  timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and labels in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def with_token(channel, token):
    """`channel` sending 'authorization: Bearer <token>' on every call (the
    Python client's interceptor)."""
    if str(ROOT / "client" / "python") not in sys.path:
        sys.path.insert(0, str(ROOT / "client" / "python"))
    from metatt_client.client import bearer_channel
    return bearer_channel(channel, token)
