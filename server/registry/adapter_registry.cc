#include "server/registry/adapter_registry.h"

#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <iostream>
#include <system_error>
#include <utility>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "adapters/util/safetensors.h"
#include "adapters/util/status_macros.h"

namespace metatt {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr char kTensorsFile[] = "adapter.safetensors";
constexpr char kMetaFile[] = "family.json";

absl::Status ValidateFamilyName(const std::string& name) {
  if (name.empty() || name.size() > 128) {
    return absl::InvalidArgumentError("family: name must have 1 to 128 characters");
  }
  for (char c : name) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-' || c == '.')) {
      return absl::InvalidArgumentError(
          absl::StrCat("family: '", name, "' may only use letters, digits, '_', '-', '.'"));
    }
  }
  if (name[0] == '.') return absl::InvalidArgumentError("family: must not start with '.'");
  return absl::OkStatus();
}

json TaskToJson(const TaskRecord& t) {
  return json{{"name", t.name},
              {"index", t.index},
              {"num_labels", t.num_labels},
              {"regression", t.regression},
              {"label_names", t.label_names},
              {"eval_metrics", t.eval_metrics}};
}

TaskRecord TaskFromJson(const json& j) {
  TaskRecord t;
  t.name = j.value("name", "");
  t.index = j.value("index", int64_t{0});
  t.num_labels = j.value("num_labels", int64_t{1});
  t.regression = j.value("regression", false);
  t.label_names = j.value("label_names", std::vector<std::string>{});
  t.eval_metrics = j.value("eval_metrics", std::map<std::string, double>{});
  return t;
}

int64_t NowMs() { return absl::ToUnixMillis(absl::Now()); }

// Builds the in-memory family from tensors (any device).
absl::StatusOr<std::shared_ptr<PublishedFamily>> BuildFamily(
    FamilyVersionRecord record, const MetaTTConfig& config, double scale,
    const std::map<std::string, torch::Tensor>& adapter_tensors, const torch::Tensor& weight,
    const torch::Tensor& bias, const std::string& pooling, int64_t max_length,
    torch::Device device) {
  auto fam = std::make_shared<PublishedFamily>();
  ASSIGN_OR_RETURN(fam->adapter,
                   MetaTTAdapter::FromTensors(config, scale, adapter_tensors, device));
  fam->adapter->FreezeShared(true);  // published versions never train
  const int64_t T = static_cast<int64_t>(record.tasks.size());
  if (T == 0) return absl::InvalidArgumentError("family has no task");
  const int64_t adapter_tasks = config.form == TTForm::k4Plus1D ? fam->adapter->num_tasks() : 1;
  if (T != adapter_tasks) {
    return absl::InvalidArgumentError(absl::StrCat("family ", record.family, ": ", T,
                                                   " task records but the adapter has ",
                                                   adapter_tasks, " task slices"));
  }
  if (weight.dim() != 3 || weight.size(0) != T || bias.dim() != 2 || bias.size(0) != T) {
    return absl::InvalidArgumentError(absl::StrCat("family ", record.family,
                                                   ": stacked heads do not match ", T, " tasks"));
  }
  for (int64_t t = 0; t < T; ++t) {
    const TaskRecord& tr = record.tasks[t];
    if (tr.index != t) {
      return absl::InvalidArgumentError(
          absl::StrCat("family ", record.family, ": task ", tr.name, " has index ", tr.index,
                       ", expected ", t));
    }
    if (tr.num_labels < 1 || tr.num_labels > weight.size(1)) {
      return absl::InvalidArgumentError(absl::StrCat("family ", record.family, ": task ",
                                                     tr.name, " has bad num_labels"));
    }
    if (!fam->task_by_name.emplace(tr.name, t).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("family ", record.family, ": duplicate task name ", tr.name));
    }
  }
  ASSIGN_OR_RETURN(fam->pooling, ParsePooling(pooling));
  fam->pooling_name = pooling;
  fam->max_length = max_length;
  RETURN_IF_ERROR(TorchTry("moving heads to the device", [&] {
    fam->head_weight = weight.detach().to(device, torch::kFloat32).contiguous();
    fam->head_bias = bias.detach().to(device, torch::kFloat32).contiguous();
  }));
  fam->record = std::move(record);
  return fam;
}

}  // namespace

std::pair<torch::Tensor, torch::Tensor> PublishedFamily::TaskHeadTensors(int64_t t) const {
  const int64_t n = record.tasks[t].num_labels;
  return {head_weight[t].slice(0, 0, n), head_bias[t].slice(0, 0, n)};
}

absl::StatusOr<std::vector<int64_t>> RanksFromTensors(
    TTForm form, const std::map<std::string, torch::Tensor>& tensors) {
  auto get = [&](const std::string& name, int64_t dims) -> absl::StatusOr<torch::Tensor> {
    auto it = tensors.find(name);
    if (it == tensors.end() || !it->second.defined() || it->second.dim() != dims) {
      return absl::InvalidArgumentError(
          absl::StrCat("adapter tensor '", name, "' missing or not ", dims, "-D"));
    }
    return it->second;
  };
  ASSIGN_OR_RETURN(torch::Tensor in, get("in", 2));
  ASSIGN_OR_RETURN(torch::Tensor layer, get("layer", 3));
  ASSIGN_OR_RETURN(torch::Tensor proj, get("proj", 3));
  std::vector<int64_t> ranks = {in.size(1), layer.size(2), proj.size(2)};
  if (form == TTForm::k4Plus1D) {
    ASSIGN_OR_RETURN(torch::Tensor out, get("out", 2));
    ranks.push_back(out.size(0));
  } else if (form == TTForm::k5D) {
    ASSIGN_OR_RETURN(torch::Tensor head, get("head", 3));
    ranks.push_back(head.size(2));
  }
  return ranks;
}

absl::StatusOr<std::unique_ptr<AdapterRegistry>> AdapterRegistry::Create(const Options& options,
                                                                         Store* store) {
  if (store == nullptr) return absl::InvalidArgumentError("registry: store is null");
  if (options.data_dir.empty()) return absl::InvalidArgumentError("registry: data_dir is empty");
  std::error_code ec;
  fs::create_directories(fs::path(options.data_dir) / "families", ec);
  if (ec) {
    return absl::InternalError(
        absl::StrCat("cannot create ", options.data_dir, "/families: ", ec.message()));
  }
  return std::unique_ptr<AdapterRegistry>(new AdapterRegistry(options, store));
}

absl::StatusOr<std::shared_ptr<PublishedFamily>> AdapterRegistry::LoadVersion(
    const FamilyVersionRecord& record) {
  const std::string where = absl::StrCat("family ", record.family, " v", record.version);
  ASSIGN_OR_RETURN(std::string meta_text,
                   ReadFileToString((fs::path(record.path) / kMetaFile).string()));
  json meta = json::parse(meta_text, nullptr, /*allow_exceptions=*/false);
  if (meta.is_discarded() || !meta.is_object() || !meta.contains("config")) {
    return absl::DataLossError(absl::StrCat(where, ": malformed ", kMetaFile));
  }
  const std::string fp = meta.value("base_model_fingerprint", "");
  if (!options_.base_model_fingerprint.empty() && fp != options_.base_model_fingerprint) {
    return absl::FailedPreconditionError(absl::StrCat(
        where, ": trained on another base model (fingerprint ", fp, ", loaded model ",
        options_.base_model_fingerprint, ")"));
  }
  ASSIGN_OR_RETURN(MetaTTConfig config, MetaTTConfig::FromJson(meta["config"]));
  ASSIGN_OR_RETURN(SafetensorsFile file,
                   ReadSafetensors((fs::path(record.path) / kTensorsFile).string()));
  std::map<std::string, torch::Tensor> adapter;
  for (auto& [k, v] : file.tensors) {
    if (k.rfind("adapter.", 0) == 0) adapter[k.substr(8)] = v;
  }
  auto w = file.tensors.find("heads.weight");
  auto b = file.tensors.find("heads.bias");
  if (w == file.tensors.end() || b == file.tensors.end()) {
    return absl::DataLossError(absl::StrCat(where, ": heads missing from ", kTensorsFile));
  }
  FamilyVersionRecord rec = record;
  if (rec.tasks.empty() && meta.contains("tasks")) {
    for (const auto& t : meta["tasks"]) rec.tasks.push_back(TaskFromJson(t));
  }
  std::sort(rec.tasks.begin(), rec.tasks.end(),
            [](const TaskRecord& a, const TaskRecord& c) { return a.index < c.index; });
  return BuildFamily(std::move(rec), config, meta.value("scale", config.Scale()), adapter,
                     w->second, b->second, meta.value("pooling", std::string("mean")),
                     meta.value("max_length", int64_t{128}), options_.device);
}

absl::StatusOr<std::vector<std::string>> AdapterRegistry::LoadAll() {
  ASSIGN_OR_RETURN(std::vector<FamilyVersionRecord> all, store_->ListFamilyVersions(""));
  std::map<std::string, const FamilyVersionRecord*> newest;
  for (const auto& r : all) {
    auto& slot = newest[r.family];
    if (slot == nullptr || r.version > slot->version) slot = &r;
  }
  std::vector<std::string> warnings;
  for (const auto& [name, rec] : newest) {
    auto fam = LoadVersion(*rec);
    if (!fam.ok()) {
      warnings.push_back(std::string(fam.status().message()));
      std::cerr << "metatt registry: skipping " << name << ": " << fam.status() << "\n";
      continue;
    }
    absl::MutexLock l(&mu_);
    latest_[name] = std::move(*fam);
  }
  return warnings;
}

absl::StatusOr<std::shared_ptr<const PublishedFamily>> AdapterRegistry::Publish(
    const PublishRequest& req) {
  RETURN_IF_ERROR(ValidateFamilyName(req.family));
  const size_t T = req.tasks.size();
  if (T == 0 || req.head_weights.size() != T || req.head_biases.size() != T) {
    return absl::InvalidArgumentError("publish: one head per task is required");
  }
  absl::MutexLock publish_lock(&publish_mu_);

  int64_t version = 0;
  {
    absl::MutexLock l(&mu_);
    auto it = latest_.find(req.family);
    if (it != latest_.end()) version = it->second->version();
  }
  ASSIGN_OR_RETURN(std::vector<FamilyVersionRecord> existing,
                   store_->ListFamilyVersions(req.family));
  for (const auto& r : existing) version = std::max(version, r.version);
  ++version;

  // Stack the heads: [T, max_labels, D] / [T, max_labels].
  torch::Tensor weight, bias;
  RETURN_IF_ERROR(TorchTry("stacking heads", [&] {
    int64_t max_labels = 1;
    for (const auto& w : req.head_weights) max_labels = std::max(max_labels, w.size(0));
    const int64_t D = req.head_weights[0].size(1);
    weight = torch::zeros({static_cast<int64_t>(T), max_labels, D}, torch::kFloat32);
    bias = torch::zeros({static_cast<int64_t>(T), max_labels}, torch::kFloat32);
    for (size_t t = 0; t < T; ++t) {
      const int64_t n = req.head_weights[t].size(0);
      weight[t].slice(0, 0, n).copy_(req.head_weights[t].detach().to(torch::kCPU));
      bias[t].slice(0, 0, n).copy_(req.head_biases[t].detach().to(torch::kCPU).reshape({n}));
    }
  }));

  FamilyVersionRecord record;
  record.family = req.family;
  record.version = version;
  record.form = TTFormName(req.config.form);
  record.config_json = req.config.ToJson().dump();
  record.base_model_fingerprint = options_.base_model_fingerprint;
  for (const auto& [k, v] : req.adapter_tensors) record.adapter_parameters += v.numel();
  record.tasks = req.tasks;
  for (size_t t = 0; t < T; ++t) {
    record.tasks[t].index = static_cast<int64_t>(t);
    record.tasks[t].num_labels = req.head_weights[t].size(0);
  }
  record.created_by_job = req.created_by_job;
  record.created_unix_ms = NowMs();

  const fs::path family_dir = fs::path(options_.data_dir) / "families" / req.family;
  const fs::path final_dir = family_dir / absl::StrCat("v", version);
  const fs::path tmp_dir = family_dir / absl::StrCat(".tmp-v", version, "-", getpid());
  record.path = final_dir.string();

  // Build first: a family that cannot be served is never written.
  ASSIGN_OR_RETURN(std::shared_ptr<PublishedFamily> fam,
                   BuildFamily(record, req.config, req.scale, req.adapter_tensors, weight, bias,
                               req.pooling, req.max_length, options_.device));

  std::error_code ec;
  fs::remove_all(tmp_dir, ec);
  fs::create_directories(tmp_dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", tmp_dir.string()));
  std::map<std::string, torch::Tensor> tensors;
  for (const auto& [k, v] : req.adapter_tensors) tensors["adapter." + k] = v.detach();
  tensors["heads.weight"] = weight;
  tensors["heads.bias"] = bias;
  json meta = {{"family", req.family},
               {"version", version},
               {"config", req.config.ToJson()},
               {"scale", req.scale},
               {"pooling", req.pooling},
               {"max_length", req.max_length},
               {"base_model_fingerprint", options_.base_model_fingerprint},
               {"created_by_job", req.created_by_job},
               {"tasks", json::array()}};
  for (const auto& t : record.tasks) meta["tasks"].push_back(TaskToJson(t));
  absl::Status st = WriteSafetensors((tmp_dir / kTensorsFile).string(), tensors,
                                     {{"family", req.family}, {"version", std::to_string(version)}});
  if (st.ok()) st = WriteFileAtomically((tmp_dir / kMetaFile).string(), meta.dump(2));
  if (st.ok()) {
    fs::remove_all(final_dir, ec);  // a leftover of a crash before the Store knew it
    fs::rename(tmp_dir, final_dir, ec);
    if (ec) st = absl::InternalError(absl::StrCat("rename to ", final_dir.string(), ": ",
                                                  ec.message()));
  }
  if (st.ok()) st = store_->PublishFamilyVersion(record);
  if (!st.ok()) {
    fs::remove_all(tmp_dir, ec);
    fs::remove_all(final_dir, ec);
    return st;
  }
  std::shared_ptr<const PublishedFamily> published = std::move(fam);
  {
    absl::MutexLock l(&mu_);
    auto it = latest_.find(req.family);
    if (it != latest_.end()) {
      older_[{req.family, it->second->version()}] = it->second;
    }
    latest_[req.family] = published;
  }
  return published;
}

absl::StatusOr<std::shared_ptr<const PublishedFamily>> AdapterRegistry::Get(
    const std::string& family, int64_t version) {
  {
    absl::MutexLock l(&mu_);
    auto it = latest_.find(family);
    if (it == latest_.end()) {
      return absl::NotFoundError(absl::StrCat("adapter family '", family, "' not found"));
    }
    if (version <= 0 || version == it->second->version()) return it->second;
    auto old = older_.find({family, version});
    if (old != older_.end()) {
      if (auto p = old->second.lock()) return p;
    }
  }
  ASSIGN_OR_RETURN(std::vector<FamilyVersionRecord> recs, store_->ListFamilyVersions(family));
  for (const auto& r : recs) {
    if (r.version != version) continue;
    ASSIGN_OR_RETURN(std::shared_ptr<PublishedFamily> fam, LoadVersion(r));
    std::shared_ptr<const PublishedFamily> result = std::move(fam);
    absl::MutexLock l(&mu_);
    older_[{family, version}] = result;
    return result;
  }
  return absl::NotFoundError(
      absl::StrCat("adapter family '", family, "' has no version ", version));
}

absl::StatusOr<ResolvedTask> AdapterRegistry::Resolve(const std::string& family,
                                                      int64_t version,
                                                      const std::string& task_name,
                                                      int64_t task_index) {
  std::string name = family;
  if (name.empty()) {
    absl::MutexLock l(&mu_);
    if (latest_.empty()) return absl::NotFoundError("family: no adapter family is published");
    if (latest_.size() > 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "family: required when several families are loaded (", latest_.size(), ")"));
    }
    name = latest_.begin()->first;
  }
  auto got = Get(name, version);
  if (!got.ok()) {
    return absl::Status(got.status().code(), absl::StrCat("family: ", got.status().message()));
  }
  std::shared_ptr<const PublishedFamily> fam = std::move(*got);
  ResolvedTask r;
  if (!task_name.empty()) {
    auto it = fam->task_by_name.find(task_name);
    if (it == fam->task_by_name.end()) {
      return absl::NotFoundError(absl::StrCat("task: '", task_name, "' not found in family '",
                                              name, "' v", fam->version()));
    }
    r.task = it->second;
  } else {
    if (task_index < 0) {
      return absl::InvalidArgumentError("task: a task name or a task_index >= 0 is required");
    }
    if (task_index >= fam->num_tasks()) {
      return absl::NotFoundError(absl::StrCat("task_index: ", task_index, " not found in family '",
                                              name, "' v", fam->version(), " (",
                                              fam->num_tasks(), " tasks)"));
    }
    r.task = task_index;
  }
  r.family = std::move(fam);
  return r;
}

absl::StatusOr<std::shared_ptr<const PublishedFamily>> AdapterRegistry::DeleteTask(
    const std::string& family, const std::string& task) {
  ASSIGN_OR_RETURN(std::shared_ptr<const PublishedFamily> fam, Get(family, 0));
  auto it = fam->task_by_name.find(task);
  if (it == fam->task_by_name.end()) {
    return absl::NotFoundError(
        absl::StrCat("task '", task, "' not found in family '", family, "'"));
  }
  if (fam->num_tasks() == 1) {
    return absl::FailedPreconditionError(absl::StrCat(
        "task '", task, "' is the last task of family '", family, "'; delete the family"));
  }
  const int64_t removed = it->second;
  PublishRequest req;
  req.family = family;
  req.config = fam->adapter->config();
  req.config.num_tasks = fam->num_tasks() - 1;
  req.scale = fam->adapter->scale();
  req.pooling = fam->pooling_name;
  req.max_length = fam->max_length;
  req.created_by_job = absl::StrCat("delete-task:", task);
  for (const auto& [k, v] : fam->adapter->NamedParameters()) {
    if (k.rfind("task.", 0) == 0) {
      const int64_t t = std::stoll(k.substr(5));
      if (t == removed) continue;
      req.adapter_tensors[absl::StrCat("task.", t > removed ? t - 1 : t)] = v.detach();
    } else {
      req.adapter_tensors[k] = v.detach();
    }
  }
  for (const TaskRecord& t : fam->record.tasks) {
    if (t.index == removed) continue;
    auto [w, b] = fam->TaskHeadTensors(t.index);
    req.tasks.push_back(t);
    req.head_weights.push_back(w);
    req.head_biases.push_back(b);
  }
  return Publish(req);
}

absl::StatusOr<std::map<std::string, std::string>> AdapterRegistry::ExportFiles(
    const std::string& family, int64_t version) {
  ASSIGN_OR_RETURN(std::shared_ptr<const PublishedFamily> fam, Get(family, version));
  std::map<std::string, std::string> files;
  for (const char* name : {kTensorsFile, kMetaFile}) {
    ASSIGN_OR_RETURN(files[name],
                     ReadFileToString((fs::path(fam->record.path) / name).string()));
  }
  return files;
}

absl::StatusOr<std::shared_ptr<const PublishedFamily>> AdapterRegistry::Import(
    const std::string& family, const std::map<std::string, std::string>& files) {
  auto meta_it = files.find(kMetaFile);
  auto tensors_it = files.find(kTensorsFile);
  if (meta_it == files.end() || tensors_it == files.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("files: ", kMetaFile, " and ", kTensorsFile, " are required"));
  }
  json meta = json::parse(meta_it->second, nullptr, /*allow_exceptions=*/false);
  if (meta.is_discarded() || !meta.is_object() || !meta.contains("config") ||
      !meta.contains("tasks") || !meta["tasks"].is_array()) {
    return absl::InvalidArgumentError(absl::StrCat("files: malformed ", kMetaFile));
  }
  const std::string fp = meta.value("base_model_fingerprint", "");
  if (!options_.base_model_fingerprint.empty() && fp != options_.base_model_fingerprint) {
    return absl::FailedPreconditionError(absl::StrCat(
        "files: the family was trained on another base model (fingerprint ", fp, ")"));
  }
  PublishRequest req;
  req.family = family.empty() ? meta.value("family", "") : family;
  RETURN_IF_ERROR(ValidateFamilyName(req.family));
  if (Get(req.family, 0).ok()) {
    return absl::AlreadyExistsError(absl::StrCat("family: '", req.family, "' already exists"));
  }
  ASSIGN_OR_RETURN(req.config, MetaTTConfig::FromJson(meta["config"]));
  req.scale = meta.value("scale", req.config.Scale());
  req.pooling = meta.value("pooling", std::string("mean"));
  req.max_length = meta.value("max_length", int64_t{128});
  req.created_by_job = "import";
  ASSIGN_OR_RETURN(SafetensorsFile file, ParseSafetensors(tensors_it->second, kTensorsFile));
  for (auto& [k, v] : file.tensors) {
    if (k.rfind("adapter.", 0) == 0) req.adapter_tensors[k.substr(8)] = v;
  }
  auto w = file.tensors.find("heads.weight");
  auto b = file.tensors.find("heads.bias");
  if (w == file.tensors.end() || b == file.tensors.end() || w->second.dim() != 3 ||
      b->second.dim() != 2) {
    return absl::InvalidArgumentError(absl::StrCat("files: heads missing from ", kTensorsFile));
  }
  for (const auto& t : meta["tasks"]) req.tasks.push_back(TaskFromJson(t));
  std::sort(req.tasks.begin(), req.tasks.end(),
            [](const TaskRecord& a, const TaskRecord& c) { return a.index < c.index; });
  for (const TaskRecord& t : req.tasks) {
    if (t.index < 0 || t.index >= w->second.size(0) || t.num_labels < 1 ||
        t.num_labels > w->second.size(1)) {
      return absl::InvalidArgumentError(
          absl::StrCat("files: task ", t.name, " does not match the stacked heads"));
    }
    req.head_weights.push_back(w->second[t.index].slice(0, 0, t.num_labels));
    req.head_biases.push_back(b->second[t.index].slice(0, 0, t.num_labels));
  }
  return Publish(req);
}

void AdapterRegistry::Remove(const std::string& family) {
  absl::MutexLock l(&mu_);
  latest_.erase(family);
  for (auto it = older_.begin(); it != older_.end();) {
    it = it->first.first == family ? older_.erase(it) : std::next(it);
  }
}

std::vector<std::shared_ptr<const PublishedFamily>> AdapterRegistry::Latest() const {
  absl::MutexLock l(&mu_);
  std::vector<std::shared_ptr<const PublishedFamily>> out;
  for (const auto& [k, v] : latest_) out.push_back(v);
  return out;
}

int64_t AdapterRegistry::ResidentTasks() const {
  absl::MutexLock l(&mu_);
  int64_t n = 0;
  for (const auto& [k, v] : latest_) n += v->num_tasks();
  return n;
}

}  // namespace metatt
