// A step-wise trainer: one call to Step() runs ONE optimizer step (AdamW,
// linear warm-up then linear decay, gradient clipping), evaluates every
// `eval_every` steps and at the end, keeps the best evaluation's tensors in
// memory, applies the DMRG rank schedule at its epoch boundaries, and returns
// false once training is over (finished, early-stopped or cancelled). The
// service's scheduler thread owns the device and calls Step() between
// inference batches; the CLI just loops.
//
// The trainer is written against the EncoderAdapter seam plus an
// AdapterBinding (parameters, snapshot/restore, sweep), so it does not depend
// on a concrete adapter class; adapter_binding.h builds bindings for MetaTT
// and LoRA.
//
// Multi-task: several tasks (adapter task index, train/eval data, head) are
// trained together; every batch is drawn from the shuffled union of all the
// tasks' rows, AdapterBatch::task_index carries each row's task, each row's
// loss comes from its own task's head, and the batch loss is their mean.
//
// What a task computes is a TrainObjective (below): the loop (optimizer,
// schedule, clipping, evaluation cadence, best checkpoint, DMRG sweeps,
// cancellation) is the same for every model family. Two objectives exist:
// an encoder with a task head (encoder_objective.h: classification and
// regression) and a decoder's causal-LM loss on completion tokens
// (lm_objective.h: generation tasks, no head).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "adapters/adapter.h"
#include "server/model/bert_encoder.h"
#include "server/training/dataset.h"
#include "server/training/generation_dataset.h"
#include "server/training/heads.h"
#include "server/training/recipe.h"

namespace metatt {

// Turns a batch of (text, optional pair) into padded model input (CPU).
using TextPair = std::pair<std::string, std::optional<std::string>>;
using BatchTokenizer =
    std::function<absl::StatusOr<EncoderInput>(const std::vector<TextPair>& rows, int max_length)>;

// One bond's truncation in a DMRG sweep.
struct BondTruncation {
  int bond = 0;
  int64_t old_rank = 0;
  int64_t new_rank = 0;
  double discarded_weight = 0.0;  // sum of squared discarded singular values
};

// Truncation knobs besides the scheduled max rank (kept here so the trainer
// does not depend on the adapters library; bindings translate them).
struct RankTruncation {
  double relative_cutoff = 0.0;  // drop singular values while discarded/total <= cutoff
  int64_t min_rank = 1;
};

// What the trainer needs from an adapter besides its Deltas().
struct AdapterBinding {
  EncoderAdapter* adapter = nullptr;  // may be null: heads only
  // The tensors to optimise now (leaf tensors with requires_grad). Queried
  // again after every sweep.
  std::function<std::vector<torch::Tensor>()> trainable_parameters;
  // Detached copies of every adapter tensor, by name (best checkpoint).
  std::function<std::map<std::string, torch::Tensor>()> snapshot;
  // Optional: put a snapshot back (RestoreBest()).
  std::function<absl::Status(const std::map<std::string, torch::Tensor>&)> restore;
  // Optional: one truncation sweep to `max_rank`; reports every bond.
  std::function<absl::StatusOr<std::vector<BondTruncation>>(int64_t max_rank,
                                                            const RankTruncation&)>
      sweep;
  // Optional: called after every optimizer step (adapters that cache
  // products of their cores drop the cache here).
  std::function<void()> after_step;
  // Optional: the subset of trainable_parameters() that are inner cores of a
  // tensor train (MetaTT's layer, projection, head and task cores); they
  // train at lr * TrainerOptions::inner_lr_multiplier.
  std::function<std::vector<torch::Tensor>()> inner_parameters;
};

struct RankScheduleEntry {
  double epoch = 0;  // fractional epochs allowed (step-limited runs)
  int64_t max_rank = 0;
};

enum class TrainableSet { kAll, kAdapterOnly, kHeadsOnly };
absl::StatusOr<TrainableSet> ParseTrainableSet(const std::string& name);  // all|adapter|heads

// The field defaults below are NOT the product's defaults: jobs and
// metatt-train fill every recipe field with TrainerOptionsFromRecipe() (the
// one definition: server/training/recipe.h, DefaultRecipe); these initial
// values only serve code that builds options by hand (tests, benches).
struct TrainerOptions {
  int64_t steps = 0;     // > 0: total optimizer steps; else `epochs` passes
  double epochs = 1.0;
  int64_t batch_size = 16;
  double lr = 5e-4;
  // Learning rates by parameter group, all on the same schedule: the
  // adapter's inner cores (AdapterBinding::inner_parameters) train at
  // lr * inner_lr_multiplier, the task heads at lr * head_lr_multiplier.
  double inner_lr_multiplier = 1.0;
  double head_lr_multiplier = 1.0;
  double weight_decay = 0.0;
  double warmup_ratio = 0.0;  // used when warmup_steps < 0
  int64_t warmup_steps = -1;
  // The first head_first_ratio of the steps train the heads only (the
  // adapter's groups at lr 0); the adapter then warms up over its own
  // warm-up length from that step. 0: everything trains from step 0.
  double head_first_ratio = 0.0;
  bool linear_decay = true;
  double grad_clip_norm = 1.0;  // <= 0: no clipping
  uint64_t seed = 0;
  int64_t eval_every = 0;  // 0: only at the end
  int64_t max_eval_examples = 0;  // 0: the whole eval set
  int max_length = 128;
  Pooling pooling = Pooling::kCls;
  int64_t early_stop_patience = 0;  // evals without improvement; 0: off
  std::vector<RankScheduleEntry> rank_schedule;
  RankTruncation truncation;
  TrainableSet trainable = TrainableSet::kAll;
  // Generation tasks: evaluation generates up to this many tokens per row
  // (greedy, KV cache) and scores the text.
  int64_t max_new_tokens = 32;
};

// Every recipe field -> options (steps, epochs, batch size, learning rates,
// weight decay, warm-up ratio, clipping, seed, eval_every, max length,
// pooling, patience, rank schedule); the rest keep their initial values.
absl::StatusOr<TrainerOptions> TrainerOptionsFromRecipe(const Recipe& recipe);

struct TrainTask {
  std::string name;
  int64_t task_index = 0;  // the adapter's task index (AdapterBatch)
  // Encoder tasks (EncoderObjective): labelled text and a head.
  Dataset train;
  Dataset eval;  // may be empty: no evaluation for this task
  std::shared_ptr<TaskHead> head;  // null for generation tasks (the LM head is the model's)
  // Generation tasks (LmObjective): prompt -> completion pairs.
  GenerationDataset gen_train;
  GenerationDataset gen_eval;  // may be empty
  std::string primary_metric;  // empty: the objective's default
};

// One batch row: (index into the trainer's tasks, example index in its train set).
using BatchRow = std::pair<int, int64_t>;

struct BatchLoss {
  torch::Tensor loss;  // scalar, differentiable w.r.t. the adapter (and heads)
  int64_t tokens = 0;  // real input tokens in the batch (throughput)
};

// What one kind of task computes: the loss of a batch and the metrics of an
// eval set. The Trainer owns everything else. Called from the trainer's
// thread only.
class TrainObjective {
 public:
  virtual ~TrainObjective() = default;
  virtual torch::Device device() const = 0;
  // Once, before training: checks every task against the model (data, head,
  // metric; INVALID_ARGUMENT naming the task and field), fills defaults
  // (primary_metric) and prepares what batches need (e.g. token ids).
  virtual absl::Status Prepare(std::vector<TrainTask>* tasks, const TrainerOptions& options) = 0;
  virtual int64_t NumTrainExamples(const TrainTask& task) const = 0;
  virtual bool HasEval(const TrainTask& task) const = 0;
  // The mean loss of `rows` (tasks[rows[i].first]'s example rows[i].second);
  // `batch` carries each row's adapter task index.
  virtual absl::StatusOr<BatchLoss> Loss(const std::vector<TrainTask>& tasks,
                                         const std::vector<BatchRow>& rows,
                                         EncoderAdapter* adapter, const AdapterBatch& batch,
                                         const TrainerOptions& options) = 0;
  // Metrics of `task` on its eval set (the first `max_examples` rows when > 0),
  // under no_grad. Must include task.primary_metric.
  virtual absl::StatusOr<std::map<std::string, double>> Evaluate(const TrainTask& task,
                                                                 EncoderAdapter* adapter,
                                                                 const TrainerOptions& options) = 0;
};

struct ProgressEvent {
  int64_t step = 0;  // steps done (1-based after the first step)
  int64_t total_steps = 0;
  double epoch = 0;  // fractional epochs done
  double loss = 0;
  double lr = 0;
  double grad_norm = 0;
  double examples_per_second = 0;
  double tokens_per_second = 0;  // real input tokens (prompt + completion for generation)
  double eta_seconds = 0;
};

struct EvalEvent {
  int64_t step = 0;
  // task name -> metric name -> value
  std::map<std::string, std::map<std::string, double>> metrics;
  double score = 0;  // mean over tasks of their primary metric
  bool is_best = false;
};

struct SweepEvent {
  int64_t step = 0;
  double epoch = 0;
  int64_t max_rank = 0;
  std::vector<BondTruncation> bonds;
};

struct TrainerCallbacks {
  std::function<void(const ProgressEvent&)> on_progress;
  std::function<void(const EvalEvent&)> on_eval;
  std::function<void(const SweepEvent&)> on_sweep;
};

class Trainer {
 public:
  enum class State { kRunning, kFinished, kEarlyStopped, kCancelled };

  // Encoder tasks (an EncoderObjective over `encoder` and `tokenizer`).
  static absl::StatusOr<std::unique_ptr<Trainer>> Create(
      const TrainerOptions& options, std::shared_ptr<const BertEncoder> encoder,
      BatchTokenizer tokenizer, AdapterBinding adapter, std::vector<TrainTask> tasks,
      TrainerCallbacks callbacks = {});
  // Any objective (LmObjective for generation tasks).
  static absl::StatusOr<std::unique_ptr<Trainer>> Create(
      const TrainerOptions& options, std::shared_ptr<TrainObjective> objective,
      AdapterBinding adapter, std::vector<TrainTask> tasks, TrainerCallbacks callbacks = {});

  // Runs one optimizer step (plus any due sweep / evaluation). Returns false
  // when training is over (see state()); errors leave the trainer unusable.
  absl::StatusOr<bool> Step();
  // Steps until done.
  absl::Status Run();
  // Cooperative: the next Step() returns false with state kCancelled. Safe
  // from any thread.
  void Cancel() { cancel_requested_.store(true); }

  // Evaluates now (no_grad) on every task's eval set.
  absl::StatusOr<EvalEvent> Evaluate();

  State state() const { return state_; }
  int64_t step() const { return step_; }
  int64_t total_steps() const { return total_steps_; }
  int64_t steps_per_epoch() const { return steps_per_epoch_; }
  const std::vector<double>& losses() const { return losses_; }
  const std::vector<SweepEvent>& sweeps() const { return sweeps_; }
  const std::optional<EvalEvent>& last_eval() const { return last_eval_; }
  const std::optional<EvalEvent>& best_eval() const { return best_eval_; }
  // Best evaluation's tensors: adapter snapshot under "adapter.", heads under
  // "heads.<task name>.". Empty until an evaluation ran. A rank sweep clears
  // the best (older checkpoints have other ranks).
  const std::map<std::string, torch::Tensor>& best_tensors() const { return best_tensors_; }
  // Copies the best tensors back into the adapter (needs binding.restore)
  // and heads.
  absl::Status RestoreBest();
  const std::vector<TrainTask>& tasks() const { return tasks_; }

  // Resumable checkpoints (server/training/checkpoint.h says what is kept):
  // the whole training state to one safetensors file, written atomically;
  // RestoreState into a trainer created with the same options, tasks and
  // adapter continues bit-identically on the CPU. Defined in checkpoint.cc.
  absl::Status SaveState(const std::string& path) const;
  absl::Status RestoreState(const std::string& path);

 private:
  Trainer() = default;
  absl::Status Init();
  absl::Status RebuildOptimizer(bool keep_state);
  std::vector<torch::Tensor> CollectParameters() const;
  std::vector<torch::Tensor> CollectGroup(int group) const;
  double LearningRate(int64_t step) const;
  // Multiplies LearningRate for the adapter's groups: 0 during the
  // heads-only steps (head_first_ratio), then a ramp over the warm-up length.
  double AdapterRateScale(int64_t step) const;
  absl::Status MaybeSweep();
  absl::StatusOr<double> TrainStep();
  absl::Status EvaluateAndTrack();
  void Reshuffle();

  TrainerOptions options_;
  std::shared_ptr<TrainObjective> objective_;
  AdapterBinding adapter_;
  std::vector<TrainTask> tasks_;
  TrainerCallbacks callbacks_;

  std::unique_ptr<torch::optim::AdamW> optimizer_;
  std::vector<torch::Tensor> params_;
  static constexpr int kNumGroups = 3;     // adapter, adapter inner cores, heads
  static constexpr int kHeadGroup = 2;
  std::vector<int> group_ids_;            // which of them the optimizer holds, in order
  std::vector<double> group_multiplier_;  // per optimizer param group
  int64_t head_first_ = 0;                 // steps before the adapter trains
  std::vector<std::pair<int, int64_t>> pool_;  // (task, example) of every train row
  std::vector<size_t> order_;
  size_t cursor_ = 0;
  std::mt19937_64 rng_;
  int64_t step_ = 0, total_steps_ = 0, steps_per_epoch_ = 1, warmup_ = 0;
  size_t next_schedule_ = 0;
  int64_t evals_without_improvement_ = 0;
  State state_ = State::kRunning;
  bool failed_ = false;
  double last_lr_ = 0, last_grad_norm_ = 0;
  std::atomic<bool> cancel_requested_{false};
  std::vector<double> losses_;
  std::vector<SweepEvent> sweeps_;
  std::optional<EvalEvent> last_eval_, best_eval_;
  std::map<std::string, torch::Tensor> best_tensors_;
  absl::Time start_time_;
  int64_t examples_seen_ = 0;
  int64_t tokens_seen_ = 0;
  absl::Duration train_time_ = absl::ZeroDuration();
};

}  // namespace metatt
