#!/usr/bin/env bash
# The container for real: build the CPU image from the Dockerfile with podman
# (daemon-less, Debian's package) and run a black-box smoke test against the
# running container from the host with the real client (build/client/metattctl):
# health, upload a small GLUE dataset, a short training job followed to
# SUCCEEDED, predict on the trained task.
#
#   scripts/container_smoke.sh                # everything (cold: most of an hour)
#   BUILD_ONLY=1 scripts/container_smoke.sh   # stop after the image build
#   SMOKE_ONLY=1 scripts/container_smoke.sh   # smoke an image already built
#
# Not part of the test command (scripts/test.sh): a cold build runs
# scripts/setup.sh inside the image (torch wheel download + the whole C++ build).
# Run as root on Debian bookworm. Idempotent; what it does:
#  a. installs podman, runc, debootstrap (apt-get) if missing; its podman
#     settings live in $WORK/containers.conf (CONTAINERS_CONF, this script only:
#     runc, cgroupfs, default_ulimits = []), so a machine's own podman
#     configuration is neither read nor changed;
#  b. if debian:bookworm-slim is not in podman's store (no registry needs to
#     serve it), makes it: debootstrap --variant=minbase bookworm, piped into
#     podman import and tagged as the Dockerfile's base;
#  c. podman build --network=host --pull=never --target runtime-cpu --format
#     docker (the OCI format would drop the Dockerfile's HEALTHCHECK) (the pip
#     cache is a volume under $WORK, so a rebuild does not download torch again;
#     the host's CA bundle is mounted for pip, see the Dockerfile's PIP_CERT);
#  d. makes secrets with scripts/make_secrets.sh in a temp dir, mounted
#     read-only at /etc/metatt/secrets as deploy/compose.yaml does; gRPC and
#     metrics published on 127.0.0.1 only;
#  e. the smoke, each answer checked; f. PASS/FAIL, container removed (trap).
# Log (appended, timestamped): bench/results/cpu-container/container_smoke.log
# Summary: bench/results/cpu-container/container_smoke.json
#
# Env: WORK (default /var/tmp/metatt-container), IMAGE (default metatt:cpu),
# GRPC_PORT / METRICS_PORT on the host (defaults 50151 / 59190), STEPS (25),
# ROWS (300 MRPC training rows), NICE (10: the build runs under nice).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" container_smoke
: "${WORK:=/var/tmp/metatt-container}" "${IMAGE:=metatt:cpu}" "${BASE:=debian:bookworm-slim}"
: "${GRPC_PORT:=50151}" "${METRICS_PORT:=59190}" "${STEPS:=25}" "${ROWS:=300}" "${NICE:=10}"
NAME="metatt-smoke-$$"
OUT="$ROOT/bench/results/cpu-container"
LOG="$OUT/container_smoke.log"
JSON="$OUT/container_smoke.json"
CTL="$ROOT/build/client/metattctl"
GLUE="${METATT_SHARED_DIR:-$(dirname "$ROOT")/shared}/data/glue"
mkdir -p "$WORK" "$OUT"

now() { TZ=UTC printf '%(%Y-%m-%dT%H:%M:%SZ)T' -1; }
log() { printf '%s [container_smoke] %s\n' "$(now)" "$*" | tee -a "$LOG" >&2; }
# Timestamps every line of a command's output into the log.
stamp() { while IFS= read -r l; do TZ=UTC printf '%(%Y-%m-%dT%H:%M:%SZ)T   | %s\n' -1 "$l"; done; }
run_logged() { "$@" 2>&1 | stamp | tee -a "$LOG" >&2; return "${PIPESTATUS[0]}"; }

declare -A STEP_OK=() STEP_S=()
STEP_NAMES=()
RESULT=FAIL BUILD_S="" BUILD_CACHED="" IMAGE_BYTES="" FAILED_AT=""
write_json() {
  local steps="" k
  for k in "${STEP_NAMES[@]}"; do
    steps+="\"$k\": {\"ok\": ${STEP_OK[$k]^}, \"seconds\": ${STEP_S[$k]:-None}},"
  done
  python3 - "$JSON" <<EOF
import json, sys
path = sys.argv[1]
try:
    old = json.load(open(path))
except Exception:
    old = {}
new = {
  "finished": "$(now)", "result": "$RESULT", "failed_at": "$FAILED_AT" or None,
  "image": "$IMAGE", "image_size_bytes": int("$IMAGE_BYTES") if "$IMAGE_BYTES" else None,
  "build_seconds": int("$BUILD_S") if "$BUILD_S" else None,
  "build_all_layers_cached": {"1": True, "0": False}.get("$BUILD_CACHED"),
  "steps": {${steps%,}},
  "smoke": {"train_rows": $ROWS, "steps": $STEPS},
  "host": "$(uname -srm), $(nproc) cores, podman $(podman --version 2>/dev/null | awk '{print $3}')",
}
# The first build that was not a full cache hit is the cold build: kept across runs.
cold = old.get("cold_build")
if new["build_seconds"] is not None and new["build_all_layers_cached"] is False:
    cold = {"seconds": new["build_seconds"], "finished": new["finished"],
            "image_size_bytes": new["image_size_bytes"]}
new["cold_build"] = cold
json.dump(new, open(path, "w"), indent=2)
open(path, "a").write("\n")
EOF
}

SECRETS=""
cleanup() {
  local rc=$?
  if podman container exists "$NAME" 2>/dev/null; then
    log "server log (podman logs, last 40 lines):"
    podman logs --tail 40 "$NAME" 2>&1 | stamp >>"$LOG" || true
    podman rm -f -v -t 5 "$NAME" >/dev/null 2>&1 || true
    log "container $NAME removed"
  fi
  [[ -n "$SECRETS" ]] && rm -rf "$SECRETS"
  [[ $rc -ne 0 && -z "$FAILED_AT" ]] && FAILED_AT="exit status $rc"
  write_json || log "writing ${JSON#"$ROOT"/} FAILED"
  log "RESULT: $RESULT${FAILED_AT:+ (failed at: $FAILED_AT)}; summary in ${JSON#"$ROOT"/}"
}
trap cleanup EXIT

log "==== run started: $(uname -srm), $(nproc) cores, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

# --- a. podman and its settings (scoped to this script) ---------------------
need=()
for p in podman runc debootstrap; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || need+=("$p")
done
if ((${#need[@]})); then
  log "installing ${need[*]} (apt-get)"
  run_logged apt-get update -qq
  DEBIAN_FRONTEND=noninteractive run_logged apt-get install -y -qq --no-install-recommends \
    "${need[@]}" uidmap fuse-overlayfs slirp4netns
fi
cat >"$WORK/containers.conf" <<'EOF'
# scripts/container_smoke.sh only (CONTAINERS_CONF): root podman in a VM
# without systemd cgroup management and with no rlimits to hand down.
[containers]
default_ulimits = []
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
EOF
export CONTAINERS_CONF="$WORK/containers.conf"
log "podman $(podman --version | awk '{print $3}'), runc $(runc --version | awk 'NR==1{print $3}'), CONTAINERS_CONF=$CONTAINERS_CONF, storage $(podman info --format '{{.Store.GraphDriverName}} {{.Store.GraphRoot}}')"

# --- b. the base image ---------------------------------------------------------
if [[ "${SMOKE_ONLY:-0}" != 1 ]]; then
  if podman image exists "$BASE"; then
    log "base $BASE present in podman's store"
  else
    log "base $BASE missing: debootstrap --variant=minbase bookworm into $WORK/rootfs"
    rm -rf "$WORK/rootfs"
    t0=$SECONDS
    run_logged nice -n "$NICE" debootstrap --variant=minbase bookworm "$WORK/rootfs" http://deb.debian.org/debian
    cat >"$WORK/rootfs/etc/apt/sources.list" <<'EOF'
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
    rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
    tar -C "$WORK/rootfs" --numeric-owner -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
    # Tag the fully qualified name too: FROM debian:bookworm-slim resolves to it.
    podman tag "$BASE" "docker.io/library/$BASE"
    rm -rf "$WORK/rootfs"
    log "base $BASE imported ($(podman image inspect --format '{{.Size}}' "$BASE") bytes, $((SECONDS - t0)) s)"
  fi

  # --- c. the image ------------------------------------------------------------
  mkdir -p "$WORK/pip-cache"
  # The host's CA bundle (PIP_CERT if set), for pip inside the build: a
  # TLS-intercepting proxy between this machine and PyPI signs with its own CA.
  HOST_CA="${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}"
  log "podman build: --target runtime-cpu -t $IMAGE (nice -n $NICE, --network=host --pull=never)"
  t0=$SECONDS
  set +e
  # The build context: the committed tree (git archive HEAD), so that others'
  # uncommitted edits are not built; CONTEXT=worktree builds the working tree.
  if [[ "${CONTEXT:-head}" == worktree ]]; then
    ctx="$ROOT"
  else
    ctx="$WORK/context"
    rm -rf "$ctx" && mkdir -p "$ctx"
    git -C "$ROOT" archive --format=tar HEAD | tar -x -C "$ctx"
  fi
  log "build context: ${CONTEXT:-head} ($ctx, commit $(git rev-parse --short HEAD))"
  nice -n "$NICE" podman build --network=host --pull=never --layers \
    --format docker --build-arg VARIANT=cpu --target runtime-cpu \
    --volume "$WORK/pip-cache:/root/.cache/pip" \
    --volume "$HOST_CA:/etc/ssl/build-ca.crt:ro" --build-arg PIP_CERT=/etc/ssl/build-ca.crt \
    -t "$IMAGE" -f "$ctx/Dockerfile" "$ctx" 2>&1 \
    | tee "$WORK/build.out" | stamp | tee -a "$LOG" >&2
  rc=${PIPESTATUS[0]}
  set -e
  BUILD_S=$((SECONDS - t0))
  # All layers cached: every RUN step is followed by "--> Using cache".
  BUILD_CACHED=$(awk '/^STEP [0-9]+\/[0-9]+: RUN /{r++; getline; if ($0 ~ /Using cache/) c++} END{print (r > 0 && r == c) ? 1 : 0}' "$WORK/build.out")
  # podman 4.3 can exit 0 when it is stopped by a signal: a build counts only
  # when it tagged the image.
  if [[ $rc -eq 0 ]] && ! grep -q '^Successfully tagged' "$WORK/build.out"; then rc=1; fi
  if [[ $rc -ne 0 ]]; then
    FAILED_AT="podman build (status $rc after ${BUILD_S} s)"
    log "podman build FAILED with status $rc after ${BUILD_S} s"
    exit 1
  fi
  IMAGE_BYTES=$(podman image inspect --format '{{.Size}}' "$IMAGE")
  log "image $IMAGE built in ${BUILD_S} s (all layers cached: $BUILD_CACHED); size ${IMAGE_BYTES} bytes ($(podman images --format '{{.Size}}' "$IMAGE" | head -1))"
  if [[ "${BUILD_ONLY:-0}" == 1 ]]; then
    RESULT=BUILT
    exit 0
  fi
else
  IMAGE_BYTES=$(podman image inspect --format '{{.Size}}' "$IMAGE")
fi

# --- d-f: the smoke ---------------------------------------------------------
# --- d. secrets and the container ------------------------------------------
[[ -x "$CTL" ]] || { FAILED_AT="no $CTL on the host (scripts/setup.sh builds it)"; exit 1; }
[[ -f "$GLUE/MRPC/train.tsv" ]] || { FAILED_AT="no $GLUE/MRPC/train.tsv"; exit 1; }
SECRETS="$(mktemp -d "$WORK/secrets.XXXXXX")"
rmdir "$SECRETS"
run_logged scripts/make_secrets.sh "$SECRETS"
TOKEN="$(cat "$SECRETS/admin.token")"
log "podman run $IMAGE as $NAME: secrets at /etc/metatt/secrets (ro), gRPC 127.0.0.1:$GRPC_PORT, metrics 127.0.0.1:$METRICS_PORT, the image's ENTRYPOINT + CMD"
podman run -d --name "$NAME" -p "127.0.0.1:$GRPC_PORT:50051" -p "127.0.0.1:$METRICS_PORT:9090" \
  -v "$SECRETS:/etc/metatt/secrets:ro" "$IMAGE" >/dev/null

# --- e. the smoke, from the host with the real client ------------------------
ctl() { "$CTL" --server="127.0.0.1:$GRPC_PORT" --tls_ca="$SECRETS/ca.pem" --token="$TOKEN" "$@"; }
# step NAME CMD...: runs CMD (its output into the log and $WORK/step.out),
# records ok/seconds; a failing step ends the run.
step() {
  local name=$1 t0=$SECONDS rc; shift
  log "step $name: $*"
  set +e
  "$@" >"$WORK/step.out" 2>"$WORK/step.err"
  rc=$?
  set -e
  sed 's/^/(stderr) /' <"$WORK/step.err" | stamp >>"$LOG"
  stamp <"$WORK/step.out" >>"$LOG"
  STEP_S[$name]=$((SECONDS - t0))
  STEP_NAMES+=("$name")
  if [[ $rc -eq 0 ]]; then
    STEP_OK[$name]=true
    log "step $name ok (${STEP_S[$name]} s)"
  else
    STEP_OK[$name]=false
    FAILED_AT="$name"
    log "step $name FAILED (status $rc, ${STEP_S[$name]} s)"
    exit 1
  fi
}
field() { python3 -c "import json,sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])$1)"; }

wait_health() {  # the server loads the model first; health answers SERVING when up
  local i
  for i in $(seq 1 180); do
    if ctl --timeout=4 health; then return 0; fi
    if [[ "$(podman inspect --format '{{.State.Running}}' "$NAME")" != true ]]; then
      echo "container exited"; return 1
    fi
    sleep 2
  done
  return 1
}
step health wait_health
image_healthcheck() {  # the image's own HEALTHCHECK (its metattctl over TLS, inside)
  if [[ "$(podman image inspect --format '{{json .HealthCheck}}' "$IMAGE")" != null ]]; then
    podman healthcheck run "$NAME" && echo "podman healthcheck run: healthy"
  else  # an OCI-format image drops HEALTHCHECK: run its command by hand
    echo "the image has no HEALTHCHECK (OCI format); its command by podman exec:"
    podman exec "$NAME" metattctl --server=localhost:50051 \
      --tls_ca=/etc/metatt/secrets/ca.pem --timeout=4 health
  fi
}
step image_healthcheck image_healthcheck

metrics() {  # /metrics behind basic auth: 401 without the password, 200 with it
  local code
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$METRICS_PORT/metrics")
  echo "without password: HTTP $code"; [[ "$code" == 401 ]] || return 1
  curl -sf -u "prometheus:$(cat "$SECRETS/metrics-password")" "http://127.0.0.1:$METRICS_PORT/metrics" \
    >"$WORK/metrics.txt"
  echo "with password: $(wc -l <"$WORK/metrics.txt") lines, $(grep -c '^metatt_' "$WORK/metrics.txt") metatt_ samples"
  grep -q '^metatt_' "$WORK/metrics.txt"
}
step metrics metrics

no_token() {  # the server refuses a call without a token
  if "$CTL" --server="127.0.0.1:$GRPC_PORT" --tls_ca="$SECRETS/ca.pem" --token= --timeout=10 \
      datasets list; then
    echo "a call without a token was answered"; return 1
  fi
  echo "refused without a token, as it should be"
}
step auth_refused no_token

# A few hundred MRPC rows (header kept) for training, 100 dev rows for eval.
head -n $((ROWS + 1)) "$GLUE/MRPC/train.tsv" >"$WORK/mrpc_train_small.tsv"
head -n 101 "$GLUE/MRPC/dev.tsv" >"$WORK/mrpc_dev_small.tsv"
upload() {  # FILE NAME: uploads, checks the row count the server counted
  local want=$(($(wc -l <"$1") - 1))
  ctl --json upload "$1" --name "$2" --glue MRPC | tee "$WORK/upload.json"
  local rows; rows=$(field '["num_rows"]' <"$WORK/upload.json")
  echo "rows: server $rows, file $want"
  [[ "$rows" == "$want" ]]
}
step upload_train upload "$WORK/mrpc_train_small.tsv" smoke-mrpc-train
DS=$(field '["id"]' <"$WORK/upload.json")
step upload_dev upload "$WORK/mrpc_dev_small.tsv" smoke-mrpc-dev
DS_DEV=$(field '["id"]' <"$WORK/upload.json")

train() {  # a short job, followed to its end: it must be SUCCEEDED at step STEPS
  ctl --json jobs create --family=smoke --task=MRPC --dataset="$DS" --eval_dataset="$DS_DEV" \
    --form=4+1d --steps="$STEPS" --batch_size=16 --eval_every="$STEPS" --max_length=64 \
    --follow >"$WORK/follow.jsonl"
  local rc=$?
  tail -n 1 "$WORK/follow.jsonl"
  grep -h '"eval"' "$WORK/follow.jsonl" | tail -n 1 || true
  [[ $rc -eq 0 ]] || return 1
  local state step
  state=$(field '["state"]' <"$WORK/follow.jsonl")
  step=$(field '.get("step", "0")' <"$WORK/follow.jsonl")
  echo "job state $state at step $step"
  [[ "$state" == SUCCEEDED && "$step" == "$STEPS" ]]
}
step train train
JOB=$(field '["id"]' <"$WORK/follow.jsonl")

predict() {  # the trained task answers a label of its dataset with probabilities summing to 1
  ctl --json predict --family=smoke --task=MRPC \
    --text="The company said profits rose 10 percent in the third quarter ." \
    --text_pair="Third-quarter profits rose 10 percent , the company said ." | tee "$WORK/predict.json"
  python3 - "$WORK/predict.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
p = r["predictions"][0]
s = p["scores"]
assert p["task"] == "MRPC", p
assert len(s) == 2 and abs(sum(s) - 1) < 1e-3, s
assert int(p.get("label", 0)) == max(range(2), key=lambda i: s[i]), p
print("predicted label", p.get("label", 0), p.get("label_name", ""), "scores", s)
PY
}
step predict predict

families() {  # the job published family 'smoke' holding task MRPC
  ctl --json tasks list --family=smoke | tee "$WORK/tasks.json"
  python3 -c "import json,sys; t=json.load(open(sys.argv[1])); assert any(x.get('name')=='MRPC' or x.get('task')=='MRPC' for x in t['tasks']), t" "$WORK/tasks.json"
}
step tasks families

log "job $JOB; datasets $DS $DS_DEV"
RESULT=PASS
