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
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <filesystem>
#include <functional>
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
#include "server/jobs/dataset_spec_json.h"
#include "server/jobs/job_manager.h"
#include "server/jobs/tenants.h"
#include "server/monitoring/server_metrics.h"
#include "server/runtime/runtime.h"
#include "server/service/auth.h"
#include "server/service/services.h"
#include "server/store/postgres_store.h"
#include "server/store/sqlite_store.h"

ABSL_FLAG(std::string, listen, "127.0.0.1:50051",
          "gRPC address host:port (port 0 picks a free port). Plaintext without tokens unless "
          "--tls_cert/--tls_key and --auth_tokens are given: keep a plaintext server on localhost");
ABSL_FLAG(std::string, metrics_listen, "127.0.0.1:9090",
          "Prometheus /metrics address host:port (port 0 picks a free port; empty = off)");
ABSL_FLAG(std::string, data_dir, "./data", "SQLite database, datasets and adapter families");
ABSL_FLAG(std::string, store, "sqlite",
          "sqlite (embedded, <data_dir>/metatt.db, one process) or a postgresql://user@host:port/db "
          "URI: several replicas on one database, sharing --data_dir (README: Scale-out)");
ABSL_FLAG(std::string, replica_id, "",
          "this replica's name in job claims (PostgreSQL store; default <hostname>-<pid>)");
ABSL_FLAG(int64_t, job_lease_ms, 10000,
          "PostgreSQL store: a job whose replica has not renewed its claim for this long is "
          "taken over by another replica (failed with the reason, or re-queued if resumable)");
ABSL_FLAG(int64_t, job_poll_ms, 250,
          "PostgreSQL store: how often a replica renews its lease, looks for queued or "
          "orphaned jobs and reads event streams of jobs held elsewhere");
ABSL_FLAG(int64_t, registry_poll_ms, -1,
          "how often to load adapter families other replicas published (-1 = 1000 with the "
          "PostgreSQL store, off with SQLite; 0 = off)");
ABSL_FLAG(std::string, model_dir, "",
          "base model directory (default: $METATT_MODEL_DIR, else <repo>/models/all-MiniLM-L6-v2)");
ABSL_FLAG(std::string, device, "auto", "auto | cpu | cuda | cuda:N");
ABSL_FLAG(int64_t, max_queued_jobs, 16, "CreateJob fails RESOURCE_EXHAUSTED beyond this");
ABSL_FLAG(int64_t, max_upload_bytes, 256ll << 20, "largest dataset upload");
ABSL_FLAG(int64_t, max_batch_size, 32, "rows per device inference batch");
ABSL_FLAG(int64_t, batch_timeout_ms, 2, "dynamic batching window");
ABSL_FLAG(int64_t, max_queue, 1024,
          "queued inference rows; Predict fails RESOURCE_EXHAUSTED beyond this");
ABSL_FLAG(bool, inference_base_only, false,
          "benchmark baseline only: Predict runs the base encoder and the task heads WITHOUT "
          "the adapter (answers are not the trained model's)");
ABSL_FLAG(std::string, head_dtype, "float32",
          "float32 | float16 | bfloat16: dtype of the resident task heads (half the memory in "
          "16 bits; a batch's rows are upcast to float32; published files stay float32)");
ABSL_FLAG(int64_t, metrics_task_labels, 16,
          "distinct tasks that get their own label in metatt_predict_inputs_total (the first "
          "ones requested); later tasks count under task=\"other\"");
ABSL_FLAG(int64_t, num_threads, 0, "torch intra-op threads (0 = torch default)");
ABSL_FLAG(int64_t, shutdown_grace_ms, 5000, "time RPCs get to finish on SIGTERM/SIGINT");
// Security (README "Security").
ABSL_FLAG(std::string, auth_tokens, "",
          "tokens file (JSON: tenant, role, token_sha256 per token; per-tenant quotas); every RPC "
          "then needs 'authorization: Bearer <token>'. Empty = no authentication");
ABSL_FLAG(std::string, tls_cert, "", "PEM server certificate chain (TLS on the gRPC port)");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert");
ABSL_FLAG(std::string, tls_client_ca, "",
          "PEM CA bundle: require and verify client certificates signed by it (mutual TLS)");
ABSL_FLAG(int64_t, quota_max_concurrent_jobs, 0,
          "default per-tenant quota: unfinished jobs (queued + running); 0 = no limit");
ABSL_FLAG(int64_t, quota_max_queued_jobs, 0, "default per-tenant quota: queued jobs; 0 = no limit");
ABSL_FLAG(int64_t, quota_max_dataset_bytes, 0,
          "default per-tenant quota: bytes of all the tenant's datasets; 0 = no limit");
ABSL_FLAG(int64_t, quota_max_tasks, 0,
          "default per-tenant quota: tasks in the tenant's families; 0 = no limit");
ABSL_FLAG(int64_t, max_request_bytes, 64 << 20, "largest gRPC message the server accepts");
ABSL_FLAG(int64_t, max_predict_inputs, 1024, "most inputs in one Predict request");
ABSL_FLAG(int64_t, max_job_batch_size, 4096, "largest hparams.batch_size a job may ask for");
ABSL_FLAG(int64_t, max_sequence_length, 4096, "largest hparams.max_length a job may ask for");

namespace metatt {
namespace {

void Log(const std::string& msg) {
  std::fprintf(stderr, "[metatt-server] %s\n", msg.c_str());
  std::fflush(stderr);
}

// Used when this build has no device runtime: jobs fail with a clear reason.
// Shared store: a job claimed here may extend a family another replica
// published since the last registry poll, so the registry catches up first.
class RefreshingExecutor : public JobExecutor {
 public:
  RefreshingExecutor(JobExecutor* inner, std::function<void()> refresh)
      : inner_(inner), refresh_(std::move(refresh)) {}
  absl::Status Start(const JobRecord& job, EmitFn emit) override {
    refresh_();
    return inner_->Start(job, std::move(emit));
  }
  void Cancel(const std::string& job_id) override { inner_->Cancel(job_id); }
  bool CanResume(const JobRecord& job) override { return inner_->CanResume(job); }

 private:
  JobExecutor* inner_;
  std::function<void()> refresh_;
};


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
  const std::string store_flag = absl::GetFlag(FLAGS_store);
  const bool shared_store = PostgresStore::IsPostgresUri(store_flag);
  std::unique_ptr<Store> store;
  if (store_flag == "sqlite") {
    auto s = SqliteStore::Create((std::filesystem::path(data_dir) / "metatt.db").string());
    if (!s.ok()) {
      Log(s.status().ToString());
      return 1;
    }
    store = std::move(*s);
  } else if (shared_store) {
    auto s = PostgresStore::Create(store_flag);
    if (!s.ok()) {
      Log(absl::StrCat("--store: ", s.status().ToString()));
      return 1;
    }
    store = std::move(*s);
  } else {
    Log(absl::StrCat("--store: '", store_flag, "' is neither sqlite nor a postgresql:// URI"));
    return 1;
  }
  std::string replica_id = absl::GetFlag(FLAGS_replica_id);
  if (shared_store && replica_id.empty()) {
    char host[256] = {0};
    gethostname(host, sizeof(host) - 1);
    replica_id = absl::StrCat(host, "-", getpid());
  }
  if (shared_store) Log(absl::StrCat("PostgreSQL store, replica ", replica_id));

  std::unique_ptr<MetricsRegistry> metrics = MetricsRegistry::Create();
  metrics->metrics().SetTaskLabelLimit(absl::GetFlag(FLAGS_metrics_task_labels));
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

  RuntimeOptions ro;
  ro.model_dir = absl::GetFlag(FLAGS_model_dir);
  ro.device = absl::GetFlag(FLAGS_device);
  ro.data_dir = data_dir;
  ro.max_batch_size = absl::GetFlag(FLAGS_max_batch_size);
  ro.batch_timeout_ms = absl::GetFlag(FLAGS_batch_timeout_ms);
  ro.num_threads = absl::GetFlag(FLAGS_num_threads);
  ro.max_queue = absl::GetFlag(FLAGS_max_queue);
  ro.base_only_inference = absl::GetFlag(FLAGS_inference_base_only);
  ro.head_dtype = absl::GetFlag(FLAGS_head_dtype);
  if (ro.base_only_inference) {
    Log("warning: --inference_base_only: predictions skip the adapter (benchmark baseline)");
  }
  auto rt_or = Runtime::Create(ro, store.get());
  if (!rt_or.ok()) {
    Log(absl::StrCat("cannot start the runtime: ", rt_or.status().ToString()));
    return 1;
  }
  std::unique_ptr<Runtime> runtime = std::move(*rt_or);
  for (const auto& w : runtime->load_warnings()) Log(absl::StrCat("warning: ", w));
  Log(absl::StrCat("device ", runtime->device(), ", base model ",
                   runtime->base_model_fingerprint()));
  JobExecutor* executor = runtime->job_executor();
  std::unique_ptr<RefreshingExecutor> refreshing;
  if (shared_store) {
    Runtime* rt = runtime.get();
    refreshing = std::make_unique<RefreshingExecutor>(executor, [rt] {
      auto changed = rt->RefreshFamilies();
      if (!changed.ok()) Log(absl::StrCat("registry refresh: ", changed.status().ToString()));
    });
    executor = refreshing.get();
  }
  Predictor* predictor = runtime->predictor();
  AdapterCatalog* catalog = dynamic_cast<AdapterCatalog*>(runtime.get());
  ServerMetrics* sm = &metrics->metrics();
  runtime->SetBatchObserver([sm](const BatchStats& b) {
    sm->batch_size.Observe(static_cast<double>(b.batch_size));
    sm->batch_tasks.Observe(static_cast<double>(b.distinct_tasks));
    sm->queue_depth.Set(static_cast<double>(b.queue_depth));
  });

  // Tenants: tokens file -> callers and quotas; without one every call is
  // the local "default" tenant (flag quotas still apply to it).
  TenantQuotas default_quotas;
  default_quotas.max_concurrent_jobs = absl::GetFlag(FLAGS_quota_max_concurrent_jobs);
  default_quotas.max_queued_jobs = absl::GetFlag(FLAGS_quota_max_queued_jobs);
  default_quotas.max_dataset_bytes = absl::GetFlag(FLAGS_quota_max_dataset_bytes);
  default_quotas.max_tasks = absl::GetFlag(FLAGS_quota_max_tasks);
  std::unique_ptr<TenantConfig> tenants;
  if (!absl::GetFlag(FLAGS_auth_tokens).empty()) {
    auto cfg = TenantConfig::Load(absl::GetFlag(FLAGS_auth_tokens), default_quotas);
    if (!cfg.ok()) {
      Log(absl::StrCat("--auth_tokens: ", cfg.status().ToString()));
      return 1;
    }
    tenants = std::make_unique<TenantConfig>(*std::move(cfg));
  }
  QuotaFn quotas = [&tenants, default_quotas](const std::string& tenant) {
    return tenants ? tenants->QuotasFor(tenant) : default_quotas;
  };
  Authenticator authenticator(tenants.get());
  FamilyAccess family_access(store.get(), quotas);
  auto creds = MakeServerCredentials({absl::GetFlag(FLAGS_tls_cert), absl::GetFlag(FLAGS_tls_key),
                                      absl::GetFlag(FLAGS_tls_client_ca)});
  if (!creds.ok()) {
    Log(creds.status().ToString());
    return 1;
  }

  DatasetManagerOptions dopt;
  dopt.quotas = quotas;
  dopt.data_dir = data_dir;
  dopt.max_upload_bytes = absl::GetFlag(FLAGS_max_upload_bytes);
  dopt.parse = ParseUploadedDataset;
  auto datasets_or = DatasetManager::Create(dopt, store.get());
  if (!datasets_or.ok()) {
    Log(datasets_or.status().ToString());
    return 1;
  }
  std::unique_ptr<DatasetManager> datasets = std::move(*datasets_or);

  JobManagerOptions jopt;
  jopt.max_queued_jobs = absl::GetFlag(FLAGS_max_queued_jobs);
  JobMetrics job_metrics(&metrics->metrics());
  jopt.observer = &job_metrics;
  jopt.quotas = quotas;
  jopt.max_batch_size = absl::GetFlag(FLAGS_max_job_batch_size);
  jopt.max_sequence_length = absl::GetFlag(FLAGS_max_sequence_length);
  if (shared_store) {
    jopt.replica_id = replica_id;
    jopt.lease_ms = absl::GetFlag(FLAGS_job_lease_ms);
    jopt.poll_ms = absl::GetFlag(FLAGS_job_poll_ms);
  }
  auto jobs_or = JobManager::Create(jopt, store.get(), executor);
  if (!jobs_or.ok()) {
    Log(jobs_or.status().ToString());
    return 1;
  }
  std::unique_ptr<JobManager> jobs = std::move(*jobs_or);

  JobServiceImpl job_service(jobs.get(), &authenticator);
  DatasetServiceImpl dataset_service(datasets.get(), &authenticator);
  AdapterServiceOptions aopt;
  aopt.store = store.get();
  aopt.catalog = catalog;
  aopt.auth = &authenticator;
  aopt.families = &family_access;
  AdapterServiceImpl adapter_service(aopt);
  InferenceServiceOptions iopt;
  iopt.predictor = predictor;
  iopt.metrics = &metrics->metrics();
  iopt.auth = &authenticator;
  iopt.families = &family_access;
  iopt.max_inputs = absl::GetFlag(FLAGS_max_predict_inputs);
  InferenceServiceImpl inference_service(iopt);

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  const std::string listen = absl::GetFlag(FLAGS_listen);
  builder.AddListeningPort(listen, *creds, &port);
  builder.SetMaxReceiveMessageSize(static_cast<int>(absl::GetFlag(FLAGS_max_request_bytes)));
  builder.RegisterService(&job_service);
  builder.RegisterService(&dataset_service);
  builder.RegisterService(&adapter_service);
  builder.RegisterService(&inference_service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) {
    Log(absl::StrCat("--listen: cannot listen on ", listen));
    return 1;
  }
  const bool tls = !absl::GetFlag(FLAGS_tls_cert).empty();
  const bool mtls = !absl::GetFlag(FLAGS_tls_client_ca).empty();
  Log(absl::StrCat("serving metatt.v1 on ", listen, " (port ", port, "): ",
                   tls ? (mtls ? "TLS with client certificates (mTLS)" : "TLS") : "plaintext",
                   ", ",
                   tenants ? absl::StrCat("bearer tokens (", tenants->num_tokens(), " from ",
                                          absl::GetFlag(FLAGS_auth_tokens), ")")
                           : "no authentication"));
  if (!tls || !tenants) {
    Log(absl::StrCat("WARNING: ", !tls ? "plaintext" : "", !tls && !tenants ? " and " : "",
                     !tenants ? "no authentication (every caller is tenant 'default' and sees "
                                "everything)"
                              : "",
                     " -- the local default; do not expose this port beyond localhost (see "
                     "--tls_cert, --auth_tokens)"));
  }
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
      auto all = store->ListFamilyVersionSummaries("");
      if (all.ok()) {
        std::map<std::string, int64_t> latest;
        for (const auto& v : *all) latest[v.family] = v.adapter_parameters;
        for (const auto& [family, params] : latest) {
          m.adapter_parameters.Add({{"family", family}}).Set(static_cast<double>(params));
        }
      }
      m.tasks_resident.Set(static_cast<double>(runtime->ResidentTasks()));
      m.device_memory_bytes.Set(static_cast<double>(runtime->DeviceMemoryBytes()));
      m.queue_depth.Set(static_cast<double>(runtime->QueueDepth()));
      poll_cv.wait_for(lock, std::chrono::seconds(2), [&] { return stop_poll; });
    }
  });
  // Families other replicas publish (shared store): loaded and swapped in.
  int64_t registry_poll_ms = absl::GetFlag(FLAGS_registry_poll_ms);
  if (registry_poll_ms < 0) registry_poll_ms = shared_store ? 1000 : 0;
  std::thread refresher([&] {
    std::unique_lock<std::mutex> lock(poll_mu);
    while (registry_poll_ms > 0 && !stop_poll) {
      poll_cv.wait_for(lock, std::chrono::milliseconds(registry_poll_ms),
                       [&] { return stop_poll; });
      if (stop_poll) break;
      lock.unlock();
      auto changed = runtime->RefreshFamilies();
      if (!changed.ok()) {
        Log(absl::StrCat("registry refresh: ", changed.status().ToString()));
      } else {
        for (const auto& c : *changed) Log(absl::StrCat("registry refresh: ", c));
      }
      lock.lock();
    }
  });

  int sig = 0;
  sigwait(&signals, &sig);
  Log(absl::StrCat("signal ", sig, ": shutting down"));
  // Graceful order: no new job starts and event streams end; then the gRPC
  // server stops accepting and in-flight RPCs (Predicts in a device batch)
  // get up to --shutdown_grace_ms to finish; then the device loop stops the
  // training job between two steps (a step that publishes completes), and the
  // job, which has no resumable checkpoint, ends FAILED with the reason.
  jobs->Shutdown();
  server->Shutdown(std::chrono::system_clock::now() +
                   std::chrono::milliseconds(absl::GetFlag(FLAGS_shutdown_grace_ms)));
  {
    std::lock_guard<std::mutex> lock(poll_mu);
    stop_poll = true;
  }
  poll_cv.notify_all();
  poller.join();
  refresher.join();
  runtime->Shutdown();
  if (auto id = jobs->FailRunning(absl::StrCat(
          "server shut down (signal ", sig,
          ") while the job was running; no resumable checkpoint: submit it again"))) {
    Log(absl::StrCat("job ", *id, " stopped by the shutdown: FAILED"));
  }
  jobs.reset();
  runtime.reset();
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
