// Dataset uploads: validates the bytes with an injected parser (all-or-nothing:
// a malformed file is refused with every bad line and nothing is stored),
// writes them atomically under <data_dir>/datasets/<id>/ (and, with a blob
// store, as a blob: DatasetManagerOptions::blobs), records sha256, rows and
// label vocabulary in the Store. Torch-free: the real parser
// (server/training/dataset.h) is injected by main through DatasetParseFn.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/jobs/tenants.h"
#include "server/store/blob_store.h"
#include "server/store/store.h"

namespace metatt {

// What validation learns about a dataset.
struct ParsedDatasetInfo {
  int64_t num_rows = 0;
  std::vector<std::string> label_names;  // classification vocabulary
  bool regression = false;
};

// Parses `bytes` under `spec_json` (see dataset_spec_json.h for the JSON form
// of a DatasetSpec). INVALID_ARGUMENT naming every bad line on failure.
using DatasetParseFn = std::function<absl::StatusOr<ParsedDatasetInfo>(
    const std::string& bytes, const std::string& spec_json)>;

struct DatasetManagerOptions {
  std::string data_dir;                    // datasets go to <data_dir>/datasets/
  // Not owned. Set (PostgreSQL replicas without a shared directory): the
  // bytes are also stored as the blob "datasets/<id>/data.<format>" before
  // the record, whose path is then "blob:datasets/<id>/data.<format>", and
  // <data_dir>/datasets/ is this replica's read-through cache. Null: the
  // file under <data_dir>/datasets/ is the dataset (path: that file).
  BlobStore* blobs = nullptr;
  int64_t max_upload_bytes = 256ll << 20;  // RESOURCE_EXHAUSTED above this
  DatasetParseFn parse;                    // required
  std::function<int64_t()> now_unix_ms;    // tests inject a clock
  QuotaFn quotas;                          // per-tenant max_dataset_bytes; null = none
  int64_t max_labels_per_task = 0;         // classes of one dataset (job_validation.h); 0 = none
};

// How many bytes the caller's next upload may have, and the limit that says
// so ("max_upload_bytes" or "max_dataset_bytes", the tenant's quota): the
// upload stream stops at it (RESOURCE_EXHAUSTED naming it) instead of
// buffering past it.
struct UploadAllowance {
  int64_t bytes = 0;
  std::string limit;        // the limit's name
  std::string explanation;  // e.g. "tenant 'acme' has 900 of max_dataset_bytes=1000"
};

struct DatasetUpload {
  std::string name;
  std::string format;     // tsv | csv | jsonl
  std::string spec_json;  // column mapping etc.
};

std::string Sha256Hex(const std::string& bytes);

// The dataset's file still has the sha256 recorded at upload (streamed, 1 MiB
// at a time). FAILED_PRECONDITION "<field>: dataset <id> ..." when the file is
// missing, unreadable or changed (bit rot, a partial restore, a hand edit).
absl::Status VerifyDatasetFile(const DatasetRecord& d, absl::string_view field);

// The bytes of dataset `d` for a job. A local path is read as it is (the job
// manager checked its hash when the job was created: VerifyDatasetFile). A
// blob reference is read through the copy under
// <cache_dir>/datasets/<id>/ (downloaded when missing), checked against the
// recorded sha256: FAILED_PRECONDITION "<field>: dataset <id> ..." naming the
// blob when it is missing or corrupt (a corrupt cached copy is fetched again
// first).
absl::StatusOr<std::string> ReadDatasetBytes(const DatasetRecord& d, BlobStore* blobs,
                                             const std::string& cache_dir,
                                             absl::string_view field);

// fsync of `dir` itself, so that the entries created or renamed in it are
// durable. INTERNAL naming the directory and the errno on failure.
absl::Status SyncDirectoryEntries(const std::filesystem::path& dir);

class DatasetManager {
 public:
  static absl::StatusOr<std::unique_ptr<DatasetManager>> Create(DatasetManagerOptions options,
                                                                Store* store);

  int64_t max_upload_bytes() const { return options_.max_upload_bytes; }
  // RESOURCE_EXHAUSTED naming max_dataset_bytes when the tenant has no room left.
  absl::StatusOr<UploadAllowance> AllowanceFor(const Caller& caller);

  // Validates, stores and records one dataset, owned by the caller's tenant
  // (RESOURCE_EXHAUSTED naming max_dataset_bytes past the tenant's quota).
  // Another tenant's dataset is NOT_FOUND like a missing one; List shows the
  // caller's datasets (an admin's: all).
  absl::StatusOr<DatasetRecord> Upload(const DatasetUpload& header, const std::string& bytes,
                                       const Caller& caller = Caller::Local());
  absl::StatusOr<DatasetRecord> Get(const std::string& id, const Caller& caller = Caller::Local());
  absl::StatusOr<std::vector<DatasetRecord>> List(const Caller& caller = Caller::Local());
  // FAILED_PRECONDITION naming the job while a job references the dataset.
  absl::Status Delete(const std::string& id, const Caller& caller = Caller::Local());

 private:
  DatasetManager(DatasetManagerOptions options, Store* store)
      : options_(std::move(options)), store_(store) {}
  int64_t Now() const;
  // The bytes of datasets `tenant` holds (its max_dataset_bytes quota counts them).
  absl::StatusOr<int64_t> TenantDatasetBytes(const std::string& tenant);

  DatasetManagerOptions options_;
  Store* store_;
};

}  // namespace metatt
