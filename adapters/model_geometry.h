// The model interface the adapters see: what every frozen base model family
// (the BERT-family encoder, the Llama-architecture decoder, ...) must
// provide so that MetaTT and LoRA adapt it without knowing which family it
// is. A model provides:
//
//   1. ModelGeometry (below): its layer count, its attention head count, the
//      input and output width of every projection it has, which projections
//      share boundary rows/columns of an adapter ("ports"), and the groups of
//      projections it asks the adapter for together.
//   2. Calls through EncoderAdapter (adapter.h) at every adapted projection
//      of every layer: AddDeltas(layer, x, group, batch, out) once per group,
//      in ModelGeometry::groups' order, with `x` the input the group's
//      projections share and `out` [B, S, sum of the group's output widths]
//      holding their base outputs side by side in the group's order (the
//      model's fused output: q|k|v, gate|up, ...).
//   3. Frozen weights (no grad), so that gradients reach only the adapter.
//
// Ports: projections whose input (output) has the same port id read the same
// rows of an adapter's input core (columns of its output core); a MetaTT
// boundary core has one block per port in use (METATT.md: "separate
// boundary cores per distinct shape"). Port 0 is the residual stream
// (hidden size), port 1 the MLP's inner width; a model may add others (the
// Llama decoder's grouped-query k/v width when it differs from the hidden
// size).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "adapters/adapter.h"

namespace metatt {

struct ProjectionGeometry {
  int64_t in_width = 0, out_width = 0;  // 0: the model has no such projection
  int in_port = -1, out_port = -1;
};

struct ModelGeometry {
  enum Port : int { kHiddenPort = 0, kFfnPort = 1, kQueryHeadsPort = 2, kKeyValuePort = 3 };

  std::string family;      // "bert" (BERT/RoBERTa encoders) or "llama" (decoders)
  int64_t num_layers = 0;
  int64_t num_heads = 0;   // attention (query) heads
  // The call groups in the order of a layer's forward.
  std::vector<std::vector<Projection>> groups;
  ProjectionGeometry projection[kNumProjections];

  const ProjectionGeometry& of(Projection p) const { return projection[static_cast<int>(p)]; }
  bool Has(Projection p) const { return of(p).in_width > 0; }
  // Index of `projections` in `groups`, or -1.
  int GroupOf(const std::vector<Projection>& projections) const;
  // Column offset of `p` in its group's fused output, or -1.
  int64_t OffsetInGroup(Projection p) const;
  // Sum of the output widths of group g.
  int64_t GroupWidth(int g) const;
  // Empty when consistent, else what is wrong (naming the projection).
  std::string Check() const;

  // BERT/RoBERTa encoder: {q, k, v} (hidden -> hidden), {o}, {ffn_up}
  // (hidden -> ffn), {ffn_down} (ffn -> hidden). `d_in`/`d_out` allow the
  // attention projections' widths to differ (adapter tests); a real encoder
  // has d_in = d_out = hidden size.
  static ModelGeometry Bert(int64_t num_layers, int64_t d_in, int64_t d_out, int64_t d_ffn,
                            int64_t num_heads);
  // Llama decoder: {q, k, v} (k, v narrower under grouped-query attention),
  // {o} (heads -> hidden), {gate, ffn_up} (hidden -> ffn), {ffn_down}.
  static ModelGeometry Llama(int64_t num_layers, int64_t hidden, int64_t d_ffn, int64_t num_heads,
                             int64_t num_kv_heads, int64_t head_dim);
};

}  // namespace metatt
