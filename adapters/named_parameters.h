// What both adapters (LoraAdapter, MetaTTAdapter) derive from their named
// leaves, NamedParameters(): the trainable ones and the parameter count.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

namespace metatt {

using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

// The leaves with requires_grad, in their order.
inline std::vector<torch::Tensor> RequiringGrad(const NamedTensors& named) {
  std::vector<torch::Tensor> out;
  for (const auto& [name, t] : named)
    if (t.requires_grad()) out.push_back(t);
  return out;
}

// Elements in all the leaves.
inline int64_t TotalNumel(const NamedTensors& named) {
  int64_t n = 0;
  for (const auto& [name, t] : named) n += t.numel();
  return n;
}

}  // namespace metatt
