#include "server/registry/family_catalog.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <random>
#include <vector>
#include <system_error>
#include <utility>

#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "base/file_io.h"
#include "base/safetensors.h"
#include "base/status_macros.h"

namespace metatt {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr int kAppendedFormatVersion = 1;

// "<host>-<pid>": names this process's scratch directories, so a restart can
// tell its own crash leftovers from another replica's publication in progress
// (several replicas may share --data_dir).
std::string ScratchOwner() {
  char host[256] = {0};
  if (::gethostname(host, sizeof(host) - 1) != 0) host[0] = 0;
  return absl::StrCat(host, "-", ::getpid());
}

// Scratch directories (".tmp-v<N>-<host>-<pid>" in a family directory,
// ".import-<host>-<pid>-<seq>" in families/) left by a process that died:
// same host and the pid is gone, or (another host, or an older name) not
// touched for an hour. Removed at start-up; never listed or loaded.
void RemoveCrashLeftovers(const fs::path& families) {
  std::error_code ec;
  char host[256] = {0};
  if (::gethostname(host, sizeof(host) - 1) != 0) host[0] = 0;
  const std::string prefix = absl::StrCat(host, "-");
  // rest = "<host>-<pid>" (with_seq: "<host>-<pid>-<seq>").
  auto stale = [&](const fs::path& p, const std::string& rest, bool with_seq) {
    if (host[0] != 0 && rest.rfind(prefix, 0) == 0 && rest.size() > prefix.size() &&
        std::isdigit(static_cast<unsigned char>(rest[prefix.size()]))) {
      char* end = nullptr;
      const long pid = std::strtol(rest.c_str() + prefix.size(), &end, 10);
      bool mine = *end == 0 && !with_seq;
      if (with_seq && *end == '-' && end[1] != 0) {
        const char* seq = end + 1;
        mine = std::all_of(seq, rest.c_str() + rest.size(),
                           [](char c) { return std::isdigit(static_cast<unsigned char>(c)); });
      }
      if (mine) {
        return pid == ::getpid() ||
               (::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH);
      }
    }
    auto t = fs::last_write_time(p, ec);
    return !ec && fs::file_time_type::clock::now() - t > std::chrono::hours(1);
  };
  for (const auto& fam : fs::directory_iterator(families, ec)) {
    const std::string name = fam.path().filename().string();
    if (name.rfind(".import-", 0) == 0) {
      if (stale(fam.path(), name.substr(8), true)) fs::remove_all(fam.path(), ec);
      continue;
    }
    if (!fam.is_directory(ec)) continue;
    for (const auto& e : fs::directory_iterator(fam.path(), ec)) {
      const std::string n = e.path().filename().string();
      if (n.rfind(".tmp-v", 0) != 0) continue;
      const size_t dash = n.find('-', 6);  // after ".tmp-v<N>"
      if (dash == std::string::npos) continue;
      std::string rest = n.substr(dash + 1);
      // A blob-store version's scratch: ".tmp-v<N>-<16 hex>-<host>-<pid>".
      if (rest.size() > 17 && rest[16] == '-' &&
          std::all_of(rest.begin(), rest.begin() + 16,
                      [](char c) { return std::isxdigit(static_cast<unsigned char>(c)); })) {
        rest = rest.substr(17);
      }
      if (stale(e.path(), rest, false)) {
        fs::remove_all(e.path(), ec);
      }
    }
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<FamilyCatalog>> FamilyCatalog::Create(const std::string& data_dir,
                                                                     BlobStore* blobs) {
  if (data_dir.empty()) return absl::InvalidArgumentError("registry: data_dir is empty");
  const fs::path families = fs::path(data_dir) / "families";
  std::error_code ec;
  fs::create_directories(families, ec);
  if (ec) {
    return absl::InternalError(
        absl::StrCat("cannot create ", families.string(), ": ", ec.message()));
  }
  RemoveCrashLeftovers(families);
  return std::unique_ptr<FamilyCatalog>(new FamilyCatalog(data_dir, families.string(), blobs));
}

std::string FamilyCatalog::VersionDir(const std::string& family, int64_t version) const {
  return (fs::path(families_) / family / absl::StrCat("v", version)).string();
}

std::string FamilyCatalog::NewVersionPath(const std::string& family, int64_t version) const {
  if (blobs_ == nullptr) return VersionDir(family, version);
  static std::mutex mu;
  static std::mt19937_64 rng{std::random_device{}()};
  uint64_t r;
  {
    std::lock_guard<std::mutex> l(mu);
    r = rng();
  }
  return BlobRef(absl::StrFormat("families/%s/v%d-%016x", family, version, r));
}

std::string FamilyCatalog::LocalDir(const std::string& path) const {
  if (!IsBlobRef(path)) return path;
  return (fs::path(data_dir_) / BlobKeyOf(path)).string();
}

namespace {

// Metadata files (the commit points) go last.
void MetadataLast(std::vector<std::string>* names) {
  std::stable_sort(names->begin(), names->end(), [](const std::string& a, const std::string& b) {
    const bool ja = absl::EndsWith(a, ".json"), jb = absl::EndsWith(b, ".json");
    return ja != jb ? jb : a < b;
  });
}

}  // namespace

absl::StatusOr<std::string> FamilyCatalog::Fetch(const std::string& path) {
  const std::string dir = LocalDir(path);
  if (blobs_ == nullptr || !IsBlobRef(path)) return dir;
  const std::string key = BlobKeyOf(path);
  ASSIGN_OR_RETURN(std::vector<std::string> keys, blobs_->List(key + "/"));
  if (keys.empty()) {
    return absl::NotFoundError(absl::StrCat("version files ", key, "/ not found in the blob store (",
                                            blobs_->Describe(), ")"));
  }
  std::vector<std::string> names;
  for (const std::string& k : keys) names.push_back(k.substr(key.size() + 1));
  MetadataLast(&names);
  bool any = false;
  for (const std::string& name : names) {
    bool downloaded = false;
    RETURN_IF_ERROR(FetchBlobToFile(blobs_, key + "/" + name, dir + "/" + name, &downloaded));
    any |= downloaded;
  }
  if (any) {
    // The cache's new entries are durable like a published version's.
    RETURN_IF_ERROR(SyncDirectory(dir));
    RETURN_IF_ERROR(SyncDirectory(fs::path(dir).parent_path().string()));
  }
  return dir;
}

bool FamilyCatalog::VersionHoldsFullFamily(const std::string& path) {
  if (HoldsFullFamily(LocalDir(path))) return true;
  if (blobs_ == nullptr || !IsBlobRef(path)) return false;
  auto exists = blobs_->Exists(BlobKeyOf(path) + "/family.json");
  return exists.ok() && *exists;
}

absl::Status FamilyCatalog::UploadNewFiles(const std::string& path) {
  if (blobs_ == nullptr || !IsBlobRef(path)) return absl::OkStatus();
  const std::string key = BlobKeyOf(path);
  const std::string dir = LocalDir(path);
  ASSIGN_OR_RETURN(std::vector<std::string> have, blobs_->List(key + "/"));
  std::vector<std::string> names;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (!e.is_regular_file(ec) || !ValidateBlobKey(name).ok()) continue;  // scratch files
    if (std::find(have.begin(), have.end(), key + "/" + name) == have.end()) names.push_back(name);
  }
  if (ec) return absl::InternalError(absl::StrCat("cannot list ", dir, ": ", ec.message()));
  MetadataLast(&names);
  for (const std::string& name : names) {
    ASSIGN_OR_RETURN(std::string bytes, ReadFileToString(dir + "/" + name));
    RETURN_IF_ERROR(blobs_->Put(key + "/" + name, bytes));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> FamilyCatalog::WriteVersion(
    const std::string& path, const std::function<absl::Status(const std::string& dir)>& write,
    const std::function<absl::Status()>& before_commit) {
  const fs::path final_dir = LocalDir(path);
  const fs::path family_dir = final_dir.parent_path();
  const fs::path tmp_dir =
      family_dir / absl::StrCat(".tmp-", final_dir.filename().string(), "-", ScratchOwner());
  std::error_code ec;
  fs::remove_all(tmp_dir, ec);
  fs::create_directories(tmp_dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", tmp_dir.string()));
  absl::Status st = write(tmp_dir.string());
  if (st.ok()) st = before_commit();
  std::vector<std::string> uploaded;
  if (st.ok() && blobs_ != nullptr && IsBlobRef(path)) {
    // Every object before the Store's row names the version: data first,
    // metadata last.
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(tmp_dir, ec)) {
      if (e.is_regular_file()) names.push_back(e.path().filename().string());
    }
    if (ec || names.empty()) {
      st = absl::InternalError(absl::StrCat("cannot list the files of ", tmp_dir.string(), ": ",
                                            ec ? ec.message() : "none written"));
    }
    MetadataLast(&names);
    for (const std::string& name : st.ok() ? names : std::vector<std::string>{}) {
      const std::string key = BlobKeyOf(path) + "/" + name;
      absl::StatusOr<std::string> bytes = ReadFileToString((tmp_dir / name).string());
      st = bytes.ok() ? blobs_->Put(key, *bytes) : bytes.status();
      if (!st.ok()) break;
      uploaded.push_back(key);
    }
  }
  if (st.ok()) {
    fs::remove_all(final_dir, ec);  // a leftover of a crash before the Store knew it
    fs::rename(tmp_dir, final_dir, ec);
    if (ec) {
      st = absl::InternalError(absl::StrCat("rename to ", final_dir.string(), ": ", ec.message()));
    }
  }
  if (st.ok()) st = SyncDirectory(family_dir.string());  // the rename is durable
  // A new family's directory is an entry of families/: durable only once
  // families/ is fsynced too (found by tests/chaos/powerloss.py: without it
  // a power cut took back whole acknowledged imports).
  if (st.ok()) st = SyncDirectory(families_);
  if (!st.ok()) {
    fs::remove_all(tmp_dir, ec);
    fs::remove_all(final_dir, ec);
    for (const std::string& key : uploaded) blobs_->Delete(key).IgnoreError();
    return st;
  }
  return final_dir.string();
}

void FamilyCatalog::RemoveVersion(const std::string& path, const absl::Status& refusal) {
  std::error_code ec;
  fs::remove_all(LocalDir(path), ec);
  if (blobs_ == nullptr || !IsBlobRef(path)) return;
  if (!absl::IsFailedPrecondition(refusal) && !absl::IsAlreadyExists(refusal) &&
      !absl::IsInvalidArgument(refusal) && !absl::IsNotFound(refusal)) {
    return;
  }
  auto keys = blobs_->List(BlobKeyOf(path) + "/");
  if (!keys.ok()) return;
  for (const std::string& key : *keys) blobs_->Delete(key).IgnoreError();
}

absl::Status FamilyCatalog::WriteAppended(const std::string& dir, const AppendedTensors& t) {
  const int64_t k = t.task_slices.defined() ? t.task_slices.size(0) : 0;
  if (k == 0 || !t.head_weight.defined() || t.head_weight.dim() != 3 ||
      t.head_weight.size(0) != k || !t.head_bias.defined() || t.head_bias.dim() != 2 ||
      t.head_bias.size(0) != k || t.head_bias.size(1) != t.head_weight.size(1)) {
    return absl::InvalidArgumentError("appended version: k task slices and k heads are required");
  }
  ASSIGN_OR_RETURN(std::string bytes, SerializeSafetensors({{"task_slices", t.task_slices},
                                                            {"head.weight", t.head_weight},
                                                            {"head.bias", t.head_bias}}));
  RETURN_IF_ERROR(WriteFileAtomically(dir + "/" + kAppendedTensorsFile, bytes));
  json meta = {{"format_version", kAppendedFormatVersion},
               {"parent_version", t.parent_version},
               {"tasks", k},
               {"size", bytes.size()},
               {"fnv1a64", Fnv1a64Hex(bytes)}};
  return WriteFileAtomically(dir + "/" + kAppendedMetaFile, meta.dump(2) + "\n");
}

absl::StatusOr<AppendedTensors> FamilyCatalog::ReadAppended(const std::string& dir) {
  const std::string meta_path = dir + "/" + kAppendedMetaFile;
  const std::string tensors_path = dir + "/" + kAppendedTensorsFile;
  ASSIGN_OR_RETURN(std::string meta_bytes, ReadFileToString(meta_path));
  json meta = json::parse(meta_bytes, nullptr, /*allow_exceptions=*/false);
  if (meta.is_discarded() || !meta.is_object() || !meta.contains("parent_version") ||
      !meta["parent_version"].is_number_integer() || !meta.contains("fnv1a64") ||
      !meta["fnv1a64"].is_string() || !meta.contains("tasks") ||
      !meta["tasks"].is_number_integer()) {
    return absl::DataLossError(absl::StrCat(meta_path, ": malformed (parent_version, tasks, "
                                            "fnv1a64 are required)"));
  }
  if (meta.value("format_version", 0) != kAppendedFormatVersion) {
    return absl::FailedPreconditionError(
        absl::StrCat(meta_path, ": format_version ", meta.value("format_version", 0),
                     " is not ", kAppendedFormatVersion));
  }
  ASSIGN_OR_RETURN(std::string bytes, ReadFileToString(tensors_path));
  if (Fnv1a64Hex(bytes) != meta["fnv1a64"].get<std::string>()) {
    return absl::DataLossError(absl::StrCat(tensors_path, ": hash does not match ", meta_path));
  }
  ASSIGN_OR_RETURN(SafetensorsFile file, ParseSafetensors(bytes, tensors_path));
  AppendedTensors t;
  t.parent_version = meta["parent_version"].get<int64_t>();
  for (const char* name : {"task_slices", "head.weight", "head.bias"}) {
    if (!file.tensors.count(name)) {
      return absl::DataLossError(absl::StrCat(tensors_path, ": tensor '", name, "' is missing"));
    }
  }
  t.task_slices = file.tensors["task_slices"];
  t.head_weight = file.tensors["head.weight"];
  t.head_bias = file.tensors["head.bias"];
  const int64_t k = meta["tasks"].get<int64_t>();
  if (t.task_slices.dim() != 3 || t.task_slices.size(0) != k || t.head_weight.dim() != 3 ||
      t.head_weight.size(0) != k || t.head_bias.dim() != 2 || t.head_bias.size(0) != k) {
    return absl::DataLossError(
        absl::StrCat(tensors_path, ": tensor shapes do not hold ", k, " tasks"));
  }
  return t;
}

bool FamilyCatalog::HoldsFullFamily(const std::string& dir) {
  std::error_code ec;
  return fs::exists(fs::path(dir) / "family.json", ec);
}

absl::StatusOr<std::string> FamilyCatalog::MakeImportScratch() {
  static std::atomic<int64_t> import_seq{0};
  const fs::path scratch =
      fs::path(families_) / absl::StrCat(".import-", ScratchOwner(), "-", import_seq++);
  std::error_code ec;
  fs::remove_all(scratch, ec);
  fs::create_directories(scratch, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", scratch.string()));
  return scratch.string();
}

}  // namespace metatt
