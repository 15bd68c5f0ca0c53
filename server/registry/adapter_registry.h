// Registry of published MetaTT adapter families: the served view. What is
// resident and resolvable lives here; where and how versions are stored on
// disk is server/registry/family_catalog.h.
//
// Every (family, version) is immutable once published: a `PublishedFamily`
// holds the adapter, every task head stacked compactly (weight
// [T, max_labels, D], bias [T, max_labels]: a million tasks are two tensors,
// not two million; resident in Options::head_dtype), the task name -> index
// map (TaskNameIndex: no second copy of the names) and the label vocabularies.
// Publish() writes the version with adapters/family_io (SaveFamily: heads
// stacked, registry metadata in family.json "extra") through the catalog,
// records the version in the Store and swaps the family's shared_ptr, so the
// next Resolve() sees it. PublishAppend() (an add-task job) writes and
// records only what it adds: its cost does not grow with the family (see
// AppendRequest); a background compactor later writes such a version in full
// so that no chain of appended versions grows without bound.
// In-flight requests keep the version they resolved alive.
//
// Thread-safe. The adapter inside a PublishedFamily keeps an inference cache and
// must only be driven by the device thread (DeviceScheduler).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "adapters/metatt_adapter.h"
#include "adapters/metatt_config.h"
#include "server/model/bert_encoder.h"
#include "server/registry/family_adapter.h"
#include "server/registry/family_catalog.h"
#include "server/store/store.h"

namespace metatt {

// Task name -> index without a second copy of the names: a hash set of task
// indices (uint32) whose hash and equality read the names from the family's
// task records. One slot costs 5 bytes (index + control byte), where a
// flat_hash_map<std::string, int64_t> costs 41 plus any heap name.
// Neither copyable nor movable: it points at the records it indexes.
class TaskNameIndex {
 public:
  TaskNameIndex() = default;
  TaskNameIndex(const TaskNameIndex&) = delete;
  TaskNameIndex& operator=(const TaskNameIndex&) = delete;

  // Indexes tasks[i].name -> i; `tasks` must outlive the index unchanged.
  // INVALID_ARGUMENT naming a duplicate name.
  absl::Status Build(const std::vector<TaskRecord>* tasks);
  int64_t Find(std::string_view name) const;  // -1 when absent
  size_t count(std::string_view name) const { return Find(name) >= 0 ? 1 : 0; }
  int64_t at(std::string_view name) const;    // std::out_of_range when absent
  size_t size() const { return set_.size(); }
  int64_t MemoryBytes() const;  // the hash table's slots and control bytes

 private:
  struct Hash {
    using is_transparent = void;
    const std::vector<TaskRecord>* tasks = nullptr;
    size_t operator()(uint32_t i) const;
    size_t operator()(std::string_view name) const;
  };
  struct Eq {
    using is_transparent = void;
    const std::vector<TaskRecord>* tasks = nullptr;
    std::string_view Name(uint32_t i) const { return (*tasks)[i].name; }
    bool operator()(uint32_t a, uint32_t b) const { return Name(a) == Name(b); }
    bool operator()(uint32_t a, std::string_view b) const { return Name(a) == b; }
    bool operator()(std::string_view a, uint32_t b) const { return a == Name(b); }
  };
  absl::flat_hash_set<uint32_t, Hash, Eq> set_;
};

// What a family keeps resident, in bytes (AdapterRegistry::ResidentBytes()).
struct ResidentStats {
  int64_t heads = 0;         // stacked head weights + biases (head_dtype)
  int64_t task_records = 0;  // record.tasks: structs + heap strings (estimate)
  int64_t name_index = 0;    // task_by_name
  int64_t total() const { return heads + task_records + name_index; }
  ResidentStats& operator+=(const ResidentStats& o) {
    heads += o.heads;
    task_records += o.task_records;
    name_index += o.name_index;
    return *this;
  }
};

struct PublishedFamily {
  FamilyVersionRecord record;  // record.tasks[i].index == i
  // MetaTT (4d, 5d, 4+1d) or LoRA (record.form "lora"; family_adapter.h).
  FamilyAdapter adapter;
  // Resident stacked heads in the registry's head_dtype (float32, float16 or
  // bfloat16) on the device: weight [T, max_labels, D], bias [T, max_labels].
  // The files on disk always hold them in float32 (ExactHeads()).
  torch::Tensor head_weight;
  torch::Tensor head_bias;
  TaskNameIndex task_by_name;  // over record.tasks
  // head_weight / head_bias are the first num_tasks() rows of this storage,
  // which (for a (4+1)D family) keeps spare rows: an add-task publication
  // writes its rows in place and shares the storage, so appending a task
  // copies no earlier head. `used` rows belong to published versions (only
  // the registry's publish lock changes it); older versions never read
  // past their own rows.
  struct HeadStorage {
    torch::Tensor weight;  // [capacity, max_labels, D]
    torch::Tensor bias;    // [capacity, max_labels]
    int64_t used = 0;
  };
  std::shared_ptr<HeadStorage> head_storage;
  // Where the float32 files are: the nearest directory holding a full family
  // and the appended versions after it, oldest first (ExactHeads()).
  std::string full_dir;
  std::vector<std::string> appended_dirs;
  // Appended versions since the last full one (0: a full version). The
  // registry compacts past AdapterRegistry::kCompactAfter.
  mutable std::atomic<int64_t> chain_length{0};
  Pooling pooling = Pooling::kMean;
  std::string pooling_name = "mean";
  int64_t max_length = 128;

  const std::string& family() const { return record.family; }
  int64_t version() const { return record.version; }
  int64_t num_tasks() const { return static_cast<int64_t>(record.tasks.size()); }
  // Head of task `t` from the resident copy, as float32: weight
  // [num_labels, D], bias [num_labels] (views when head_dtype is float32;
  // values rounded to head_dtype otherwise: use ExactHeads() to republish).
  std::pair<torch::Tensor, torch::Tensor> TaskHeadTensors(int64_t t) const;
  // The heads of the batch rows' tasks (`tasks` [B] int64 on the heads'
  // device), only those rows upcast to `dtype`: weight [B, max_labels, D],
  // bias [B, max_labels].
  std::pair<torch::Tensor, torch::Tensor> GatherHeads(
      const torch::Tensor& tasks, torch::ScalarType dtype = torch::kFloat32) const;
  // The float32 stacked heads exactly as published (CPU): the resident ones
  // when head_dtype is float32, else read back from the version's files
  // (full_dir, then appended_dirs).
  absl::StatusOr<std::pair<torch::Tensor, torch::Tensor>> ExactHeads() const;
  ResidentStats Resident() const;
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
  // Owner tenant; "" = the tenant of the job `created_by_job` (else the
  // family's, else "default"). The store refuses a version whose family
  // another tenant owns.
  std::string tenant;
  // The family's newest version when the publication started (0: the family
  // did not exist; a new-family job). FAILED_PRECONDITION, nothing published,
  // when another version appeared since (checked again by the store,
  // atomically with its insert). -1: whatever is newest.
  int64_t base_version = -1;
  // A LoRA family (form "lora"): this adapter (copied at publication; it
  // must outlive Publish()) instead of config / scale / adapter_tensors,
  // which are then ignored. Every task shares it; each has its own head.
  const LoraAdapter* lora = nullptr;
};

// What an add-task job hands over: only what it adds to the version it
// trained on. Publication writes only these tensors and task records (disk
// and Store), and fails with FAILED_PRECONDITION, publishing nothing, when
// the family is no longer at `base_version` (another job, an import or a
// DeleteTask published meanwhile): a job never overwrites what it did not see.
struct AppendRequest {
  std::string family;
  int64_t base_version = 0;
  torch::Tensor task_slices;                // [k, r3, r4], the new tasks' slices
  std::vector<TaskRecord> tasks;            // the k new tasks (names, labels, metrics)
  std::vector<torch::Tensor> head_weights;  // per new task [num_labels, D]
  std::vector<torch::Tensor> head_biases;   // per new task [num_labels]
  std::string created_by_job;
};

class AdapterRegistry {
 public:
  // An appended version whose chain (appended versions since a full one)
  // reaches CompactAfter(tasks) is written in full by the background
  // compactor: at least kCompactAfter, and one per 1,024 tasks of the family,
  // so a full write of T tasks happens every T/1024 appends (O(1) per added
  // task, amortised) and a load applies at most that many small files.
  static constexpr int64_t kCompactAfter = 16;
  static int64_t CompactAfter(int64_t tasks) { return std::max(kCompactAfter, tasks / 1024); }

  struct Options {
    std::string data_dir;  // families live under <data_dir>/families
    // Not owned. Set: versions live in this blob store and
    // <data_dir>/families is this replica's read-through cache of them
    // (family_catalog.h); null: the directory holds them.
    BlobStore* blobs = nullptr;
    torch::Device device = torch::kCPU;
    std::string base_model_fingerprint;
    // Dtype of the resident stacked heads: float32 | float16 | bfloat16
    // (server flag --head_dtype). Only the rows a batch gathers are upcast
    // to float32; published files always hold float32 heads.
    std::string head_dtype = "float32";
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

  ~AdapterRegistry();

  // Writes, records and activates version latest+1 of the family.
  absl::StatusOr<std::shared_ptr<const PublishedFamily>> Publish(const PublishRequest& request);
  // Version latest+1 = latest + the request's tasks (see AppendRequest).
  absl::StatusOr<std::shared_ptr<const PublishedFamily>> PublishAppend(
      const AppendRequest& request);
  // Blocks until the background compactor is idle (tests, benchmarks).
  void WaitForCompactions();

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
  // The files of a published version (name -> bytes), adapters/FORMAT.md:
  // "cores.safetensors" and "family.json" (the adapters/family_io format that
  // metatt-train writes and LoadFamily reads) for a MetaTT family; a PEFT
  // folder (adapter_config.json, adapter_model.safetensors) with
  // heads.safetensors and family.json for a LoRA family.
  absl::StatusOr<std::map<std::string, std::string>> ExportFiles(const std::string& family,
                                                                 int64_t version);
  // Publishes exported files (or a metatt-train output directory's files) as
  // version 1 of a new family (`family` "" = the name in family.json extra).
  // Files with adapter_config.json are a LoRA family: our export, or a PEFT
  // LoRA folder trained elsewhere with heads.safetensors beside it
  // (family.json optional; without it `family` is required).
  // ALREADY_EXISTS when the family exists,
  // FAILED_PRECONDITION when it was trained on another base model.
  absl::StatusOr<std::shared_ptr<const PublishedFamily>> Import(
      const std::string& family, const std::map<std::string, std::string>& files,
      const std::string& tenant = "");

  // Drops a family from memory (after the Store deleted it).
  void Remove(const std::string& family);

  std::vector<std::shared_ptr<const PublishedFamily>> Latest() const;
  int64_t ResidentTasks() const;
  // Resident bytes of the latest versions (heads, task records, name index).
  ResidentStats ResidentBytes() const;
  torch::ScalarType head_dtype() const { return head_dtype_; }
  const Options& options() const { return options_; }

 private:
  AdapterRegistry(const Options& options, Store* store, torch::ScalarType head_dtype,
                  std::unique_ptr<FamilyCatalog> catalog);
  // Any version (an appended one from its nearest resident or full ancestor).
  // extend_storage: the caller holds publish_mu_ (AppendToFamily).
  absl::StatusOr<std::shared_ptr<PublishedFamily>> LoadVersion(const FamilyVersionRecord& record,
                                                               bool extend_storage = false);
  // A version whose directory holds a full family (record.tasks may be empty).
  absl::StatusOr<std::shared_ptr<PublishedFamily>> LoadFullVersion(
      const FamilyVersionRecord& record);
  // A LoRA family's version directory (LoadFullVersion's LoRA branch).
  absl::StatusOr<std::shared_ptr<PublishedFamily>> LoadLoraVersion(
      const FamilyVersionRecord& record);
  absl::StatusOr<std::shared_ptr<const PublishedFamily>> ImportLora(
      const std::string& family, const std::map<std::string, std::string>& files,
      const std::string& tenant);
  // The resident (family, version), or null.
  std::shared_ptr<const PublishedFamily> Resident(const std::string& family, int64_t version);
  // ALREADY_EXISTS when the Store knows (family, version) already.
  absl::Status CheckVersionFree(const std::string& family, int64_t version);
  // Makes `fam` its family's latest version (the previous one stays
  // reachable as an older version while in use).
  std::shared_ptr<const PublishedFamily> Activate(std::shared_ptr<PublishedFamily> fam);
  void EnqueueCompaction(const std::string& family);
  absl::Status CompactLatest(const std::string& family);
  void CompactLoop();

  Options options_;
  Store* store_;
  std::unique_ptr<FamilyCatalog> catalog_;
  torch::ScalarType head_dtype_ = torch::kFloat32;
  absl::Mutex publish_mu_;  // serialises Publish (version numbers)
  mutable absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<const PublishedFamily>> latest_ ABSL_GUARDED_BY(mu_);
  std::map<std::pair<std::string, int64_t>, std::weak_ptr<const PublishedFamily>> older_
      ABSL_GUARDED_BY(mu_);
  std::map<std::string, int64_t> refresh_failed_ ABSL_GUARDED_BY(mu_);  // family -> version

  absl::Mutex compact_mu_;
  std::deque<std::string> compact_queue_ ABSL_GUARDED_BY(compact_mu_);  // families
  bool compacting_ ABSL_GUARDED_BY(compact_mu_) = false;
  bool stop_ ABSL_GUARDED_BY(compact_mu_) = false;
  std::thread compactor_;
};

// "float32" | "float16" | "bfloat16" -> dtype; INVALID_ARGUMENT naming
// head_dtype and the value otherwise.
absl::StatusOr<torch::ScalarType> ParseHeadDtype(const std::string& name);

// Ranks of the cores in `tensors` (MetaTTAdapter names) for `form`.
absl::StatusOr<std::vector<int64_t>> RanksFromTensors(
    TTForm form, const std::map<std::string, torch::Tensor>& tensors);

}  // namespace metatt
