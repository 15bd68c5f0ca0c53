#include "adapters/tt_sweep.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "base/status_macros.h"

namespace metatt {
namespace {

int64_t ChooseRank(const torch::Tensor& s2, const TruncationParams& p, double* discarded,
                   double* total) {
  // s2: squared singular values, descending, CPU double.
  const int64_t n = s2.size(0);
  auto a = s2.accessor<double, 1>();
  double tot = 0;
  for (int64_t i = 0; i < n; ++i) tot += a[i];
  // tail[k] = sum_{i >= k} s2[i]
  std::vector<double> tail(n + 1, 0.0);
  for (int64_t i = n - 1; i >= 0; --i) tail[i] = tail[i + 1] + a[i];
  int64_t keep = n;
  for (int64_t k = 0; k <= n; ++k) {
    if (tail[k] <= p.rel_cutoff * tot) {
      keep = k;
      break;
    }
  }
  if (p.max_rank > 0) keep = std::min(keep, p.max_rank);
  keep = std::max(keep, p.min_rank);
  keep = std::max<int64_t>(1, std::min(keep, n));
  *discarded = tail[keep];
  *total = tot;
  return keep;
}

// Core k: [a, n, b] -> matrix.
torch::Tensor LeftMat(const torch::Tensor& c) {
  return c.reshape({c.size(0) * c.size(1), c.size(2)});
}
torch::Tensor RightMat(const torch::Tensor& c) {
  return c.reshape({c.size(0), c.size(1) * c.size(2)});
}

void RightOrthogonalise(std::vector<torch::Tensor>& cores) {
  for (size_t k = cores.size() - 1; k >= 1; --k) {
    torch::Tensor c = cores[k];
    const int64_t n = c.size(1), b = c.size(2);
    auto [q, r] = torch::linalg_qr(RightMat(c).t(), "reduced");  // M^T = Q R
    const int64_t nb = q.size(1);
    cores[k] = q.t().reshape({nb, n, b}).contiguous();
    torch::Tensor prev = cores[k - 1];
    cores[k - 1] =
        LeftMat(prev).matmul(r.t()).reshape({prev.size(0), prev.size(1), nb}).contiguous();
  }
}

}  // namespace

absl::Status TruncationParams::Validate() const {
  if (max_rank < 0) return absl::InvalidArgumentError("truncation: max_rank must be >= 0");
  if (min_rank < 1) return absl::InvalidArgumentError("truncation: min_rank must be >= 1");
  if (max_rank > 0 && min_rank > max_rank)
    return absl::InvalidArgumentError("truncation: min_rank exceeds max_rank");
  if (!(rel_cutoff >= 0 && rel_cutoff < 1))
    return absl::InvalidArgumentError("truncation: rel_cutoff must be in [0, 1)");
  return absl::OkStatus();
}

absl::StatusOr<std::vector<BondReport>> TruncationSweep(TensorTrain& tt,
                                                        const TruncationParams& params) {
  RETURN_IF_ERROR(ValidateTensorTrain(tt));
  RETURN_IF_ERROR(params.Validate());
  std::vector<BondReport> reports;
  const std::vector<int64_t> old_ranks = tt.Ranks();
  std::vector<torch::Tensor> cores;
  for (const auto& c : tt.cores) cores.push_back(c.detach().clone());
  RETURN_IF_ERROR(TorchTry("truncation sweep", [&] {
    torch::NoGradGuard no_grad;
    RightOrthogonalise(cores);
    const int K = static_cast<int>(cores.size());
    auto step = [&](int k, bool backward) {
      torch::Tensor a = cores[k], b = cores[k + 1];
      const int64_t ra = a.size(0), na = a.size(1), nb = b.size(1), rb = b.size(2);
      torch::Tensor theta = LeftMat(a).matmul(RightMat(b));  // [ra na, nb rb]
      auto [u, s, vh] = torch::linalg_svd(theta, /*full_matrices=*/false);
      torch::Tensor s2 = (s.to(torch::kFloat64) * s.to(torch::kFloat64)).cpu().contiguous();
      BondReport rep;
      rep.bond = k;
      rep.backward = backward;
      rep.old_rank = backward ? a.size(2) : old_ranks[k];
      const int64_t keep = ChooseRank(s2, params, &rep.discarded_weight, &rep.total_weight);
      rep.new_rank = keep;
      torch::Tensor uk = u.narrow(1, 0, keep), sk = s.narrow(0, 0, keep),
                    vk = vh.narrow(0, 0, keep);
      if (!backward) {
        cores[k] = uk.reshape({ra, na, keep}).contiguous();
        cores[k + 1] = (sk.unsqueeze(1) * vk).reshape({keep, nb, rb}).contiguous();
      } else {
        cores[k] = (uk * sk.unsqueeze(0)).reshape({ra, na, keep}).contiguous();
        cores[k + 1] = vk.reshape({keep, nb, rb}).contiguous();
      }
      reports.push_back(rep);
    };
    for (int k = 0; k + 1 < K; ++k) step(k, false);
    if (params.sweep_back)
      for (int k = K - 2; k >= 0; --k) step(k, true);
  }));
  tt.cores = std::move(cores);
  return reports;
}

std::string FormatSweepReport(const std::vector<BondReport>& reports) {
  std::string out;
  for (const auto& r : reports) {
    const double rel = r.total_weight > 0 ? r.discarded_weight / r.total_weight : 0.0;
    absl::StrAppend(&out, absl::StrFormat("bond %d%s: %d -> %d, discarded %.3e (rel %.3e)\n",
                                          r.bond, r.backward ? " (back)" : "", r.old_rank,
                                          r.new_rank, r.discarded_weight, rel));
  }
  return out;
}

absl::Status RankSchedule::Validate() const {
  for (size_t i = 0; i < entries.size(); ++i) {
    if (entries[i].first < 0)
      return absl::InvalidArgumentError(absl::StrCat("rank schedule: entry ", i, " has epoch < 0"));
    if (entries[i].second < 1)
      return absl::InvalidArgumentError(
          absl::StrCat("rank schedule: entry ", i, " has max_rank < 1"));
    if (i > 0 && entries[i].first <= entries[i - 1].first)
      return absl::InvalidArgumentError(
          absl::StrCat("rank schedule: epochs must increase (entry ", i, ")"));
  }
  return absl::OkStatus();
}

std::optional<int64_t> RankSchedule::MaxRankAfterEpoch(int64_t epoch) const {
  for (const auto& e : entries)
    if (e.first == epoch) return e.second;
  return std::nullopt;
}

}  // namespace metatt
