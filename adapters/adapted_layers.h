// The layers an adapter config adapts (MetaTTConfig::AdaptedLayers and
// LoraConfig::AdaptedLayers alike): `layers` when the config names some,
// else every layer 0 .. num_layers - 1.
#pragma once

#include <cstdint>
#include <vector>

namespace metatt {

inline std::vector<int> LayersOrAll(const std::vector<int>& layers, int64_t num_layers) {
  if (!layers.empty()) return layers;
  std::vector<int> all(num_layers);
  for (int i = 0; i < num_layers; ++i) all[i] = i;
  return all;
}

}  // namespace metatt
