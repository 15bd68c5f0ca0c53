// Task heads on the pooled encoder output. A head is two plain leaf tensors
// (weight [out, D], bias [out]) so that it can be saved in safetensors as is:
//   classification: D -> num_labels logits, cross-entropy loss
//   regression:     D -> 1 score, mean-squared-error loss
// A regression head starts at the training labels' mean (bias) and its loss
// is divided by their variance, so that its loss and gradients start on the
// scale of a classifier's (~1): an STS-B loss of ~8 at step 1 otherwise sets
// the gradient norm that a multi-task family's clip scales every task by.
// Neither changes what is saved: the head stays weight + bias.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include <torch/torch.h>

#include "absl/status/statusor.h"
#include "server/training/dataset.h"

namespace metatt {

struct TaskHead {
  LabelKind kind = LabelKind::kClassification;
  int64_t num_labels = 2;  // 1 for regression
  torch::Tensor weight;    // [out, D], requires grad
  torch::Tensor bias;      // [out], requires grad
  double loss_weight = 1.0;  // training only (1 / label variance for regression)

  struct Options {
    LabelKind kind = LabelKind::kClassification;
    int64_t num_labels = 2;  // ignored for regression
    int64_t hidden_size = 0;
    double init_std = 0.02;  // weight ~ N(0, init_std), bias = 0 (as HF)
    uint64_t seed = 0;
    torch::Device device = torch::kCPU;
    // Regression only: the bias starts at label_mean, the loss is divided by
    // label_std^2 (ForData() takes both from the training set).
    double label_mean = 0.0, label_std = 1.0;
    // kind, num_labels and the label statistics of `train`.
    static Options ForData(const Dataset& train, int64_t hidden_size, uint64_t seed,
                           torch::Device device);
  };
  static absl::StatusOr<std::shared_ptr<TaskHead>> Create(const Options& options);
  // From saved tensors "<prefix>weight", "<prefix>bias"; kind/num_labels are
  // taken from the shapes and `kind`.
  static absl::StatusOr<std::shared_ptr<TaskHead>> FromTensors(
      LabelKind kind, const std::map<std::string, torch::Tensor>& tensors,
      const std::string& prefix, torch::Device device);

  int64_t out_features() const { return kind == LabelKind::kRegression ? 1 : num_labels; }
  // pooled [B, D] -> [B, out] (regression: [B, 1]).
  torch::Tensor Forward(const torch::Tensor& pooled) const;
  // Summed (not averaged) loss over the rows: labels int64 [B] for
  // classification, float [B] for regression.
  torch::Tensor LossSum(const torch::Tensor& output, const torch::Tensor& labels) const;
  // Class index (classification) or score (regression) per row, on CPU.
  torch::Tensor Predict(const torch::Tensor& output) const;

  // {"<prefix>weight", "<prefix>bias"}, detached clones.
  std::map<std::string, torch::Tensor> Tensors(const std::string& prefix) const;
  // Copies values in place (shapes must match); keeps the leaf tensors.
  absl::Status Load(const std::map<std::string, torch::Tensor>& tensors,
                    const std::string& prefix);
};

}  // namespace metatt
