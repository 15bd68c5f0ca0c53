// What MetaTTConfig and LoraConfig share: the layers an adapter config adapts
// (AdaptedLayers) and the check of its `model` geometry (Validate).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "adapters/model_geometry.h"

namespace metatt {

// `layers` when the config names some, else every layer 0 .. num_layers - 1.
inline std::vector<int> LayersOrAll(const std::vector<int>& layers, int64_t num_layers) {
  if (!layers.empty()) return layers;
  std::vector<int> all(num_layers);
  for (int i = 0; i < num_layers; ++i) all[i] = i;
  return all;
}

// {field, what is wrong} when the config's `model` is inconsistent or has
// another layer count than its `num_layers`; empty when fine or unset.
inline std::pair<std::string, std::string> CheckConfigModel(
    const std::optional<ModelGeometry>& model, int64_t num_layers) {
  if (!model.has_value()) return {};
  std::string why = model->Check();
  if (!why.empty()) return {"model", why};
  if (model->num_layers != num_layers) {
    return {"num_layers",
            absl::StrCat("(", num_layers, ") differs from the model's ", model->num_layers)};
  }
  return {};
}

}  // namespace metatt
