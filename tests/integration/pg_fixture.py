"""A throw-away PostgreSQL server for tests, from the machine's packages
(Debian's `postgresql`; scripts/setup.sh installs it): initdb into a fresh
directory under /tmp, pg_ctl on a free loopback port, its unix socket in that
directory, trust authentication for the `postgres` user.

PostgreSQL refuses to run as root: under root (CI, containers) the directory
is handed to `nobody` and initdb/pg_ctl run through `runuser -u nobody`.
Anything that keeps the server from starting FAILS the test with the reason;
nothing is skipped. The C++ twin is server/store/pg_test_server.h."""
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile

import pytest


def find_bin_dir():
    """Directory holding initdb and pg_ctl, or None."""
    candidates = []
    if os.environ.get("METATT_PG_BIN"):
        candidates.append(os.environ["METATT_PG_BIN"])
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(os.path.dirname(os.path.realpath(on_path)))
    # Debian keeps the server binaries off PATH: newest version first.
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                         key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0,
                         reverse=True)
    for d in candidates:
        if os.path.exists(os.path.join(d, "initdb")) and os.path.exists(os.path.join(d, "pg_ctl")):
            return d
    return None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self):
        self.bin = None
        self.dir = None
        self.port = None
        self.prefix = []
        self.started = False

    def _run(self, args, what):
        r = subprocess.run(self.prefix + args, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            log = ""
            server_log = os.path.join(self.dir, "server.log")
            if os.path.exists(server_log):
                with open(server_log) as f:
                    log = f.read()[-3000:]
            self.stop()
            pytest.fail(f"PostgreSQL: {what} failed (rc {r.returncode}):\n{r.stdout}\n{r.stderr}\n{log}")
        return r

    def start(self):
        self.bin = find_bin_dir()
        if self.bin is None:
            pytest.fail("PostgreSQL server binaries not found (initdb on PATH or "
                        "/usr/lib/postgresql/*/bin): install Debian's postgresql package "
                        "(scripts/setup.sh does)")
        self.dir = tempfile.mkdtemp(prefix="metatt-pg-", dir="/tmp")
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("nobody")
            except KeyError:
                pytest.fail("running as root, and there is no user 'nobody' to run PostgreSQL as")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            runuser = shutil.which("runuser")
            if runuser is None:
                pytest.fail("running as root without runuser (util-linux) to drop to 'nobody'")
            self.prefix = [runuser, "-u", "nobody", "--"]
        self._run([f"{self.bin}/initdb", "-D", f"{self.dir}/data", "-U", "postgres",
                   "--auth=trust", "-E", "UTF8", "--no-sync"], "initdb")
        last = None
        for _ in range(3):  # the free port may be taken between probe and bind
            self.port = free_port()
            r = subprocess.run(self.prefix + [
                f"{self.bin}/pg_ctl", "-D", f"{self.dir}/data", "-l", f"{self.dir}/server.log",
                "-w", "-t", "60", "-o",
                f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off",
                "start"], capture_output=True, text=True, timeout=120)
            if r.returncode == 0:
                self.started = True
                return self
            last = r
        with open(os.path.join(self.dir, "server.log")) as f:
            log = f.read()[-3000:]
        self.stop()
        pytest.fail(f"PostgreSQL: pg_ctl start failed: {last.stdout}\n{last.stderr}\n{log}")

    def uri(self, db="postgres"):
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def create_database(self, name):
        self._run([f"{self.bin}/createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U",
                   "postgres", name], f"createdb {name}")
        return self.uri(name)

    def stop(self):
        if self.started:
            subprocess.run(self.prefix + [f"{self.bin}/pg_ctl", "-D", f"{self.dir}/data", "-m",
                                          "immediate", "-w", "stop"],
                           capture_output=True, timeout=120)
            self.started = False
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
