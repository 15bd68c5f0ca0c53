// GLUE metrics on plain vectors. Degenerate inputs (empty, constant) give 0
// instead of NaN so that "best checkpoint" comparisons stay total; scipy and
// scikit-learn agree with these on every non-degenerate input (see
// tests/python/test_eval_scores.py, which drives the metatt-eval-scores tool).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace metatt {

double Accuracy(const std::vector<int64_t>& pred, const std::vector<int64_t>& label);
// Binary F1 of `positive` (sklearn's f1_score(average="binary", pos_label=1)).
double F1Binary(const std::vector<int64_t>& pred, const std::vector<int64_t>& label,
                int64_t positive = 1);
// Matthews correlation (multi-class form, as sklearn's matthews_corrcoef).
double MatthewsCorrelation(const std::vector<int64_t>& pred, const std::vector<int64_t>& label);
double Pearson(const std::vector<double>& x, const std::vector<double>& y);
// Pearson of average ranks (ties share the mean rank), as scipy.stats.spearmanr.
double Spearman(const std::vector<double>& x, const std::vector<double>& y);
// 1-based average ranks.
std::vector<double> AverageRanks(const std::vector<double>& x);

// All metrics of a task kind, keyed by name:
//   classification: accuracy, f1 (binary only), mcc, f1_acc (mean of f1 and accuracy)
//   regression: pearson, spearman, pearson_spearman (their mean), mse
std::map<std::string, double> ClassificationMetrics(const std::vector<int64_t>& pred,
                                                    const std::vector<int64_t>& label,
                                                    int64_t num_labels);
std::map<std::string, double> RegressionMetrics(const std::vector<double>& pred,
                                                const std::vector<double>& label);

// Default primary metric of a task kind when none is named: accuracy /
// pearson_spearman.
std::string DefaultPrimaryMetric(bool regression);
// Checks that `name` is produced for that kind.
absl::Status ValidateMetricName(const std::string& name, bool regression, int64_t num_labels);

}  // namespace metatt

namespace metatt {

// Generation tasks (the commonsense protocol, ../shared/data/commonsense/):
// the answer a generated text gives, for the kind of the gold label `gold`:
// "answer1".."answer5" -> the first of those in the text; "true"/"false" ->
// the first of those; anything else -> the gold label itself when the text
// starts with it (after trimming), else "". Case-insensitive; the result is
// lower case.
std::string ExtractAnswer(const std::string& generated, const std::string& gold);
// Fraction of rows whose ExtractAnswer equals the (lower-cased) gold label.
double AnswerAccuracy(const std::vector<std::string>& generated,
                      const std::vector<std::string>& gold);
// Fraction of rows whose generated text equals the reference after trimming
// whitespace at both ends.
double ExactMatch(const std::vector<std::string>& generated,
                  const std::vector<std::string>& reference);

}  // namespace metatt
