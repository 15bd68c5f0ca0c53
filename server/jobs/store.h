// Persistence interface for datasets, jobs, job events and adapter families.
// SQLite (WAL) is the embedded default (sqlite_store.h); PostgreSQL can
// implement the same interface for several replicas. Torch-free.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/jobs/job_types.h"

namespace metatt {

struct DatasetRecord {
  std::string id;
  std::string name;
  std::string format;        // tsv | csv | jsonl
  std::string spec_json;     // column mapping etc. (DatasetSpec as JSON)
  std::string sha256;        // of the raw bytes
  std::string path;          // raw bytes on disk under data_dir/datasets/
  int64_t num_rows = 0;
  int64_t size_bytes = 0;
  std::vector<std::string> label_names;  // classification label vocabulary
  bool regression = false;
  int64_t created_unix_ms = 0;
};

struct TaskRecord {
  std::string name;
  int64_t index = 0;          // position in the task core
  int64_t num_labels = 0;     // 1 for regression
  bool regression = false;
  std::vector<std::string> label_names;
  std::map<std::string, double> eval_metrics;
};

struct FamilyVersionRecord {
  std::string family;
  int64_t version = 0;        // 1, 2, ... immutable once published
  std::string form;           // 4d | 5d | 4+1d
  std::string config_json;    // MetaTTConfig as JSON
  std::string base_model_fingerprint;
  std::string path;           // directory holding cores.safetensors + family.json
  int64_t adapter_parameters = 0;
  std::vector<TaskRecord> tasks;
  std::string created_by_job;
  int64_t created_unix_ms = 0;
};

class Store {
 public:
  virtual ~Store() = default;

  virtual absl::Status PutDataset(const DatasetRecord& d) = 0;
  virtual absl::StatusOr<DatasetRecord> GetDataset(const std::string& id) = 0;
  virtual absl::StatusOr<std::vector<DatasetRecord>> ListDatasets() = 0;
  // FAILED_PRECONDITION naming the job when a job references it.
  virtual absl::Status DeleteDataset(const std::string& id) = 0;

  // Creates the job, or returns the existing one with the same idempotency key.
  virtual absl::StatusOr<JobRecord> CreateJob(const JobRecord& j) = 0;
  // NOT_FOUND when no job carries `key`.
  virtual absl::StatusOr<JobRecord> FindJobByIdempotencyKey(const std::string& key) {
    (void)key;
    return absl::UnimplementedError("FindJobByIdempotencyKey");
  }
  virtual absl::Status UpdateJob(const JobRecord& j) = 0;
  virtual absl::StatusOr<JobRecord> GetJob(const std::string& id) = 0;
  // Oldest first; `state` filters when set; `page_token` is opaque.
  virtual absl::StatusOr<std::vector<JobRecord>> ListJobs(std::optional<JobState> state,
                                                          int64_t page_size,
                                                          const std::string& page_token,
                                                          std::string* next_page_token) = 0;
  virtual absl::Status AppendJobEvent(const std::string& job_id, const JobEvent& e) = 0;
  virtual absl::StatusOr<std::vector<JobEvent>> ListJobEvents(const std::string& job_id) = 0;

  virtual absl::Status PublishFamilyVersion(const FamilyVersionRecord& f) = 0;
  virtual absl::StatusOr<std::vector<FamilyVersionRecord>> ListFamilyVersions(
      const std::string& family /* "" = all */) = 0;
  virtual absl::Status DeleteFamily(const std::string& family) = 0;
};

}  // namespace metatt
