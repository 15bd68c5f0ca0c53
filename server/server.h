// The whole metatt-server as one object (TF Serving's ServerCore is the
// model): store, device runtime, dataset and job managers, tenants,
// authentication, the four gRPC services, /metrics and the registry refresher.
// metatt-server's main.cc only parses flags into Options, handles signals and
// calls it; tests start one in-process (server/server_test.cc).
//
//   Server::Options o;  o.listen = "127.0.0.1:0";  o.data_dir = dir;
//   ASSIGN_OR_RETURN(auto server, Server::Create(o));   // store, runtime, managers
//   RETURN_IF_ERROR(server->Start());                    // gRPC + /metrics listening
//   ... server->port() ...
//   server->Shutdown("signal 15");                       // graceful, see below
#pragma once

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/jobs/job_validation.h"
#include "server/jobs/tenants.h"
#include "server/runtime/runtime.h"
#include "server/service/auth.h"

namespace grpc {
class Server;
}
namespace prometheus {
class Collectable;
class Exposer;
}  // namespace prometheus

namespace metatt {

class DatasetManager;
class JobManager;
class MetricsRegistry;
class JobMetrics;
struct Services;
class DataDirLock;

class Server {
 public:
  // Every field is a metatt-server flag of the same name (main.cc: --help).
  struct Options {
    std::string listen = "127.0.0.1:50051";  // port 0 picks a free port (port())
    std::string metrics_listen = "127.0.0.1:9090";  // "" = no /metrics
    std::string data_dir = "./data";
    std::string store = "sqlite";  // or postgresql://user@host:port/db
    // Where version files, datasets and checkpoints live (blob_store.h):
    // "postgres" (the PostgreSQL store's blobs table; data_dir is this
    // replica's cache), "data_dir" (files under data_dir, shared by the
    // replicas of a PostgreSQL store), "dir:<path>" (a LocalBlobStore there).
    // "auto": postgres with a PostgreSQL store, data_dir with SQLite.
    std::string blob_store = "auto";
    std::string replica_id;        // PostgreSQL: default <hostname>-<pid>
    int64_t job_lease_ms = 10000;
    int64_t job_poll_ms = 250;
    int64_t registry_poll_ms = -1;  // -1 = 1000 with PostgreSQL, off with SQLite; 0 = off
    // model_dir, device, max_batch_size, batch_timeout_ms, max_queue,
    // num_threads, base_only_inference (--inference_base_only), head_dtype;
    // runtime.data_dir is taken from data_dir above.
    RuntimeOptions runtime;
    int64_t max_queued_jobs = 16;
    int64_t max_upload_bytes = 256ll << 20;
    int64_t metrics_task_labels = 16;
    int64_t shutdown_grace_ms = 5000;
    std::string auth_tokens;  // tokens file; "" = no authentication
    TlsFiles tls;             // --tls_cert, --tls_key, --tls_client_ca
    // Exposure (README "Security"): a --listen that is not a loopback address
    // needs TLS and tokens, and a --metrics_listen that is not one needs
    // --metrics_password_file, unless this is set (then a loud warning).
    // Tokens over plaintext on a non-loopback --listen are refused even then.
    bool insecure_allow_open_network = false;
    // HTTP basic authentication of /metrics: user metrics_user, the password
    // is the file's content (surrounding whitespace trimmed). "" = none.
    std::string metrics_password_file;
    std::string metrics_user = "prometheus";
    TenantQuotas default_quotas;  // --quota_* flags
    int64_t max_request_bytes = 64 << 20;
    int64_t max_predict_inputs = 1024;
    // A job's hparams (--max_job_batch_size, --max_sequence_length) and what
    // one job or dataset may make the server hold (job_validation.h defaults;
    // INVALID_ARGUMENT / RESOURCE_EXHAUSTED naming the limit; 0 = none).
    JobLimits job_limits = JobLimits::ServerDefaults();
    int64_t max_import_bytes = 1ll << 30;
    // Connections (gRPC channel arguments and resource quota; 0 = gRPC's default).
    int64_t max_event_streams = 1000;      // open StreamJobEvents, server-wide
    int64_t max_concurrent_streams = 256;  // HTTP/2 streams per connection
    int64_t max_rpc_threads = 2048;        // sync-server threads (ResourceQuota)
    int64_t keepalive_time_ms = 60000;     // server pings an idle connection
    int64_t keepalive_timeout_ms = 20000;  // ... and closes it without an answer
    int64_t max_connection_idle_ms = 600000;   // no RPC for this long: closed (GOAWAY)
    int64_t max_connection_age_ms = 7200000;   // then GOAWAY; RPCs get the grace below
    int64_t max_connection_age_grace_ms = 600000;
  };

  // Opens the store, loads the model and published families, creates the
  // managers and services; listens on nothing yet. An error names the flag.
  static absl::StatusOr<std::unique_ptr<Server>> Create(const Options& options);
  ~Server();  // Shutdown("server destroyed") unless Shutdown came (or Create failed)

  // Serves gRPC on options.listen and /metrics on options.metrics_listen (a
  // metrics port that cannot be bound only logs a warning), starts the
  // registry refresher. Logs the security warning of a plaintext or
  // token-less server.
  absl::Status Start();
  int port() const { return port_; }                  // bound gRPC port (after Start)
  int metrics_port() const { return metrics_port_; }  // 0 = no /metrics

  // Graceful, in this order: no new job starts and event streams end; the
  // gRPC server stops accepting and in-flight RPCs get shutdown_grace_ms to
  // finish; the refresher stops; the device loop stops the running job
  // between two steps and the job ends FAILED ("server shut down (<cause>)
  // while the job was running; ..."); queued jobs stay QUEUED for the next
  // start. Idempotent; returns when done.
  void Shutdown(absl::string_view cause);
  // Blocks until Shutdown has finished (from another thread).
  void Wait();

  std::string target() const;  // "127.0.0.1:<port>" for an in-process client

 private:
  explicit Server(Options options);
  absl::Status Init();

  Options options_;
  bool shared_store_ = false;
  // SQLite store: the exclusive lock on data_dir (flock on <data_dir>/LOCK),
  // held until every other member is gone.
  std::unique_ptr<DataDirLock> data_dir_lock_;
  // Destroyed in reverse order: /metrics (which reads the runtime) before the
  // runtime, every user of the store before the store.
  std::unique_ptr<Store> store_;
  std::unique_ptr<BlobStore> owned_blobs_;  // --blob_store=dir:<path>
  BlobStore* blobs_ = nullptr;  // null: data_dir holds the bytes (blob_store data_dir)
  std::unique_ptr<Runtime> runtime_;
  std::unique_ptr<MetricsRegistry> metrics_;
  std::unique_ptr<JobExecutor> refreshing_executor_;  // shared store only
  std::unique_ptr<TenantConfig> tenants_;
  std::unique_ptr<Authenticator> authenticator_;
  std::unique_ptr<FamilyAccess> family_access_;
  std::unique_ptr<DatasetManager> datasets_;
  std::unique_ptr<JobMetrics> job_metrics_;
  std::unique_ptr<JobManager> jobs_;
  std::unique_ptr<Services> services_;  // the four gRPC services
  std::unique_ptr<grpc::Server> grpc_server_;
  // /metrics with basic authentication (metrics_password_file); else the
  // MetricsRegistry's own exposer serves it.
  std::shared_ptr<prometheus::Collectable> sampled_gauges_;
  std::unique_ptr<prometheus::Exposer> metrics_exposer_;
  int port_ = 0;
  int metrics_port_ = 0;

  // Registry refresher (shared store) and the shutdown state.
  std::thread refresher_;
  bool store_serving_ = true;  // refresher thread only: the last health it set
  std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;  // guarded by mu_: the refresher ends
  bool initialized_ = false;  // Init succeeded: the destructor shuts down
  bool started_ = false;
  bool stopped_ = false;   // guarded by mu_: Shutdown finished
};

}  // namespace metatt
