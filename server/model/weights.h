// One checkpoint tensor as the encoder and the decoder load it: present,
// floating point, of the shape the config implies, then float32, contiguous
// and frozen on the model's device. Errors name the tensor's key.
#pragma once

#include <map>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "absl/status/statusor.h"

namespace metatt {

// `tensors.find(key)`, or the first of `also` that is there (other names of
// the same tensor, e.g. TF-era LayerNorm gamma/beta).
absl::StatusOr<torch::Tensor> LoadWeight(const std::map<std::string, torch::Tensor>& tensors,
                                         const std::string& key,
                                         const std::vector<int64_t>& shape, torch::Device device,
                                         const std::vector<std::string>& also = {});

}  // namespace metatt
