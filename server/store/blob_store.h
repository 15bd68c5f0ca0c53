// Where the bytes live: family version files, uploaded datasets and job
// checkpoints, as immutable-by-convention objects under '/'-separated keys
// ("families/<family>/v<N>-<id>/cores.safetensors", "datasets/<id>/data.tsv",
// "checkpoints/<job id>/step-<K>.ckpt"). Torch-free, gRPC-free.
//
// Two implementations:
//   * LocalBlobStore (below): a directory; a key is the file <root>/<key>,
//     written with base/file_io's WriteFileAtomically (temporary file, fsync,
//     rename, fsync of the directory), the layout the server has always used
//     under --data_dir.
//   * PostgreSQL (PostgresStore::blob_store(), postgres_store.h): a `blobs`
//     table (bytea, its size and FNV-1a 64 checked on every read) in the
//     store's own database, so replicas share no directory.
//
// Callers that read a remote store keep a local read-through copy in their
// own data directory (server/registry/family_catalog.h, the dataset manager,
// the job executor's checkpoints).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace metatt {

// A key: 1-1024 characters, '/'-separated segments of letters, digits and
// '-', '_', '.', '~', '+', '='; no empty, "." or ".." segment, no leading '/',
// no segment holding ".tmp." (the local store's scratch names).
// INVALID_ARGUMENT naming the key otherwise. The one key rule.
absl::Status ValidateBlobKey(const std::string& key);

class BlobStore {
 public:
  virtual ~BlobStore() = default;

  // Stores `bytes` under `key`, replacing any value: durable when it returns
  // OK, and atomic (a reader sees the old value or the new one, whole).
  // `fence_job` (optional): the write belongs to that claimed job; a store
  // that fences job writes (PostgreSQL, Store::HoldFence) refuses it with
  // FAILED_PRECONDITION ("stale fencing token") once another replica took
  // the job over, atomically with the write.
  virtual absl::Status Put(const std::string& key, const std::string& bytes,
                           const std::string& fence_job = "") = 0;
  // NOT_FOUND naming the key when absent; DATA_LOSS naming it when the bytes
  // do not match what was stored (size or hash, where the store keeps them).
  virtual absl::StatusOr<std::string> Get(const std::string& key) = 0;
  virtual absl::StatusOr<bool> Exists(const std::string& key) = 0;
  // Every key that starts with `prefix` (a plain string prefix), sorted.
  virtual absl::StatusOr<std::vector<std::string>> List(const std::string& prefix) = 0;
  // Removes `key`; OK when it was absent (deletes are idempotent).
  virtual absl::Status Delete(const std::string& key) = 0;
  // "directory <root>" / "postgresql": for messages.
  virtual std::string Describe() const = 0;
};

// A BlobStore on a local (or mounted) directory.
class LocalBlobStore : public BlobStore {
 public:
  // Creates `root` if needed.
  static absl::StatusOr<std::unique_ptr<LocalBlobStore>> Create(const std::string& root);

  absl::Status Put(const std::string& key, const std::string& bytes,
                   const std::string& fence_job = "") override;
  absl::StatusOr<std::string> Get(const std::string& key) override;
  absl::StatusOr<bool> Exists(const std::string& key) override;
  absl::StatusOr<std::vector<std::string>> List(const std::string& prefix) override;
  absl::Status Delete(const std::string& key) override;
  std::string Describe() const override { return "directory " + root_; }

  // The file that holds `key` (it need not exist).
  std::string PathOf(const std::string& key) const { return root_ + "/" + key; }

 private:
  explicit LocalBlobStore(std::string root) : root_(std::move(root)) {}
  std::string root_;
};

// Blob references in records (FamilyVersionRecord::path, DatasetRecord::path):
// "blob:<key>" names an object of the server's blob store; anything else is
// a local path (SQLite mode, or replicas sharing --data_dir).
inline constexpr char kBlobRefPrefix[] = "blob:";
inline bool IsBlobRef(const std::string& path) { return path.rfind(kBlobRefPrefix, 0) == 0; }
inline std::string BlobRef(const std::string& key) { return kBlobRefPrefix + key; }
inline std::string BlobKeyOf(const std::string& ref) {
  return IsBlobRef(ref) ? ref.substr(sizeof(kBlobRefPrefix) - 1) : ref;
}

// Downloads `key` into the local file `path` unless `path` exists already
// (immutable objects cache trivially), atomically (WriteFileAtomically, with
// its parent directories created and fsynced). *downloaded says whether it
// fetched the object. NOT_FOUND / DATA_LOSS from Get name the key.
absl::Status FetchBlobToFile(BlobStore* blobs, const std::string& key, const std::string& path,
                             bool* downloaded = nullptr);

}  // namespace metatt
