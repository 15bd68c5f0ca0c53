// Test / bench helper (torch): a random (4+1)D family publish request with
// very many tasks, built cheaply: every task slice and every head is a view
// of ONE random tensor (task cores [T, r, r], heads [T, 2, D]), and each task
// gets 2 labels, so 10^6 tasks cost a few allocations, not millions.
#pragma once

#include <cstdint>
#include <string>

#include <torch/torch.h>

#include "absl/strings/str_cat.h"
#include "adapters/metatt_adapter.h"
#include "server/model/bert_config.h"
#include "server/registry/adapter_registry.h"
#include "server/registry/test_family.h"

namespace metatt {
namespace testing_util {

inline absl::StatusOr<PublishRequest> LargeFamily(const std::string& name, int64_t num_tasks,
                                                  const BertConfig& base, uint64_t seed,
                                                  int64_t rank = 4) {
  // Shared cores only; the task slices come from one tensor below.
  auto adapter = RandomFamilyAdapter(base, /*num_tasks=*/1, seed, rank);
  if (!adapter.ok()) return adapter.status();
  PublishRequest req;
  req.family = name;
  req.config = (*adapter)->config();
  req.config.num_tasks = num_tasks;
  req.scale = (*adapter)->scale();
  torch::Tensor task0;
  for (const auto& [k, v] : (*adapter)->NamedParameters()) {
    if (k == "task.0") {
      task0 = v.detach();
    } else {
      req.adapter_tensors[k] = v.detach();
    }
  }
  if (!task0.defined()) return absl::InternalError("LargeFamily: the adapter has no task.0");
  // Identity plus noise, so tasks differ.
  const torch::Tensor slices =
      task0.unsqueeze(0).expand({num_tasks, task0.size(0), task0.size(1)}) +
      0.3 * torch::randn({num_tasks, task0.size(0), task0.size(1)});
  const torch::Tensor weights = torch::randn({num_tasks, 2, base.hidden_size});
  const torch::Tensor biases = 0.1 * torch::randn({num_tasks, 2});
  req.tasks.resize(num_tasks);
  req.head_weights.reserve(num_tasks);
  req.head_biases.reserve(num_tasks);
  for (int64_t t = 0; t < num_tasks; ++t) {
    req.adapter_tensors[absl::StrCat("task.", t)] = slices[t];
    TaskRecord& r = req.tasks[t];
    r.name = absl::StrCat("task", t);
    r.num_labels = 2;
    r.label_names = {"no", "yes"};
    req.head_weights.push_back(weights[t]);
    req.head_biases.push_back(biases[t]);
  }
  return req;
}

// Resident set size of this process in bytes (Linux /proc/self/statm; 0
// elsewhere).
inline int64_t ResidentBytes() {
  FILE* f = std::fopen("/proc/self/statm", "r");
  if (f == nullptr) return 0;
  long long pages = 0, rss = 0;
  const int n = std::fscanf(f, "%lld %lld", &pages, &rss);
  std::fclose(f);
  return n == 2 ? rss * 4096 : 0;
}

}  // namespace testing_util
}  // namespace metatt
