#include "server/model/weights.h"

#include "absl/strings/str_cat.h"

namespace metatt {

absl::StatusOr<torch::Tensor> LoadWeight(const std::map<std::string, torch::Tensor>& tensors,
                                         const std::string& key,
                                         const std::vector<int64_t>& shape, torch::Device device,
                                         const std::vector<std::string>& also) {
  auto it = tensors.find(key);
  for (size_t i = 0; it == tensors.end() && i < also.size(); ++i) it = tensors.find(also[i]);
  if (it == tensors.end())
    return absl::NotFoundError(absl::StrCat("weights: tensor '", key, "' is missing"));
  const torch::Tensor& w = it->second;
  if (!w.is_floating_point())
    return absl::InvalidArgumentError(absl::StrCat("weights: tensor '", key, "' has dtype ",
                                                   c10::toString(w.scalar_type()),
                                                   ", expected a floating type"));
  if (w.sizes().vec() != shape)
    return absl::InvalidArgumentError(absl::StrCat(
        "weights: tensor '", key, "' has shape ", c10::str(w.sizes()), " but the config implies ",
        c10::str(c10::IntArrayRef(shape))));
  return w.to(device, torch::kFloat32).contiguous().set_requires_grad(false);
}

}  // namespace metatt
