import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def build_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("METATT_BUILD_DIR", ROOT / "build"))


def shared_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("METATT_SHARED_DIR", ROOT.parent / "shared"))


def model_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("METATT_MODEL_DIR", ROOT / "models" / "all-MiniLM-L6-v2"))


def device() -> str:
    """Where our binaries run in the parity tests: cpu by default;
    scripts/device_check.sh sets METATT_TEST_DEVICE=cuda on a GPU machine
    (the Hugging Face reference always runs on the CPU)."""
    return os.environ.get("METATT_TEST_DEVICE", "cpu")


def binary(rel: str) -> pathlib.Path:
    """A built binary; a missing one fails the test (never a silent skip)."""
    p = build_dir() / rel
    if not p.exists():
        pytest.fail(f"binary {p} not built: run scripts/setup.sh")
    return p


# Code-point ranges the tokenizer fuzz tests draw from: ASCII and C0/C1
# controls, Latin, combining marks, Greek/Cyrillic, Hebrew/Arabic, Indic,
# Hangul Jamo, more combining marks, punctuation and symbols, CJK, Hangul,
# private use, compatibility forms, then the supplementary planes (assigned or
# not).
CODE_POINT_POOLS = [
    (0x20, 0x7E), (0x00, 0x20), (0x80, 0x24F), (0x300, 0x36F), (0x370, 0x52F),
    (0x590, 0x6FF), (0x900, 0xDFF), (0x1100, 0x11FF), (0x1AB0, 0x1AFF),
    (0x1DC0, 0x1FFF), (0x2000, 0x2BFF), (0x2E00, 0x2E7F), (0x3000, 0x30FF),
    (0x3400, 0x9FFF), (0xAC00, 0xD7A3), (0xE000, 0xF8FF), (0xF900, 0xFFFF),
    (0x10000, 0x1FFFF), (0x1D100, 0x1D1FF), (0x1F300, 0x1FAFF),
    (0x20000, 0x323AF), (0xE0000, 0xE01EF), (0xF0000, 0x10FFFF),
]


def random_text(rng, words, max_parts, pools=CODE_POINT_POOLS):
    """One fuzz string of up to `max_parts` pieces: a word of `words` (35 %),
    a space (15 %) or a code point of a random pool (never a surrogate)."""
    parts = []
    for _ in range(rng.randint(0, max_parts)):
        r = rng.random()
        if r < 0.35:
            parts.append(rng.choice(words))
        elif r < 0.5:
            parts.append(" ")
        else:
            lo, hi = rng.choice(pools)
            cp = rng.randint(lo, hi)
            while 0xD800 <= cp <= 0xDFFF:
                cp = rng.randint(lo, hi)
            parts.append(chr(cp))
    return "".join(parts)


def run_grouped(sets, run):
    """Runs every item of every set through one call run(items) (one tool
    process for all of them) and returns {set name: [(item, its output)]} in
    the sets' order (the tokenizer parity tests)."""
    names, items = [], []
    for name, these in sets.items():
        names += [name] * len(these)
        items += these
    by_set = {}
    for name, item, out in zip(names, items, run(items)):
        by_set.setdefault(name, []).append((item, out))
    return by_set
