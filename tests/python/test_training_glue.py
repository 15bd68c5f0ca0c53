"""metatt-train on the real MiniLM for ~30 MRPC steps: loss goes down and
metrics are reported. CPU-friendly (small batch, short sequences). The 30
steps cycle over a fixed 32-row train subset (4 steps per epoch), so the
train loss must fall between the first and the last epoch; 30 steps on the
full file would be too noisy to assert anything. About 30-60 s on an idle
2-core machine; far longer while other builds saturate the CPU."""
import json
import os
import re
import subprocess

import pytest

from conftest import build_dir

BUILD = str(build_dir())
TOOL = os.path.join(BUILD, "server", "training", "metatt-train")
REPO = os.environ.get("METATT_SOURCE_DIR", os.path.dirname(os.path.dirname(
    os.path.dirname(os.path.abspath(__file__)))))
MODEL = os.environ.get("METATT_MODEL_DIR", os.path.join(REPO, "models", "all-MiniLM-L6-v2"))


def test_mrpc_30_steps_loss_goes_down(tmp_path):
    if not os.path.exists(TOOL):
        pytest.fail(f"{TOOL} not built (set METATT_BUILD_DIR)")
    if not os.path.exists(os.path.join(MODEL, "config.json")):
        pytest.fail(f"model not found at {MODEL} (run scripts/setup.sh)")
    out_dir = tmp_path / "fam"
    cmd = [TOOL, f"--model_dir={MODEL}", "--device=cpu", "--task=MRPC", "--form=4d",
           "--rank=8", "--steps=30", "--batch_size=8", "--lr=1e-2", "--seed=1", "--train_limit=32",
           "--max_length=64", "--max_eval=64", "--warmup_ratio=0.1", "--pooling=mean",
           f"--out={out_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    losses = [float(m.group(1)) for l in lines if (m := re.match(r"step \d+/30 .*loss ([0-9.]+)", l))]
    assert len(losses) == 30
    result = json.loads(next(l for l in lines if l.startswith("result "))[len("result "):])
    assert result["steps"] == 30
    full = json.loads((out_dir / "result.json").read_text())["losses"]
    assert len(full) == 30
    first, last = sum(full[:4]) / 4, sum(full[-4:]) / 4  # first vs last epoch
    assert last < 0.9 * first, f"loss did not go down: {first:.4f} -> {last:.4f}"
    m = result["final_eval"]["metrics"]["MRPC"]
    for k in ("accuracy", "f1", "f1_acc", "mcc"):
        assert 0.0 <= abs(m[k]) <= 1.0
    assert any(l.startswith("eval step 30 MRPC") for l in lines)
    assert (out_dir / "family.json").exists()
    assert (out_dir / "cores.safetensors").exists()


def run_train(args, timeout=600):
    proc = subprocess.run([TOOL, f"--model_dir={MODEL}", "--device=cpu", "--max_length=48",
                           "--max_eval=16", "--batch_size=4", "--seed=2", "--train_limit=64"] + args,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_multitask_then_add_task_with_frozen_shared_cores(tmp_path):
    """4+1D on MRPC + STS-B (mixed batches), then SST-2 added to the saved
    family with every shared core frozen: the shared cores in the new family
    are bit-identical to the base family's."""
    if not os.path.exists(TOOL):
        pytest.fail(f"{TOOL} not built (set METATT_BUILD_DIR)")
    from safetensors.numpy import load_file

    base, added = tmp_path / "base", tmp_path / "added"
    out = run_train(["--task=MRPC,STS-B", "--form=4+1d", "--rank=4", "--steps=4",
                     "--init=normal(0.1)", "--lr=1e-2", f"--out={base}"])
    assert "eval step 4 MRPC" in out and "eval step 4 STS-B" in out
    out = run_train(["--task=SST-2", f"--base_family={base}", "--steps=4", "--lr=1e-2",
                     f"--out={added}"])
    assert "add-task mode" in out
    fam = json.loads((added / "family.json").read_text())
    assert [t["name"] if isinstance(t, dict) else t for t in fam["tasks"]] == ["MRPC", "STS-B", "SST-2"]
    before = load_file(str(base / "cores.safetensors"))
    after = load_file(str(added / "cores.safetensors"))
    shared = [k for k in before if k.startswith("core.")]
    assert shared
    for k in shared:
        assert (before[k] == after[k]).all(), f"{k} changed in add-task mode"
    assert "core.task.2" in after and "core.task.2" not in before
