#!/usr/bin/env bash
# libFuzzer campaign over tests/fuzz/*_fuzzer.cc.
#
#   scripts/fuzz.sh [seconds_per_target=60] [target ...]
#   scripts/fuzz.sh 300 service_fuzzer     the gRPC handlers (tests/fuzz/service_fuzzer.cc)
#
# Configures + builds build-fuzz/ from the standalone project tests/fuzz/
# (clang, -fsanitize=fuzzer,address,undefined; idempotent), then runs every
# target (or the named ones) for the given time on a COPY of its seed corpus
# (tests/fuzz/corpus/<target>/ plus tests/fuzz/regressions/<target>/), prints
# one summary line per target and writes bench/out/fuzz.json:
#   {"<target>": {"execs": N, "seconds": S, "crashes": C}, ...}
# Exit status is non-zero if any target crashed / leaked / hit a sanitizer
# report (the reproducer is copied to build-fuzz/artifacts/<target>/).
#
# Env: FUZZ_JOBS (build parallelism, default 2), FUZZ_TORCH=0 skips the
# LibTorch-linked targets, CXX (default clang++), FUZZ_NO_BUILD=1 reuses the
# existing binaries, FUZZ_SERVICE=0 skips service_fuzzer (gRPC, protobuf, SQLite).
# Without clang: ctest's fuzz_replay_* tests (tests/fuzz/replay/) replay every
# corpus and regression input through the same LLVMFuzzerTestOneInput with g++.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" fuzz
SECONDS_PER_TARGET="${1:-60}"
shift || true
BUILD="$ROOT/build-fuzz"
JOBS="${FUZZ_JOBS:-2}"
FUZZ_TORCH="${FUZZ_TORCH:-1}"

# ---- build ---------------------------------------------------------------------
if [ "${FUZZ_NO_BUILD:-0}" != 1 ]; then
  if [ ! -f "$BUILD/build.ninja" ]; then
    args=(-S tests/fuzz -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo
          -DCMAKE_CXX_COMPILER="${CXX:-clang++}")
    if [ "$FUZZ_TORCH" = 1 ]; then
      TORCH_PREFIX="$(torch_prefix)"
      args+=(-DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DMETATT_FUZZ_TORCH=ON)
    else
      args+=(-DMETATT_FUZZ_TORCH=OFF)
    fi
    args+=(-DMETATT_FUZZ_SERVICE="$([ "${FUZZ_SERVICE:-1}" = 1 ] && echo ON || echo OFF)")
    log "configuring $BUILD"
    cmake "${args[@]}" >/dev/null
  fi
  log "building (-j$JOBS) ${*:-every target}"
  t0=$(date +%s)
  # Only the named targets when some are named; serialised with other builds
  # on this machine (one lock), niced.
  flock /tmp/metatt-build.lock nice -n 10 cmake --build "$BUILD" -j"$JOBS" ${1:+--target "$@"}
  log "build took $(( $(date +%s) - t0 ))s"
fi

# ---- targets -------------------------------------------------------------------
if (($#)); then
  targets=("$@")
else
  targets=()
  for src in tests/fuzz/*_fuzzer.cc; do
    t="$(basename "$src" .cc)"
    [ -x "$BUILD/$t" ] && targets+=("$t")
  done
fi
((${#targets[@]})) || { echo "no fuzz targets built in $BUILD" >&2; exit 1; }

# Torch is not instrumented: vectors crossing into it trip ASan's container
# overflow annotations falsely.
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:detect_container_overflow=0:allocator_may_return_null=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
export METATT_MODEL_DIR="${METATT_MODEL_DIR:-$ROOT/models/all-MiniLM-L6-v2}"

mkdir -p bench/out "$BUILD/artifacts"
WORK="$BUILD/run"
rm -rf "$WORK"
mkdir -p "$WORK"
rc=0
json="{"
sep=""
for t in "${targets[@]}"; do
  corpus="$WORK/corpus/$t"
  art="$BUILD/artifacts/$t"
  mkdir -p "$corpus" "$art"
  for d in tests/fuzz/corpus/"$t" tests/fuzz/regressions/"$t"; do
    [ -d "$d" ] && cp -f "$d"/* "$corpus"/ 2>/dev/null || true
  done
  dict=()
  [ -f "tests/fuzz/$t.dict" ] && dict=(-dict="tests/fuzz/$t.dict")
  logf="$WORK/$t.log"
  t0=$(date +%s)
  set +e
  TMPDIR="$WORK" "$BUILD/$t" "$corpus" "${dict[@]}" \
    -max_total_time="$SECONDS_PER_TARGET" -print_final_stats=1 -rss_limit_mb=4096 \
    -max_len=65536 -timeout=30 -artifact_prefix="$art/" >"$logf" 2>&1
  status=$?
  set -e
  secs=$(( $(date +%s) - t0 ))
  execs="$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$logf" | tail -1)"
  if [ -z "$execs" ]; then  # crashed before the final stats: last status line
    execs="$(grep -oE '^#[0-9]+' "$logf" | tail -1 | tr -d '#')"
  fi
  execs="${execs:-0}"
  crashes=0
  if [ "$status" -ne 0 ] || grep -qE 'ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|runtime error:|SUMMARY: UndefinedBehaviorSanitizer' "$logf"; then
    crashes=1
    rc=1
  fi
  printf '%-28s execs=%-10s seconds=%-5s crashes=%s  (exit %s, log %s)\n' \
    "$t" "$execs" "$secs" "$crashes" "$status" "$logf"
  if [ "$crashes" -ne 0 ]; then
    grep -E 'ERROR:|runtime error:|SUMMARY:|FUZZ_CHECK|Test unit written' "$logf" | head -20 | sed 's/^/    /'
    ls "$art" | sed 's/^/    artifact: /' || true
  fi
  json+="$sep\"$t\": {\"execs\": $execs, \"seconds\": $secs, \"crashes\": $crashes}"
  sep=", "
done
json+="}"
echo "$json" > bench/out/fuzz.json
log "wrote bench/out/fuzz.json"
exit $rc
