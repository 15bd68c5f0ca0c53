// metatt-bench-load: closed-loop gRPC load generator for InferenceService.
//
// N client threads, each with its own channel (its own TCP connection) and a
// synchronous stub, send one-input Predict requests back to back for a fixed
// time; each request names a task drawn uniformly from [0, tasks) of one
// family and carries a short random sentence. Prints one JSON object: the
// throughput, latency percentiles, and the per-request "server overhead"
// (client latency minus the model time the server reports for the batch the
// request ran in; also minus the queue time it reports).
//
//   metatt-bench-load --target=127.0.0.1:50051 --family=f100 --tasks=100
//                     --clients=16 --seconds=10 --warmup_seconds=2
//
// Bench only (bench/load_bench.py drives it); NO_PCH, never sees torch.
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "metatt/v1/inference.grpc.pb.h"

ABSL_FLAG(std::string, target, "127.0.0.1:50051", "server address");
ABSL_FLAG(std::string, family, "", "family name");
ABSL_FLAG(int64_t, tasks, 1, "tasks of the family to spread requests over");
ABSL_FLAG(int64_t, clients, 1, "concurrent clients (threads, one channel each)");
ABSL_FLAG(double, seconds, 10, "measured time");
ABSL_FLAG(double, warmup_seconds, 2, "unmeasured time first");
ABSL_FLAG(int64_t, words, 8, "words per sentence");
ABSL_FLAG(int64_t, deadline_ms, 30000, "per-request deadline");
ABSL_FLAG(std::string, label, "", "copied into the JSON");

namespace {

using Clock = std::chrono::steady_clock;

const char* kWords[] = {"the",  "movie", "was",   "a",     "great", "film",  "plot",
                        "good", "bad",   "actor", "story", "very",  "scene", "funny",
                        "dull", "long",  "short", "music", "and",   "but",   "not"};

struct Sample {
  double latency_s, model_s, queue_s;
};

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p * (v.size() - 1) + 0.5));
  return v[i];
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const int64_t clients = absl::GetFlag(FLAGS_clients);
  const int64_t tasks = absl::GetFlag(FLAGS_tasks);
  if (clients < 1 || tasks < 1) {
    std::fprintf(stderr, "--clients and --tasks: must be >= 1\n");
    return 2;
  }
  const auto warmup = std::chrono::duration<double>(absl::GetFlag(FLAGS_warmup_seconds));
  const auto measured = std::chrono::duration<double>(absl::GetFlag(FLAGS_seconds));
  const Clock::time_point t0 = Clock::now();
  const Clock::time_point measure_from =
      t0 + std::chrono::duration_cast<Clock::duration>(warmup);
  const Clock::time_point measure_to =
      measure_from + std::chrono::duration_cast<Clock::duration>(measured);

  std::mutex mu;
  std::vector<Sample> samples;
  std::map<std::string, int64_t> errors;
  std::vector<std::thread> threads;
  for (int64_t c = 0; c < clients; ++c) {
    threads.emplace_back([&, c] {
      grpc::ChannelArguments args;
      args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // one connection per client
      args.SetInt("metatt.bench_client", static_cast<int>(c));
      auto channel = grpc::CreateCustomChannel(absl::GetFlag(FLAGS_target),
                                               grpc::InsecureChannelCredentials(), args);
      auto stub = metatt::v1::InferenceService::NewStub(channel);
      std::mt19937_64 rng(1000 + c);
      std::vector<Sample> mine;
      std::map<std::string, int64_t> my_errors;
      const int64_t words = absl::GetFlag(FLAGS_words);
      while (true) {
        const Clock::time_point start = Clock::now();
        if (start >= measure_to) break;
        metatt::v1::PredictRequest req;
        auto* in = req.add_inputs();
        in->set_family(absl::GetFlag(FLAGS_family));
        in->set_task_index(static_cast<int64_t>(rng() % static_cast<uint64_t>(tasks)));
        std::string text;
        for (int64_t w = 0; w < words; ++w) {
          if (w) text += ' ';
          text += kWords[rng() % (sizeof(kWords) / sizeof(kWords[0]))];
        }
        in->set_text(text);
        metatt::v1::PredictResponse resp;
        grpc::ClientContext ctx;
        ctx.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::milliseconds(absl::GetFlag(FLAGS_deadline_ms)));
        grpc::Status st = stub->Predict(&ctx, req, &resp);
        const Clock::time_point end = Clock::now();
        if (start < measure_from) continue;  // warm-up
        if (end > measure_to) break;        // straddles the end: not counted
        if (!st.ok() || resp.predictions_size() != 1) {
          ++my_errors[st.ok() ? "EMPTY" : absl::StrCat(st.error_code())];
          continue;
        }
        mine.push_back({std::chrono::duration<double>(end - start).count(),
                        resp.predictions(0).model_seconds(), resp.predictions(0).queue_seconds()});
      }
      std::lock_guard<std::mutex> l(mu);
      samples.insert(samples.end(), mine.begin(), mine.end());
      for (const auto& [k, v] : my_errors) errors[k] += v;
    });
  }
  for (auto& t : threads) t.join();

  std::vector<double> lat, model, overhead, rpc_overhead;
  for (const Sample& s : samples) {
    lat.push_back(s.latency_s);
    model.push_back(s.model_s);
    overhead.push_back(s.latency_s - s.model_s);
    rpc_overhead.push_back(s.latency_s - s.model_s - s.queue_s);
  }
  int64_t n_errors = 0;
  std::string err_json = "{";
  for (const auto& [k, v] : errors) {
    if (err_json.size() > 1) err_json += ",";
    err_json += absl::StrCat("\"", k, "\":", v);
    n_errors += v;
  }
  err_json += "}";
  const double secs = measured.count();
  std::printf(
      "{\"label\":\"%s\",\"family\":\"%s\",\"tasks\":%lld,\"clients\":%lld,\"seconds\":%.3f,"
      "\"requests\":%zu,\"errors\":%lld,\"error_codes\":%s,\"throughput_rps\":%.2f,"
      "\"latency_p50_ms\":%.3f,\"latency_p99_ms\":%.3f,\"model_p50_ms\":%.3f,"
      "\"overhead_p50_ms\":%.3f,\"rpc_overhead_p50_ms\":%.3f}\n",
      absl::GetFlag(FLAGS_label).c_str(), absl::GetFlag(FLAGS_family).c_str(),
      static_cast<long long>(tasks), static_cast<long long>(clients), secs, samples.size(),
      static_cast<long long>(n_errors), err_json.c_str(),
      static_cast<double>(samples.size()) / secs, 1e3 * Percentile(lat, 0.5),
      1e3 * Percentile(lat, 0.99), 1e3 * Percentile(model, 0.5), 1e3 * Percentile(overhead, 0.5),
      1e3 * Percentile(rpc_overhead, 0.5));
  return n_errors > 0 && samples.empty() ? 1 : 0;
}
