# Sourced by scripts/quickstart.sh and scripts/decoder_quickstart.sh: what both
# do around their own steps.
#
#   source "$(dirname "${BASH_SOURCE[0]}")/quickstart_lib.sh" <name>
#
# runs the idempotent set-up (scripts/setup.sh: packages, venv, models, build),
# sets REPO, SHARED (METATT_SHARED_DIR, default <repo>/../shared), BUILD
# (METATT_BUILD_DIR, default <repo>/build), SERVER, CTL, PY (the .venv's
# python) and WORK (a fresh temp dir), and on exit stops every process in
# PIDS, last started first, then removes WORK (KEEP=1 keeps it). Error messages start with <name>.
QS_NAME="$1"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$REPO/scripts/setup.sh"
SHARED="${METATT_SHARED_DIR:-$(dirname "$REPO")/shared}"
BUILD="${METATT_BUILD_DIR:-$REPO/build}"
SERVER="$BUILD/server/metatt-server"
CTL="$BUILD/client/metattctl"
PY="$REPO/.venv/bin/python"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/metatt-$QS_NAME.XXXXXX")"
PIDS=()
stop_pid() {
  if [[ -n "$1" ]] && kill -0 "$1" 2>/dev/null; then
    kill -TERM "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
  fi
}
cleanup() {
  local i
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${PIDS[i]}"; done
  if [[ "${KEEP:-0}" == 1 ]]; then echo "data kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

need() {  # <file>...: exits naming the first one that is missing
  local f
  for f in "$@"; do
    [[ -e "$f" ]] || { echo "$QS_NAME: missing $f (scripts/setup.sh lays it out)" >&2; exit 1; }
  done
}
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
wait_listening() {  # <pid> <stdout file> <log file>: until its LISTENING line (5 min at most)
  for _ in $(seq 1 1500); do
    grep -q '^LISTENING' "$2" 2>/dev/null && return 0
    kill -0 "$1" 2>/dev/null || { cat "$3" >&2; return 1; }
    sleep 0.2
  done
  echo "$QS_NAME: no LISTENING line in $2" >&2
  return 1
}
