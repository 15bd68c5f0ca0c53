// Task heads on the pooled encoder output. A head is two plain leaf tensors
// (weight [out, D], bias [out]) so that it can be saved in safetensors as is:
//   classification: D -> num_labels logits, cross-entropy loss
//   regression:     D -> 1 score, mean-squared-error loss
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

  struct Options {
    LabelKind kind = LabelKind::kClassification;
    int64_t num_labels = 2;  // ignored for regression
    int64_t hidden_size = 0;
    double init_std = 0.02;  // weight ~ N(0, init_std), bias = 0 (as HF)
    uint64_t seed = 0;
    torch::Device device = torch::kCPU;
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
