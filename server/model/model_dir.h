// Where the base model and the shared data live. One rule each, everywhere
// (server, CLI tools, tests).
//
// The base model:
//   1. an explicit --model_dir flag, else
//   2. $METATT_MODEL_DIR, else
//   3. <repo>/models/all-MiniLM-L6-v2 (made by scripts/setup.sh), found
//      relative to the working directory or to the running binary.
#pragma once

#include <string>

#include "absl/status/statusor.h"

namespace metatt {

absl::StatusOr<std::string> ResolveModelDir(const std::string& flag_value);

// The shared data folder (GLUE, commonsense sets: `<dir>/data/glue`, ...):
//   1. $METATT_SHARED_DIR, else
//   2. `shared/` beside the repository (<repo>/../shared), found relative to
//      the working directory or to the running binary, like the model.
// NOT_FOUND names both places looked at.
absl::StatusOr<std::string> ResolveSharedDir();

}  // namespace metatt
