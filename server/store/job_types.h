// Plain C++ job types shared by the job manager (server/jobs), the runtime
// that executes jobs on the device (server/runtime) and the gRPC layer.
// No torch, no protobuf: every layer can include this.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace metatt {

enum class JobState { kQueued, kValidating, kRunning, kSucceeded, kFailed, kCancelled };
const char* JobStateName(JobState s);  // "QUEUED", ...
std::optional<JobState> JobStateFromName(const std::string& name);
bool IsTerminal(JobState s);

enum class JobKind {
  kTrainFamily,  // new adapter family (4D / 5D / 4+1D) with its first task(s)
  kAddTask,      // add a task to an existing 4+1D family: shared cores frozen
  kMultiTask,    // new 4+1D family trained on several tasks at once
};

// One task of a job: which dataset trains it and how its labels are read.
struct JobTaskSpec {
  std::string task_name;        // unique within the family
  std::string dataset_id;       // a dataset uploaded through DatasetService
  std::string eval_dataset_id;  // optional; else `eval_fraction` of the train set
  double eval_fraction = 0.1;
  std::string metric;           // accuracy | f1 | matthews | pearson | spearman ("" = by task type)
};

// A hyper-parameter the user may leave unset ("auto"): the job executor
// resolves unset fields from DefaultRecipe(form) (server/training/recipe.h,
// the one definition of the defaults) when the job starts; the store keeps
// only what the user set (job JSON: unset = absent).
template <typename T>
class Auto {
 public:
  Auto() = default;
  Auto(T v) : v_(std::move(v)) {}  // NOLINT(google-explicit-constructor): a set value
  Auto& operator=(T v) {
    v_ = std::move(v);
    return *this;
  }
  bool is_set() const { return v_.has_value(); }
  const T& value() const { return *v_; }  // only when is_set()
  T value_or(T def) const { return v_ ? *v_ : def; }
  const std::optional<T>& get() const { return v_; }
  void reset() { v_.reset(); }
  // The proto3 wire value: T{} (0) when unset, which the proto contract reads
  // as "server default". Implicit only for the proto mapping
  // (server/service/proto_convert.cc); code that needs to know whether a
  // value was set uses is_set()/get().
  operator T() const { return v_.value_or(T{}); }  // NOLINT(google-explicit-constructor)

 private:
  std::optional<T> v_;
};

// Adapter and training knobs as the user gave them. Empty strings and lists
// and unset Auto<> fields mean "auto"; ranges: server/jobs/job_validation.h.
struct AdapterSpec {
  std::string form;                      // 4d | 5d | 4+1d ("" = DefaultForm())
  std::vector<int64_t> ranks;            // one rank for every bond, or one per bond
  std::vector<std::string> projections;  // e.g. q, k, v, o
  std::string init;                      // core init spec, e.g. ze-id-id-id
  Auto<double> alpha;                    // 0 = the adapter's default (alpha = r)
  std::string new_task_init;             // add-task slice init: identity | zeros | mean
};

struct HyperParams {
  Auto<int64_t> max_steps;
  Auto<int64_t> batch_size;
  Auto<double> learning_rate;
  Auto<double> inner_lr_multiplier;
  Auto<double> head_lr_multiplier;
  Auto<double> weight_decay;
  Auto<double> warmup_ratio;
  Auto<double> head_first_ratio;
  Auto<double> grad_clip;            // 0 = off
  Auto<int64_t> eval_every;          // 0 = at the end only
  Auto<int64_t> max_length;
  Auto<int64_t> early_stop_patience;  // 0 = off
  std::string pooling;                // mean | cls ("" = auto)
  Auto<uint64_t> seed;
  // DMRG schedule: (epoch, max rank) pairs; empty = the recipe's (fixed rank
  // by default).
  std::vector<std::pair<int64_t, int64_t>> rank_schedule;
};

struct JobSpec {
  JobKind kind = JobKind::kTrainFamily;
  std::string family;  // new family name (train) or existing one (add task)
  std::vector<JobTaskSpec> tasks;
  AdapterSpec adapter;
  HyperParams hparams;
  std::string idempotency_key;
};

// What the runtime reports while a job runs; the job manager persists it and
// fans it out to StreamJobEvents subscribers.
struct JobEvent {
  enum class Type { kState, kProgress, kEval, kSweep, kCheckpoint, kLog };
  Type type = Type::kLog;
  int64_t time_unix_ms = 0;
  JobState state = JobState::kQueued;  // kState
  std::string message;                 // reason, log line
  int64_t step = 0, total_steps = 0, epoch = 0;
  double loss = 0, examples_per_second = 0, eta_seconds = 0;  // kProgress
  std::map<std::string, double> metrics;                        // kEval (e.g. "MRPC/f1")
  struct Bond { int64_t bond, old_rank, new_rank; double discarded_weight; };
  std::vector<Bond> bonds;  // kSweep
  std::string family;       // kCheckpoint: published family + version
  int64_t version = 0;
};

struct JobRecord {
  std::string id;
  JobSpec spec;
  JobState state = JobState::kQueued;
  std::string failure_reason;  // set for FAILED (and CANCELLED: who/why)
  int64_t created_unix_ms = 0, updated_unix_ms = 0;
  int64_t step = 0, total_steps = 0;
  std::string result_family;  // set when SUCCEEDED
  int64_t result_version = 0;
  std::string tenant = "default";  // owner (server/jobs/tenants.h)
  // Several replicas (PostgreSQL): the fencing token of the job's current
  // claim, raised by every claim and take-over (Store::ClaimNextJob). 0 = never
  // claimed, and always with the embedded store.
  int64_t claim_epoch = 0;
};

// One resumable training checkpoint of a job (server/training/checkpoint.h).
struct JobCheckpointInfo {
  int64_t step = 0;
  int64_t total_steps = 0;
  int64_t time_unix_ms = 0;
  std::map<std::string, double> metrics;  // "loss"; at an evaluation "<task>/<metric>", "score"
};

// The runtime side of a job (implemented in server/runtime on the device
// thread). The job manager calls Start() from its own thread; the executor
// reports through `emit` (thread-safe) and finishes with exactly one terminal
// state event. Cancel() is cooperative: the running step finishes, then the
// job ends CANCELLED.
class JobExecutor {
 public:
  using EmitFn = std::function<void(const JobEvent&)>;
  virtual ~JobExecutor() = default;
  // Validates `spec` against datasets/families (FAILED_PRECONDITION / NOT_FOUND
  // / INVALID_ARGUMENT naming the field) and starts it asynchronously.
  virtual absl::Status Start(const JobRecord& job, EmitFn emit) = 0;
  virtual void Cancel(const std::string& job_id) = 0;
  // Restart recovery: true when a job that was VALIDATING/RUNNING when the
  // server stopped can continue from a checkpoint; the job manager then
  // re-queues it (Start() is called again with the same record) instead of
  // failing it. Default: no resumable checkpoints.
  virtual bool CanResume(const JobRecord& job) {
    (void)job;
    return false;
  }
  // The job's resumable checkpoints, oldest first. Default: none.
  virtual absl::StatusOr<std::vector<JobCheckpointInfo>> ListCheckpoints(
      const std::string& job_id) {
    (void)job_id;
    return std::vector<JobCheckpointInfo>();
  }
};

}  // namespace metatt
