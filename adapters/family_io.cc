#include "adapters/family_io.h"
#include "base/file_io.h"

#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "base/safetensors.h"
#include "base/status_macros.h"

namespace metatt {
namespace {

constexpr const char* kCoresFile = kFamilyCoresFile;
constexpr const char* kMetaFile = kFamilyMetaFile;


absl::Status EnsureDir(const std::string& dir) {
  struct stat st;
  if (::stat(dir.c_str(), &st) == 0) {
    if (S_ISDIR(st.st_mode)) return absl::OkStatus();
    return absl::FailedPreconditionError(absl::StrCat(dir, ": exists and is not a directory"));
  }
  if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST)
    return absl::InternalError(absl::StrCat(dir, ": mkdir failed: ", std::strerror(errno)));
  return absl::OkStatus();
}

}  // namespace

absl::Status SaveFamily(const std::string& dir, const MetaTTAdapter& adapter,
                        const std::vector<std::string>& task_names,
                        const std::map<std::string, torch::Tensor>& heads,
                        const std::string& base_model_id,
                        const std::string& base_config_fingerprint,
                        const nlohmann::json& extra) {
  if (!extra.is_null() && !extra.is_object())
    return absl::InvalidArgumentError("save family: extra must be a JSON object");
  if (static_cast<int64_t>(task_names.size()) != adapter.num_tasks())
    return absl::InvalidArgumentError(absl::StrCat("save family: ", task_names.size(),
                                                   " task names for ", adapter.num_tasks(),
                                                   " task slices"));
  std::set<std::string> seen;
  for (const auto& n : task_names) {
    if (n.empty()) return absl::InvalidArgumentError("save family: empty task name");
    if (!seen.insert(n).second)
      return absl::InvalidArgumentError(absl::StrCat("save family: task name '", n, "' repeats"));
  }
  std::map<std::string, torch::Tensor> tensors;
  for (const auto& [name, t] : adapter.NamedParameters())
    tensors["core." + name] = t.detach().cpu().contiguous();
  for (const auto& [name, t] : heads) {
    if (!t.defined())
      return absl::InvalidArgumentError(absl::StrCat("save family: head '", name, "' undefined"));
    tensors["head." + name] = t.detach().cpu().contiguous();
  }
  ASSIGN_OR_RETURN(std::string bytes, SerializeSafetensors(tensors));

  nlohmann::json j;
  j["format_version"] = kFamilyFormatVersion;
  j["config"] = adapter.config().ToJson();
  j["scale"] = adapter.scale();
  nlohmann::json tasks = nlohmann::json::array();
  for (size_t i = 0; i < task_names.size(); ++i)
    tasks.push_back({{"name", task_names[i]}, {"index", i}});
  j["tasks"] = tasks;
  std::vector<std::string> head_names;
  for (const auto& [name, t] : heads) head_names.push_back(name);
  j["heads"] = head_names;
  j["base_model_id"] = base_model_id;
  j["base_config_fingerprint"] = base_config_fingerprint;
  j["cores_file"] = kCoresFile;
  j["cores_bytes"] = bytes.size();
  j["cores_fnv1a64"] = Fnv1a64Hex(bytes);
  j["dtype"] = c10::toString(adapter.dtype());
  if (!extra.is_null()) j["extra"] = extra;

  RETURN_IF_ERROR(EnsureDir(dir));
  RETURN_IF_ERROR(WriteFileAtomically(dir + "/" + kCoresFile, bytes));
  RETURN_IF_ERROR(WriteFileAtomically(dir + "/" + kMetaFile, j.dump(2) + "\n"));
  return absl::OkStatus();
}

absl::StatusOr<LoadedFamily> LoadFamily(const std::string& dir,
                                        const std::string& expected_fingerprint,
                                        torch::Device device, MetaTTAdapter::Leaves leaves) {
  const std::string meta_path = dir + "/" + kMetaFile;
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(meta_path));
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  auto bad = [&](const std::string& f, const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat(meta_path, ": field '", f, "' ", why));
  };
  if (j.is_discarded() || !j.is_object())
    return absl::InvalidArgumentError(absl::StrCat(meta_path, ": not valid JSON"));
  if (!j.contains("format_version") || !j["format_version"].is_number_integer())
    return bad("format_version", "is missing");
  if (j["format_version"].get<int>() != kFamilyFormatVersion)
    return absl::FailedPreconditionError(
        absl::StrCat(meta_path, ": format_version ", j["format_version"].get<int>(),
                     " is not supported (this build reads ", kFamilyFormatVersion, ")"));
  for (const char* f : {"base_model_id", "base_config_fingerprint", "cores_fnv1a64"})
    if (!j.contains(f) || !j[f].is_string()) return bad(f, "must be a string");
  if (!j.contains("cores_bytes") || !j["cores_bytes"].is_number_unsigned())
    return bad("cores_bytes", "must be a non-negative integer");
  if (!j.contains("scale") || !j["scale"].is_number()) return bad("scale", "must be a number");
  if (!j.contains("config")) return bad("config", "is missing");
  if (j.contains("extra") && !j["extra"].is_object()) return bad("extra", "must be an object");
  LoadedFamily out;
  if (j.contains("extra")) out.extra = j["extra"];
  out.base_model_id = j["base_model_id"].get<std::string>();
  out.base_config_fingerprint = j["base_config_fingerprint"].get<std::string>();
  if (!expected_fingerprint.empty() && out.base_config_fingerprint != expected_fingerprint)
    return absl::FailedPreconditionError(absl::StrCat(
        "family ", dir, " was trained on base config fingerprint '", out.base_config_fingerprint,
        "' but the loaded base model has fingerprint '", expected_fingerprint, "'"));
  auto cfg_or = MetaTTConfig::FromJson(j["config"]);
  if (!cfg_or.ok())
    return absl::InvalidArgumentError(absl::StrCat(meta_path, ": ", cfg_or.status().message()));
  MetaTTConfig config = *cfg_or;

  if (!j.contains("tasks") || !j["tasks"].is_array()) return bad("tasks", "must be a list");
  for (size_t i = 0; i < j["tasks"].size(); ++i) {
    const auto& t = j["tasks"][i];
    if (!t.is_object() || !t.contains("name") || !t["name"].is_string() || !t.contains("index") ||
        !t["index"].is_number_integer() || t["index"].get<size_t>() != i)
      return bad("tasks", absl::StrCat("entry ", i, " needs a name and index ", i));
    out.task_names.push_back(t["name"].get<std::string>());
  }
  if (config.form == TTForm::k4Plus1D &&
      static_cast<int64_t>(out.task_names.size()) != config.num_tasks)
    return bad("tasks", absl::StrCat("lists ", out.task_names.size(), " tasks, config has ",
                                     config.num_tasks));

  const std::string cores_path = dir + "/" + kCoresFile;
  ASSIGN_OR_RETURN(std::string bytes, ReadFileToString(cores_path));
  if (bytes.size() != j["cores_bytes"].get<uint64_t>())
    return absl::DataLossError(absl::StrCat(cores_path, ": size ", bytes.size(),
                                            " differs from the recorded ",
                                            j["cores_bytes"].get<uint64_t>()));
  if (Fnv1a64Hex(bytes) != j["cores_fnv1a64"].get<std::string>())
    return absl::DataLossError(absl::StrCat(cores_path, ": content hash differs from family.json"));
  ASSIGN_OR_RETURN(SafetensorsFile file, ParseSafetensors(bytes, cores_path));

  std::map<std::string, torch::Tensor> cores;
  std::set<std::string> expected_heads;
  if (j.contains("heads") && j["heads"].is_array())
    for (const auto& h : j["heads"])
      if (h.is_string()) expected_heads.insert(h.get<std::string>());
  for (auto& [name, t] : file.tensors) {
    if (absl::StartsWith(name, "core.")) {
      cores[name.substr(5)] = t;
    } else if (absl::StartsWith(name, "head.")) {
      const std::string h = name.substr(5);
      if (!expected_heads.count(h))
        return absl::InvalidArgumentError(
            absl::StrCat(cores_path, ": tensor '", name, "' is not listed in family.json heads"));
      out.heads[h] = t.to(device);
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat(cores_path, ": unexpected tensor '", name, "'"));
    }
  }
  for (const auto& h : expected_heads)
    if (!out.heads.count(h))
      return absl::InvalidArgumentError(
          absl::StrCat(cores_path, ": head tensor 'head.", h, "' is missing"));
  auto expected = MetaTTAdapter::ExpectedShapes(config);
  for (const auto& [name, t] : cores)
    if (!expected.count(name))
      return absl::InvalidArgumentError(
          absl::StrCat(cores_path, ": unexpected tensor 'core.", name, "'"));
  auto adapter_or =
      MetaTTAdapter::FromTensors(config, j["scale"].get<double>(), cores, device, leaves);
  if (!adapter_or.ok())
    return absl::InvalidArgumentError(
        absl::StrCat(cores_path, ": ", adapter_or.status().message()));
  out.adapter = std::move(*adapter_or);
  // Stacked heads must agree with each other and with the task list.
  auto sw = out.heads.find("stacked.weight");
  auto sb = out.heads.find("stacked.bias");
  auto sn = out.heads.find("stacked.num_labels");
  const int present = (sw != out.heads.end()) + (sb != out.heads.end()) + (sn != out.heads.end());
  if (present != 0) {
    if (present != 3)
      return absl::InvalidArgumentError(absl::StrCat(
          cores_path, ": stacked heads need head.stacked.{weight,bias,num_labels} together"));
    const torch::Tensor &w = sw->second, &b = sb->second, &n = sn->second;
    if (w.dim() != 3 || b.dim() != 2 || n.dim() != 1 || n.scalar_type() != torch::kInt64 ||
        b.size(0) != w.size(0) || b.size(1) != w.size(1) || n.size(0) != w.size(0) ||
        w.size(0) > static_cast<int64_t>(out.task_names.size()))
      return absl::InvalidArgumentError(
          absl::StrCat(cores_path, ": stacked heads have inconsistent shapes"));
    torch::Tensor nc = n.cpu();
    if (nc.numel() > 0 && (nc.min().item<int64_t>() < 1 || nc.max().item<int64_t>() > w.size(1)))
      return absl::InvalidArgumentError(
          absl::StrCat(cores_path, ": head.stacked.num_labels outside [1, ", w.size(1), "]"));
  }
  return out;
}

absl::StatusOr<std::pair<torch::Tensor, torch::Tensor>> FamilyTaskHead(const LoadedFamily& family,
                                                                       int64_t t) {
  if (t < 0 || t >= static_cast<int64_t>(family.task_names.size()))
    return absl::OutOfRangeError(absl::StrCat("task ", t, " outside [0, ",
                                              family.task_names.size(), ")"));
  const std::string& name = family.task_names[t];
  auto w = family.heads.find(name + ".weight");
  auto b = family.heads.find(name + ".bias");
  if (w != family.heads.end() && b != family.heads.end()) return std::make_pair(w->second, b->second);
  auto sw = family.heads.find("stacked.weight");
  auto sb = family.heads.find("stacked.bias");
  auto sn = family.heads.find("stacked.num_labels");
  if (sw != family.heads.end() && sb != family.heads.end() && sn != family.heads.end() &&
      t < sw->second.size(0)) {
    const int64_t n = sn->second[t].item<int64_t>();
    return std::make_pair(sw->second[t].narrow(0, 0, n), sb->second[t].narrow(0, 0, n));
  }
  return absl::NotFoundError(absl::StrCat("family has no head for task '", name, "'"));
}

}  // namespace metatt
