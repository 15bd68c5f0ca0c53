// Registry of published MetaTT adapter families.
//
// Every (family, version) is immutable once published: a `PublishedFamily`
// holds the adapter, every task head stacked compactly (weight
// [T, max_labels, D], bias [T, max_labels]: a million tasks are two tensors,
// not two million), the task name -> index map and the label vocabularies.
// Publish() writes the version with adapters/family_io (SaveFamily: heads
// stacked, registry metadata in family.json "extra") under
// <data_dir>/families/<family>/v<N>/ (a temporary directory renamed into
// place), records the version in the
// Store and swaps the family's shared_ptr, so the next Resolve() sees it.
// In-flight requests keep the version they resolved alive.
//
// Thread-safe. The adapter inside a PublishedFamily keeps an inference cache and
// must only be driven by the device thread (DeviceScheduler).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "adapters/metatt_adapter.h"
#include "adapters/metatt_config.h"
#include "server/jobs/store.h"
#include "server/model/bert_encoder.h"

namespace metatt {

struct PublishedFamily {
  FamilyVersionRecord record;  // record.tasks[i].index == i
  std::unique_ptr<MetaTTAdapter> adapter;
  torch::Tensor head_weight;  // [T, max_labels, D] on the device
  torch::Tensor head_bias;    // [T, max_labels]
  absl::flat_hash_map<std::string, int64_t> task_by_name;
  Pooling pooling = Pooling::kMean;
  std::string pooling_name = "mean";
  int64_t max_length = 128;

  const std::string& family() const { return record.family; }
  int64_t version() const { return record.version; }
  int64_t num_tasks() const { return static_cast<int64_t>(record.tasks.size()); }
  // Head of task `t`: weight [num_labels, D], bias [num_labels] (views).
  std::pair<torch::Tensor, torch::Tensor> TaskHeadTensors(int64_t t) const;
};

struct ResolvedTask {
  std::shared_ptr<const PublishedFamily> family;
  int64_t task = 0;
};

// What a training job hands over to publish a new version.
struct PublishRequest {
  std::string family;
  MetaTTConfig config;  // ranks / num_tasks must match the tensors
  double scale = 1.0;
  std::map<std::string, torch::Tensor> adapter_tensors;  // MetaTTAdapter names
  std::vector<TaskRecord> tasks;                          // in index order
  std::vector<torch::Tensor> head_weights;  // per task [num_labels, D]
  std::vector<torch::Tensor> head_biases;   // per task [num_labels]
  std::string pooling = "mean";
  int64_t max_length = 128;
  std::string created_by_job;
  // Owner tenant of a new family; "" = the tenant of the job `created_by_job`
  // (else "default"). A new version keeps its family's tenant.
  std::string tenant;
};

class AdapterRegistry {
 public:
  struct Options {
    std::string data_dir;  // families live under <data_dir>/families
    torch::Device device = torch::kCPU;
    std::string base_model_fingerprint;
  };
  static absl::StatusOr<std::unique_ptr<AdapterRegistry>> Create(const Options& options,
                                                                 Store* store);

  // Loads the latest published version of every family in the Store. A
  // family that fails to load (missing files, other base model) is skipped
  // and reported in the returned list of warnings.
  absl::StatusOr<std::vector<std::string>> LoadAll();

  // Several replicas on one store: loads the versions other replicas
  // published since (newer than the loaded one) and drops families deleted
  // from the Store, swapping each family's shared_ptr atomically (in-flight
  // requests keep the version they resolved). Returns what changed, e.g.
  // "glue v3", "-old" (removed). A version that fails to load is reported
  // once and retried only when a newer one appears.
  absl::StatusOr<std::vector<std::string>> Refresh();

  // Writes, records and activates version latest+1 of the family.
  absl::StatusOr<std::shared_ptr<const PublishedFamily>> Publish(const PublishRequest& request);

  // version 0 = latest. Older versions are loaded from disk on demand.
  absl::StatusOr<std::shared_ptr<const PublishedFamily>> Get(const std::string& family,
                                                          int64_t version = 0);
  // family "" = the only loaded family. task_name non-empty wins over index.
  absl::StatusOr<ResolvedTask> Resolve(const std::string& family, int64_t version,
                                       const std::string& task_name, int64_t task_index);
  // A new version without `task`. Task slices after it move down one index
  // (task t > removed becomes t - 1); FAILED_PRECONDITION for the last task.
  absl::StatusOr<std::shared_ptr<const PublishedFamily>> DeleteTask(const std::string& family,
                                                                 const std::string& task);
  // The files of a published version: "cores.safetensors" and
  // "family.json" (name -> bytes), the adapters/family_io format that
  // metatt-train writes and LoadFamily reads.
  absl::StatusOr<std::map<std::string, std::string>> ExportFiles(const std::string& family,
                                                                 int64_t version);
  // Publishes exported files (or a metatt-train output directory's files) as
  // version 1 of a new family (`family` "" = the name in family.json extra).
  // ALREADY_EXISTS when the family exists,
  // FAILED_PRECONDITION when it was trained on another base model.
  absl::StatusOr<std::shared_ptr<const PublishedFamily>> Import(
      const std::string& family, const std::map<std::string, std::string>& files,
      const std::string& tenant = "");

  // Drops a family from memory (after the Store deleted it).
  void Remove(const std::string& family);

  std::vector<std::shared_ptr<const PublishedFamily>> Latest() const;
  int64_t ResidentTasks() const;
  const Options& options() const { return options_; }

 private:
  AdapterRegistry(const Options& options, Store* store) : options_(options), store_(store) {}
  absl::StatusOr<std::shared_ptr<PublishedFamily>> LoadVersion(const FamilyVersionRecord& record);

  Options options_;
  Store* store_;
  absl::Mutex publish_mu_;  // serialises Publish (version numbers)
  mutable absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<const PublishedFamily>> latest_ ABSL_GUARDED_BY(mu_);
  std::map<std::pair<std::string, int64_t>, std::weak_ptr<const PublishedFamily>> older_
      ABSL_GUARDED_BY(mu_);
  std::map<std::string, int64_t> refresh_failed_ ABSL_GUARDED_BY(mu_);  // family -> version
};

// Ranks of the cores in `tensors` (MetaTTAdapter names) for `form`.
absl::StatusOr<std::vector<int64_t>> RanksFromTensors(
    TTForm form, const std::map<std::string, torch::Tensor>& tensors);

}  // namespace metatt
