"""metattctl and the Python client: per-command help, `jobs create --follow`
ending with the job's final row, and deadlines on unary calls (default, and
overridden per call) against a peer that never answers."""
import json
import socket
import subprocess
import sys
import time

import pytest

from server_harness import ROOT, build_dir, make_rows, tsv_bytes

sys.path.insert(0, str(ROOT / "client" / "python"))

from metatt_client import Client, MetattError  # noqa: E402
from metatt_client.client import DEFAULT_TIMEOUT  # noqa: E402


def ctl(*args, timeout=300):
    exe = build_dir() / "client" / "metattctl"
    if not exe.exists():
        pytest.fail(f"binary {exe} not built: cmake --build <build> --target metattctl")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout)


def test_each_command_has_its_own_help():
    jobs = ctl("jobs", "--help")
    assert jobs.returncode == 0, jobs.stderr
    assert "usage: metattctl jobs create" in jobs.stdout
    assert "--steps" in jobs.stdout and "--follow" in jobs.stdout and "--server" in jobs.stdout
    assert "--glue" not in jobs.stdout and "--text_pair" not in jobs.stdout
    upload = ctl("upload", "--help")
    assert "--glue" in upload.stdout and "--steps" not in upload.stdout
    predict = ctl("--server=127.0.0.1:1", "predict", "--help")
    assert "--text_pair" in predict.stdout and "--dataset" not in predict.stdout
    general = ctl("--help")
    assert general.returncode == 0
    for c in ("upload", "datasets", "jobs", "families", "tasks", "predict", "health"):
        assert f"  {c} " in general.stdout
    assert "--steps" not in general.stdout
    assert "default: 60 for unary RPCs" in ctl("jobs", "--help").stdout


def test_jobs_create_follow_prints_the_final_row(server, tmp_path):
    data = tmp_path / "train.tsv"
    data.write_bytes(tsv_bytes(make_rows(40, seed=2)))
    addr = f"--server=127.0.0.1:{server.port}"
    up = ctl(addr, "upload", str(data), "--text_column=sentence", "--label_column=label", "--json")
    assert up.returncode == 0, up.stderr
    ds = json.loads(up.stdout)["id"]
    common = ["jobs", "create", "--family=cli", "--dataset", ds, "--ranks=4", "--steps=3",
              "--batch_size=8", "--max_length=32", "--follow"]
    r = ctl(addr, *common, "--task=T1")
    assert r.returncode == 0, r.stderr
    rows = [l for l in r.stdout.splitlines() if l.strip()]
    assert rows[0].split()[:2] == ["ID", "STATE"]
    assert len(rows) == 2, r.stdout  # the header and one row: the final one
    assert "SUCCEEDED" in rows[1] and "3/3" in rows[1] and "cli v1" in rows[1]
    assert "QUEUED" not in r.stdout
    assert "created job" in r.stderr or "created " in r.stderr

    js = ctl(addr, "--json", "jobs", "create", "--kind=add_task", "--family=cli", "--task=T2",
             "--dataset", ds, "--steps=2", "--batch_size=8", "--max_length=32", "--follow")
    assert js.returncode == 0, js.stderr
    last = json.loads(js.stdout.splitlines()[-1])
    assert last["state"] == "SUCCEEDED" and last["step"] == "2"

    # Both tasks on one text in one call: a list, and '*' for every task.
    for tasks, want in (("--task=T2,T1", ["T2", "T1"]), ("--task=*", ["T1", "T2"])):
        p = ctl(addr, "--json", "predict", "--family=cli", tasks, "--text=a good film")
        assert p.returncode == 0, p.stderr
        preds = json.loads(p.stdout)["predictions"]
        assert [x["task"] for x in preds] == want
        table = ctl(addr, "predict", "--family=cli", tasks, "--text=a good film")
        assert table.returncode == 0 and table.stdout.count("a good film") == 2, table.stdout


@pytest.fixture
def silent_peer():
    """A TCP port that accepts connections and never answers (gRPC hangs in
    its handshake until the caller's deadline)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield s.getsockname()[1]
    s.close()


def test_deadlines_on_unary_calls(silent_peer):
    # metattctl: --timeout overrides the default unary deadline.
    t0 = time.time()
    r = ctl(f"--server=127.0.0.1:{silent_peer}", "--timeout=1", "datasets", "list", timeout=60)
    assert r.returncode == 1 and "DEADLINE_EXCEEDED" in r.stderr, r.stderr
    assert time.time() - t0 < 15

    # Python client: a default deadline, and one per call.
    assert Client(f"127.0.0.1:{silent_peer}").timeout == DEFAULT_TIMEOUT == 60.0
    c = Client(f"127.0.0.1:{silent_peer}", timeout=1.0)
    t0 = time.time()
    with pytest.raises(MetattError) as e:
        c.list_datasets()
    assert e.value.code.name == "DEADLINE_EXCEEDED" and time.time() - t0 < 15
    t0 = time.time()
    with pytest.raises(MetattError) as e:
        Client(f"127.0.0.1:{silent_peer}").list_jobs(timeout=0.5)
    assert e.value.code.name == "DEADLINE_EXCEEDED" and time.time() - t0 < 15
    c.close()
