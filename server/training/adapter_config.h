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

}  // namespace metatt
