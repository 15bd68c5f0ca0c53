#!/usr/bin/env bash
# GPU checks, run ON a machine with an NVIDIA GPU and a Python that has
# torch (+ transformers, peft, scikit-learn, scipy, pytest): the encoder's
# parity on CUDA against transformers on the CPU, the adapter and encoder
# inference benchmarks on CUDA (ours vs PyTorch/PEFT in the same run), and
# the quality table (bench/quality_bench.py) on the GPU.
#
# It runs binaries built elsewhere by scripts/device_pack.sh (a torch-only
# build against the exact LibTorch of that machine's torch, absl libraries
# carried beside them, the model and the GLUE files), so nothing is compiled
# on the GPU machine. Usage (repo root):
#   scripts/device_check.sh [PACK_DIR=.devcheck] [OUT_DIR=$OUT or /tmp/devout] [QUALITY_SECONDS=380]
# Knobs (for a dry run on a CPU machine): DEVICE=cuda, ITERS=40,
# QUALITY_FLAGS (the table's size), QUALITY_ROWS; QUALITY_SECONDS=0 skips the
# table; SMALL_BATCH="8 64" adds an adapter bench at that batch and length.
set -uo pipefail
DEVICE="${DEVICE:-cuda}"
ITERS="${ITERS:-40}"
QUALITY_FLAGS="${QUALITY_FLAGS:---steps=0 --epochs=3 --train_limit=8000 --max_eval=0 --batch_size=32 --jobs=6 --throughput_steps=150}"
PACK="${1:-.devcheck}"
OUTDIR="${2:-${OUT:-/tmp/devout}}"
QUALITY_SECONDS="${3:-380}"
mkdir -p "$OUTDIR"
LOG="$OUTDIR/device_check.log"
exec > >(tee -a "$LOG") 2>&1
T0=$(date +%s)
say() { echo "== [$(($(date +%s) - T0))s] $*"; }

PACK="$(cd "$PACK" && pwd)"
TORCH_LIB="$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$PACK/lib:$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export METATT_BUILD_DIR="$PACK/build" METATT_MODEL_DIR="$PACK/model" METATT_SHARED_DIR="$PACK/shared"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

say "machine"
nvidia-smi -L || echo "(no nvidia-smi)"
python3 -c 'import torch, transformers, peft; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU", "transformers", transformers.__version__, "peft", peft.__version__)'
cat "$PACK/BUILD_INFO" 2>/dev/null
ldd "$PACK/build/server/model/metatt-encode" | grep -E "not found|torch|absl" | head -20

say "encoder parity: ours on CUDA vs transformers on CPU (fp32)"
METATT_TEST_DEVICE=$DEVICE python3 -m pytest -q -s tests/python/test_encoder_parity.py 2>&1 | tail -15

say "adapter inference benchmark on CUDA (base, MetaTT 1/100/10k tasks, LoRA)"
"$PACK/build/bench/adapter_bench" --device=$DEVICE --iters=$ITERS --warmup=5 --adapter_iters=$ITERS \
  --out="$OUTDIR/adapter_bench_$DEVICE.json" >/dev/null && python3 - "$OUTDIR/adapter_bench_$DEVICE.json" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))
for r in j["results"]:
    fwd = f'{1e3*r["median_s"]:8.2f} ms  vs base {r["throughput_vs_base"]:.3f}' if "median_s" in r else f'{"(adapter only)":>30s}'
    print(f'{r["name"]:32s} {fwd}  adapter-only {r["adapter_only_median_ms"]:.2f} ms ({100*r["adapter_only_share_of_base"]:.1f} % of base)')
EOF
python3 bench/adapter_bench_peft.py --device=$DEVICE --iters=$ITERS --warmup=5 \
  --out="$OUTDIR/adapter_bench_peft_$DEVICE.json" | python3 -c 'import json,sys; j=json.load(sys.stdin); [print(r["name"], round(1e3*r["median_s"],2), "ms vs base", round(r["throughput_vs_base"],3)) for r in j["results"]]'

say "encoder benchmark on CUDA: ours vs transformers"
python3 bench/encoder_bench.py --device=$DEVICE --iters=$ITERS >/dev/null && cp bench/out/encoder_bench.json "$OUTDIR/encoder_bench_$DEVICE.json" \
  && python3 -c 'import json; j=json.load(open("'"$OUTDIR"'/encoder_bench_'"$DEVICE"'.json")); print("ours", round(j["ours"]["sequences_per_second"]), "seq/s; transformers", round(j["transformers"]["sequences_per_second"]), "seq/s; ratio", round(j["ratio_ours_over_transformers"],3))'

if [ -n "${SMALL_BATCH:-}" ]; then
  say "adapter inference benchmark on CUDA, small batch ($SMALL_BATCH)"
  read -r SB SS <<<"$SMALL_BATCH"
  "$PACK/build/bench/adapter_bench" --device=$DEVICE --iters=$ITERS --warmup=5 --adapter_iters=$ITERS \
    --batch="$SB" --seq="$SS" --out="$OUTDIR/adapter_bench_${DEVICE}_b${SB}_s${SS}.json" >/dev/null && python3 - "$OUTDIR/adapter_bench_${DEVICE}_b${SB}_s${SS}.json" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))
for r in j["results"]:
    fwd = f'{1e3*r["median_s"]:8.2f} ms  vs base {r["throughput_vs_base"]:.3f}' if "median_s" in r else f'{"(adapter only)":>30s}'
    print(f'{r["name"]:32s} {fwd}  adapter-only {r["adapter_only_median_ms"]:.2f} ms')
EOF
fi
if [ "$QUALITY_SECONDS" = 0 ]; then say "done (quality table skipped)"; exit 0; fi
say "quality table on CUDA (deadline ${QUALITY_SECONDS}s for new runs)"
export OMP_NUM_THREADS=2
timeout -s INT $((QUALITY_SECONDS + 120)) python3 bench/quality_bench.py \
  --build_dir="$PACK/build" --model_dir="$PACK/model" --glue_dir="$PACK/shared/data/glue" \
  --device=$DEVICE $QUALITY_FLAGS --lr=${METATT_LR:-5e-3} --lora_lr=${LORA_LR:-1e-3} --deadline_s="$QUALITY_SECONDS" \
  --rows="${QUALITY_ROWS:-metatt4d_r8,lora_r8,peft_lora_r8,metatt4d_r8@5e-4,metatt5d_r8,dmrg_10_to_4,multitask_4p1d,new_task_frozen}" \
  --out=/tmp/quality 2>&1 | grep -v "^+ " | tail -40
cp /tmp/quality/quality.json /tmp/quality/quality.md "$OUTDIR/" 2>/dev/null
say "done"
