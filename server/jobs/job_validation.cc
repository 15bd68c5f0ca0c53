#include "server/jobs/job_validation.h"

#include <algorithm>
#include <cctype>

#include "absl/strings/str_cat.h"
#include "server/training/recipe.h"

namespace metatt {
namespace {

absl::Status Bad(absl::string_view field, absl::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", why));
}

}  // namespace

bool IsValidName(absl::string_view name) {
  if (name.empty() || name.size() > kMaxNameLength || name[0] == '.') return false;
  for (char c : name) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.')) {
      return false;
    }
  }
  return true;
}

absl::Status ValidateName(absl::string_view name, absl::string_view field) {
  if (IsValidName(name)) return absl::OkStatus();
  return Bad(field, absl::StrCat("'", name, "' must be 1-", kMaxNameLength,
                                 " characters of letters, digits, '-', '_' or '.', not "
                                 "starting with '.'"));
}

absl::Status ValidateDatasetName(absl::string_view name, absl::string_view field) {
  if (name.empty() || name.size() > kMaxDatasetNameLength) {
    return Bad(field, absl::StrCat("must be 1-", kMaxDatasetNameLength, " characters"));
  }
  return absl::OkStatus();
}

absl::Status ValidateAdapterForm(absl::string_view form, absl::string_view field) {
  if (form == "4d" || form == "5d" || form == "4+1d" || form == "lora") return absl::OkStatus();
  return Bad(field, absl::StrCat("'", form, "' is not one of 4d, 5d, 4+1d, lora"));
}

absl::Status ValidateJobSpec(const JobSpec& spec, const JobLimits& limits) {
  if (auto st = ValidateName(spec.family, "spec.family"); !st.ok()) return st;
  if (spec.tasks.empty()) return Bad("spec.tasks", "at least one task is required");
  if (limits.max_tasks_per_job > 0 &&
      static_cast<int64_t>(spec.tasks.size()) > limits.max_tasks_per_job) {
    return Bad("spec.tasks", absl::StrCat(spec.tasks.size(), " tasks exceed the server limit "
                                          "max_tasks_per_job=", limits.max_tasks_per_job));
  }

  // Adapter: form vs kind vs number of tasks, ranks, projections, alpha.
  // Unset ("auto", empty) fields pass: they resolve from DefaultRecipe(form)
  // (server/training/recipe.h), whose values are trusted.
  const AdapterSpec& a = spec.adapter;
  const std::string form = a.form.empty() ? DefaultForm() : a.form;
  if (!a.form.empty()) {
    if (auto st = ValidateAdapterForm(a.form, "spec.adapter.form"); !st.ok()) return st;
  }
  if (spec.kind == JobKind::kMultiTask && form != "4+1d") {
    return Bad("spec.adapter.form", "a multi-task job needs form 4+1d");
  }
  if (spec.kind == JobKind::kTrainFamily && spec.tasks.size() > 1 && form != "4+1d") {
    return Bad("spec.tasks", "several tasks in one family need form 4+1d (or one task)");
  }
  if (form == "lora" && a.ranks.size() > 1) {
    return Bad("spec.adapter.ranks", "form lora takes one rank (r)");
  }
  if (form == "lora" && !a.init.empty() && a.init != "peft" && a.init != "random") {
    return Bad("spec.adapter.init", absl::StrCat("'", a.init, "' is not one of peft, random (form lora)"));
  }
  if (spec.kind == JobKind::kAddTask && spec.tasks.size() != 1) {
    return Bad("spec.tasks", "an add-task job adds exactly one task");
  }
  for (size_t i = 0; i < a.ranks.size(); ++i) {
    if (a.ranks[i] < 1 || a.ranks[i] > kMaxRank) {
      return Bad(absl::StrCat("spec.adapter.ranks[", i, "]"),
                 absl::StrCat(a.ranks[i], " is outside [1, ", kMaxRank, "]"));
    }
  }
  int64_t max_rank = 0;
  for (int64_t r : a.ranks) max_rank = std::max(max_rank, r);
  if (auto st = ValidateFamilyCapacity(static_cast<int64_t>(spec.tasks.size()), max_rank,
                                       "spec.adapter.ranks", limits);
      !st.ok()) {
    return st;
  }
  for (size_t i = 0; i < a.projections.size(); ++i) {
    const auto& p = a.projections;
    if (std::find(p.begin(), p.begin() + i, p[i]) != p.begin() + i) {
      return Bad(absl::StrCat("spec.adapter.projections[", i, "]"),
                 absl::StrCat("duplicate '", p[i], "'"));
    }
  }
  if (a.alpha.is_set() && !(a.alpha.value() >= 0)) {
    return Bad("spec.adapter.alpha", "must be >= 0 (0 = alpha = r)");
  }
  if (!a.new_task_init.empty() && a.new_task_init != "identity" && a.new_task_init != "zeros" &&
      a.new_task_init != "mean") {
    return Bad("spec.adapter.new_task_init",
               absl::StrCat("'", a.new_task_init, "' is not one of identity, zeros, mean"));
  }

  // Tasks: names unique within the job, datasets named, eval fraction.
  for (size_t i = 0; i < spec.tasks.size(); ++i) {
    const JobTaskSpec& t = spec.tasks[i];
    const std::string field = absl::StrCat("spec.tasks[", i, "]");
    if (auto st = ValidateName(t.task_name, field + ".task_name"); !st.ok()) return st;
    for (size_t k = 0; k < i; ++k) {
      if (spec.tasks[k].task_name == t.task_name) {
        return Bad(field + ".task_name", absl::StrCat("duplicate task '", t.task_name, "'"));
      }
    }
    if (t.dataset_id.empty()) return Bad(field + ".dataset_id", "required");
    if (t.eval_dataset_id.empty() && (t.eval_fraction < 0 || t.eval_fraction >= 1)) {
      return Bad(field + ".eval_fraction", absl::StrCat(t.eval_fraction, " is outside [0, 1)"));
    }
  }

  // Hyper-parameters: the ones the user set (unset = auto passes).
  const HyperParams& h = spec.hparams;
  auto bad = [](absl::string_view name, absl::string_view why) {
    return Bad(absl::StrCat("spec.hparams.", name), why);
  };
  if (h.max_steps.is_set() && h.max_steps.value() < 1) {
    return bad("max_steps", absl::StrCat(h.max_steps.value(), " must be >= 1"));
  }
  if (h.max_steps.is_set() && limits.max_steps > 0 && h.max_steps.value() > limits.max_steps) {
    return bad("max_steps", absl::StrCat(h.max_steps.value(), " exceeds the server limit max_steps=",
                                         limits.max_steps));
  }
  if (h.batch_size.is_set()) {
    const int64_t b = h.batch_size.value();
    if (b < 1 || b > kMaxBatchSize) {
      return bad("batch_size", absl::StrCat(b, " is outside [1, ", kMaxBatchSize, "]"));
    }
    if (b > limits.max_batch_size) {
      return bad("batch_size", absl::StrCat(b, " exceeds the server limit ",
                                            limits.batch_size_limit_name, "=",
                                            limits.max_batch_size));
    }
  }
  auto positive_at_most = [&](absl::string_view name, const Auto<double>& v,
                              double max) -> absl::Status {
    if (v.is_set() && (!(v.value() > 0) || v.value() > max)) {
      return bad(name, absl::StrCat(v.value(), " is outside (0, ", max, "]"));
    }
    return absl::OkStatus();
  };
  if (auto st = positive_at_most("learning_rate", h.learning_rate, kMaxLearningRate); !st.ok()) {
    return st;
  }
  if (auto st = positive_at_most("inner_lr_multiplier", h.inner_lr_multiplier, kMaxLrMultiplier);
      !st.ok()) {
    return st;
  }
  if (auto st = positive_at_most("head_lr_multiplier", h.head_lr_multiplier, kMaxLrMultiplier);
      !st.ok()) {
    return st;
  }
  if (h.weight_decay.is_set() && !(h.weight_decay.value() >= 0)) {
    return bad("weight_decay", "must be >= 0");
  }
  if (h.warmup_ratio.is_set() && !(h.warmup_ratio.value() >= 0 && h.warmup_ratio.value() <= 1)) {
    return bad("warmup_ratio", "must be in [0, 1]");
  }
  if (h.head_first_ratio.is_set() &&
      !(h.head_first_ratio.value() >= 0 && h.head_first_ratio.value() < 1)) {
    return bad("head_first_ratio", "must be in [0, 1) (the adapter must get some steps)");
  }
  if (h.grad_clip.is_set() && !(h.grad_clip.value() >= 0)) {
    return bad("grad_clip", "must be >= 0 (0 = off)");
  }
  if (h.eval_every.is_set() && h.eval_every.value() < 0) {
    return bad("eval_every", "must be >= 0 (0 = at the end only)");
  }
  if (h.max_length.is_set()) {
    const int64_t m = h.max_length.value();
    if (m < kMinSequenceLength || m > kMaxSequenceLength) {
      return bad("max_length", absl::StrCat(m, " is outside [", kMinSequenceLength, ", ",
                                            kMaxSequenceLength, "]"));
    }
    if (m > limits.max_sequence_length) {
      return bad("max_length", absl::StrCat(m, " exceeds the server limit ",
                                            limits.sequence_limit_name, "=",
                                            limits.max_sequence_length));
    }
  }
  if (h.early_stop_patience.is_set() && h.early_stop_patience.value() < 0) {
    return bad("early_stop_patience", "must be >= 0");
  }
  if (!h.pooling.empty() && h.pooling != "mean" && h.pooling != "cls") {
    return bad("pooling", absl::StrCat("'", h.pooling, "' is not one of mean, cls"));
  }
  for (size_t i = 0; i < h.rank_schedule.size(); ++i) {
    if (h.rank_schedule[i].first < 0 || h.rank_schedule[i].second < 1) {
      return bad(absl::StrCat("rank_schedule[", i, "]"), "epoch must be >= 0 and max rank >= 1");
    }
  }
  if (spec.kind == JobKind::kAddTask && !h.rank_schedule.empty()) {
    return bad("rank_schedule", "not allowed when adding a task (shared cores are frozen)");
  }
  return absl::OkStatus();
}

absl::Status ValidateLabelCount(int64_t labels, absl::string_view field, const JobLimits& limits) {
  if (limits.max_labels_per_task > 0 && labels > limits.max_labels_per_task) {
    return Bad(field, absl::StrCat(labels, " classes exceed the server limit max_labels_per_task=",
                                   limits.max_labels_per_task,
                                   " (integer labels make a class of every number from 0 to the "
                                   "largest)"));
  }
  return absl::OkStatus();
}

absl::Status ValidateFamilyCapacity(int64_t tasks, int64_t max_rank, absl::string_view field,
                                    const JobLimits& limits) {
  if (limits.max_rank_times_tasks > 0 && max_rank > 0 &&
      tasks * max_rank > limits.max_rank_times_tasks) {
    return Bad(field, absl::StrCat("rank ", max_rank, " x ", tasks, " tasks = ", tasks * max_rank,
                                   " exceeds the server limit max_rank_times_tasks=",
                                   limits.max_rank_times_tasks));
  }
  return absl::OkStatus();
}

}  // namespace metatt
