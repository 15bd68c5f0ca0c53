"""Large families over the AdapterService: FamilyVersion carries task_count and
at most its first 100 tasks, ListTasks pages through every task (page_size,
page_token), metattctl and the Python client page through them. One server
holds a 20,000-task family published by metatt-bench-family."""
import json
import subprocess
import sys

import grpc
import pytest

from server_harness import ROOT, Client, Server, build_dir, publish_bench_family

sys.path.insert(0, str(ROOT / "client" / "python"))

from metatt_client import Client as PyClient  # noqa: E402

BIG = 20000
SMALL = 3
INLINE = 100


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model):
    data = tmp_path_factory.mktemp("paging") / "data"
    publish_bench_family(data, tiny_model, "big", BIG)
    publish_bench_family(data, tiny_model, "small", SMALL, seed=2)
    s = Server(data, tiny_model).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def ac(pb, served):
    return Client(pb, served.channel())


def list_tasks(ac, **kw):
    return ac.adapters.ListTasks(ac.pb.adapters_pb2.ListTasksRequest(**kw), timeout=60)


def test_family_responses_carry_the_count_and_the_first_tasks(ac):
    a = ac.pb.adapters_pb2
    fams = ac.adapters.ListFamilies(a.ListFamiliesRequest(), timeout=60)
    latest = {f.name: f.versions[-1] for f in fams.families}
    assert latest["big"].task_count == BIG
    assert [t.index for t in latest["big"].tasks] == list(range(INLINE))
    assert [t.name for t in latest["big"].tasks][:2] == ["task0", "task1"]
    # Small families are unchanged: every task, plus the count.
    assert latest["small"].task_count == SMALL
    assert [t.index for t in latest["small"].tasks] == list(range(SMALL))
    # Far under gRPC's 4 MB default receive limit (all 20,000 tasks would not be).
    assert fams.ByteSize() < 64 << 10

    fam = ac.adapters.GetFamily(a.GetFamilyRequest(family="big"), timeout=60).family
    assert fam.versions[-1].task_count == BIG
    assert len(fam.versions[-1].tasks) == INLINE


def test_list_tasks_pages_through_every_task_once_in_order(ac):
    seen, token, pages = [], "", 0
    while True:
        resp = list_tasks(ac, family="big", page_size=5000, page_token=token)
        assert resp.task_count == BIG and resp.version == 1
        assert len(resp.tasks) == 5000
        seen.extend((t.index, t.name) for t in resp.tasks)
        pages += 1
        token = resp.next_page_token
        if not token:
            break
    assert pages == BIG // 5000
    assert seen == [(i, f"task{i}") for i in range(BIG)]


def test_page_size_default_and_clamp(ac):
    assert len(list_tasks(ac, family="big").tasks) == 1000
    resp = list_tasks(ac, family="big", page_size=BIG)  # above the maximum: 10000
    assert len(resp.tasks) == 10000 and resp.next_page_token
    small = list_tasks(ac, family="small")
    assert [t.index for t in small.tasks] == list(range(SMALL))
    assert small.next_page_token == "" and small.task_count == SMALL


@pytest.mark.parametrize("kw, field", [
    (dict(page_token="not-a-token"), "page_token"),
    (dict(page_token="1:999999"), "page_token"),   # past the tasks
    (dict(page_token="1:5000", version=2), "page_token"),  # another version's token
    (dict(page_size=-1), "page_size"),
])
def test_bad_paging_arguments_name_the_field(ac, kw, field):
    with pytest.raises(grpc.RpcError) as e:
        list_tasks(ac, family="big", **kw)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in e.value.details()


def test_python_client_pages_through_all_tasks(served):
    with PyClient(f"127.0.0.1:{served.port}", timeout=60) as c:
        assert [t.index for t in c.list_tasks("big", page_size=5000)] == list(range(BIG))
        assert [t.name for t in c.list_tasks("small")] == [f"task{i}" for i in range(SMALL)]
        fam = c.get_family("big")
        assert fam.versions[-1].task_count == BIG and len(fam.versions[-1].tasks) == INLINE


def metattctl(served, *args):
    exe = build_dir() / "client" / "metattctl"
    if not exe.exists():
        pytest.fail(f"binary {exe} not built: cmake --build <build> --target metattctl")
    r = subprocess.run([str(exe), f"--server=127.0.0.1:{served.port}", *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_metattctl_shows_the_count_and_pages_tasks(served):
    out = json.loads(metattctl(served, "tasks", "list", "--family=big", "--page_size=5000",
                               "--json"))
    assert [int(t.get("index", 0)) for t in out["tasks"]] == list(range(BIG))
    assert int(out["task_count"]) == BIG
    table = metattctl(served, "families", "list").splitlines()
    header, big = table[0].split(), next(l for l in table if l.startswith("big ")).split()
    assert big[header.index("NTASKS")] == str(BIG)
    assert "(19995 more)" in table[[l.startswith("big ") for l in table].index(True)]
    got = metattctl(served, "families", "get", "big")
    assert f"{BIG} tasks" in got and f"first {INLINE} of {BIG} tasks" in got
    small = metattctl(served, "tasks", "list", "--family=small").splitlines()
    assert len(small) == 2 + SMALL  # "small version 1", the header, one row per task
