// Torch-free interface of inference, so the gRPC layer can include it
// without seeing LibTorch headers (torch ships its own protobuf headers).
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace metatt {

struct PredictInput {
  std::string family;        // "" = the only/ default family
  int64_t version = 0;       // 0 = latest published
  std::string task;          // task name, or
  int64_t task_index = -1;   // task index (>= 0) when task is empty, or
  std::vector<std::string> tasks;  // several tasks of the family (one output each), or
  bool all_tasks = false;          // every task of the family version, in index order
  std::string text;
  std::optional<std::string> text_pair;
};

struct PredictOutput {
  int64_t input_index = 0;  // the input it answers
  std::string task;
  int64_t task_index = 0;
  int64_t label = -1;              // classification: argmax; regression: -1
  std::string label_name;          // from the dataset's label vocabulary
  std::vector<float> scores;       // softmax probabilities, or {value} for regression
  bool regression = false;
  double queue_seconds = 0, model_seconds = 0;
};

class Predictor {
 public:
  virtual ~Predictor() = default;
  // Blocking; called from many RPC threads. Tokenises on the caller's thread,
  // enqueues to the device scheduler's dynamic batcher, waits for results.
  // An input naming several tasks (or all) expands to one row per task, all
  // in the one request (tokenised once); the outputs are in input order, an
  // input's tasks in their order; inputs x tasks count against max_inputs.
  // NOT_FOUND for an unknown family/task, INVALID_ARGUMENT naming the input
  // index and field, RESOURCE_EXHAUSTED when the queue is full,
  // DEADLINE_EXCEEDED after `deadline_unix_ms` (0 = none).
  virtual absl::StatusOr<std::vector<PredictOutput>> Predict(
      const std::vector<PredictInput>& inputs, int64_t deadline_unix_ms) = 0;
  // Same, and `cancelled` (polled while waiting; may be empty) reports that
  // the caller went away (cancelled RPC, dropped connection): a request
  // still queued is withdrawn and never runs; the call returns CANCELLED.
  virtual absl::StatusOr<std::vector<PredictOutput>> Predict(
      const std::vector<PredictInput>& inputs, int64_t deadline_unix_ms,
      const std::function<bool()>& cancelled) {
    (void)cancelled;
    return Predict(inputs, deadline_unix_ms);
  }
};

}  // namespace metatt
