// The training recipe: every adapter and training knob of a MetaTT fine-tune,
// and the ONE place their defaults live (DefaultRecipe). Torch-free and
// protobuf-free (its own target, metatt_recipe), so every layer that needs a
// default links it: the trainer (TrainerOptionsFromRecipe), the job executor
// and metatt-train (ResolveRecipe), the job layer (DefaultForm, the
// user-visible total steps).
//
// A user sets some fields (a job spec, metatt-train flags, metattctl flags);
// everything left unset ("auto") comes from DefaultRecipe(form). See the
// README, "Hyper-parameters and defaults".
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace metatt {

// A fully resolved recipe: every field has a value. The values are set only
// by DefaultRecipe() and by ResolveRecipe() from what a user set.
struct Recipe {
  // Adapter.
  std::string form;                      // 4d | 5d | 4+1d | lora
  std::vector<int64_t> ranks;            // one rank for every bond, or one per bond
  std::vector<std::string> projections;  // q k v o (and whatever the adapter accepts)
  std::string init;                      // core init spec, e.g. ze-id-id-id
  double alpha = 0;                      // 0: the adapter's own default (alpha = r)
  std::string new_task_init;             // add-task slice init: identity | zeros | mean
  // Optimisation.
  double learning_rate = 0;
  double inner_lr_multiplier = 0;  // MetaTT inner cores train at lr * this
  double head_lr_multiplier = 0;   // task heads train at lr * this
  double weight_decay = 0;
  double warmup_ratio = 0;
  double head_first_ratio = 0;     // first fraction of the steps: heads only, adapter held
  double grad_clip = 0;            // 0: no clipping
  int64_t max_steps = 0;           // > 0: optimizer steps; 0: `epochs` passes
  double epochs = 0;
  int64_t batch_size = 0;
  int64_t eval_every = 0;          // 0: only at the end
  int64_t max_length = 0;          // tokens per example
  std::string pooling;             // mean | cls
  uint64_t seed = 0;
  int64_t early_stop_patience = 0;  // evaluations without improvement; 0: off
  // DMRG rank schedule: (epoch, max rank); empty = fixed rank.
  std::vector<std::pair<double, int64_t>> rank_schedule;
};

// What a user set; std::nullopt (or empty) = auto. Mapped from a job spec
// (server/jobs/job_recipe.h) or from metatt-train's flags.
struct RecipeOverrides {
  std::optional<std::string> form;
  std::optional<std::vector<int64_t>> ranks;
  std::optional<std::vector<std::string>> projections;
  std::optional<std::string> init;
  std::optional<double> alpha;
  std::optional<std::string> new_task_init;
  std::optional<double> learning_rate, inner_lr_multiplier, head_lr_multiplier, weight_decay,
      warmup_ratio, grad_clip, head_first_ratio;
  std::optional<int64_t> max_steps;  // set (even 0) wins over epochs; 0 then means "epochs"
  std::optional<double> epochs;      // set without max_steps: train by epochs
  std::optional<int64_t> batch_size, eval_every, max_length;
  std::optional<std::string> pooling;
  std::optional<uint64_t> seed;
  std::optional<int64_t> early_stop_patience;
  std::optional<std::vector<std::pair<double, int64_t>>> rank_schedule;
};

// The form a job or metatt-train uses when none is given.
std::string DefaultForm();

// Generation tasks on a decoder: tokens per example (prompt + completion)
// when max_length is not set (the encoder recipe's max_length is sized for
// sentence classification), and tokens generated per eval prompt.
constexpr int64_t kDefaultDecoderMaxLength = 256;
constexpr int64_t kDefaultDecoderMaxNewTokens = 32;

// THE per-form defaults (server/training/recipe.cc). INVALID_ARGUMENT for a
// form other than 4d, 5d, 4+1d, lora.
absl::StatusOr<Recipe> DefaultRecipe(absl::string_view form);

// The one resolution: form = overrides.form or DefaultForm(); every unset
// field from DefaultRecipe(form); every set field kept as set (ranges are the
// job validator's business, server/jobs/job_validation.h). Steps: max_steps
// set -> it (0: by epochs); else epochs set -> by epochs (max_steps = 0);
// else the recipe's.
// `adds_task`: the run adds tasks to an existing family with its shared
// cores frozen (only the new r x r slices and heads train); an unset learning
// rate is then kAddTaskLearningRateMultiplier x the form's default.
absl::StatusOr<Recipe> ResolveRecipe(const RecipeOverrides& overrides, bool adds_task = false);

// A frozen-core add-task trains ~r^2 + head parameters: at 4x the rate the
// added STS-B reached 82.8 / 81.2 (seeds 0, 1) against 79.5 / 77.3 at 1x
// (bench/results/cpu-quality/add_task_probe.{json,md}).
inline constexpr double kAddTaskLearningRateMultiplier = 4.0;

// One line listing every resolved field, "name=value", with " (auto)" after
// the ones the user left unset; the job executor emits it as a job event and
// metatt-train prints it. With `structure_from_family` (a task added to a
// saved family: RecipeForAddedTask), form, ranks, projections, init and
// alpha are marked " (family)" instead: the family fixed them.
std::string DescribeRecipe(const Recipe& recipe, const RecipeOverrides& overrides,
                           bool structure_from_family = false);

}  // namespace metatt
