#include "server/store/job_json.h"

#include <stdexcept>
#include <type_traits>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "base/enum_names.h"

namespace metatt {
namespace {

using nlohmann::json;

constexpr EnumName<JobEvent::Type> kEventTypes[] = {
    {JobEvent::Type::kState, "state"},
    {JobEvent::Type::kProgress, "progress"},
    {JobEvent::Type::kEval, "eval"},
    {JobEvent::Type::kSweep, "sweep"},
    {JobEvent::Type::kCheckpoint, "checkpoint"},
    {JobEvent::Type::kLog, "log"},
};
constexpr EnumName<JobKind> kJobKinds[] = {
    {JobKind::kTrainFamily, "TRAIN_FAMILY"},
    {JobKind::kAddTask, "ADD_TASK"},
    {JobKind::kMultiTask, "MULTI_TASK"},
};

const char* EventTypeName(JobEvent::Type t) { return NameOf(kEventTypes, t, "log"); }

std::optional<JobEvent::Type> EventTypeFromName(const std::string& n) {
  return ValueOf(kEventTypes, n);
}

template <typename T>
T Get(const json& j, const char* key, T def) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return def;
  // nlohmann converts a JSON float to an integer with a plain cast: 1e300
  // would be undefined behaviour and 1.5 silently truncated (fuzz finding
  // jobspec_float_to_int), so integers must be written as integers.
  if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
    if (!it->is_number_integer())
      throw std::invalid_argument(std::string("field '") + key + "' must be an integer");
  }
  return it->get<T>();
}

template <typename T>
void GetAuto(const json& j, const char* key, Auto<T>* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return;
  *out = Get<T>(j, key, T{});
}

template <typename T>
void Put(json& j, const char* key, const Auto<T>& v) {
  if (v.is_set()) j[key] = v.value();
}

void PutString(json& j, const char* key, const std::string& v) {
  if (!v.empty()) j[key] = v;
}

int64_t AsInt(const json& v, const char* field) {
  if (!v.is_number_integer())
    throw std::invalid_argument(std::string("field '") + field + "' entries must be integers");
  return v.get<int64_t>();
}

}  // namespace

const char* JobKindName(JobKind k) { return NameOf(kJobKinds, k, "TRAIN_FAMILY"); }

std::optional<JobKind> JobKindFromName(const std::string& name) { return ValueOf(kJobKinds, name); }

std::string JobSpecToJson(const JobSpec& s) {
  json j;
  j["kind"] = JobKindName(s.kind);
  j["family"] = s.family;
  j["idempotency_key"] = s.idempotency_key;
  json tasks = json::array();
  for (const auto& t : s.tasks) {
    tasks.push_back({{"task_name", t.task_name},
                     {"dataset_id", t.dataset_id},
                     {"eval_dataset_id", t.eval_dataset_id},
                     {"eval_fraction", t.eval_fraction},
                     {"metric", t.metric}});
  }
  j["tasks"] = tasks;
  // Only what the user set: an unset ("auto") field is absent, so the job
  // runs with the defaults of the server that executes it.
  const AdapterSpec& a = s.adapter;
  json adapter = json::object();
  PutString(adapter, "form", a.form);
  if (!a.ranks.empty()) adapter["ranks"] = a.ranks;
  if (!a.projections.empty()) adapter["projections"] = a.projections;
  PutString(adapter, "init", a.init);
  Put(adapter, "alpha", a.alpha);
  PutString(adapter, "new_task_init", a.new_task_init);
  j["adapter"] = adapter;
  const HyperParams& h = s.hparams;
  json hp = json::object();
  Put(hp, "max_steps", h.max_steps);
  Put(hp, "batch_size", h.batch_size);
  Put(hp, "learning_rate", h.learning_rate);
  Put(hp, "inner_lr_multiplier", h.inner_lr_multiplier);
  Put(hp, "head_lr_multiplier", h.head_lr_multiplier);
  Put(hp, "weight_decay", h.weight_decay);
  Put(hp, "warmup_ratio", h.warmup_ratio);
  Put(hp, "head_first_ratio", h.head_first_ratio);
  Put(hp, "grad_clip", h.grad_clip);
  Put(hp, "eval_every", h.eval_every);
  Put(hp, "max_length", h.max_length);
  Put(hp, "early_stop_patience", h.early_stop_patience);
  PutString(hp, "pooling", h.pooling);
  Put(hp, "seed", h.seed);
  if (!h.rank_schedule.empty()) {
    json sched = json::array();
    for (const auto& [epoch, rank] : h.rank_schedule) sched.push_back({epoch, rank});
    hp["rank_schedule"] = sched;
  }
  j["hparams"] = hp;
  return j.dump();
}

absl::StatusOr<JobSpec> JobSpecFromJson(const std::string& text) {
  try {
    json j = json::parse(text);
    JobSpec s;
    auto kind = JobKindFromName(Get<std::string>(j, "kind", "TRAIN_FAMILY"));
    if (!kind) return absl::InvalidArgumentError("job spec JSON: unknown kind");
    s.kind = *kind;
    s.family = Get<std::string>(j, "family", "");
    s.idempotency_key = Get<std::string>(j, "idempotency_key", "");
    for (const auto& t : j.value("tasks", json::array())) {
      JobTaskSpec ts;
      ts.task_name = Get<std::string>(t, "task_name", "");
      ts.dataset_id = Get<std::string>(t, "dataset_id", "");
      ts.eval_dataset_id = Get<std::string>(t, "eval_dataset_id", "");
      ts.eval_fraction = Get<double>(t, "eval_fraction", 0.1);
      ts.metric = Get<std::string>(t, "metric", "");
      s.tasks.push_back(std::move(ts));
    }
    // Rows written before "auto" carry every field: they load as set (the
    // values they ran with). Absent or null = unset.
    if (j.contains("adapter")) {
      const json& a = j["adapter"];
      AdapterSpec& ad = s.adapter;
      ad.form = Get<std::string>(a, "form", "");
      ad.ranks = Get<std::vector<int64_t>>(a, "ranks", {});
      ad.projections = Get<std::vector<std::string>>(a, "projections", {});
      ad.init = Get<std::string>(a, "init", "");
      GetAuto(a, "alpha", &ad.alpha);
      ad.new_task_init = Get<std::string>(a, "new_task_init", "");
    }
    if (j.contains("hparams")) {
      const json& h = j["hparams"];
      HyperParams& p = s.hparams;
      GetAuto(h, "max_steps", &p.max_steps);
      GetAuto(h, "batch_size", &p.batch_size);
      GetAuto(h, "learning_rate", &p.learning_rate);
      GetAuto(h, "inner_lr_multiplier", &p.inner_lr_multiplier);
      GetAuto(h, "head_lr_multiplier", &p.head_lr_multiplier);
      GetAuto(h, "weight_decay", &p.weight_decay);
      GetAuto(h, "warmup_ratio", &p.warmup_ratio);
      GetAuto(h, "head_first_ratio", &p.head_first_ratio);
      GetAuto(h, "grad_clip", &p.grad_clip);
      GetAuto(h, "eval_every", &p.eval_every);
      GetAuto(h, "max_length", &p.max_length);
      GetAuto(h, "early_stop_patience", &p.early_stop_patience);
      p.pooling = Get<std::string>(h, "pooling", "");
      GetAuto(h, "seed", &p.seed);
      for (const auto& e : h.value("rank_schedule", json::array())) {
        p.rank_schedule.emplace_back(AsInt(e.at(0), "rank_schedule"), AsInt(e.at(1), "rank_schedule"));
      }
    }
    return s;
  } catch (const std::exception& e) {
    return absl::DataLossError(absl::StrCat("job spec JSON: ", e.what()));
  }
}

std::string JobEventToJson(const JobEvent& e) {
  json j;
  j["type"] = EventTypeName(e.type);
  j["time_unix_ms"] = e.time_unix_ms;
  switch (e.type) {
    case JobEvent::Type::kState:
      j["state"] = JobStateName(e.state);
      break;
    case JobEvent::Type::kProgress:
      j["step"] = e.step;
      j["total_steps"] = e.total_steps;
      j["epoch"] = e.epoch;
      j["loss"] = e.loss;
      j["examples_per_second"] = e.examples_per_second;
      j["eta_seconds"] = e.eta_seconds;
      break;
    case JobEvent::Type::kEval:
      j["step"] = e.step;
      j["metrics"] = e.metrics;
      break;
    case JobEvent::Type::kSweep: {
      j["step"] = e.step;
      j["epoch"] = e.epoch;
      json bonds = json::array();
      for (const auto& b : e.bonds) {
        bonds.push_back({{"bond", b.bond},
                         {"old_rank", b.old_rank},
                         {"new_rank", b.new_rank},
                         {"discarded_weight", b.discarded_weight}});
      }
      j["bonds"] = bonds;
      break;
    }
    case JobEvent::Type::kCheckpoint:
      j["family"] = e.family;
      j["version"] = e.version;
      break;
    case JobEvent::Type::kLog:
      break;
  }
  if (!e.message.empty()) j["message"] = e.message;
  return j.dump();
}

absl::StatusOr<JobEvent> JobEventFromJson(const std::string& text) {
  try {
    json j = json::parse(text);
    JobEvent e;
    auto type = EventTypeFromName(Get<std::string>(j, "type", "log"));
    if (!type) return absl::DataLossError("job event JSON: unknown type");
    e.type = *type;
    e.time_unix_ms = Get<int64_t>(j, "time_unix_ms", 0);
    if (j.contains("state")) {
      auto st = JobStateFromName(j["state"].get<std::string>());
      if (!st) return absl::DataLossError("job event JSON: unknown state");
      e.state = *st;
    }
    e.message = Get<std::string>(j, "message", "");
    e.step = Get<int64_t>(j, "step", 0);
    e.total_steps = Get<int64_t>(j, "total_steps", 0);
    e.epoch = Get<int64_t>(j, "epoch", 0);
    e.loss = Get<double>(j, "loss", 0);
    e.examples_per_second = Get<double>(j, "examples_per_second", 0);
    e.eta_seconds = Get<double>(j, "eta_seconds", 0);
    e.metrics = Get<std::map<std::string, double>>(j, "metrics", {});
    for (const auto& b : j.value("bonds", json::array())) {
      e.bonds.push_back({AsInt(b.at("bond"), "bond"), AsInt(b.at("old_rank"), "old_rank"),
                         AsInt(b.at("new_rank"), "new_rank"), b.at("discarded_weight").get<double>()});
    }
    e.family = Get<std::string>(j, "family", "");
    e.version = Get<int64_t>(j, "version", 0);
    return e;
  } catch (const std::exception& ex) {
    return absl::DataLossError(absl::StrCat("job event JSON: ", ex.what()));
  }
}

std::string TasksToJson(const std::vector<TaskRecord>& tasks) {
  json arr = json::array();
  for (const auto& t : tasks) {
    arr.push_back({{"name", t.name},
                   {"index", t.index},
                   {"num_labels", t.num_labels},
                   {"regression", t.regression},
                   {"label_names", t.label_names},
                   {"eval_metrics", t.eval_metrics}});
  }
  return arr.dump();
}

absl::StatusOr<std::vector<TaskRecord>> TasksFromJson(const std::string& text) {
  try {
    std::vector<TaskRecord> out;
    for (const auto& t : json::parse(text)) {
      TaskRecord r;
      r.name = Get<std::string>(t, "name", "");
      r.index = Get<int64_t>(t, "index", 0);
      r.num_labels = Get<int64_t>(t, "num_labels", 0);
      r.regression = Get<bool>(t, "regression", false);
      r.label_names = Get<std::vector<std::string>>(t, "label_names", {});
      r.eval_metrics = Get<std::map<std::string, double>>(t, "eval_metrics", {});
      out.push_back(std::move(r));
    }
    return out;
  } catch (const std::exception& ex) {
    return absl::DataLossError(absl::StrCat("tasks JSON: ", ex.what()));
  }
}

}  // namespace metatt
