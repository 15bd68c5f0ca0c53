// A job spec's hyper-parameters -> the training recipe (server/training/
// recipe.h): what the user set is kept, every unset field comes from
// DefaultRecipe(form). The job executor resolves with this when a job starts
// (and emits DescribeRecipe() as a job event); the job manager uses it for
// the total steps it shows before the job runs. Torch-free.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "server/store/job_types.h"
#include "server/training/recipe.h"

namespace metatt {

// A numeric hyper-parameter, named the same in a job spec (HyperParams:
// Auto<T>), in what a user set (RecipeOverrides: std::optional<T>) and in the
// resolved recipe (Recipe: T). RecipeOverridesFromSpec copies every set one
// with these tables; a test fills a spec from a recipe with them.
template <typename T>
struct NumericHyperParam {
  Auto<T> HyperParams::*spec;
  std::optional<T> RecipeOverrides::*overrides;
  T Recipe::*recipe;
};
#define METATT_HYPER_PARAM(name) {&HyperParams::name, &RecipeOverrides::name, &Recipe::name}
inline constexpr NumericHyperParam<double> kRealHyperParams[] = {
    METATT_HYPER_PARAM(learning_rate), METATT_HYPER_PARAM(inner_lr_multiplier),
    METATT_HYPER_PARAM(head_lr_multiplier), METATT_HYPER_PARAM(weight_decay),
    METATT_HYPER_PARAM(warmup_ratio), METATT_HYPER_PARAM(head_first_ratio),
    METATT_HYPER_PARAM(grad_clip)};
inline constexpr NumericHyperParam<int64_t> kIntegerHyperParams[] = {
    METATT_HYPER_PARAM(max_steps), METATT_HYPER_PARAM(batch_size),
    METATT_HYPER_PARAM(eval_every), METATT_HYPER_PARAM(max_length),
    METATT_HYPER_PARAM(early_stop_patience)};
inline constexpr NumericHyperParam<uint64_t> kSeedHyperParam = METATT_HYPER_PARAM(seed);
#undef METATT_HYPER_PARAM

// Empty strings and lists and unset Auto<> fields stay unset.
RecipeOverrides RecipeOverridesFromSpec(const JobSpec& spec);

// `family_form`, when not empty, is the form of the family an add-task job
// extends; it replaces the spec's form.
absl::StatusOr<Recipe> ResolveJobRecipe(const JobSpec& spec, const std::string& family_form = "");

}  // namespace metatt
