// Where the base model lives. One rule everywhere (server, CLI tools, tests):
//   1. an explicit --model_dir flag, else
//   2. $METATT_MODEL_DIR, else
//   3. <repo>/models/all-MiniLM-L6-v2 (made by scripts/setup.sh), found
//      relative to the working directory or to the running binary.
#pragma once

#include <string>

#include "absl/status/statusor.h"

namespace metatt {

absl::StatusOr<std::string> ResolveModelDir(const std::string& flag_value);

}  // namespace metatt
