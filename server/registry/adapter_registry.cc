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

absl::Status ValidateFamilyName(const std::string& name) {
  return ValidateName(name, "family");  // the one name rule (server/jobs/job_validation.h)
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

// Task records of a family in the library's format: the registry's records
// from extra.tasks where present; a family written by metatt-train has none
// (num_labels from its head, regression = a single output).
absl::StatusOr<std::vector<TaskRecord>> TaskRecordsOf(const LoadedFamily& lf,
                                                      const std::string& where) {
  std::map<int64_t, TaskRecord> by_index;
  try {
    if (lf.extra.is_object() && lf.extra.contains("tasks") && lf.extra["tasks"].is_array()) {
      for (const auto& t : lf.extra["tasks"]) {
        TaskRecord r = TaskFromJson(t);
        by_index[r.index] = r;
      }
    }
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": family.json extra.tasks: ", e.what()));
  }
  auto sn = lf.heads.find("stacked.num_labels");
  std::vector<TaskRecord> out;
  for (int64_t t = 0; t < static_cast<int64_t>(lf.task_names.size()); ++t) {
    auto it = by_index.find(t);
    TaskRecord r = it != by_index.end() ? it->second : TaskRecord();
    r.name = lf.task_names[t];
    r.index = t;
    if (sn != lf.heads.end() && t < sn->second.size(0) && !lf.heads.count(r.name + ".weight")) {
      r.num_labels = sn->second[t].item<int64_t>();
    } else {
      auto head = FamilyTaskHead(lf, t);
      if (!head.ok()) return absl::InvalidArgumentError(absl::StrCat(where, ": ", head.status().message()));
      r.num_labels = head->first.size(0);
    }
    if (it == by_index.end()) r.regression = r.num_labels == 1;
    out.push_back(std::move(r));
  }
  return out;
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

// Builds the in-memory family from tensors (any device).
absl::StatusOr<std::shared_ptr<PublishedFamily>> BuildFamily(
    FamilyVersionRecord record, const MetaTTConfig& config, double scale,
    const std::map<std::string, torch::Tensor>& adapter_tensors, const torch::Tensor& weight,
    const torch::Tensor& bias, const std::string& pooling, int64_t max_length,
    torch::Device device, torch::ScalarType head_dtype) {
  auto fam = std::make_shared<PublishedFamily>();
  ASSIGN_OR_RETURN(fam->adapter,
                   MetaTTAdapter::FromTensors(config, scale, adapter_tensors, device,
                                              MetaTTAdapter::Leaves::kFrozen));  // never trains
  const int64_t T = static_cast<int64_t>(record.tasks.size());
  if (T == 0) return absl::InvalidArgumentError("family has no task");
  if (T > int64_t{std::numeric_limits<uint32_t>::max()}) {
    return absl::InvalidArgumentError(absl::StrCat("family ", record.family, ": ", T, " tasks"));
  }
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
  }
  ASSIGN_OR_RETURN(fam->pooling, ParsePooling(pooling));
  fam->pooling_name = pooling;
  fam->max_length = max_length;
  // Resident copy in head_dtype (from float32: rounding to nearest); the
  // caller writes the float32 `weight` / `bias` to disk, never this copy.
  RETURN_IF_ERROR(TorchTry("moving heads to the device", [&] {
    fam->head_weight = weight.detach().to(device, head_dtype).contiguous();
    fam->head_bias = bias.detach().to(device, head_dtype).contiguous();
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
      if (dash != std::string::npos && stale(e.path(), n.substr(dash + 1), false)) {
        fs::remove_all(e.path(), ec);
      }
    }
  }
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
  // Compact resident heads: read the float32 ones back the way LoadVersion does.
  const std::string where = absl::StrCat("family ", family(), " v", version());
  auto loaded = LoadFamily(record.path, record.base_model_fingerprint, torch::kCPU,
                           MetaTTAdapter::Leaves::kFrozen);
  if (!loaded.ok()) {
    return absl::Status(loaded.status().code(),
                        absl::StrCat(where, ": reading float32 heads: ", loaded.status().message()));
  }
  torch::Tensor weight, bias;
  auto sw = loaded->heads.find("stacked.weight");
  if (sw != loaded->heads.end() && sw->second.size(0) == num_tasks()) {
    weight = sw->second;
    bias = loaded->heads.at("stacked.bias");
  } else {
    ASSIGN_OR_RETURN(PublishRequest req, RequestFromLoaded(*loaded, where));
    RETURN_IF_ERROR(StackHeads(req.head_weights, req.head_biases, &weight, &bias));
  }
  if (weight.sizes() != head_weight.sizes() || bias.sizes() != head_bias.sizes()) {
    return absl::DataLossError(absl::StrCat(where, ": the heads in ", record.path,
                                            " do not match the resident ones"));
  }
  return std::make_pair(weight.to(torch::kFloat32), bias.to(torch::kFloat32));
}

ResidentStats PublishedFamily::Resident() const {
  ResidentStats r;
  for (const torch::Tensor* t : {&head_weight, &head_bias}) {
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
  if (options.data_dir.empty()) return absl::InvalidArgumentError("registry: data_dir is empty");
  std::error_code ec;
  fs::create_directories(fs::path(options.data_dir) / "families", ec);
  if (ec) {
    return absl::InternalError(
        absl::StrCat("cannot create ", options.data_dir, "/families: ", ec.message()));
  }
  RemoveCrashLeftovers(fs::path(options.data_dir) / "families");
  return std::unique_ptr<AdapterRegistry>(new AdapterRegistry(options, store, head_dtype));
}

absl::StatusOr<std::shared_ptr<PublishedFamily>> AdapterRegistry::LoadVersion(
    const FamilyVersionRecord& record) {
  const std::string where = absl::StrCat("family ", record.family, " v", record.version);
  auto loaded = LoadFamily(record.path, options_.base_model_fingerprint, torch::kCPU,
                           MetaTTAdapter::Leaves::kFrozen);
  if (!loaded.ok()) {
    const bool other_base = loaded.status().code() == absl::StatusCode::kFailedPrecondition;
    return absl::Status(loaded.status().code(),
                        absl::StrCat(where, other_base ? ": trained on another base model: " : ": ",
                                     loaded.status().message()));
  }
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
  return BuildFamily(std::move(rec), req.config, req.scale, req.adapter_tensors, weight, bias,
                     req.pooling, req.max_length, options_.device, head_dtype_);
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
  std::map<std::string, const FamilyVersionRecord*> newest;
  for (const auto& r : all) {
    auto& slot = newest[r.family];
    if (slot == nullptr || r.version > slot->version) slot = &r;
  }
  std::vector<std::string> warnings;
  for (const auto& [name, summary] : newest) {
    auto rec = store_->GetFamilyVersion(name, summary->version);
    auto fam = rec.ok() ? LoadVersion(*rec) : rec.status();
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
  ++version;

  // Stack the heads: [T, max_labels, D] / [T, max_labels].
  torch::Tensor weight, bias;
  RETURN_IF_ERROR(StackHeads(req.head_weights, req.head_biases, &weight, &bias));

  FamilyVersionRecord record;
  record.family = req.family;
  record.version = version;
  record.form = TTFormName(req.config.form);
  record.config_json = req.config.ToJson().dump();
  record.base_model_fingerprint = options_.base_model_fingerprint;
  for (const auto& [k, v] : req.adapter_tensors) record.adapter_parameters += v.numel();
  record.tasks = req.tasks;
  record.task_count = static_cast<int64_t>(T);
  for (size_t t = 0; t < T; ++t) {
    record.tasks[t].index = static_cast<int64_t>(t);
    record.tasks[t].num_labels = req.head_weights[t].size(0);
  }
  record.created_by_job = req.created_by_job;
  record.created_unix_ms = NowMs();
  if (!existing.empty()) {
    record.tenant = existing.back().tenant;  // a family never changes hands
  } else if (!req.tenant.empty()) {
    record.tenant = req.tenant;
  } else if (!req.created_by_job.empty()) {
    auto job = store_->GetJob(req.created_by_job);
    if (job.ok()) record.tenant = job->tenant;
  }

  const fs::path family_dir = fs::path(options_.data_dir) / "families" / req.family;
  const fs::path final_dir = family_dir / absl::StrCat("v", version);
  const fs::path tmp_dir = family_dir / absl::StrCat(".tmp-v", version, "-", ScratchOwner());
  record.path = final_dir.string();

  // Build first: a family that cannot be served is never written.
  ASSIGN_OR_RETURN(std::shared_ptr<PublishedFamily> fam,
                   BuildFamily(record, req.config, req.scale, req.adapter_tensors, weight, bias,
                               req.pooling, req.max_length, options_.device, head_dtype_));

  std::error_code ec;
  fs::remove_all(tmp_dir, ec);
  fs::create_directories(tmp_dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", tmp_dir.string()));
  // adapters/family_io format: cores + stacked heads, registry metadata in "extra".
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
  json extra = {{"family", req.family},
                {"version", version},
                {"pooling", req.pooling},
                {"max_length", req.max_length},
                {"created_by_job", req.created_by_job},
                {"tasks", json::array()}};
  for (const auto& t : record.tasks) extra["tasks"].push_back(TaskToJson(t));
  absl::Status st = SaveFamily(tmp_dir.string(), *fam->adapter, task_names, heads,
                               /*base_model_id=*/"", options_.base_model_fingerprint, extra);
  bool renamed = false;
  if (st.ok()) {
    // Several replicas share data_dir: if another one published this version
    // meanwhile, its directory is not ours to replace.
    auto known = store_->ListFamilyVersionSummaries(req.family);
    if (known.ok() && std::any_of(known->begin(), known->end(), [&](const FamilyVersionRecord& r) {
          return r.version == version;
        })) {
      st = absl::AlreadyExistsError(absl::StrCat("family ", req.family, " version ", version,
                                                 " was published concurrently by another replica"));
    }
  }
  if (st.ok()) {
    fs::remove_all(final_dir, ec);  // a leftover of a crash before the Store knew it
    fs::rename(tmp_dir, final_dir, ec);
    if (ec) st = absl::InternalError(absl::StrCat("rename to ", final_dir.string(), ": ",
                                                  ec.message()));
    renamed = st.ok();
  }
  if (st.ok()) st = store_->PublishFamilyVersion(record);
  if (!st.ok()) {
    fs::remove_all(tmp_dir, ec);
    if (renamed) fs::remove_all(final_dir, ec);
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
    req.tasks.push_back(t);
    req.head_weights.push_back(exact.first[t.index].slice(0, 0, t.num_labels));
    req.head_biases.push_back(exact.second[t.index].slice(0, 0, t.num_labels));
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
    const std::string& family, const std::map<std::string, std::string>& files,
    const std::string& tenant) {
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
    name = meta["extra"]["family"].get<std::string>();
  }
  RETURN_IF_ERROR(ValidateFamilyName(name));
  if (Get(name, 0).ok()) {
    return absl::AlreadyExistsError(absl::StrCat("family: '", name, "' already exists"));
  }
  // The library validates (hash, shapes, fingerprint) from a scratch directory.
  static std::atomic<int64_t> import_seq{0};
  const fs::path scratch = fs::path(options_.data_dir) / "families" /
                           absl::StrCat(".import-", ScratchOwner(), "-", import_seq++);
  std::error_code ec;
  fs::remove_all(scratch, ec);
  fs::create_directories(scratch, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", scratch.string()));
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
  if (!loaded.ok()) {
    const auto code = loaded.status().code() == absl::StatusCode::kFailedPrecondition
                          ? absl::StatusCode::kFailedPrecondition
                          : absl::StatusCode::kInvalidArgument;
    return absl::Status(code, absl::StrCat("files: ", loaded.status().message()));
  }
  ASSIGN_OR_RETURN(PublishRequest req, RequestFromLoaded(*loaded, "files"));
  req.family = name;
  req.created_by_job = "import";
  req.tenant = tenant;
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
    auto fam = LoadVersion(*full);
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
