// JobExecutor on the device scheduler: validates a job (datasets, family,
// adapter config), then queues a TrainingTask that the scheduler steps
// between inference batches. At the end the best checkpoint is published as
// a new immutable family version (version + 1, carrying every earlier task),
// then kCheckpoint and the terminal kState events are emitted.
//
// Dataset spec_json (DatasetRecord): a JSON object with the keys of the
// DatasetHeader proto: "format" (tsv|csv|jsonl, default the record's
// format), "has_header" (bool), "text_column", "text_pair_column",
// "label_column" (header name or 0-based index as digits), "label_kind"
// (classification|regression), "quoting" (bool), "label_vocab" ([string]).
// The short keys "text", "text_pair", "label" are accepted too.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "absl/status/statusor.h"
#include "server/runtime/scheduler.h"
#include "server/store/blob_store.h"
#include "server/store/job_types.h"
#include "server/store/store.h"
#include "server/registry/adapter_registry.h"
#include "server/training/dataset.h"
#include "server/training/trainer.h"

namespace metatt {

// DatasetSpec from a DatasetRecord (its spec_json plus its format /
// regression / label_names fields).
absl::StatusOr<DatasetSpec> DatasetSpecFromRecord(const DatasetRecord& record);

class RuntimeJobExecutor : public JobExecutor {
 public:
  struct Options {
    int64_t max_eval_examples = 2000;  // per evaluation (keeps eval pauses short)
    int64_t progress_every = 10;       // kProgress every N steps (and at least 1/s)
    // Resumable checkpoints (server/training/checkpoint.h): a job's under
    // <checkpoint_dir>/<job id>/, written every checkpoint_every_steps steps
    // and at each evaluation; a job started again (restart recovery, a
    // replica's take-over) with one continues from the newest. Empty or
    // <= 0: none.
    std::string checkpoint_dir;
    int64_t checkpoint_every_steps = 50;
    // Not owned. Set (PostgreSQL replicas without a shared directory): each
    // checkpoint is also uploaded as checkpoints/<job id>/step-<K>.ckpt
    // (fenced by the job's claim) and a job resumes from those, so another
    // replica can resume it; datasets stored as blobs are read through
    // <dataset_cache_dir>/datasets/ (server/jobs/dataset_manager.h
    // ReadDatasetBytes).
    BlobStore* blobs = nullptr;
    std::string dataset_cache_dir;
  };
  RuntimeJobExecutor(const Options& options, Store* store, AdapterRegistry* registry,
                     DeviceScheduler* scheduler, BatchTokenizer tokenizer);

  absl::Status Start(const JobRecord& job, EmitFn emit) override;
  void Cancel(const std::string& job_id) override;
  // True when the job has a readable checkpoint.
  bool CanResume(const JobRecord& job) override;
  absl::StatusOr<std::vector<JobCheckpointInfo>> ListCheckpoints(
      const std::string& job_id) override;
  // The job's checkpoint directory ("" when checkpoints are off).
  std::string CheckpointDir(const std::string& job_id) const;

 private:
  Options options_;
  Store* store_;
  AdapterRegistry* registry_;
  DeviceScheduler* scheduler_;
  BatchTokenizer tokenizer_;
  std::mutex mu_;
  std::map<std::string, std::weak_ptr<TrainingTask>> jobs_;
  std::map<std::string, std::shared_ptr<std::atomic<bool>>> cancel_flags_;
};

}  // namespace metatt
