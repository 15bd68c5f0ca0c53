#include "server/jobs/dataset_manager.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <system_error>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "base/file_io.h"
#include "base/status_macros.h"
#include "server/jobs/ids.h"
#include "server/jobs/job_validation.h"

namespace metatt {
namespace fs = std::filesystem;
namespace {

absl::Status WriteFileSynced(const fs::path& path, const std::string& bytes) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return absl::ErrnoToStatus(errno, absl::StrCat("cannot create ", path.string()));
  size_t off = 0;
  while (off < bytes.size()) {
    ssize_t n = ::write(fd, bytes.data() + off, bytes.size() - off);
    if (n < 0) {
      if (errno == EINTR) continue;
      const int e = errno;
      ::close(fd);
      return absl::ErrnoToStatus(e, absl::StrCat("cannot write ", path.string()));
    }
    off += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) {
    const int e = errno;
    ::close(fd);
    return absl::ErrnoToStatus(e, absl::StrCat("cannot fsync ", path.string()));
  }
  ::close(fd);
  return absl::OkStatus();
}

}  // namespace

// fsync of a directory: its entries (a file created in it, a rename into it)
// survive power loss only after this.
absl::Status SyncDirectoryEntries(const fs::path& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) {
    return absl::ErrnoToStatus(errno, absl::StrCat("cannot open directory ", dir.string()));
  }
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) {
    return absl::ErrnoToStatus(err, absl::StrCat("cannot fsync directory ", dir.string()));
  }
  return absl::OkStatus();
}


absl::Status VerifyDatasetFile(const DatasetRecord& d, absl::string_view field) {
  int fd = ::open(d.path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return absl::FailedPreconditionError(
        absl::StrCat(field, ": dataset ", d.id, " cannot be read (", d.path, ": ",
                     std::strerror(errno), "); upload it again"));
  }
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
  std::string buf(1 << 20, '\0');
  ssize_t n = 0;
  int err = 0;
  while ((n = ::read(fd, buf.data(), buf.size())) > 0) EVP_DigestUpdate(ctx, buf.data(), n);
  if (n < 0) err = errno;
  ::close(fd);
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_DigestFinal_ex(ctx, digest, &len);
  EVP_MD_CTX_free(ctx);
  if (err != 0) {
    return absl::FailedPreconditionError(absl::StrCat(field, ": dataset ", d.id,
                                                      " cannot be read (", d.path, ": ",
                                                      std::strerror(err), "); upload it again"));
  }
  static const char* hex = "0123456789abcdef";
  std::string got;
  for (unsigned int i = 0; i < len; ++i) {
    got.push_back(hex[digest[i] >> 4]);
    got.push_back(hex[digest[i] & 15]);
  }
  if (got != d.sha256) {
    return absl::FailedPreconditionError(absl::StrCat(
        field, ": dataset ", d.id, " is corrupt: the sha256 of ", d.path, " is ", got,
        ", recorded at upload ", d.sha256, "; upload it again"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReadDatasetBytes(const DatasetRecord& d, BlobStore* blobs,
                                             const std::string& cache_dir,
                                             absl::string_view field) {
  if (!IsBlobRef(d.path)) {
    absl::StatusOr<std::string> bytes = ReadFileToString(d.path);
    if (!bytes.ok()) {
      return absl::Status(bytes.status().code(), absl::StrCat(field, ": ", bytes.status().message()));
    }
    return bytes;
  }
  const std::string key = BlobKeyOf(d.path);
  if (blobs == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        field, ": dataset ", d.id, " is stored in a blob store (", d.path,
        ") and this server runs without one (--blob_store)"));
  }
  const fs::path cached = fs::path(cache_dir) / key;
  std::error_code ec;
  if (fs::is_regular_file(cached, ec)) {
    absl::StatusOr<std::string> bytes = ReadFileToString(cached.string());
    if (bytes.ok() && Sha256Hex(*bytes) == d.sha256) return bytes;
    fs::remove(cached, ec);  // a torn or rotten copy: fetch it again
  }
  absl::StatusOr<std::string> bytes = blobs->Get(key);
  if (!bytes.ok()) {
    return absl::FailedPreconditionError(absl::StrCat(field, ": dataset ", d.id, " cannot be read (",
                                                      bytes.status().message(),
                                                      "); upload it again"));
  }
  const std::string got = Sha256Hex(*bytes);
  if (got != d.sha256) {
    return absl::FailedPreconditionError(absl::StrCat(
        field, ": dataset ", d.id, " is corrupt: the sha256 of blob ", key, " is ", got,
        ", recorded at upload ", d.sha256, "; upload it again"));
  }
  fs::create_directories(cached.parent_path(), ec);
  // A copy that cannot be cached is still used.
  if (!ec) WriteFileAtomically(cached.string(), *bytes).IgnoreError();
  return bytes;
}

std::string Sha256Hex(const std::string& bytes) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_Digest(bytes.data(), bytes.size(), digest, &len, EVP_sha256(), nullptr);
  static const char* hex = "0123456789abcdef";
  std::string out;
  out.reserve(len * 2);
  for (unsigned int i = 0; i < len; ++i) {
    out.push_back(hex[digest[i] >> 4]);
    out.push_back(hex[digest[i] & 15]);
  }
  return out;
}

absl::StatusOr<std::unique_ptr<DatasetManager>> DatasetManager::Create(
    DatasetManagerOptions options, Store* store) {
  if (store == nullptr) return absl::InvalidArgumentError("DatasetManager: store is null");
  if (!options.parse)
    return absl::InvalidArgumentError("DatasetManager: parse function is required");
  if (options.data_dir.empty()) return absl::InvalidArgumentError("data_dir: must not be empty");
  if (options.max_upload_bytes <= 0) {
    return absl::InvalidArgumentError("max_upload_bytes: must be > 0");
  }
  std::error_code ec;
  fs::path dir = fs::path(options.data_dir) / "datasets";
  fs::create_directories(dir, ec);
  if (ec) {
    return absl::FailedPreconditionError(
        absl::StrCat("data_dir: cannot create ", dir.string(), ": ", ec.message()));
  }
  // Leftovers of uploads interrupted by a crash.
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    if (entry.path().filename().string().rfind(".tmp-", 0) == 0) fs::remove_all(entry.path(), ec);
  }
  return std::unique_ptr<DatasetManager>(new DatasetManager(std::move(options), store));
}

int64_t DatasetManager::Now() const {
  if (options_.now_unix_ms) return options_.now_unix_ms();
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

absl::StatusOr<DatasetRecord> DatasetManager::Upload(const DatasetUpload& header,
                                                     const std::string& bytes,
                                                     const Caller& caller) {
  RETURN_IF_ERROR(ValidateDatasetName(header.name, "header.name"));
  if (header.format != "tsv" && header.format != "csv" && header.format != "jsonl") {
    return absl::InvalidArgumentError(
        absl::StrCat("header.format: '", header.format, "' is not one of tsv, csv, jsonl"));
  }
  if (static_cast<int64_t>(bytes.size()) > options_.max_upload_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat("dataset '", header.name, "' is ", bytes.size(),
                     " bytes; the limit is max_upload_bytes=", options_.max_upload_bytes));
  }
  if (bytes.empty())
    return absl::InvalidArgumentError(absl::StrCat("dataset '", header.name, "' is empty"));
  if (options_.quotas) {
    const int64_t quota = options_.quotas(caller.tenant).max_dataset_bytes;
    if (quota > 0) {
      ASSIGN_OR_RETURN(const int64_t used, TenantDatasetBytes(caller.tenant));
      if (used + static_cast<int64_t>(bytes.size()) > quota) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "dataset '", header.name, "' (", bytes.size(), " bytes) would bring tenant '",
            caller.tenant, "' to ", used + static_cast<int64_t>(bytes.size()),
            " bytes; quota max_dataset_bytes=", quota));
      }
    }
  }
  ASSIGN_OR_RETURN(ParsedDatasetInfo info, options_.parse(bytes, header.spec_json));
  if (info.num_rows <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("dataset '", header.name, "' has no rows"));
  }
  if (!info.regression) {
    JobLimits limits;
    limits.max_labels_per_task = options_.max_labels_per_task;
    RETURN_IF_ERROR(ValidateLabelCount(static_cast<int64_t>(info.label_names.size()),
                                       absl::StrCat("dataset '", header.name, "' labels"), limits));
  }

  // Label names travel as JSON (the store's row) and as proto strings (the
  // API): both need UTF-8, so a file with a label that is not is refused here,
  // before anything is written (the JSON writer would throw on it).
  for (size_t i = 0; i < info.label_names.size(); ++i) {
    try {
      (void)nlohmann::json(info.label_names[i]).dump();
    } catch (const nlohmann::json::exception&) {
      return absl::InvalidArgumentError(absl::StrCat("dataset '", header.name, "' labels: label ",
                                                     i + 1, " is not valid UTF-8"));
    }
  }

  DatasetRecord d;
  d.id = NewId("ds");
  d.name = header.name;
  d.format = header.format;
  d.spec_json = header.spec_json;
  d.sha256 = Sha256Hex(bytes);
  d.num_rows = info.num_rows;
  d.size_bytes = static_cast<int64_t>(bytes.size());
  d.label_names = info.label_names;
  d.regression = info.regression;
  d.created_unix_ms = Now();
  d.tenant = caller.tenant;

  fs::path root = fs::path(options_.data_dir) / "datasets";
  fs::path tmp = root / (".tmp-" + d.id);
  fs::path final_dir = root / d.id;
  std::error_code ec;
  fs::create_directories(tmp, ec);
  if (ec)
    return absl::ErrnoToStatus(ec.value(), absl::StrCat("cannot create ", tmp.string()));
  const std::string file = "data." + d.format;
  // Durable before it is recorded: the file's bytes, its entry in the new
  // directory, then the rename in datasets/ (each fsynced).
  absl::Status st = WriteFileSynced(tmp / file, bytes);
  if (st.ok()) st = SyncDirectoryEntries(tmp);
  if (st.ok()) {
    fs::rename(tmp, final_dir, ec);
    if (ec)
      st = absl::ErrnoToStatus(ec.value(), absl::StrCat("cannot rename to ", final_dir.string()));
  }
  if (!st.ok()) {
    fs::remove_all(tmp, ec);
    return st;
  }
  st = SyncDirectoryEntries(root);
  if (!st.ok()) {
    fs::remove_all(final_dir, ec);
    return st;
  }
  d.path = (final_dir / file).string();
  std::string blob_key;
  if (options_.blobs != nullptr) {
    // Every replica reads it from the blob store; the file above is this
    // replica's cached copy. Stored before the record: nothing recorded is
    // missing.
    blob_key = absl::StrCat("datasets/", d.id, "/", file);
    st = options_.blobs->Put(blob_key, bytes);
    if (!st.ok()) {
      fs::remove_all(final_dir, ec);
      return absl::Status(st.code(), absl::StrCat("dataset '", header.name, "': ", st.message()));
    }
    d.path = BlobRef(blob_key);
  }
  st = store_->PutDataset(d);
  if (!st.ok()) {
    fs::remove_all(final_dir, ec);
    if (!blob_key.empty()) options_.blobs->Delete(blob_key).IgnoreError();
    return st;
  }
  return d;
}

absl::StatusOr<int64_t> DatasetManager::TenantDatasetBytes(const std::string& tenant) {
  ASSIGN_OR_RETURN(std::vector<DatasetRecord> all, store_->ListDatasets());
  int64_t used = 0;
  for (const auto& d : all) used += d.tenant == tenant ? d.size_bytes : 0;
  return used;
}

absl::StatusOr<UploadAllowance> DatasetManager::AllowanceFor(const Caller& caller) {
  UploadAllowance a;
  a.bytes = options_.max_upload_bytes;
  a.limit = "max_upload_bytes";
  a.explanation = absl::StrCat("max_upload_bytes=", options_.max_upload_bytes);
  if (options_.quotas) {
    const int64_t quota = options_.quotas(caller.tenant).max_dataset_bytes;
    if (quota > 0) {
      ASSIGN_OR_RETURN(const int64_t used, TenantDatasetBytes(caller.tenant));
      const int64_t left = std::max<int64_t>(0, quota - used);
      if (left == 0) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "tenant '", caller.tenant, "' has used ", used, " bytes of datasets; quota "
            "max_dataset_bytes=", quota));
      }
      if (left < a.bytes) {
        a.bytes = left;
        a.limit = "max_dataset_bytes";
        a.explanation = absl::StrCat("tenant '", caller.tenant, "' has ", left,
                                     " bytes left of quota max_dataset_bytes=", quota);
      }
    }
  }
  return a;
}

absl::StatusOr<DatasetRecord> DatasetManager::Get(const std::string& id, const Caller& caller) {
  auto d = store_->GetDataset(id);
  if (absl::IsNotFound(d.status()) || (d.ok() && !caller.CanSee(d->tenant))) {
    return NotFoundFor("dataset", id);
  }
  return d;
}

absl::StatusOr<std::vector<DatasetRecord>> DatasetManager::List(const Caller& caller) {
  ASSIGN_OR_RETURN(std::vector<DatasetRecord> all, store_->ListDatasets());
  if (caller.admin) return all;
  std::vector<DatasetRecord> mine;
  for (auto& d : all) {
    if (d.tenant == caller.tenant) mine.push_back(std::move(d));
  }
  return mine;
}

absl::Status DatasetManager::Delete(const std::string& id, const Caller& caller) {
  ASSIGN_OR_RETURN(DatasetRecord d, Get(id, caller));
  RETURN_IF_ERROR(store_->DeleteDataset(id));
  std::error_code ec;
  fs::path file = d.path;
  if (IsBlobRef(d.path)) {
    // The record is gone: the blob goes next (a failure leaves an orphan
    // object, never a record without bytes), then this replica's copy.
    // Other replicas' cached copies stay until their data directory goes.
    if (options_.blobs != nullptr) options_.blobs->Delete(BlobKeyOf(d.path)).IgnoreError();
    file = fs::path(options_.data_dir) / BlobKeyOf(d.path);
  }
  fs::path dir = file.parent_path();
  if (dir.filename() == d.id) fs::remove_all(dir, ec);  // only what Upload wrote
  return absl::OkStatus();
}

}  // namespace metatt
