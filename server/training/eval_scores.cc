#include "server/training/eval_scores.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace metatt {

double Accuracy(const std::vector<int64_t>& pred, const std::vector<int64_t>& label) {
  const size_t n = std::min(pred.size(), label.size());
  if (n == 0) return 0.0;
  size_t ok = 0;
  for (size_t i = 0; i < n; ++i) ok += pred[i] == label[i];
  return static_cast<double>(ok) / static_cast<double>(n);
}

double F1Binary(const std::vector<int64_t>& pred, const std::vector<int64_t>& label,
                int64_t positive) {
  const size_t n = std::min(pred.size(), label.size());
  double tp = 0, fp = 0, fn = 0;
  for (size_t i = 0; i < n; ++i) {
    const bool p = pred[i] == positive, l = label[i] == positive;
    tp += p && l;
    fp += p && !l;
    fn += !p && l;
  }
  const double denom = 2 * tp + fp + fn;
  return denom == 0 ? 0.0 : 2 * tp / denom;
}

double MatthewsCorrelation(const std::vector<int64_t>& pred, const std::vector<int64_t>& label) {
  const size_t n = std::min(pred.size(), label.size());
  if (n == 0) return 0.0;
  int64_t k = 0;
  for (size_t i = 0; i < n; ++i) k = std::max({k, pred[i] + 1, label[i] + 1});
  std::vector<double> t(k, 0.0), p(k, 0.0);
  double c = 0;  // correctly predicted
  for (size_t i = 0; i < n; ++i) {
    if (pred[i] < 0 || label[i] < 0) continue;
    t[label[i]] += 1;
    p[pred[i]] += 1;
    c += pred[i] == label[i];
  }
  const double s = static_cast<double>(n);
  double pt = 0, pp = 0, tt = 0;
  for (int64_t j = 0; j < k; ++j) {
    pt += p[j] * t[j];
    pp += p[j] * p[j];
    tt += t[j] * t[j];
  }
  const double cov_ytyp = c * s - pt;
  const double cov_ypyp = s * s - pp;
  const double cov_ytyt = s * s - tt;
  if (cov_ypyp * cov_ytyt == 0) return 0.0;
  return cov_ytyp / std::sqrt(cov_ytyt * cov_ypyp);
}

double Pearson(const std::vector<double>& x, const std::vector<double>& y) {
  const size_t n = std::min(x.size(), y.size());
  if (n < 2) return 0.0;
  const double mx = std::accumulate(x.begin(), x.begin() + n, 0.0) / n;
  const double my = std::accumulate(y.begin(), y.begin() + n, 0.0) / n;
  double sxy = 0, sxx = 0, syy = 0;
  for (size_t i = 0; i < n; ++i) {
    const double dx = x[i] - mx, dy = y[i] - my;
    sxy += dx * dy;
    sxx += dx * dx;
    syy += dy * dy;
  }
  if (sxx == 0 || syy == 0) return 0.0;
  double r = sxy / std::sqrt(sxx * syy);
  return std::max(-1.0, std::min(1.0, r));
}

std::vector<double> AverageRanks(const std::vector<double>& x) {
  const size_t n = x.size();
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return x[a] < x[b]; });
  std::vector<double> ranks(n);
  size_t i = 0;
  while (i < n) {
    size_t j = i;
    while (j + 1 < n && x[order[j + 1]] == x[order[i]]) ++j;
    const double avg = (static_cast<double>(i) + static_cast<double>(j)) / 2.0 + 1.0;
    for (size_t k = i; k <= j; ++k) ranks[order[k]] = avg;
    i = j + 1;
  }
  return ranks;
}

double Spearman(const std::vector<double>& x, const std::vector<double>& y) {
  const size_t n = std::min(x.size(), y.size());
  std::vector<double> xs(x.begin(), x.begin() + n), ys(y.begin(), y.begin() + n);
  return Pearson(AverageRanks(xs), AverageRanks(ys));
}

std::map<std::string, double> ClassificationMetrics(const std::vector<int64_t>& pred,
                                                    const std::vector<int64_t>& label,
                                                    int64_t num_labels) {
  std::map<std::string, double> m;
  m["accuracy"] = Accuracy(pred, label);
  m["mcc"] = MatthewsCorrelation(pred, label);
  if (num_labels == 2) {
    m["f1"] = F1Binary(pred, label, 1);
    m["f1_acc"] = (m["f1"] + m["accuracy"]) / 2.0;
  }
  return m;
}

std::map<std::string, double> RegressionMetrics(const std::vector<double>& pred,
                                                const std::vector<double>& label) {
  std::map<std::string, double> m;
  m["pearson"] = Pearson(pred, label);
  m["spearman"] = Spearman(pred, label);
  m["pearson_spearman"] = (m["pearson"] + m["spearman"]) / 2.0;
  double se = 0;
  const size_t n = std::min(pred.size(), label.size());
  for (size_t i = 0; i < n; ++i) se += (pred[i] - label[i]) * (pred[i] - label[i]);
  m["mse"] = n ? se / n : 0.0;
  return m;
}

std::string DefaultPrimaryMetric(bool regression) {
  return regression ? "pearson_spearman" : "accuracy";
}

absl::Status ValidateMetricName(const std::string& name, bool regression, int64_t num_labels) {
  if (regression) {
    if (name == "pearson" || name == "spearman" || name == "pearson_spearman") {
      return absl::OkStatus();
    }
  } else {
    if (name == "accuracy" || name == "mcc") return absl::OkStatus();
    if ((name == "f1" || name == "f1_acc") && num_labels == 2) return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "metric '", name, "' is not available for a ",
      regression ? "regression" : absl::StrCat(num_labels, "-class classification"), " task"));
}

}  // namespace metatt

namespace metatt {
namespace {

bool IsAnswerN(const std::string& s) {
  return s.size() == 7 && s.compare(0, 6, "answer") == 0 && s[6] >= '1' && s[6] <= '5';
}

}  // namespace

std::string ExtractAnswer(const std::string& generated, const std::string& gold) {
  const std::string text = absl::AsciiStrToLower(generated);
  const std::string g = absl::AsciiStrToLower(absl::StripAsciiWhitespace(gold));
  std::vector<std::string> candidates;
  if (IsAnswerN(g)) {
    for (char c = '1'; c <= '5'; ++c) candidates.push_back(std::string("answer") + c);
  } else if (g == "true" || g == "false") {
    candidates = {"true", "false"};
  } else {
    const std::string t(absl::StripAsciiWhitespace(text));
    return !g.empty() && t.compare(0, g.size(), g) == 0 ? g : std::string();
  }
  size_t best = std::string::npos;
  std::string found;
  for (const std::string& c : candidates) {
    const size_t at = text.find(c);
    if (at < best) {
      best = at;
      found = c;
    }
  }
  return found;
}

namespace {

// The fraction of the first min(sizes) pairs for which `match(generated,
// reference)` holds (0 when there are none).
template <typename Match>
double MatchFraction(const std::vector<std::string>& generated,
                     const std::vector<std::string>& reference, Match match) {
  const size_t n = std::min(generated.size(), reference.size());
  if (n == 0) return 0.0;
  size_t hit = 0;
  for (size_t i = 0; i < n; ++i) {
    if (match(generated[i], reference[i])) ++hit;
  }
  return static_cast<double>(hit) / static_cast<double>(n);
}

}  // namespace

double AnswerAccuracy(const std::vector<std::string>& generated,
                      const std::vector<std::string>& gold) {
  return MatchFraction(generated, gold, [](const std::string& out, const std::string& answer) {
    const std::string g = absl::AsciiStrToLower(absl::StripAsciiWhitespace(answer));
    return !g.empty() && ExtractAnswer(out, answer) == g;
  });
}

double ExactMatch(const std::vector<std::string>& generated,
                  const std::vector<std::string>& reference) {
  return MatchFraction(generated, reference, [](const std::string& out, const std::string& ref) {
    return absl::StripAsciiWhitespace(out) == absl::StripAsciiWhitespace(ref);
  });
}

}  // namespace metatt
