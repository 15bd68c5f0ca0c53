// MetaTT adapter: one tensor train shared by every adapted (layer,
// projection[, task]) of the frozen encoder (METATT.md).
//
// Hot path (never builds dW): for a Deltas() call on layer input X [B, S, D_in]
//   Z = X . G1                       once, shared by Q, K, V
//   C = s . G2[l] . G3[m] (. GT[t])  r x r; per row task via one batched matmul
//   Y = (Z . C) . G4                 (5D: . G4 [r3, H, r4] then . G5 per head)
// Chain caching: with grad enabled (training) C is rebuilt per call from the
// live leaves (a handful of r x r products). Without grad (inference) the
// products G2[l] . G3[m] for all (l, m) and the stacked task slices are cached
// and reused until a core changes; the cache key is MarkCoresChanged()'s
// counter plus the autograd version counters of every leaf, so in-place
// optimizer updates invalidate it automatically too.
//
// Tasks (4+1D): the task core GT [r3, T, r4] is kept as T leaf slices
// [r3, r4]. AddTask() appends an identity slice (trainable). FreezeShared(true)
// stops gradients on every shared core and every existing task slice, so only
// slices added afterwards (or re-enabled with SetTaskTrainable) train.
//
// Not thread-safe: one thread (the scheduler loop) drives an adapter.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "adapters/adapter.h"
#include "adapters/metatt_config.h"
#include "adapters/tensor_train.h"
#include "adapters/tt_sweep.h"

namespace metatt {

class MetaTTAdapter : public EncoderAdapter {
 public:
  struct Options {
    torch::Dtype dtype = torch::kFloat32;
    torch::Device device = torch::kCPU;
    uint64_t seed = 0;  // for normal(std) inits
  };

  static absl::StatusOr<std::unique_ptr<MetaTTAdapter>> Create(const MetaTTConfig& config,
                                                               const Options& options);
  static absl::StatusOr<std::unique_ptr<MetaTTAdapter>> Create(const MetaTTConfig& config) {
    return Create(config, Options());
  }
  // Builds an adapter from named leaves (see NamedParameters() for names and
  // ExpectedShapes() for shapes). `config.ranks` must be the cores' current
  // ranks and `config.num_tasks` the number of task slices. `scale` is the
  // recorded s (it is not recomputed from alpha after truncations).
  static absl::StatusOr<std::unique_ptr<MetaTTAdapter>> FromTensors(
      const MetaTTConfig& config, double scale, const std::map<std::string, torch::Tensor>& tensors,
      torch::Device device = torch::kCPU);
  // Leaf name -> shape implied by the config.
  static std::map<std::string, std::vector<int64_t>> ExpectedShapes(const MetaTTConfig& config);

  std::vector<torch::Tensor> Deltas(int layer, const torch::Tensor& x,
                                    const std::vector<Projection>& projections,
                                    const AdapterBatch& batch) override;

  // The config with ranks and num_tasks reflecting the current cores.
  const MetaTTConfig& config() const { return config_; }
  double scale() const { return scale_; }
  // Task slices (4+1D); 1 for the single-task forms.
  int64_t num_tasks() const {
    return config_.form == TTForm::k4Plus1D ? static_cast<int64_t>(tasks_.size()) : 1;
  }
  torch::Dtype dtype() const { return in_.scalar_type(); }
  torch::Device device() const { return in_.device(); }

  // A TT view of the leaves (differentiable: boundary cores unsqueezed, task
  // slices stacked).
  TensorTrain ToTensorTrain() const;
  // Scaled dense update s . dW[layer, proj, task], [D_in, D_out]; for tests.
  absl::StatusOr<torch::Tensor> DenseDelta(int layer, Projection projection,
                                           int64_t task = 0) const;

  // Names: "in", "layer", "proj", "out" (4D/4+1D), "head", "head_width" (5D),
  // "task.<t>" (4+1D).
  std::vector<std::pair<std::string, torch::Tensor>> NamedParameters() const;
  std::vector<torch::Tensor> TrainableParameters() const;
  int64_t NumParameters() const;           // all leaves
  int64_t NumTrainableParameters() const;  // leaves with requires_grad

  // (4+1)D only: appends an identity task slice; returns its index.
  absl::StatusOr<int64_t> AddTask();
  void FreezeShared(bool frozen);
  absl::Status SetTaskTrainable(int64_t task, bool trainable);
  // Invalidates the inference cache (call after replacing cores by hand).
  void MarkCoresChanged() { ++version_; }

  struct SweepResult {
    std::vector<BondReport> bonds;
    // Every leaf whose tensor was replaced (all of them: the gauge moves even
    // where shapes stay); the trainer must rebuild its optimizer from
    // TrainableParameters() and drop the state of these names.
    std::vector<std::string> changed;
    std::vector<std::string> shape_changed;
  };
  // Runs TruncationSweep on the cores and swaps in new leaves (keeping each
  // leaf's requires_grad flag). Updates config().ranks.
  absl::StatusOr<SweepResult> Truncate(const TruncationParams& params);

 private:
  MetaTTAdapter() = default;
  void BuildIndexMaps();
  absl::Status SetFromTensorTrain(const TensorTrain& tt);
  int64_t LeafVersionSum() const;
  void RefreshCache();
  torch::Tensor StackedTasks() const;

  MetaTTConfig config_;
  double scale_ = 1.0;
  std::vector<int> layer_index_;  // base layer -> L index or -1
  int proj_index_[kNumProjections] = {-1, -1, -1, -1, -1, -1};
  MetaTTConfig::Layout layout_;

  // Leaves in the paper's layout.
  torch::Tensor in_;                  // [in_rows, r1] (D_in, plus d_ffn rows for ffn_down)
  torch::Tensor layer_;               // [r1, L, r2]
  torch::Tensor proj_;                // [r2, M, r3]
  torch::Tensor out_;                 // 4D/4+1D: [r_last, D_out]; 5D: head_ [r3, H, r4]
  torch::Tensor head_width_;          // 5D: [r4, D_out / H]
  std::vector<torch::Tensor> tasks_;  // 4+1D: T x [r3, r4]

  // Inference cache.
  int64_t version_ = 0;
  int64_t cache_key_version_ = -1;
  int64_t cache_key_leaves_ = -1;
  size_t cache_key_tasks_ = 0;
  torch::Tensor cache_chain_;  // [L, M, r1, r3], scaled
  torch::Tensor cache_tasks_;  // [T, r3, r4]
};

}  // namespace metatt
