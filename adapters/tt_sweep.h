// DMRG-style rank truncation of a tensor train (METATT.md, "Rank adaptation").
//
// TruncationSweep first right-orthogonalises the train with QR (cores K-1..1
// become right-orthonormal, the orthogonality centre moves to core 0; the
// represented tensor is unchanged, and bonds larger than their matricisation
// shrink losslessly). It then walks the bonds left to right: merge cores k and
// k+1 into the two-site tensor, SVD across the bond, keep the largest singular
// values the parameters allow, put U in the left core and S.V^T in the right
// core (the centre moves right). Because the centre is always inside the
// two-site tensor, each reported discarded weight (sum of discarded squared
// singular values) is exactly that step's squared Frobenius error, and the
// step errors are mutually orthogonal, so
//   ||full_before - full_after||_F^2 == sum of discarded_weight (left-to-right)
// up to rounding. With `sweep_back` a right-to-left pass follows (U.S left,
// V^T right); its steps are reported too (bond index, second pass) and the
// total error is then bounded by (sum_k sqrt(discarded_k))^2.
//
// For the (4+1)D form the task core is an ordinary member of the chain.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "adapters/tensor_train.h"

namespace metatt {

struct TruncationParams {
  int64_t max_rank = 0;     // 0 = no cap
  double rel_cutoff = 0.0;  // max discarded weight / total weight of the bond
  int64_t min_rank = 1;
  bool sweep_back = false;  // also run a right-to-left pass
  absl::Status Validate() const;
};

struct BondReport {
  int bond = 0;  // bond k joins cores k and k+1
  int64_t old_rank = 0;
  int64_t new_rank = 0;
  double discarded_weight = 0.0;  // sum of discarded sigma^2 (absolute)
  double total_weight = 0.0;      // sum of all sigma^2 of that two-site tensor
  bool backward = false;          // true for steps of the right-to-left pass
};

// Replaces tt's cores in place (new tensors, no autograd history).
absl::StatusOr<std::vector<BondReport>> TruncationSweep(TensorTrain& tt,
                                                        const TruncationParams& params);

// One line per bond: "bond 0: 10 -> 4, discarded 1.2e-3 (rel 4.0e-4)".
std::string FormatSweepReport(const std::vector<BondReport>& reports);

// (epoch, max_rank) pairs, epochs strictly increasing: at the end of an epoch
// listed here the trainer runs a sweep with that max rank.
struct RankSchedule {
  std::vector<std::pair<int64_t, int64_t>> entries;
  absl::Status Validate() const;
  std::optional<int64_t> MaxRankAfterEpoch(int64_t epoch) const;
};

}  // namespace metatt
