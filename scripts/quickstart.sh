#!/usr/bin/env bash
# Quickstart: start metatt-server on the default model (all-MiniLM-L6-v2, CPU,
# SQLite in a temp data dir), upload GLUE MRPC, train a (4+1)D MetaTT adapter
# family for a few steps, add SST-2 as a second task (shared cores frozen),
# print predictions of both tasks, stop the server.
#
#   scripts/quickstart.sh            # 250 steps per task; a few minutes on 2 cores
#   STEPS=200 scripts/quickstart.sh
#
# Env: METATT_BUILD_DIR (default <repo>/build), METATT_SHARED_DIR (default
# <repo>/../shared), METATT_MODEL_DIR (default <repo>/models/all-MiniLM-L6-v2),
# KEEP=1 keeps the temp data dir.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/quickstart_lib.sh" quickstart
GLUE="$SHARED/data/glue"
STEPS="${STEPS:-250}"
need "$SERVER" "$CTL" "$GLUE/MRPC/train.tsv" "$GLUE/SST-2/train.tsv"

json_field() { python3 -c "import json,sys; print(json.loads(sys.stdin.readline())['$1'])"; }

step "starting metatt-server (CPU, data in $WORK/data)"
MODEL_ARGS=()
[[ -n "${METATT_MODEL_DIR:-}" ]] && MODEL_ARGS=(--model_dir="$METATT_MODEL_DIR")
"$SERVER" --listen=127.0.0.1:0 --metrics_listen=127.0.0.1:0 --data_dir="$WORK/data" \
  --device=cpu "${MODEL_ARGS[@]}" >"$WORK/server.out" 2>"$WORK/server.log" &
PIDS+=($!)
wait_listening "${PIDS[0]}" "$WORK/server.out" "$WORK/server.log"
PORT="$(awk '/^LISTENING/ {print $2}' "$WORK/server.out")"
METRICS_PORT="$(awk '/^METRICS/ {print $2}' "$WORK/server.out")"
echo "gRPC on 127.0.0.1:$PORT, metrics on http://127.0.0.1:$METRICS_PORT/metrics"
ctl() { "$CTL" --server="127.0.0.1:$PORT" "$@"; }

step "uploading GLUE MRPC and SST-2 (train + dev)"
MRPC=$(ctl upload "$GLUE/MRPC/train.tsv" --name mrpc-train --glue MRPC --json | json_field id)
MRPC_DEV=$(ctl upload "$GLUE/MRPC/dev.tsv" --name mrpc-dev --glue MRPC --json | json_field id)
SST=$(ctl upload "$GLUE/SST-2/train.tsv" --name sst2-train --glue SST-2 --json | json_field id)
SST_DEV=$(ctl upload "$GLUE/SST-2/dev.tsv" --name sst2-dev --glue SST-2 --json | json_field id)
ctl datasets list

step "training family 'glue' ((4+1)D MetaTT, default rank and projections) on MRPC for $STEPS steps (default learning rates)"
ctl jobs create --family=glue --task=MRPC --dataset="$MRPC" --eval_dataset="$MRPC_DEV" \
  --form=4+1d --steps="$STEPS" --batch_size=16 --eval_every="$STEPS" \
  --max_length=64 --follow

step "adding SST-2 to 'glue' (shared cores frozen: one r x r task slice + head)"
ctl jobs create --kind=add_task --family=glue --task=SST-2 --dataset="$SST" \
  --eval_dataset="$SST_DEV" --steps="$STEPS" --batch_size=16 --eval_every="$STEPS" \
  --max_length=64 --follow

step "family 'glue'"
ctl families get glue

step "predictions"
ctl predict --family=glue --task=MRPC \
  --text="The company said profits rose 10 percent in the third quarter ." \
  --text_pair="Third-quarter profits rose 10 percent , the company said ."
ctl predict --family=glue --task=MRPC \
  --text="The cat sat on the mat ." --text_pair="Stocks fell sharply on Monday ."
ctl predict --family=glue --task=SST-2 --text="a gorgeous , witty , seductive movie ."
ctl predict --family=glue --task=SST-2 --text="the plot is a dull , lifeless mess ."

step "jobs"
ctl jobs list
step "stopping the server"
