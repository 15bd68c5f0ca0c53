"""Parity: our C++ WordPiece tokenizer (metatt-tokenize) vs Hugging Face's fast
tokenizer, on every sentence / sentence pair of the GLUE dev (and train) files
plus synthetic stress strings and a seeded random-code-point fuzz.

Env:
  METATT_BUILD_DIR   build dir holding server/model/metatt-tokenize
                     (default <repo>/build)
  METATT_MODEL_DIR   model dir (default <repo>/models/all-MiniLM-L6-v2)
  METATT_SHARED_DIR  shared dir with data/glue (default <repo>/../shared)

All inputs go through one metatt-tokenize process (JSONL in / out).
"""
import json
import os
import random
import subprocess
from pathlib import Path

import pytest

from conftest import CODE_POINT_POOLS, build_dir, model_dir, random_text, run_grouped, shared_dir

MAX_LENGTH = 128
BUILD_DIR = build_dir()
MODEL_DIR = model_dir()
GLUE_DIR = shared_dir() / "data" / "glue"
TOOL = BUILD_DIR / "server" / "model" / "metatt-tokenize"

# task -> (columns, has_header); MRPC's header starts with a UTF-8 BOM.
GLUE_TASKS = {
    "MRPC": ((3, 4), True),
    "CoLA": ((3,), False),
    "SST-2": ((0,), True),
    "STS-B": ((7, 8), True),
}
SPLITS = ("dev", "train")


def read_glue(task, split):
    """Rows of (a, b-or-None), reading with quoting off (split on '\\t')."""
    cols, header = GLUE_TASKS[task]
    text = (GLUE_DIR / task / f"{split}.tsv").read_text(encoding="utf-8-sig")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if header:
        lines = lines[1:]
    rows = []
    for i, line in enumerate(lines):
        f = line.split("\t")
        assert len(f) > max(cols), f"{task}/{split}.tsv row {i}: {len(f)} fields"
        rows.append((f[cols[0]], f[cols[1]] if len(cols) > 1 else None))
    return rows


def stress_inputs():
    long_word = "a" * 100
    s = [
        "Héllo Wörld! Ça va? naïve café résumé ÀÉÎÕÜ ñ ç ø å æ œ ß ẞ İstanbul ǅ",
        "cafe\u0301 e\u0301\u0302 o\u0308\u0304 a\u0328\u0301 q\u0323\u0307",  # combining
        "中文测试：你好，世界！ 日本語のテキスト 한국어 텍스트 漢字かなカナ",
        "𠀀𠀁 𪜀 𫝀 𫠠 𬺰 丽 \u3400\u4dbf \u9fff \uf900",  # CJK ext / compat
        "emoji 🤗😀🥲🫠 👩‍👩‍👧‍👦 👍🏽 ❤️ ☺︎ 🇺🇳 #️⃣",
        "ctrl\x00a\x01b\x07c\x1bd\x7fe\x85f\u200bg\u200dh\u00adi\ufeffj\ufffdk\u2028l\u3000m",
        "tabs\tand\nnewlines\r\nand\u00a0nbsp\u2009thin\u202fspace\u205fmath",
        long_word,
        long_word + "b",
        "é" * 100,
        "é" * 101,
        "##a ## ##" + long_word,
        "x [SEP] y [CLS][MASK]z[PAD] [UNK] [sep] [ SEP ] [SEP",
        "punct: ¡¿«»‹›“”‘’„‚—–‐‑‒―…·•†‡§¶※‼⁇⁈⁉ ‰ ′″ ₹ € £ ¥ © ® ™ ° ± × ÷",
        "ascii !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ end",
        "Ελληνικά ΣΊΣΥΦΟΣ ς σ Ω ω ά έ ή ί ϊ ΐ ό ύ ϋ ΰ ώ",
        "Русский ЁЖИК йод",
        "العربية مَرْحَبًا עִבְרִית हिन्दी क़ ষ্ট தமிழ் ไทย ພາສາ",
        "ﬁﬂ ﬃ Ａ ｂ ｃ １２３ ㈱ ℌ ℃ ½ ² ₂ Ⅻ ⅻ ﬀ",
        "music 𝅗𝅥 𝅘𝅥𝅮 a\U0001D165\U0001D16D\u0301b a\u0301\U0001D16D\U0001D165b",
        "1234567890 3.14159 1,000,000 $12.50 50% e-mail@example.com http://x.y/z?a=b&c=d",
        "",
        " ",
        "\t\n",
        "a",
    ]
    rows = [(x, None) for x in s]
    # Pairs, including truncation of both sides and of one side.
    w = "word " * 200
    rows += [
        (s[0], s[2]),
        (w, "short pair"),
        ("short first", w),
        (w, w),
        ("tok " * 70, "tok " * 70),
        ("tok " * 63, "tok " * 64),
        ("tok " * 64, "tok " * 63),
        ("tok " * 130, "tok " * 2),
        ("é" * 300, "x"),
        ("hello", "world"),
    ]
    return rows


def fuzz_inputs(n=3000, seed=1234):
    """Random strings mixing ASCII, Latin, combining marks, CJK, and random
    code points from every plane (assigned or not; no surrogates)."""
    rng = random.Random(seed)
    # WordPiece's Latin pool starts after the C1 controls.
    pools = [(0xA0, 0x24F) if p == (0x80, 0x24F) else p for p in CODE_POINT_POOLS]
    words = ["the", "café", "naïve", "un", "##", "aff", "able", "ß"]
    rows = []
    for i in range(n):
        first = random_text(rng, words, 60, pools)
        rows.append((first, random_text(rng, words, 60, pools) if i % 3 == 0 else None))
    return rows


def run_tool(rows, extra_args=()):
    if not TOOL.exists():
        pytest.fail(f"{TOOL} not built (set METATT_BUILD_DIR)")
    payload = "".join(json.dumps({"a": a, "b": b}) + "\n" for a, b in rows)
    proc = subprocess.run(
        [str(TOOL), f"--model_dir={MODEL_DIR}", f"--max_length={MAX_LENGTH}", *extra_args],
        input=payload.encode("ascii"), capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    out = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert len(out) == len(rows)
    return out


@pytest.fixture(scope="module")
def hf():
    if not (MODEL_DIR / "tokenizer.json").exists() and not (MODEL_DIR / "vocab.txt").exists():
        pytest.skip(f"no model at {MODEL_DIR}")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    assert tok.is_fast
    return tok


def glue_sets():
    sets = {}
    for task in GLUE_TASKS:
        for split in SPLITS:
            if (GLUE_DIR / task / f"{split}.tsv").exists():
                sets[f"{task}/{split}"] = read_glue(task, split)
    return sets


@pytest.fixture(scope="module")
def ours():
    """All inputs of all sets through one metatt-tokenize process."""
    sets = glue_sets()
    sets["stress"] = stress_inputs()
    sets["fuzz"] = fuzz_inputs()
    return run_grouped(sets, run_tool)


def hf_encode(hf, rows):
    """HF reference, with the semantics of one `hf(a, b, truncation=True,
    max_length=128)` call per row (an empty `b` means no pair there), but
    batched for speed."""
    singles = [i for i, (_, b) in enumerate(rows) if not b]
    pairs = [i for i, (_, b) in enumerate(rows) if b]
    out = [None] * len(rows)
    for idx, with_b in ((singles, False), (pairs, True)):
        if not idx:
            continue
        a = [rows[i][0] for i in idx]
        b = [rows[i][1] for i in idx] if with_b else None
        ref = hf(a, b, truncation=True, max_length=MAX_LENGTH)
        for k, i in enumerate(idx):
            out[i] = {
                "ids": ref["input_ids"][k],
                "type_ids": ref["token_type_ids"][k],
                "attention_mask": ref["attention_mask"][k],
            }
    return out


def compare(hf, pairs):
    rows = [row for row, _ in pairs]
    wants = hf_encode(hf, rows)
    # Spot-check that batching did not change HF's answers.
    for i in range(0, len(rows), max(1, len(rows) // 20)):
        a, b = rows[i]
        ref = hf(a, b, truncation=True, max_length=MAX_LENGTH)
        assert ref["input_ids"] == wants[i]["ids"]
    mismatches = [(row[0], row[1], enc, want)
                  for (row, enc), want in zip(pairs, wants) if enc != want]
    if mismatches:
        a, b, got, want = mismatches[0]
        pytest.fail(f"{len(mismatches)}/{len(pairs)} mismatches; first: a={a!r} b={b!r}\n"
                    f"ours={got}\nhf  ={want}")


@pytest.mark.parametrize("task", list(GLUE_TASKS))
@pytest.mark.parametrize("split", SPLITS)
def test_glue_parity(hf, ours, task, split):
    name = f"{task}/{split}"
    if name not in ours:
        if split == "dev":
            pytest.fail(f"missing GLUE dev file {GLUE_DIR / task / 'dev.tsv'}")
        pytest.skip(f"no {name}")
    pairs = ours[name]
    assert len(pairs) > 100
    compare(hf, pairs)


def test_stress_parity(hf, ours):
    compare(hf, ours["stress"])


def test_fuzz_parity(hf, ours):
    compare(hf, ours["fuzz"])


def test_batch_padding_parity(hf):
    rows = read_glue("MRPC", "dev")[:40] if (GLUE_DIR / "MRPC").exists() else []
    rows += [("short", None), ("word " * 300, None)]
    # Batched HF call needs all-pairs or all-singles: compare each group.
    for group in ([r for r in rows if r[1] is not None], [r for r in rows if r[1] is None]):
        if not group:
            continue
        out = run_tool(group, ["--batch"])
        a = [r[0] for r in group]
        b = [r[1] for r in group] if group[0][1] is not None else None
        ref = hf(a, b, truncation=True, max_length=MAX_LENGTH, padding=True)
        for i, enc in enumerate(out):
            assert enc["ids"] == ref["input_ids"][i]
            assert enc["type_ids"] == ref["token_type_ids"][i]
            assert enc["attention_mask"] == ref["attention_mask"][i]
