#include "adapters/family_io.h"
#include "base/file_io.h"

#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "adapters/peft_modules.h"
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

// The meta.json fields both family formats (MetaTT, LoRA) write alike: the
// format version, the adapter's config and scale, the tasks in index order,
// the head tensors' names, the base model and `extra` (when given).
nlohmann::json FamilyMeta(nlohmann::json config, double scale,
                          const std::vector<std::string>& task_names,
                          const std::map<std::string, torch::Tensor>& heads,
                          const std::string& base_model_id,
                          const std::string& base_config_fingerprint,
                          const nlohmann::json& extra) {
  nlohmann::json j;
  j["format_version"] = kFamilyFormatVersion;
  j["config"] = std::move(config);
  j["scale"] = scale;
  nlohmann::json tasks = nlohmann::json::array();
  for (size_t i = 0; i < task_names.size(); ++i)
    tasks.push_back({{"name", task_names[i]}, {"index", i}});
  j["tasks"] = tasks;
  std::vector<std::string> head_names;
  for (const auto& [name, t] : heads) head_names.push_back(name);
  j["heads"] = head_names;
  j["base_model_id"] = base_model_id;
  j["base_config_fingerprint"] = base_config_fingerprint;
  if (!extra.is_null()) j["extra"] = extra;
  return j;
}

// INVALID_ARGUMENT "<meta.json path>: field '<f>' <why>".
absl::Status BadField(const std::string& meta_path, const std::string& f, const std::string& why) {
  return absl::InvalidArgumentError(absl::StrCat(meta_path, ": field '", f, "' ", why));
}

// meta.json read and checked as far as both family formats agree: a JSON
// object written in this build's format_version.
absl::StatusOr<nlohmann::json> ReadFamilyMeta(const std::string& meta_path) {
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(meta_path));
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object())
    return absl::InvalidArgumentError(absl::StrCat(meta_path, ": not valid JSON"));
  if (!j.contains("format_version") || !j["format_version"].is_number_integer())
    return BadField(meta_path, "format_version", "is missing");
  if (j["format_version"].get<int>() != kFamilyFormatVersion)
    return absl::FailedPreconditionError(
        absl::StrCat(meta_path, ": format_version ", j["format_version"].get<int>(),
                     " is not supported (this build reads ", kFamilyFormatVersion, ")"));
  return j;
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

  nlohmann::json j = FamilyMeta(adapter.config().ToJson(), adapter.scale(), task_names, heads,
                                base_model_id, base_config_fingerprint, extra);
  j["cores_file"] = kCoresFile;
  j["cores_bytes"] = bytes.size();
  j["cores_fnv1a64"] = Fnv1a64Hex(bytes);
  j["dtype"] = c10::toString(adapter.dtype());

  RETURN_IF_ERROR(EnsureDir(dir));
  RETURN_IF_ERROR(WriteFileAtomically(dir + "/" + kCoresFile, bytes));
  RETURN_IF_ERROR(WriteFileAtomically(dir + "/" + kMetaFile, j.dump(2) + "\n"));
  return absl::OkStatus();
}

absl::StatusOr<LoadedFamily> LoadFamily(const std::string& dir,
                                        const std::string& expected_fingerprint,
                                        torch::Device device, MetaTTAdapter::Leaves leaves) {
  const std::string meta_path = dir + "/" + kMetaFile;
  ASSIGN_OR_RETURN(nlohmann::json j, ReadFamilyMeta(meta_path));
  auto bad = [&](const std::string& f, const std::string& why) {
    return BadField(meta_path, f, why);
  };
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
    // 0: a task without a head (a generation task on a decoder; the LM head
    // is the base model's).
    if (nc.numel() > 0 && (nc.min().item<int64_t>() < 0 || nc.max().item<int64_t>() > w.size(1)))
      return absl::InvalidArgumentError(
          absl::StrCat(cores_path, ": head.stacked.num_labels outside [0, ", w.size(1), "]"));
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

// ---------------------------------------------------------------------------
// LoRA families.
namespace {

bool IsLlama(const LoraConfig& c) { return c.model.has_value() && c.model->family == "llama"; }

// The shortest target_modules entry that names the projection's module
// (PEFT matches a name when the module's path ends with "." + name).
const char* PeftTarget(Projection p, bool llama) {
  switch (p) {
    case Projection::kQuery: return llama ? "q_proj" : "query";
    case Projection::kKey: return llama ? "k_proj" : "key";
    case Projection::kValue: return llama ? "v_proj" : "value";
    default: return PeftModule(p, llama);
  }
}

absl::Status CheckedFile(const nlohmann::json& files, const std::string& dir,
                         const std::string& name, std::string* bytes) {
  ASSIGN_OR_RETURN(*bytes, ReadFileToString(dir + "/" + name));
  if (!files.is_object() || !files.contains(name)) return absl::OkStatus();
  const auto& f = files[name];
  if (!f.is_object() || !f.contains("bytes") || !f.contains("fnv1a64"))
    return absl::InvalidArgumentError(
        absl::StrCat(dir, "/", kFamilyMetaFile, ": field 'files.", name, "' needs bytes and fnv1a64"));
  if (!f["bytes"].is_number_unsigned() || f["bytes"].get<uint64_t>() != bytes->size())
    return absl::DataLossError(absl::StrCat(dir, "/", name, ": size ", bytes->size(),
                                            " differs from family.json"));
  if (!f["fnv1a64"].is_string() || f["fnv1a64"].get<std::string>() != Fnv1a64Hex(*bytes))
    return absl::DataLossError(absl::StrCat(dir, "/", name, ": content hash differs from family.json"));
  return absl::OkStatus();
}

}  // namespace

nlohmann::json LoraConfigJson(const LoraConfig& c) {
  nlohmann::json j;
  j["form"] = "lora";
  j["rank"] = c.rank;
  j["ranks"] = {c.rank};
  j["alpha"] = c.alpha;
  j["use_rslora"] = c.use_rslora;
  std::vector<std::string> p;
  for (Projection x : c.projections) p.push_back(ProjectionName(x));
  j["projections"] = p;
  j["layers"] = c.layers;
  j["num_layers"] = c.num_layers;
  j["d_in"] = c.hidden_size;
  j["d_out"] = c.hidden_size;
  j["d_ffn"] = c.intermediate_size;
  if (c.model.has_value()) {
    // The geometry in MetaTTConfig's JSON form (the one writer of it).
    MetaTTConfig m;
    m.SetModel(*c.model);
    m.projections = c.projections;
    j["model"] = m.ToJson()["model"];
  }
  return j;
}

namespace {

// The geometry a LoRA family.json records (LoraConfigJson), read back through
// MetaTTConfig's JSON reader; nullopt when it records none (a BERT encoder).
absl::StatusOr<std::optional<ModelGeometry>> LoraGeometryFromJson(const nlohmann::json& cfg,
                                                                 const std::string& where) {
  if (!cfg.contains("model") || cfg["model"].is_null()) return std::optional<ModelGeometry>();
  nlohmann::json m = {{"form", "4d"}, {"ranks", {1}}, {"num_tasks", 1}};
  for (const char* f : {"projections", "num_layers", "d_in", "d_out", "d_ffn", "model"})
    if (cfg.contains(f)) m[f] = cfg[f];
  auto parsed = MetaTTConfig::FromJson(m);
  if (!parsed.ok())
    return absl::InvalidArgumentError(absl::StrCat(where, ": field 'config': ", parsed.status().message()));
  return parsed->model;
}

}  // namespace

absl::StatusOr<std::map<std::string, std::string>> PeftFiles(const LoraAdapter& adapter,
                                                            const std::string& base_model_id) {
  const LoraConfig& c = adapter.config();
  const bool llama = IsLlama(c);
  // PEFT wraps the transformers model as base_model.model; a Llama adapter is
  // for LlamaForCausalLM (its decoder is .model), an encoder's for BertModel.
  const std::string prefix = llama ? "base_model.model.model.layers." : "base_model.model.encoder.layer.";
  std::map<std::string, torch::Tensor> tensors;
  RETURN_IF_ERROR(TorchTry("peft tensors", [&] {
    for (const auto& [key, f] : adapter.factors()) {
      const std::string m = absl::StrCat(prefix, key.first, ".", PeftModule(key.second, llama));
      tensors[m + ".lora_A.weight"] = f.a.detach().to(torch::kCPU, torch::kFloat32).contiguous();
      tensors[m + ".lora_B.weight"] = f.b.detach().to(torch::kCPU, torch::kFloat32).contiguous();
    }
  }));
  ASSIGN_OR_RETURN(std::string weights, SerializeSafetensors(tensors, {{"format", "pt"}}));

  std::set<Projection> adapted(c.projections.begin(), c.projections.end());
  const std::vector<int> layers = c.AdaptedLayers();
  const bool all_layers = static_cast<int64_t>(layers.size()) == c.num_layers;
  // "output.dense" also ends "attention.output.dense": a list would adapt O too.
  const bool ambiguous = !llama && adapted.count(Projection::kFfnDown) &&
                         !adapted.count(Projection::kAttnOutput);
  nlohmann::json cfg = {{"peft_type", "LORA"},
                        {"task_type", nullptr},
                        {"r", c.rank},
                        {"lora_alpha", c.alpha},
                        {"use_rslora", c.use_rslora},
                        {"lora_dropout", 0.0},
                        {"bias", "none"},
                        {"fan_in_fan_out", false},
                        {"use_dora", false},
                        {"init_lora_weights", true},
                        {"inference_mode", true},
                        {"modules_to_save", nullptr},
                        {"base_model_name_or_path", base_model_id}};
  if (all_layers && !ambiguous) {
    std::vector<std::string> targets;
    for (Projection p : c.projections) targets.push_back(PeftTarget(p, llama));
    cfg["target_modules"] = targets;
  } else {  // an exact regular expression (PEFT full-matches a string)
    std::vector<std::string> mods, ls;
    for (Projection p : c.projections)
      mods.push_back(absl::StrReplaceAll(PeftModule(p, llama), {{".", "\\."}}));
    for (int l : layers) ls.push_back(absl::StrCat(l));
    cfg["target_modules"] =
        absl::StrCat("(.*\\.)?", llama ? "layers" : "encoder\\.layer", "\\.(",
                     absl::StrJoin(ls, "|"), ")\\.(", absl::StrJoin(mods, "|"), ")");
  }
  return std::map<std::string, std::string>{{kPeftConfigFile, cfg.dump(2) + "\n"},
                                            {kPeftWeightsFile, std::move(weights)}};
}

absl::Status SaveLoraFamily(const std::string& dir, const LoraAdapter& adapter,
                            const std::vector<std::string>& task_names,
                            const std::map<std::string, torch::Tensor>& heads,
                            const std::string& base_model_id,
                            const std::string& base_config_fingerprint,
                            const nlohmann::json& extra) {
  if (!extra.is_null() && !extra.is_object())
    return absl::InvalidArgumentError("save lora family: extra must be a JSON object");
  if (task_names.empty()) return absl::InvalidArgumentError("save lora family: no task");
  std::set<std::string> seen;
  std::map<std::string, torch::Tensor> head_tensors;
  for (const auto& n : task_names) {
    if (n.empty() || !seen.insert(n).second)
      return absl::InvalidArgumentError(
          absl::StrCat("save lora family: task name '", n, "' is empty or repeats"));
    for (const char* part : {".weight", ".bias"}) {
      auto it = heads.find(n + part);
      if (it == heads.end() || !it->second.defined())
        return absl::InvalidArgumentError(
            absl::StrCat("save lora family: head '", n, part, "' is missing"));
      head_tensors[n + part] = it->second.detach().to(torch::kCPU, torch::kFloat32).contiguous();
    }
  }
  ASSIGN_OR_RETURN(auto files, PeftFiles(adapter, base_model_id));
  ASSIGN_OR_RETURN(files[kFamilyHeadsFile], SerializeSafetensors(head_tensors));
  nlohmann::json j = FamilyMeta(LoraConfigJson(adapter.config()), adapter.scale(), task_names,
                                head_tensors, base_model_id, base_config_fingerprint, extra);
  j["heads_file"] = kFamilyHeadsFile;
  nlohmann::json fj = nlohmann::json::object();
  for (const auto& [name, bytes] : files)
    fj[name] = {{"bytes", bytes.size()}, {"fnv1a64", Fnv1a64Hex(bytes)}};
  j["files"] = fj;
  RETURN_IF_ERROR(EnsureDir(dir));
  for (const auto& [name, bytes] : files) RETURN_IF_ERROR(WriteFileAtomically(dir + "/" + name, bytes));
  return WriteFileAtomically(dir + "/" + kMetaFile, j.dump(2) + "\n");  // the commit point
}

bool IsLoraFamilyDir(const std::string& dir) {
  struct stat st;
  return ::stat((dir + "/" + kPeftConfigFile).c_str(), &st) == 0;
}

absl::StatusOr<LoadedLoraFamily> LoadLoraFamily(const std::string& dir,
                                                const std::string& expected_fingerprint,
                                                const LoadPeftOptions& options) {
  LoadedLoraFamily out;
  const std::string meta_path = dir + "/" + kMetaFile;
  nlohmann::json j;
  struct stat st;
  out.has_family_json = ::stat(meta_path.c_str(), &st) == 0;
  LoadPeftOptions opts = options;
  if (out.has_family_json) {
    ASSIGN_OR_RETURN(j, ReadFamilyMeta(meta_path));
    auto bad = [&](const std::string& f, const std::string& why) {
      return BadField(meta_path, f, why);
    };
    if (!j.contains("config") || !j["config"].is_object() ||
        j["config"].value("form", std::string()) != "lora")
      return bad("config.form", "must be \"lora\" beside a PEFT adapter");
    if (!j.contains("base_config_fingerprint") || !j["base_config_fingerprint"].is_string())
      return bad("base_config_fingerprint", "must be a string");
    out.base_config_fingerprint = j["base_config_fingerprint"].get<std::string>();
    if (!expected_fingerprint.empty() && !out.base_config_fingerprint.empty() &&
        out.base_config_fingerprint != expected_fingerprint)
      return absl::FailedPreconditionError(absl::StrCat(
          "family ", dir, " was trained on base config fingerprint '",
          out.base_config_fingerprint, "' but the loaded base model has fingerprint '",
          expected_fingerprint, "'"));
    if (!j.contains("tasks") || !j["tasks"].is_array() || j["tasks"].empty())
      return bad("tasks", "must be a non-empty list");
    for (size_t i = 0; i < j["tasks"].size(); ++i) {
      const auto& t = j["tasks"][i];
      if (!t.is_object() || !t.contains("name") || !t["name"].is_string() ||
          !t.contains("index") || !t["index"].is_number_integer() ||
          t["index"].get<size_t>() != i)
        return bad("tasks", absl::StrCat("entry ", i, " needs a name and index ", i));
      out.task_names.push_back(t["name"].get<std::string>());
    }
    if (j.contains("extra")) {
      if (!j["extra"].is_object()) return bad("extra", "must be an object");
      out.extra = j["extra"];
    }
    const auto& cfg = j["config"];
    if (opts.num_layers <= 0 && cfg.contains("num_layers") && cfg["num_layers"].is_number_integer())
      opts.num_layers = cfg["num_layers"].get<int64_t>();
    if (!opts.model.has_value()) {  // a decoder's LoRA: its geometry gives every width
      ASSIGN_OR_RETURN(opts.model, LoraGeometryFromJson(cfg, meta_path));
    }
    const nlohmann::json files = j.value("files", nlohmann::json());
    std::string unused;
    for (const char* f : {kPeftConfigFile, kPeftWeightsFile, kFamilyHeadsFile})
      RETURN_IF_ERROR(CheckedFile(files, dir, f, &unused));
  }
  ASSIGN_OR_RETURN(out.adapter, LoadPeftAdapter(dir, opts));
  // The MLP width comes from the factors only when an FFN projection is
  // adapted; family.json records it (the geometry's FFN group width).
  if (out.has_family_json && !opts.model.has_value()) {
    LoraConfig c = out.adapter->config();
    const auto& cfg = j["config"];
    if (c.intermediate_size == 0 && cfg.contains("d_ffn") && cfg["d_ffn"].is_number_integer() &&
        cfg["d_ffn"].get<int64_t>() > 0) {
      c.intermediate_size = cfg["d_ffn"].get<int64_t>();
      std::map<LoraAdapter::Key, LoraAdapter::Factors> f = out.adapter->factors();
      ASSIGN_OR_RETURN(out.adapter, LoraAdapter::FromFactors(c, std::move(f)));
    }
  }
  const std::string heads_path = dir + "/" + kFamilyHeadsFile;
  ASSIGN_OR_RETURN(SafetensorsFile heads, ReadSafetensors(heads_path));
  std::set<std::string> names;
  for (const auto& [k, t] : heads.tensors) {
    std::string task;
    if (absl::EndsWith(k, ".weight")) {
      task = k.substr(0, k.size() - 7);
    } else if (absl::EndsWith(k, ".bias")) {
      task = k.substr(0, k.size() - 5);
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          heads_path, ": tensor '", k, "' is not '<task>.weight' or '<task>.bias'"));
    }
    if (task.empty())
      return absl::InvalidArgumentError(absl::StrCat(heads_path, ": tensor '", k, "' names no task"));
    names.insert(task);
  }
  if (!out.has_family_json) out.task_names.assign(names.begin(), names.end());
  if (out.task_names.empty())
    return absl::InvalidArgumentError(absl::StrCat(heads_path, ": no head"));
  const int64_t hidden = out.adapter->config().hidden_size;
  for (const auto& n : out.task_names) {
    auto w = heads.tensors.find(n + ".weight");
    auto b = heads.tensors.find(n + ".bias");
    if (w == heads.tensors.end() || b == heads.tensors.end())
      return absl::InvalidArgumentError(
          absl::StrCat(heads_path, ": task '", n, "' needs '", n, ".weight' and '", n, ".bias'"));
    // 0 rows: a head-less task (a decoder's generation task).
    if (w->second.dim() != 2 || !w->second.is_floating_point() ||
        (hidden > 0 && w->second.size(1) != hidden))
      return absl::InvalidArgumentError(absl::StrCat(
          heads_path, ": '", n, ".weight' must be [num_labels, ", hidden, "], is ",
          c10::str(w->second.sizes())));
    if (b->second.dim() != 1 || b->second.size(0) != w->second.size(0))
      return absl::InvalidArgumentError(absl::StrCat(heads_path, ": '", n, ".bias' must be [",
                                                     w->second.size(0), "]"));
    out.heads[n + ".weight"] = w->second.to(torch::kFloat32);
    out.heads[n + ".bias"] = b->second.to(torch::kFloat32);
  }
  return out;
}

}  // namespace metatt
