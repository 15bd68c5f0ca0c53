#include "server/jobs/job_recipe.h"

namespace metatt {
namespace {

template <typename T>
void Take(std::optional<T>* out, const Auto<T>& in) {
  if (in.is_set()) *out = in.value();
}

void TakeString(std::optional<std::string>* out, const std::string& in) {
  if (!in.empty()) *out = in;
}

}  // namespace

RecipeOverrides RecipeOverridesFromSpec(const JobSpec& spec) {
  RecipeOverrides o;
  const AdapterSpec& a = spec.adapter;
  TakeString(&o.form, a.form);
  if (!a.ranks.empty()) o.ranks = a.ranks;
  if (!a.projections.empty()) o.projections = a.projections;
  TakeString(&o.init, a.init);
  Take(&o.alpha, a.alpha);
  TakeString(&o.new_task_init, a.new_task_init);
  const HyperParams& h = spec.hparams;
  Take(&o.max_steps, h.max_steps);
  Take(&o.batch_size, h.batch_size);
  Take(&o.learning_rate, h.learning_rate);
  Take(&o.inner_lr_multiplier, h.inner_lr_multiplier);
  Take(&o.head_lr_multiplier, h.head_lr_multiplier);
  Take(&o.weight_decay, h.weight_decay);
  Take(&o.warmup_ratio, h.warmup_ratio);
  Take(&o.grad_clip, h.grad_clip);
  Take(&o.eval_every, h.eval_every);
  Take(&o.max_length, h.max_length);
  Take(&o.early_stop_patience, h.early_stop_patience);
  TakeString(&o.pooling, h.pooling);
  Take(&o.seed, h.seed);
  if (!h.rank_schedule.empty()) {
    std::vector<std::pair<double, int64_t>> sched;
    for (const auto& [epoch, rank] : h.rank_schedule) {
      sched.emplace_back(static_cast<double>(epoch), rank);
    }
    o.rank_schedule = std::move(sched);
  }
  return o;
}

absl::StatusOr<Recipe> ResolveJobRecipe(const JobSpec& spec, const std::string& family_form) {
  RecipeOverrides o = RecipeOverridesFromSpec(spec);
  if (!family_form.empty()) o.form = family_form;
  return ResolveRecipe(o, /*adds_task=*/spec.kind == JobKind::kAddTask);
}

}  // namespace metatt
