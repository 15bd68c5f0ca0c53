"""Issue 17, hole 5: the short version of the power-loss simulation
(tests/chaos/powerloss.py, whose long run is committed under
bench/results/cpu-chaos/): a few seeded rounds of uploads and imports on the
real server with the LD_PRELOAD journal shim, kill -9, every change no fsync
made durable taken back, restart; nothing acknowledged is missing or
corrupt."""
import json
import subprocess
import sys

from server_harness import ROOT


def test_power_loss_keeps_every_acknowledged_upload_and_import(tmp_path, tiny_model):
    out = tmp_path / "powerloss.json"
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "chaos" / "powerloss.py"),
                        "--rounds", "1", "--seed", "7", "--max_kill_s", "2.0",
                        "--model", str(tiny_model), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    report = json.loads(out.read_text()) if out.exists() else {}
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert report["lost_count"] == 0 and report["corrupt_count"] == 0, report
    assert report["acknowledged_datasets"] + report["acknowledged_families"] > 3, report
    # The journal took something back: the simulation did cut power mid-write.
    assert sum(x["data_reverted"] + x["entries_undone"] for x in report["rounds"]) > 0, report
