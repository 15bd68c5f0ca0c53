// The seam between the frozen encoder (server/model/) and an adapter
// (MetaTT, LoRA). The encoder never changes its own weights; at each adapted
// projection it asks the adapter for an additive delta:
//
//   y = W x + b + delta(layer, projection, x, task of the row)
//
// Projections that read the same input (Q, K, V read the attention input) are
// asked for together so that an adapter can share work across them (MetaTT
// computes Z = X . G1 once for all three).
#pragma once

#include <vector>

#include <torch/torch.h>

namespace metatt {

struct ModelGeometry;  // adapters/model_geometry.h: the model interface

enum class Projection : int {
  kQuery = 0,
  kKey = 1,
  kValue = 2,
  kAttnOutput = 3,  // attention output dense (BertSelfOutput)
  kFfnUp = 4,       // intermediate dense (D -> 4D); Llama: up_proj
  kFfnDown = 5,     // output dense (4D -> D); Llama: down_proj
  kGate = 6,        // Llama gate_proj (D -> I; reads the same input as up_proj)
};
constexpr int kNumProjections = 7;
const char* ProjectionName(Projection p);  // "q", "k", "v", "o", "ffn_up", "ffn_down", "gate"

// Per-forward information the adapter needs about the rows of the batch.
struct AdapterBatch {
  AdapterBatch() = default;
  AdapterBatch(torch::Tensor index) : task_index(std::move(index)) {}  // NOLINT: implicit on purpose

  // int64 [B] on the model's device: task index of each row (sequence).
  // Undefined means every row is task 0 (single-task forms ignore it).
  torch::Tensor task_index;
  // Optional: the same indices on the CPU (int64 [B]). Adapters read task ids
  // on the host (validation, grouping); with this set a CUDA forward makes no
  // device-to-host copy per adapted layer. HostTaskIndex() falls back to a
  // copy of task_index.
  torch::Tensor task_index_host;

  // Both tensors from host-side indices: the host copy and one upload.
  static AdapterBatch FromHost(const torch::Tensor& host_index, torch::Device device);
  torch::Tensor HostTaskIndex() const;
};

class EncoderAdapter {
 public:
  virtual ~EncoderAdapter() = default;

  // x: [B, S, D_in], the input shared by `projections` at `layer`.
  // Returns one tensor per requested projection, [B, S, D_out] to be added to
  // the base projection's output, or an undefined tensor where the adapter
  // does not adapt that (layer, projection).
  virtual std::vector<torch::Tensor> Deltas(int layer, const torch::Tensor& x,
                                            const std::vector<Projection>& projections,
                                            const AdapterBatch& batch) = 0;

  // What the model calls: adds the deltas of `projections` into `out` in
  // place. `out` [B, S, W_1 + ... + W_n] holds the n projections' base
  // outputs side by side (the model's fused Q|K|V or gate|up output, or one
  // projection's output), with widths from geometry() (without one: all
  // widths equal). The default adds Deltas() block by block (differentiable);
  // adapters override it to fuse the add into their last matmul at inference
  // (one baddbmm_ per call instead of a matmul and an add per projection: on
  // a GPU the kernel count is the cost).
  virtual void AddDeltas(int layer, const torch::Tensor& x,
                         const std::vector<Projection>& projections, const AdapterBatch& batch,
                         torch::Tensor& out);

  // The geometry of the model this adapter was built for (widths, groups);
  // nullptr when the adapter does not know it (then every projection of a
  // call group has the same output width).
  virtual const ModelGeometry* geometry() const { return nullptr; }
};

// The BERT-family encoder's groups of projections asked for together (they
// read the same input), in its order: ModelGeometry::Bert(...).groups. Other
// models give theirs in their ModelGeometry.
const std::vector<std::vector<Projection>>& ProjectionGroups();
// Group index of `projections` in ProjectionGroups(), or -1.
int ProjectionGroupOf(const std::vector<Projection>& projections);

}  // namespace metatt
