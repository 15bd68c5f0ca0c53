"""bench/quality_targets.py: the quality targets' rules applied to a table.

A small table in quality_bench.py's JSON shape, with scores chosen so that
each rule (the parameter factor, the allowed gap, common seeds only, the
seed-spread allowance, the minimum seed count) decides one verdict; the
expected gaps are worked out by hand in the comments.
"""
import json
import subprocess
import sys

import pytest

from conftest import ROOT

TASKS = ["A", "B"]


def _cells(scores_by_task, params):
    """{task: [score per seed]} -> quality_bench rows (None: seed not run)."""
    return {t: {str(s): {"score": v / 100, "adapter_parameters": params}
                for s, v in enumerate(xs) if v is not None}
            for t, xs in scores_by_task.items()}


@pytest.fixture
def table(tmp_path):
    rows = {
        "lora": _cells({"A": [80, 82, 84], "B": [60, 60, 60]}, 1000),         # means per seed 70, 71, 72
        "fine5x": _cells({"A": [80, 81, 83], "B": [59, 60, 60]}, 200),        # 5.0x; 69.5, 70.5, 71.5: gap 0.5
        "close10x": _cells({"A": [78, 80, 82], "B": [60, 60, 60]}, 100),      # 10x; gap 1.0 (met at 1.0)
        "far10x": _cells({"A": [70, 72, 74], "B": [60, 60, 60]}, 90),         # gap 5.0: missed
        "twoseeds": _cells({"A": [84, 86, None], "B": [62, 62, 62]}, 50),     # one task lacks seed 2
        "near": _cells({"A": [84, 86, 88], "B": [62, 62, 62]}, 205),          # 4.88x: listed, below 5x
        "big": _cells({"A": [84, 86, 88], "B": [62, 62, 62]}, 900),           # 1.1x: not listed
        "default": _cells({"A": [76, 82, 79], "B": [60, 61, 59]}, 200),       # A: gap 3.0, spread 3.0 -> missed
        "mt": _cells({"A": [79, 81, 80], "B": [59, 59, 59]}, 300),            # mean 69.5 vs default 69.5
        "added": _cells({"A": [70, None, None], "B": [58, None, None]}, 10),  # one seed: not judged
    }
    doc = {"settings": {"tasks": ",".join(TASKS)}, "rows": rows}
    path = tmp_path / "table.json"
    path.write_text(json.dumps(doc))
    return path


def _judge(table, *extra):
    out = table.parent / "targets"
    subprocess.run([sys.executable, str(ROOT / "bench" / "quality_targets.py"), f"--table={table}",
                    f"--out={out}", "--baseline=lora", "--default_row=default", "--multitask=mt",
                    "--added=added", *extra], check=True, capture_output=True)
    return json.loads((out.with_suffix(".json")).read_text()), (out.with_suffix(".md")).read_text()


def test_efficiency_targets_use_the_factor_the_gap_and_common_seeds(table):
    res, md = _judge(table)
    t5 = res["targets"]["5x_within_0.5"]
    by_row = {c["row"]: c for c in t5["candidates"]}
    assert "big" not in by_row
    assert by_row["near"]["verdict"] == "below 5x"
    assert by_row["fine5x"]["gap"] == pytest.approx(0.5)
    assert by_row["fine5x"]["verdict"] == "met"
    # twoseeds is compared on seeds 0 and 1 only (task A lacks seed 2): too few for a verdict
    assert by_row["twoseeds"]["seeds"] == ["0", "1"]
    assert by_row["twoseeds"]["gap"] == pytest.approx(70.5 - 73.5)
    assert by_row["twoseeds"]["verdict"] == "not judged"
    assert t5["verdict"] == "met" and t5["best"]["row"] == "fine5x"

    t10 = res["targets"]["10x_within_1.0"]
    by_row = {c["row"]: c for c in t10["candidates"]}
    assert set(by_row) == {"close10x", "far10x", "twoseeds"}
    assert by_row["close10x"]["gap"] == pytest.approx(1.0) and by_row["close10x"]["verdict"] == "met"
    assert by_row["far10x"]["gap"] == pytest.approx(5.0) and by_row["far10x"]["verdict"] == "missed"
    assert "| fine5x | 200 | 5.00x | 3 | 70.5 ± 1.0 | 71.0 ± 1.0 | 0.5 | met |" in md


def test_a_lower_minimum_judges_two_seeds(table):
    res, _ = _judge(table, "--min_seeds=2")
    by_row = {c["row"]: c for c in res["targets"]["10x_within_1.0"]["candidates"]}
    assert by_row["twoseeds"]["verdict"] == "met"  # ahead of the baseline by 3.0


def test_per_task_rule_allows_a_gap_inside_the_seed_spread(table):
    res, _ = _judge(table)
    per = res["targets"]["no_task_2_behind"]["per_task"]
    # A: lora 82.0 vs default 79.0 -> gap 3.0; spreads 2.0 and 3.0 -> 3.0 is not < 3.0
    assert per["A"]["gap"] == pytest.approx(3.0) and per["A"]["spread"] == pytest.approx(3.0)
    assert per["A"]["verdict"] == "missed"
    assert per["B"]["gap"] == pytest.approx(0.0) and per["B"]["verdict"] == "met"
    assert res["targets"]["no_task_2_behind"]["verdict"] == "missed"


def test_multitask_and_added_task_targets(table):
    res, md = _judge(table)
    mt = res["targets"]["multitask_within_0.5"]
    assert mt["gap"] == pytest.approx(0.0) and mt["verdict"] == "met"
    add = res["targets"]["added_within_2"]
    assert add["per_task"]["A"]["gap"] == pytest.approx(9.0)  # 79 - 70 on seed 0
    assert add["verdict"] == "not judged"  # one seed
    assert add["mean_gap"] == pytest.approx((9.0 + 1.0) / 2)
    assert "not judged** (mean gap 5.0)" in md
