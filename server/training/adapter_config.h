// The adapter a recipe asks for on a base model: ONE rule for every entry
// point that builds one (server jobs in server/runtime/job_executor.cc and
// metatt-train), so that a job and the quality table train the same thing.
// Errors name the job-spec field ("adapter.form", "adapter.projections[1]",
// "adapter").
#pragma once

#include <cstdint>

#include "absl/status/statusor.h"
#include "adapters/lora_adapter.h"
#include "adapters/metatt_config.h"
#include "adapters/model_geometry.h"
#include "server/training/recipe.h"

namespace metatt {

// MetaTT: form, ranks, projections, init, alpha (0 = the adapter's own
// default, alpha = r); `num_tasks` task slices for the (4+1)D form, else 1.
absl::StatusOr<MetaTTConfig> MetaTTConfigFromRecipe(const Recipe& r, const ModelGeometry& model,
                                                    int64_t num_tasks);

// LoRA: r = ranks[0] (8 when empty), alpha (0 = r), projections, init
// (peft | random).
absl::StatusOr<LoraConfig> LoraConfigFromRecipe(const Recipe& r, const ModelGeometry& model);

// A task added to a saved (4+1)D family keeps the family's structure: its
// ranks, projections, init and alpha were fixed when the family trained.
// Returns `r` with those fields taken from `family` (so that what a job
// reports is what trains), or InvalidArgument naming the field ("adapter.
// ranks", ...) when `o` asks for a different one. An override equal to the
// family's (one rank equal to every bond, the same projections in any
// order, an equivalent init spec, the same alpha) is accepted.
absl::StatusOr<Recipe> RecipeForAddedTask(Recipe r, const RecipeOverrides& o,
                                          const MetaTTConfig& family);

}  // namespace metatt
