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


def main():
    dataset_parser()
    tokenizer()
    safetensors_seeds()
    family()
    requests()
    for t in sorted(os.listdir(OUT)):
        files = os.listdir(os.path.join(OUT, t))
        size = sum(os.path.getsize(os.path.join(OUT, t, f)) for f in files)
        print("%-28s %3d files %7d bytes" % (t, len(files), size))


if __name__ == "__main__":
    sys.exit(main())
