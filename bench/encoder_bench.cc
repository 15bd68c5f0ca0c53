// Encoder forward throughput (sequences/s) of our LibTorch BERT on the real
// MiniLM; bench/encoder_bench.py runs it next to transformers and writes the
// ratio. Prints one JSON object.
#include <algorithm>
#include <chrono>
#include <iostream>

#include <nlohmann/json.hpp>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "bench/bench_model_dir.h"
#include "server/model/bert_encoder.h"

ABSL_FLAG(std::string, device, "auto", "auto | cpu | cuda");
ABSL_FLAG(int, batch, 32, "batch size");
ABSL_FLAG(int, seq, 128, "sequence length");
ABSL_FLAG(int, iters, 10, "timed iterations");
ABSL_FLAG(int, threads, 2, "intra-op threads");

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  at::set_num_threads(absl::GetFlag(FLAGS_threads));
  auto dir = metatt::BenchModelDir();
  auto device = metatt::ParseDevice(absl::GetFlag(FLAGS_device));
  if (!dir.ok() || !device.ok()) {
    std::cerr << (dir.ok() ? device.status() : dir.status()) << "\n";
    return 1;
  }
  auto enc = metatt::BertEncoder::Create({*dir, *device});
  if (!enc.ok()) {
    std::cerr << enc.status() << "\n";
    return 1;
  }
  const int B = absl::GetFlag(FLAGS_batch), S = absl::GetFlag(FLAGS_seq);
  torch::manual_seed(0);
  metatt::EncoderInput in{torch::randint(1000, 20000, {B, S}, torch::kInt64), {},
                          torch::ones({B, S}, torch::kInt64)};
  torch::NoGradGuard ng;
  auto sync = [&] {
    if (device->is_cuda()) torch::cuda::synchronize();
  };
  for (int i = 0; i < 2; ++i) (void)(*enc)->Forward(in);
  sync();
  std::vector<double> times;
  for (int i = 0; i < absl::GetFlag(FLAGS_iters); ++i) {
    auto t0 = std::chrono::steady_clock::now();
    auto out = (*enc)->Forward(in);
    sync();
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    if (!out.ok()) {
      std::cerr << out.status() << "\n";
      return 1;
    }
  }
  std::sort(times.begin(), times.end());
  double median = times[times.size() / 2];
  nlohmann::json j = {{"impl", "metatt-libtorch"}, {"device", device->str()},
                      {"batch", B}, {"seq", S}, {"threads", absl::GetFlag(FLAGS_threads)},
                      {"median_seconds", median}, {"sequences_per_second", B / median}};
  std::cout << j.dump() << std::endl;
  return 0;
}
