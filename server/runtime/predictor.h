// Predictor backed by the device scheduler: tokenises on the caller's
// thread, resolves every input's family version and task in the registry,
// queues one request and waits for it (with the caller's deadline).
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "server/runtime/predictor_api.h"
#include "server/runtime/scheduler.h"
#include "server/model/tokenizer.h"
#include "server/registry/adapter_registry.h"

namespace metatt {

class ScheduledPredictor : public Predictor {
 public:
  struct Options {
    int64_t max_inputs = 1024;           // per call
    int64_t max_text_bytes = 1 << 20;    // per text
  };
  ScheduledPredictor(const Options& options, AdapterRegistry* registry,
                     DeviceScheduler* scheduler,
                     std::shared_ptr<const WordPieceTokenizer> tokenizer)
      : options_(options), registry_(registry), scheduler_(scheduler),
        tokenizer_(std::move(tokenizer)) {}
  // How often a waiting call polls its `cancelled` callback.
  static constexpr absl::Duration kCancelPoll = absl::Milliseconds(5);

  absl::StatusOr<std::vector<PredictOutput>> Predict(const std::vector<PredictInput>& inputs,
                                                     int64_t deadline_unix_ms) override {
    return Predict(inputs, deadline_unix_ms, nullptr);
  }
  absl::StatusOr<std::vector<PredictOutput>> Predict(
      const std::vector<PredictInput>& inputs, int64_t deadline_unix_ms,
      const std::function<bool()>& cancelled) override;

 private:
  Options options_;
  AdapterRegistry* registry_;
  DeviceScheduler* scheduler_;
  std::shared_ptr<const WordPieceTokenizer> tokenizer_;
};

}  // namespace metatt
