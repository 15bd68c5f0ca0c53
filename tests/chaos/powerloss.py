#!/usr/bin/env python3
"""Power-loss simulation for metatt-server (issue 17, hole 5).

Each seeded round: start metatt-server with the power-loss journal shim
(tests/chaos/powerloss_shim.c, LD_PRELOAD), upload datasets and import
families (a publication: a new family version) from a client thread, kill -9
the server at a seeded moment, then take back every change no fsync made
durable (restore() below: a file's data returns to its content at its last
fsync, a directory entry created, renamed or removed since its directory's
last fsync is undone; SQLite's -shm, never fsynced, is dropped), restart,
and check that everything the server acknowledged before the kill is there
and intact: each dataset answers GetDataset and its file has the sha256 the
upload returned; each imported family answers GetFamily and exports the
tensors that were imported. The next round runs on the same data directory.

    .venv/bin/python tests/chaos/powerloss.py --rounds 20 --seed 1 \\
        --out bench/results/cpu-chaos/powerloss.json

Writes a JSON summary (rounds, acknowledged objects, lost or corrupt ones:
must be 0, what the journal took back). Exit status 1 when anything
acknowledged is missing or corrupt."""
import argparse
import hashlib
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "integration"))


# ---- restore: what a power cut leaves ------------------------------------------

def parse(journal):
    out = []
    log = pathlib.Path(journal) / "log"
    if not log.exists():
        return out
    for line in log.read_text().splitlines():
        f = line.split("\t")
        if len(f) < 3:
            continue  # a torn last line (the kill hit it): its change did not happen yet
        out.append(f)
    return out


def inode_paths(root):
    m = {}
    for dirpath, dirs, files in os.walk(root):
        m[os.stat(dirpath).st_ino] = dirpath
        for name in files:
            p = os.path.join(dirpath, name)
            try:
                m[os.lstat(p).st_ino] = p
            except FileNotFoundError:
                pass
    return m


def restore(root, journal):
    """Undoes, on the files under `root`, every change the journal shows was
    not made durable. Returns counts of what was taken back."""
    entries = parse(journal)
    stats = {"data_reverted": 0, "entries_undone": 0}
    synced_file = {}  # ino -> last fsync seq
    synced_dir = {}   # dir ino -> last fsync seq
    for e in entries:
        if e[0] == "S":
            synced_file[e[2]] = max(synced_file.get(e[2], 0), int(e[1]))
        elif e[0] == "Y":
            synced_dir[e[2]] = max(synced_dir.get(e[2], 0), int(e[1]))
    jdir = pathlib.Path(journal)
    # 1. File data: back to the content before the first change since the last fsync.
    pending = {}
    for e in entries:
        if e[0] == "D":
            seq, ino, pre = int(e[1]), e[2], e[4]
            if synced_file.get(ino, 0) < seq and ino not in pending:
                pending[ino] = pre
    where = inode_paths(root)
    for ino, pre in pending.items():
        p = where.get(int(ino))
        if p is None or not os.path.isfile(p):
            continue
        with open(p, "r+b") as f:
            f.truncate(0)
            if pre != "-":
                f.write((jdir / pre).read_bytes())
        stats["data_reverted"] += 1
    # 2. Directory entries not made durable, newest first. A directory whose
    # removal is undone comes back with a new inode: `alias` maps the old one.
    alias = {}
    for e in reversed(entries):
        kind, seq = e[0], int(e[1])
        if kind not in "CMRUX":
            continue
        d = e[4] if kind == "R" else e[2]  # the directory whose entry changed (rename: target)
        if synced_dir.get(d, 0) > seq:
            continue
        where = inode_paths(root)
        def path_of(dir_ino, name):
            base = alias.get(dir_ino) or where.get(int(dir_ino))
            if base is None or not os.path.isdir(base):
                return None  # gone, or its inode number reused by a file
            return os.path.join(base, name)
        if kind in "CM":
            p = path_of(e[2], e[3])
            if p and os.path.lexists(p):
                shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
                stats["entries_undone"] += 1
        elif kind == "R":
            src, dst, saved = path_of(e[2], e[3]), path_of(e[4], e[5]), e[6]
            if dst and src and os.path.lexists(dst):
                os.rename(dst, src)
                if saved != "-":
                    shutil.copyfile(jdir / saved, dst)
                stats["entries_undone"] += 1
        elif kind == "U":
            p, saved = path_of(e[2], e[3]), e[4]
            if p and saved != "-" and not os.path.lexists(p):
                shutil.copyfile(jdir / saved, p)
                stats["entries_undone"] += 1
        elif kind == "X":
            p = path_of(e[2], e[3])
            if p and not os.path.lexists(p):
                os.mkdir(p)
                if len(e) > 4:
                    alias[e[4]] = p
                stats["entries_undone"] += 1
    for p in pathlib.Path(root).rglob("*-shm"):
        p.unlink()  # the wal-index is never fsynced; SQLite rebuilds it
    return stats


# ---- the rounds ------------------------------------------------------------------

def sha256(b):
    return hashlib.sha256(b).hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--model", default=str(ROOT / "models" / "all-MiniLM-L6-v2"))
    ap.add_argument("--out", default="")
    ap.add_argument("--max_kill_s", type=float, default=4.0)
    args = ap.parse_args()

    from server_harness import Client, Server, load_stubs, make_rows, tsv_bytes

    work = pathlib.Path(tempfile.mkdtemp(prefix="metatt-powerloss-"))
    shim = work / "powerloss_shim.so"
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-Wno-format-truncation", "-o", str(shim),
                    str(ROOT / "tests" / "chaos" / "powerloss_shim.c"), "-ldl", "-lpthread"],
                   check=True)
    pb = load_stubs(work / "stubs")
    data = work / "data"
    data.mkdir()

    # One family to import in the rounds: trained once, exported, without the shim.
    s = Server(data, args.model).start()
    c = Client(pb, s.channel())
    ds = c.upload("seed", tsv_bytes(make_rows(24)))
    job = c.create_job("seedfam", "T", ds.id, steps=2)
    j = pb.jobs_pb2
    done = c.wait_state(job.id, {j.SUCCEEDED, j.FAILED, j.CANCELLED}, timeout=600)
    assert done.state == j.SUCCEEDED, done.failure_reason
    ad = pb.adapters_pb2
    chunks = list(c.adapters.ExportFamily(ad.ExportFamilyRequest(family="seedfam"), timeout=60))
    s.stop()
    exported = {}
    cur = None
    for ch in chunks:
        if ch.file_name:
            cur = ch.file_name
            exported[cur] = b""
        exported[cur] += ch.data
    cores = exported.get("cores.safetensors", b"")

    acked_datasets = {"seed": (ds.id, sha256(tsv_bytes(make_rows(24))))}
    acked_families = {"seedfam": None}
    report = {"rounds": [], "seed": args.seed, "acknowledged_datasets": 0,
              "acknowledged_families": 0, "lost": [], "corrupt": []}
    env_extra = {}
    for r in range(args.rounds):
        rng = random.Random(args.seed * 100003 + r)
        journal = work / f"journal-{r}"
        journal.mkdir()
        env_extra = {"LD_PRELOAD": str(shim), "METATT_POWERLOSS_ROOT": str(data),
                     "METATT_POWERLOSS_JOURNAL": str(journal)}
        s = start_with_env(Server, data, args.model, env_extra)
        c = Client(pb, s.channel())
        # What the previous rounds acknowledged is all there.
        check(pb, c, data, acked_datasets, acked_families, cores, report, r)
        stop = threading.Event()
        acked_now = {"datasets": {}, "families": {}}

        def client_ops():
            k = 0
            while not stop.is_set():
                k += 1
                try:
                    if rng.random() < 0.6:
                        rows = make_rows(rng.randint(8, 200), seed=rng.randint(0, 10 ** 6))
                        raw = tsv_bytes(rows)
                        d = c.upload(f"r{r}-{k}", raw)
                        acked_now["datasets"][f"r{r}-{k}"] = (d.id, sha256(raw))
                    else:
                        name = f"imp-r{r}-{k}"

                        def parts():
                            yield ad.ImportFamilyRequest(family=name)
                            for ch in chunks:
                                yield ad.ImportFamilyRequest(chunk=ch)
                        v = c.adapters.ImportFamily(parts(), timeout=60).version
                        acked_now["families"][name] = v.version
                except Exception:  # noqa: BLE001 - the kill ends calls in flight
                    if stop.is_set():
                        return
        t = threading.Thread(target=client_ops, daemon=True)
        t.start()
        kill_after = rng.uniform(0.1, args.max_kill_s)
        time.sleep(kill_after)
        os.kill(s.proc.pid, signal.SIGKILL)
        stop.set()
        s.proc.wait()
        t.join(timeout=30)
        taken_back = restore(data, journal)
        acked_datasets.update(acked_now["datasets"])
        acked_families.update(acked_now["families"])
        report["rounds"].append({"round": r, "kill_after_s": round(kill_after, 3),
                                 "acknowledged_datasets": len(acked_now["datasets"]),
                                 "acknowledged_families": len(acked_now["families"]),
                                 **taken_back})
        print(f"round {r}: killed after {kill_after:.2f} s; acknowledged "
              f"{len(acked_now['datasets'])} uploads, {len(acked_now['families'])} imports; "
              f"taken back {taken_back}", flush=True)
        shutil.rmtree(journal)
    # The last check, without the shim.
    s = Server(data, args.model).start()
    c = Client(pb, s.channel())
    check(pb, c, data, acked_datasets, acked_families, cores, report, args.rounds)
    s.stop()
    report["acknowledged_datasets"] = len(acked_datasets)
    report["acknowledged_families"] = len(acked_families)
    report["lost_count"] = len(report["lost"])
    report["corrupt_count"] = len(report["corrupt"])
    print(json.dumps({k: v for k, v in report.items() if k != "rounds"}, indent=1))
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 1 if report["lost"] or report["corrupt"] else 0


def start_with_env(Server, data, model, env):
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return Server(data, model).start()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check(pb, c, data, datasets, families, cores, report, r):
    import grpc
    d, ad = pb.datasets_pb2, pb.adapters_pb2
    for name, (ds_id, digest) in datasets.items():
        try:
            got = c.datasets.GetDataset(d.GetDatasetRequest(dataset_id=ds_id), timeout=30).dataset
        except grpc.RpcError as e:
            report["lost"].append({"round": r, "dataset": ds_id, "error": e.details()})
            continue
        files = list((data / "datasets" / ds_id).glob("data.*"))
        if got.sha256 != digest or not files or sha256(files[0].read_bytes()) != digest:
            report["corrupt"].append({"round": r, "dataset": ds_id})
    for name in families:
        try:
            c.adapters.GetFamily(ad.GetFamilyRequest(family=name), timeout=30)
            chunks = list(c.adapters.ExportFamily(ad.ExportFamilyRequest(family=name), timeout=60))
        except grpc.RpcError as e:
            report["lost"].append({"round": r, "family": name, "error": e.details()})
            continue
        files, cur = {}, None
        for ch in chunks:
            if ch.file_name:
                cur = ch.file_name
                files[cur] = b""
            files[cur] += ch.data
        if files.get("cores.safetensors") != cores:
            report["corrupt"].append({"round": r, "family": name})


if __name__ == "__main__":
    sys.exit(main())
