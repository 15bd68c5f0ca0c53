"""A small, blocking client: upload, submit, follow, predict (+ list/get/cancel)."""
import collections
import os
import sys
import time
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import grpc

from . import codegen

if codegen.stale():
    codegen.generate()
if str(codegen.GEN) not in sys.path:
    sys.path.insert(0, str(codegen.GEN))

from metatt.v1 import adapters_pb2, adapters_pb2_grpc  # noqa: E402
from metatt.v1 import datasets_pb2, datasets_pb2_grpc  # noqa: E402
from metatt.v1 import inference_pb2, inference_pb2_grpc  # noqa: E402
from metatt.v1 import jobs_pb2, jobs_pb2_grpc  # noqa: E402

pb = {"jobs": jobs_pb2, "datasets": datasets_pb2, "adapters": adapters_pb2,
      "inference": inference_pb2}

CHUNK = 1 << 20
TERMINAL = {jobs_pb2.SUCCEEDED, jobs_pb2.FAILED, jobs_pb2.CANCELLED}


class MetattError(Exception):
    """A failed RPC: .code is the grpc.StatusCode, str() the server's message."""

    def __init__(self, err: grpc.RpcError):
        self.code = err.code()
        super().__init__(f"{self.code.name}: {err.details()}")


def _call(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except grpc.RpcError as e:  # pragma: no cover - exercised by tests through subclasses
        raise MetattError(e) from None


class _Progress:
    def __init__(self, total: int, label: str, enabled: bool):
        self.total, self.label, self.enabled, self.done = max(total, 1), label, enabled, 0

    def update(self, n: int):
        self.done += n
        if self.enabled:
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(frac * 30)
            sys.stderr.write(f"\r{self.label} [{bar:<30}] {frac * 100:5.1f}% {self.done}/{self.total} B")
            if self.done >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


class _CallDetails(collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                         "compression")), grpc.ClientCallDetails):
    pass


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call."""

    def __init__(self, token: str):
        self._md = ("authorization", f"Bearer {token}")

    def _details(self, d):
        md = list(d.metadata or []) + [self._md]
        return _CallDetails(d.method, d.timeout, md, d.credentials,
                            getattr(d, "wait_for_ready", None), getattr(d, "compression", None))

    def intercept_unary_unary(self, cont, d, req):
        return cont(self._details(d), req)

    def intercept_unary_stream(self, cont, d, req):
        return cont(self._details(d), req)

    def intercept_stream_unary(self, cont, d, it):
        return cont(self._details(d), it)

    def intercept_stream_stream(self, cont, d, it):
        return cont(self._details(d), it)


def bearer_channel(channel: grpc.Channel, token: str) -> grpc.Channel:
    """`channel` sending ``authorization: Bearer <token>`` on every call (for
    callers that use the generated stubs directly)."""
    return grpc.intercept_channel(channel, _BearerToken(token))


def _read(path):
    with open(path, "rb") as f:
        return f.read()


DEFAULT_TIMEOUT = 60.0


class Client:
    """``token`` (default ``$METATT_TOKEN``) is sent as a bearer token on every
    call; ``root_certificates`` (PEM path) switches to TLS, ``client_cert`` /
    ``client_key`` (PEM paths) add a client certificate for mutual TLS.

    ``timeout`` is the deadline in seconds of every unary call and upload
    (default 60; ``None`` or 0 = none); each method also takes ``timeout=`` to
    override it for that call. ``follow`` streams have none unless given."""

    def __init__(self, target: str = "127.0.0.1:50051", timeout: Optional[float] = DEFAULT_TIMEOUT,
                 channel: Optional[grpc.Channel] = None, token: Optional[str] = None,
                 root_certificates: Optional[str] = None, client_cert: Optional[str] = None,
                 client_key: Optional[str] = None):
        options = [("grpc.max_send_message_length", 64 << 20),
                   ("grpc.max_receive_message_length", 64 << 20)]
        if channel is None:
            if root_certificates:
                creds = grpc.ssl_channel_credentials(
                    root_certificates=_read(root_certificates),
                    private_key=_read(client_key) if client_key else None,
                    certificate_chain=_read(client_cert) if client_cert else None)
                channel = grpc.secure_channel(target, creds, options=options)
            else:
                channel = grpc.insecure_channel(target, options=options)
        token = token if token is not None else os.environ.get("METATT_TOKEN", "")
        self._raw_channel = channel
        self.channel = bearer_channel(channel, token) if token else channel
        self.timeout = timeout or None
        self.jobs = jobs_pb2_grpc.JobServiceStub(self.channel)
        self.datasets = datasets_pb2_grpc.DatasetServiceStub(self.channel)
        self.adapters = adapters_pb2_grpc.AdapterServiceStub(self.channel)
        self.inference = inference_pb2_grpc.InferenceServiceStub(self.channel)

    def _deadline(self, timeout: Optional[float]) -> Optional[float]:
        """A call's deadline: its own ``timeout`` (0 = none), else the client's."""
        if timeout is None:
            return self.timeout
        return timeout or None

    def close(self):
        self._raw_channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- datasets ---------------------------------------------------------------
    def upload(self, path: Union[str, os.PathLike], name: str, text_column: str,
               label_column: str, text_pair_column: str = "", fmt: str = "tsv",
               has_header: bool = True, regression: bool = False, quoting: bool = False,
               progress: bool = False, data: Optional[bytes] = None,
               timeout: Optional[float] = None):
        """Streams a file (or `data`) in 1 MiB chunks; returns the Dataset."""
        blob = data if data is not None else open(path, "rb").read()
        header = datasets_pb2.DatasetHeader(
            name=name, format=getattr(datasets_pb2, fmt.upper()), has_header=has_header,
            text_column=text_column, text_pair_column=text_pair_column,
            label_column=label_column, quoting=quoting,
            label_kind=datasets_pb2.REGRESSION if regression else datasets_pb2.CLASSIFICATION)
        bar = _Progress(len(blob), f"upload {name}", progress)

        def gen():
            yield datasets_pb2.UploadDatasetRequest(header=header)
            for i in range(0, len(blob), CHUNK):
                chunk = blob[i:i + CHUNK]
                bar.update(len(chunk))
                yield datasets_pb2.UploadDatasetRequest(chunk=chunk)

        return _call(self.datasets.UploadDataset, gen(), timeout=self._deadline(timeout)).dataset

    def list_datasets(self, timeout: Optional[float] = None):
        return list(_call(self.datasets.ListDatasets, datasets_pb2.ListDatasetsRequest(),
                          timeout=self._deadline(timeout)).datasets)

    # -- jobs -------------------------------------------------------------------
    def submit(self, family: str, task: str = "", dataset_id: str = "", kind: str = "train",
               tasks: Sequence[Tuple[str, str]] = (), form: str = "",
               ranks: Sequence[int] = (), projections: Sequence[str] = (),
               eval_dataset_id: str = "", idempotency_key: str = "",
               timeout: Optional[float] = None, **hparams):
        """kind: train | add_task | multi_task. `tasks` = [(task_name, dataset_id)]
        for multi-task jobs; hparams are HyperParams fields (max_steps, ...).
        Whatever is left out (form "", ranks (), any hparam) is "auto": the
        server's default for the form (server/training/recipe.cc)."""
        kinds = {"train": jobs_pb2.TRAIN_FAMILY, "add_task": jobs_pb2.ADD_TASK,
                 "multi_task": jobs_pb2.MULTI_TASK}
        job_tasks = [jobs_pb2.JobTask(task_name=t, dataset_id=d) for t, d in tasks]
        if task:
            job_tasks.insert(0, jobs_pb2.JobTask(task_name=task, dataset_id=dataset_id,
                                                 eval_dataset_id=eval_dataset_id))
        spec = jobs_pb2.JobSpec(kind=kinds[kind], family=family, tasks=job_tasks,
                                adapter=jobs_pb2.AdapterConfig(form=form, ranks=list(ranks),
                                                               projections=list(projections)),
                                hparams=jobs_pb2.HyperParams(**hparams))
        req = jobs_pb2.CreateJobRequest(spec=spec, idempotency_key=idempotency_key)
        return _call(self.jobs.CreateJob, req, timeout=self._deadline(timeout)).job

    def get_job(self, job_id: str, timeout: Optional[float] = None):
        return _call(self.jobs.GetJob, jobs_pb2.GetJobRequest(job_id=job_id),
                     timeout=self._deadline(timeout)).job

    def list_jobs(self, state: Optional[str] = None, page_size: int = 50,
                  timeout: Optional[float] = None):
        req = jobs_pb2.ListJobsRequest(page_size=page_size,
                                       state=getattr(jobs_pb2, state) if state else 0)
        out = []
        while True:
            resp = _call(self.jobs.ListJobs, req, timeout=self._deadline(timeout))
            out.extend(resp.jobs)
            if not resp.next_page_token:
                return out
            req.page_token = resp.next_page_token

    def list_checkpoints(self, job_id: str, timeout: Optional[float] = None):
        """The job's resumable checkpoints (step, total_steps, time_unix_ms, metrics), oldest first."""
        return list(_call(self.jobs.ListJobCheckpoints,
                          jobs_pb2.ListJobCheckpointsRequest(job_id=job_id),
                          timeout=self._deadline(timeout)).checkpoints)

    def cancel(self, job_id: str, timeout: Optional[float] = None):
        return _call(self.jobs.CancelJob, jobs_pb2.CancelJobRequest(job_id=job_id),
                     timeout=self._deadline(timeout)).job

    def follow(self, job_id: str, timeout: Optional[float] = None) -> Iterator:
        """Yields JobEvents (past ones first) until the job reaches a terminal state."""
        stream = self.jobs.StreamJobEvents(jobs_pb2.StreamJobEventsRequest(job_id=job_id),
                                           timeout=timeout)
        try:
            for ev in stream:
                yield ev
                if ev.WhichOneof("event") == "state" and ev.state.state in TERMINAL:
                    return
        except grpc.RpcError as e:
            raise MetattError(e) from None

    def wait(self, job_id: str, timeout: Optional[float] = None):
        for _ in self.follow(job_id, timeout=timeout):
            pass
        return self.get_job(job_id)

    # -- inference --------------------------------------------------------------
    def predict(self, family: str, task: Union[str, int, List[str]],
                texts: Iterable[Union[str, Tuple[str, str]]], version: int = 0,
                timeout: Optional[float] = None):
        """One prediction per text; `task` is a name, an index, a list of names
        (one prediction per text and task, text-major) or "*" (every task of
        the family): several tasks of one text run as rows of one batch."""
        inputs = []
        for t in texts:
            a, b = (t, None) if isinstance(t, str) else t
            inp = inference_pb2.PredictInput(family=family, version=version, text=a)
            if b is not None:
                inp.text_pair = b
            if isinstance(task, int):
                inp.task_index = task
            elif isinstance(task, (list, tuple)):
                inp.tasks.names.extend(task)
            elif task == "*":
                inp.tasks.all = True
            else:
                inp.task = task
            inputs.append(inp)
        return list(_call(self.inference.Predict, inference_pb2.PredictRequest(inputs=inputs),
                          timeout=self._deadline(timeout)).predictions)

    def predict_mixed(self, inputs: List[inference_pb2.PredictInput],
                      timeout: Optional[float] = None):
        return list(_call(self.inference.Predict, inference_pb2.PredictRequest(inputs=inputs),
                          timeout=self._deadline(timeout)).predictions)

    def _generate_request(self, prompt, messages, family, task, version, max_tokens,
                          temperature, top_p, top_k, seed, stop):
        req = inference_pb2.GenerateRequest(family=family, task=task, version=version,
                                            max_tokens=max_tokens, temperature=temperature,
                                            top_p=top_p, top_k=top_k, stop=list(stop))
        if (prompt is None) == (messages is None):
            raise ValueError("generate: give prompt or messages (one)")
        if prompt is not None:
            req.prompt = prompt
        else:
            for m in messages:
                role, content = (m["role"], m["content"]) if isinstance(m, dict) else m
                req.messages.messages.add(role=role, content=content)
        if seed is not None:
            req.seed = seed
        return req

    def generate(self, prompt: Optional[str] = None, messages: Optional[Sequence] = None,
                 family: str = "", task: str = "", version: int = 0, max_tokens: int = 0,
                 temperature: float = 0.0, top_p: float = 0.0, top_k: int = 0,
                 seed: Optional[int] = None, stop: Sequence[str] = (),
                 timeout: Optional[float] = None) -> Iterator:
        """Streams a generation on a decoder server: yields GenerateChunks
        (``.text`` the new text; the last one has ``.finish_reason`` stop |
        length | cancelled and ``.usage``). ``messages`` are (role, content)
        pairs or {"role", "content"} dicts, rendered through the model's chat
        template; ``prompt`` is raw text. No family and no task = the base
        model. Leaving the loop early (break, close()) cancels the stream: the
        server frees the sequence's slot at its next decode step. The stream
        has no deadline unless ``timeout`` is given."""
        req = self._generate_request(prompt, messages, family, task, version, max_tokens,
                                     temperature, top_p, top_k, seed, stop)
        stream = self.inference.GenerateStream(req, timeout=timeout or None)
        try:
            for chunk in stream:
                yield chunk
        except grpc.RpcError as e:
            raise MetattError(e) from None
        finally:
            stream.cancel()

    def generate_text(self, prompt: Optional[str] = None, messages: Optional[Sequence] = None,
                      family: str = "", task: str = "", version: int = 0, max_tokens: int = 0,
                      temperature: float = 0.0, top_p: float = 0.0, top_k: int = 0,
                      seed: Optional[int] = None, stop: Sequence[str] = (),
                      timeout: Optional[float] = None):
        """The unary form of ``generate``: one GenerateResponse (text,
        finish_reason, usage) when the generation ends."""
        req = self._generate_request(prompt, messages, family, task, version, max_tokens,
                                     temperature, top_p, top_k, seed, stop)
        return _call(self.inference.Generate, req, timeout=self._deadline(timeout))

    # -- adapters ---------------------------------------------------------------
    def list_families(self, timeout: Optional[float] = None):
        """Latest version of every family; each FamilyVersion carries `task_count` and
        at most its first 100 tasks (list_tasks yields all)."""
        return _call(self.adapters.ListFamilies, adapters_pb2.ListFamiliesRequest(),
                     timeout=self._deadline(timeout))

    def get_family(self, family: str, timeout: Optional[float] = None):
        """Every version of `family` (oldest first), each with `task_count` and at most
        its first 100 tasks."""
        return _call(self.adapters.GetFamily, adapters_pb2.GetFamilyRequest(family=family),
                     timeout=self._deadline(timeout)).family

    def list_tasks(self, family: str, version: int = 0, page_size: int = 0,
                   timeout: Optional[float] = None) -> Iterator:
        """Yields every Task of `family` (version 0 = latest) in index order, one
        ListTasks page at a time (page_size 0 = the server's 1000, at most 10000).
        All pages come from the version the first page named."""
        req = adapters_pb2.ListTasksRequest(family=family, version=version, page_size=page_size)
        while True:
            resp = _call(self.adapters.ListTasks, req, timeout=self._deadline(timeout))
            yield from resp.tasks
            if not resp.next_page_token:
                return
            req.page_token = resp.next_page_token

    def export_family(self, family: str, dest: Union[str, os.PathLike], version: int = 0,
                      timeout: Optional[float] = None) -> List[str]:
        """Writes the files of `family` (version 0 = latest) into directory `dest`
        and returns their names: family.json + cores.safetensors for a MetaTT
        family, a PEFT folder (adapter_config.json, adapter_model.safetensors)
        with family.json and heads.safetensors for a LoRA family
        (adapters/FORMAT.md; metatt_client.export.load_family reads both)."""
        os.makedirs(dest, exist_ok=True)
        stream = _call(self.adapters.ExportFamily,
                       adapters_pb2.ExportFamilyRequest(family=family, version=version),
                       timeout=self._deadline(timeout))
        files: "collections.OrderedDict[str, bytearray]" = collections.OrderedDict()
        current = None
        try:
            for chunk in stream:
                if chunk.file_name:
                    current = chunk.file_name
                    if "/" in current or current in (".", ".."):
                        raise ValueError(f"server sent a bad file name {current!r}")
                    files[current] = bytearray()
                files[current] += chunk.data
        except grpc.RpcError as e:
            raise MetattError(e) from None
        for name, data in files.items():
            tmp = os.path.join(dest, f".{name}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, os.path.join(dest, name))
        return list(files)

    def import_family(self, path: Union[str, os.PathLike], family: str = "",
                      timeout: Optional[float] = None):
        """Publishes the family in directory `path` as version 1 of a new family
        (`family` "" = the name its family.json records): an exported MetaTT
        family, or a PEFT LoRA folder (adapter_config.json +
        adapter_model.safetensors) with heads.safetensors (and optionally our
        family.json) beside it. Returns the new FamilyVersion."""
        names = sorted(n for n in os.listdir(path)
                       if os.path.isfile(os.path.join(path, n)) and not n.startswith(".")
                       and (n.endswith(".json") or n.endswith(".safetensors")))

        def gen():
            yield adapters_pb2.ImportFamilyRequest(family=family)
            for name in names:
                data = _read(os.path.join(path, name))
                off = 0
                while True:
                    part = data[off:off + CHUNK]
                    c = adapters_pb2.FamilyChunk(data=part)
                    if off == 0:
                        c.file_name, c.file_size = name, len(data)
                    yield adapters_pb2.ImportFamilyRequest(chunk=c)
                    off += len(part)
                    if off >= len(data):
                        break

        return _call(self.adapters.ImportFamily, gen(), timeout=self._deadline(timeout)).version
