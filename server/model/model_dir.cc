#include "server/model/model_dir.h"

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <vector>

#include "absl/strings/str_cat.h"

namespace metatt {
namespace {

constexpr char kDefaultRelative[] = "models/all-MiniLM-L6-v2";

bool HasModel(const std::filesystem::path& p) {
  std::error_code ec;
  return std::filesystem::exists(p / "config.json", ec) &&
         std::filesystem::exists(p / "model.safetensors", ec);
}

// The working directory and the running binary's folder with up to four of
// its parents (<repo>/build*/<sub>/binary), each joined with `relative`.
std::vector<std::filesystem::path> RepoCandidates(const std::string& relative) {
  namespace fs = std::filesystem;
  std::vector<fs::path> candidates = {fs::current_path() / relative};
  std::error_code ec;
  fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    fs::path dir = exe.parent_path();
    for (int i = 0; i < 4 && !dir.empty(); ++i, dir = dir.parent_path())
      candidates.push_back(dir / relative);
  }
  return candidates;
}

}  // namespace

absl::StatusOr<std::string> ResolveSharedDir() {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (const char* env = std::getenv("METATT_SHARED_DIR"); env != nullptr && *env) {
    if (!fs::is_directory(fs::path(env) / "data", ec))
      return absl::NotFoundError(absl::StrCat("METATT_SHARED_DIR=", env, ": no data/ folder there"));
    return std::string(env);
  }
  for (const auto& c : RepoCandidates("../shared"))
    if (fs::is_directory(c / "data", ec)) return fs::canonical(c, ec).string();
  return absl::NotFoundError(
      "no shared data found: set METATT_SHARED_DIR (the folder holding data/glue) or keep "
      "shared/ beside the repository");
}

absl::StatusOr<std::string> ResolveModelDir(const std::string& flag_value) {
  namespace fs = std::filesystem;
  if (!flag_value.empty()) {
    if (!HasModel(flag_value))
      return absl::NotFoundError(absl::StrCat("--model_dir=", flag_value,
                                              ": no config.json + model.safetensors there"));
    return flag_value;
  }
  if (const char* env = std::getenv("METATT_MODEL_DIR"); env != nullptr && *env) {
    if (!HasModel(env))
      return absl::NotFoundError(absl::StrCat("METATT_MODEL_DIR=", env,
                                              ": no config.json + model.safetensors there"));
    return std::string(env);
  }
  std::error_code ec;
  for (const auto& c : RepoCandidates(kDefaultRelative))
    if (HasModel(c)) return fs::canonical(c, ec).string();
  return absl::NotFoundError(
      "no base model found: pass --model_dir, set METATT_MODEL_DIR, or run scripts/setup.sh "
      "(which prepares models/all-MiniLM-L6-v2)");
}

}  // namespace metatt
