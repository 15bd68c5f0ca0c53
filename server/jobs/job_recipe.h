// A job spec's hyper-parameters -> the training recipe (server/training/
// recipe.h): what the user set is kept, every unset field comes from
// DefaultRecipe(form). The job executor resolves with this when a job starts
// (and emits DescribeRecipe() as a job event); the job manager uses it for
// the total steps it shows before the job runs. Torch-free.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "server/store/job_types.h"
#include "server/training/recipe.h"

namespace metatt {

// Empty strings and lists and unset Auto<> fields stay unset.
RecipeOverrides RecipeOverridesFromSpec(const JobSpec& spec);

// `family_form`, when not empty, is the form of the family an add-task job
// extends; it replaces the spec's form.
absl::StatusOr<Recipe> ResolveJobRecipe(const JobSpec& spec, const std::string& family_form = "");

}  // namespace metatt
