// MetaTT adapter: one tensor train shared by every adapted (layer,
// projection[, task]) of the frozen encoder (METATT.md).
//
// Hot path (never builds dW): for a Deltas() call on layer input X [B, S, D_in]
//   Z = X . G1                       once, shared by Q, K, V
//   C = s . G2[l] . G3[m] (. GT[t])  r x r; per row task via one batched matmul
//   Y = (Z . C) . G4                 (5D: . G4 [r3, H, r4] then . G5 per head)
// Training (GradMode on): C is rebuilt per call from the live leaves (a
// handful of r x r products) and the path above is differentiable.
// Inference (GradMode off) folds the chain into the output core:
//   W[l, m(, t)] = C . G4   [r1, D_out]   (5D: column block h = C . G4[h] . G5)
//   Y = Z . W               one [N, r1] x [r1, D_out] per projection
// so a delta costs the same as LoRA's B step while Z is shared by Q, K, V.
// 4D/5D fold every (l, m) at once; 4+1D folds lazily, per task present in a
// batch (all (l, m) of that task together), keeping an LRU cache bounded by
// fold_cache_bytes. Rows of different tasks use one bmm over the gathered
// [B, r1, D_out] folds. Invalidation: the cache key is MarkCoresChanged()'s
// counter (bumped by AddTask, Truncate, ...) plus the autograd version
// counters of the shared leaves; each cached task fold also records its task
// slice's version, so in-place edits of a leaf (add_, copy_) invalidate it
// too. libtorch optimizers write through .data(), which bumps no version:
// call MarkCoresChanged() after optimizer steps (AdapterBinding does).
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
    // Bound on the inference fold cache (4+1D: per-task folds, LRU).
    int64_t fold_cache_bytes = int64_t{64} << 20;
  };
  // How rows of different tasks are combined at inference (bench knob).
  enum class MixedKernel { kBmm, kGrouped };
  struct FoldStats {
    int64_t folds = 0;         // (re)computed fold tensors (all (l, m) of a task)
    int64_t hits = 0;          // task folds served from the cache
    int64_t cached_tasks = 0;  // task folds held now
    int64_t cached_bytes = 0;
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

  // Inference (GradMode off) path: folded (default) or the unfolded chain
  // (Z . C) . G4 that training uses; for tests and the bench.
  void SetInferenceFold(bool on) { fold_enabled_ = on; }
  void SetMixedKernel(MixedKernel k) { mixed_kernel_ = k; }
  void SetFoldCacheBytes(int64_t bytes) { fold_cache_bytes_ = bytes; }
  const FoldStats& fold_stats() const { return fold_stats_; }

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
  int64_t SharedVersionSum() const;
  void RefreshCache();
  // Folded W for every (l, m) of `task` (4+1D) or of the adapter: [L, M, r1, out_cols].
  torch::Tensor FoldFor(int64_t task);
  torch::Tensor FoldOne(const torch::Tensor& task_slice) const;
  void EvictFolds();
  std::vector<torch::Tensor> FoldedDeltas(int l, const torch::Tensor& x,
                                          const std::vector<Projection>& projections,
                                          const AdapterBatch& batch);

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

  // Inference cache (GradMode off only).
  int64_t version_ = 0;
  int64_t cache_key_version_ = -1;
  int64_t cache_key_leaves_ = -1;
  size_t cache_key_tasks_ = 0;
  torch::Tensor cache_chain_;  // [L, M, r1, r3], scaled
  torch::Tensor cache_g1t_;    // G1^T [r1, in_rows], contiguous
  torch::Tensor cache_fold_;   // 4D/5D: [L, M, r1, out_cols]
  struct TaskFold {
    torch::Tensor fold;  // [L, M, r1, out_cols]
    int64_t task_version = 0;
    int64_t last_used = 0;
  };
  std::map<int64_t, TaskFold> task_folds_;
  int64_t fold_clock_ = 0;
  bool fold_enabled_ = true;
  MixedKernel mixed_kernel_ = MixedKernel::kBmm;
  int64_t fold_cache_bytes_ = int64_t{64} << 20;
  FoldStats fold_stats_;
  int64_t cache_rebuilds_ = 0;  // RefreshCache rebuilds (fold contents may change)
  // Mixed-task batch: its rows' folds gathered once, [L, M, B, r1, out_cols],
  // and reused by every adapted layer of the same forward (one gather per
  // forward instead of a stack + index_select per projection: on a GPU the
  // kernel count is the cost). Keyed by the batch's host index tensor (held,
  // so its identity cannot be reused while cached), its version, the cache
  // rebuild count and the versions of the batch's task slices.
  torch::Tensor gathered_key_;
  int64_t gathered_key_version_ = -1;
  int64_t gathered_rebuilds_ = -1;
  int64_t gathered_task_versions_ = -1;
  torch::Tensor gathered_;
};

}  // namespace metatt
