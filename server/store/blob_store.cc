#include "server/store/blob_store.h"

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <system_error>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "base/file_io.h"
#include "base/status_macros.h"

namespace metatt {
namespace fs = std::filesystem;

namespace {

constexpr size_t kMaxKeyLength = 1024;

bool IsKeyChar(char c) {
  return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.' ||
         c == '~' || c == '+' || c == '=';
}

// Creates the directories above `file` that do not exist yet, each made
// durable by an fsync of its parent (a new directory is an entry of it).
absl::Status CreateParentsDurably(const fs::path& root, const fs::path& file) {
  std::vector<fs::path> missing;
  std::error_code ec;
  for (fs::path d = file.parent_path(); !d.empty() && d != root && !fs::exists(d, ec);
       d = d.parent_path()) {
    missing.push_back(d);
  }
  std::reverse(missing.begin(), missing.end());
  for (const fs::path& d : missing) {
    fs::create_directory(d, ec);
    if (ec && !fs::is_directory(d)) {
      return absl::InternalError(absl::StrCat("cannot create ", d.string(), ": ", ec.message()));
    }
    RETURN_IF_ERROR(SyncDirectory(d.parent_path().string()));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateBlobKey(const std::string& key) {
  auto bad = [&](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat("blob key '", key, "': ", why));
  };
  if (key.empty() || key.size() > kMaxKeyLength) {
    return bad(absl::StrCat("must be 1-", kMaxKeyLength, " characters"));
  }
  for (absl::string_view seg : absl::StrSplit(key, '/')) {
    if (seg.empty() || seg == "." || seg == "..") {
      return bad("has an empty, '.' or '..' segment (or a leading or doubled '/')");
    }
    if (absl::StrContains(seg, ".tmp.")) return bad("a segment may not hold '.tmp.'");
    for (char c : seg) {
      if (!IsKeyChar(c)) {
        return bad("only letters, digits, '-', '_', '.', '~', '+', '=' and '/' are allowed");
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<LocalBlobStore>> LocalBlobStore::Create(const std::string& root) {
  if (root.empty()) return absl::InvalidArgumentError("blob store: the directory is empty");
  std::error_code ec;
  fs::create_directories(root, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", root, ": ", ec.message()));
  std::string r = root;
  while (r.size() > 1 && r.back() == '/') r.pop_back();
  return std::unique_ptr<LocalBlobStore>(new LocalBlobStore(r));
}

absl::Status LocalBlobStore::Put(const std::string& key, const std::string& bytes,
                                 const std::string& fence_job) {
  (void)fence_job;  // one process owns a directory store: nothing to fence
  RETURN_IF_ERROR(ValidateBlobKey(key));
  const fs::path file = PathOf(key);
  RETURN_IF_ERROR(CreateParentsDurably(root_, file));
  absl::Status st = WriteFileAtomically(file.string(), bytes);
  if (!st.ok()) {
    return absl::Status(st.code(), absl::StrCat("blob ", key, ": ", st.message()));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> LocalBlobStore::Get(const std::string& key) {
  RETURN_IF_ERROR(ValidateBlobKey(key));
  std::error_code ec;
  if (!fs::is_regular_file(PathOf(key), ec)) {
    return absl::NotFoundError(absl::StrCat("blob ", key, " not found in ", Describe()));
  }
  absl::StatusOr<std::string> bytes = ReadFileToString(PathOf(key));
  if (!bytes.ok()) {
    return absl::Status(bytes.status().code(),
                        absl::StrCat("blob ", key, ": ", bytes.status().message()));
  }
  return bytes;
}

absl::StatusOr<bool> LocalBlobStore::Exists(const std::string& key) {
  RETURN_IF_ERROR(ValidateBlobKey(key));
  std::error_code ec;
  return fs::is_regular_file(PathOf(key), ec);
}

absl::StatusOr<std::vector<std::string>> LocalBlobStore::List(const std::string& prefix) {
  // Walk only the deepest directory the prefix names.
  const size_t slash = prefix.find_last_of('/');
  const std::string dir_part = slash == std::string::npos ? "" : prefix.substr(0, slash);
  const fs::path start = dir_part.empty() ? fs::path(root_) : fs::path(PathOf(dir_part));
  std::vector<std::string> out;
  std::error_code ec;
  if (!fs::is_directory(start, ec)) return out;
  const size_t root_len = root_.size() + 1;
  for (auto it = fs::recursive_directory_iterator(start, ec);
       !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
    if (!it->is_regular_file(ec)) continue;
    const std::string path = it->path().string();
    if (path.size() <= root_len) continue;
    std::string key = path.substr(root_len);
    if (!absl::StartsWith(key, prefix) || !ValidateBlobKey(key).ok()) continue;  // scratch files
    out.push_back(std::move(key));
  }
  if (ec) return absl::InternalError(absl::StrCat("cannot list ", start.string(), ": ", ec.message()));
  std::sort(out.begin(), out.end());
  return out;
}

absl::Status LocalBlobStore::Delete(const std::string& key) {
  RETURN_IF_ERROR(ValidateBlobKey(key));
  const fs::path file = PathOf(key);
  std::error_code ec;
  if (!fs::remove(file, ec)) {
    if (ec) return absl::InternalError(absl::StrCat("cannot delete blob ", key, ": ", ec.message()));
    return absl::OkStatus();
  }
  return SyncDirectory(file.parent_path().string());
}

absl::Status FetchBlobToFile(BlobStore* blobs, const std::string& key, const std::string& path,
                             bool* downloaded) {
  if (downloaded != nullptr) *downloaded = false;
  std::error_code ec;
  if (fs::is_regular_file(path, ec)) return absl::OkStatus();
  ASSIGN_OR_RETURN(std::string bytes, blobs->Get(key));
  const fs::path file(path);
  if (file.has_parent_path()) {
    fs::create_directories(file.parent_path(), ec);
    if (ec) {
      return absl::InternalError(
          absl::StrCat("cannot create ", file.parent_path().string(), ": ", ec.message()));
    }
  }
  RETURN_IF_ERROR(WriteFileAtomically(path, bytes));
  if (downloaded != nullptr) *downloaded = true;
  return absl::OkStatus();
}

}  // namespace metatt
