#include "server/service/proto_convert.h"

#include <optional>
#include <utility>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "server/jobs/task_pages.h"

namespace metatt {

namespace {

// One table per enum: our value (or the store's name) and its wire value.
constexpr std::pair<JobState, v1::JobState> kStates[] = {
    {JobState::kQueued, v1::QUEUED},   {JobState::kValidating, v1::VALIDATING},
    {JobState::kRunning, v1::RUNNING}, {JobState::kSucceeded, v1::SUCCEEDED},
    {JobState::kFailed, v1::FAILED},   {JobState::kCancelled, v1::CANCELLED},
};
constexpr std::pair<JobKind, v1::JobKind> kKinds[] = {
    {JobKind::kTrainFamily, v1::TRAIN_FAMILY},
    {JobKind::kAddTask, v1::ADD_TASK},
    {JobKind::kMultiTask, v1::MULTI_TASK},
};
constexpr std::pair<const char*, v1::DataFormat> kFormats[] = {
    {"tsv", v1::TSV}, {"csv", v1::CSV}, {"jsonl", v1::JSONL}};
constexpr std::pair<const char*, v1::LabelKind> kLabelKinds[] = {
    {"classification", v1::CLASSIFICATION}, {"regression", v1::REGRESSION}};

// The wire value of `ours` in `table`, or nullopt.
template <typename A, typename B, size_t N, typename K>
std::optional<B> WireOf(const std::pair<A, B> (&table)[N], const K& ours) {
  for (const auto& [a, b] : table)
    if (ours == a) return b;
  return std::nullopt;
}

// Our value of `wire` in `table`, or nullopt (an unknown or unspecified value).
template <typename A, typename B, size_t N>
std::optional<A> OursOf(const std::pair<A, B> (&table)[N], B wire) {
  for (const auto& [a, b] : table)
    if (wire == b) return a;
  return std::nullopt;
}

}  // namespace

v1::JobState ToProto(JobState s) { return WireOf(kStates, s).value_or(v1::JOB_STATE_UNSPECIFIED); }

absl::StatusOr<std::optional<JobState>> FromProto(v1::JobState s) {
  if (s == v1::JOB_STATE_UNSPECIFIED) return std::optional<JobState>();
  if (auto state = OursOf(kStates, s)) return state;
  return absl::InvalidArgumentError(absl::StrCat("state: unknown value ", static_cast<int>(s)));
}

absl::StatusOr<JobSpec> FromProto(const v1::JobSpec& p) {
  JobSpec s;
  const v1::JobKind kind = p.kind() == v1::JOB_KIND_UNSPECIFIED ? v1::TRAIN_FAMILY : p.kind();
  if (auto k = OursOf(kKinds, kind)) {
    s.kind = *k;
  } else {
    return absl::InvalidArgumentError(absl::StrCat("spec.kind: unknown value ", p.kind()));
  }
  s.family = p.family();
  for (const auto& t : p.tasks()) {
    JobTaskSpec ts;
    ts.task_name = t.task_name();
    ts.dataset_id = t.dataset_id();
    ts.eval_dataset_id = t.eval_dataset_id();
    if (t.eval_fraction() != 0) ts.eval_fraction = t.eval_fraction();
    ts.metric = t.metric();
    s.tasks.push_back(std::move(ts));
  }
  const auto& a = p.adapter();
  if (!a.form().empty()) s.adapter.form = a.form();
  if (a.ranks_size() > 0) s.adapter.ranks.assign(a.ranks().begin(), a.ranks().end());
  if (a.projections_size() > 0) {
    s.adapter.projections.assign(a.projections().begin(), a.projections().end());
  }
  if (!a.init().empty()) s.adapter.init = a.init();
  if (a.has_alpha()) s.adapter.alpha = a.alpha();
  if (!a.new_task_init().empty()) s.adapter.new_task_init = a.new_task_init();
  const auto& h = p.hparams();
  HyperParams& o = s.hparams;
  // Presence decides (proto3 `optional`); where 0 is never valid it also
  // reads as unset, as older clients send it (jobs.proto).
  if (h.has_max_steps() && h.max_steps() != 0) o.max_steps = h.max_steps();
  if (h.has_batch_size() && h.batch_size() != 0) o.batch_size = h.batch_size();
  if (h.has_learning_rate() && h.learning_rate() != 0) o.learning_rate = h.learning_rate();
  if (h.has_max_length() && h.max_length() != 0) o.max_length = h.max_length();
  if (h.has_weight_decay()) o.weight_decay = h.weight_decay();
  if (h.has_warmup_ratio()) o.warmup_ratio = h.warmup_ratio();
  if (h.has_head_first_ratio()) o.head_first_ratio = h.head_first_ratio();
  if (h.has_grad_clip()) o.grad_clip = h.grad_clip();
  if (h.has_eval_every()) o.eval_every = h.eval_every();
  if (h.has_early_stop_patience()) o.early_stop_patience = h.early_stop_patience();
  if (h.has_seed()) o.seed = h.seed();
  if (h.has_inner_lr_multiplier()) o.inner_lr_multiplier = h.inner_lr_multiplier();
  if (h.has_head_lr_multiplier()) o.head_lr_multiplier = h.head_lr_multiplier();
  if (!h.pooling().empty()) o.pooling = h.pooling();
  for (const auto& e : h.rank_schedule()) o.rank_schedule.emplace_back(e.epoch(), e.max_rank());
  return s;
}

void ToProto(const JobSpec& s, v1::JobSpec* p) {
  p->set_kind(WireOf(kKinds, s.kind).value_or(v1::TRAIN_FAMILY));
  p->set_family(s.family);
  for (const auto& t : s.tasks) {
    auto* pt = p->add_tasks();
    pt->set_task_name(t.task_name);
    pt->set_dataset_id(t.dataset_id);
    pt->set_eval_dataset_id(t.eval_dataset_id);
    pt->set_eval_fraction(t.eval_fraction);
    pt->set_metric(t.metric);
  }
  auto* a = p->mutable_adapter();
  a->set_form(s.adapter.form);
  for (int64_t r : s.adapter.ranks) a->add_ranks(r);
  for (const auto& pr : s.adapter.projections) a->add_projections(pr);
  a->set_init(s.adapter.init);
  a->set_new_task_init(s.adapter.new_task_init);
  if (s.adapter.alpha.is_set()) a->set_alpha(s.adapter.alpha.value());
  auto* h = p->mutable_hparams();
  const HyperParams& o = s.hparams;
  // Only what the user set: an unset field reads back as "auto".
  if (o.max_steps.is_set()) h->set_max_steps(o.max_steps.value());
  if (o.batch_size.is_set()) h->set_batch_size(o.batch_size.value());
  if (o.learning_rate.is_set()) h->set_learning_rate(o.learning_rate.value());
  if (o.weight_decay.is_set()) h->set_weight_decay(o.weight_decay.value());
  if (o.warmup_ratio.is_set()) h->set_warmup_ratio(o.warmup_ratio.value());
  if (o.head_first_ratio.is_set()) h->set_head_first_ratio(o.head_first_ratio.value());
  if (o.grad_clip.is_set()) h->set_grad_clip(o.grad_clip.value());
  if (o.eval_every.is_set()) h->set_eval_every(o.eval_every.value());
  if (o.max_length.is_set()) h->set_max_length(o.max_length.value());
  if (o.early_stop_patience.is_set()) h->set_early_stop_patience(o.early_stop_patience.value());
  if (o.seed.is_set()) h->set_seed(o.seed.value());
  if (o.inner_lr_multiplier.is_set()) h->set_inner_lr_multiplier(o.inner_lr_multiplier.value());
  if (o.head_lr_multiplier.is_set()) h->set_head_lr_multiplier(o.head_lr_multiplier.value());
  h->set_pooling(o.pooling);
  for (const auto& [epoch, rank] : o.rank_schedule) {
    auto* e = h->add_rank_schedule();
    e->set_epoch(epoch);
    e->set_max_rank(rank);
  }
}

void ToProto(const JobRecord& j, v1::Job* p) {
  p->set_id(j.id);
  ToProto(j.spec, p->mutable_spec());
  p->set_state(ToProto(j.state));
  p->set_failure_reason(j.failure_reason);
  p->set_created_unix_ms(j.created_unix_ms);
  p->set_updated_unix_ms(j.updated_unix_ms);
  p->set_step(j.step);
  p->set_total_steps(j.total_steps);
  p->set_result_family(j.result_family);
  p->set_result_version(j.result_version);
  p->set_idempotency_key(j.spec.idempotency_key);
}

void ToProto(const std::string& job_id, int64_t sequence, const JobEvent& e, v1::JobEvent* p) {
  p->set_job_id(job_id);
  p->set_sequence(sequence);
  p->set_time_unix_ms(e.time_unix_ms);
  switch (e.type) {
    case JobEvent::Type::kState: {
      auto* s = p->mutable_state();
      s->set_state(ToProto(e.state));
      s->set_reason(e.message);
      break;
    }
    case JobEvent::Type::kProgress: {
      auto* g = p->mutable_progress();
      g->set_step(e.step);
      g->set_total_steps(e.total_steps);
      g->set_epoch(e.epoch);
      g->set_loss(e.loss);
      g->set_examples_per_second(e.examples_per_second);
      g->set_eta_seconds(e.eta_seconds);
      break;
    }
    case JobEvent::Type::kEval: {
      auto* v = p->mutable_eval();
      v->set_step(e.step);
      for (const auto& [k, val] : e.metrics) (*v->mutable_metrics())[k] = val;
      break;
    }
    case JobEvent::Type::kSweep: {
      auto* s = p->mutable_sweep();
      s->set_step(e.step);
      s->set_epoch(e.epoch);
      for (const auto& b : e.bonds) {
        auto* pb = s->add_bonds();
        pb->set_bond(b.bond);
        pb->set_old_rank(b.old_rank);
        pb->set_new_rank(b.new_rank);
        pb->set_discarded_weight(b.discarded_weight);
      }
      break;
    }
    case JobEvent::Type::kCheckpoint: {
      auto* c = p->mutable_checkpoint();
      c->set_family(e.family);
      c->set_version(e.version);
      break;
    }
    case JobEvent::Type::kLog:
      p->mutable_log()->set_message(e.message);
      break;
  }
}

absl::StatusOr<DatasetUpload> FromProto(const v1::DatasetHeader& h) {
  DatasetUpload u;
  u.name = h.name();
  const v1::DataFormat format = h.format() == v1::DATA_FORMAT_UNSPECIFIED ? v1::TSV : h.format();
  if (auto f = OursOf(kFormats, format)) {
    u.format = *f;
  } else {
    return absl::InvalidArgumentError(absl::StrCat("header.format: unknown value ", h.format()));
  }
  if (h.label_kind() == v1::GENERATION) {  // prompt -> completion records; no columns
    nlohmann::json g;
    g["format"] = u.format;
    g["label_kind"] = "generation";
    g["generation_format"] = h.generation_format().empty() ? "auto" : h.generation_format();
    u.spec_json = g.dump();
    return u;
  }
  const v1::LabelKind label_kind =
      h.label_kind() == v1::LABEL_KIND_UNSPECIFIED ? v1::CLASSIFICATION : h.label_kind();
  const std::optional<const char*> kind = OursOf(kLabelKinds, label_kind);
  if (!kind) {
    return absl::InvalidArgumentError(
        absl::StrCat("header.label_kind: unknown value ", h.label_kind()));
  }
  if (h.text_column().empty()) return absl::InvalidArgumentError("header.text_column: required");
  if (h.label_column().empty()) return absl::InvalidArgumentError("header.label_column: required");
  nlohmann::json j;
  j["format"] = u.format;
  j["has_header"] = h.has_header();
  j["text_column"] = h.text_column();
  if (!h.text_pair_column().empty()) j["text_pair_column"] = h.text_pair_column();
  j["label_column"] = h.label_column();
  j["label_kind"] = *kind;
  j["quoting"] = h.quoting();
  if (h.label_vocab_size() > 0) {
    j["label_vocab"] = std::vector<std::string>(h.label_vocab().begin(), h.label_vocab().end());
  }
  u.spec_json = j.dump();
  return u;
}

void ToProto(const DatasetRecord& d, v1::Dataset* p) {
  p->set_id(d.id);
  p->set_name(d.name);
  p->set_format(WireOf(kFormats, d.format).value_or(v1::TSV));
  p->set_sha256(d.sha256);
  p->set_num_rows(d.num_rows);
  p->set_size_bytes(d.size_bytes);
  for (const auto& l : d.label_names) p->add_label_names(l);
  p->set_label_kind(d.regression ? v1::REGRESSION
                    : d.spec_json.find("\"label_kind\":\"generation\"") != std::string::npos
                        ? v1::GENERATION
                        : v1::CLASSIFICATION);
  p->set_created_unix_ms(d.created_unix_ms);
  p->set_spec_json(d.spec_json);
}

void ToProto(const TaskRecord& t, v1::Task* p) {
  p->set_name(t.name);
  p->set_index(t.index);
  p->set_num_labels(t.num_labels);
  p->set_regression(t.regression);
  for (const auto& l : t.label_names) p->add_label_names(l);
  for (const auto& [k, v] : t.eval_metrics) (*p->mutable_eval_metrics())[k] = v;
}

void ToProto(const FamilyVersionRecord& f, v1::FamilyVersion* p) {
  p->set_family(f.family);
  p->set_version(f.version);
  p->set_form(f.form);
  p->set_adapter_parameters(f.adapter_parameters);
  // The first tasks only (task_pages.h); ListTasks pages through all.
  const int64_t inline_tasks = InlineTaskCount(f);
  for (int64_t i = 0; i < inline_tasks; ++i) ToProto(f.tasks[i], p->add_tasks());
  p->set_task_count(static_cast<int64_t>(f.tasks.size()));
  p->set_created_by_job(f.created_by_job);
  p->set_created_unix_ms(f.created_unix_ms);
  p->set_config_json(f.config_json);
  p->set_base_model_fingerprint(f.base_model_fingerprint);
  // Ranks from the MetaTT config, when it names them.
  auto j = nlohmann::json::parse(f.config_json, nullptr, /*allow_exceptions=*/false);
  if (j.is_object()) {
    for (const char* key : {"ranks", "bond_ranks"}) {
      auto it = j.find(key);
      if (it != j.end() && it->is_array()) {
        for (const auto& r : *it) {
          if (r.is_number_integer()) p->add_ranks(r.get<int64_t>());
        }
        break;
      }
    }
  }
}

absl::StatusOr<PredictInput> FromProto(const v1::PredictInput& in, int index) {
  PredictInput p;
  p.family = in.family();
  p.version = in.version();
  switch (in.task_ref_case()) {
    case v1::PredictInput::kTask:
      p.task = in.task();
      break;
    case v1::PredictInput::kTaskIndex:
      if (in.task_index() < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("inputs[", index, "].task_index: must be >= 0"));
      }
      p.task_index = in.task_index();
      break;
    case v1::PredictInput::kTasks:
      if (in.tasks().all() == (in.tasks().names_size() > 0)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "inputs[", index, "].tasks: name tasks or set all, not both or neither"));
      }
      p.all_tasks = in.tasks().all();
      p.tasks.assign(in.tasks().names().begin(), in.tasks().names().end());
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("inputs[", index, "]: set task, task_index or tasks"));
  }
  if (in.version() < 0) {
    return absl::InvalidArgumentError(absl::StrCat("inputs[", index, "].version: must be >= 0"));
  }
  p.text = in.text();
  if (in.has_text_pair()) p.text_pair = in.text_pair();
  return p;
}

void ToProto(const PredictOutput& o, v1::Prediction* p) {
  p->set_input_index(static_cast<int32_t>(o.input_index));
  p->set_task(o.task);
  p->set_task_index(o.task_index);
  p->set_label(o.label);
  p->set_label_name(o.label_name);
  for (float s : o.scores) p->add_scores(s);
  p->set_regression(o.regression);
  if (o.regression && !o.scores.empty()) p->set_value(o.scores[0]);
  p->set_queue_seconds(o.queue_seconds);
  p->set_model_seconds(o.model_seconds);
}

absl::StatusOr<GenerateParams> FromProto(const v1::GenerateRequest& req) {
  GenerateParams p;
  p.family = req.family();
  p.version = req.version();
  p.task = req.task();
  switch (req.input_case()) {
    case v1::GenerateRequest::kPrompt:
      p.prompt = req.prompt();
      break;
    case v1::GenerateRequest::kMessages:
      for (const v1::ChatMessage& m : req.messages().messages())
        p.messages.push_back({m.role(), m.content()});
      if (p.messages.empty()) return absl::InvalidArgumentError("messages: empty");
      break;
    default:
      return absl::InvalidArgumentError("prompt: set prompt or messages");
  }
  p.max_tokens = req.max_tokens();
  p.temperature = req.temperature();
  p.top_p = req.top_p();
  p.top_k = req.top_k();
  if (req.has_seed()) p.seed = req.seed();
  p.stop.assign(req.stop().begin(), req.stop().end());
  return p;
}

void ToProto(const GenerateChunk& c, v1::GenerateChunk* out) {
  out->set_text(c.text);
  for (int64_t id : c.token_ids) out->add_token_ids(id);
  out->set_finish_reason(FinishReasonName(c.finish));
  if (c.finish != FinishReason::kNone) {
    out->mutable_usage()->set_prompt_tokens(c.usage.prompt_tokens);
    out->mutable_usage()->set_completion_tokens(c.usage.completion_tokens);
    out->set_time_to_first_token_seconds(c.time_to_first_token_s);
  }
  out->set_family(c.family);
  out->set_version(c.version);
  out->set_task(c.task);
  out->set_task_index(c.task_index);
}

}  // namespace metatt
