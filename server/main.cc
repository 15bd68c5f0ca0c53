// metatt-server: flags, wiring, signal handling, graceful shutdown.
//
//   metatt-server --listen 127.0.0.1:50051 --metrics_listen 127.0.0.1:9090
//                 --data_dir ./data [--model_dir DIR] [--device auto|cpu|cuda]
//
// Prints "METRICS <port>" then "LISTENING <port>" on stdout (flushed) once
// serving, so scripts and tests can pass port 0 and read the chosen port.
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <signal.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "server/jobs/adapter_catalog.h"
#include "server/jobs/dataset_manager.h"
#include "server/jobs/job_manager.h"
#include "server/jobs/sqlite_store.h"
#include "server/metrics/server_metrics.h"
#include "server/service/services.h"

#ifdef METATT_HAVE_RUNTIME
#include "server/inference/runtime.h"
#endif
#ifdef METATT_HAVE_DATASET_PARSE
#include "server/jobs/dataset_spec_json.h"
#endif

ABSL_FLAG(std::string, listen, "127.0.0.1:50051",
          "gRPC address host:port (port 0 picks a free port). Plaintext, no auth: keep it on "
          "localhost or put it behind an authenticating proxy");
ABSL_FLAG(std::string, metrics_listen, "127.0.0.1:9090",
          "Prometheus /metrics address host:port (port 0 picks a free port; empty = off)");
ABSL_FLAG(std::string, data_dir, "./data", "SQLite database, datasets and adapter families");
ABSL_FLAG(std::string, model_dir, "",
          "base model directory (default: $METATT_MODEL_DIR, else <repo>/models/all-MiniLM-L6-v2)");
ABSL_FLAG(std::string, device, "auto", "auto | cpu | cuda | cuda:N");
ABSL_FLAG(int64_t, max_queued_jobs, 16, "CreateJob fails RESOURCE_EXHAUSTED beyond this");
ABSL_FLAG(int64_t, max_upload_bytes, 256ll << 20, "largest dataset upload");
ABSL_FLAG(int64_t, max_batch_size, 32, "rows per device inference batch");
ABSL_FLAG(int64_t, batch_timeout_ms, 2, "dynamic batching window");
ABSL_FLAG(int64_t, num_threads, 0, "torch intra-op threads (0 = torch default)");
ABSL_FLAG(int64_t, shutdown_grace_ms, 5000, "time RPCs get to finish on SIGTERM/SIGINT");

namespace metatt {
namespace {

void Log(const std::string& msg) {
  std::fprintf(stderr, "[metatt-server] %s\n", msg.c_str());
  std::fflush(stderr);
}

// Used when this build has no device runtime: jobs fail with a clear reason.
class NoRuntimeExecutor : public JobExecutor {
 public:
  absl::Status Start(const JobRecord&, EmitFn) override {
    return absl::UnavailableError("this server was built without the training runtime");
  }
  void Cancel(const std::string&) override {}
};

DatasetParseFn MakeParseFn() {
#ifdef METATT_HAVE_DATASET_PARSE
  return ParseUploadedDataset;
#else
  return [](const std::string&, const std::string&) -> absl::StatusOr<ParsedDatasetInfo> {
    return absl::UnimplementedError("this server was built without the dataset parser");
  };
#endif
}

int Run() {
  // Signals are taken by sigwait() on the main thread: block them before any
  // thread starts so every thread inherits the mask.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  const std::string data_dir = absl::GetFlag(FLAGS_data_dir);
  std::error_code ec;
  std::filesystem::create_directories(data_dir, ec);
  if (ec) {
    Log(absl::StrCat("--data_dir: cannot create ", data_dir, ": ", ec.message()));
    return 1;
  }
  auto store_or = SqliteStore::Create((std::filesystem::path(data_dir) / "metatt.db").string());
  if (!store_or.ok()) {
    Log(store_or.status().ToString());
    return 1;
  }
  std::unique_ptr<SqliteStore> store = std::move(*store_or);

  std::unique_ptr<MetricsRegistry> metrics = MetricsRegistry::Create();
  const std::string metrics_listen = absl::GetFlag(FLAGS_metrics_listen);
  int metrics_port = 0;
  if (!metrics_listen.empty()) {
    auto port = metrics->Serve(metrics_listen);
    if (port.ok()) {
      metrics_port = *port;
    } else {
      // Serving RPCs matters more than /metrics: keep going without it.
      Log(absl::StrCat("warning: metrics disabled: ", port.status().ToString()));
    }
  }

  JobExecutor* executor = nullptr;
  Predictor* predictor = nullptr;
  AdapterCatalog* catalog = nullptr;
  NoRuntimeExecutor no_runtime;
#ifdef METATT_HAVE_RUNTIME
  RuntimeOptions ro;
  ro.model_dir = absl::GetFlag(FLAGS_model_dir);
  ro.device = absl::GetFlag(FLAGS_device);
  ro.data_dir = data_dir;
  ro.max_batch_size = absl::GetFlag(FLAGS_max_batch_size);
  ro.batch_timeout_ms = absl::GetFlag(FLAGS_batch_timeout_ms);
  ro.num_threads = absl::GetFlag(FLAGS_num_threads);
  auto rt_or = Runtime::Create(ro, store.get());
  if (!rt_or.ok()) {
    Log(absl::StrCat("cannot start the runtime: ", rt_or.status().ToString()));
    return 1;
  }
  std::unique_ptr<Runtime> runtime = std::move(*rt_or);
  for (const auto& w : runtime->load_warnings()) Log(absl::StrCat("warning: ", w));
  Log(absl::StrCat("device ", runtime->device(), ", base model ",
                   runtime->base_model_fingerprint()));
  executor = runtime->job_executor();
  predictor = runtime->predictor();
  catalog = dynamic_cast<AdapterCatalog*>(runtime.get());
  ServerMetrics* sm = &metrics->metrics();
  runtime->SetBatchObserver([sm](const BatchStats& b) {
    sm->batch_size.Observe(static_cast<double>(b.batch_size));
    sm->batch_tasks.Observe(static_cast<double>(b.distinct_tasks));
    sm->queue_depth.Set(static_cast<double>(b.queue_depth));
  });
#else
  // TODO(lead): this build has no server/inference runtime (metatt_runtime);
  // jobs fail and Predict answers UNAVAILABLE.
  Log("warning: built without the device runtime: training and inference are unavailable");
#endif
  if (executor == nullptr) executor = &no_runtime;

  DatasetManagerOptions dopt;
  dopt.data_dir = data_dir;
  dopt.max_upload_bytes = absl::GetFlag(FLAGS_max_upload_bytes);
  dopt.parse = MakeParseFn();
  auto datasets_or = DatasetManager::Create(dopt, store.get());
  if (!datasets_or.ok()) {
    Log(datasets_or.status().ToString());
    return 1;
  }
  std::unique_ptr<DatasetManager> datasets = std::move(*datasets_or);

  JobManagerOptions jopt;
  jopt.max_queued_jobs = absl::GetFlag(FLAGS_max_queued_jobs);
  jopt.metrics = &metrics->metrics();
  auto jobs_or = JobManager::Create(jopt, store.get(), executor);
  if (!jobs_or.ok()) {
    Log(jobs_or.status().ToString());
    return 1;
  }
  std::unique_ptr<JobManager> jobs = std::move(*jobs_or);

  JobServiceImpl job_service(jobs.get());
  DatasetServiceImpl dataset_service(datasets.get());
  AdapterServiceOptions aopt;
  aopt.store = store.get();
  aopt.catalog = catalog;
  AdapterServiceImpl adapter_service(aopt);
  InferenceServiceOptions iopt;
  iopt.predictor = predictor;
  iopt.metrics = &metrics->metrics();
  InferenceServiceImpl inference_service(iopt);

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  const std::string listen = absl::GetFlag(FLAGS_listen);
  builder.AddListeningPort(listen, grpc::InsecureServerCredentials(), &port);
  builder.SetMaxReceiveMessageSize(64 << 20);
  builder.RegisterService(&job_service);
  builder.RegisterService(&dataset_service);
  builder.RegisterService(&adapter_service);
  builder.RegisterService(&inference_service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) {
    Log(absl::StrCat("--listen: cannot listen on ", listen));
    return 1;
  }
  Log(absl::StrCat("serving metatt.v1 on ", listen, " (port ", port,
                   "): plaintext, no authentication -- the local default; do not expose it "
                   "beyond localhost without TLS and an authenticating proxy"));
  if (metrics_port > 0) Log(absl::StrCat("metrics on http://", metrics_listen, "/metrics"));
  // METRICS first: LISTENING is the last line, the "ready" signal scripts wait for.
  if (metrics_port > 0) std::printf("METRICS %d\n", metrics_port);
  std::printf("LISTENING %d\n", port);
  std::fflush(stdout);

  // Gauges that are sampled rather than pushed.
  std::mutex poll_mu;
  std::condition_variable poll_cv;
  bool stop_poll = false;
  std::thread poller([&] {
    ServerMetrics& m = metrics->metrics();
    std::unique_lock<std::mutex> lock(poll_mu);
    while (!stop_poll) {
      auto all = store->ListFamilyVersions("");
      if (all.ok()) {
        std::map<std::string, int64_t> latest;
        for (const auto& v : *all) latest[v.family] = v.adapter_parameters;
        for (const auto& [family, params] : latest) {
          m.adapter_parameters.Add({{"family", family}}).Set(static_cast<double>(params));
        }
      }
#ifdef METATT_HAVE_RUNTIME
      m.tasks_resident.Set(static_cast<double>(runtime->ResidentTasks()));
      m.device_memory_bytes.Set(static_cast<double>(runtime->DeviceMemoryBytes()));
      m.queue_depth.Set(static_cast<double>(runtime->QueueDepth()));
#endif
      poll_cv.wait_for(lock, std::chrono::seconds(2), [&] { return stop_poll; });
    }
  });

  int sig = 0;
  sigwait(&signals, &sig);
  Log(absl::StrCat("signal ", sig, ": shutting down"));
  jobs->Shutdown();  // ends event streams; a running job is recovered at the next start
  server->Shutdown(std::chrono::system_clock::now() +
                   std::chrono::milliseconds(absl::GetFlag(FLAGS_shutdown_grace_ms)));
  {
    std::lock_guard<std::mutex> lock(poll_mu);
    stop_poll = true;
  }
  poll_cv.notify_all();
  poller.join();
#ifdef METATT_HAVE_RUNTIME
  runtime->Shutdown();
#endif
  jobs.reset();
#ifdef METATT_HAVE_RUNTIME
  runtime.reset();
#endif
  Log("stopped");
  return 0;
}

}  // namespace
}  // namespace metatt

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("MetaTT fine-tuning and inference server (gRPC metatt.v1)");
  absl::ParseCommandLine(argc, argv);
  return metatt::Run();
}
