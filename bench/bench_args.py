"""Flags the Python benchmarks share, defined once.

model_dir_flag: --model_dir, $METATT_MODEL_DIR or the repository's MiniLM.
shared_dir: the shared data folder, $METATT_SHARED_DIR or ../shared beside the
repository (the rule of server/model/model_dir.h's ResolveSharedDir).
forward_flags: the shape and threads of a forward-pass benchmark, the settings
of the C++ benches it is compared with (batch 32, sequence 128, 2 threads,
CPU).
"""
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_model_dir():
    return os.environ.get("METATT_MODEL_DIR", os.path.join(REPO, "models", "all-MiniLM-L6-v2"))


def shared_dir():
    return os.environ.get("METATT_SHARED_DIR", os.path.join(os.path.dirname(REPO), "shared"))


def model_dir_flag(ap):
    ap.add_argument("--model_dir", default=default_model_dir())


def forward_flags(ap, iters):
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--iters", type=int, default=iters)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
