// Typed configuration of a MetaTT adapter (see /work/shared/METATT.md).
//
// Forms and core order (each core is stored in the paper's layout):
//   4D    : in [D_in, r1], layer [r1, L, r2], proj [r2, M, r3], out [r3, D_out]
//   4+1D  : in, layer, proj, task [r3, T, r4] (kept as T slices [r3, r4]), out [r4, D_out]
//   5D    : in, layer, proj, head [r3, H, r4], head_width [r4, D_out / H]
//
// Scale: the adapted layer adds s * x . dW with s = alpha / r1.
// DEFAULT: alpha unset means alpha = r1, i.e. s = 1 (with ze-id-id-id the
// update is then exactly G1 . G2 . G3 (. GT) . G4, no hidden rescaling).
// The scale is fixed when the adapter is created: a later rank truncation
// does not change s (family.json records it).
//
// Init spec: dash-separated per-core codes in core order, e.g. "ze-id-id-id"
// (default, the paper's choice), "no" (every core normal(0.2), the paper's
// baseline), or codes "ze"|"zeros", "id"|"identity", "or"|"orthogonal",
// "normal(STD)".
// One code applies to every core; fewer codes than cores repeat the last
// code (so "ze-id-id-id" on 5 cores makes the 5th core identity too).
// New task slices (AddTask) always start as the identity.
//
// FFN projections (4D and 4+1D): ffn_up maps D -> d_ffn and ffn_down d_ffn -> D,
// so they need their own boundary rows/columns. The input core G1 stacks one
// row block per input port in use and the output core G4 one column block
// per output port in use (BoundaryLayout(); ports: model_geometry.h, e.g. the
// hidden stream, the MLP width, a decoder's narrower grouped-query k/v
// width), in port order; the L, M (and task) cores are shared.
// Mathematically this is still one tensor train whose input mode has size
// in_rows and output mode out_cols; a projection reads its block. An
// "identity" init gives every block its own rectangular identity.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "adapters/adapter.h"
#include "adapters/model_geometry.h"

namespace metatt {

enum class TTForm { k4D, k5D, k4Plus1D };
const char* TTFormName(TTForm form);  // "4d", "5d", "4+1d"
absl::StatusOr<TTForm> ParseTTForm(const std::string& name);

// "q"/"query"/"q_proj", "k"/"key"/"k_proj", "v"/"value"/"v_proj",
// "o"/"attn_output"/"o_proj", "ffn_up"/"up_proj", "ffn_down"/"down_proj",
// "gate"/"gate_proj".
absl::StatusOr<Projection> ParseProjection(const std::string& name);

struct CoreInit {
  // kOrthogonal: a seeded random (semi-)orthogonal matrix, per slice for 3-D
  // cores and per block for stacked boundary cores (unit singular values, so
  // it has the identity's scale but no preferred coordinates and a different
  // rotation per layer / projection slice).
  enum class Kind { kZeros, kIdentity, kNormal, kOrthogonal };
  Kind kind = Kind::kIdentity;
  double std = 0.0;  // kNormal only
  std::string ToString() const;
};
// Parses an init spec (see the file comment) into one CoreInit per core.
absl::StatusOr<std::vector<CoreInit>> ParseInitSpec(const std::string& spec, int num_cores);

struct MetaTTConfig {
  TTForm form = TTForm::k4D;
  // One rank per bond (4D: 3 bonds, 5D and 4+1D: 4 bonds) or a single value
  // used for every bond.
  std::vector<int64_t> ranks = {8};
  // Adapted projections; their order defines the M index.
  std::vector<Projection> projections = {Projection::kQuery, Projection::kValue};
  // Adapted layers (indices into the base model); empty = all layers. Their
  // order defines the L index.
  std::vector<int> layers;
  std::optional<double> alpha;  // unset: alpha = r1 (s = 1)
  std::string init = "ze-id-id-id";
  int64_t num_tasks = 1;  // (4+1)D only; must be 1 for the other forms
  // Base model dimensions.
  int64_t d_in = 0;
  int64_t d_out = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;  // 5D only
  int64_t d_ffn = 0;      // intermediate size; needed when ffn_up/ffn_down are adapted
  // The base model's geometry (adapters/model_geometry.h). Unset: the
  // BERT-family encoder implied by d_in, d_out, d_ffn and num_layers (every
  // family written before decoders existed, and family.json stays as it
  // was). SetModel() sets it and those fields from it.
  std::optional<ModelGeometry> model;
  // The geometry in force: `model`, else ModelGeometry::Bert(...) of the
  // fields above.
  ModelGeometry Geometry() const;
  // Adapts `g`'s model: model = g, d_in = d_out = hidden width (port 0),
  // d_ffn = the MLP width (port 1, 0 when absent), num_layers.
  void SetModel(const ModelGeometry& g);

  // Row blocks of G1 and column blocks of G4 (see the file comment).
  struct Layout {
    int64_t in_rows = 0, out_cols = 0;
    int64_t in_offset[kNumProjections] = {0}, in_width[kNumProjections] = {0};
    int64_t out_offset[kNumProjections] = {0}, out_width[kNumProjections] = {0};
    std::vector<std::pair<int64_t, int64_t>> in_blocks, out_blocks;  // (offset, width)
  };
  Layout BoundaryLayout() const;

  int NumCores() const;  // 4 or 5
  int NumBonds() const { return NumCores() - 1; }
  std::vector<int64_t> BondRanks() const;  // expanded to NumBonds()
  double Alpha() const;
  double Scale() const;  // alpha / r1
  std::vector<int> AdaptedLayers() const;
  int64_t ParameterCount() const;  // METATT.md formulas, per-bond ranks

  // InvalidArgument naming the offending field.
  absl::Status Validate() const;
  nlohmann::json ToJson() const;
  static absl::StatusOr<MetaTTConfig> FromJson(const nlohmann::json& j);
  static absl::StatusOr<MetaTTConfig> FromJsonString(const std::string& text);
};

}  // namespace metatt
