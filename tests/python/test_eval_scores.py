"""metatt-eval-scores (C++) against scikit-learn / scipy on random data."""
import json
import os
import subprocess

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from conftest import build_dir

BUILD = str(build_dir())
TOOL = os.path.join(BUILD, "server", "training", "metatt-eval-scores")


def run_tool(payload):
    if not os.path.exists(TOOL):
        pytest.fail(f"{TOOL} not built (set METATT_BUILD_DIR)")
    out = subprocess.run([TOOL], input=json.dumps(payload), capture_output=True, text=True,
                         check=True, timeout=30)
    return json.loads(out.stdout)


@pytest.mark.parametrize("seed", range(5))
def test_binary_classification_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 500))
    y = rng.integers(0, 2, n)
    p = np.where(rng.random(n) < 0.7, y, 1 - y)
    got = run_tool({"kind": "classification", "predictions": p.tolist(), "labels": y.tolist(),
                    "num_labels": 2})
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, p), abs=1e-12)
    assert got["f1"] == pytest.approx(skm.f1_score(y, p), abs=1e-12)
    assert got["mcc"] == pytest.approx(skm.matthews_corrcoef(y, p), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_multiclass_mcc_matches_sklearn(seed):
    rng = np.random.default_rng(100 + seed)
    y = rng.integers(0, 4, 300)
    p = np.where(rng.random(300) < 0.5, y, rng.integers(0, 4, 300))
    got = run_tool({"kind": "classification", "predictions": p.tolist(), "labels": y.tolist(),
                    "num_labels": 4})
    assert got["mcc"] == pytest.approx(skm.matthews_corrcoef(y, p), abs=1e-12)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, p), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_regression_matches_scipy(seed):
    rng = np.random.default_rng(200 + seed)
    n = int(rng.integers(10, 400))
    y = rng.normal(size=n)
    p = y + rng.normal(scale=0.8, size=n)
    if seed % 2 == 0:  # STS-B-like scores with many ties
        y = np.round(rng.uniform(0, 5, n) * 2) / 2
        p = np.round(y + rng.normal(scale=1.0, size=n))
    got = run_tool({"kind": "regression", "predictions": p.tolist(), "labels": y.tolist()})
    assert got["pearson"] == pytest.approx(stats.pearsonr(p, y)[0], abs=1e-9)
    assert got["spearman"] == pytest.approx(stats.spearmanr(p, y)[0], abs=1e-9)
    assert got["mse"] == pytest.approx(float(np.mean((p - y) ** 2)), rel=1e-9)
