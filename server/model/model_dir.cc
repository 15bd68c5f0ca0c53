#include "server/model/model_dir.h"

#include <unistd.h>

#include <cstdlib>
#include <filesystem>

#include "absl/strings/str_cat.h"

namespace metatt {
namespace {

constexpr char kDefaultRelative[] = "models/all-MiniLM-L6-v2";

bool HasModel(const std::filesystem::path& p) {
  std::error_code ec;
  return std::filesystem::exists(p / "config.json", ec) &&
         std::filesystem::exists(p / "model.safetensors", ec);
}

}  // namespace

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
  std::vector<fs::path> candidates = {fs::current_path() / kDefaultRelative};
  std::error_code ec;
  fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    // <repo>/build*/<sub>/binary -> walk up to four levels.
    fs::path dir = exe.parent_path();
    for (int i = 0; i < 4 && !dir.empty(); ++i, dir = dir.parent_path())
      candidates.push_back(dir / kDefaultRelative);
  }
  for (const auto& c : candidates)
    if (HasModel(c)) return fs::canonical(c, ec).string();
  return absl::NotFoundError(
      "no base model found: pass --model_dir, set METATT_MODEL_DIR, or run scripts/setup.sh "
      "(which prepares models/all-MiniLM-L6-v2)");
}

}  // namespace metatt
