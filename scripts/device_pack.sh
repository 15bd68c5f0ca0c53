#!/usr/bin/env bash
# Prepares .devcheck/ for scripts/device_check.sh on a GPU machine that has
# its own torch (and nothing of ours): a torch-only build (METATT_TORCH_ONLY)
# against the LibTorch of that machine's torch version, the absl shared
# libraries the binaries need, MiniLM's weights in fp16 (half the bytes, so
# the pack fits a 64 MiB transfer; the encoder upcasts to fp32 on load, and
# the parity test upcasts the reference the same way) and the GLUE files.
#
#   scripts/device_pack.sh TORCH_VERSION   e.g. 2.11.0 (the GPU machine's torch)
# Builds the committed HEAD (a git worktree in $DEVCHECK_SRC), not the
# working tree, so that the pack is exactly a commit.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" device_pack
(($# == 1)) || {
  echo "usage: scripts/device_pack.sh TORCH_VERSION (the GPU machine's torch, e.g. 2.11.0)" >&2
  exit 1
}
VER="$1"
WORK="${DEVCHECK_WORK:-/work/devtorch}"
BUILD="${DEVCHECK_BUILD:-/work/devbuild}"
PACK="$ROOT/.devcheck"
PY="$ROOT/.venv/bin/python"
SRC="${DEVCHECK_SRC:-/work/devsrc}"
if [ ! -d "$SRC/.git" ] && [ ! -f "$SRC/.git" ]; then git worktree add --detach "$SRC" HEAD; fi
git -C "$SRC" checkout -q --detach "$(git rev-parse HEAD)"

mkdir -p "$WORK"
if [ ! -f "$WORK/torch/version.py" ] || ! grep -q "__version__ = '$VER" "$WORK/torch/version.py"; then
  rm -rf "$WORK/torch" "$WORK"/torch-*.whl
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d "$WORK" "torch==$VER"
  unzip -q -o "$WORK"/torch-*.whl 'torch/include/*' 'torch/lib/*' 'torch/share/*' 'torch/version.py' -d "$WORK"
fi
# libtorch_cuda.so links against the CUDA libraries of the nvidia-* wheels;
# ours (same sonames) satisfy the linker.
ln -sfn "$("$PY" -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))')/nvidia" "$WORK/nvidia"
if [ ! -f "$BUILD/CMakeCache.txt" ]; then
  cmake -S "$SRC" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMETATT_TORCH_ONLY=ON \
    -DCMAKE_PREFIX_PATH="$WORK/torch/share/cmake"
fi
TARGETS=(server/model/metatt-encode server/training/metatt-train bench/adapter_bench bench/metatt-bench-encoder)
ninja -C "$BUILD" -j"$(nproc)" $(for t in "${TARGETS[@]}"; do basename "$t"; done)

rm -rf "$PACK"
mkdir -p "$PACK/lib" "$PACK/model" "$PACK/shared/data"
for t in "${TARGETS[@]}"; do
  mkdir -p "$PACK/build/$(dirname "$t")"
  strip -o "$PACK/build/$t" "$BUILD/$t"
  # Non-torch, non-libc shared libraries (Abseil) travel with the binaries.
  ldd "$BUILD/$t" | awk '/=> .*\/libabsl_/ {print $3}' | xargs -r cp -n -t "$PACK/lib"
done
"$PY" - "$ROOT/models/all-MiniLM-L6-v2" "$PACK/model" <<'EOF'
import shutil, sys, pathlib
import torch
from safetensors.torch import load_file, save_file
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
w = load_file(str(src / "model.safetensors"))
save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in w.items()},
          str(dst / "model.safetensors"), metadata={"format": "pt"})
for f in src.iterdir():
    if f.name != "model.safetensors":
        shutil.copy(f, dst / f.name)
EOF
cp -r "${METATT_SHARED_DIR:-$ROOT/../shared}/data/glue" "$PACK/shared/data/"
{ echo "git $(git -C "$SRC" rev-parse --short HEAD)"; echo "libtorch $VER (torch-only build, Release)"; } > "$PACK/BUILD_INFO"
du -sh "$PACK"
