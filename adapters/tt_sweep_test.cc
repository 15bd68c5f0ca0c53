#include "adapters/tt_sweep.h"

#include <gtest/gtest.h>

#include <cmath>

namespace metatt {
namespace {

TensorTrain RandomTT(TTForm form, const std::vector<int64_t>& modes,
                     const std::vector<int64_t>& ranks, uint64_t seed) {
  torch::manual_seed(seed);
  TensorTrain tt;
  tt.form = form;
  for (size_t k = 0; k < modes.size(); ++k) {
    const int64_t a = k == 0 ? 1 : ranks[k - 1], b = k + 1 == modes.size() ? 1 : ranks[k];
    tt.cores.push_back(torch::randn({a, modes[k], b}, torch::kFloat64));
  }
  return tt;
}

double SqNorm(const torch::Tensor& t) { return t.pow(2).sum().item<double>(); }

struct Case {
  TTForm form;
  std::vector<int64_t> modes, ranks;
};

std::vector<Case> Cases() {
  return {{TTForm::k4D, {10, 3, 2, 9}, {6, 5, 4}},
          {TTForm::k4Plus1D, {10, 3, 2, 4, 9}, {5, 6, 4, 5}},
          {TTForm::k5D, {10, 3, 2, 3, 4}, {6, 4, 5, 3}}};
}

TEST(TruncationSweepTest, DiscardedWeightEqualsSquaredErrorAndRanksObeyMax) {
  for (const auto& c : Cases()) {
    for (int64_t max_rank : {1, 2, 3}) {
      TensorTrain tt = RandomTT(c.form, c.modes, c.ranks, 42 + max_rank);
      torch::Tensor before = FullTensor(tt);
      TruncationParams p;
      p.max_rank = max_rank;
      auto rep = TruncationSweep(tt, p);
      ASSERT_TRUE(rep.ok()) << rep.status();
      ASSERT_TRUE(ValidateTensorTrain(tt).ok());
      ASSERT_EQ(rep->size(), c.ranks.size());
      double discarded = 0;
      for (size_t k = 0; k < rep->size(); ++k) {
        const auto& r = (*rep)[k];
        EXPECT_EQ(r.bond, static_cast<int>(k));
        EXPECT_EQ(r.old_rank, c.ranks[k]);
        EXPECT_LE(r.new_rank, max_rank);
        EXPECT_EQ(tt.Ranks()[k], r.new_rank);
        EXPECT_GE(r.discarded_weight, 0.0);
        discarded += r.discarded_weight;
      }
      const double err = SqNorm(before - FullTensor(tt));
      EXPECT_GT(discarded, 0.0);
      // Exact for a left-to-right sweep with the centre inside the two-site tensor.
      EXPECT_LE(err, discarded * (1 + 1e-9) + 1e-12) << TTFormName(c.form) << " r=" << max_rank;
      EXPECT_NEAR(err, discarded, 1e-8 * (1 + discarded)) << TTFormName(c.form);
    }
  }
}

TEST(TruncationSweepTest, LosslessWhenNothingIsCut) {
  for (const auto& c : Cases()) {
    TensorTrain tt = RandomTT(c.form, c.modes, c.ranks, 3);
    torch::Tensor before = FullTensor(tt);
    auto rep = TruncationSweep(tt, TruncationParams{});
    ASSERT_TRUE(rep.ok());
    EXPECT_TRUE(torch::allclose(before, FullTensor(tt), 1e-9, 1e-10));
    for (const auto& r : *rep) EXPECT_LT(r.discarded_weight, 1e-18 * (1 + r.total_weight) + 1e-20);
  }
}

TEST(TruncationSweepTest, RedundantRankShrinksWithoutLoss) {
  // A bond of 6 next to a mode of size 2 with left bond 1 carries rank <= 2.
  TensorTrain tt = RandomTT(TTForm::k4D, {2, 3, 2, 5}, {6, 4, 3}, 9);
  torch::Tensor before = FullTensor(tt);
  auto rep = TruncationSweep(tt, TruncationParams{});
  ASSERT_TRUE(rep.ok());
  EXPECT_EQ((*rep)[0].old_rank, 6);
  EXPECT_LE((*rep)[0].new_rank, 2);
  EXPECT_TRUE(torch::allclose(before, FullTensor(tt), 1e-9, 1e-10));
}

TEST(TruncationSweepTest, RelativeCutoffAndMinRank) {
  TensorTrain tt = RandomTT(TTForm::k4D, {10, 3, 2, 9}, {6, 5, 4}, 5);
  TruncationParams p;
  p.rel_cutoff = 0.05;
  auto rep = TruncationSweep(tt, p);
  ASSERT_TRUE(rep.ok());
  for (const auto& r : *rep) EXPECT_LE(r.discarded_weight, 0.05 * r.total_weight + 1e-12);

  TensorTrain tt2 = RandomTT(TTForm::k4D, {10, 3, 2, 9}, {6, 5, 4}, 5);
  p.rel_cutoff = 0.99;
  p.min_rank = 2;
  rep = TruncationSweep(tt2, p);
  ASSERT_TRUE(rep.ok());
  for (const auto& r : *rep) EXPECT_EQ(r.new_rank, 2);
}

TEST(TruncationSweepTest, BackSweepErrorWithinTriangleBound) {
  TensorTrain tt = RandomTT(TTForm::k4Plus1D, {10, 3, 2, 4, 9}, {5, 6, 4, 5}, 8);
  torch::Tensor before = FullTensor(tt);
  TruncationParams p;
  p.max_rank = 2;
  p.sweep_back = true;
  auto rep = TruncationSweep(tt, p);
  ASSERT_TRUE(rep.ok());
  EXPECT_EQ(rep->size(), 8u);
  double root_sum = 0;
  for (const auto& r : *rep) root_sum += std::sqrt(r.discarded_weight);
  EXPECT_LE(SqNorm(before - FullTensor(tt)), root_sum * root_sum * (1 + 1e-9) + 1e-12);
  EXPECT_FALSE(FormatSweepReport(*rep).empty());
}

TEST(TruncationSweepTest, RejectsBadParamsAndTrains) {
  TensorTrain tt = RandomTT(TTForm::k4D, {4, 3, 2, 4}, {2, 2, 2}, 1);
  TruncationParams p;
  p.min_rank = 0;
  EXPECT_EQ(TruncationSweep(tt, p).status().code(), absl::StatusCode::kInvalidArgument);
  p = TruncationParams{};
  p.rel_cutoff = 1.5;
  EXPECT_EQ(TruncationSweep(tt, p).status().code(), absl::StatusCode::kInvalidArgument);
  TensorTrain broken = tt;
  broken.cores.pop_back();
  EXPECT_EQ(TruncationSweep(broken, TruncationParams{}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(RankScheduleTest, ValidatesAndLooksUp) {
  RankSchedule s{{{1, 8}, {3, 6}, {5, 4}}};
  EXPECT_TRUE(s.Validate().ok());
  EXPECT_EQ(s.MaxRankAfterEpoch(3), 6);
  EXPECT_FALSE(s.MaxRankAfterEpoch(2).has_value());
  RankSchedule bad{{{3, 8}, {3, 6}}};
  EXPECT_FALSE(bad.Validate().ok());
  RankSchedule bad_rank{{{1, 0}}};
  EXPECT_FALSE(bad_rank.Validate().ok());
}

}  // namespace
}  // namespace metatt
