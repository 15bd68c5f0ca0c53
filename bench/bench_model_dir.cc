#include "bench/bench_model_dir.h"

#include "absl/flags/flag.h"
#include "server/model/model_dir.h"

ABSL_FLAG(std::string, model_dir, "",
          "base model directory (default: $METATT_MODEL_DIR, else the repository's "
          "models/all-MiniLM-L6-v2)");

namespace metatt {

absl::StatusOr<std::string> BenchModelDir() {
  return ResolveModelDir(absl::GetFlag(FLAGS_model_dir));
}

}  // namespace metatt
