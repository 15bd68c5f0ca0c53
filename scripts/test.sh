#!/usr/bin/env bash
# The test command: set-up (idempotent), then every C++ test (ctest) and every
# Python test (pytest: parity with transformers/peft, black-box server tests).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" test
./scripts/setup.sh
export METATT_BUILD_DIR="$ROOT/build"
export METATT_MODEL_DIR="${METATT_MODEL_DIR:-$ROOT/models/all-MiniLM-L6-v2}"
export METATT_SHARED_DIR="${METATT_SHARED_DIR:-$(cd "$ROOT/.." && pwd)/shared}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
start=$(date +%s)
rc=0
echo "== ctest"
(cd build && ctest --output-on-failure -j2 --timeout 900) || rc=1
if [ "${METATT_SKIP_SANITIZE:-0}" != 1 ]; then
  echo "== sanitizers (ASan+UBSan build of the torch-free unit tests, own dir build-asan/)"
  ./scripts/sanitize.sh || rc=1
fi
echo "== pytest"
# Two runs: each directory has its own conftest.py helpers.
.venv/bin/python -m pytest -q -p no:cacheprovider tests/python || rc=1
echo "== pytest (black-box server tests)"
.venv/bin/python -m pytest -q -p no:cacheprovider tests/integration || rc=1
echo "== tests finished in $(( $(date +%s) - start ))s, rc=$rc"
exit $rc
