#include "server/training/eval_scores.h"

#include <cmath>

#include <gtest/gtest.h>

namespace metatt {
namespace {

TEST(MetricsTest, HandWorkedClassification) {
  // labels: 1 1 1 0 0 0 ; preds: 1 1 0 1 0 0 -> tp 2, fp 1, fn 1, tn 2
  std::vector<int64_t> y = {1, 1, 1, 0, 0, 0}, p = {1, 1, 0, 1, 0, 0};
  EXPECT_DOUBLE_EQ(Accuracy(p, y), 4.0 / 6.0);
  EXPECT_DOUBLE_EQ(F1Binary(p, y), 2.0 * 2 / (2.0 * 2 + 1 + 1));
  // MCC = (tp tn - fp fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (4-1)/sqrt(3*3*3*3) = 1/3
  EXPECT_NEAR(MatthewsCorrelation(p, y), 1.0 / 3.0, 1e-12);
  EXPECT_NEAR(MatthewsCorrelation(y, y), 1.0, 1e-12);
  std::vector<int64_t> inv = {0, 0, 0, 1, 1, 1};
  EXPECT_NEAR(MatthewsCorrelation(inv, y), -1.0, 1e-12);
  // Constant prediction: denominator 0 -> 0 (as sklearn).
  EXPECT_EQ(MatthewsCorrelation(std::vector<int64_t>(6, 1), y), 0.0);
  EXPECT_EQ(F1Binary(std::vector<int64_t>(6, 0), std::vector<int64_t>(6, 0)), 0.0);
}

TEST(MetricsTest, MulticlassMccMatchesBinaryFormOnTwoClasses) {
  std::vector<int64_t> y = {0, 1, 2, 2, 1, 0, 2}, p = {0, 2, 2, 2, 1, 0, 1};
  const double m = MatthewsCorrelation(p, y);
  EXPECT_GT(m, 0.0);
  EXPECT_LT(m, 1.0);
  auto all = ClassificationMetrics(p, y, 3);
  EXPECT_EQ(all.count("f1"), 0u);
  EXPECT_DOUBLE_EQ(all["mcc"], m);
}

TEST(MetricsTest, PearsonSpearmanHandWorked) {
  std::vector<double> x = {1, 2, 3, 4, 5}, y = {2, 4, 6, 8, 10};
  EXPECT_NEAR(Pearson(x, y), 1.0, 1e-12);
  std::vector<double> z = {1, 4, 9, 16, 25};
  EXPECT_NEAR(Spearman(x, z), 1.0, 1e-12);
  EXPECT_LT(Pearson(x, z), 1.0);
  // Ties get average ranks: [10, 20, 20, 30] -> [1, 2.5, 2.5, 4]
  auto r = AverageRanks({10, 20, 20, 30});
  EXPECT_EQ(r, (std::vector<double>{1, 2.5, 2.5, 4}));
  // x = [1,2,3,4], y = [1,3,2,4]: d = [0,-1,1,0], rho = 1 - 6*2/(4*15) = 0.8
  EXPECT_NEAR(Spearman({1, 2, 3, 4}, {1, 3, 2, 4}), 0.8, 1e-12);
  EXPECT_EQ(Pearson({1, 1, 1}, {1, 2, 3}), 0.0);
}

TEST(MetricsTest, MetricNamesValidated) {
  EXPECT_TRUE(ValidateMetricName("f1_acc", false, 2).ok());
  EXPECT_FALSE(ValidateMetricName("f1", false, 3).ok());
  EXPECT_TRUE(ValidateMetricName("pearson_spearman", true, 1).ok());
  EXPECT_FALSE(ValidateMetricName("accuracy", true, 1).ok());
}

}  // namespace
}  // namespace metatt
