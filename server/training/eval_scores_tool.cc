// Reads {"kind": "classification"|"regression", "predictions": [...],
// "labels": [...], "num_labels": N} from stdin and prints every metric as JSON.
#include <iostream>
#include <iterator>
#include <string>

#include <nlohmann/json.hpp>

#include "server/training/eval_scores.h"

int main() {
  std::string in((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
  nlohmann::json j = nlohmann::json::parse(in, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    std::cerr << "metatt-eval-scores: stdin is not a JSON object\n";
    return 2;
  }
  try {
    nlohmann::json out;
    std::string kind = j.value("kind", "classification");
    if (kind == "regression") {
      auto p = j.at("predictions").get<std::vector<double>>();
      auto l = j.at("labels").get<std::vector<double>>();
      for (auto& [k, v] : metatt::RegressionMetrics(p, l)) out[k] = v;
    } else {
      auto p = j.at("predictions").get<std::vector<int64_t>>();
      auto l = j.at("labels").get<std::vector<int64_t>>();
      int64_t n = j.value("num_labels", int64_t{2});
      for (auto& [k, v] : metatt::ClassificationMetrics(p, l, n)) out[k] = v;
    }
    std::cout << out.dump() << "\n";
  } catch (const std::exception& e) {
    std::cerr << "metatt-eval-scores: " << e.what() << "\n";
    return 2;
  }
  return 0;
}
