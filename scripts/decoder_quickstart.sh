#!/usr/bin/env bash
# Decoder quickstart: start metatt-server on SmolLM2-135M-Instruct (CPU,
# SQLite in a temp data dir) and the OpenAI-compatible gateway beside it,
# upload a slice of ARC-Easy (instruction format) through the gateway, score
# the base model on a few held-out questions, fine-tune a MetaTT-4D task for a
# few tens of steps with progress, score the new task on the same questions,
# then stream a generation with `metattctl generate` and one through the
# gateway with curl (server-sent events). Stops both processes at the end.
#
#   scripts/decoder_quickstart.sh                     # 30 steps x 4; a few minutes on 2 cores
#   STEPS=60 TRAIN_ROWS=240 EVAL_ROWS=24 scripts/decoder_quickstart.sh
#
# Env: METATT_BUILD_DIR (default <repo>/build), METATT_SHARED_DIR (default
# <repo>/../shared), THREADS (torch threads, default 2), KEEP=1 keeps the temp
# data dir.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/quickstart_lib.sh" decoder_quickstart
GATEWAY="$BUILD/server/http/metatt-http"
MODEL="$REPO/models/SmolLM2-135M-Instruct"
BASE_ID="SmolLM2-135M-Instruct"
ARC="$SHARED/data/commonsense/ARC-Easy"
STEPS="${STEPS:-30}"
TRAIN_ROWS="${TRAIN_ROWS:-160}"
EVAL_ROWS="${EVAL_ROWS:-12}"
THREADS="${THREADS:-2}"
need "$SERVER" "$GATEWAY" "$CTL" "$PY" "$MODEL/model.safetensors" "$ARC/train.json" "$ARC/test.json"

step "ARC-Easy slices: the first $TRAIN_ROWS training rows, the first $EVAL_ROWS test rows held out"
"$PY" - "$ARC" "$WORK" "$TRAIN_ROWS" "$EVAL_ROWS" <<'EOF'
import json, pathlib, sys
arc, work, n_train, n_eval = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for split, n in (("train", n_train), ("test", n_eval)):
    rows = json.loads((arc / f"{split}.json").read_text())[:n]
    (work / f"arc-{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{split}: {len(rows)} rows -> {work / f'arc-{split}.jsonl'}")
print("a record:", json.dumps(rows[0])[:300], "...")
EOF

step "starting metatt-server on $BASE_ID (CPU, $THREADS threads, data in $WORK/data) and metatt-http"
"$SERVER" --listen=127.0.0.1:0 --metrics_listen=127.0.0.1:0 --data_dir="$WORK/data" \
  --model_dir="$MODEL" --device=cpu --num_threads="$THREADS" --kv_cache_mb=256 \
  --max_running_sequences=16 >"$WORK/server.out" 2>"$WORK/server.log" &
PIDS+=($!)
wait_listening "${PIDS[0]}" "$WORK/server.out" "$WORK/server.log"
PORT="$(awk '/^LISTENING/ {print $2}' "$WORK/server.out")"
"$GATEWAY" --listen=127.0.0.1:0 --server="127.0.0.1:$PORT" --base_model="$BASE_ID" \
  >"$WORK/gateway.out" 2>"$WORK/gateway.log" &
PIDS+=($!)
wait_listening "${PIDS[1]}" "$WORK/gateway.out" "$WORK/gateway.log"
HTTP_PORT="$(awk '/^LISTENING/ {print $2}' "$WORK/gateway.out")"
U="http://127.0.0.1:$HTTP_PORT/v1"
echo "gRPC on 127.0.0.1:$PORT, OpenAI-compatible HTTP on $U"
ctl() { "$CTL" --server="127.0.0.1:$PORT" "$@"; }

step "uploading the training slice through the gateway (instruction records: a generation dataset)"
curl -sS "$U/files" -F purpose=fine-tune -F file=@"$WORK/arc-train.jsonl" | tee "$WORK/file.json"
echo
FILE_ID="$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['id'])" "$WORK/file.json")"

# Answer accuracy on the held-out questions through the gateway with the
# openai SDK: all questions at once (one continuous batch on the server),
# greedy, the first answer1..answer5 of each reply against the label.
score() {  # <model id> <label>
  "$PY" - "$U" "$1" "$2" "$WORK/arc-test.jsonl" <<'EOF'
import concurrent.futures, json, re, sys, time
from openai import OpenAI
url, model, label, path = sys.argv[1:5]
rows = [json.loads(l) for l in open(path)]
client = OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
def ask(r):
    out = client.chat.completions.create(model=model, temperature=0, max_tokens=16,
                                         messages=[{"role": "user", "content": r["instruction"]}])
    return out.choices[0].message.content
t0 = time.time()
with concurrent.futures.ThreadPoolExecutor(len(rows)) as pool:
    replies = list(pool.map(ask, rows))
right = 0
for r, reply in zip(rows, replies):
    m = re.search(r"answer[1-5]", reply.lower())
    got = m.group(0) if m else "-"
    right += got == r["answer"]
    print(f"  want {r['answer']}  got {got:8s} | {reply.strip()[:60]!r}")
print(f"{label}: answer accuracy {right}/{len(rows)} = {100 * right / len(rows):.1f} % "
      f"({time.time() - t0:.1f} s for {len(rows)} questions)")
EOF
}

step "before: the base model ($BASE_ID) zero-shot on $EVAL_ROWS held-out questions"
score "$BASE_ID" "base model, zero-shot"

step "fine-tuning task 'ARC-Easy' of family 'arc' (MetaTT-4D, default rank and projections q,k,v,o) for $STEPS steps of 4"
ctl jobs create --family=arc --task=ARC-Easy --dataset="$FILE_ID" --form=4d \
  --steps="$STEPS" --batch_size=4 --max_length=256 --follow
ctl families get arc

step "after: arc:ARC-Easy on the same $EVAL_ROWS held-out questions"
score "arc:ARC-Easy" "arc:ARC-Easy after $STEPS steps"

QUESTION="$("$PY" -c "import json,sys; print(json.loads(open(sys.argv[1]).readline())['instruction'])" "$WORK/arc-test.jsonl")"
step "metattctl generate: the new task streams its answer to a held-out question (usage on stderr)"
printf '%s\n\n' "$QUESTION"
ctl generate --family=arc --task=ARC-Easy --chat="$QUESTION" --max_tokens=24

step "the same through the gateway: curl -N, chat completion with stream: true (server-sent events)"
BODY="$("$PY" -c "import json,sys; print(json.dumps({'model': 'arc:ARC-Easy', 'stream': True, 'temperature': 0, 'max_tokens': 24, 'stream_options': {'include_usage': True}, 'messages': [{'role': 'user', 'content': sys.argv[1]}]}))" "$QUESTION")"
curl -sS -N "$U/chat/completions" -H 'Content-Type: application/json' -d "$BODY"

step "models served by the gateway"
curl -sS "$U/models" | "$PY" -c "import json,sys; print([m['id'] for m in json.load(sys.stdin)['data']])"

step "stopping the gateway and the server"
