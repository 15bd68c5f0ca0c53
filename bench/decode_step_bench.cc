// One decode step of a Llama-architecture decoder (SmolLM2-135M-Instruct by
// default) with and without a MetaTT (4+1)D family, in one process: what a
// mixed-task batch costs the scheduler's decode loop, without gRPC, sampling
// or queueing around it (bench/decode_bench.py measures those end to end).
//
// For every batch size B: a random prompt of --prompt tokens per row is
// prefilled once (base model) into a KV cache; then, in every round, each
// mode starts from a copy of that cache and runs --steps decode steps
// (Forward of one token per row with the cache, logits of the last slot, as
// ContinuousBatcher::DecodeStep does), each step timed. Modes, interleaved
// within a round so that background load falls on all of them:
//   base            no adapter
//   one_task        a random (4+1)D family (rank --rank over q,k,v,o,gate,up,
//                   down, --tasks tasks), every row the same task
//   mixed           the same family, every row a random task (drawn per round)
//   mixed_table     as mixed, with the adapter's row chains off (the per-row
//                   fold table every mixed batch used before)
// Reported per (B, mode): median and minimum step time and tokens/s, and
// base / mode of the medians and of the minima (>= 0.95 is the bar
// for mixed decoding). /proc/loadavg is recorded before and after.
#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "adapters/metatt_adapter.h"
#include "base/status_macros.h"
#include "base/tool_main.h"
#include "server/model/llama_decoder.h"
#include "server/model/model_dir.h"

ABSL_FLAG(std::string, model_dir, "",
          "decoder model dir (default: <repo>/models/SmolLM2-135M-Instruct)");
ABSL_FLAG(std::string, batches, "1,8,32", "batch sizes (rows decoding together)");
ABSL_FLAG(int64_t, tasks, 1000, "tasks in the random family");
ABSL_FLAG(int64_t, rank, 8, "TT rank of every bond");
ABSL_FLAG(int64_t, prompt, 32, "prompt tokens per row (prefilled once)");
ABSL_FLAG(int, steps, 4, "timed decode steps per mode and round");
ABSL_FLAG(int, rounds, 5, "rounds (modes interleaved in each)");
ABSL_FLAG(int, threads, 2, "torch intra-op threads");
ABSL_FLAG(std::string, out, "bench/out/decode_step_bench.json", "JSON output ('' = none)");

namespace metatt {
namespace {

std::string LoadAvg() {
  std::ifstream f("/proc/loadavg");
  std::string a, b, c;
  f >> a >> b >> c;
  return a + " " + b + " " + c;
}

KvCache Copy(const KvCache& c) {
  KvCache k;
  for (const auto& t : c.keys) k.keys.push_back(t.clone());
  for (const auto& t : c.values) k.values.push_back(t.clone());
  k.valid = c.valid.clone();
  k.next_position = c.next_position.clone();
  return k;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

absl::Status Run() {
  torch::set_num_threads(absl::GetFlag(FLAGS_threads));
  torch::NoGradGuard no_grad;
  std::string dir = absl::GetFlag(FLAGS_model_dir);
  if (dir.empty()) {
    // The encoder's resolution rule finds <repo>/models; the decoder sits beside it.
    ASSIGN_OR_RETURN(std::string enc, ResolveModelDir(""));
    dir = (std::filesystem::path(enc).parent_path() / "SmolLM2-135M-Instruct").string();
  }
  ASSIGN_OR_RETURN(std::shared_ptr<LlamaDecoder> dec, LlamaDecoder::Create({dir, torch::kCPU}));
  const int64_t T = absl::GetFlag(FLAGS_tasks);
  MetaTTConfig c;
  c.SetModel(dec->geometry());
  c.form = TTForm::k4Plus1D;
  c.ranks = {absl::GetFlag(FLAGS_rank)};
  c.projections.clear();
  for (int p = 0; p < kNumProjections; ++p)
    if (c.Geometry().Has(static_cast<Projection>(p)))
      c.projections.push_back(static_cast<Projection>(p));
  c.num_tasks = T;
  c.init = "normal(0.1)";
  ASSIGN_OR_RETURN(std::unique_ptr<MetaTTAdapter> trained,
                   MetaTTAdapter::Create(c, {torch::kFloat32, torch::kCPU, 1}));
  // Served the way the registry serves a family: frozen leaves, the task
  // slices in one stored core (no per-task leaf).
  std::map<std::string, torch::Tensor> tensors;
  for (const auto& [name, t] : trained->NamedParameters()) tensors[name] = t.detach();
  ASSIGN_OR_RETURN(std::unique_ptr<MetaTTAdapter> adapter,
                   MetaTTAdapter::FromTensors(trained->config(), trained->scale(), tensors,
                                              torch::kCPU, MetaTTAdapter::Leaves::kFrozen));
  trained.reset();

  nlohmann::json out = {{"benchmark", "decode_step"},
                        {"model", std::filesystem::path(dir).filename().string()},
                        {"precision", "float32"},
                        {"device", "cpu"},
                        {"threads", absl::GetFlag(FLAGS_threads)},
                        {"family", absl::StrCat("random MetaTT 4+1d rank ", c.ranks[0],
                                                " over q,k,v,o,gate,up,down, ", T, " tasks")},
                        {"adapter_parameters", adapter->NumParameters()},
                        {"prompt_tokens", absl::GetFlag(FLAGS_prompt)},
                        {"steps_per_round", absl::GetFlag(FLAGS_steps)},
                        {"rounds", absl::GetFlag(FLAGS_rounds)},
                        {"load_average_at_start", LoadAvg()}};
  const std::vector<std::string> modes = {"base", "one_task", "mixed", "mixed_table"};
  torch::manual_seed(7);
  for (absl::string_view bs : absl::StrSplit(absl::GetFlag(FLAGS_batches), ',')) {
    int64_t B = 0;
    if (!absl::SimpleAtoi(bs, &B) || B < 1)
      return absl::InvalidArgumentError(absl::StrCat("batches: '", bs, "' is not a size"));
    const int64_t P = absl::GetFlag(FLAGS_prompt), V = dec->config().vocab_size;
    KvCache cache0;
    torch::Tensor prompt = torch::randint(V, {B, P}, torch::kLong);
    ASSIGN_OR_RETURN(DecoderOutput pre, dec->Forward({prompt, {}}, &cache0));
    (void)pre;
    std::map<std::string, std::vector<double>> ms;
    DecoderForwardOptions last;
    last.last_logits_only = true;
    for (int r = 0; r < absl::GetFlag(FLAGS_rounds); ++r) {
      const AdapterBatch mixed =
          AdapterBatch::FromHost(torch::randint(T, {B}, torch::kLong), torch::kCPU);
      const AdapterBatch one = AdapterBatch::FromHost(torch::full({B}, 7, torch::kLong),
                                                      torch::kCPU);
      for (const std::string& mode : modes) {
        adapter->SetRowChains(mode != "mixed_table");
        EncoderAdapter* a = mode == "base" ? nullptr : adapter.get();
        const AdapterBatch& ab = mode == "one_task" ? one : mixed;
        KvCache cache = Copy(cache0);
        for (int s = 0; s < absl::GetFlag(FLAGS_steps); ++s) {
          torch::Tensor ids = torch::randint(V, {B, 1}, torch::kLong);
          const auto t0 = std::chrono::steady_clock::now();
          ASSIGN_OR_RETURN(DecoderOutput o, dec->Forward({ids, {}}, &cache, a, ab, last));
          (void)o.logits.sum().item<float>();
          ms[mode].push_back(
              std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
                  .count());
        }
      }
    }
    nlohmann::json row = {{"batch", B}};
    const double base_med = Median(ms["base"]);
    const double base_min = *std::min_element(ms["base"].begin(), ms["base"].end());
    for (const std::string& mode : modes) {
      const double med = Median(ms[mode]);
      const double mn = *std::min_element(ms[mode].begin(), ms[mode].end());
      row[mode] = {{"median_ms", med},
                   {"min_ms", mn},
                   {"tokens_per_second_median", 1000.0 * B / med},
                   {"vs_base_median", base_med / med},
                   {"vs_base_min", base_min / mn},
                   {"step_ms", ms[mode]}};
      std::cout << "B=" << B << " " << mode << ": median " << med << " ms, min " << mn
                << " ms, vs base " << base_med / med << " (min " << base_min / mn << ")"
                << std::endl;
    }
    out["results"].push_back(row);
  }
  out["load_average_at_end"] = LoadAvg();
  out["fold_stats"] = {{"chains", adapter->fold_stats().chains},
                       {"tables", adapter->fold_stats().tables},
                       {"hits", adapter->fold_stats().hits}};
  const std::string path = absl::GetFlag(FLAGS_out);
  if (!path.empty()) {
    std::filesystem::create_directories(std::filesystem::path(path).parent_path());
    std::ofstream(path) << out.dump(2) << "\n";
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace metatt

int main(int argc, char** argv) {
  return metatt::ToolMain(argc, argv, "decode_step_bench", metatt::Run);
}
