// Persistence interface for datasets, jobs, job events and adapter families.
// SQLite (WAL) is the embedded default (sqlite_store.h); PostgreSQL
// (postgres_store.h) implements it for several replicas. Torch-free.
#pragma once

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "server/store/job_types.h"

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
  std::string tenant = "default";  // owner (server/jobs/tenants.h)
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
  std::vector<TaskRecord> tasks;  // empty in a summary (ListFamilyVersionSummaries)
  int64_t task_count = 0;          // number of tasks; set by the stores on every read
  std::string created_by_job;
  int64_t created_unix_ms = 0;
  std::string tenant = "default";  // owner; every version of a family has the same one
  // 0: a full version (`tasks` lists every task; `path` holds the whole
  // family). > 0: an appended version (an add-task publication): `tasks`
  // holds only the tasks appended to version `parent_version`, `path` only
  // their tensors, and task_count counts them all. GetFamilyVersionFull()
  // rebuilds the whole list; CompactFamilyVersion() turns it into a full one.
  int64_t parent_version = 0;
};

// Family names are per tenant. A family's key (FamilyVersionRecord::family:
// what the store, the registry, the runtime and the files index) is
// FamilyKey(tenant, name): the name itself for tenant "default" (data written
// before names were per tenant keeps its keys), "<tenant>~<name>" for every
// other tenant. '~' is in no valid tenant or family name, so two tenants'
// keys never collide and the key names its owner (the stores refuse a version
// that another tenant owns). Only server/jobs/tenants.h maps a caller's names
// to keys and back (and the registry's import of an unnamed family).
inline constexpr char kFamilyKeySeparator = '~';
inline std::string FamilyKey(const std::string& tenant, const std::string& name) {
  if (tenant.empty() || tenant == "default") return name;
  return tenant + kFamilyKeySeparator + name;
}
// The tenant a key belongs to ("default" for a key without a separator).
inline std::string FamilyKeyTenant(const std::string& key) {
  const size_t sep = key.find(kFamilyKeySeparator);
  return sep == std::string::npos ? std::string("default") : key.substr(0, sep);
}
// The name within its tenant.
inline std::string FamilyKeyName(const std::string& key) {
  const size_t sep = key.find(kFamilyKeySeparator);
  return sep == std::string::npos ? key : key.substr(sep + 1);
}

// What PublishFamilyVersion checks against the family's current newest
// version (`newest` 0 and `owner` "" when it has none): FAILED_PRECONDITION
// with the reason, or OK. One rule for both stores.
inline absl::Status CheckPublication(const std::string& family, int64_t version,
                                     const std::string& tenant, int64_t newest,
                                     const std::string& owner) {
  if (!owner.empty() && owner != tenant) {
    return absl::FailedPreconditionError("family '" + FamilyKeyName(family) +
                                         "' belongs to another tenant; nothing was published");
  }
  if (newest != version - 1) {
    return absl::FailedPreconditionError(
        "family '" + FamilyKeyName(family) + "' is at v" + std::to_string(newest) + ", not v" +
        std::to_string(version - 1) +
        " that the publication started from (another job, an import or a DeleteTask published "
        "meanwhile); nothing was published");
  }
  return absl::OkStatus();
}

// "family '<family>' has no version <version>" (NOT_FOUND).
inline absl::Status FamilyVersionNotFound(const std::string& family, int64_t version) {
  return absl::NotFoundError("family '" + family + "' has no version " + std::to_string(version));
}

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

  // Records a new version: a compare-and-swap on the family, atomic with the
  // insert. FAILED_PRECONDITION, nothing recorded, when the family's newest
  // version is not f.version - 1 (another job, an import or a DeleteTask
  // published since the publisher read its base; 0 = no version) or when it
  // belongs to another tenant than f.tenant (CheckPublication).
  // ALREADY_EXISTS when (family, version) exists.
  virtual absl::Status PublishFamilyVersion(const FamilyVersionRecord& f) = 0;
  virtual absl::StatusOr<std::vector<FamilyVersionRecord>> ListFamilyVersions(
      const std::string& family /* "" = all */) = 0;
  // Like ListFamilyVersions, but every record's `tasks` is empty and only its
  // task_count is set: reads no task list (a version can hold 10^6 tasks).
  // The defaults below serve stores that do not override them.
  virtual absl::StatusOr<std::vector<FamilyVersionRecord>> ListFamilyVersionSummaries(
      const std::string& family /* "" = all */);
  // One full record; NOT_FOUND naming the family and version when missing.
  virtual absl::StatusOr<FamilyVersionRecord> GetFamilyVersion(const std::string& family,
                                                               int64_t version);
  // The same with only tasks [first_task, first_task + max_tasks) (fewer at
  // the end; max_tasks < 0 = to the end); task_count counts them all. Parses
  // only the tasks it returns (e.g. the first 100 a listing shows).
  virtual absl::StatusOr<FamilyVersionRecord> GetFamilyVersionTasks(const std::string& family,
                                                                    int64_t version,
                                                                    int64_t first_task,
                                                                    int64_t max_tasks);
  virtual absl::Status DeleteFamily(const std::string& family) = 0;
  // An appended version becomes a full one: `tasks` (every task, in index
  // order) replaces its appended tasks and parent_version becomes 0. Same
  // logical version, another representation (the registry's compactor calls
  // it after writing the whole family's files).
  virtual absl::Status CompactFamilyVersion(const std::string& family, int64_t version,
                                            const std::vector<TaskRecord>& tasks) = 0;
  // GetFamilyVersion with every task: walks an appended version's parents
  // back to the nearest full version (the compactor bounds the walk).
  absl::StatusOr<FamilyVersionRecord> GetFamilyVersionFull(const std::string& family,
                                                           int64_t version);

  // ---- Several replicas on one database (PostgreSQL, postgres_store.h) ----
  // A replica claims the oldest queued job and holds a lease on it (database
  // clock) that it renews while the job runs; a replica that finds a lease
  // expired takes the job over (JobManager then fails or re-queues it).
  // The embedded SQLite store runs one process and keeps the defaults: the
  // job manager then uses its in-memory FIFO queue.
  virtual bool SupportsClaims() const { return false; }
  // The oldest QUEUED unclaimed job, now held by `replica` for `lease_ms`
  // (state unchanged); NOT_FOUND when none waits. No job is claimed twice.
  virtual absl::StatusOr<JobRecord> ClaimNextJob(const std::string& replica, int64_t lease_ms) {
    (void)replica, (void)lease_ms;
    return absl::UnimplementedError("ClaimNextJob");
  }
  // Extends the lease iff `replica` still holds the job (FAILED_PRECONDITION
  // naming the holder otherwise). Returns whether a cancel was requested.
  virtual absl::StatusOr<bool> RenewLease(const std::string& job_id, const std::string& replica,
                                          int64_t lease_ms) {
    (void)job_id, (void)replica, (void)lease_ms;
    return absl::UnimplementedError("RenewLease");
  }
  // Marks a claimed job for cancellation by whichever replica holds it.
  virtual absl::Status RequestCancel(const std::string& job_id) {
    (void)job_id;
    return absl::UnimplementedError("RequestCancel");
  }
  // Drops `replica`'s claim so any replica may claim the job again.
  virtual absl::Status ReleaseClaim(const std::string& job_id, const std::string& replica) {
    (void)job_id, (void)replica;
    return absl::UnimplementedError("ReleaseClaim");
  }
  // A QUEUED/VALIDATING/RUNNING job whose lease ran out (its replica died),
  // now held by `replica`; `*previous_holder` names the dead one. NOT_FOUND
  // when there is none. Two replicas never take over the same job.
  virtual absl::StatusOr<JobRecord> TakeOverExpiredJob(const std::string& replica,
                                                       int64_t lease_ms,
                                                       std::string* previous_holder) {
    (void)replica, (void)lease_ms, (void)previous_holder;
    return absl::UnimplementedError("TakeOverExpiredJob");
  }
  // Fencing: from now on this store object writes for `job_id` only while
  // the job's claim is still `epoch` (JobRecord::claim_epoch of the claim).
  // UpdateJob and AppendJobEvent of the job, RenewLease, and a
  // PublishFamilyVersion whose created_by_job is the job are refused with
  // FAILED_PRECONDITION ("stale fencing token") once another replica took
  // the job over (a newer epoch), each check atomic with its write. A
  // replica that paused past its lease can thus neither publish nor touch
  // the job again. DropFence ends it (the job ended or was released here).
  virtual void HoldFence(const std::string& job_id, int64_t epoch) { (void)job_id, (void)epoch; }
  virtual void DropFence(const std::string& job_id) { (void)job_id; }

  // OK when the store answers (health checking): UNAVAILABLE when it does not
  // within its timeouts.
  virtual absl::Status Ping() { return absl::OkStatus(); }
};

inline absl::StatusOr<std::vector<FamilyVersionRecord>> Store::ListFamilyVersionSummaries(
    const std::string& family) {
  absl::StatusOr<std::vector<FamilyVersionRecord>> all = ListFamilyVersions(family);
  if (!all.ok()) return all.status();
  for (FamilyVersionRecord& v : *all) {
    if (v.parent_version == 0) v.task_count = static_cast<int64_t>(v.tasks.size());
    v.tasks = {};
  }
  return all;
}

inline absl::StatusOr<FamilyVersionRecord> Store::GetFamilyVersion(const std::string& family,
                                                                   int64_t version) {
  absl::StatusOr<std::vector<FamilyVersionRecord>> all = ListFamilyVersions(family);
  if (!all.ok()) return all.status();
  for (FamilyVersionRecord& v : *all) {
    if (v.version == version) {
      if (v.parent_version == 0) v.task_count = static_cast<int64_t>(v.tasks.size());
      return std::move(v);
    }
  }
  return FamilyVersionNotFound(family, version);
}

inline absl::StatusOr<FamilyVersionRecord> Store::GetFamilyVersionTasks(const std::string& family,
                                                                        int64_t version,
                                                                        int64_t first_task,
                                                                        int64_t max_tasks) {
  absl::StatusOr<FamilyVersionRecord> v = GetFamilyVersion(family, version);
  if (!v.ok()) return v;
  v->task_count = static_cast<int64_t>(v->tasks.size());
  const auto first = std::min<int64_t>(std::max<int64_t>(first_task, 0), v->task_count);
  const int64_t last =
      max_tasks < 0 ? v->task_count : std::min<int64_t>(v->task_count, first + max_tasks);
  v->tasks = std::vector<TaskRecord>(std::make_move_iterator(v->tasks.begin() + first),
                                     std::make_move_iterator(v->tasks.begin() + last));
  return v;
}

inline absl::StatusOr<FamilyVersionRecord> Store::GetFamilyVersionFull(const std::string& family,
                                                                       int64_t version) {
  absl::StatusOr<FamilyVersionRecord> v = GetFamilyVersion(family, version);
  if (!v.ok()) return v;
  std::vector<std::vector<TaskRecord>> appended;  // newest first
  int64_t parent = v->parent_version;
  while (parent > 0) {
    absl::StatusOr<FamilyVersionRecord> p = GetFamilyVersion(family, parent);
    if (!p.ok()) {
      return absl::Status(p.status().code(),
                          "family '" + family + "' v" + std::to_string(version) +
                              ": parent version: " + std::string(p.status().message()));
    }
    appended.push_back(std::move(v->tasks));
    v->tasks = std::move(p->tasks);
    parent = p->parent_version;
  }
  for (auto it = appended.rbegin(); it != appended.rend(); ++it) {
    for (TaskRecord& t : *it) v->tasks.push_back(std::move(t));
  }
  return v;
}

}  // namespace metatt
