// metatt-bench-resident: does having 10^6 tasks resident slow Predict?
//
// In one process (no network): the base model, the registry and the device
// scheduler + predictor the server uses. Measures the latency of a batch of
// `batch` one-input requests (one Predict call with `batch` inputs, tasks
// drawn at random) for
//   small:            a family of 1 task, nothing else resident
//   big:              a family of --tasks tasks (default 10^6), random tasks
//   small_with_big:   the 1-task family again, with the big one resident
// and the resident memory the big family added. Writes
// bench/out/resident_bench.json and prints it.
//
// With --head_dtype=float16|bfloat16 the registry keeps the stacked heads
// in 16 bits; "resident_components_mib" splits what the registry itself
// accounts for (heads, task records, name index; AdapterRegistry::
// ResidentBytes()) from the rest of the growth (adapter task slices, the
// test store's copy of the records, allocator slack).
//
//   metatt-bench-resident [--tasks=1000000] [--model_dir=...] [--iters=30]
//                         [--head_dtype=float32]
#include <malloc.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "base/status_macros.h"
#include "base/tool_main.h"
#include "bench/bench_model_dir.h"
#include "server/runtime/large_family.h"
#include "server/runtime/predictor.h"
#include "server/runtime/scheduler.h"
#include "server/model/tokenizer.h"
#include "server/registry/test_util.h"

ABSL_FLAG(int64_t, tasks, 1000000, "tasks of the big family");
ABSL_FLAG(int64_t, batch, 32, "inputs per Predict call");
ABSL_FLAG(int64_t, iters, 30, "measured calls per case");
ABSL_FLAG(int64_t, num_threads, 0, "torch threads (0 = default)");
ABSL_FLAG(std::string, out, "bench/out/resident_bench.json", "JSON output");
ABSL_FLAG(std::string, head_dtype, "float32",
          "float32 | float16 | bfloat16: the registry's resident head dtype");

namespace metatt {
namespace {

const char* kWords[] = {"the", "movie", "was", "a", "great", "film", "plot", "good",
                        "bad", "actor", "story", "very", "scene", "funny", "dull"};

nlohmann::json Measure(ScheduledPredictor& p, const std::string& family, int64_t tasks,
                       int64_t batch, int64_t iters) {
  std::mt19937_64 rng(7);
  std::vector<double> ms;
  for (int64_t it = -3; it < iters; ++it) {  // 3 warm-up calls
    std::vector<PredictInput> in(batch);
    for (auto& x : in) {
      x.family = family;
      x.task_index = static_cast<int64_t>(rng() % static_cast<uint64_t>(tasks));
      for (int w = 0; w < 8; ++w) {
        x.text += (w ? " " : "");
        x.text += kWords[rng() % (sizeof(kWords) / sizeof(kWords[0]))];
      }
    }
    const absl::Time t0 = absl::Now();
    auto out = p.Predict(in, 0);
    const double dt = absl::ToDoubleMilliseconds(absl::Now() - t0);
    if (!out.ok()) {
      std::fprintf(stderr, "Predict: %s\n", out.status().ToString().c_str());
      std::exit(1);
    }
    if (it >= 0) ms.push_back(dt);
  }
  std::sort(ms.begin(), ms.end());
  return {{"family", family},
          {"tasks", tasks},
          {"p50_ms", ms[ms.size() / 2]},
          {"p90_ms", ms[ms.size() * 9 / 10]},
          {"mean_ms", std::accumulate(ms.begin(), ms.end(), 0.0) / ms.size()}};
}

absl::Status Run() {
  if (absl::GetFlag(FLAGS_num_threads) > 0) {
    torch::set_num_threads(static_cast<int>(absl::GetFlag(FLAGS_num_threads)));
  }
  auto model_dir = BenchModelDir();
  if (!model_dir.ok()) return model_dir.status();
  BertEncoder::Options eo;
  eo.model_dir = *model_dir;
  auto encoder = BertEncoder::Create(eo);
  auto tok = WordPieceTokenizer::Create(*model_dir);
  if (!encoder.ok()) return encoder.status();
  if (!tok.ok()) return tok.status();
  auto tokenizer = std::make_shared<const WordPieceTokenizer>(std::move(*tok));
  testing_util::ScratchDir dir;
  testing_util::InMemoryStore store;
  AdapterRegistry::Options ro;
  ro.data_dir = dir.path();
  ro.head_dtype = absl::GetFlag(FLAGS_head_dtype);
  auto registry = AdapterRegistry::Create(ro, &store);
  if (!registry.ok()) return registry.status();
  auto sched = DeviceScheduler::Create(DeviceScheduler::Options(), *encoder);
  if (!sched.ok()) return sched.status();
  ScheduledPredictor predictor(ScheduledPredictor::Options(), registry->get(), sched->get(),
                               tokenizer);
  const int64_t batch = absl::GetFlag(FLAGS_batch), iters = absl::GetFlag(FLAGS_iters);
  const BertConfig& cfg = (*encoder)->config();

  auto small = testing_util::LargeFamily("small", 1, cfg, 1);
  if (!small.ok()) return small.status();
  RETURN_IF_ERROR((*registry)->Publish(*small).status());
  nlohmann::json r;
  r["model"] = cfg.Fingerprint();
  r["model_dir"] = *model_dir;
  r["batch"] = batch;
  r["iters"] = iters;
  r["head_dtype"] = ro.head_dtype;
  r["small"] = Measure(predictor, "small", 1, batch, iters);
  std::printf("small: p50 %.2f ms\n", r["small"]["p50_ms"].get<double>());
  std::fflush(stdout);

  const int64_t n = absl::GetFlag(FLAGS_tasks);
  // glibc keeps freed heap pages mapped: trim before each RSS reading so the
  // growth is what the big family holds, not publishing's transient garbage.
  malloc_trim(0);
  const int64_t rss0 = testing_util::ResidentBytes();
  const ResidentStats reg0 = (*registry)->ResidentBytes();
  const absl::Time t0 = absl::Now();
  {
    auto big = testing_util::LargeFamily("big", n, cfg, 2);
    if (!big.ok()) return big.status();
    RETURN_IF_ERROR((*registry)->Publish(*big).status());
  }
  r["big_build_publish_seconds"] = absl::ToDoubleSeconds(absl::Now() - t0);
  r["big_resident_growth_untrimmed_mib"] =
      static_cast<double>(testing_util::ResidentBytes() - rss0) / (1 << 20);
  malloc_trim(0);
  const int64_t rss1 = testing_util::ResidentBytes();
  r["big_resident_growth_mib"] = static_cast<double>(rss1 - rss0) / (1 << 20);
  r["big_resident_bytes_per_task"] = static_cast<double>(rss1 - rss0) / static_cast<double>(n);
  r["resident_tasks"] = (*registry)->ResidentTasks();
  {
    const ResidentStats reg1 = (*registry)->ResidentBytes();
    const double mib = 1 << 20;
    const int64_t heads = reg1.heads - reg0.heads;
    const int64_t records = reg1.task_records - reg0.task_records;
    const int64_t index = reg1.name_index - reg0.name_index;
    r["resident_components_mib"] = {
        {"heads", heads / mib},
        {"task_records", records / mib},
        {"name_index", index / mib},
        {"other", (rss1 - rss0 - heads - records - index) / mib}};
    r["resident_components_bytes_per_task"] = {
        {"heads", static_cast<double>(heads) / n},
        {"task_records", static_cast<double>(records) / n},
        {"name_index", static_cast<double>(index) / n}};
    std::printf("  registry: heads %.1f MiB (%s), task records %.1f MiB, name index %.1f MiB\n",
                heads / mib, ro.head_dtype.c_str(), records / mib, index / mib);
  }
  std::printf("big (%lld tasks): published in %.1f s, resident +%.0f MiB\n",
              static_cast<long long>(n), r["big_build_publish_seconds"].get<double>(),
              r["big_resident_growth_mib"].get<double>());
  std::fflush(stdout);
  r["big"] = Measure(predictor, "big", n, batch, iters);
  r["small_with_big"] = Measure(predictor, "small", 1, batch, iters);
  r["ratio_big_over_small"] =
      r["big"]["p50_ms"].get<double>() / r["small"]["p50_ms"].get<double>();
  r["ratio_small_with_big_over_small"] =
      r["small_with_big"]["p50_ms"].get<double>() / r["small"]["p50_ms"].get<double>();
  (*sched)->Shutdown();
  const std::string text = r.dump(2);
  std::printf("%s\n", text.c_str());
  const std::string out = absl::GetFlag(FLAGS_out);
  std::ofstream f(out);
  if (f) {
    f << text << "\n";
    std::printf("wrote %s\n", out.c_str());
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace metatt

int main(int argc, char** argv) {
  return metatt::ToolMain(argc, argv, "metatt-bench-resident", metatt::Run);
}
