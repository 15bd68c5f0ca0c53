// --model_dir of the benchmarks on the encoder base model (adapter_bench,
// metatt-bench-encoder, metatt-bench-family, metatt-bench-resident): declared
// once here, read with BenchModelDir(). decode_step_bench has its own (its
// default is the decoder).
#pragma once

#include <string>

#include "absl/flags/declare.h"
#include "absl/status/statusor.h"

ABSL_DECLARE_FLAG(std::string, model_dir);

namespace metatt {

// --model_dir, or when it is empty the usual resolution (ResolveModelDir:
// $METATT_MODEL_DIR, else the repository's models/all-MiniLM-L6-v2).
absl::StatusOr<std::string> BenchModelDir();

}  // namespace metatt
