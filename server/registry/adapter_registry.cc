#include "server/registry/adapter_registry.h"

#include <unistd.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <signal.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <iostream>
#include <limits>
#include <stdexcept>
#include <system_error>
#include <utility>

#include <nlohmann/json.hpp>

#include "absl/cleanup/cleanup.h"
#include "absl/hash/hash.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "adapters/family_io.h"
#include "base/file_io.h"
#include "base/safetensors.h"
#include "base/status_macros.h"
#include "server/jobs/job_validation.h"

namespace metatt {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// One on-disk format with metatt-train: adapters/family_io (registry metadata
// in family.json "extra", heads stacked as head.stacked.*).
constexpr const char* kTensorsFile = kFamilyCoresFile;
constexpr const char* kMetaFile = kFamilyMetaFile;

// A family key (store.h FamilyKey): the name, and its tenant when the key
// has one, each by the one name rule (server/jobs/job_validation.h).
absl::Status ValidateFamilyName(const std::string& key) {
  if (key.find(kFamilyKeySeparator) != std::string::npos &&
      !IsValidName(FamilyKeyTenant(key))) {
    return ValidateName(key, "family");
  }
  return ValidateName(FamilyKeyName(key), "family");
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

// Stacks per-task heads: weight [T, max_labels, D], bias [T, max_labels] (CPU).
absl::Status StackHeads(const std::vector<torch::Tensor>& weights,
                        const std::vector<torch::Tensor>& biases, torch::Tensor* weight,
                        torch::Tensor* bias) {
  return TorchTry("stacking heads", [&] {
    const int64_t T = static_cast<int64_t>(weights.size());
    int64_t max_labels = 1;
    for (const auto& w : weights) max_labels = std::max(max_labels, w.size(0));
    const int64_t D = weights[0].size(1);
    *weight = torch::zeros({T, max_labels, D}, torch::kFloat32);
    *bias = torch::zeros({T, max_labels}, torch::kFloat32);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t n = weights[t].size(0);
      (*weight)[t].slice(0, 0, n).copy_(weights[t].detach().to(torch::kCPU));
      (*bias)[t].slice(0, 0, n).copy_(biases[t].detach().to(torch::kCPU).reshape({n}));
    }
  });
}

// A stored version that does not load: its code, prefixed with `where` (a
// FAILED_PRECONDITION is a family trained on another base model).
absl::Status VersionLoadError(const absl::Status& st, const std::string& where) {
  const bool other_base = st.code() == absl::StatusCode::kFailedPrecondition;
  return absl::Status(st.code(),
                      absl::StrCat(where, other_base ? ": trained on another base model: " : ": ",
                                   st.message()));
}

// Imported files that do not load: FAILED_PRECONDITION (another base model)
// as it is, anything else INVALID_ARGUMENT (the caller's files are bad).
absl::Status ImportLoadError(const absl::Status& st) {
  const auto code = st.code() == absl::StatusCode::kFailedPrecondition
                        ? absl::StatusCode::kFailedPrecondition
                        : absl::StatusCode::kInvalidArgument;
  return absl::Status(code, absl::StrCat("files: ", st.message()));
}

// Task records of a loaded family (either format): the registry's records
// from extra.tasks where present; a family made elsewhere (metatt-train, a
// PEFT folder) has none: num_labels from its head, regression = one output.
absl::StatusOr<std::vector<TaskRecord>> TaskRecordsFrom(
    const json& extra, const std::vector<std::string>& task_names, const std::string& where,
    const std::function<absl::StatusOr<int64_t>(int64_t t, const std::string& name)>& num_labels) {
  std::map<int64_t, TaskRecord> by_index;
  try {
    if (extra.is_object() && extra.contains("tasks") && extra["tasks"].is_array()) {
      for (const auto& t : extra["tasks"]) {
        TaskRecord r = TaskFromJson(t);
        by_index[r.index] = r;
      }
    }
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": family.json extra.tasks: ", e.what()));
  }
  std::vector<TaskRecord> out;
  for (int64_t t = 0; t < static_cast<int64_t>(task_names.size()); ++t) {
    auto it = by_index.find(t);
    TaskRecord r = it != by_index.end() ? it->second : TaskRecord();
    r.name = task_names[t];
    r.index = t;
    auto n = num_labels(t, r.name);
    if (!n.ok()) return n.status();
    r.num_labels = *n;
    if (it == by_index.end()) r.regression = r.num_labels == 1;
    out.push_back(std::move(r));
  }
  return out;
}

// Task records of a family in the library's format (heads stacked or per task).
absl::StatusOr<std::vector<TaskRecord>> TaskRecordsOf(const LoadedFamily& lf,
                                                      const std::string& where) {
  auto sn = lf.heads.find("stacked.num_labels");
  return TaskRecordsFrom(
      lf.extra, lf.task_names, where,
      [&](int64_t t, const std::string& name) -> absl::StatusOr<int64_t> {
        if (sn != lf.heads.end() && t < sn->second.size(0) && !lf.heads.count(name + ".weight")) {
          return sn->second[t].item<int64_t>();
        }
        auto head = FamilyTaskHead(lf, t);
        if (!head.ok()) {
          return absl::InvalidArgumentError(absl::StrCat(where, ": ", head.status().message()));
        }
        return head->first.size(0);
      });
}

// A family in the library's format -> a publish request (tensors on the CPU).
absl::StatusOr<PublishRequest> RequestFromLoaded(const LoadedFamily& lf, const std::string& where) {
  PublishRequest req;
  req.config = lf.adapter->config();
  req.scale = lf.adapter->scale();
  for (const auto& [k, v] : lf.adapter->NamedParameters()) req.adapter_tensors[k] = v.detach();
  try {
    if (lf.extra.is_object()) {
      req.family = lf.extra.value("family", std::string());
      req.pooling = lf.extra.value("pooling", std::string("mean"));
      req.max_length = lf.extra.value("max_length", int64_t{128});
    }
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": family.json extra: ", e.what()));
  }
  ASSIGN_OR_RETURN(req.tasks, TaskRecordsOf(lf, where));
  for (int64_t t = 0; t < static_cast<int64_t>(req.tasks.size()); ++t) {
    auto head = FamilyTaskHead(lf, t);
    if (!head.ok()) return absl::InvalidArgumentError(absl::StrCat(where, ": ", head.status().message()));
    req.head_weights.push_back(head->first);
    req.head_biases.push_back(head->second);
  }
  return req;
}

// Spare head rows a (4+1)D family keeps for tasks added later: ~3 % of its
// tasks (at least 8, at most 32,768), so appends copy no earlier head until
// they are used up (then the storage grows by the same rule).
int64_t HeadHeadroom(int64_t tasks) { return std::clamp<int64_t>(tasks / 32, 8, 32768); }

std::shared_ptr<PublishedFamily::HeadStorage> NewHeadStorage(int64_t rows, int64_t max_labels,
                                                             int64_t dim, torch::Device device,
                                                             torch::ScalarType dtype) {
  auto hs = std::make_shared<PublishedFamily::HeadStorage>();
  const auto opts = torch::TensorOptions().device(device).dtype(dtype);
  hs->weight = torch::zeros({rows, max_labels, dim}, opts);
  hs->bias = torch::zeros({rows, max_labels}, opts);
  return hs;
}

// Rows of `b` after those of `a` ([n, labels(, D)]), label columns padded
// with zeros to the wider of the two.
torch::Tensor CatRows(const torch::Tensor& a, const torch::Tensor& b) {
  const int64_t n = std::max(a.size(1), b.size(1));
  auto pad = [n](const torch::Tensor& t) {
    if (t.size(1) == n) return t;
    std::vector<int64_t> shape = t.sizes().vec();
    shape[1] = n;
    torch::Tensor out = torch::zeros(shape, t.options());
    out.narrow(1, 0, t.size(1)).copy_(t);
    return out;
  };
  return torch::cat({pad(a), pad(b)}, 0);
}

// The family `base` with the tasks of `add` appended; `record` already lists
// every task (base's and the new ones). With `extend_storage` (the caller
// holds the registry's publish lock) the new head rows go into base's spare
// rows when base is the newest user of its storage; otherwise the heads are
// copied into a new storage.
absl::StatusOr<std::shared_ptr<PublishedFamily>> AppendToFamily(
    const PublishedFamily& base, FamilyVersionRecord record, const AppendedTensors& add,
    bool extend_storage) {
  const int64_t T = base.num_tasks();
  const int64_t k = add.task_slices.size(0);
  const std::string where = absl::StrCat("family ", record.family, " v", record.version);
  if (static_cast<int64_t>(record.tasks.size()) != T + k || add.head_weight.size(0) != k ||
      add.head_bias.size(0) != k) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": ", k, " appended tasks do not match the task records"));
  }
  for (int64_t t = T; t < T + k; ++t) {
    const TaskRecord& tr = record.tasks[t];
    if (tr.index != t || tr.num_labels < 0 || tr.num_labels > add.head_weight.size(1)) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": appended task ", tr.name, " has a bad index or num_labels"));
    }
  }
  if (add.head_weight.size(2) != base.head_weight.size(2)) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": appended heads have width ",
                                                   add.head_weight.size(2), ", the family ",
                                                   base.head_weight.size(2)));
  }
  if (base.adapter.is_lora()) {
    return absl::FailedPreconditionError(
        absl::StrCat(where, ": a LoRA family has no task core; tasks are added to 4+1d families"));
  }
  auto fam = std::make_shared<PublishedFamily>();
  ASSIGN_OR_RETURN(fam->adapter, base.adapter->WithAppendedTasks(add.task_slices));
  RETURN_IF_ERROR(TorchTry("appending heads", [&] {
    std::shared_ptr<PublishedFamily::HeadStorage> hs = base.head_storage;
    const int64_t labels = std::max(base.head_weight.size(1), add.head_weight.size(1));
    const bool in_place = extend_storage && hs != nullptr && hs->used == T &&
                          hs->weight.size(0) >= T + k && hs->weight.size(1) >= labels;
    if (!in_place) {
      hs = NewHeadStorage(T + k + HeadHeadroom(T + k), labels, base.head_weight.size(2),
                          base.head_weight.device(), base.head_weight.scalar_type());
      hs->weight.narrow(0, 0, T).narrow(1, 0, base.head_weight.size(1)).copy_(base.head_weight);
      hs->bias.narrow(0, 0, T).narrow(1, 0, base.head_bias.size(1)).copy_(base.head_bias);
    }
    torch::Tensor w = hs->weight.narrow(0, T, k);
    torch::Tensor b = hs->bias.narrow(0, T, k);
    w.zero_();
    b.zero_();
    w.narrow(1, 0, add.head_weight.size(1)).copy_(add.head_weight);
    b.narrow(1, 0, add.head_bias.size(1)).copy_(add.head_bias);
    hs->used = T + k;
    fam->head_storage = hs;
    fam->head_weight = hs->weight.narrow(0, 0, T + k);
    fam->head_bias = hs->bias.narrow(0, 0, T + k);
  }));
  fam->pooling = base.pooling;
  fam->pooling_name = base.pooling_name;
  fam->max_length = base.max_length;
  fam->full_dir = base.full_dir;
  fam->appended_dirs = base.appended_dirs;
  fam->record = std::move(record);
  fam->record.task_count = T + k;
  absl::Status named = fam->task_by_name.Build(&fam->record.tasks);
  if (!named.ok()) return absl::InvalidArgumentError(absl::StrCat(where, ": ", named.message()));
  return fam;
}

// The registry's metadata in family.json "extra" (MetaTT and LoRA families).
json RegistryExtra(const FamilyVersionRecord& record, const std::string& pooling,
                   int64_t max_length) {
  json extra = {{"family", record.family},
                {"version", record.version},
                {"pooling", pooling},
                {"max_length", max_length},
                {"created_by_job", record.created_by_job},
                {"tasks", json::array()}};
  for (const auto& t : record.tasks) extra["tasks"].push_back(TaskToJson(t));
  return extra;
}

// A full version's files: adapters/family_io format, cores + stacked float32
// heads, the registry's metadata in family.json "extra".
absl::Status WriteFullFamily(const std::string& dir, const MetaTTAdapter& adapter,
                             const FamilyVersionRecord& record, const std::string& pooling,
                             int64_t max_length, const torch::Tensor& weight,
                             const torch::Tensor& bias) {
  std::vector<std::string> task_names;
  std::vector<int64_t> num_labels;
  for (const auto& t : record.tasks) {
    task_names.push_back(t.name);
    num_labels.push_back(t.num_labels);
  }
  std::map<std::string, torch::Tensor> heads = {
      {"stacked.weight", weight},
      {"stacked.bias", bias},
      {"stacked.num_labels", torch::tensor(num_labels, torch::kInt64)}};
  return SaveFamily(dir, adapter, task_names, heads, /*base_model_id=*/"",
                    record.base_model_fingerprint, RegistryExtra(record, pooling, max_length));
}

// A LoRA family's files (adapters/FORMAT.md): the PEFT folder, per-task
// float32 heads, family.json with the same "extra" as a MetaTT family's.
absl::Status WriteLoraFamily(const std::string& dir, const LoraAdapter& adapter,
                             const FamilyVersionRecord& record, const std::string& pooling,
                             int64_t max_length, const torch::Tensor& weight,
                             const torch::Tensor& bias) {
  std::vector<std::string> task_names;
  std::map<std::string, torch::Tensor> heads;
  for (const auto& t : record.tasks) {
    task_names.push_back(t.name);
    heads[t.name + ".weight"] = weight[t.index].slice(0, 0, t.num_labels);
    heads[t.name + ".bias"] = bias[t.index].slice(0, 0, t.num_labels);
  }
  return SaveLoraFamily(dir, adapter, task_names, heads, /*base_model_id=*/"",
                        record.base_model_fingerprint, RegistryExtra(record, pooling, max_length));
}

// Task records of a LoRA family (one head per task).
absl::StatusOr<std::vector<TaskRecord>> LoraTaskRecords(const LoadedLoraFamily& lf,
                                                        const std::string& where) {
  return TaskRecordsFrom(lf.extra, lf.task_names, where,
                         [&](int64_t, const std::string& name) -> absl::StatusOr<int64_t> {
                           return lf.heads.at(name + ".weight").size(0);
                         });
}

// Builds the in-memory family from tensors (any device).
absl::StatusOr<std::shared_ptr<PublishedFamily>> BuildFamily(
    FamilyVersionRecord record, const MetaTTConfig& config, double scale,
    const std::map<std::string, torch::Tensor>& adapter_tensors, const torch::Tensor& weight,
    const torch::Tensor& bias, const std::string& pooling, int64_t max_length,
    torch::Device device, torch::ScalarType head_dtype, const LoraAdapter* lora = nullptr) {
  auto fam = std::make_shared<PublishedFamily>();
  if (lora != nullptr) {  // a LoRA family: its own copy on the device
    std::map<LoraAdapter::Key, LoraAdapter::Factors> factors;
    RETURN_IF_ERROR(TorchTry("moving the LoRA to the device", [&] {
      for (const auto& [k, f] : lora->factors())
        factors[k] = {f.a.detach().to(device), f.b.detach().to(device)};
    }));
    ASSIGN_OR_RETURN(std::unique_ptr<LoraAdapter> copy,
                     LoraAdapter::FromFactors(lora->config(), std::move(factors)));
    fam->adapter = std::move(copy);
  } else {
    ASSIGN_OR_RETURN(fam->adapter,
                     MetaTTAdapter::FromTensors(config, scale, adapter_tensors, device,
                                                MetaTTAdapter::Leaves::kFrozen));  // never trains
  }
  const int64_t T = static_cast<int64_t>(record.tasks.size());
  if (T == 0) return absl::InvalidArgumentError("family has no task");
  if (T > int64_t{std::numeric_limits<uint32_t>::max()}) {
    return absl::InvalidArgumentError(absl::StrCat("family ", record.family, ": ", T, " tasks"));
  }
  // A LoRA is shared by all its family's tasks (each has its own head).
  const int64_t adapter_tasks = lora != nullptr ? T
                                : config.form == TTForm::k4Plus1D ? fam->adapter->num_tasks()
                                                                  : 1;
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
    // 0 labels: a task without a head (a generation task on a decoder).
    if (tr.num_labels < 0 || tr.num_labels > weight.size(1)) {
      return absl::InvalidArgumentError(absl::StrCat("family ", record.family, ": task ",
                                                     tr.name, " has bad num_labels"));
    }
  }
  ASSIGN_OR_RETURN(fam->pooling, ParsePooling(pooling));
  fam->pooling_name = pooling;
  fam->max_length = max_length;
  // Resident copy in head_dtype (from float32: rounding to nearest); the
  // caller writes the float32 `weight` / `bias` to disk, never this copy.
  // A (4+1)D family keeps spare rows for the tasks added to it later.
  RETURN_IF_ERROR(TorchTry("moving heads to the device", [&] {
    const int64_t spare = lora == nullptr && config.form == TTForm::k4Plus1D ? HeadHeadroom(T) : 0;
    auto hs = NewHeadStorage(T + spare, weight.size(1), weight.size(2), device, head_dtype);
    hs->weight.narrow(0, 0, T).copy_(weight.detach());
    hs->bias.narrow(0, 0, T).copy_(bias.detach());
    hs->used = T;
    fam->head_storage = std::move(hs);
    fam->head_weight = fam->head_storage->weight.narrow(0, 0, T);
    fam->head_bias = fam->head_storage->bias.narrow(0, 0, T);
  }));
  fam->record = std::move(record);
  fam->record.tasks.shrink_to_fit();
  absl::Status named = fam->task_by_name.Build(&fam->record.tasks);
  if (!named.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("family ", fam->record.family, ": ", named.message()));
  }
  return fam;
}

}  // namespace

absl::StatusOr<torch::ScalarType> ParseHeadDtype(const std::string& name) {
  if (name == "float32") return torch::kFloat32;
  if (name == "float16") return torch::kFloat16;
  if (name == "bfloat16") return torch::kBFloat16;
  return absl::InvalidArgumentError(absl::StrCat(
      "head_dtype: '", name, "' is not one of float32, float16, bfloat16"));
}

absl::Status TaskNameIndex::Build(const std::vector<TaskRecord>* tasks) {
  set_ = absl::flat_hash_set<uint32_t, Hash, Eq>(tasks->size(), Hash{tasks}, Eq{tasks});
  for (size_t i = 0; i < tasks->size(); ++i) {
    if (!set_.insert(static_cast<uint32_t>(i)).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("duplicate task name ", (*tasks)[i].name));
    }
  }
  return absl::OkStatus();
}

size_t TaskNameIndex::Hash::operator()(uint32_t i) const {
  return absl::Hash<std::string_view>()((*tasks)[i].name);
}

size_t TaskNameIndex::Hash::operator()(std::string_view name) const {
  return absl::Hash<std::string_view>()(name);
}

int64_t TaskNameIndex::Find(std::string_view name) const {
  auto it = set_.find(name);
  return it == set_.end() ? -1 : static_cast<int64_t>(*it);
}

int64_t TaskNameIndex::at(std::string_view name) const {
  const int64_t i = Find(name);
  if (i < 0) throw std::out_of_range(absl::StrCat("task '", std::string(name), "' not found"));
  return i;
}

int64_t TaskNameIndex::MemoryBytes() const {
  return static_cast<int64_t>(set_.capacity() * (sizeof(uint32_t) + 1));
}

std::pair<torch::Tensor, torch::Tensor> PublishedFamily::TaskHeadTensors(int64_t t) const {
  const int64_t n = record.tasks[t].num_labels;
  return {head_weight[t].slice(0, 0, n).to(torch::kFloat32),
          head_bias[t].slice(0, 0, n).to(torch::kFloat32)};
}

std::pair<torch::Tensor, torch::Tensor> PublishedFamily::GatherHeads(
    const torch::Tensor& tasks, torch::ScalarType dtype) const {
  return {head_weight.index_select(0, tasks).to(dtype),
          head_bias.index_select(0, tasks).to(dtype)};
}

absl::StatusOr<std::pair<torch::Tensor, torch::Tensor>> PublishedFamily::ExactHeads() const {
  if (head_weight.scalar_type() == torch::kFloat32) {
    return std::make_pair(head_weight.to(torch::kCPU), head_bias.to(torch::kCPU));
  }
  // Compact resident heads: read the float32 ones back the way LoadVersion
  // does: the nearest full family, then the appended versions after it.
  const std::string where = absl::StrCat("family ", family(), " v", version());
  if (adapter.is_lora()) {  // per-task heads in heads.safetensors
    auto lora = LoadLoraFamily(full_dir, record.base_model_fingerprint);
    if (!lora.ok()) {
      return absl::Status(lora.status().code(),
                          absl::StrCat(where, ": reading float32 heads: ", lora.status().message()));
    }
    std::vector<torch::Tensor> ws, bs;
    for (const TaskRecord& t : record.tasks) {
      ws.push_back(lora->heads.at(t.name + ".weight"));
      bs.push_back(lora->heads.at(t.name + ".bias"));
    }
    torch::Tensor weight, bias;
    RETURN_IF_ERROR(StackHeads(ws, bs, &weight, &bias));
    return std::make_pair(weight, bias);
  }
  auto loaded = LoadFamily(full_dir, record.base_model_fingerprint, torch::kCPU,
                           MetaTTAdapter::Leaves::kFrozen);
  if (!loaded.ok()) {
    return absl::Status(loaded.status().code(),
                        absl::StrCat(where, ": reading float32 heads: ", loaded.status().message()));
  }
  torch::Tensor weight, bias;
  auto sw = loaded->heads.find("stacked.weight");
  const auto full_tasks = static_cast<int64_t>(loaded->task_names.size());
  if (sw != loaded->heads.end() && sw->second.size(0) == full_tasks) {
    weight = sw->second;
    bias = loaded->heads.at("stacked.bias");
  } else {
    ASSIGN_OR_RETURN(PublishRequest req, RequestFromLoaded(*loaded, where));
    RETURN_IF_ERROR(StackHeads(req.head_weights, req.head_biases, &weight, &bias));
  }
  for (const std::string& dir : appended_dirs) {
    auto add = FamilyCatalog::ReadAppended(dir);
    if (!add.ok()) {
      return absl::Status(add.status().code(),
                          absl::StrCat(where, ": reading float32 heads: ", add.status().message()));
    }
    RETURN_IF_ERROR(TorchTry("appending heads", [&] {
      weight = CatRows(weight, add->head_weight);
      bias = CatRows(bias, add->head_bias);
    }));
  }
  if (weight.sizes() != head_weight.sizes() || bias.sizes() != head_bias.sizes()) {
    return absl::DataLossError(absl::StrCat(where, ": the heads in ", record.path,
                                            " do not match the resident ones"));
  }
  return std::make_pair(weight.to(torch::kFloat32), bias.to(torch::kFloat32));
}

ResidentStats PublishedFamily::Resident() const {
  ResidentStats r;
  // The whole storage, spare rows included (shared with the versions
  // appended to this one: counted once per resident latest version).
  const torch::Tensor& w = head_storage ? head_storage->weight : head_weight;
  const torch::Tensor& b = head_storage ? head_storage->bias : head_bias;
  for (const torch::Tensor* t : {&w, &b}) {
    if (t->defined()) r.heads += t->numel() * static_cast<int64_t>(t->element_size());
  }
  // libstdc++: a std::string holds up to 15 chars inline; a std::map node
  // is 32 bytes of links plus the value.
  auto heap = [](const std::string& s) -> int64_t {
    return s.capacity() > 15 ? static_cast<int64_t>(s.capacity() + 1) : 0;
  };
  int64_t bytes = static_cast<int64_t>(record.tasks.capacity() * sizeof(TaskRecord));
  for (const TaskRecord& t : record.tasks) {
    bytes += heap(t.name);
    bytes += static_cast<int64_t>(t.label_names.capacity() * sizeof(std::string));
    for (const auto& l : t.label_names) bytes += heap(l);
    for (const auto& [k, v] : t.eval_metrics) {
      bytes += static_cast<int64_t>(32 + sizeof(std::pair<const std::string, double>)) + heap(k);
    }
  }
  r.task_records = bytes;
  r.name_index = task_by_name.MemoryBytes();
  return r;
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
  ASSIGN_OR_RETURN(const torch::ScalarType head_dtype, ParseHeadDtype(options.head_dtype));
  ASSIGN_OR_RETURN(std::unique_ptr<FamilyCatalog> catalog,
                   FamilyCatalog::Create(options.data_dir, options.blobs));
  return std::unique_ptr<AdapterRegistry>(
      new AdapterRegistry(options, store, head_dtype, std::move(catalog)));
}

AdapterRegistry::AdapterRegistry(const Options& options, Store* store,
                                 torch::ScalarType head_dtype,
                                 std::unique_ptr<FamilyCatalog> catalog)
    : options_(options), store_(store), catalog_(std::move(catalog)), head_dtype_(head_dtype) {
  compactor_ = std::thread([this] { CompactLoop(); });
}

AdapterRegistry::~AdapterRegistry() {
  {
    absl::MutexLock l(&compact_mu_);
    stop_ = true;
  }
  compactor_.join();
}

std::shared_ptr<const PublishedFamily> AdapterRegistry::Resident(const std::string& family,
                                                                  int64_t version) {
  absl::MutexLock l(&mu_);
  auto it = latest_.find(family);
  if (it != latest_.end() && it->second->version() == version) return it->second;
  auto old = older_.find({family, version});
  return old != older_.end() ? old->second.lock() : nullptr;
}

absl::StatusOr<std::shared_ptr<PublishedFamily>> AdapterRegistry::LoadVersion(
    const FamilyVersionRecord& record, bool extend_storage) {
  if (record.parent_version == 0 || catalog_->VersionHoldsFullFamily(record.path)) {
    FamilyVersionRecord full = record;
    if (full.parent_version > 0) full.tasks.clear();  // compacted: family.json lists them all
    full.parent_version = 0;
    return LoadFullVersion(full);
  }
  // An appended version: the nearest resident or full ancestor, then every
  // appended version after it, applied in one step.
  const std::string where = absl::StrCat("family ", record.family, " v", record.version);
  std::vector<FamilyVersionRecord> chain = {record};  // newest first
  std::shared_ptr<const PublishedFamily> base;
  while (true) {
    const int64_t parent = chain.back().parent_version;
    base = Resident(record.family, parent);
    if (base != nullptr) break;
    auto rec = store_->GetFamilyVersion(record.family, parent);
    if (!rec.ok()) {
      return absl::Status(rec.status().code(),
                          absl::StrCat(where, ": parent version: ", rec.status().message()));
    }
    if (rec->parent_version == 0 || catalog_->VersionHoldsFullFamily(rec->path)) {
      ASSIGN_OR_RETURN(std::shared_ptr<PublishedFamily> loaded, LoadVersion(*rec, false));
      base = std::move(loaded);
      extend_storage = false;  // a fresh storage nobody else uses: still safe, but keep it simple
      break;
    }
    chain.push_back(std::move(*rec));
  }
  FamilyVersionRecord full = record;
  full.tasks = base->record.tasks;
  AppendedTensors add;
  std::vector<std::string> dirs;
  for (auto it = chain.rbegin(); it != chain.rend(); ++it) {
    auto local = catalog_->Fetch(it->path);
    auto files = local.ok() ? FamilyCatalog::ReadAppended(*local)
                            : absl::StatusOr<AppendedTensors>(local.status());
    if (!files.ok()) {
      return absl::Status(files.status().code(), absl::StrCat(where, ": ", files.status().message()));
    }
    RETURN_IF_ERROR(TorchTry("reading appended versions", [&] {
      if (!add.task_slices.defined()) {
        add = *files;
      } else {
        add.task_slices = torch::cat({add.task_slices, files->task_slices}, 0);
        add.head_weight = CatRows(add.head_weight, files->head_weight);
        add.head_bias = CatRows(add.head_bias, files->head_bias);
      }
    }));
    for (const TaskRecord& t : it->tasks) full.tasks.push_back(t);
    dirs.push_back(*local);
  }
  ASSIGN_OR_RETURN(std::shared_ptr<PublishedFamily> fam,
                   AppendToFamily(*base, std::move(full), add, extend_storage));
  for (std::string& d : dirs) fam->appended_dirs.push_back(std::move(d));
  fam->chain_length = base->chain_length + static_cast<int64_t>(chain.size());
  if (fam->chain_length >= CompactAfter(fam->num_tasks())) EnqueueCompaction(record.family);
  return fam;
}

absl::StatusOr<std::shared_ptr<PublishedFamily>> AdapterRegistry::LoadFullVersion(
    const FamilyVersionRecord& record) {
  const std::string where = absl::StrCat("family ", record.family, " v", record.version);
  absl::StatusOr<std::string> dir = catalog_->Fetch(record.path);
  if (!dir.ok()) {
    return absl::Status(dir.status().code(), absl::StrCat(where, ": ", dir.status().message()));
  }
  if (IsLoraFamilyDir(*dir)) return LoadLoraVersion(record);
  auto loaded = LoadFamily(*dir, options_.base_model_fingerprint, torch::kCPU,
                           MetaTTAdapter::Leaves::kFrozen);
  if (!loaded.ok()) return VersionLoadError(loaded.status(), where);
  const LoadedFamily& lf = *loaded;
  const int64_t T = static_cast<int64_t>(lf.task_names.size());
  torch::Tensor weight, bias;
  PublishRequest req;
  auto sw = lf.heads.find("stacked.weight");
  if (sw != lf.heads.end() && sw->second.size(0) == T) {  // as Publish writes it
    weight = sw->second;
    bias = lf.heads.at("stacked.bias");
    req.config = lf.adapter->config();
    req.scale = lf.adapter->scale();
    for (const auto& [k, v] : lf.adapter->NamedParameters()) req.adapter_tensors[k] = v.detach();
    try {
      if (lf.extra.is_object()) {
        req.pooling = lf.extra.value("pooling", std::string("mean"));
        req.max_length = lf.extra.value("max_length", int64_t{128});
      }
    } catch (const json::exception& e) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": family.json extra: ", e.what()));
    }
    if (record.tasks.empty()) {
      ASSIGN_OR_RETURN(req.tasks, TaskRecordsOf(lf, where));
    }
  } else {  // per-task heads (metatt-train), possibly after stacked ones
    ASSIGN_OR_RETURN(req, RequestFromLoaded(lf, where));
    if (T == 0) return absl::InvalidArgumentError(absl::StrCat(where, ": no task"));
    RETURN_IF_ERROR(StackHeads(req.head_weights, req.head_biases, &weight, &bias));
  }
  FamilyVersionRecord rec = record;
  if (rec.tasks.empty()) rec.tasks = req.tasks;
  std::sort(rec.tasks.begin(), rec.tasks.end(),
            [](const TaskRecord& a, const TaskRecord& c) { return a.index < c.index; });
  ASSIGN_OR_RETURN(std::shared_ptr<PublishedFamily> fam,
                   BuildFamily(std::move(rec), req.config, req.scale, req.adapter_tensors, weight,
                               bias, req.pooling, req.max_length, options_.device, head_dtype_));
  fam->full_dir = *dir;
  return fam;
}

// Loading or publishing a big family frees gigabytes of transient buffers
// (tensor maps, file bytes, JSON); glibc keeps freed arenas mapped, so the
// process would hold them for good. Hand them back to the OS.
static void ReleaseFreedHeap() {
#if defined(__GLIBC__)
  malloc_trim(0);
#endif
}

absl::StatusOr<std::vector<std::string>> AdapterRegistry::LoadAll() {
  absl::Cleanup trim = [] { ReleaseFreedHeap(); };
  // Summaries find the newest versions; only those are read in full.
  ASSIGN_OR_RETURN(std::vector<FamilyVersionRecord> all, store_->ListFamilyVersionSummaries(""));
  std::map<std::string, std::vector<int64_t>> versions;  // newest first
  for (const auto& r : all) versions[r.family].push_back(r.version);
  std::vector<std::string> warnings;
  for (auto& [name, vs] : versions) {
    std::sort(vs.rbegin(), vs.rend());
    // The newest version that loads is served: a corrupt newest version
    // (torn files, a bad disk) leaves the previous one serving, and the
    // warning says so (the API reports it: FamilyAccess::NoteLoadWarnings
    // reads "family '<key>' v<N>: ..." from these strings).
    std::string why;
    for (int64_t v : vs) {
      auto rec = store_->GetFamilyVersion(name, v);
      auto fam = rec.ok() ? LoadVersion(*rec) : rec.status();
      if (!fam.ok()) {
        if (why.empty()) why = std::string(fam.status().message());
        continue;
      }
      if (!why.empty()) {
        warnings.push_back(absl::StrCat("family '", name, "' v", vs.front(),
                                        ": cannot be loaded (", why, "); serving v", v));
      }
      absl::MutexLock l(&mu_);
      if (!why.empty()) refresh_failed_[name] = vs.front();  // not retried every poll
      latest_[name] = std::move(*fam);
      why.clear();
      break;
    }
    if (!why.empty()) {
      warnings.push_back(absl::StrCat("family '", name, "' v", vs.front(),
                                      ": cannot be loaded (", why, "); no version is served"));
    }
  }
  for (const auto& w : warnings) std::cerr << "metatt registry: " << w << "\n";
  return warnings;
}

absl::StatusOr<std::shared_ptr<const PublishedFamily>> AdapterRegistry::Publish(
    const PublishRequest& req) {
  absl::Cleanup trim = [] { ReleaseFreedHeap(); };
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
                   store_->ListFamilyVersionSummaries(req.family));
  for (const auto& r : existing) version = std::max(version, r.version);
  // The owner: the request's, else its job's tenant, else the family's.
  std::string tenant = req.tenant;
  if (tenant.empty() && !req.created_by_job.empty()) {
    auto job = store_->GetJob(req.created_by_job);
    if (job.ok()) tenant = job->tenant;
  }
  if (tenant.empty()) tenant = existing.empty() ? "default" : existing.back().tenant;
  if (req.base_version >= 0) {
    // The version the publication started from must still be the newest
    // (the store checks again, atomically with its insert).
    RETURN_IF_ERROR(CheckPublication(req.family, req.base_version + 1, tenant, version,
                                     existing.empty() ? "" : existing.back().tenant));
  }
  ++version;

  // Stack the heads: [T, max_labels, D] / [T, max_labels].
  torch::Tensor weight, bias;
  RETURN_IF_ERROR(StackHeads(req.head_weights, req.head_biases, &weight, &bias));

  FamilyVersionRecord record;
  record.family = req.family;
  record.version = version;
  record.form = req.lora != nullptr ? "lora" : TTFormName(req.config.form);
  record.config_json = req.lora != nullptr ? LoraConfigJson(req.lora->config()).dump()
                                           : req.config.ToJson().dump();
  record.base_model_fingerprint = options_.base_model_fingerprint;
  if (req.lora != nullptr) {
    record.adapter_parameters = req.lora->NumParameters();
  } else {
    for (const auto& [k, v] : req.adapter_tensors) record.adapter_parameters += v.numel();
  }
  record.tasks = req.tasks;
  record.task_count = static_cast<int64_t>(T);
  for (size_t t = 0; t < T; ++t) {
    record.tasks[t].index = static_cast<int64_t>(t);
    record.tasks[t].num_labels = req.head_weights[t].size(0);
  }
  record.created_by_job = req.created_by_job;
  record.created_unix_ms = NowMs();
  record.tenant = tenant;  // the store refuses it if the family has another owner

  record.path = catalog_->NewVersionPath(req.family, version);

  // Build first: a family that cannot be served is never written.
  ASSIGN_OR_RETURN(std::shared_ptr<PublishedFamily> fam,
                   BuildFamily(record, req.config, req.scale, req.adapter_tensors, weight, bias,
                               req.pooling, req.max_length, options_.device, head_dtype_,
                               req.lora));
  fam->full_dir = catalog_->LocalDir(record.path);
  auto written = catalog_->WriteVersion(
      record.path,
      [&](const std::string& dir) {
        if (fam->adapter.is_lora()) {
          return WriteLoraFamily(dir, *fam->adapter.lora(), record, req.pooling, req.max_length,
                                 weight, bias);
        }
        return WriteFullFamily(dir, *fam->adapter, record, req.pooling, req.max_length, weight,
                               bias);
      },
      [&] { return CheckVersionFree(req.family, version); });
  if (!written.ok()) return written.status();
  absl::Status st = store_->PublishFamilyVersion(record);
  if (!st.ok()) {
    catalog_->RemoveVersion(record.path, st);
    return st;
  }
  return Activate(std::move(fam));
}

absl::Status AdapterRegistry::CheckVersionFree(const std::string& family, int64_t version) {
  // Several replicas share data_dir: if another one published this version
  // meanwhile, its directory is not ours to replace.
  auto known = store_->ListFamilyVersionSummaries(family);
  if (known.ok() && std::any_of(known->begin(), known->end(), [&](const FamilyVersionRecord& r) {
        return r.version == version;
      })) {
    return absl::AlreadyExistsError(absl::StrCat("family ", family, " version ", version,
                                                 " was published concurrently by another replica"));
  }
  return absl::OkStatus();
}

std::shared_ptr<const PublishedFamily> AdapterRegistry::Activate(
    std::shared_ptr<PublishedFamily> fam) {
  std::shared_ptr<const PublishedFamily> published = std::move(fam);
  absl::MutexLock l(&mu_);
  auto it = latest_.find(published->family());
  if (it != latest_.end()) older_[{published->family(), it->second->version()}] = it->second;
  latest_[published->family()] = published;
  return published;
}

absl::StatusOr<std::shared_ptr<const PublishedFamily>> AdapterRegistry::PublishAppend(
    const AppendRequest& req) {
  RETURN_IF_ERROR(ValidateFamilyName(req.family));
  const auto k = static_cast<int64_t>(req.tasks.size());
  if (k == 0 || static_cast<int64_t>(req.head_weights.size()) != k ||
      static_cast<int64_t>(req.head_biases.size()) != k || !req.task_slices.defined() ||
      req.task_slices.dim() != 3 || req.task_slices.size(0) != k) {
    return absl::InvalidArgumentError(
        "publish: one task slice and one head per appended task are required");
  }
  absl::MutexLock publish_lock(&publish_mu_);
  std::shared_ptr<const PublishedFamily> base;
  {
    absl::MutexLock l(&mu_);
    auto it = latest_.find(req.family);
    if (it != latest_.end()) base = it->second;
  }
  if (base == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("family '", req.family, "' no longer exists; nothing was published"));
  }
  // The newest version anywhere (another replica may have published).
  ASSIGN_OR_RETURN(std::vector<FamilyVersionRecord> existing,
                   store_->ListFamilyVersionSummaries(req.family));
  int64_t newest = base->version();
  for (const auto& r : existing) newest = std::max(newest, r.version);
  if (existing.empty() || newest != req.base_version || base->version() != req.base_version) {
    return absl::FailedPreconditionError(absl::StrCat(
        "family '", req.family, "' is at v", existing.empty() ? 0 : newest,
        ", not v", req.base_version, " that the job trained on; nothing was published"));
  }
  const int64_t version = newest + 1;
  for (int64_t i = 0; i < k; ++i) {
    const std::string& name = req.tasks[i].name;
    RETURN_IF_ERROR(ValidateName(name, "task"));
    bool dup = base->task_by_name.count(name) > 0;
    for (int64_t j = 0; j < i; ++j) dup = dup || req.tasks[j].name == name;
    if (dup) {
      return absl::AlreadyExistsError(
          absl::StrCat("family '", req.family, "' already has task '", name, "'"));
    }
  }
  AppendedTensors add;
  add.parent_version = base->version();
  RETURN_IF_ERROR(StackHeads(req.head_weights, req.head_biases, &add.head_weight, &add.head_bias));
  RETURN_IF_ERROR(TorchTry("appended task slices", [&] {
    add.task_slices = req.task_slices.detach().to(torch::kCPU, torch::kFloat32).contiguous();
  }));

  const int64_t T = base->num_tasks();
  FamilyVersionRecord delta;  // what the Store records: the appended tasks only
  delta.family = req.family;
  delta.version = version;
  delta.form = base->record.form;
  delta.base_model_fingerprint = base->record.base_model_fingerprint;
  delta.path = catalog_->NewVersionPath(req.family, version);
  delta.adapter_parameters = base->record.adapter_parameters + add.task_slices.numel();
  delta.created_by_job = req.created_by_job;
  delta.created_unix_ms = NowMs();
  delta.tenant = base->record.tenant;  // a family never changes hands
  if (!req.created_by_job.empty()) {
    // The job's tenant: the store refuses the version if it does not own the family.
    auto job = store_->GetJob(req.created_by_job);
    if (job.ok()) delta.tenant = job->tenant;
  }
  delta.parent_version = base->version();
  delta.task_count = T + k;
  for (int64_t i = 0; i < k; ++i) {
    TaskRecord t = req.tasks[i];
    t.index = T + i;
    t.num_labels = req.head_weights[i].size(0);
    delta.tasks.push_back(std::move(t));
  }
  FamilyVersionRecord full = delta;
  full.tasks = base->record.tasks;
  for (const TaskRecord& t : delta.tasks) full.tasks.push_back(t);
  ASSIGN_OR_RETURN(std::shared_ptr<PublishedFamily> fam,
                   AppendToFamily(*base, std::move(full), add, /*extend_storage=*/true));
  fam->record.config_json = fam->adapter->config().ToJson().dump();
  delta.config_json = fam->record.config_json;
  fam->appended_dirs.push_back(catalog_->LocalDir(delta.path));
  fam->chain_length = base->chain_length + 1;

  auto written = catalog_->WriteVersion(
      delta.path,
      [&](const std::string& dir) { return FamilyCatalog::WriteAppended(dir, add); },
      [&] { return CheckVersionFree(req.family, version); });
  absl::Status st = written.status();
  if (st.ok()) {
    st = store_->PublishFamilyVersion(delta);
    if (!st.ok()) catalog_->RemoveVersion(delta.path, st);
  }
  if (!st.ok()) {
    fam->head_storage->used = T;  // the rows written for it are free again
    return st;
  }
  const bool compact = fam->chain_length >= CompactAfter(fam->num_tasks());
  std::shared_ptr<const PublishedFamily> published = Activate(std::move(fam));
  if (compact) EnqueueCompaction(req.family);
  return published;
}

void AdapterRegistry::EnqueueCompaction(const std::string& family) {
  absl::MutexLock l(&compact_mu_);
  if (std::find(compact_queue_.begin(), compact_queue_.end(), family) != compact_queue_.end()) {
    return;  // one at a time per family: the next append asks again
  }
  compact_queue_.push_back(family);
}

void AdapterRegistry::WaitForCompactions() {
  absl::MutexLock l(&compact_mu_);
  compact_mu_.Await(absl::Condition(
      +[](AdapterRegistry* r) ABSL_EXCLUSIVE_LOCKS_REQUIRED(r->compact_mu_) {
        return r->compact_queue_.empty() && !r->compacting_;
      },
      this));
}

void AdapterRegistry::CompactLoop() {
  while (true) {
    std::string family;
    {
      absl::MutexLock l(&compact_mu_);
      compact_mu_.Await(absl::Condition(
          +[](AdapterRegistry* r) ABSL_EXCLUSIVE_LOCKS_REQUIRED(r->compact_mu_) {
            return r->stop_ || !r->compact_queue_.empty();
          },
          this));
      if (stop_) return;
      family = compact_queue_.front();
      compacting_ = true;
    }
    absl::Status st = CompactLatest(family);
    if (!st.ok()) std::cerr << "metatt registry: compacting " << family << ": " << st << "\n";
    ReleaseFreedHeap();
    absl::MutexLock l(&compact_mu_);
    compact_queue_.pop_front();
    compacting_ = false;
  }
}

// Writes the family's latest version in full, if it is an appended one
// (family.json last: the commit point), and records its whole task list, so
// that loading it reads no parent.
absl::Status AdapterRegistry::CompactLatest(const std::string& family) {
  std::shared_ptr<const PublishedFamily> fam;
  {
    absl::MutexLock l(&mu_);
    auto it = latest_.find(family);
    if (it != latest_.end()) fam = it->second;
  }
  if (fam == nullptr || fam->chain_length == 0) return absl::OkStatus();  // deleted or full
  const int64_t version = fam->version();
  if (!catalog_->VersionHoldsFullFamily(fam->record.path)) {
    ASSIGN_OR_RETURN(const std::string dir, catalog_->Fetch(fam->record.path));
    ASSIGN_OR_RETURN(auto exact, fam->ExactHeads());
    RETURN_IF_ERROR(WriteFullFamily(dir, *fam->adapter, fam->record, fam->pooling_name,
                                    fam->max_length, exact.first, exact.second));
    // With a blob store the full files are objects before the row says "full".
    RETURN_IF_ERROR(catalog_->UploadNewFiles(fam->record.path));
  }
  absl::Status st = store_->CompactFamilyVersion(family, version, fam->record.tasks);
  if (absl::IsNotFound(st)) return absl::OkStatus();  // deleted meanwhile
  RETURN_IF_ERROR(st);
  fam->chain_length = 0;
  // The versions appended after this one now count from it.
  std::shared_ptr<const PublishedFamily> latest;
  {
    absl::MutexLock l(&mu_);
    auto it = latest_.find(family);
    if (it != latest_.end()) latest = it->second;
  }
  if (latest != nullptr && latest->version() > version) {
    latest->chain_length = std::min<int64_t>(latest->chain_length, latest->version() - version);
  }
  return absl::OkStatus();
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
  auto rec = store_->GetFamilyVersion(family, version);
  if (absl::IsNotFound(rec.status())) {
    return absl::NotFoundError(
        absl::StrCat("adapter family '", family, "' has no version ", version));
  }
  if (!rec.ok()) return rec.status();
  ASSIGN_OR_RETURN(std::shared_ptr<PublishedFamily> fam, LoadVersion(*rec));
  std::shared_ptr<const PublishedFamily> result = std::move(fam);
  absl::MutexLock l(&mu_);
  older_[{family, version}] = result;
  return result;
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
    const int64_t index = fam->task_by_name.Find(task_name);
    if (index < 0) {
      return absl::NotFoundError(absl::StrCat("task: '", task_name, "' not found in family '",
                                              name, "' v", fam->version()));
    }
    r.task = index;
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
  const int64_t removed = fam->task_by_name.Find(task);
  if (removed < 0) {
    return absl::NotFoundError(
        absl::StrCat("task '", task, "' not found in family '", family, "'"));
  }
  if (fam->num_tasks() == 1) {
    return absl::FailedPreconditionError(absl::StrCat(
        "task '", task, "' is the last task of family '", family, "'; delete the family"));
  }
  // The float32 heads as published, not the (maybe compact) resident copy.
  ASSIGN_OR_RETURN(auto exact, fam->ExactHeads());
  PublishRequest req;
  req.family = family;
  req.pooling = fam->pooling_name;
  req.max_length = fam->max_length;
  req.created_by_job = absl::StrCat("delete-task:", task);
  req.base_version = fam->version();  // an add-task published meanwhile is not undone
  if (fam->adapter.is_lora()) {
    req.lora = fam->adapter.lora();  // the same LoRA, one head fewer
  } else {
    req.config = fam->adapter->config();
    req.config.num_tasks = fam->num_tasks() - 1;
    req.scale = fam->adapter->scale();
  }
  for (const auto& [k, v] : fam->adapter.is_lora()
                                ? std::vector<std::pair<std::string, torch::Tensor>>{}
                                : fam->adapter->NamedParameters()) {
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
    req.tasks.push_back(t);
    req.head_weights.push_back(exact.first[t.index].slice(0, 0, t.num_labels));
    req.head_biases.push_back(exact.second[t.index].slice(0, 0, t.num_labels));
  }
  return Publish(req);
}

absl::StatusOr<std::map<std::string, std::string>> AdapterRegistry::ExportFiles(
    const std::string& family, int64_t version) {
  ASSIGN_OR_RETURN(std::shared_ptr<const PublishedFamily> fam, Get(family, version));
  ASSIGN_OR_RETURN(std::string dir, catalog_->Fetch(fam->record.path));
  std::string scratch;
  if (!FamilyCatalog::HoldsFullFamily(dir)) {
    // An appended version not compacted yet: written in full to a scratch
    // directory (the export format is always the whole family).
    ASSIGN_OR_RETURN(scratch, catalog_->MakeImportScratch());
    ASSIGN_OR_RETURN(auto exact, fam->ExactHeads());
    absl::Status st = WriteFullFamily(scratch, *fam->adapter, fam->record, fam->pooling_name,
                                      fam->max_length, exact.first, exact.second);
    if (!st.ok()) {
      std::error_code ec;
      fs::remove_all(scratch, ec);
      return st;
    }
    dir = scratch;
  }
  absl::Cleanup remove_scratch = [&scratch] {
    std::error_code ec;
    if (!scratch.empty()) fs::remove_all(scratch, ec);
  };
  std::map<std::string, std::string> files;
  const std::vector<const char*> names =
      fam->adapter.is_lora()
          ? std::vector<const char*>{kPeftConfigFile, kPeftWeightsFile, kFamilyHeadsFile, kMetaFile}
          : std::vector<const char*>{kTensorsFile, kMetaFile};
  for (const char* name : names) {
    ASSIGN_OR_RETURN(files[name], ReadFileToString((fs::path(dir) / name).string()));
  }
  return files;
}

absl::StatusOr<std::shared_ptr<const PublishedFamily>> AdapterRegistry::Import(
    const std::string& family, const std::map<std::string, std::string>& files,
    const std::string& tenant) {
  if (files.count(kPeftConfigFile)) return ImportLora(family, files, tenant);
  auto meta_it = files.find(kMetaFile);
  auto tensors_it = files.find(kTensorsFile);
  if (meta_it == files.end() || tensors_it == files.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("files: ", kMetaFile, " and ", kTensorsFile, " are required"));
  }
  json meta = json::parse(meta_it->second, nullptr, /*allow_exceptions=*/false);
  if (meta.is_discarded() || !meta.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat("files: malformed ", kMetaFile));
  }
  const json fp_field = meta.value("base_config_fingerprint", json());
  const std::string fp = fp_field.is_string() ? fp_field.get<std::string>() : "";
  if (!options_.base_model_fingerprint.empty() && fp != options_.base_model_fingerprint) {
    return absl::FailedPreconditionError(absl::StrCat(
        "files: the family was trained on another base model (fingerprint ", fp, ")"));
  }
  std::string name = family;
  if (name.empty() && meta.contains("extra") && meta["extra"].is_object() &&
      meta["extra"].contains("family") && meta["extra"]["family"].is_string()) {
    // The exported key's name, in the importing tenant's namespace (store.h
    // FamilyKey): a file never picks another tenant's key.
    name = FamilyKey(tenant, FamilyKeyName(meta["extra"]["family"].get<std::string>()));
  }
  RETURN_IF_ERROR(ValidateFamilyName(name));
  if (Get(name, 0).ok()) {
    return absl::AlreadyExistsError(absl::StrCat("family: '", name, "' already exists"));
  }
  // The library validates (hash, shapes, fingerprint) from a scratch directory.
  ASSIGN_OR_RETURN(const std::string scratch_dir, catalog_->MakeImportScratch());
  const fs::path scratch = scratch_dir;
  std::error_code ec;
  absl::Status st = WriteFileAtomically((scratch / kMetaFile).string(), meta_it->second);
  if (st.ok()) st = WriteFileAtomically((scratch / kTensorsFile).string(), tensors_it->second);
  absl::StatusOr<LoadedFamily> loaded = absl::InternalError("unset");
  if (st.ok()) {
    loaded = LoadFamily(scratch.string(), options_.base_model_fingerprint, torch::kCPU,
                        MetaTTAdapter::Leaves::kFrozen);
  } else {
    loaded = st;
  }
  fs::remove_all(scratch, ec);
  if (!loaded.ok()) return ImportLoadError(loaded.status());
  ASSIGN_OR_RETURN(PublishRequest req, RequestFromLoaded(*loaded, "files"));
  req.family = name;
  req.created_by_job = "import";
  // The key names its owner (store.h): an admin importing "beta~x" imports
  // it for tenant beta, not for the admin's own tenant.
  req.tenant = FamilyKeyTenant(name);
  req.base_version = 0;  // a new family: refused if one appeared meanwhile
  return Publish(req);
}

absl::StatusOr<std::shared_ptr<PublishedFamily>> AdapterRegistry::LoadLoraVersion(
    const FamilyVersionRecord& record) {
  const std::string where = absl::StrCat("family ", record.family, " v", record.version);
  const std::string dir = catalog_->LocalDir(record.path);  // fetched by LoadFullVersion
  auto loaded = LoadLoraFamily(dir, options_.base_model_fingerprint);
  if (!loaded.ok()) return VersionLoadError(loaded.status(), where);
  std::string pooling = "mean";
  int64_t max_length = 128;
  try {
    if (loaded->extra.is_object()) {
      pooling = loaded->extra.value("pooling", pooling);
      max_length = loaded->extra.value("max_length", max_length);
    }
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": family.json extra: ", e.what()));
  }
  FamilyVersionRecord rec = record;
  if (rec.tasks.empty()) {
    ASSIGN_OR_RETURN(rec.tasks, LoraTaskRecords(*loaded, where));
  }
  std::sort(rec.tasks.begin(), rec.tasks.end(),
            [](const TaskRecord& a, const TaskRecord& c) { return a.index < c.index; });
  std::vector<torch::Tensor> ws, bs;
  for (const TaskRecord& t : rec.tasks) {
    auto w = loaded->heads.find(t.name + ".weight");
    if (w == loaded->heads.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": ", kFamilyHeadsFile, " has no head for task '", t.name, "'"));
    }
    ws.push_back(w->second);
    bs.push_back(loaded->heads.at(t.name + ".bias"));
  }
  torch::Tensor weight, bias;
  RETURN_IF_ERROR(StackHeads(ws, bs, &weight, &bias));
  ASSIGN_OR_RETURN(std::shared_ptr<PublishedFamily> fam,
                   BuildFamily(std::move(rec), MetaTTConfig(), 1.0, {}, weight, bias, pooling,
                               max_length, options_.device, head_dtype_, loaded->adapter.get()));
  fam->full_dir = dir;
  return fam;
}

absl::StatusOr<std::shared_ptr<const PublishedFamily>> AdapterRegistry::ImportLora(
    const std::string& family, const std::map<std::string, std::string>& files,
    const std::string& tenant) {
  for (const char* need : {kPeftConfigFile, kPeftWeightsFile, kFamilyHeadsFile}) {
    if (!files.count(need)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "files: a LoRA family needs ", kPeftConfigFile, ", ", kPeftWeightsFile, " and ",
          kFamilyHeadsFile, " (", need, " is missing)"));
    }
  }
  for (const auto& [name, bytes] : files) {
    if (name != kPeftConfigFile && name != kPeftWeightsFile && name != kFamilyHeadsFile &&
        name != kMetaFile) {
      return absl::InvalidArgumentError(absl::StrCat(
          "files: '", name, "' is not part of a LoRA family (", kPeftConfigFile, ", ",
          kPeftWeightsFile, ", ", kFamilyHeadsFile, ", ", kMetaFile, ")"));
    }
  }
  // The library validates (config, shapes, hashes, fingerprint) from a scratch directory.
  ASSIGN_OR_RETURN(const std::string scratch_dir, catalog_->MakeImportScratch());
  const fs::path scratch = scratch_dir;
  absl::Status st = absl::OkStatus();
  for (const auto& [name, bytes] : files) {
    if (st.ok()) st = WriteFileAtomically((scratch / name).string(), bytes);
  }
  absl::StatusOr<LoadedLoraFamily> loaded =
      st.ok() ? LoadLoraFamily(scratch.string(), options_.base_model_fingerprint)
              : absl::StatusOr<LoadedLoraFamily>(st);
  std::error_code ec;
  fs::remove_all(scratch, ec);
  if (!loaded.ok()) return ImportLoadError(loaded.status());
  std::string name = family;
  if (name.empty() && loaded->extra.is_object() && loaded->extra.contains("family") &&
      loaded->extra["family"].is_string()) {
    // The exported key's name, in the importing tenant's namespace (store.h FamilyKey).
    name = FamilyKey(tenant, FamilyKeyName(loaded->extra["family"].get<std::string>()));
  }
  if (name.empty()) {
    return absl::InvalidArgumentError(
        "family: required: the PEFT folder has no family.json naming its family");
  }
  RETURN_IF_ERROR(ValidateFamilyName(name));
  if (Get(name, 0).ok()) {
    return absl::AlreadyExistsError(absl::StrCat("family: '", name, "' already exists"));
  }
  PublishRequest req;
  req.family = name;
  req.lora = loaded->adapter.get();
  try {
    if (loaded->extra.is_object()) {
      req.pooling = loaded->extra.value("pooling", std::string("mean"));
      req.max_length = loaded->extra.value("max_length", int64_t{128});
    }
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("files: family.json extra: ", e.what()));
  }
  ASSIGN_OR_RETURN(req.tasks, LoraTaskRecords(*loaded, "files"));
  for (const TaskRecord& t : req.tasks) {
    req.head_weights.push_back(loaded->heads.at(t.name + ".weight"));
    req.head_biases.push_back(loaded->heads.at(t.name + ".bias"));
  }
  req.created_by_job = "import";
  // The key names its owner (store.h): an admin importing "beta~x" imports
  // it for tenant beta, not for the admin's own tenant.
  req.tenant = FamilyKeyTenant(name);
  req.base_version = 0;  // a new family: refused if one appeared meanwhile
  return Publish(req);
}

absl::StatusOr<std::vector<std::string>> AdapterRegistry::Refresh() {
  // Serialised with Publish: a family published here between our listing
  // and our swap must not look deleted.
  absl::MutexLock publish_lock(&publish_mu_);
  // Summaries (no task lists): a poll reads in full only the versions it loads.
  ASSIGN_OR_RETURN(std::vector<FamilyVersionRecord> all, store_->ListFamilyVersionSummaries(""));
  std::map<std::string, const FamilyVersionRecord*> newest;
  for (const auto& r : all) {
    auto& slot = newest[r.family];
    if (slot == nullptr || r.version > slot->version) slot = &r;
  }
  std::vector<const FamilyVersionRecord*> to_load;
  std::vector<std::string> changed;
  {
    absl::MutexLock l(&mu_);
    for (const auto& [name, rec] : newest) {
      auto it = latest_.find(name);
      if (it != latest_.end() && it->second->version() >= rec->version) continue;
      auto failed = refresh_failed_.find(name);
      if (failed != refresh_failed_.end() && failed->second >= rec->version) continue;
      to_load.push_back(rec);
    }
    for (auto it = latest_.begin(); it != latest_.end();) {
      if (newest.count(it->first) > 0) {
        ++it;
        continue;
      }
      changed.push_back("-" + it->first);
      for (auto o = older_.begin(); o != older_.end();) {
        o = o->first.first == it->first ? older_.erase(o) : std::next(o);
      }
      it = latest_.erase(it);
    }
  }
  // Load outside the lock: serving goes on with the old versions meanwhile.
  for (const FamilyVersionRecord* rec : to_load) {
    auto full = store_->GetFamilyVersion(rec->family, rec->version);
    if (!full.ok()) {  // deleted meanwhile, or the store is away: the next poll retries
      std::cerr << "metatt registry: cannot read " << rec->family << " v" << rec->version << ": "
                << full.status() << "\n";
      continue;
    }
    auto fam = LoadVersion(*full, /*extend_storage=*/true);  // under publish_mu_
    absl::MutexLock l(&mu_);
    if (!fam.ok()) {
      refresh_failed_[rec->family] = rec->version;
      std::cerr << "metatt registry: cannot load " << rec->family << " v" << rec->version << ": "
                << fam.status() << "\n";
      continue;
    }
    auto it = latest_.find(rec->family);
    if (it != latest_.end()) {
      if (it->second->version() >= rec->version) continue;  // published here meanwhile
      older_[{rec->family, it->second->version()}] = it->second;
    }
    latest_[rec->family] = std::move(*fam);
    changed.push_back(absl::StrCat(rec->family, " v", rec->version));
  }
  return changed;
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

ResidentStats AdapterRegistry::ResidentBytes() const {
  ResidentStats r;
  for (const auto& f : Latest()) r += f->Resident();  // walks the records outside mu_
  return r;
}

int64_t AdapterRegistry::ResidentTasks() const {
  absl::MutexLock l(&mu_);
  int64_t n = 0;
  for (const auto& [k, v] : latest_) n += v->num_tasks();
  return n;
}

}  // namespace metatt
