# Sourced first by the scripts here that work from the repository root:
#
#   source "$(dirname "${BASH_SOURCE[0]}")/common.sh" <name>
#
# sets strict mode (set -euo pipefail), ROOT (the repository, also the working
# directory from here on), log (its arguments on stdout after a bold
# "[<name>]") and torch_prefix (prints the CMake prefix of the torch wheel in
# the repository's .venv, for CMAKE_PREFIX_PATH).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SCRIPT_NAME="$1"
log() { printf '\033[1m[%s]\033[0m %s\n' "$SCRIPT_NAME" "$*"; }
torch_prefix() { "$ROOT/.venv/bin/python" -c 'import torch; print(torch.utils.cmake_prefix_path)'; }
