#!/usr/bin/env bash
# ASan + UBSan run of the torch-free unit tests (LibTorch is not
# sanitizer-instrumented, and a sanitized rebuild of the torch code would
# double CI time, so torch-linked tests are left out).
#
#   scripts/sanitize.sh            build (idempotent) + run
#
# scripts/test.sh runs it after ctest (METATT_SKIP_SANITIZE=1 skips it there).
# METATT_SANITIZE_BUILD_DIR overrides the build directory (default build-asan/,
# never build/). A warm run only re-checks the ninja graphs and reruns the tests.
#
# Two builds, both with clang++ (else g++; CXX overrides) and -j${SANITIZE_JOBS:-2}:
#   build-asan/             the top-level project configured with
#                           -DMETATT_SANITIZE=ON; only the NO_PCH (torch-free)
#                           test targets listed in TOPLEVEL_TESTS are built.
#   build-asan/standalone/  tests/fuzz configured with METATT_ASAN_TESTS=ON:
#                           dataset_test and eval_scores_test, whose sources are
#                           torch-free but whose main-build library
#                           (metatt_training) links LibTorch.
# Exit status is non-zero if a build fails, a test fails or a sanitizer reports.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" sanitize
JOBS="${SANITIZE_JOBS:-2}"
CXX_BIN="${CXX:-clang++}"
# setup.sh installs GCC only; GCC's -fsanitize=address,undefined does the same job.
command -v "$CXX_BIN" >/dev/null 2>&1 || CXX_BIN=g++
BUILD="${METATT_SANITIZE_BUILD_DIR:-$ROOT/build-asan}"

# Torch-free (NO_PCH) unit tests of the main build; a name that is not a target
# fails the run (a renamed test must be renamed here too).
TOPLEVEL_TESTS=(tokenizer_test metattctl_format_test server_metrics_test
                sqlite_store_test json_slice_test store_conformance_test job_manager_test
                dataset_manager_test tenants_test task_pages_test job_validation_test
                recipe_test job_recipe_test bpe_tokenizer_test)

export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:halt_on_error=1:abort_on_error=0:strict_string_checks=1:detect_stack_use_after_return=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}"
export METATT_MODEL_DIR="${METATT_MODEL_DIR:-$ROOT/models/all-MiniLM-L6-v2}"
export METATT_SHARED_DIR="${METATT_SHARED_DIR:-$(cd "$ROOT/.." && pwd)/shared}"

start=$(date +%s)
rc=0

# ---- 1. top-level project, METATT_SANITIZE=ON, torch-free targets only ---------
t0=$(date +%s)
top_ok=1
if [ ! -f "$BUILD/build.ninja" ]; then
  TORCH_PREFIX="$(torch_prefix)"
  log "configuring $BUILD (METATT_SANITIZE=ON)"
  mkdir -p "$BUILD"
  if ! cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
        -DCMAKE_CXX_COMPILER="$CXX_BIN" -DMETATT_SANITIZE=ON -DMETATT_BUILD_BENCH=OFF \
        -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DPython3_EXECUTABLE="$ROOT/.venv/bin/python" \
        > "$BUILD/configure.log" 2>&1; then
    log "top-level configure FAILED (see $BUILD/configure.log)"
    top_ok=0; rc=1
  fi
fi
targets=()
if ((top_ok)); then
  # Regenerates build.ninja first if a CMakeLists.txt changed.
  ninja -C "$BUILD" build.ninja >/dev/null || { top_ok=0; rc=1; }
  if ((top_ok)); then
    all="$(ninja -C "$BUILD" -t targets all 2>/dev/null)"
    for t in "${TOPLEVEL_TESTS[@]}"; do
      if grep -q "^$t: " <<<"$all"; then targets+=("$t"); else log "no such target: $t"; rc=1; fi
    done
  fi
fi
if ((top_ok)) && ((${#targets[@]})); then
  log "building ${targets[*]}"
  if cmake --build "$BUILD" -j"$JOBS" --target "${targets[@]}"; then
    log "top-level build: $(( $(date +%s) - t0 ))s"
    regex="^($(IFS='|'; echo "${targets[*]}"))\$"
    (cd "$BUILD" && ctest --output-on-failure -j"$JOBS" -R "$regex") || rc=1
  else
    rc=1
  fi
fi

# ---- 2. standalone: dataset_test, eval_scores_test -----------------------------
t0=$(date +%s)
SA="$BUILD/standalone"
if [ ! -f "$SA/build.ninja" ]; then
  log "configuring $SA"
  cmake -S tests/fuzz -B "$SA" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_CXX_COMPILER="$CXX_BIN" -DMETATT_FUZZ_TARGETS=OFF -DMETATT_ASAN_TESTS=ON >/dev/null
fi
if cmake --build "$SA" -j"$JOBS"; then
  log "standalone build: $(( $(date +%s) - t0 ))s"
  (cd "$SA" && ctest --output-on-failure -j"$JOBS") || rc=1
else
  rc=1
fi

log "finished in $(( $(date +%s) - start ))s, rc=$rc"
exit $rc
