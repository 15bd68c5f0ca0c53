#include "server/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <arpa/inet.h>
#include <fcntl.h>
#include <sys/file.h>
#include <grpcpp/health_check_service_interface.h>
#include <prometheus/exposer.h>
#include <unistd.h>

#include <cerrno>
#include <algorithm>
#include <chrono>
#include <climits>
#include <cstring>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
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
  absl::StatusOr<std::vector<JobCheckpointInfo>> ListCheckpoints(
      const std::string& job_id) override {
    return runtime_->job_executor()->ListCheckpoints(job_id);
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

// The host part of "host:port", "[v6]:port" or "unix:path" ("unix" for the
// last: a local socket).
std::string HostOf(const std::string& listen) {
  if (absl::StartsWith(listen, "unix:") || absl::StartsWith(listen, "unix-abstract:")) return "unix";
  if (absl::StartsWith(listen, "[")) {
    size_t close = listen.find(']');
    return close == std::string::npos ? listen : listen.substr(1, close - 1);
  }
  size_t colon = listen.rfind(':');
  return colon == std::string::npos ? listen : listen.substr(0, colon);
}

// True when `listen` can only be reached from this machine: 127.0.0.0/8,
// ::1, "localhost" or a unix socket. "0.0.0.0", "[::]", "" and every other
// host or address are reachable from the network.
bool IsLoopbackListen(const std::string& listen) {
  const std::string host = absl::AsciiStrToLower(HostOf(listen));
  if (host == "unix" || host == "localhost") return true;
  in_addr v4{};
  if (inet_pton(AF_INET, host.c_str(), &v4) == 1) {
    return (ntohl(v4.s_addr) >> 24) == 127;
  }
  in6_addr v6{};
  if (inet_pton(AF_INET6, host.c_str(), &v6) == 1) return IN6_IS_ADDR_LOOPBACK(&v6);
  return false;
}

// The exposure rules of README "Security", checked before anything opens.
// Returns the warnings to log when --insecure_allow_open_network let an open
// listener through.
absl::StatusOr<std::vector<std::string>> CheckExposure(const Server::Options& o) {
  std::vector<std::string> warnings;
  const bool tls = !o.tls.cert.empty();
  const bool tokens = !o.auth_tokens.empty();
  if (!IsLoopbackListen(o.listen)) {
    if (tokens && !tls) {
      return absl::FailedPreconditionError(absl::StrCat(
          "--listen=", o.listen, " is not a loopback address and --auth_tokens is set without "
          "TLS: bearer tokens would cross the network in plaintext. Add --tls_cert/--tls_key "
          "(scripts/make_secrets.sh makes a CA, a server certificate and a token), or listen on "
          "127.0.0.1. --insecure_allow_open_network does not lift this rule"));
    }
    if (!tls || !tokens) {
      std::string missing = !tls && !tokens ? "neither TLS (--tls_cert/--tls_key) nor tokens "
                                              "(--auth_tokens)"
                            : !tls          ? "no TLS (--tls_cert/--tls_key)"
                                            : "no tokens (--auth_tokens): every caller would be "
                                              "the admin tenant 'default'";
      if (!o.insecure_allow_open_network) {
        return absl::FailedPreconditionError(absl::StrCat(
            "--listen=", o.listen, " is not a loopback address and the server has ", missing,
            ". Refusing to serve the network openly: add TLS and tokens (scripts/make_secrets.sh "
            "makes them; README \"Security\"), listen on 127.0.0.1, or pass "
            "--insecure_allow_open_network to accept the risk"));
      }
      warnings.push_back(absl::StrCat("WARNING: --insecure_allow_open_network: --listen=",
                                      o.listen, " is reachable from the network with ", missing,
                                      ". ANYONE WHO CAN REACH THIS PORT CONTROLS THE SERVER"));
    }
  }
  if (!o.metrics_listen.empty() && !IsLoopbackListen(o.metrics_listen) &&
      o.metrics_password_file.empty()) {
    if (!o.insecure_allow_open_network) {
      return absl::FailedPreconditionError(absl::StrCat(
          "--metrics_listen=", o.metrics_listen, " is not a loopback address and /metrics has no "
          "authentication (it names every tenant's families): add --metrics_password_file "
          "(HTTP basic authentication, user --metrics_user), bind it to 127.0.0.1, or pass "
          "--insecure_allow_open_network"));
    }
    warnings.push_back(absl::StrCat("WARNING: --insecure_allow_open_network: /metrics on ",
                                    o.metrics_listen,
                                    " is readable by anyone on the network without a password"));
  }
  return warnings;
}

// Constant-time string comparison (the length is not secret).
bool SameSecret(const std::string& a, const std::string& b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

absl::StatusOr<std::string> ReadMetricsPassword(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::InvalidArgumentError(absl::StrCat("--metrics_password_file: cannot read ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  std::string password(absl::StripAsciiWhitespace(ss.str()));
  if (password.size() < 16) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--metrics_password_file: ", path, " holds ", password.size(),
        " characters; at least 16 are needed (openssl rand -hex 24)"));
  }
  return password;
}

}  // namespace

// The SQLite store is one process's: a second server on the same data
// directory would run the same queued jobs and publish over the first one's
// versions. An exclusive flock on <data_dir>/LOCK (released by the kernel
// when the process dies, kill -9 included) keeps it out; the file holds the
// holder's pid for the message.
class DataDirLock {
 public:
  static absl::StatusOr<std::unique_ptr<DataDirLock>> Acquire(const std::string& data_dir) {
    const std::string path = (std::filesystem::path(data_dir) / "LOCK").string();
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("--data_dir=", data_dir, ": cannot open the lock file ", path, ": ",
                       std::strerror(errno)));
    }
    if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
      const int err = errno;
      char buf[32] = {0};
      ssize_t n = ::pread(fd, buf, sizeof(buf) - 1, 0);
      ::close(fd);
      std::string holder(n > 0 ? std::string(absl::StripAsciiWhitespace(buf)) : "unknown");
      if (err == EWOULDBLOCK) {
        return absl::FailedPreconditionError(absl::StrCat(
            "--data_dir=", data_dir, " is in use by another metatt-server (pid ", holder,
            ", lock ", path, "): two servers on one SQLite data directory would run the same "
            "jobs and overwrite each other's versions. Stop it, or give this one another "
            "--data_dir (several replicas share one only with --store=postgresql://...)"));
      }
      return absl::FailedPreconditionError(absl::StrCat("--data_dir=", data_dir,
                                                        ": cannot lock ", path, ": ",
                                                        std::strerror(err)));
    }
    const std::string pid = absl::StrCat(getpid(), "\n");
    if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, pid.data(), pid.size(), 0) < 0) {
      Log(absl::StrCat("warning: cannot write the pid into ", path, ": ", std::strerror(errno)));
    }
    return std::unique_ptr<DataDirLock>(new DataDirLock(fd));
  }
  ~DataDirLock() { ::close(fd_); }  // releases the flock

 private:
  explicit DataDirLock(int fd) : fd_(fd) {}
  int fd_;
};

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
  auto exposure = CheckExposure(o);
  if (!exposure.ok()) return exposure.status();
  for (const auto& w : *exposure) Log(w);
  std::error_code ec;
  std::filesystem::create_directories(o.data_dir, ec);
  if (ec) {
    return absl::InvalidArgumentError(
        absl::StrCat("--data_dir: cannot create ", o.data_dir, ": ", ec.message()));
  }
  shared_store_ = PostgresStore::IsPostgresUri(o.store);
  if (!shared_store_) {
    auto lock = DataDirLock::Acquire(o.data_dir);
    if (!lock.ok()) return lock.status();
    data_dir_lock_ = std::move(*lock);
  }
  auto store = OpenStore(o.store, o.data_dir);
  if (!store.ok()) return store.status();
  store_ = std::move(*store);
  if (shared_store_ && options_.replica_id.empty()) {
    char host[256] = {0};
    gethostname(host, sizeof(host) - 1);
    options_.replica_id = absl::StrCat(host, "-", getpid());
  }
  if (shared_store_) Log(absl::StrCat("PostgreSQL store, replica ", o.replica_id));
  {
    std::string mode = o.blob_store;
    if (mode == "auto") mode = shared_store_ ? "postgres" : "data_dir";
    if (mode == "postgres") {
      if (!shared_store_) {
        return absl::InvalidArgumentError(
            "--blob_store=postgres needs a PostgreSQL --store (postgresql://...)");
      }
      blobs_ = static_cast<PostgresStore*>(store_.get())->blob_store();
    } else if (absl::StartsWith(mode, "dir:")) {
      auto local = LocalBlobStore::Create(mode.substr(4));
      if (!local.ok()) {
        return absl::Status(local.status().code(),
                            absl::StrCat("--blob_store: ", local.status().message()));
      }
      owned_blobs_ = std::move(*local);
      blobs_ = owned_blobs_.get();
    } else if (mode != "data_dir") {
      return absl::InvalidArgumentError(absl::StrCat(
          "--blob_store: '", o.blob_store, "' is not auto, postgres, data_dir or dir:<path>"));
    }
    if (blobs_ != nullptr) {
      Log(absl::StrCat("blob store: ", blobs_->Describe(),
                       " (family versions, datasets, checkpoints); --data_dir ", o.data_dir,
                       " is this replica's cache"));
    }
  }

  metrics_ = MetricsRegistry::Create();
  metrics_->metrics().SetTaskLabelLimit(o.metrics_task_labels);

  RuntimeOptions ro = o.runtime;
  ro.data_dir = o.data_dir;
  ro.blobs = blobs_;
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
  Log(absl::StrCat("device ", runtime_->device(), ", base model ", runtime_->model_kind_name(),
                   " ", runtime_->base_model_fingerprint()));
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
  runtime_->SetGenerationObserver([sm](const GenerationStats& g) {
    sm->generated_tokens_total.Increment(static_cast<double>(g.completion_tokens));
    sm->prompt_tokens_total.Increment(static_cast<double>(g.prompt_tokens));
    if (g.time_to_first_token_s >= 0) sm->time_to_first_token_seconds.Observe(g.time_to_first_token_s);
  });
  Runtime* runtime = runtime_.get();
  sampled_gauges_ = std::make_shared<SampledGauges>(store_.get(), [runtime] {
    RuntimeGauges g;
    g.queue_depth = runtime->QueueDepth();
    g.tasks_resident = runtime->ResidentTasks();
    g.device_memory_bytes = runtime->DeviceMemoryBytes();
    return g;
  });
  metrics_->AddCollectable(sampled_gauges_);

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
  family_access_->NoteLoadWarnings(runtime_->load_warnings());  // the API reports them

  DatasetManagerOptions dopt;
  dopt.quotas = quotas;
  dopt.data_dir = o.data_dir;
  dopt.blobs = blobs_;
  dopt.max_upload_bytes = o.max_upload_bytes;
  dopt.parse = ParseUploadedDataset;
  dopt.max_labels_per_task = o.job_limits.max_labels_per_task;
  auto datasets = DatasetManager::Create(dopt, store_.get());
  if (!datasets.ok()) return datasets.status();
  datasets_ = std::move(*datasets);

  JobManagerOptions jopt;
  jopt.max_queued_jobs = o.max_queued_jobs;
  job_metrics_ = std::make_unique<JobMetrics>(&metrics_->metrics());
  jopt.observer = job_metrics_.get();
  jopt.quotas = quotas;
  jopt.limits = o.job_limits;
  jopt.max_event_streams = o.max_event_streams;
  // A dataset in a blob store is checked against its sha256 when a job reads
  // it (ReadDatasetBytes); a local file when the job is created.
  jopt.verify_dataset_files = blobs_ == nullptr;
  if (shared_store_) {
    jopt.replica_id = options_.replica_id;
    jopt.lease_ms = o.job_lease_ms;
    jopt.poll_ms = o.job_poll_ms;
  }
  auto jobs = JobManager::Create(jopt, store_.get(), executor);
  if (!jobs.ok()) return jobs.status();
  jobs_ = std::move(*jobs);

  AdapterServiceOptions aopt;
  aopt.store = store_.get();
  aopt.catalog = runtime_->catalog();
  aopt.families = family_access_.get();
  aopt.max_import_bytes = o.max_import_bytes;
  InferenceServiceOptions iopt;
  iopt.predictor = runtime_->predictor();
  iopt.generator = runtime_->generator();
  iopt.metrics = &metrics_->metrics();
  iopt.families = family_access_.get();
  iopt.max_inputs = o.max_predict_inputs;
  services_ = std::make_unique<Services>(jobs_.get(), datasets_.get(), aopt, iopt);
  initialized_ = true;
  return absl::OkStatus();
}

absl::Status Server::Start() {
  if (started_) return absl::FailedPreconditionError("Server::Start: already started");
  const Options& o = options_;
  auto creds = MakeServerCredentials(o.tls);
  if (!creds.ok()) return creds.status();
  if (!o.metrics_listen.empty() && !o.metrics_password_file.empty()) {
    // /metrics behind HTTP basic authentication: our own exposer over the
    // same registry and sampled gauges. A bad password file stops the start.
    auto password = ReadMetricsPassword(o.metrics_password_file);
    if (!password.ok()) return password.status();
    try {
      metrics_exposer_ = std::make_unique<prometheus::Exposer>(o.metrics_listen);
      metrics_exposer_->RegisterCollectable(metrics_->registry());
      metrics_exposer_->RegisterCollectable(sampled_gauges_);
      metrics_exposer_->RegisterAuth(
          [user = o.metrics_user, pass = *password](const std::string& u, const std::string& p) {
            return SameSecret(u, user) & SameSecret(p, pass);
          },
          "metatt metrics");
      auto ports = metrics_exposer_->GetListeningPorts();
      if (!ports.empty()) metrics_port_ = ports.front();
    } catch (const std::exception& e) {
      Log(absl::StrCat("warning: metrics disabled: --metrics_listen: cannot listen on ",
                       o.metrics_listen, ": ", e.what()));
      metrics_exposer_.reset();
    }
  } else if (!o.metrics_listen.empty()) {
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
  // Connections: bounded streams per connection and RPC threads, keepalive
  // pings that close dead peers, idle and old connections sent GOAWAY.
  auto arg = [&builder](const char* name, int64_t v) {
    if (v > 0) builder.AddChannelArgument(name, static_cast<int>(std::min<int64_t>(v, INT32_MAX)));
  };
  arg(GRPC_ARG_MAX_CONCURRENT_STREAMS, o.max_concurrent_streams);
  arg(GRPC_ARG_KEEPALIVE_TIME_MS, o.keepalive_time_ms);
  arg(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, o.keepalive_timeout_ms);
  arg(GRPC_ARG_MAX_CONNECTION_IDLE_MS, o.max_connection_idle_ms);
  arg(GRPC_ARG_MAX_CONNECTION_AGE_MS, o.max_connection_age_ms);
  arg(GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS, o.max_connection_age_grace_ms);
  // Clients that ping (keepalive) at most every 10 s are not cut off.
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 10000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  if (o.max_rpc_threads > 0) {
    grpc::ResourceQuota quota("metatt-server");
    quota.SetMaxThreads(static_cast<int>(std::min<int64_t>(o.max_rpc_threads, INT32_MAX)));
    builder.SetResourceQuota(quota);
  }
  services_->Register(&builder, authenticator_.get());
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
  if (metrics_port_ > 0) {
    Log(absl::StrCat("metrics on http://", o.metrics_listen, "/metrics",
                     metrics_exposer_ ? absl::StrCat(" (basic authentication, user ",
                                                     o.metrics_user, ")")
                                      : ""));
  }

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
        // Health follows the shared store: NOT_SERVING while it does not
        // answer within its timeouts (issue 17, hole 4).
        const absl::Status ping = store_->Ping();
        if (ping.ok() != store_serving_) {
          store_serving_ = ping.ok();
          Log(ping.ok() ? std::string("store reachable again: health SERVING")
                        : absl::StrCat("store unreachable: health NOT_SERVING: ", ping.ToString()));
          if (auto* health = grpc_server_->GetHealthCheckService()) {
            health->SetServingStatus(store_serving_);
          }
        }
        if (!ping.ok()) {
          lock.lock();
          continue;
        }
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
  // job ends FAILED with the reason unless it has a resumable checkpoint (then
  // it stays RUNNING and the next start resumes it).
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
