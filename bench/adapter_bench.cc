// Adapter inference throughput on the real base model (MiniLM by default).
// Prints JSON to stdout and writes it to --out (default
// bench/out/adapter_bench.json, relative to the working directory).
//
// Configurations, timed interleaved (round-robin) so that background load
// hits them alike; the figure is the median over --iters rounds:
//   base                    encoder alone
//   metatt_4d               MetaTT 4D, r=8, Q,V (inference fold W = C . G4)
//   metatt_4p1d_T{1,100,10000}  MetaTT (4+1)D, r=8, Q,V, every row a random
//                           task, drawn afresh every round (T=10000: most
//                           batches fold their tasks anew; cache bound 64 MiB)
//   lora_r8                 our LoRA, unmerged, r=8, Q,V
// Each adapter is also timed alone (its Deltas() calls for one forward on
// fixed activations): adapter_only_median_ms. Adapter-only extras (no whole
// forward): metatt_4d_unfolded ((Z . C) . G4, the training path without grad)
// and the T=10000 mix with rows grouped per task instead of one bmm.
// /proc/loadavg is recorded before and after (the machine may be shared).
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <torch/cuda.h>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "adapters/lora_adapter.h"
#include "adapters/metatt_adapter.h"
#include "base/status_macros.h"
#include "base/tool_main.h"
#include "bench/bench_model_dir.h"
#include "server/model/bert_encoder.h"

ABSL_FLAG(int, batch, 32, "sequences per batch");
ABSL_FLAG(int, seq, 128, "tokens per sequence");
ABSL_FLAG(int, threads, 2, "torch intra-op threads");
ABSL_FLAG(std::string, device, "cpu", "cpu|cuda|cuda:N|auto");
ABSL_FLAG(int, iters, 5, "timed rounds (median reported)");
ABSL_FLAG(int, warmup, 1, "untimed rounds");
ABSL_FLAG(int, adapter_iters, 20, "rounds of the adapter-only timing (median reported)");
ABSL_FLAG(std::string, out, "bench/out/adapter_bench.json", "JSON output path ('' = none)");

namespace metatt {
namespace {

struct Case {
  std::string name;
  EncoderAdapter* adapter = nullptr;
  AdapterBatch batch;
  int64_t adapter_params = 0;
  std::vector<double> secs;
  std::vector<double> adapter_secs;  // the adapter's Deltas() calls alone
  int64_t num_tasks = 0;             // > 0: fresh random tasks every round
  bool whole_forward = true;         // false: adapter-only timing
  MetaTTAdapter* metatt = nullptr;   // for fold statistics
};

std::string LoadAvg() {
  std::ifstream f("/proc/loadavg");
  std::string a, b, c;
  f >> a >> b >> c;
  return a + " " + b + " " + c;
}

absl::Status Run() {
  torch::set_num_threads(absl::GetFlag(FLAGS_threads));
  ASSIGN_OR_RETURN(std::string model_dir, BenchModelDir());
  ASSIGN_OR_RETURN(torch::Device device, ParseDevice(absl::GetFlag(FLAGS_device)));
  // Waits for the device's queued work (timings end there).
  auto sync = [&] {
    if (device.is_cuda()) torch::cuda::synchronize(device.index() < 0 ? -1 : device.index());
  };
  BertEncoder::Options eo;
  eo.model_dir = model_dir;
  eo.device = device;
  ASSIGN_OR_RETURN(auto enc, BertEncoder::Create(eo));
  const auto& bc = enc->config();
  const int64_t B = absl::GetFlag(FLAGS_batch), S = absl::GetFlag(FLAGS_seq);

  torch::manual_seed(0);
  EncoderInput in;
  in.input_ids = torch::randint(1000, bc.vocab_size, {B, S}, torch::kInt64).to(device);
  in.attention_mask = torch::ones({B, S}, torch::kInt64).to(device);
  MetaTTAdapter::Options ao;
  ao.device = device;

  MetaTTConfig mc;
  mc.d_in = mc.d_out = bc.hidden_size;
  mc.num_layers = bc.num_hidden_layers;
  mc.num_heads = bc.num_attention_heads;
  mc.ranks = {8};
  mc.projections = {Projection::kQuery, Projection::kValue};
  mc.init = "normal(0.05)";
  std::vector<std::unique_ptr<MetaTTAdapter>> keep;
  std::vector<Case> cases;
  auto add = [&](const std::string& name, EncoderAdapter* a, int64_t params) -> Case& {
    Case c;
    c.name = name;
    c.adapter = a;
    c.adapter_params = params;
    cases.push_back(c);
    return cases.back();
  };
  add("base", nullptr, 0);
  for (bool fold : {true, false}) {
    ASSIGN_OR_RETURN(auto a, MetaTTAdapter::Create(mc, ao));
    a->SetInferenceFold(fold);
    Case& c = add(fold ? "metatt_4d_r8_qv" : "metatt_4d_r8_qv_unfolded", a.get(),
                  a->NumParameters());
    c.whole_forward = fold;
    c.metatt = a.get();
    keep.push_back(std::move(a));
  }
  for (int64_t T : {1, 100, 10000}) {
    MetaTTConfig c = mc;
    c.form = TTForm::k4Plus1D;
    c.num_tasks = T;
    ASSIGN_OR_RETURN(auto a, MetaTTAdapter::Create(c, ao));
    a->FreezeShared(true);  // as served: one stored task core, no per-task leaves
    Case& k = add("metatt_4p1d_r8_qv_mixed_T" + std::to_string(c.num_tasks), a.get(),
                  a->NumParameters());
    k.num_tasks = c.num_tasks;
    k.whole_forward = true;
    k.metatt = a.get();
    keep.push_back(std::move(a));
  }
  LoraConfig lc;
  lc.rank = 8;
  lc.alpha = 16;
  lc.num_layers = bc.num_hidden_layers;
  lc.hidden_size = bc.hidden_size;
  lc.init = "random";
  LoraAdapter::Options lo;
  lo.device = device;
  ASSIGN_OR_RETURN(auto lora, LoraAdapter::Create(lc, lo));
  add("lora_r8_qv_unmerged", lora.get(), lora->NumParameters());
  // Fresh random tasks for every round (drawn outside the timed region).
  auto draw_tasks = [&](Case& c) {
    if (c.num_tasks > 0)
      c.batch = AdapterBatch::FromHost(torch::randint(0, c.num_tasks, {B}, torch::kInt64), device);
  };
  const std::string load_before = LoadAvg();

  torch::NoGradGuard no_grad;
  const int warmup = absl::GetFlag(FLAGS_warmup), iters = absl::GetFlag(FLAGS_iters);
  for (int round = 0; round < warmup + iters; ++round) {
    for (auto& c : cases) {
      if (!c.whole_forward) continue;
      draw_tasks(c);
      auto t0 = std::chrono::steady_clock::now();
      ASSIGN_OR_RETURN(torch::Tensor h, enc->Forward(in, c.adapter, c.batch));
      (void)h.sum().item<float>();
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (round >= warmup) c.secs.push_back(s);
    }
  }
  // Adapter alone: the AddDeltas() calls one forward makes (fused Q|K|V, O,
  // FFN up, FFN down per layer, each into its base output) on fixed
  // activations; isolates the adapter's cost from the encoder's (and from
  // background load on the encoder's matmuls).
  {
    const int64_t D = bc.hidden_size, F = bc.intermediate_size;
    torch::Tensor x = torch::randn({B, S, D}).to(device);
    torch::Tensor u = torch::randn({B, S, F}).to(device);
    torch::Tensor qkv = torch::zeros({B, S, 3 * D}).to(device), o = torch::zeros({B, S, D}).to(device);
    torch::Tensor up = torch::zeros({B, S, F}).to(device), dn = torch::zeros({B, S, D}).to(device);
    const auto& groups = ProjectionGroups();
    for (int round = 0; round < warmup + absl::GetFlag(FLAGS_adapter_iters); ++round) {
      for (auto& c : cases) {
        if (c.adapter == nullptr) continue;
        draw_tasks(c);
        sync();
        auto t0 = std::chrono::steady_clock::now();
        for (int l = 0; l < bc.num_hidden_layers; ++l) {
          c.adapter->AddDeltas(l, x, groups[0], c.batch, qkv);
          c.adapter->AddDeltas(l, x, groups[1], c.batch, o);
          c.adapter->AddDeltas(l, x, groups[2], c.batch, up);
          c.adapter->AddDeltas(l, u, groups[3], c.batch, dn);
        }
        // CPU: the calls ran synchronously; CUDA: wait for their kernels.
        sync();
        const double s =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        if (round >= warmup) c.adapter_secs.push_back(s);
      }
    }
  }
  auto median = [](std::vector<double> v) {
    if (v.empty()) return 0.0;
    std::sort(v.begin(), v.end());
    return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
  };
  const double base_s = median(cases[0].secs);
  const std::string load_after = LoadAvg();
  nlohmann::json j;
  j["benchmark"] = "adapter_inference";
  j["model_dir"] = model_dir;
  j["batch"] = B;
  j["seq"] = S;
  j["threads"] = absl::GetFlag(FLAGS_threads);
  j["iters"] = iters;
  j["device"] = device.str();
  j["loadavg_before"] = load_before;
  j["loadavg_after"] = load_after;
  nlohmann::json rows = nlohmann::json::array();
  for (auto& c : cases) {
    nlohmann::json row = {{"name", c.name},
                          {"adapter_parameters", c.adapter_params},
                          {"adapter_only_median_ms", 1e3 * median(c.adapter_secs)},
                          {"adapter_only_share_of_base", median(c.adapter_secs) / base_s}};
    if (!c.adapter_secs.empty())
      row["adapter_only_min_ms"] =
          1e3 * *std::min_element(c.adapter_secs.begin(), c.adapter_secs.end());
    if (c.whole_forward) {
      const double m = median(c.secs);
      row["median_s"] = m;
      row["min_s"] = *std::min_element(c.secs.begin(), c.secs.end());
      row["seq_per_s"] = B / m;
      row["throughput_vs_base"] = base_s / m;
    }
    if (c.metatt != nullptr) {
      row["fold_tables_built"] = c.metatt->fold_stats().tables;
      row["fold_table_hits"] = c.metatt->fold_stats().hits;
      row["cache_rebuilds"] = c.metatt->fold_stats().rebuilds;
      row["task_storage_bytes"] = c.metatt->TaskStorageBytes();
    }
    rows.push_back(row);
  }
  j["results"] = rows;
  const std::string text = j.dump(2);
  std::cout << text << std::endl;
  const std::string out = absl::GetFlag(FLAGS_out);
  if (!out.empty()) {
    auto slash = out.rfind('/');
    if (slash != std::string::npos) {
      std::string dir = out.substr(0, slash);
      std::string cmd = "mkdir -p '" + dir + "'";
      if (std::system(cmd.c_str()) != 0) return absl::InternalError("cannot create " + dir);
    }
    std::ofstream f(out);
    f << text << "\n";
    if (!f) return absl::InternalError("cannot write " + out);
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace metatt

int main(int argc, char** argv) {
  return metatt::ToolMain(argc, argv, "adapter_bench", metatt::Run);
}
