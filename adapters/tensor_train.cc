#include "adapters/tensor_train.h"

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"

namespace metatt {

std::vector<int64_t> TensorTrain::Ranks() const {
  std::vector<int64_t> r;
  for (size_t k = 0; k + 1 < cores.size(); ++k) r.push_back(cores[k].size(2));
  return r;
}

std::vector<int64_t> TensorTrain::ModeSizes() const {
  std::vector<int64_t> n;
  for (const auto& c : cores) n.push_back(c.size(1));
  return n;
}

int64_t TensorTrain::NumParameters() const {
  int64_t n = 0;
  for (const auto& c : cores) n += c.numel();
  return n;
}

absl::Status ValidateTensorTrain(const TensorTrain& tt) {
  const size_t want = tt.form == TTForm::k4D ? 4 : 5;
  if (tt.cores.size() != want)
    return absl::InvalidArgumentError(absl::StrCat("tensor train: form ", TTFormName(tt.form),
                                                   " needs ", want, " cores, got ",
                                                   tt.cores.size()));
  for (size_t k = 0; k < tt.cores.size(); ++k) {
    const auto& c = tt.cores[k];
    if (!c.defined() || c.dim() != 3)
      return absl::InvalidArgumentError(absl::StrCat("tensor train: core ", k, " must be 3-D"));
    if (k == 0 && c.size(0) != 1)
      return absl::InvalidArgumentError("tensor train: core 0 must have left bond 1");
    if (k + 1 == tt.cores.size() && c.size(2) != 1)
      return absl::InvalidArgumentError("tensor train: last core must have right bond 1");
    if (k > 0 && tt.cores[k - 1].size(2) != c.size(0))
      return absl::InvalidArgumentError(absl::StrCat("tensor train: bond ", k - 1, " is ",
                                                     tt.cores[k - 1].size(2), " on core ", k - 1,
                                                     " but ", c.size(0), " on core ", k));
  }
  return absl::OkStatus();
}

absl::StatusOr<torch::Tensor> DenseDeltaW(const TensorTrain& tt, int64_t l, int64_t m, int64_t t) {
  RETURN_IF_ERROR(ValidateTensorTrain(tt));
  auto check = [](const char* what, int64_t i, int64_t n) -> absl::Status {
    if (i < 0 || i >= n)
      return absl::OutOfRangeError(
          absl::StrCat("dense dW: ", what, " index ", i, " outside [0, ", n, ")"));
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(check("layer", l, tt.cores[1].size(1)));
  RETURN_IF_ERROR(check("projection", m, tt.cores[2].size(1)));
  torch::Tensor left = tt.cores[0].squeeze(0);   // [D_in, r1]
  left = left.matmul(tt.cores[1].select(1, l));  // [D_in, r2]
  left = left.matmul(tt.cores[2].select(1, m));  // [D_in, r3]
  switch (tt.form) {
    case TTForm::k4D:
      return left.matmul(tt.cores[3].squeeze(2));
    case TTForm::k4Plus1D:
      RETURN_IF_ERROR(check("task", t, tt.cores[3].size(1)));
      left = left.matmul(tt.cores[3].select(1, t));
      return left.matmul(tt.cores[4].squeeze(2));
    case TTForm::k5D: {
      const auto& g4 = tt.cores[3];  // [r3, H, r4]
      const int64_t d_in = left.size(0), h = g4.size(1), r4 = g4.size(2);
      torch::Tensor y = left.matmul(g4.reshape({g4.size(0), h * r4})).view({d_in, h, r4});
      y = y.matmul(tt.cores[4].squeeze(2));  // [D_in, H, Dh]
      return y.reshape({d_in, -1});
    }
  }
  return absl::InternalError("dense dW: unknown form");
}

torch::Tensor FullTensor(const TensorTrain& tt) {
  torch::Tensor acc = tt.cores[0].reshape({tt.cores[0].size(1), tt.cores[0].size(2)});
  for (size_t k = 1; k < tt.cores.size(); ++k) {
    const auto& c = tt.cores[k];
    acc = acc.matmul(c.reshape({c.size(0), c.size(1) * c.size(2)}));
    acc = acc.reshape({-1, c.size(2)});
  }
  return acc.reshape(tt.ModeSizes());
}

int64_t MetaTTParameterCount(const TTShape& s) {
  const int bonds = s.form == TTForm::k4D ? 3 : 4;
  std::vector<int64_t> r = s.ranks;
  if (r.size() == 1) r.assign(bonds, r[0]);
  if (static_cast<int>(r.size()) != bonds) return -1;
  int64_t n = s.d_in * r[0] + s.num_layers * r[0] * r[1] + s.num_projections * r[1] * r[2];
  switch (s.form) {
    case TTForm::k4D:
      return n + r[2] * s.d_out;
    case TTForm::k4Plus1D:
      return n + s.num_tasks * r[2] * r[3] + r[3] * s.d_out;
    case TTForm::k5D:
      return n + s.num_heads * r[2] * r[3] + (s.num_heads > 0 ? r[3] * s.d_out / s.num_heads : 0);
  }
  return -1;
}

int64_t LoraParameterCount(int64_t num_layers, int64_t num_projections, int64_t d_in, int64_t d_out,
                           int64_t rank) {
  return num_layers * num_projections * (d_in + d_out) * rank;
}

}  // namespace metatt
