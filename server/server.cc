#include "server/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "server/jobs/adapter_catalog.h"
#include "server/jobs/dataset_manager.h"
#include "server/jobs/dataset_spec_json.h"
#include "server/jobs/job_manager.h"
#include "server/monitoring/server_metrics.h"
#include "server/service/services.h"
#include "server/store/postgres_store.h"
#include "server/store/sqlite_store.h"

namespace metatt {
namespace {

void Log(const std::string& msg) {
  std::fprintf(stderr, "[metatt-server] %s\n", msg.c_str());
  std::fflush(stderr);
}

// Shared store: a job claimed here may extend a family another replica
// published since the last registry poll, so the registry catches up first.
class RefreshingExecutor : public JobExecutor {
 public:
  RefreshingExecutor(Runtime* runtime) : runtime_(runtime) {}
  absl::Status Start(const JobRecord& job, EmitFn emit) override {
    auto changed = runtime_->RefreshFamilies();
    if (!changed.ok()) Log(absl::StrCat("registry refresh: ", changed.status().ToString()));
    return runtime_->job_executor()->Start(job, std::move(emit));
  }
  void Cancel(const std::string& job_id) override { runtime_->job_executor()->Cancel(job_id); }
  bool CanResume(const JobRecord& job) override {
    return runtime_->job_executor()->CanResume(job);
  }

 private:
  Runtime* runtime_;
};

absl::StatusOr<std::unique_ptr<Store>> OpenStore(const std::string& store_flag,
                                                 const std::string& data_dir) {
  if (store_flag == "sqlite") {
    auto s = SqliteStore::Create((std::filesystem::path(data_dir) / "metatt.db").string());
    if (!s.ok()) return s.status();
    return std::unique_ptr<Store>(std::move(*s));
  }
  if (PostgresStore::IsPostgresUri(store_flag)) {
    auto s = PostgresStore::Create(store_flag);
    if (!s.ok()) return absl::Status(s.status().code(), absl::StrCat("--store: ", s.status().message()));
    return std::unique_ptr<Store>(std::move(*s));
  }
  return absl::InvalidArgumentError(
      absl::StrCat("--store: '", store_flag, "' is neither sqlite nor a postgresql:// URI"));
}

}  // namespace

Server::Server(Options options) : options_(std::move(options)) {}

Server::~Server() {
  if (initialized_) Shutdown("server destroyed");
}

absl::StatusOr<std::unique_ptr<Server>> Server::Create(const Options& options) {
  std::unique_ptr<Server> server(new Server(options));
  absl::Status st = server->Init();
  if (!st.ok()) return st;
  return server;
}

absl::Status Server::Init() {
  const Options& o = options_;
  std::error_code ec;
  std::filesystem::create_directories(o.data_dir, ec);
  if (ec) {
    return absl::InvalidArgumentError(
        absl::StrCat("--data_dir: cannot create ", o.data_dir, ": ", ec.message()));
  }
  shared_store_ = PostgresStore::IsPostgresUri(o.store);
  auto store = OpenStore(o.store, o.data_dir);
  if (!store.ok()) return store.status();
  store_ = std::move(*store);
  if (shared_store_ && options_.replica_id.empty()) {
    char host[256] = {0};
    gethostname(host, sizeof(host) - 1);
    options_.replica_id = absl::StrCat(host, "-", getpid());
  }
  if (shared_store_) Log(absl::StrCat("PostgreSQL store, replica ", o.replica_id));

  metrics_ = MetricsRegistry::Create();
  metrics_->metrics().SetTaskLabelLimit(o.metrics_task_labels);

  RuntimeOptions ro = o.runtime;
  ro.data_dir = o.data_dir;
  if (ro.base_only_inference) {
    Log("warning: --inference_base_only: predictions skip the adapter (benchmark baseline)");
  }
  auto rt = Runtime::Create(ro, store_.get());
  if (!rt.ok()) {
    return absl::Status(rt.status().code(),
                        absl::StrCat("cannot start the runtime: ", rt.status().message()));
  }
  runtime_ = std::move(*rt);
  for (const auto& w : runtime_->load_warnings()) Log(absl::StrCat("warning: ", w));
  Log(absl::StrCat("device ", runtime_->device(), ", base model ",
                   runtime_->base_model_fingerprint()));
  JobExecutor* executor = runtime_->job_executor();
  if (shared_store_) {
    refreshing_executor_ = std::make_unique<RefreshingExecutor>(runtime_.get());
    executor = refreshing_executor_.get();
  }
  // Pushed per device batch; the state gauges are read at scrape time.
  ServerMetrics* sm = &metrics_->metrics();
  runtime_->SetBatchObserver([sm](const BatchStats& b) {
    sm->batch_size.Observe(static_cast<double>(b.batch_size));
    sm->batch_tasks.Observe(static_cast<double>(b.distinct_tasks));
  });
  Runtime* runtime = runtime_.get();
  metrics_->AddCollectable(std::make_shared<SampledGauges>(store_.get(), [runtime] {
    RuntimeGauges g;
    g.queue_depth = runtime->QueueDepth();
    g.tasks_resident = runtime->ResidentTasks();
    g.device_memory_bytes = runtime->DeviceMemoryBytes();
    return g;
  }));

  // Tenants: tokens file -> callers and quotas; without one every call is
  // the local "default" tenant (the default quotas still apply to it).
  if (!o.auth_tokens.empty()) {
    auto cfg = TenantConfig::Load(o.auth_tokens, o.default_quotas);
    if (!cfg.ok()) return absl::Status(cfg.status().code(), absl::StrCat("--auth_tokens: ", cfg.status().message()));
    tenants_ = std::make_unique<TenantConfig>(*std::move(cfg));
  }
  const TenantConfig* tenants = tenants_.get();
  const TenantQuotas default_quotas = o.default_quotas;
  QuotaFn quotas = [tenants, default_quotas](const std::string& tenant) {
    return tenants != nullptr ? tenants->QuotasFor(tenant) : default_quotas;
  };
  authenticator_ = std::make_unique<Authenticator>(tenants);
  family_access_ = std::make_unique<FamilyAccess>(store_.get(), quotas);

  DatasetManagerOptions dopt;
  dopt.quotas = quotas;
  dopt.data_dir = o.data_dir;
  dopt.max_upload_bytes = o.max_upload_bytes;
  dopt.parse = ParseUploadedDataset;
  auto datasets = DatasetManager::Create(dopt, store_.get());
  if (!datasets.ok()) return datasets.status();
  datasets_ = std::move(*datasets);

  JobManagerOptions jopt;
  jopt.max_queued_jobs = o.max_queued_jobs;
  job_metrics_ = std::make_unique<JobMetrics>(&metrics_->metrics());
  jopt.observer = job_metrics_.get();
  jopt.quotas = quotas;
  jopt.max_batch_size = o.max_job_batch_size;
  jopt.max_sequence_length = o.max_sequence_length;
  if (shared_store_) {
    jopt.replica_id = options_.replica_id;
    jopt.lease_ms = o.job_lease_ms;
    jopt.poll_ms = o.job_poll_ms;
  }
  auto jobs = JobManager::Create(jopt, store_.get(), executor);
  if (!jobs.ok()) return jobs.status();
  jobs_ = std::move(*jobs);

  job_service_ = std::make_unique<JobServiceImpl>(jobs_.get());
  dataset_service_ = std::make_unique<DatasetServiceImpl>(datasets_.get());
  AdapterServiceOptions aopt;
  aopt.store = store_.get();
  aopt.catalog = runtime_->catalog();
  aopt.families = family_access_.get();
  adapter_service_ = std::make_unique<AdapterServiceImpl>(aopt);
  InferenceServiceOptions iopt;
  iopt.predictor = runtime_->predictor();
  iopt.metrics = &metrics_->metrics();
  iopt.families = family_access_.get();
  iopt.max_inputs = o.max_predict_inputs;
  inference_service_ = std::make_unique<InferenceServiceImpl>(iopt);
  initialized_ = true;
  return absl::OkStatus();
}

absl::Status Server::Start() {
  if (started_) return absl::FailedPreconditionError("Server::Start: already started");
  const Options& o = options_;
  auto creds = MakeServerCredentials(o.tls);
  if (!creds.ok()) return creds.status();
  if (!o.metrics_listen.empty()) {
    auto port = metrics_->Serve(o.metrics_listen);
    if (port.ok()) {
      metrics_port_ = *port;
    } else {
      // Serving RPCs matters more than /metrics: keep going without it.
      Log(absl::StrCat("warning: metrics disabled: ", port.status().ToString()));
    }
  }

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(o.listen, *creds, &port_);
  builder.SetMaxReceiveMessageSize(static_cast<int>(o.max_request_bytes));
  InstallAuthentication(&builder, authenticator_.get());
  builder.RegisterService(job_service_.get());
  builder.RegisterService(dataset_service_.get());
  builder.RegisterService(adapter_service_.get());
  builder.RegisterService(inference_service_.get());
  grpc_server_ = builder.BuildAndStart();
  if (!grpc_server_ || port_ == 0) {
    return absl::UnavailableError(absl::StrCat("--listen: cannot listen on ", o.listen));
  }
  started_ = true;
  const bool tls = !o.tls.cert.empty();
  const bool mtls = !o.tls.client_ca.empty();
  Log(absl::StrCat("serving metatt.v1 on ", o.listen, " (port ", port_, "): ",
                   tls ? (mtls ? "TLS with client certificates (mTLS)" : "TLS") : "plaintext",
                   ", ",
                   tenants_ ? absl::StrCat("bearer tokens (", tenants_->num_tokens(), " from ",
                                           o.auth_tokens, ")")
                            : "no authentication"));
  if (!tls || !tenants_) {
    Log(absl::StrCat("WARNING: ", !tls ? "plaintext" : "", !tls && !tenants_ ? " and " : "",
                     !tenants_ ? "no authentication (every caller is tenant 'default' and sees "
                                 "everything)"
                               : "",
                     " -- the local default; do not expose this port beyond localhost (see "
                     "--tls_cert, --auth_tokens)"));
  }
  if (metrics_port_ > 0) Log(absl::StrCat("metrics on http://", o.metrics_listen, "/metrics"));

  // Families other replicas publish (shared store): loaded and swapped in.
  int64_t poll_ms = o.registry_poll_ms;
  if (poll_ms < 0) poll_ms = shared_store_ ? 1000 : 0;
  if (poll_ms > 0) {
    refresher_ = std::thread([this, poll_ms] {
      std::unique_lock<std::mutex> lock(mu_);
      while (true) {
        cv_.wait_for(lock, std::chrono::milliseconds(poll_ms), [this] { return stopping_; });
        if (stopping_) break;
        lock.unlock();
        auto changed = runtime_->RefreshFamilies();
        if (!changed.ok()) {
          Log(absl::StrCat("registry refresh: ", changed.status().ToString()));
        } else {
          for (const auto& c : *changed) Log(absl::StrCat("registry refresh: ", c));
        }
        lock.lock();
      }
    });
  }
  return absl::OkStatus();
}

void Server::Shutdown(absl::string_view cause) {
  std::unique_lock<std::mutex> lock(mu_);
  if (stopping_) {
    // Another caller is shutting down (or did): wait for it to finish.
    cv_.wait(lock, [this] { return stopped_; });
    return;
  }
  stopping_ = true;
  lock.unlock();
  cv_.notify_all();
  Log(absl::StrCat(cause, ": shutting down"));
  // Graceful order: no new job starts and event streams end; then the gRPC
  // server stops accepting and in-flight RPCs (Predicts in a device batch)
  // get up to shutdown_grace_ms to finish; then the device loop stops the
  // training job between two steps (a step that publishes completes), and the
  // job, which has no resumable checkpoint, ends FAILED with the reason.
  jobs_->Shutdown();
  if (grpc_server_) {
    grpc_server_->Shutdown(std::chrono::system_clock::now() +
                           std::chrono::milliseconds(options_.shutdown_grace_ms));
  }
  if (refresher_.joinable()) refresher_.join();
  runtime_->Shutdown();
  if (auto id = jobs_->FailRunning(absl::StrCat(
          "server shut down (", cause,
          ") while the job was running; no resumable checkpoint: submit it again"))) {
    Log(absl::StrCat("job ", *id, " stopped by the shutdown: FAILED"));
  }
  Log("stopped");
  lock.lock();
  stopped_ = true;
  lock.unlock();
  cv_.notify_all();
}

void Server::Wait() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [this] { return stopped_; });
}

std::string Server::target() const { return absl::StrCat("127.0.0.1:", port_); }

}  // namespace metatt
