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
  for (const auto& f : kRealHyperParams) Take(&(o.*f.overrides), h.*f.spec);
  for (const auto& f : kIntegerHyperParams) Take(&(o.*f.overrides), h.*f.spec);
  Take(&(o.*kSeedHyperParam.overrides), h.*kSeedHyperParam.spec);
  TakeString(&o.pooling, h.pooling);
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
