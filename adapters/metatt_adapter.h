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
// laid out per model call group (config().Geometry().groups; the encoder's
// Q|K|V, O, up, down; the decoder's Q|K|V, O, gate|up, down)
// as one table T[l] [r1, Ctot] whose column block of a group matches the
// encoder's fused output (zeros for a projection of the group that is not
// adapted), so a call costs Z = X . G1 and one out.baddbmm_(Z, T[l][group]).
// 4D/5D build T once per core change. 4+1D builds it per forward for the
// batch's rows in one batched product,
//   T[l, b] = sum_m C[l, m] . GT[task(b)] . E[m]   ([L, B, r1, Ctot])
// (E: the output core's columns placed at each projection's block), reused
// by every adapted layer of that forward: a handful of kernels per forward
// whatever the number of distinct tasks, and no per-task state at all.
// Invalidation: a rebuild counter bumped when MarkCoresChanged()'s counter
// (AddTask, Truncate, ...) or any leaf's autograd version changes; the
// per-forward table is keyed by the batch's host index tensor (held) and its
// version. libtorch optimizers write through .data(), which bumps no
// version: call MarkCoresChanged() after optimizer steps (AdapterBinding
// does).
//
// Tasks (4+1D): the task core GT is stored as ONE tensor [T, r3, r4] (a
// million tasks are 256 MB at r = 8, not a million tensors). A task that
// trains gets a leaf slice [r3, r4] (requires_grad) that the forward uses
// instead of its row and that is copied back into the stored core before
// the next inference. AddTask() appends an identity slice (trainable).
// FreezeShared(true) stops gradients on every shared core and every existing
// task slice, so only slices added afterwards (or re-enabled with
// SetTaskTrainable) train.
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
  // FromTensors: whether the leaves come back trainable (requires_grad) or
  // frozen (a served family: no per-task leaf is created at all).
  enum class Leaves { kTrainable, kFrozen };
  struct FoldStats {
    int64_t rebuilds = 0;  // chain/out caches rebuilt (cores changed)
    int64_t tables = 0;    // fold tables built (4D/5D: per rebuild; 4+1D: per forward)
    int64_t hits = 0;      // adapted-layer calls served by an existing table or row chain
    int64_t chains = 0;    // 4+1D row chains built (mixed-task batches of few tokens per row)
  };
  // A mixed-task 4+1D batch with at most this many tokens per row (a decode
  // step: one) skips the per-row fold table: see RowChainFor().
  static constexpr int64_t kRowChainMaxTokens = 4;

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
      torch::Device device = torch::kCPU, Leaves leaves = Leaves::kTrainable);
  // Leaf name -> shape implied by the config.
  static std::map<std::string, std::vector<int64_t>> ExpectedShapes(const MetaTTConfig& config);

  std::vector<torch::Tensor> Deltas(int layer, const torch::Tensor& x,
                                    const std::vector<Projection>& projections,
                                    const AdapterBatch& batch) override;
  void AddDeltas(int layer, const torch::Tensor& x, const std::vector<Projection>& projections,
                 const AdapterBatch& batch, torch::Tensor& out) override;
  const ModelGeometry* geometry() const override { return &geometry_; }

  // The config with ranks and num_tasks reflecting the current cores.
  const MetaTTConfig& config() const { return config_; }
  double scale() const { return scale_; }
  // Task slices (4+1D); 1 for the single-task forms.
  int64_t num_tasks() const {
    return config_.form == TTForm::k4Plus1D ? task_core_.size(0) : 1;
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
  // "task.<t>" (4+1D: the trainable leaf, or a view of the stored core).
  std::vector<std::pair<std::string, torch::Tensor>> NamedParameters() const;
  std::vector<torch::Tensor> TrainableParameters() const;
  // The trainable inner cores (layer, proj, 5D head, trainable task slices):
  // the cores between the boundary cores "in" and "out"/"head_width". The
  // trainer may give them their own learning rate.
  std::vector<torch::Tensor> InnerParameters() const;
  int64_t NumParameters() const;           // all leaves
  int64_t NumTrainableParameters() const;  // leaves with requires_grad

  // How AddTask() starts a new task slice: the identity (the shared adapter
  // as it is), zeros (the new task starts from the base model; its gradient
  // is non-zero once the shared cores are trained), or the mean of the
  // existing slices (the average task).
  enum class NewTaskInit { kIdentity, kZeros, kMean };
  static absl::StatusOr<NewTaskInit> ParseNewTaskInit(const std::string& name);  // identity|zeros|mean
  // (4+1)D, frozen adapters only (a served family): a new frozen adapter that
  // shares every core with this one (no copy) and whose task core is this
  // one's with `slices` [k, r3, r4] appended: what an add-task publication
  // serves. FAILED_PRECONDITION for another form or a trainable adapter.
  absl::StatusOr<std::unique_ptr<MetaTTAdapter>> WithAppendedTasks(
      const torch::Tensor& slices) const;
  // Task t's slice [r3, r4]: its trainable leaf, or a view of the stored core.
  torch::Tensor TaskSlice(int64_t t) const;
  // (4+1)D only: appends a task slice; returns its index.
  absl::StatusOr<int64_t> AddTask(NewTaskInit init = NewTaskInit::kIdentity);
  void FreezeShared(bool frozen);
  absl::Status SetTaskTrainable(int64_t task, bool trainable);
  // Invalidates the inference cache (call after replacing cores by hand).
  void MarkCoresChanged() { ++version_; }

  // Inference (GradMode off) path: folded (default) or the unfolded chain
  // (Z . C) . G4 that training uses; for tests and the bench.
  void SetInferenceFold(bool on) { fold_enabled_ = on; }
  // Whether few-token mixed-task batches use row chains (default) or the
  // per-row fold table as longer rows do; for tests and the bench.
  void SetRowChains(bool on) { row_chains_enabled_ = on; }
  const FoldStats& fold_stats() const { return fold_stats_; }
  // Bytes held by the stored task core and the trainable task leaves.
  int64_t TaskStorageBytes() const;

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
  int64_t LeafVersionSum() const;
  void RefreshCache();
  // Fold table for this batch, [L, R, r1, Ctot] with R = 1 (every row alike)
  // or B (one block per row).
  torch::Tensor TableFor(const AdapterBatch& batch, int64_t B, torch::Device device);
  torch::Tensor FoldRows(const torch::Tensor& slices) const;  // [R, r3, r4] -> table
  // 4+1D, a batch whose rows name different tasks: the per-row chains
  // C[l, m] . GT[task(b)], [L, B, r1, M * r4] (the fold table before the
  // output core), built once per forward; undefined when the batch has no
  // index or one task for every row (the table serves those). Per call the
  // output core is applied per projection: a decode step then costs
  // L * M * B * r1 * r4 to prepare instead of the table's
  // L * B * r1 * M * r4 * Ctot, and reads r4 x D_out per projection instead
  // of a B x r1 x Ctot table.
  torch::Tensor RowChainFor(const AdapterBatch& batch, int64_t B, torch::Device device);
  // The task of every row of `host` [B], or -1 when they differ (range-checked).
  int64_t UniformTask(const torch::Tensor& host, int64_t B) const;
  // y += (z . chain[:, :, block m]) . out_m for projection pi (4+1D row chains).
  void AddRowChainDelta(const torch::Tensor& z, const torch::Tensor& chain, int pi,
                        torch::Tensor y) const;
  // Z = X . G1 for a call whose first adapted projection is `first`.
  torch::Tensor ProjectIn(const torch::Tensor& x, int first) const;

  MetaTTConfig config_;
  double scale_ = 1.0;
  std::vector<int> layer_index_;  // base layer -> L index or -1
  int proj_index_[kNumProjections] = {-1, -1, -1, -1, -1, -1, -1};
  MetaTTConfig::Layout layout_;
  ModelGeometry geometry_;  // config_.Geometry(): groups and widths
  // Column offset of each adapted projection in the fold table (-1: none),
  // and each group's (offset, width) there (width 0: group not adapted).
  int64_t table_col_[kNumProjections] = {-1, -1, -1, -1, -1, -1, -1};
  std::vector<std::pair<int64_t, int64_t>> group_cols_;
  int64_t table_cols_ = 0;

  // Leaves in the paper's layout.
  torch::Tensor in_;                  // [in_rows, r1] (D_in, plus d_ffn rows for ffn_down)
  torch::Tensor layer_;               // [r1, L, r2]
  torch::Tensor proj_;                // [r2, M, r3]
  torch::Tensor out_;                 // 4D/4+1D: [r_last, D_out]; 5D: head_ [r3, H, r4]
  torch::Tensor head_width_;          // 5D: [r4, D_out / H]
  torch::Tensor task_core_;           // 4+1D: [T, r3, r4], never requires grad
  std::map<int64_t, torch::Tensor> task_leaves_;  // trainable slices [r3, r4]

  // Inference caches (GradMode off only).
  int64_t version_ = 0;
  int64_t cache_key_version_ = -1;
  int64_t cache_key_leaves_ = -1;
  int64_t cache_key_core_ = -1;
  int64_t cache_key_tasks_ = -1;
  torch::Tensor cache_chain_;  // [L, M, r1, r3], scaled
  torch::Tensor cache_g1t_;    // G1^T [r1, in_rows], contiguous
  torch::Tensor cache_place_;  // E: [M * r_last, Ctot], output core per projection block
  torch::Tensor cache_out_[kNumProjections];  // 4+1D: output core of projection pi, [r4, D_out]
  torch::Tensor cache_table_;  // 4D/5D: [L, 1, r1, Ctot]
  bool fold_enabled_ = true;
  bool row_chains_enabled_ = true;
  FoldStats fold_stats_;
  // A batch's host index tensor (held, so its identity cannot be reused
  // while cached) and its version: what the per-forward caches are keyed by.
  struct BatchKey {
    torch::Tensor host;
    int64_t version = -1;
    bool Same(const torch::Tensor& h) const {
      return h.defined() && host.defined() &&
             host.unsafeGetTensorImpl() == h.unsafeGetTensorImpl() && version == h._version();
    }
    void Hold(const torch::Tensor& h) {
      host = h;
      version = h.defined() ? h._version() : -1;
    }
  };
  // The batch's task index on `device` (the uploaded copy when it is there).
  static torch::Tensor IndexOn(const AdapterBatch& batch, const torch::Tensor& host,
                               torch::Device device);
  // 4+1D: the current forward's table, keyed by the batch; a batch of one
  // task also by that task (kept across forwards); both with the rebuild
  // count.
  BatchKey rows_key_;
  int64_t rows_key_task_ = -1;
  int64_t rows_rebuilds_ = -1;
  torch::Tensor rows_table_;
  // 4+1D row chains, keyed like rows_table_ (an undefined chain under a
  // matching key records "one task: use the table").
  BatchKey chain_key_;
  int64_t chain_rebuilds_ = -1;
  torch::Tensor rows_chain_;
};

}  // namespace metatt
