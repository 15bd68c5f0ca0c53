#include "server/training/heads.h"

#include <algorithm>
#include <cmath>

#include <ATen/CPUGeneratorImpl.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"

namespace metatt {

absl::StatusOr<std::shared_ptr<TaskHead>> TaskHead::Create(const Options& o) {
  if (o.hidden_size <= 0) return absl::InvalidArgumentError("head: hidden_size must be > 0");
  if (o.kind == LabelKind::kClassification && o.num_labels < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("head: classification needs >= 2 labels, got ", o.num_labels));
  }
  auto h = std::make_shared<TaskHead>();
  h->kind = o.kind;
  h->num_labels = o.kind == LabelKind::kRegression ? 1 : o.num_labels;
  RETURN_IF_ERROR(TorchTry("head init", [&] {
    at::Generator gen = at::detail::createCPUGenerator(o.seed);
    torch::Tensor w =
        torch::randn({h->out_features(), o.hidden_size}, gen, torch::dtype(torch::kFloat32)) *
        o.init_std;
    h->weight = w.to(o.device).set_requires_grad(true);
    const double bias0 = o.kind == LabelKind::kRegression ? o.label_mean : 0.0;
    h->bias = torch::full({h->out_features()}, bias0,
                          torch::dtype(torch::kFloat32).device(o.device))
                  .set_requires_grad(true);
  }));
  if (o.kind == LabelKind::kRegression) {
    h->loss_weight = 1.0 / std::max(o.label_std * o.label_std, 1e-6);
  }
  return h;
}

TaskHead::Options TaskHead::Options::ForData(const Dataset& train, int64_t hidden_size,
                                             uint64_t seed, torch::Device device) {
  Options o;
  o.kind = train.label_kind;
  o.num_labels = train.num_labels();
  o.hidden_size = hidden_size;
  o.seed = seed;
  o.device = device;
  if (o.kind == LabelKind::kRegression && !train.examples.empty()) {
    double sum = 0, sq = 0;
    for (const Example& e : train.examples) sum += e.label_value;
    const double n = static_cast<double>(train.examples.size());
    o.label_mean = sum / n;
    for (const Example& e : train.examples) sq += (e.label_value - o.label_mean) * (e.label_value - o.label_mean);
    o.label_std = train.examples.size() > 1 ? std::sqrt(sq / (n - 1)) : 1.0;
  }
  return o;
}

absl::StatusOr<std::shared_ptr<TaskHead>> TaskHead::FromTensors(
    LabelKind kind, const std::map<std::string, torch::Tensor>& tensors,
    const std::string& prefix, torch::Device device) {
  auto w = tensors.find(prefix + "weight");
  auto b = tensors.find(prefix + "bias");
  if (w == tensors.end() || b == tensors.end()) {
    return absl::NotFoundError(absl::StrCat("head tensors '", prefix, "weight'/'", prefix,
                                            "bias' not found"));
  }
  if (w->second.dim() != 2 || b->second.dim() != 1 || b->second.size(0) != w->second.size(0)) {
    return absl::InvalidArgumentError(absl::StrCat("head '", prefix, "': bad shapes"));
  }
  if (kind == LabelKind::kRegression && w->second.size(0) != 1) {
    return absl::InvalidArgumentError(absl::StrCat("regression head '", prefix,
                                                   "' must have 1 output"));
  }
  auto h = std::make_shared<TaskHead>();
  h->kind = kind;
  h->num_labels = w->second.size(0);
  RETURN_IF_ERROR(TorchTry("head load", [&] {
    h->weight = w->second.to(device, torch::kFloat32).clone().set_requires_grad(true);
    h->bias = b->second.to(device, torch::kFloat32).clone().set_requires_grad(true);
  }));
  return h;
}

torch::Tensor TaskHead::Forward(const torch::Tensor& pooled) const {
  return torch::nn::functional::linear(pooled, weight, bias);
}

torch::Tensor TaskHead::LossSum(const torch::Tensor& output, const torch::Tensor& labels) const {
  namespace F = torch::nn::functional;
  if (kind == LabelKind::kRegression) {
    return F::mse_loss(output.squeeze(-1), labels.to(output.scalar_type()),
                       F::MSELossFuncOptions().reduction(torch::kSum)) *
           loss_weight;
  }
  return F::cross_entropy(output, labels, F::CrossEntropyFuncOptions().reduction(torch::kSum));
}

torch::Tensor TaskHead::Predict(const torch::Tensor& output) const {
  if (kind == LabelKind::kRegression) return output.squeeze(-1).to(torch::kCPU, torch::kDouble);
  return output.argmax(-1).to(torch::kCPU, torch::kLong);
}

std::map<std::string, torch::Tensor> TaskHead::Tensors(const std::string& prefix) const {
  return {{prefix + "weight", weight.detach().clone()}, {prefix + "bias", bias.detach().clone()}};
}

absl::Status TaskHead::Load(const std::map<std::string, torch::Tensor>& tensors,
                            const std::string& prefix) {
  auto w = tensors.find(prefix + "weight");
  auto b = tensors.find(prefix + "bias");
  if (w == tensors.end() || b == tensors.end()) {
    return absl::NotFoundError(absl::StrCat("head tensors '", prefix, "*' not found"));
  }
  if (!w->second.sizes().equals(weight.sizes()) || !b->second.sizes().equals(bias.sizes())) {
    return absl::InvalidArgumentError(absl::StrCat("head '", prefix, "': shape mismatch"));
  }
  return TorchTry("head load", [&] {
    torch::NoGradGuard ng;
    weight.copy_(w->second);
    bias.copy_(b->second);
  });
}

}  // namespace metatt
