#include "server/training/checkpoint.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "base/file_io.h"
#include "base/safetensors.h"
#include "base/status_macros.h"

namespace metatt {
namespace {

using json = nlohmann::json;

constexpr char kStateKey[] = "metatt.trainer_state";
constexpr int kFormatVersion = 1;

json EvalToJson(const EvalEvent& e) {
  json j;
  j["step"] = e.step;
  j["score"] = e.score;
  j["is_best"] = e.is_best;
  j["metrics"] = json::object();
  for (const auto& [task, ms] : e.metrics) {
    for (const auto& [name, v] : ms) j["metrics"][task][name] = v;
  }
  return j;
}

EvalEvent EvalFromJson(const json& j) {
  EvalEvent e;
  e.step = j.at("step").get<int64_t>();
  e.score = j.at("score").get<double>();
  e.is_best = j.at("is_best").get<bool>();
  for (const auto& [task, ms] : j.at("metrics").items()) {
    for (const auto& [name, v] : ms.items()) e.metrics[task][name] = v.get<double>();
  }
  return e;
}

absl::Status Mismatch(const std::string& path, const std::string& what) {
  return absl::FailedPreconditionError(
      absl::StrCat("checkpoint ", path, ": ", what, " (was the job's trainer built differently?)"));
}

// The "summary" object of a checkpoint's state JSON -> info.
TrainerCheckpointInfo InfoFromSummary(const std::string& path, const json& s) {
  TrainerCheckpointInfo info;
  info.path = path;
  info.step = s.value("step", int64_t{0});
  info.total_steps = s.value("total_steps", int64_t{0});
  info.time_unix_ms = s.value("time_unix_ms", int64_t{0});
  if (s.contains("metrics") && s["metrics"].is_object()) {
    for (const auto& [k, v] : s["metrics"].items()) {
      if (v.is_number()) info.metrics[k] = v.get<double>();
    }
  }
  return info;
}

// Reads only the safetensors header's "__metadata__" of `path`.
absl::StatusOr<json> ReadStateHeader(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("checkpoint ", path, ": cannot open"));
  unsigned char len_bytes[8];
  if (!in.read(reinterpret_cast<char*>(len_bytes), 8)) {
    return absl::DataLossError(absl::StrCat("checkpoint ", path, ": truncated header length"));
  }
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | len_bytes[i];
  if (n == 0 || n > (64u << 20)) {
    return absl::DataLossError(absl::StrCat("checkpoint ", path, ": bad header length ", n));
  }
  std::string header(n, '\0');
  if (!in.read(header.data(), static_cast<std::streamsize>(n))) {
    return absl::DataLossError(absl::StrCat("checkpoint ", path, ": truncated header"));
  }
  json h = json::parse(header, nullptr, /*allow_exceptions=*/false);
  if (h.is_discarded() || !h.is_object() || !h.contains("__metadata__") ||
      !h["__metadata__"].contains(kStateKey) || !h["__metadata__"][kStateKey].is_string()) {
    return absl::DataLossError(absl::StrCat("checkpoint ", path, ": no trainer state in header"));
  }
  json state = json::parse(h["__metadata__"][kStateKey].get<std::string>(), nullptr, false);
  if (state.is_discarded() || !state.is_object()) {
    return absl::DataLossError(absl::StrCat("checkpoint ", path, ": trainer state is not JSON"));
  }
  return state;
}

// step-000000042.ckpt -> 42; -1 when the name is not a checkpoint's.
int64_t StepOfName(const std::string& name) {
  constexpr char kPrefix[] = "step-";
  constexpr char kSuffix[] = ".ckpt";
  if (name.size() <= 10 || name.rfind(kPrefix, 0) != 0 ||
      name.compare(name.size() - 5, 5, kSuffix) != 0) {
    return -1;
  }
  const std::string digits = name.substr(5, name.size() - 10);
  if (digits.empty() || digits.size() > 15) return -1;
  int64_t v = 0;
  for (char c : digits) {
    if (c < '0' || c > '9') return -1;
    v = v * 10 + (c - '0');
  }
  return v;
}

}  // namespace

absl::Status Trainer::SaveState(const std::string& path) const {
  if (failed_) return absl::FailedPreconditionError("trainer failed earlier: nothing to save");
  std::map<std::string, torch::Tensor> t;
  json s;
  RETURN_IF_ERROR(TorchTry("checkpoint tensors", [&] {
    if (adapter_.snapshot) {
      for (auto& [k, v] : adapter_.snapshot()) t["adapter." + k] = v.detach().cpu();
    }
    for (const auto& task : tasks_) {
      if (task.head == nullptr) continue;
      for (auto& [k, v] : task.head->Tensors("heads." + task.name + ".")) t[k] = v.cpu();
    }
    for (const auto& [k, v] : best_tensors_) t["best." + k] = v.detach().cpu();
    // AdamW state in the optimizer's parameter order (params_).
    json opt_steps = json::array();
    auto& state = optimizer_->state();
    for (size_t i = 0; i < params_.size(); ++i) {
      auto it = state.find(params_[i].unsafeGetTensorImpl());
      if (it == state.end()) {
        opt_steps.push_back(nullptr);
        continue;
      }
      auto& ps = static_cast<torch::optim::AdamWParamState&>(*it->second);
      opt_steps.push_back(ps.step());
      t[absl::StrCat("opt.", i, ".exp_avg")] = ps.exp_avg().detach().cpu();
      t[absl::StrCat("opt.", i, ".exp_avg_sq")] = ps.exp_avg_sq().detach().cpu();
      if (ps.max_exp_avg_sq().defined()) {
        t[absl::StrCat("opt.", i, ".max_exp_avg_sq")] = ps.max_exp_avg_sq().detach().cpu();
      }
    }
    s["opt_steps"] = opt_steps;
    json shapes = json::array();
    for (const auto& p : params_) shapes.push_back(p.sizes().vec());
    s["param_shapes"] = shapes;
    std::vector<int64_t> order(order_.begin(), order_.end());
    t["order"] = torch::tensor(order, torch::kInt64);
    t["losses"] = torch::tensor(losses_, torch::kFloat64);
  }));
  s["format"] = kFormatVersion;
  s["step"] = step_;
  s["total_steps"] = total_steps_;
  s["pool_size"] = static_cast<int64_t>(pool_.size());
  s["batch_size"] = options_.batch_size;
  s["cursor"] = static_cast<int64_t>(cursor_);
  std::ostringstream rng;
  rng << rng_;
  s["rng"] = rng.str();
  s["next_schedule"] = static_cast<int64_t>(next_schedule_);
  s["evals_without_improvement"] = evals_without_improvement_;
  s["state"] = static_cast<int>(state_);
  s["examples_seen"] = examples_seen_;
  s["tokens_seen"] = tokens_seen_;
  s["train_seconds"] = absl::ToDoubleSeconds(train_time_);
  s["last_lr"] = last_lr_;
  s["last_grad_norm"] = last_grad_norm_;
  if (last_eval_) s["last_eval"] = EvalToJson(*last_eval_);
  if (best_eval_) s["best_eval"] = EvalToJson(*best_eval_);
  json sweeps = json::array();
  for (const SweepEvent& sv : sweeps_) {
    json j;
    j["step"] = sv.step;
    j["epoch"] = sv.epoch;
    j["max_rank"] = sv.max_rank;
    j["bonds"] = json::array();
    for (const auto& b : sv.bonds) {
      j["bonds"].push_back({b.bond, b.old_rank, b.new_rank, b.discarded_weight});
    }
    sweeps.push_back(j);
  }
  s["sweeps"] = sweeps;
  json summary;
  summary["step"] = step_;
  summary["total_steps"] = total_steps_;
  summary["time_unix_ms"] = absl::ToUnixMillis(absl::Now());
  json metrics = json::object();
  if (!losses_.empty()) metrics["loss"] = losses_.back();
  if (last_eval_ && last_eval_->step == step_) {
    for (const auto& [task, ms] : last_eval_->metrics) {
      for (const auto& [name, v] : ms) metrics[absl::StrCat(task, "/", name)] = v;
    }
    metrics["score"] = last_eval_->score;
  }
  summary["metrics"] = metrics;
  s["summary"] = summary;
  return WriteSafetensors(path, t, {{kStateKey, s.dump()}});
}

absl::Status Trainer::RestoreState(const std::string& path) {
  if (step_ != 0 || failed_) {
    return absl::FailedPreconditionError("RestoreState needs a freshly created trainer");
  }
  ASSIGN_OR_RETURN(SafetensorsFile file, ReadSafetensors(path));
  auto meta = file.metadata.find(kStateKey);
  if (meta == file.metadata.end()) {
    return absl::DataLossError(absl::StrCat("checkpoint ", path, ": no trainer state"));
  }
  json s = json::parse(meta->second, nullptr, /*allow_exceptions=*/false);
  if (s.is_discarded() || !s.is_object()) {
    return absl::DataLossError(absl::StrCat("checkpoint ", path, ": trainer state is not JSON"));
  }
  std::map<std::string, torch::Tensor>& t = file.tensors;
  auto tensor = [&](const std::string& name) -> absl::StatusOr<torch::Tensor> {
    auto it = t.find(name);
    if (it == t.end()) {
      return absl::DataLossError(absl::StrCat("checkpoint ", path, ": tensor '", name, "' missing"));
    }
    return it->second;
  };
  try {
    if (s.value("format", 0) != kFormatVersion) {
      return Mismatch(path, absl::StrCat("format ", s.value("format", 0), " (this build reads ",
                                         kFormatVersion, ")"));
    }
    if (s.at("total_steps").get<int64_t>() != total_steps_) {
      return Mismatch(path, absl::StrCat("total_steps ", s.at("total_steps").get<int64_t>(),
                                         ", the trainer has ", total_steps_));
    }
    if (s.at("pool_size").get<int64_t>() != static_cast<int64_t>(pool_.size())) {
      return Mismatch(path, absl::StrCat("train rows ", s.at("pool_size").get<int64_t>(),
                                         ", the trainer has ", pool_.size()));
    }
    if (s.at("batch_size").get<int64_t>() != options_.batch_size) {
      return Mismatch(path, absl::StrCat("batch_size ", s.at("batch_size").get<int64_t>(),
                                         ", the trainer has ", options_.batch_size));
    }
    // DMRG sweeps already done: replay them so that the ranks match.
    const size_t next_schedule = s.at("next_schedule").get<size_t>();
    if (next_schedule > options_.rank_schedule.size()) {
      return Mismatch(path, "rank schedule position beyond this trainer's schedule");
    }
    for (size_t i = next_schedule_; i < next_schedule; ++i) {
      if (!adapter_.sweep) return Mismatch(path, "a rank sweep ran but the adapter cannot sweep");
      ASSIGN_OR_RETURN(auto bonds, adapter_.sweep(options_.rank_schedule[i].max_rank,
                                                  options_.truncation));
      (void)bonds;
    }
    next_schedule_ = next_schedule;
    // Adapter tensors (copied into the live leaves) and heads.
    std::map<std::string, torch::Tensor> adapter_tensors;
    for (const auto& [k, v] : t) {
      if (k.rfind("adapter.", 0) == 0) adapter_tensors[k.substr(8)] = v;
    }
    if (adapter_.snapshot) {
      if (!adapter_.restore) {
        return absl::FailedPreconditionError("adapter binding cannot restore a snapshot");
      }
      const auto live = adapter_.snapshot();
      for (const auto& [k, v] : live) {
        auto it = adapter_tensors.find(k);
        if (it == adapter_tensors.end()) return Mismatch(path, absl::StrCat("no adapter tensor '", k, "'"));
        if (!it->second.sizes().equals(v.sizes())) {
          return Mismatch(path, absl::StrCat("adapter tensor '", k, "' has shape ",
                                             c10::str(it->second.sizes()), ", the adapter ",
                                             c10::str(v.sizes())));
        }
      }
      RETURN_IF_ERROR(adapter_.restore(adapter_tensors));
    }
    for (auto& task : tasks_) {
      if (task.head == nullptr) continue;
      RETURN_IF_ERROR(task.head->Load(t, "heads." + task.name + "."));
    }
    if (adapter_.after_step) adapter_.after_step();
    // A fresh optimizer over the (possibly swept) parameters, then its state.
    RETURN_IF_ERROR(RebuildOptimizer(/*keep_state=*/false));
    const json& shapes = s.at("param_shapes");
    const json& opt_steps = s.at("opt_steps");
    if (shapes.size() != params_.size() || opt_steps.size() != params_.size()) {
      return Mismatch(path, absl::StrCat(shapes.size(), " optimised tensors, the trainer has ",
                                         params_.size()));
    }
    auto& state = optimizer_->state();
    for (size_t i = 0; i < params_.size(); ++i) {
      const torch::Tensor& p = params_[i];
      if (shapes[i].get<std::vector<int64_t>>() != p.sizes().vec()) {
        return Mismatch(path, absl::StrCat("optimised tensor ", i, " has another shape"));
      }
      if (opt_steps[i].is_null()) continue;
      auto ps = std::make_unique<torch::optim::AdamWParamState>();
      ps->step(opt_steps[i].get<int64_t>());
      ASSIGN_OR_RETURN(torch::Tensor m, tensor(absl::StrCat("opt.", i, ".exp_avg")));
      ASSIGN_OR_RETURN(torch::Tensor v, tensor(absl::StrCat("opt.", i, ".exp_avg_sq")));
      if (!m.sizes().equals(p.sizes()) || !v.sizes().equals(p.sizes())) {
        return Mismatch(path, absl::StrCat("optimizer state ", i, " has another shape"));
      }
      ps->exp_avg(m.to(p.device(), p.scalar_type()).clone());
      ps->exp_avg_sq(v.to(p.device(), p.scalar_type()).clone());
      auto mx = t.find(absl::StrCat("opt.", i, ".max_exp_avg_sq"));
      if (mx != t.end()) ps->max_exp_avg_sq(mx->second.to(p.device(), p.scalar_type()).clone());
      state[p.unsafeGetTensorImpl()] = std::move(ps);
    }
    // Data order, cursor, RNG.
    ASSIGN_OR_RETURN(torch::Tensor order, tensor("order"));
    if (order.numel() != static_cast<int64_t>(order_.size())) {
      return Mismatch(path, "data order of another length");
    }
    auto acc = order.contiguous().data_ptr<int64_t>();
    for (size_t i = 0; i < order_.size(); ++i) {
      if (acc[i] < 0 || acc[i] >= static_cast<int64_t>(pool_.size())) {
        return absl::DataLossError(absl::StrCat("checkpoint ", path, ": data order out of range"));
      }
      order_[i] = static_cast<size_t>(acc[i]);
    }
    cursor_ = s.at("cursor").get<size_t>();
    if (cursor_ > order_.size()) return absl::DataLossError("checkpoint: cursor out of range");
    std::istringstream rng(s.at("rng").get<std::string>());
    rng >> rng_;
    if (rng.fail()) return absl::DataLossError(absl::StrCat("checkpoint ", path, ": bad RNG state"));
    // Best evaluation and its tensors, on the trainer's device.
    best_tensors_.clear();
    for (const auto& [k, v] : t) {
      if (k.rfind("best.", 0) == 0) best_tensors_[k.substr(5)] = v.to(objective_->device());
    }
    best_eval_.reset();
    last_eval_.reset();
    if (s.contains("best_eval")) best_eval_ = EvalFromJson(s["best_eval"]);
    if (s.contains("last_eval")) last_eval_ = EvalFromJson(s["last_eval"]);
    ASSIGN_OR_RETURN(torch::Tensor losses, tensor("losses"));
    losses_.assign(losses.data_ptr<double>(), losses.data_ptr<double>() + losses.numel());
    sweeps_.clear();
    for (const json& j : s.at("sweeps")) {
      SweepEvent sv;
      sv.step = j.at("step").get<int64_t>();
      sv.epoch = j.at("epoch").get<double>();
      sv.max_rank = j.at("max_rank").get<int64_t>();
      for (const json& b : j.at("bonds")) {
        sv.bonds.push_back({b[0].get<int>(), b[1].get<int64_t>(), b[2].get<int64_t>(),
                            b[3].get<double>()});
      }
      sweeps_.push_back(std::move(sv));
    }
    evals_without_improvement_ = s.at("evals_without_improvement").get<int64_t>();
    state_ = static_cast<State>(s.at("state").get<int>());
    examples_seen_ = s.at("examples_seen").get<int64_t>();
    tokens_seen_ = s.at("tokens_seen").get<int64_t>();
    train_time_ = absl::Seconds(s.at("train_seconds").get<double>());
    last_lr_ = s.at("last_lr").get<double>();
    last_grad_norm_ = s.at("last_grad_norm").get<double>();
    step_ = s.at("step").get<int64_t>();
  } catch (const std::exception& e) {
    failed_ = true;
    return absl::DataLossError(absl::StrCat("checkpoint ", path, ": ", e.what()));
  }
  return absl::OkStatus();
}

absl::StatusOr<TrainerCheckpointInfo> WriteTrainerCheckpoint(const std::string& dir,
                                                             const Trainer& trainer, int keep) {
  std::error_code ec;
  const bool existed = std::filesystem::exists(dir, ec);
  std::filesystem::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("checkpoint dir ", dir, ": ", ec.message()));
  if (!existed) {
    const std::filesystem::path parent = std::filesystem::path(dir).parent_path();
    if (!parent.empty()) RETURN_IF_ERROR(SyncDirectory(parent.string()));
  }
  const std::string path =
      (std::filesystem::path(dir) / absl::StrFormat("step-%09d.ckpt", trainer.step())).string();
  RETURN_IF_ERROR(trainer.SaveState(path));
  ASSIGN_OR_RETURN(json state, ReadStateHeader(path));
  TrainerCheckpointInfo info = InfoFromSummary(path, state.value("summary", json::object()));
  // Prune: keep the newest `keep`; drop scratch files a killed process left.
  ASSIGN_OR_RETURN(std::vector<TrainerCheckpointInfo> all, ListTrainerCheckpoints(dir));
  const size_t k = static_cast<size_t>(std::max(1, keep));
  bool removed = false;
  for (size_t i = 0; i + k < all.size(); ++i) removed |= std::filesystem::remove(all[i].path, ec);
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind("step-", 0) == 0 && name.find(".ckpt.tmp.") != std::string::npos) {
      std::error_code rm;
      removed |= std::filesystem::remove(entry.path(), rm);
    }
  }
  if (removed) RETURN_IF_ERROR(SyncDirectory(dir));
  return info;
}

absl::StatusOr<std::vector<TrainerCheckpointInfo>> ListTrainerCheckpoints(const std::string& dir) {
  std::vector<TrainerCheckpointInfo> out;
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) return out;
  std::vector<std::pair<int64_t, std::string>> files;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    const int64_t step = StepOfName(name);
    if (step >= 0) files.emplace_back(step, entry.path().string());
  }
  if (ec) return absl::InternalError(absl::StrCat("list ", dir, ": ", ec.message()));
  std::sort(files.begin(), files.end());
  for (const auto& [step, path] : files) {
    auto state = ReadStateHeader(path);
    if (!state.ok()) continue;  // unreadable: skipped (a later one may be fine)
    out.push_back(InfoFromSummary(path, state->value("summary", json::object())));
  }
  return out;
}

std::optional<TrainerCheckpointInfo> LatestTrainerCheckpoint(const std::string& dir) {
  auto all = ListTrainerCheckpoints(dir);
  if (!all.ok() || all->empty()) return std::nullopt;
  return all->back();
}

}  // namespace metatt
