// metatt-bench-publish: how long from an add-task job's end until its new
// task is servable, as the family grows (issue 15: < 1 s at 10^6 tasks).
//
// In one process: the registry the server uses on a real SQLite store in a
// scratch directory (files, fsyncs and the Store write included). For each
// --tasks size T it publishes a (4+1)D family of T tasks (MiniLM shapes:
// D 384, 6 layers, q and v, rank 8, 2 labels per task), then measures
//   append:   PublishAppend of one task (what an add-task job does now:
//             the new slice and head only), until Resolve() finds the task;
//             --appends of them in a row, so the background compaction that
//             starts after AdapterRegistry::kCompactAfter runs meanwhile
//   full:     Publish of all T + 1 tasks (what an add-task job did before:
//             every earlier head written again), the baseline, same run
//   reload:   a fresh registry's LoadAll() of the family (a restart) after
//             the appends
// and writes bench/out/publish_bench.json (latencies in seconds).
//
//   metatt-bench-publish [--tasks=10,10000,100000,1000000] [--appends=20]
//                        [--full_baseline_max=100000]
// (10^6 tasks with the full baseline needs more than this machine's 24 GiB:
// the family, its stacked copy and its serialised file at once.)
#include <malloc.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "base/tool_main.h"
#include "server/registry/adapter_registry.h"
#include "server/runtime/large_family.h"
#include "server/store/sqlite_store.h"

ABSL_FLAG(std::string, tasks, "10,10000,100000,1000000", "family sizes (comma-separated)");
ABSL_FLAG(int64_t, appends, 20, "add-task publications per size");
ABSL_FLAG(int64_t, full_baseline_max, 100000,
          "largest size whose full republication (the old add-task path) is timed");
ABSL_FLAG(std::string, out, "bench/out/publish_bench.json", "output JSON");

namespace metatt {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

double Seconds(absl::Time since) { return absl::ToDoubleSeconds(absl::Now() - since); }

double Percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p * (v.size() - 1) + 0.5));
  return v[i];
}

int64_t RssMiB() {
  std::ifstream f("/proc/self/statm");
  int64_t pages = 0, rss = 0;
  f >> pages >> rss;
  return rss * 4096 / (1 << 20);
}

absl::Status Run() {
  BertConfig base;  // all-MiniLM-L6-v2's shapes
  base.hidden_size = 384;
  base.num_hidden_layers = 6;
  base.num_attention_heads = 12;
  base.intermediate_size = 1536;
  json results = json::array();
  for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_tasks), ',')) {
    int64_t T = 0;
    if (!absl::SimpleAtoi(s, &T) || T < 1) {
      return absl::InvalidArgumentError(absl::StrCat("--tasks: '", s, "' is not a size"));
    }
    const fs::path dir = fs::temp_directory_path() / absl::StrCat("metatt-publish-bench-", T);
    fs::remove_all(dir);
    fs::create_directories(dir);
    auto store = SqliteStore::Create((dir / "metatt.db").string());
    if (!store.ok()) return store.status();
    AdapterRegistry::Options o;
    o.data_dir = dir.string();
    o.base_model_fingerprint = "bench";
    json row = {{"tasks", T}};
    {
      auto reg = AdapterRegistry::Create(o, store->get());
      if (!reg.ok()) return reg.status();
      auto req = testing_util::LargeFamily("fam", T, base, 1, /*rank=*/8);
      if (!req.ok()) return req.status();
      absl::Time t0 = absl::Now();
      auto v1 = (*reg)->Publish(*req);
      if (!v1.ok()) return v1.status();
      row["initial_publish_s"] = Seconds(t0);
      const bool full_baseline = T <= absl::GetFlag(FLAGS_full_baseline_max);
      if (!full_baseline) req = absl::InternalError("not kept");  // its heads: GiBs at 10^6
      torch::Tensor slice = (*v1)->adapter->TaskSlice(0).detach().clone().unsqueeze(0);
      std::vector<double> append_s;
      int64_t version = (*v1)->version();
      for (int64_t i = 0; i < absl::GetFlag(FLAGS_appends); ++i) {
        AppendRequest add;
        add.family = "fam";
        add.base_version = version;
        add.task_slices = slice + 0.01 * static_cast<double>(i);
        TaskRecord r;
        r.name = absl::StrCat("added-", i);
        r.label_names = {"no", "yes"};
        add.tasks.push_back(r);
        add.head_weights.push_back(torch::randn({2, base.hidden_size}));
        add.head_biases.push_back(torch::zeros({2}));
        t0 = absl::Now();
        auto v = (*reg)->PublishAppend(add);
        if (!v.ok()) return v.status();
        auto resolved = (*reg)->Resolve("fam", 0, r.name, -1);
        append_s.push_back(Seconds(t0));
        if (!resolved.ok()) return resolved.status();
        version = (*v)->version();
      }
      row["append_publish_to_servable_s"] = {{"p50", Percentile(append_s, 0.5)},
                                             {"p90", Percentile(append_s, 0.9)},
                                             {"max", Percentile(append_s, 1.0)},
                                             {"n", append_s.size()}};
      t0 = absl::Now();
      (*reg)->WaitForCompactions();
      row["compaction_wait_after_appends_s"] = Seconds(t0);
      if (full_baseline) {
        // The old path: every head of T + 1 tasks written again.
        req->tasks.push_back(req->tasks.back());
        req->tasks.back().name = "full-republish";
        req->head_weights.push_back(req->head_weights.back());
        req->head_biases.push_back(req->head_biases.back());
        req->adapter_tensors[absl::StrCat("task.", T)] = slice.squeeze(0);
        req->config.num_tasks = T + 1;
        t0 = absl::Now();
        auto full = (*reg)->Publish(*req);
        auto resolved = (*reg)->Resolve("fam", 0, "full-republish", -1);
        row["full_publish_to_servable_s"] = Seconds(t0);
        if (!full.ok()) return full.status();
        if (!resolved.ok()) return resolved.status();
      }
      row["rss_mib"] = RssMiB();
    }
    malloc_trim(0);
    {
      auto reg = AdapterRegistry::Create(o, store->get());
      const absl::Time t0 = absl::Now();
      auto warnings = (*reg)->LoadAll();
      row["reload_s"] = Seconds(t0);
      if (!warnings.ok()) return warnings.status();
      if (!warnings->empty()) {
        return absl::InternalError(absl::StrCat("reload: ", warnings->front()));
      }
    }
    malloc_trim(0);
    fs::remove_all(dir);
    std::printf("%s\n", row.dump().c_str());
    std::fflush(stdout);
    results.push_back(row);
  }
  json out = {{"benchmark", "publish_to_servable"},
              {"device", "cpu"},
              {"shapes", "D 384, 6 layers, q+v, rank 8, 2 labels per task, float32 heads"},
              {"store", "SQLite (synchronous as the server runs it)"},
              {"results", results}};
  fs::create_directories(fs::path(absl::GetFlag(FLAGS_out)).parent_path());
  std::ofstream(absl::GetFlag(FLAGS_out)) << out.dump(2) << "\n";
  std::printf("wrote %s\n", absl::GetFlag(FLAGS_out).c_str());
  return absl::OkStatus();
}

}  // namespace
}  // namespace metatt

int main(int argc, char** argv) {
  return metatt::ToolMain(argc, argv, "metatt-bench-publish", metatt::Run);
}
