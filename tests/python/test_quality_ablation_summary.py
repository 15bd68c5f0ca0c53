"""bench/quality_ablation_summary.py: the per-run table of dev score, late
training loss and how far each MetaTT core moved from its ze-id-id-id start.

Builds two runs the way metatt-train leaves them (result.json; the MetaTT one
also cores.safetensors with the names MetaTTAdapter saves) and checks the
numbers the summary derives from them against ones worked out by hand.
"""
import json
import subprocess
import sys

import numpy as np
from safetensors.numpy import save_file

from conftest import ROOT


def _run(dir_, task, score, losses):
    dir_.mkdir(parents=True)
    (dir_ / "result.json").write_text(json.dumps({
        "final_eval": {"metrics": {task: {"accuracy": score}}}, "losses": losses,
        "steps": len(losses), "adapter_parameters": 123, "train_examples_per_second": 9.0}))


def test_summary_scores_losses_and_core_drift(tmp_path):
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "quality.json").write_text(json.dumps({"settings": {"row_def": ["mt=--form=4d --rank=2"]}}))
    mt = exp / "runs" / "mt" / "seed0" / "RTE"
    _run(mt, "RTE", 0.55, [1.0] * 40 + [0.5] * 60)
    layer = np.stack([np.eye(2), 2 * np.eye(2)], axis=1)  # r x L x r: slices I and 2I
    save_file({
        "core.in": np.full((4, 2), 0.5, np.float32),         # norm sqrt(8 * 0.25)
        "core.layer": layer.astype(np.float32),              # drift (0 + 1) / 2
        "core.proj": np.eye(2, dtype=np.float32)[:, None, :],  # unmoved: 0
        "core.out": np.array([[1, 0, 0], [0, 0, 1]], np.float32),  # ||E' - E|| / ||E|| = sqrt(2)/sqrt(2)
        "head.RTE.weight": np.zeros((2, 4), np.float32),     # not a core: left out
    }, str(mt / "cores.safetensors"))
    _run(exp / "runs" / "lora_r8_at_0.001" / "seed1" / "RTE", "RTE", 0.5, [0.7] * 10)

    out_json, out_md = tmp_path / "s.json", tmp_path / "s.md"
    subprocess.run([sys.executable, str(ROOT / "bench" / "quality_ablation_summary.py"),
                    str(out_json), str(out_md), str(exp)], check=True, capture_output=True)
    runs = {r["row"]: r for r in json.loads(out_json.read_text())["runs"]}

    m = runs["mt"]
    assert m["score"] == 0.55 and m["flags"] == "--form=4d --rank=2"
    assert abs(m["train_loss_last60"] - 0.5) < 1e-12
    d = m["core_drift"]
    assert set(d) == {"core.in (norm)", "core.layer", "core.proj", "core.out"}
    assert abs(d["core.in (norm)"] - np.sqrt(2.0)) < 1e-6
    assert abs(d["core.layer"] - 0.5) < 1e-6
    assert d["core.proj"] == 0.0
    assert abs(d["core.out"] - 1.0) < 1e-6

    lora = runs["lora_r8@0.001"]
    assert lora["core_drift"] == {} and lora["seed"] == "seed1"
    assert abs(lora["train_loss_last60"] - 0.7) < 1e-12
    md = out_md.read_text()
    assert "| layer 0.50, out 1.00, proj 0.00 |" in md.replace("in (norm) 1.41, ", "")
    assert "| lora_r8@0.001 | `lora_r8` | RTE | 1 | 50.0 | 0.700 | n/a |" in md
