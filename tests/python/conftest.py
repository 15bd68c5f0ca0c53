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
