// Text generation on a decoder server: the continuous batcher.
//
// A request is tokenised on the caller's thread (prompt, or chat messages
// through the model's chat template), resolved to its family version and
// task, and queued (bounded: RESOURCE_EXHAUSTED beyond max_queue). The
// device thread runs the batcher as the scheduler's StepWork, one step per
// loop turn (training steps interleave as for Predict):
//
//   1. sequences whose caller went away (cancelled, disconnected, stop
//      sequence seen, deadline) leave the batch: KvCache::SelectRows keeps
//      the others and their reservation is freed at once;
//   2. queued requests are admitted in arrival order while the KV-cache
//      budget (kv_cache_mb) and max_running allow, prefilled together (one
//      forward per family version, rows of many tasks through the adapter's
//      mixed-task path, AdapterBatch::task_index per row), their first token
//      sampled, and their caches merged into the running batch;
//   3. one decode step: every running sequence advances one token, one
//      forward per family version (the base model without adapter is its
//      own group).
//
// KV budget: a request reserves (prompt + max_tokens) token slots of
// 2 x layers x kv_heads x head_dim floats; it waits in the queue while the
// running reservations leave no room, and one that could never fit is
// INVALID_ARGUMENT naming the limit. (The padded cache of a group can
// exceed the reservations by the padding between rows of different
// lengths; leading columns no row uses are trimmed every step.)
//
// Sampling (SampleNext) is in one place: temperature 0 is argmax (equal to
// LlamaDecoder::GreedyGenerate), else temperature, top-k, top-p, drawn from
// the request's own seeded generator, so a seeded request gets the same
// tokens whatever else is in the batch.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/registry/adapter_registry.h"
#include "server/runtime/base_model.h"
#include "server/runtime/generator_api.h"
#include "server/runtime/scheduler.h"

namespace metatt {

struct SamplingParams {
  double temperature = 0.0;  // <= 0: greedy
  double top_p = 1.0;
  int64_t top_k = 0;
  uint64_t seed = 0;
};

// The next token from one row of logits [V] (float32, CPU contiguous).
// Greedy: the first maximum (as torch's argmax).
int64_t SampleNext(const float* logits, int64_t vocab, const SamplingParams& params,
                   std::mt19937_64* rng);

// One generation in the batch. The caller fills the inputs and Submit()s
// it; the device thread appends tokens; the caller reads them with Wait().
struct GenSequence {
  // Inputs.
  std::shared_ptr<const PublishedFamily> family;  // null: the base model
  int64_t task = 0;
  std::vector<int64_t> prompt;
  int64_t max_new_tokens = 16;
  SamplingParams sampling;
  int64_t eos_token_id = -1;  // ends the sequence (not emitted); -1: none

  // The caller asks the sequence to leave the batch (read by the device
  // thread at its next step).
  void Cancel() { cancel_requested.store(true); }

  // Blocks until tokens beyond `seen` exist, the sequence finished, or
  // `until`. Copies the new tokens into `tokens` (appending); returns true
  // when finished (then `tokens` holds every token and the reason is set).
  bool Wait(size_t seen, absl::Time until, std::vector<int64_t>* tokens);
  FinishReason finish_reason() const;
  absl::Status status() const;
  absl::Time enqueued() const { return enqueued_at; }
  absl::Time first_token_time() const;
  absl::Time finish_time() const;

  // --- device-thread state (the batcher's) ---
  std::mt19937_64 rng;
  int64_t last_token = -1;
  int64_t generated = 0;
  int64_t reserved_bytes = 0;
  std::atomic<bool> cancel_requested{false};
  absl::Time enqueued_at = absl::InfinitePast();

  // --- shared, under mu ---
  mutable std::mutex mu;
  std::condition_variable cv;
  std::vector<int64_t> out;
  bool finished = false;
  FinishReason reason = FinishReason::kNone;
  absl::Status final_status;
  absl::Time first_token_at = absl::InfinitePast();
  absl::Time finished_at = absl::InfinitePast();
};

class ContinuousBatcher : public StepWork, public Generator {
 public:
  struct Options {
    int64_t kv_cache_mb = 1024;       // KV-cache budget of the running sequences
    int64_t kv_cache_bytes = 0;       // > 0: the budget in bytes instead (tests)
    int64_t max_running = 32;         // sequences decoded together
    int64_t max_queue = 256;          // waiting requests; beyond: RESOURCE_EXHAUSTED
    int64_t default_max_tokens = 256; // when a request gives none
    int64_t max_prompt_bytes = 1 << 20;
  };
  // Resolves (family, version, task) to a family version and task index
  // (the registry's Resolve on a server; tests pass their own).
  using Resolver = std::function<absl::StatusOr<ResolvedTask>(
      const std::string& family, int64_t version, const std::string& task)>;
  // Says why a family that did not resolve cannot serve here (a family of
  // the other model kind in the store); OK when it knows nothing more.
  using KindCheck = std::function<absl::Status(const std::string& family)>;

  // `model` must be a decoder. The batcher registers itself as the
  // scheduler's StepWork; Shutdown the scheduler before destroying it.
  static absl::StatusOr<std::unique_ptr<ContinuousBatcher>> Create(
      const Options& options, std::shared_ptr<const BaseModel> model, DeviceScheduler* scheduler,
      Resolver resolver, KindCheck kind_check = nullptr);
  ~ContinuousBatcher() override;

  // Generator (text in, text chunks out).
  absl::Status Generate(const GenerateParams& params, int64_t deadline_unix_ms,
                        const std::function<bool()>& cancelled,
                        const std::function<bool(const GenerateChunk&)>& on_chunk) override;

  // Token level (tests, benchmarks): queues a filled sequence. INVALID_ARGUMENT
  // when it can never fit the budget or the context, RESOURCE_EXHAUSTED when
  // the queue is full, UNAVAILABLE after shutdown.
  absl::Status Submit(std::shared_ptr<GenSequence> seq);

  // Bytes of KV cache one token slot takes.
  int64_t BytesPerToken() const { return bytes_per_token_; }
  int64_t budget_bytes() const { return budget_bytes_; }
  int64_t running() const { return running_.load(); }
  int64_t queued() const;
  int64_t reserved_bytes() const { return reserved_.load(); }
  int64_t decode_steps() const { return decode_steps_.load(); }
  // Called once per finished Generate (metrics).
  void SetObserver(std::function<void(const GenerationStats&)> observer);

  // StepWork (device thread).
  bool HasWork() override;
  void RunStep() override;
  void Abort(const absl::Status& status) override;

 private:
  struct Group {
    std::shared_ptr<const PublishedFamily> family;
    std::vector<std::shared_ptr<GenSequence>> rows;
    KvCache cache;
    // The rows' task indices, kept while the rows stay the same: the
    // adapter's per-forward fold table is keyed by this host tensor, so
    // decode steps of an unchanged batch reuse it.
    AdapterBatch tasks;
  };
  ContinuousBatcher(const Options& options, std::shared_ptr<const BaseModel> model,
                    DeviceScheduler* scheduler, Resolver resolver, KindCheck kind_check);

  void Finish(GenSequence* seq, FinishReason reason, absl::Status status = absl::OkStatus());
  // Appends `token` to the sequence, finishing it on eos / max tokens;
  // returns true while it keeps running.
  bool Emit(GenSequence* seq, int64_t token);
  void SweepCancelled();
  void Admit();
  absl::Status Prefill(std::vector<std::shared_ptr<GenSequence>> seqs);
  absl::Status DecodeStep(Group* group);
  // Keeps rows `keep` of the group (and their cache rows).
  void KeepRows(Group* group, const std::vector<int64_t>& keep);
  std::vector<int64_t> SampleRows(const torch::Tensor& logits,
                                  const std::vector<std::shared_ptr<GenSequence>>& rows);
  void FailGroup(Group* group, const absl::Status& status);

  const Options options_;
  std::shared_ptr<const BaseModel> model_;
  DeviceScheduler* scheduler_;
  Resolver resolver_;
  KindCheck kind_check_;
  int64_t bytes_per_token_ = 0, budget_bytes_ = 0;

  mutable std::mutex mu_;  // queue_, stopped_, observer_
  std::deque<std::shared_ptr<GenSequence>> queue_;
  bool stopped_ = false;
  std::function<void(const GenerationStats&)> observer_;

  // Device thread only.
  std::map<const PublishedFamily*, Group> groups_;
  std::atomic<int64_t> running_{0}, reserved_{0}, decode_steps_{0};
};

}  // namespace metatt
