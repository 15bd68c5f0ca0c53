// A frozen BERT-family encoder in plain LibTorch, loaded from a Hugging Face
// model directory (config.json + model.safetensors). Weights never require
// grad; an optional EncoderAdapter adds deltas at the adapted projections.
#pragma once

#include <memory>
#include <string>

#include <torch/torch.h>

#include "absl/status/statusor.h"
#include "adapters/adapter.h"
#include "adapters/model_geometry.h"
#include "server/model/bert_config.h"

namespace metatt {

// "auto" picks CUDA when a GPU is visible, else CPU.
absl::StatusOr<torch::Device> ParseDevice(const std::string& spec);

enum class Pooling { kCls, kMean };
absl::StatusOr<Pooling> ParsePooling(const std::string& name);  // "cls" | "mean"

struct EncoderInput {
  torch::Tensor input_ids;       // int64 [B, S]
  torch::Tensor token_type_ids;  // int64 [B, S] (may be undefined: zeros)
  torch::Tensor attention_mask;  // int64 [B, S], 1 = real token (may be undefined: ones)
};

class BertEncoder {
 public:
  struct Options {
    std::string model_dir;  // holds config.json and model.safetensors
    torch::Device device = torch::kCPU;
  };
  static absl::StatusOr<std::shared_ptr<BertEncoder>> Create(const Options& options);
  // From tensors already in memory (tests); names as in HF's BertModel.
  static absl::StatusOr<std::shared_ptr<BertEncoder>> FromTensors(
      const BertConfig& config, const std::map<std::string, torch::Tensor>& tensors,
      torch::Device device);

  // Last hidden states [B, S, hidden]. Differentiable w.r.t. the adapter's
  // parameters (the base weights are constants). Shapes and ids are
  // validated; a bad input is INVALID_ARGUMENT naming the field.
  absl::StatusOr<torch::Tensor> Forward(const EncoderInput& input,
                                        EncoderAdapter* adapter = nullptr,
                                        const AdapterBatch& batch = {}) const;

  const BertConfig& config() const { return config_; }
  // What adapters need to know (adapters/model_geometry.h): groups {q, k, v},
  // {o}, {ffn_up}, {ffn_down}, asked in that order.
  ModelGeometry geometry() const {
    return ModelGeometry::Bert(config_.num_hidden_layers, config_.hidden_size,
                               config_.hidden_size, config_.intermediate_size,
                               config_.num_attention_heads);
  }
  torch::Device device() const { return device_; }
  const std::string& model_dir() const { return model_dir_; }

 private:
  struct Layer {
    torch::Tensor qkv_w, qkv_b;  // fused [3D, D], [3D]
    torch::Tensor o_w, o_b, ln1_w, ln1_b, up_w, up_b, down_w, down_b, ln2_w, ln2_b;
  };
  BertEncoder() = default;
  torch::Tensor ForwardUnchecked(const EncoderInput& in, EncoderAdapter* adapter,
                                 const AdapterBatch& batch) const;

  BertConfig config_;
  torch::Device device_ = torch::kCPU;
  std::string model_dir_;
  torch::Tensor word_emb_, pos_emb_, type_emb_, emb_ln_w_, emb_ln_b_;
  std::vector<Layer> layers_;
};

// CLS pooling (first token) or sentence-transformers mean pooling over real
// tokens. hidden [B, S, D], attention_mask [B, S] -> [B, D].
torch::Tensor Pool(const torch::Tensor& hidden, const torch::Tensor& attention_mask,
                   Pooling pooling);

}  // namespace metatt
