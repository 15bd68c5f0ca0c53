// Torch-free statistics the device scheduler reports per inference batch
// (the service turns them into Prometheus metrics).
#pragma once

#include <cstdint>
#include <functional>

namespace metatt {

struct BatchStats {
  int64_t batch_size = 0;         // rows run in this batch
  int64_t distinct_tasks = 0;     // distinct (family, task) pairs
  int64_t distinct_families = 0;  // forwards run (one per family version)
  int64_t queue_depth = 0;        // rows still queued after taking the batch
  double model_seconds = 0;       // device time of the batch
};

using BatchObserver = std::function<void(const BatchStats&)>;

}  // namespace metatt
