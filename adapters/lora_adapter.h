// LoRA on the same projections as MetaTT (the baseline of every comparison),
// unmerged: delta = s . (x . A^T) . B^T with A [r, D_in], B [D_out, r],
// s = alpha / r (or alpha / sqrt(r) with use_rslora, as in PEFT). No dropout
// (inference semantics). LoadPeftAdapter reads a Hugging Face PEFT adapter
// directory and reproduces PEFT's outputs.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <map>
#include <optional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "adapters/adapter.h"
#include "adapters/model_geometry.h"

namespace metatt {

struct LoraConfig {
  int64_t rank = 8;
  double alpha = 16.0;
  bool use_rslora = false;
  std::vector<Projection> projections = {Projection::kQuery, Projection::kValue};
  std::vector<int> layers;  // empty = all
  int64_t num_layers = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;  // needed only when FFN projections are adapted
  // The base model's geometry (adapters/model_geometry.h). Unset: the
  // BERT-family encoder of num_layers, hidden_size, intermediate_size.
  std::optional<ModelGeometry> model;
  // "peft": A ~ kaiming_uniform(a = sqrt(5)) i.e. U(-1/sqrt(D_in), 1/sqrt(D_in)),
  // B = 0 (PEFT's default, delta = 0 at step 0). "random": B drawn like A.
  std::string init = "peft";

  double Scale() const;
  std::vector<int> AdaptedLayers() const;
  // In and out width of a projection for this model.
  std::pair<int64_t, int64_t> Dims(Projection p) const;
  // `model`, else ModelGeometry::Bert(num_layers, hidden, hidden, intermediate).
  ModelGeometry Geometry() const;
  // model = g; num_layers, hidden_size and intermediate_size from it.
  void SetModel(const ModelGeometry& g);
  int64_t ParameterCount() const;
  absl::Status Validate() const;
};

class LoraAdapter : public EncoderAdapter {
 public:
  struct Options {
    torch::Dtype dtype = torch::kFloat32;
    torch::Device device = torch::kCPU;
    uint64_t seed = 0;
  };
  struct Factors {
    torch::Tensor a;  // [r, D_in]
    torch::Tensor b;  // [D_out, r]
  };
  using Key = std::pair<int, Projection>;  // (base layer, projection)

  static absl::StatusOr<std::unique_ptr<LoraAdapter>> Create(const LoraConfig& config,
                                                             const Options& options);
  // Factors for every (layer, projection) the config adapts, shapes checked.
  static absl::StatusOr<std::unique_ptr<LoraAdapter>> FromFactors(const LoraConfig& config,
                                                                  std::map<Key, Factors> factors);

  std::vector<torch::Tensor> Deltas(int layer, const torch::Tensor& x,
                                    const std::vector<Projection>& projections,
                                    const AdapterBatch& batch) override;
  // Inference (GradMode off): one x . [A_1; A_2; ...]^T and one addmm_ into
  // the fused output per call (B factors placed at their projections' column
  // blocks, cached until a factor changes); training: the default.
  void AddDeltas(int layer, const torch::Tensor& x, const std::vector<Projection>& projections,
                 const AdapterBatch& batch, torch::Tensor& out) override;
  const ModelGeometry* geometry() const override { return &geometry_; }

  const LoraConfig& config() const { return config_; }
  double scale() const { return scale_; }
  // "layer.<l>.<proj>.lora_A" / ".lora_B".
  std::vector<std::pair<std::string, torch::Tensor>> NamedParameters() const;
  // Every adapted (layer, projection)'s factors (the live leaves).
  const std::map<Key, Factors>& factors() const { return factors_; }
  std::vector<torch::Tensor> TrainableParameters() const;
  int64_t NumParameters() const;
  // s . A^T . B^T as [D_in, D_out] (delta = x . DenseDelta); for tests.
  absl::StatusOr<torch::Tensor> DenseDelta(int layer, Projection projection) const;

 private:
  LoraAdapter() = default;
  LoraConfig config_;
  ModelGeometry geometry_;  // config_.Geometry()
  double scale_ = 1.0;
  std::map<Key, Factors> factors_;
  struct Fused {
    torch::Tensor a_t;  // s . [A_1; ...]^T  [D_in, sum r]
    torch::Tensor b;    // [sum r, n * W], B_j^T at projection j's column block
    int64_t version = -1;
  };
  std::map<std::pair<int, int>, Fused> fused_;  // (layer, projection group)
};

struct LoadPeftOptions {
  torch::Dtype dtype = torch::kFloat32;
  torch::Device device = torch::kCPU;
  // Base model dimensions (checked against the factors' shapes when > 0).
  int64_t num_layers = 0;
  int64_t hidden_size = 0;
  // The base model's geometry; required for decoder (Llama) adapters, whose
  // k/v and gate projections have their own widths.
  std::optional<ModelGeometry> model;
};

// Reads `dir`/adapter_config.json and `dir`/adapter_model.safetensors.
// Supports target_modules among query, key, value, dense (attention output,
// intermediate and output dense) for encoders, and q_proj, k_proj, v_proj,
// o_proj, gate_proj, up_proj, down_proj for Llama decoders (with
// options.model), r, lora_alpha, use_rslora, fan_in_fan_out =
// false, bias = "none", no rank/alpha patterns, no DoRA; anything else is
// refused with InvalidArgument/Unimplemented naming the field.
absl::StatusOr<std::unique_ptr<LoraAdapter>> LoadPeftAdapter(const std::string& dir,
                                                             const LoadPeftOptions& options = {});

}  // namespace metatt
