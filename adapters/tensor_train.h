// Tensor trains as value types and the free functions MetaTT needs on them.
//
// Every core is stored 3-D as [r_{k-1}, n_k, r_k] with r_0 = r_K = 1. Mode
// order per form (see metatt_config.h):
//   4D   : D_in, L, M, D_out
//   4+1D : D_in, L, M, T, D_out
//   5D   : D_in, L, M, H, D_out / H
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "adapters/metatt_config.h"

namespace metatt {

struct TensorTrain {
  TTForm form = TTForm::k4D;
  std::vector<torch::Tensor> cores;

  std::vector<int64_t> Ranks() const;      // the K - 1 internal bonds
  std::vector<int64_t> ModeSizes() const;  // n_k
  int64_t NumParameters() const;           // sum of numel
};

// Checks core count for the form, 3-D cores, matching bonds, r_0 = r_K = 1.
absl::Status ValidateTensorTrain(const TensorTrain& tt);

// Materialises the (unscaled) update dW[l, m, t] as a [D_in, D_out] matrix
// such that delta = x . dW. For tests and exports; never on the hot path.
// `t` is ignored unless the form is 4+1D.
absl::StatusOr<torch::Tensor> DenseDeltaW(const TensorTrain& tt, int64_t l, int64_t m,
                                          int64_t t = 0);

// Contracts the whole chain into a tensor of shape ModeSizes().
torch::Tensor FullTensor(const TensorTrain& tt);

struct TTShape {
  TTForm form = TTForm::k4D;
  int64_t d_in = 0, d_out = 0;
  int64_t num_layers = 0;       // L (adapted)
  int64_t num_projections = 0;  // M
  int64_t num_heads = 0;        // H (5D)
  int64_t num_tasks = 1;        // T (4+1D)
  std::vector<int64_t> ranks;   // one per bond (or one value for all)
};

// METATT.md's formulas generalised to per-bond ranks:
//   4D   : D_in r1 + L r1 r2 + M r2 r3 + r3 D_out
//   4+1D : D_in r1 + L r1 r2 + M r2 r3 + T r3 r4 + r4 D_out
//   5D   : D_in r1 + L r1 r2 + M r2 r3 + H r3 r4 + r4 D_out / H
// With equal ranks these are the file's 4D, 4D + T r^2 and 5D formulas.
int64_t MetaTTParameterCount(const TTShape& shape);
// L . M . (D_in + D_out) . r
int64_t LoraParameterCount(int64_t num_layers, int64_t num_projections, int64_t d_in, int64_t d_out,
                           int64_t rank);

}  // namespace metatt
