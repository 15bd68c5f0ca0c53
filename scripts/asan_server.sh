#!/usr/bin/env bash
# The real metatt-server (and metattctl) built with ASan+UBSan, under one run
# of a subset of the black-box integration tests.
#
#   scripts/asan_server.sh                      build (idempotent) + the default tests
#   scripts/asan_server.sh tests/integration/test_tenants.py ...   these tests
#
# Build: <src>/build-asan-server/ (never build/ or build-asan/), the top-level project
# with clang++ -DMETATT_SANITIZE=ON (-fsanitize=address,undefined), only the
# metatt-server and metattctl targets. LibTorch, gRPC, protobuf, abseil and
# SQLite are Debian / wheel binaries, not instrumented: ASan sees our code's
# accesses (and every heap block, since it replaces malloc), not theirs.
#
# Runtime options, and why:
#   detect_leaks=0             the tests end the server with SIGTERM / SIGKILL, and
#                              LibTorch, gRPC and protobuf keep process-lifetime
#                              singletons that LeakSanitizer reports at exit;
#                              leaks are not what this run is for (bench/soak.py
#                              watches RSS over time instead).
#   detect_container_overflow=0  std::vector / std::string cross into
#                              uninstrumented LibTorch code, which does not
#                              update the container annotations (false reports).
#   halt_on_error=1            the first ASan report ends the server: the test
#                              that drove it fails, and the report is kept.
#   log_path                   every report goes to build-asan-server/asan-logs/
#                              (the harness swallows the server's stderr).
#   UBSan: print_stacktrace=1, reports logged the same way (recoverable: the
#   server goes on, the report is counted).
#
# Output: build-asan-server/asan_server.log (pytest output) and
# bench/out/asan_server.json {tests, passed, failed, skipped, asan_reports,
# ubsan_reports, options}. Exit non-zero on a build failure, a failed test or
# any sanitizer report.
# Env: ASAN_SERVER_NO_BUILD=1 runs the binaries already built,
# ASAN_SERVER_JOBS (default 2), METATT_ASAN_SERVER_SRC (default this
# checkout), METATT_ASAN_SERVER_BUILD_DIR (default <src>/build-asan-server).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" asan-server
JOBS="${ASAN_SERVER_JOBS:-2}"
# The sources to build and test: this checkout, or another one (e.g. a
# `git worktree` of a commit, when the working tree is mid-edit).
SRC="$(cd "${METATT_ASAN_SERVER_SRC:-$ROOT}" && pwd)"
BUILD="${METATT_ASAN_SERVER_BUILD_DIR:-$SRC/build-asan-server}"
CXX_BIN="${CXX:-clang++}"
command -v "$CXX_BIN" >/dev/null 2>&1 || CXX_BIN=g++

DEFAULT_TESTS=(tests/integration/test_server_datasets.py tests/integration/test_server_jobs.py
               tests/integration/test_tenants.py tests/integration/test_tenant_names.py
               tests/integration/test_inference.py tests/integration/test_server_train.py
               tests/integration/test_shutdown.py tests/integration/test_server_restart.py)
# Test paths are relative to $SRC (the tests of the sources that were built).
if (($#)); then TESTS=("$@"); else TESTS=("${DEFAULT_TESTS[@]}"); fi

mkdir -p "$BUILD" bench/out
if [ ! -f "$BUILD/build.ninja" ]; then
  TORCH_PREFIX="$(torch_prefix)"
  log "configuring $BUILD (METATT_SANITIZE=ON, $CXX_BIN)"
  cmake -S "$SRC" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_CXX_COMPILER="$CXX_BIN" -DMETATT_SANITIZE=ON -DMETATT_BUILD_BENCH=OFF \
    -DMETATT_BUILD_TESTS=OFF \
    -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DPython3_EXECUTABLE="$ROOT/.venv/bin/python" \
    > "$BUILD/configure.log" 2>&1 || { log "configure FAILED ($BUILD/configure.log)"; exit 1; }
fi
if [ "${ASAN_SERVER_NO_BUILD:-0}" != 1 ]; then
  log "building metatt-server metattctl"
  t0=$(date +%s)
  # Serialised with other builds on this machine (one lock), niced.
  flock /tmp/metatt-build.lock nice -n 10 cmake --build "$BUILD" -j"$JOBS" --target metatt-server metattctl
  log "build: $(( $(date +%s) - t0 ))s"
fi

LOGS="$BUILD/asan-logs"
rm -rf "$LOGS"
mkdir -p "$LOGS"
export ASAN_OPTIONS="detect_leaks=0:detect_container_overflow=0:halt_on_error=1:abort_on_error=0:log_path=$LOGS/asan"
export UBSAN_OPTIONS="print_stacktrace=1:log_path=$LOGS/ubsan"
export METATT_BUILD_DIR="$BUILD"
export METATT_MODEL_DIR="${METATT_MODEL_DIR:-$ROOT/models/all-MiniLM-L6-v2}"
export METATT_SHARED_DIR="${METATT_SHARED_DIR:-$(cd "$ROOT/.." && pwd)/shared}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUTLOG="$BUILD/asan_server.log"
log "pytest ${TESTS[*]}"
set +e
cd "$SRC"
nice -n 10 "$ROOT/.venv/bin/python" -m pytest -q -p no:cacheprovider -rfEs \
  --junitxml="$BUILD/asan_server.xml" "${TESTS[@]}" > "$OUTLOG" 2>&1
st=$?
set -e
cd "$ROOT"
tail -15 "$OUTLOG"
asan=$(cat "$LOGS"/asan.* 2>/dev/null | grep -c "ERROR: AddressSanitizer" || true)
ubsan=$(cat "$LOGS"/asan.* "$LOGS"/ubsan.* 2>/dev/null | grep -c "runtime error:" || true)
ASAN_SRC_DESC="$SRC at $(git -C "$SRC" rev-parse --short HEAD)$(git -C "$SRC" diff --quiet HEAD -- . 2>/dev/null || echo ' + uncommitted changes')" \
"$ROOT/.venv/bin/python" - "$BUILD/asan_server.xml" "$asan" "$ubsan" "$st" <<'PY' > bench/out/asan_server.json
import json, os, sys, xml.etree.ElementTree as ET
xml, asan, ubsan, st = sys.argv[1:]
r = ET.parse(xml).getroot()
s = r if r.tag == "testsuite" else r.find("testsuite")
tests, fail, err, skip = (int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
print(json.dumps({
    "binary": "metatt-server + metattctl, clang -fsanitize=address,undefined (METATT_SANITIZE=ON)",
    "source": os.environ.get("ASAN_SRC_DESC", ""),
    "test_files": sorted({c.get("file") or c.get("classname", "").rsplit(".", 1)[0]
                          for c in s.iter("testcase")}),
    "tests": tests, "passed": tests - fail - err - skip, "failed": fail + err, "skipped": skip,
    "pytest_exit": int(st), "asan_reports": int(asan), "ubsan_reports": int(ubsan),
    "asan_options": os.environ["ASAN_OPTIONS"].split(":log_path")[0],
    "ubsan_options": os.environ["UBSAN_OPTIONS"].split(":log_path")[0],
    "wall_seconds": float(s.get("time", 0))}, indent=1))
PY
log "asan reports: $asan, ubsan reports: $ubsan, pytest exit $st; bench/out/asan_server.json, $OUTLOG, $LOGS/"
if [ "$asan" -ne 0 ] || [ "$ubsan" -ne 0 ]; then
  grep -h -A12 -E "ERROR: AddressSanitizer|runtime error:" "$LOGS"/* | head -60
fi
[ "$st" -eq 0 ] && [ "$asan" -eq 0 ] && [ "$ubsan" -eq 0 ]
