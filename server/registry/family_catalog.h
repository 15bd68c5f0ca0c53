// The on-disk side of the registry: where a family version's files live and
// how they are written, read and cleaned up. The served view
// (adapter_registry.h) decides what to publish and keeps versions resident;
// this file owns the directory layout under <data_dir>/families:
//
//   <family>/v<N>/                 one immutable version
//     cores.safetensors, family.json   a full version (adapters/family_io
//                                      format: every core, stacked heads)
//     appended.safetensors,            an appended version (an add-task
//     appended.json                    publication): only the new task
//                                      slices and head rows, and the version
//                                      they extend
//   <family>/.tmp-v<N>-<host>-<pid>/   a version being written
//   .import-<host>-<pid>-<seq>/        an import being checked
//
// A version directory is written in a scratch directory and renamed into
// place (the parent directory is fsynced); its metadata file is written last
// and is the commit point. An appended version may later also receive a full
// family.json + cores.safetensors (compaction): the same logical version,
// readable without its parents. Torch-free callers never see this file.
//
// With a blob store (PostgreSQL replicas without a shared directory,
// server/store/blob_store.h) a version is the objects under
// families/<family>/v<N>-<random>/ (one name per publication attempt, so two
// replicas racing for version N never write each other's objects; the
// Store's row names the winner's), uploaded before the Store records it,
// metadata last. Its record's path is "blob:families/<family>/v<N>-<random>"
// and <data_dir>/families/<family>/v<N>-<random>/ is this replica's
// read-through cache of it: Fetch() downloads what the cache lacks (versions
// are immutable, so a cached file is never stale; appended.json and
// family.json carry the hashes their tensors are checked against on load).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>

#include <torch/torch.h>

#include "absl/status/statusor.h"
#include "server/store/blob_store.h"

namespace metatt {

// What an add-task publication adds to its parent version (CPU, float32).
struct AppendedTensors {
  int64_t parent_version = 0;
  torch::Tensor task_slices;  // [k, r3, r4]
  torch::Tensor head_weight;  // [k, n, D] (n = the largest label count of the k)
  torch::Tensor head_bias;    // [k, n]
};

inline constexpr char kAppendedTensorsFile[] = "appended.safetensors";
inline constexpr char kAppendedMetaFile[] = "appended.json";

class FamilyCatalog {
 public:
  // Creates <data_dir>/families and removes scratch directories left by a
  // process that died (same host and gone, or untouched for an hour).
  // `blobs` (not owned; null = the directory holds the versions themselves):
  // the store versions live in, <data_dir>/families its cache.
  static absl::StatusOr<std::unique_ptr<FamilyCatalog>> Create(const std::string& data_dir,
                                                               BlobStore* blobs = nullptr);

  std::string VersionDir(const std::string& family, int64_t version) const;
  bool uses_blobs() const { return blobs_ != nullptr; }

  // Where a new version of `family` goes (its record's path): VersionDir,
  // or a fresh blob reference "blob:families/<family>/v<N>-<random>".
  std::string NewVersionPath(const std::string& family, int64_t version) const;
  // The local directory of a record's path (the cache for a blob reference).
  std::string LocalDir(const std::string& path) const;
  // The version's files, local: for a blob reference, downloads every object
  // of the version the cache lacks (NOT_FOUND naming the version when it has
  // none). Returns LocalDir(path).
  absl::StatusOr<std::string> Fetch(const std::string& path);
  // Whether the version holds a full family (family.json): locally, or in
  // the blob store.
  bool VersionHoldsFullFamily(const std::string& path);
  // Uploads the files of LocalDir(path) the blob store lacks (the full files
  // the compactor adds to an appended version), metadata (*.json) last.
  // No-op without a blob store.
  absl::Status UploadNewFiles(const std::string& path);

  // Writes the version at `path` (NewVersionPath): `write` fills a scratch
  // directory, `before_commit` may refuse (e.g. another replica published the
  // version meanwhile), then (blob store: every file is uploaded, metadata
  // last) the directory is renamed into place and its parent fsynced. On
  // error nothing is left behind. Returns the local version directory.
  absl::StatusOr<std::string> WriteVersion(
      const std::string& path, const std::function<absl::Status(const std::string& dir)>& write,
      const std::function<absl::Status()>& before_commit);
  // Removes a version the Store did not record: its directory and, for a
  // blob reference, its objects, but only after a definite refusal
  // (`refusal`: FAILED_PRECONDITION, ALREADY_EXISTS, INVALID_ARGUMENT,
  // NOT_FOUND). After an unanswered insert (UNAVAILABLE, a timeout) the row
  // may have been committed: its objects stay (an orphan at worst, never a
  // recorded version without bytes).
  void RemoveVersion(const std::string& path, const absl::Status& refusal);

  // An appended version's files, written into `dir` (appended.json last).
  static absl::Status WriteAppended(const std::string& dir, const AppendedTensors& t);
  // Reads and checks them (size and hash recorded in appended.json, shapes).
  static absl::StatusOr<AppendedTensors> ReadAppended(const std::string& dir);
  // Whether `dir` holds a full family (family.json): a full version, or an
  // appended one that was compacted.
  static bool HoldsFullFamily(const std::string& dir);

  // A scratch directory for checking imported files; removed by the caller.
  absl::StatusOr<std::string> MakeImportScratch();

 private:
  FamilyCatalog(std::string data_dir, std::string families, BlobStore* blobs)
      : data_dir_(std::move(data_dir)), families_(std::move(families)), blobs_(blobs) {}
  std::string data_dir_;
  std::string families_;  // <data_dir>/families
  BlobStore* blobs_;      // null: the directory is the store
};

}  // namespace metatt
