// DeviceScheduler: the ONE thread that touches the device.
//
// Inference requests arrive already tokenised (on the RPC threads) in a
// bounded queue. The loop gathers them into a batch of at most
// `max_batch_size` rows, waiting at most `batch_timeout_ms` after the oldest
// request when nothing else is to be done (adaptively: after a window that
// gathered nothing, the next ones are skipped, probing every 16th batch),
// groups the rows by family version (rows of different tasks of one family
// run in ONE forward through the adapter's mixed-task path), runs them without grad and notifies every
// request. Between batches it runs training steps of the active job (at least
// one step per loop turn, up to `train_share` while no inference waits), so
// training never stops predictions and predictions never starve training.
// Jobs run one at a time, in submission order.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <torch/torch.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "server/runtime/base_model.h"
#include "server/runtime/batch_stats.h"
#include "server/model/bert_encoder.h"
#include "server/registry/adapter_registry.h"

namespace metatt {

struct InferenceRow {
  std::shared_ptr<const PublishedFamily> family;
  int64_t task = 0;
  std::vector<int64_t> ids, type_ids;  // unpadded
};

struct RowResult {
  std::vector<float> scores;  // softmax over the task's labels, or {value}
  int64_t label = -1;
  bool regression = false;
};

struct InferenceRequest {
  std::vector<InferenceRow> rows;
  absl::Time enqueued = absl::InfinitePast();
  absl::Time deadline = absl::InfiniteFuture();
  // Set by the scheduler before `done` is notified.
  absl::Status status;
  std::vector<RowResult> results;
  absl::Time started = absl::InfinitePast(), finished = absl::InfinitePast();
  absl::Notification done;
};

// A unit of training work stepped on the device thread.
class TrainingTask {
 public:
  virtual ~TrainingTask() = default;
  virtual const std::string& id() const = 0;
  // Runs one step; returns false once the task is over (it reported its own
  // outcome). Never throws.
  virtual bool Step() = 0;
};

// Work the device loop runs between inference batches, one step per loop
// turn (the generator's continuous batch: admit and prefill new requests,
// then one decode step of every running sequence).
class StepWork {
 public:
  virtual ~StepWork() = default;
  // Thread-safe and cheap; called with the scheduler's lock held (must not
  // call back into the scheduler).
  virtual bool HasWork() = 0;
  // One step, on the device thread.
  virtual void RunStep() = 0;
  // The loop stopped: fail everything still running or queued (device thread).
  virtual void Abort(const absl::Status& status) = 0;
};

class DeviceScheduler {
 public:
  struct Options {
    int64_t max_batch_size = 32;   // rows per forward
    int64_t batch_timeout_ms = 2;  // batching window after the oldest request
    int64_t max_queue = 1024;      // queued rows; beyond: RESOURCE_EXHAUSTED
    int64_t train_share = 4;       // max training steps in a row while nothing waits
    // Benchmark baseline: run the encoder WITHOUT the adapter (each row still
    // goes through its task's head), so the same binary measures what the
    // adapter costs. Never set in production.
    bool base_only = false;
  };
  static absl::StatusOr<std::unique_ptr<DeviceScheduler>> Create(
      const Options& options, std::shared_ptr<const BertEncoder> encoder);
  // The server's base model, encoder or decoder (base_model.h). On a decoder
  // server Submit (encoder rows) is FAILED_PRECONDITION.
  static absl::StatusOr<std::unique_ptr<DeviceScheduler>> Create(
      const Options& options, std::shared_ptr<const BaseModel> model);
  ~DeviceScheduler();  // Shutdown()

  // Queues a request; RESOURCE_EXHAUSTED when the queue would exceed
  // max_queue rows, UNAVAILABLE after Shutdown.
  absl::Status Submit(std::shared_ptr<InferenceRequest> request);
  // Removes a request that is still queued (deadline passed on the caller's
  // side); true if it was removed. A request already taken into a batch
  // completes normally and is dropped by its owner.
  bool Withdraw(const std::shared_ptr<InferenceRequest>& request);

  // Queues a training task; it runs after the ones before it.
  absl::Status AddTrainingTask(std::shared_ptr<TrainingTask> task);
  // Runs `fn` on the device thread between batches and waits for it.
  absl::Status RunOnDevice(std::function<void()> fn);

  // Stops the loop; queued requests fail UNAVAILABLE, queued training tasks
  // are dropped.
  void Shutdown();

  // The generator's continuous batch (not owned; set once before traffic,
  // outlives the scheduler's loop: call Shutdown() before destroying it).
  void SetStepWork(StepWork* work);
  // New step work arrived (a generation request was queued).
  void Wake();

  void SetBatchObserver(BatchObserver observer);
  int64_t queue_depth() const;  // rows
  int64_t pending_training_tasks() const;
  int64_t batches_run() const { return batches_run_.load(); }
  int64_t training_steps_run() const { return training_steps_run_.load(); }
  // Null on a decoder server.
  const std::shared_ptr<const BertEncoder>& encoder() const { return encoder_; }
  // The base model (kind, geometry, fingerprint; decoder + BPE tokenizer on
  // a decoder server).
  const std::shared_ptr<const BaseModel>& base_model() const { return model_; }

 private:
  DeviceScheduler(const Options& options, std::shared_ptr<const BaseModel> model)
      : options_(options), model_(std::move(model)), encoder_(model_->encoder) {}
  void Loop();
  std::vector<std::shared_ptr<InferenceRequest>> TakeBatchLocked();
  void RunBatch(const std::vector<std::shared_ptr<InferenceRequest>>& batch);

  const Options options_;
  std::shared_ptr<const BaseModel> model_;
  std::shared_ptr<const BertEncoder> encoder_;
  StepWork* step_work_ = nullptr;  // guarded by mu_
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<InferenceRequest>> queue_;
  int64_t queued_rows_ = 0;
  std::deque<std::shared_ptr<TrainingTask>> jobs_;
  std::deque<std::function<void()>> device_calls_;
  bool stop_ = false;
  BatchObserver observer_;
  // Adaptive batching window (device thread only).
  static constexpr int64_t kWindowProbeEvery = 16;
  int64_t window_misses_ = 0, windows_skipped_ = 0;
  std::atomic<int64_t> batches_run_{0}, training_steps_run_{0};
  std::thread thread_;
};

}  // namespace metatt
