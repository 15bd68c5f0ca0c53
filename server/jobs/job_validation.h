// Every rule about a job spec and about the names a client chooses, in one
// place. Torch-free; no store, no model: what needs either (a family that
// exists, a dataset the caller may see, the base model's position limit, the
// adapter's projection names) is checked by the caller, with these limits.
//
// Callers: JobManager::CreateJob (with the server's --max_job_batch_size and
// --max_sequence_length), RuntimeJobExecutor::Start (again, with the base
// model's max_position_embeddings: a job read back from the store was written
// by any replica), DatasetManager::Upload (dataset names), the registry's
// publication and import (family names), tenants.json (tenant names).
//
// Error messages are INVALID_ARGUMENT and start with the field, e.g.
// "spec.hparams.max_length: 2 is outside [8, 4096]".
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "server/store/job_types.h"

namespace metatt {

// Names of families, tasks and tenants: 1-128 characters of ASCII letters,
// digits, '-', '_' and '.', not starting with '.' (a family name is a folder
// under --data_dir).
inline constexpr size_t kMaxNameLength = 128;
// Dataset display names: 1-128 characters of any kind (never a path).
inline constexpr size_t kMaxDatasetNameLength = 128;
// Hyper-parameter ranges (a server may lower the batch and length limits).
inline constexpr int64_t kMaxBatchSize = 4096;
inline constexpr int64_t kMinSequenceLength = 8;
inline constexpr int64_t kMaxSequenceLength = 4096;
inline constexpr double kMaxLearningRate = 10;
inline constexpr double kMaxLrMultiplier = 1000;
inline constexpr int64_t kMaxRank = 1024;

// "field: 'name' must be ..." unless `name` follows the rule above.
absl::Status ValidateName(absl::string_view name, absl::string_view field);
bool IsValidName(absl::string_view name);
absl::Status ValidateDatasetName(absl::string_view name, absl::string_view field);

// The form of an adapter family: 4d, 5d or 4+1d.
absl::Status ValidateAdapterForm(absl::string_view form, absl::string_view field);

// What one client request may make the server hold (issue 17, hole 2): the
// defaults of the server flags of the same names (README "Security", limits
// table). 0 = no limit.
inline constexpr int64_t kDefaultMaxTasksPerJob = 64;
inline constexpr int64_t kDefaultMaxLabelsPerTask = 1000;
inline constexpr int64_t kDefaultMaxRankTimesTasks = 16384;
inline constexpr int64_t kDefaultMaxSteps = 1000000;

struct JobLimits {
  int64_t max_batch_size = kMaxBatchSize;       // server flag --max_job_batch_size
  const char* batch_size_limit_name = "max_job_batch_size";
  int64_t max_sequence_length = kMaxSequenceLength;  // --max_sequence_length, or the model's
  const char* sequence_limit_name = "max_sequence_length";
  // 0 = not checked (a job read back from the store is not re-checked against
  // them); JobManager and DatasetManager pass the server flags, whose
  // defaults are the kDefault* above.
  int64_t max_tasks_per_job = 0;     // --max_tasks_per_job
  int64_t max_steps = 0;             // --max_steps
  int64_t max_rank_times_tasks = 0;  // --max_rank_times_tasks
  int64_t max_labels_per_task = 0;   // --max_labels_per_task

  // The server's limits (its flags' defaults): where JobManagerOptions and
  // Server::Options start.
  static JobLimits ServerDefaults() {
    JobLimits l;
    l.max_tasks_per_job = kDefaultMaxTasksPerJob;
    l.max_steps = kDefaultMaxSteps;
    l.max_rank_times_tasks = kDefaultMaxRankTimesTasks;
    l.max_labels_per_task = kDefaultMaxLabelsPerTask;
    return l;
  }
};

// Everything about `spec` that needs neither the store nor the model: kind vs
// form vs number of tasks, family and task names (unique in the job), dataset
// ids present, eval fractions, ranks, projections (no duplicates), alpha,
// every hyper-parameter the user set, the rank schedule. Unset ("auto")
// fields pass: they take DefaultRecipe(form) (server/training/recipe.h) when
// the job starts; an unset form counts as DefaultForm(). Fields are named
// "spec.<field>".
absl::Status ValidateJobSpec(const JobSpec& spec, const JobLimits& limits = {});

// A classification dataset's label count (its classes: integer labels count
// every class from 0 to the largest, so one label "99999" is 100,000) against
// limits.max_labels_per_task. INVALID_ARGUMENT "<field>: ... max_labels_per_task=N".
absl::Status ValidateLabelCount(int64_t labels, absl::string_view field, const JobLimits& limits);

// The family a job leaves behind: `tasks` tasks in all (an add-task job: the
// family's tasks + 1) at largest rank `max_rank` (0 = unset, the recipe's
// default: not checked), against limits.max_rank_times_tasks (the adapter's
// task slices and the optimizer state grow with both). INVALID_ARGUMENT.
absl::Status ValidateFamilyCapacity(int64_t tasks, int64_t max_rank, absl::string_view field,
                                    const JobLimits& limits);

}  // namespace metatt
