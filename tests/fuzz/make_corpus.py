#!/usr/bin/env python3
"""Regenerates the seed corpora under tests/fuzz/corpus/<target>/ (small files,
<= ~30 per target) from real inputs: the first lines of the GLUE dev sets in
../shared/data/glue, tiny safetensors files, family.json / MetaTTConfig JSON,
job and dataset spec JSON. Stdlib only. Usage: tests/fuzz/make_corpus.py
"""
import json
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
GLUE = os.environ.get("METATT_SHARED_DIR", os.path.join(os.path.dirname(ROOT), "shared"))
GLUE = os.path.join(GLUE, "data", "glue")
OUT = os.path.join(HERE, "corpus")


def write(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def glue_head(task, n):
    path = os.path.join(GLUE, task, "dev.tsv")
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    return b"\n".join(lines[:n]) + b"\n"


def fnv1a64(b):
    h = 1469598103934665603
    for c in b:
        h ^= c
        h = (h * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return "%016x" % h


def safetensors(tensors, metadata=None):
    """tensors: {name: (dtype, shape, raw bytes)}"""
    header, data = {}, b""
    if metadata:
        header["__metadata__"] = metadata
    for name in sorted(tensors):
        dt, shape, raw = tensors[name]
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + data


def f32(*vals):
    return struct.pack("<%df" % len(vals), *vals)


# ---- dataset_parser_fuzzer: byte 0 flags, byte 1 columns, then the file --------
# flags: bits0-1 format (0 tsv,1 csv,2 jsonl,3 GLUE preset), 4 header, 8 quoting,
#        16 regression, 32 pair, 64 by name, 128 fixed vocab {0,1}
def dataset_parser():
    t = "dataset_parser_fuzzer"
    for i, task in enumerate(["MRPC", "CoLA", "SST-2", "STS-B"]):
        write(t, "glue_%s" % task, bytes([3, i]) + glue_head(task, 6))
    sst = glue_head("SST-2", 6)
    write(t, "sst2_by_name", bytes([4 | 64, 0 | (1 << 3)]) + sst)  # sentence/label
    write(t, "sst2_by_index", bytes([4, 0 | (1 << 3)]) + sst)
    cola = glue_head("CoLA", 6)
    write(t, "cola_noheader_idx", bytes([0, 3 | (1 << 3)]) + cola)
    stsb = glue_head("STS-B", 5)
    write(t, "stsb_regression_pair", bytes([4 | 16 | 32 | 64, 2 | (4 << 3) | (1 << 6)]) + stsb)
    write(t, "csv_quoted", bytes([1 | 4 | 8, 0 | (1 << 3)]) +
          b'text,label\n"hello, ""world""",1\n"multi\nline",0\nplain,1\n')
    write(t, "csv_bom_crlf", bytes([1 | 4 | 8, 0 | (1 << 3)]) +
          b'\xef\xbb\xbftext,label\r\n"a",0\r\nb,1\r\n')
    write(t, "csv_unterminated", bytes([1 | 4 | 8, 0 | (1 << 3)]) + b'text,label\n"open,1\n')
    write(t, "jsonl_cls", bytes([2 | 64, 5 | (1 << 3)]) +
          b'{"text": "good movie", "label": 1}\n{"text": "bad", "label": 0}\n\n{"text": "x", "label": "1"}\n')
    write(t, "jsonl_reg", bytes([2 | 16 | 64, 5 | (4 << 3)]) +
          b'{"text": "a", "score": 0.5}\n{"text": "b", "score": -1e3}\n')
    write(t, "jsonl_bad", bytes([2 | 64, 5 | (1 << 3)]) + b'{"text": 1}\n[1,2]\nnot json\n')
    write(t, "tsv_vocab", bytes([4 | 128, 0 | (1 << 3)]) + b"s\tl\nhi\t0\nho\t1\nhu\t2\n")
    write(t, "tsv_strlabels", bytes([4, 0 | (1 << 3)]) + b"s\tl\nhi\tpos\nho\tneg\n")
    write(t, "tsv_blank", bytes([4, 0 | (1 << 3)]) + b"\n\n   \ns\tl\n\n")


# ---- tokenizer_fuzzer: byte 0 max_length (bit 7: extra checks), byte 1 split ----
def tokenizer():
    t = "tokenizer_fuzzer"
    texts = [
        ("plain", b"Hello, world! This is a test."),
        ("accents", "Café naïve résumé Ångström".encode()),
        ("cjk", "我喜欢自然语言处理 日本語のテキスト".encode()),
        ("emoji", "emoji 😀👍🏽 and symbols ©®™".encode()),
        ("special", b"[CLS] hello [SEP] [MASK] [UNK] [PAD] [cls]"),
        ("long_word", b"a" * 150 + b" " + b"supercalifragilisticexpialidocious"),
        ("controls", b"tab\there\x00nul\x7fdel\r\nnewline \xc2\xa0nbsp"),
        ("invalid_utf8", b"bad \xff\xfe \xc3 \xe2\x82 \xf0\x9f\x98 \xed\xa0\x80 end"),
        ("combining", "e\u0301 a\u0308 \u200b zero-width \ufeff bom".encode()),
        ("punct", b"don't stop-believing... (really?) #1 $5.00 @user"),
    ]
    for i, (name, text) in enumerate(texts):
        write(t, name + "_single", bytes([0x80 | (16 + i), 0x80]) + text)
        write(t, name + "_pair", bytes([0x80 | (8 + i), 64]) + text)
    for task in ["MRPC", "SST-2"]:
        write(t, "glue_" + task, bytes([0x80 | 32, 50]) + glue_head(task, 3))


# ---- safetensors_fuzzer ----------------------------------------------------------
def safetensors_seeds():
    t = "safetensors_fuzzer"
    write(t, "f32_2x3", safetensors({"w": ("F32", [2, 3], f32(1, 2, 3, 4, 5, 6))}))
    write(t, "meta", safetensors({"b": ("F32", [2], f32(0.5, -1))}, {"format": "pt", "k": "v"}))
    write(t, "dtypes", safetensors({
        "f64": ("F64", [1], struct.pack("<d", 3.5)),
        "f16": ("F16", [2], b"\x00\x3c\x00\xc0"),
        "bf16": ("BF16", [2], b"\x80\x3f\x00\x40"),
        "i64": ("I64", [1], struct.pack("<q", -7)),
        "i32": ("I32", [1], struct.pack("<i", 9)),
        "i16": ("I16", [1], struct.pack("<h", 2)),
        "i8": ("I8", [2], b"\x01\xff"),
        "u8": ("U8", [2], b"\x01\xff"),
        "bool": ("BOOL", [2], b"\x00\x01"),
    }))
    write(t, "scalar_and_empty", safetensors({"s": ("F32", [], f32(1)), "e": ("F32", [0, 4], b"")}))
    write(t, "empty_header", struct.pack("<Q", 2) + b"{}")
    write(t, "truncated", safetensors({"w": ("F32", [4], f32(1, 2, 3, 4))})[:-5])
    write(t, "bad_offsets", struct.pack("<Q", 56) +
          b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[4,0]}}' + b"\x00" * 8)
    hdr = b'{"w":{"dtype":"F32","shape":[1099511627776,0,1099511627776],"data_offsets":[0,0]}}'
    write(t, "huge_zero_shape", struct.pack("<Q", len(hdr)) + hdr)
    write(t, "short", b"\x01\x00\x00")
    write(t, "core_like", safetensors({"core.in": ("F32", [4, 2], f32(*([0.0] * 8))),
                                       "head.sst2": ("F32", [2, 4], f32(*range(8)))}))


# ---- family_metadata_fuzzer: byte 0 mode (even: config JSON; odd: family dir,
#      bit 1: fix integrity fields); family.json \0 cores.safetensors ------------
def family():
    t = "family_metadata_fuzzer"
    cfg4 = {"form": "4d", "ranks": [2], "projections": ["q", "v"], "layers": [], "alpha": None,
            "init": "ze-id-id-id", "num_tasks": 1, "d_in": 4, "d_out": 4, "num_layers": 2,
            "num_heads": 0}
    cfg41 = dict(cfg4, form="4+1d", ranks=[2, 2, 2, 2], num_tasks=2, layers=[0, 1], alpha=4.0)
    cfg5 = dict(cfg4, form="5d", ranks=[2, 3, 2, 2], num_heads=2, init="no",
                projections=["query", "key", "value", "o", "ffn_up", "ffn_down"])
    for name, c in [("cfg_4d", cfg4), ("cfg_4p1d", cfg41), ("cfg_5d", cfg5)]:
        write(t, name, b"\x00" + json.dumps(c).encode())
    write(t, "cfg_rank_single", b"\x00" + json.dumps(dict(cfg4, ranks=None, rank=3)).encode().replace(b'"ranks": null, ', b""))
    write(t, "cfg_init_normal", b"\x00" + json.dumps(dict(cfg4, init="normal(0.02)-id")).encode())
    write(t, "cfg_bad", b"\x00" + b'{"form": "7d", "d_in": -1}')

    def fam(cfg, cores, heads=(), tasks=("t0",)):
        st = safetensors(cores)
        meta = {"format_version": 1, "config": cfg, "scale": 1.0,
                "tasks": [{"name": n, "index": i} for i, n in enumerate(tasks)],
                "heads": list(heads), "base_model_id": "all-MiniLM-L6-v2",
                "base_config_fingerprint": "fp", "cores_file": "cores.safetensors",
                "cores_bytes": len(st), "cores_fnv1a64": fnv1a64(st), "dtype": "float"}
        return json.dumps(meta, indent=2).encode() + b"\n\x00" + st

    z = lambda n: f32(*([0.0] * n))
    cores4 = {"core.in": ("F32", [4, 2], z(8)), "core.layer": ("F32", [2, 2, 2], z(8)),
              "core.proj": ("F32", [2, 2, 2], z(8)), "core.out": ("F32", [2, 4], z(8))}
    write(t, "family_4d", b"\x01" + fam(cfg4, cores4))
    write(t, "family_4d_fix", b"\x03" + fam(cfg4, cores4))
    cores4h = dict(cores4, **{"head.t0": ("F32", [2, 4], z(8))})
    write(t, "family_4d_head", b"\x03" + fam(cfg4, cores4h, heads=["t0"]))
    cores41 = {"core.in": ("F32", [4, 2], z(8)), "core.layer": ("F32", [2, 2, 2], z(8)),
               "core.proj": ("F32", [2, 2, 2], z(8)), "core.task.0": ("F32", [2, 2], z(4)),
               "core.task.1": ("F32", [2, 2], z(4)), "core.out": ("F32", [2, 4], z(8))}
    write(t, "family_4p1d", b"\x03" + fam(cfg41, cores41, tasks=("a", "b")))
    cores5 = {"core.in": ("F32", [4, 2], z(8)), "core.layer": ("F32", [2, 2, 3], z(12)),
              "core.proj": ("F32", [3, 6, 2], z(36)), "core.head": ("F32", [2, 2, 2], z(8)),
              "core.head_width": ("F32", [2, 2], z(4))}
    write(t, "family_5d", b"\x03" + fam(cfg5, cores5))
    write(t, "family_bad_version", b"\x01" + b'{"format_version": 2}\x00')


# ---- request_validation_fuzzer: byte 0 % 3 (0 job spec, 1 dataset spec,
#      2 dataset spec \0 dataset bytes) ----------------------------------------
def requests():
    t = "request_validation_fuzzer"
    job = {"kind": "TRAIN_FAMILY", "family": "glue", "idempotency_key": "k1",
           "tasks": [{"task_name": "sst2", "dataset_id": "ds_1", "eval_dataset_id": "",
                      "eval_fraction": 0.1, "metric": "accuracy"}],
           "adapter": {"form": "4+1d", "ranks": [8], "projections": ["q", "k", "v", "o"],
                       "init": "ze-id-id-id", "alpha": 0},
           "hparams": {"max_steps": 200, "batch_size": 16, "learning_rate": 5e-4,
                       "weight_decay": 0.0, "warmup_ratio": 0.06, "grad_clip": 1.0,
                       "eval_every": 50, "max_length": 128, "early_stop_patience": 0,
                       "pooling": "mean", "seed": 42, "rank_schedule": [[1, 8], [2, 4]]}}
    write(t, "job_train", b"\x00" + json.dumps(job).encode())
    write(t, "job_add_task", b"\x00" + json.dumps(dict(job, kind="ADD_TASK")).encode())
    write(t, "job_multi", b"\x00" + json.dumps(dict(job, kind="MULTI_TASK", tasks=job["tasks"] * 2)).encode())
    write(t, "job_min", b"\x00{}")
    specs = {
        "sst2": {"format": "tsv", "has_header": True, "text_column": "sentence",
                 "label_column": "label", "label_kind": "classification", "quoting": False},
        "stsb": {"format": "tsv", "has_header": True, "text_column": "sentence1",
                 "text_pair_column": "sentence2", "label_column": "score",
                 "label_kind": "regression", "quoting": False},
        "cola": {"format": "tsv", "has_header": False, "text": "3", "label": "1",
                 "quoting": False, "label_vocab": ["0", "1"]},
        "jsonl": {"format": "jsonl", "text_column": "text", "label_column": "label"},
        "csv": {"format": "csv", "text_column": "0", "label_column": "1"},
    }
    for name, s in specs.items():
        write(t, "dspec_" + name, b"\x01" + json.dumps(s).encode())
    write(t, "upload_sst2", b"\x02" + json.dumps(specs["sst2"]).encode() + b"\x00" + glue_head("SST-2", 6))
    write(t, "upload_stsb", b"\x02" + json.dumps(specs["stsb"]).encode() + b"\x00" + glue_head("STS-B", 5))
    write(t, "upload_cola", b"\x02" + json.dumps(specs["cola"]).encode() + b"\x00" + glue_head("CoLA", 5))
    write(t, "upload_jsonl", b"\x02" + json.dumps(specs["jsonl"]).encode() + b'\x00{"text":"a","label":1}\n')


# ---- service_fuzzer: sequences of gRPC requests (tests/fuzz/service_fuzzer.cc) ----
# A minimal protobuf wire encoder (stdlib only): a message is a list of
# (field number, value) with int -> varint, bytes/str -> length-delimited,
# list -> embedded message.

def _varint(n):
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def pb(fields):
    out = bytearray()
    for num, v in fields:
        if isinstance(v, bool) or isinstance(v, int):
            out += _varint(num << 3) + _varint(int(v))
        elif isinstance(v, float):
            out += _varint(num << 3 | 1) + struct.pack("<d", v)
        else:
            if isinstance(v, str):
                v = v.encode("utf-8")
            elif isinstance(v, list):
                v = pb(v)
            out += _varint(num << 3 | 2) + _varint(len(v)) + v
    return bytes(out)


def stream(*msgs):
    return b"".join(struct.pack("<H", len(m)) + m for m in msgs)


# Callers and RPC selectors of service_fuzzer.cc.
ALPHA, BETA, ADMIN, WRONG = 0, 1, 2, 3
(UPLOAD, GET_DS, LIST_DS, DEL_DS, CREATE_JOB, GET_JOB, LIST_JOBS, CANCEL_JOB, CHECKPOINTS,
 STREAM, LIST_FAM, GET_FAM, LIST_TASKS, DEL_TASK, EXPORT, IMPORT, PREDICT) = range(17)


def op(caller, rpc, payload=b""):
    return bytes([caller, rpc]) + struct.pack("<H", len(payload)) + payload


def upload(name, data, header=None):
    h = header if header is not None else [(1, name), (2, 1), (3, True), (4, "sentence"), (6, "label")]
    chunks = [pb([(2, data[i:i + 40])]) for i in range(0, len(data), 40)]
    return stream(pb([(1, h)]), *chunks)


def job(family, dataset_ref, kind=1, steps=20, key=""):
    spec = [(1, kind), (2, family), (3, [(1, "sst2"), (2, dataset_ref)]),
            (4, [(1, "4+1d"), (2, 4)]), (5, [(1, steps), (2, 8)])]
    req = [(1, spec)]
    if key:
        req.append((2, key))
    return pb(req)


def family_import(name, tasks, as_name=""):
    meta = json.dumps({"name": name, "tasks": tasks}).encode()
    msgs = []
    if as_name:
        msgs.append(pb([(1, as_name)]))
    msgs.append(pb([(2, [(1, "family.json"), (2, len(meta)), (3, meta)])]))
    msgs.append(pb([(2, [(1, "cores.safetensors"), (2, 4), (3, b"\0\0\0\0")])]))
    return stream(*msgs)


def service():
    t = "service_fuzzer"
    sst2 = glue_head("SST-2", 6)  # header "sentence<TAB>label" + 5 rows
    get = lambda ref: pb([(1, ref)])
    # Datasets: two tenants upload, list, get each other's, delete.
    write(t, "datasets_two_tenants", b"".join([
        op(ALPHA, UPLOAD, upload("a", sst2)), op(BETA, UPLOAD, upload("b", sst2)),
        op(ALPHA, LIST_DS), op(BETA, LIST_DS), op(ADMIN, LIST_DS),
        op(ALPHA, GET_DS, get("$d1")), op(BETA, GET_DS, get("$d0")),
        op(BETA, DEL_DS, get("$d0")), op(ALPHA, DEL_DS, get("$d0")), op(ALPHA, GET_DS, get("$d0")),
        op(WRONG, LIST_DS), op(WRONG, GET_DS, get("$d1"))]))
    write(t, "upload_quota", b"".join([op(BETA, UPLOAD, upload("big", sst2 * 12))] +
                                       [op(BETA, UPLOAD, upload("b%d" % i, sst2)) for i in range(4)]))
    write(t, "upload_bad_header", b"".join([
        op(ALPHA, UPLOAD, stream(pb([(2, b"x\t1\n")]))),
        op(ALPHA, UPLOAD, upload("x", b"a\t1\n", header=[(1, "x"), (2, 3), (4, "text"), (6, "label")])),
        op(ALPHA, UPLOAD, upload("bad name!", sst2)),
        op(ALPHA, UPLOAD, upload("r", b"0\t1e39\n", header=[(1, "r"), (4, "0"), (6, "1"), (7, 2)])),
        op(ALPHA, UPLOAD, stream(pb([(1, [(1, "h")])]), pb([(1, [(1, "h2")])])))]))
    # Jobs: create, list, get and cancel across tenants, idempotency, quotas.
    write(t, "jobs_two_tenants", b"".join([
        op(ALPHA, UPLOAD, upload("a", sst2)), op(BETA, UPLOAD, upload("b", sst2)),
        op(ALPHA, CREATE_JOB, job("fam", "$d0", key="k1")), op(ALPHA, CREATE_JOB, job("fam", "$d0", key="k1")),
        op(BETA, CREATE_JOB, job("fam", "$d1")), op(BETA, CREATE_JOB, job("fam", "$d0")),
        op(ALPHA, LIST_JOBS, pb([(1, 10)])), op(BETA, LIST_JOBS, pb([(3, 3)])), op(ADMIN, LIST_JOBS),
        op(ALPHA, GET_JOB, get("$j1")), op(BETA, CANCEL_JOB, get("$j0")), op(ALPHA, CHECKPOINTS, get("$j1")),
        op(BETA, STREAM, get("$j0")), op(ALPHA, CANCEL_JOB, get("$j0")), op(ALPHA, STREAM, get("$j0")),
        op(ADMIN, CANCEL_JOB, get("$j1")), op(BETA, GET_JOB, get("$j1"))]))
    write(t, "jobs_invalid", b"".join([
        op(ALPHA, UPLOAD, upload("a", sst2)),
        op(ALPHA, CREATE_JOB, job("", "$d0")), op(ALPHA, CREATE_JOB, job("f", "nope")),
        op(ALPHA, CREATE_JOB, job("f", "$d0", steps=1 << 40)), op(ALPHA, CREATE_JOB, job("f", "$d0", kind=2)),
        op(ALPHA, CREATE_JOB, job("beta~f", "$d0")), op(ALPHA, CREATE_JOB, job("f", "$d0", kind=9)),
        op(ALPHA, LIST_JOBS, pb([(1, -1)])), op(ALPHA, LIST_JOBS, pb([(2, "garbage")])),
        op(ALPHA, GET_JOB, get("")), op(ALPHA, STREAM, get("job_missing"))]))
    write(t, "jobs_queue_full", b"".join(
        [op(ALPHA, UPLOAD, upload("a", sst2))] + [op(ALPHA, CREATE_JOB, job("f%d" % i, "$d0")) for i in range(6)]))
    # Families: import, list, get, tasks, export, delete a task; the same name in two tenants.
    write(t, "families_two_tenants", b"".join([
        op(ALPHA, IMPORT, family_import("glue", ["sst2", "mrpc", "cola"])),
        op(BETA, IMPORT, family_import("glue", ["qnli"])),
        op(BETA, IMPORT, family_import("other", ["rte"], as_name="secret")),
        op(ALPHA, LIST_FAM), op(BETA, LIST_FAM), op(ADMIN, LIST_FAM),
        op(ALPHA, GET_FAM, get("glue")), op(ALPHA, GET_FAM, get("secret")), op(ALPHA, GET_FAM, get("beta~secret")),
        op(ADMIN, GET_FAM, get("beta~secret")),
        op(ALPHA, LIST_TASKS, pb([(1, "glue"), (3, 2)])), op(BETA, LIST_TASKS, pb([(1, "secret")])),
        op(ALPHA, EXPORT, pb([(1, "glue")])), op(ALPHA, EXPORT, pb([(1, "secret")])),
        op(ALPHA, DEL_TASK, pb([(1, "glue"), (2, "mrpc")])), op(ALPHA, DEL_TASK, pb([(1, "secret"), (2, "rte")])),
        op(BETA, GET_FAM, get("glue")), op(ALPHA, EXPORT, pb([(1, "glue"), (2, 1)])),
        op(ALPHA, IMPORT, family_import("glue", ["x"]))]))
    write(t, "families_invalid", b"".join([
        op(ALPHA, IMPORT, stream(pb([(1, "x")]))),
        op(ALPHA, IMPORT, stream(pb([(2, [(1, "../evil"), (3, b"x")])]))),
        op(ALPHA, IMPORT, stream(pb([(2, [(3, b"x")])]))),
        op(ALPHA, IMPORT, stream(pb([(2, [(1, "family.json"), (3, b"{}")])]), pb([(1, "late")]))),
        op(ALPHA, IMPORT, family_import("big", ["t%d" % i for i in range(9)])),
        op(ALPHA, LIST_TASKS, pb([(1, "glue"), (4, "tok")])), op(ALPHA, LIST_TASKS, pb([(1, "glue"), (3, -1)])),
        op(ALPHA, DEL_TASK, pb([(1, "glue")])), op(ALPHA, GET_FAM, get("")), op(ALPHA, EXPORT, pb([(1, "glue"), (2, 7)]))]))
    # Predict: own family, another tenant's, the only family, bad inputs.
    pin = lambda fam, task, text: [(1, fam), (3, task), (5, text)]
    write(t, "predict_tenants", b"".join([
        op(ALPHA, IMPORT, family_import("glue", ["sst2"])), op(BETA, IMPORT, family_import("priv", ["t"])),
        op(ALPHA, PREDICT, pb([(1, pin("glue", "sst2", "a fine film"))])),
        op(ALPHA, PREDICT, pb([(1, pin("priv", "t", "x"))])),
        op(ALPHA, PREDICT, pb([(1, pin("beta~priv", "t", "x"))])),
        op(ALPHA, PREDICT, pb([(1, pin("", "sst2", "x"))])),
        op(BETA, PREDICT, pb([(1, pin("", "t", "x")), (1, pin("glue", "sst2", "y"))])),
        op(ADMIN, PREDICT, pb([(1, pin("alpha~glue", "sst2", "x"))])),
        op(ALPHA, PREDICT, pb([])), op(WRONG, PREDICT, pb([(1, pin("glue", "sst2", "x"))]))]))
    write(t, "empty", b"")


def main():
    dataset_parser()
    tokenizer()
    safetensors_seeds()
    family()
    requests()
    service()
    for t in sorted(os.listdir(OUT)):
        files = os.listdir(os.path.join(OUT, t))
        size = sum(os.path.getsize(os.path.join(OUT, t, f)) for f in files)
        print("%-28s %3d files %7d bytes" % (t, len(files), size))


if __name__ == "__main__":
    sys.exit(main())
