// metatt-server: flags -> Server::Options, signal handling. The wiring and
// the graceful shutdown live in the Server object (server/server.h).
//
//   metatt-server --listen 127.0.0.1:50051 --metrics_listen 127.0.0.1:9090
//                 --data_dir ./data [--model_dir DIR] [--device auto|cpu|cuda]
//
// Prints "METRICS <port>" then "LISTENING <port>" on stdout (flushed) once
// serving, so scripts and tests can pass port 0 and read the chosen port.
#include <signal.h>

#include <cstdio>
#include <memory>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "server/server.h"

ABSL_FLAG(std::string, listen, "127.0.0.1:50051",
          "gRPC address host:port (port 0 picks a free port). An address that is not loopback "
          "needs --tls_cert/--tls_key and --auth_tokens (else the server refuses to start; see "
          "--insecure_allow_open_network)");
ABSL_FLAG(std::string, metrics_listen, "127.0.0.1:9090",
          "Prometheus /metrics address host:port (port 0 picks a free port; empty = off). An "
          "address that is not loopback needs --metrics_password_file");
ABSL_FLAG(std::string, metrics_password_file, "",
          "file holding the /metrics password (HTTP basic authentication, user --metrics_user; "
          ">= 16 characters). Empty = no authentication (loopback only)");
ABSL_FLAG(std::string, metrics_user, "prometheus", "user name of /metrics' basic authentication");
ABSL_FLAG(bool, insecure_allow_open_network, false,
          "DANGEROUS: serve a non-loopback --listen without TLS or without tokens, and a "
          "non-loopback --metrics_listen without a password (anyone who reaches the port is admin)."
          " Tokens over plaintext on a non-loopback address stay refused");
ABSL_FLAG(std::string, data_dir, "./data",
          "SQLite database, datasets, adapter families and checkpoints (with --blob_store=postgres:"
          " this replica's cache of them)");
ABSL_FLAG(std::string, store, "sqlite",
          "sqlite (embedded, <data_dir>/metatt.db, one process) or a postgresql://user@host:port/db "
          "URI: several replicas on one database (README: Scale-out)");
ABSL_FLAG(std::string, blob_store, "auto",
          "where family version files, uploaded datasets and job checkpoints live: postgres (the "
          "PostgreSQL store's blobs table; --data_dir is then each replica's own cache), data_dir "
          "(files under --data_dir, which PostgreSQL replicas must then share), or dir:PATH (a "
          "directory, e.g. a shared mount). auto = postgres with a PostgreSQL --store, data_dir "
          "with SQLite");
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
ABSL_FLAG(int64_t, kv_cache_mb, 1024,
          "decoder servers: KV-cache budget (MiB) of the sequences decoded together; a request "
          "reserves (prompt + max_tokens) token slots and waits while the budget is full");
ABSL_FLAG(int64_t, max_running_sequences, 32,
          "decoder servers: sequences decoded together in one continuous batch");
ABSL_FLAG(int64_t, max_generate_queue, 256,
          "decoder servers: waiting Generate requests before RESOURCE_EXHAUSTED");
ABSL_FLAG(int64_t, default_max_tokens, 256,
          "decoder servers: max_tokens of a Generate request that gives none");
ABSL_FLAG(int64_t, num_threads, 0, "torch intra-op threads (0 = torch default)");
ABSL_FLAG(int64_t, checkpoint_every_steps, 50,
          "training jobs: a resumable checkpoint every N steps and at each evaluation, under "
          "<data_dir>/checkpoints/<job id>/ (0 = none: a job running when the server dies fails)");
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
ABSL_FLAG(int64_t, quota_max_queued_jobs, 8,
          "default per-tenant quota: queued jobs (a fair share: one tenant cannot fill the "
          "--max_queued_jobs queue); 0 = no limit");
ABSL_FLAG(int64_t, quota_max_dataset_bytes, 0,
          "default per-tenant quota: bytes of all the tenant's datasets; 0 = no limit");
ABSL_FLAG(int64_t, quota_max_tasks, 0,
          "default per-tenant quota: tasks in the tenant's families; 0 = no limit");
ABSL_FLAG(int64_t, max_request_bytes, 64 << 20, "largest gRPC message the server accepts");
ABSL_FLAG(int64_t, max_predict_inputs, 1024, "most inputs in one Predict request");
ABSL_FLAG(int64_t, max_job_batch_size, 4096, "largest hparams.batch_size a job may ask for");
ABSL_FLAG(int64_t, max_sequence_length, 4096, "largest hparams.max_length a job may ask for");
// Bounds on what one client request makes the server hold (README "Limits").
ABSL_FLAG(int64_t, max_tasks_per_job, metatt::kDefaultMaxTasksPerJob,
          "most tasks in one job (INVALID_ARGUMENT naming it); 0 = no limit");
ABSL_FLAG(int64_t, max_steps, metatt::kDefaultMaxSteps,
          "largest hparams.max_steps a job may ask for; 0 = no limit");
ABSL_FLAG(int64_t, max_rank_times_tasks, metatt::kDefaultMaxRankTimesTasks,
          "largest adapter rank x tasks of the family a job leaves; 0 = no limit");
ABSL_FLAG(int64_t, max_labels_per_task, metatt::kDefaultMaxLabelsPerTask,
          "most classes of one dataset (integer labels: every number from 0 to the largest); "
          "checked at upload and when a job uses the dataset; 0 = no limit");
ABSL_FLAG(int64_t, max_import_bytes, 1ll << 30, "largest ImportFamily stream");
// Connections.
ABSL_FLAG(int64_t, max_event_streams, 1000,
          "open StreamJobEvents streams, server-wide (RESOURCE_EXHAUSTED beyond); 0 = no limit");
ABSL_FLAG(int64_t, max_concurrent_streams, 256, "HTTP/2 streams per client connection");
ABSL_FLAG(int64_t, max_rpc_threads, 2048,
          "gRPC sync-server threads (one per RPC in flight); 0 = gRPC's default (unbounded)");
ABSL_FLAG(int64_t, keepalive_time_ms, 60000, "ping an idle connection after this long");
ABSL_FLAG(int64_t, keepalive_timeout_ms, 20000, "close a connection whose ping is not answered");
ABSL_FLAG(int64_t, max_connection_idle_ms, 600000,
          "close (GOAWAY) a connection without RPCs for this long; 0 = never");
ABSL_FLAG(int64_t, max_connection_age_ms, 7200000,
          "GOAWAY a connection this old (clients reconnect; event streams resume with "
          "StreamJobEvents); 0 = never");
ABSL_FLAG(int64_t, max_connection_age_grace_ms, 600000,
          "time RPCs of an aged connection get to finish");

namespace metatt {
namespace {

Server::Options OptionsFromFlags() {
  Server::Options o;
  o.listen = absl::GetFlag(FLAGS_listen);
  o.metrics_listen = absl::GetFlag(FLAGS_metrics_listen);
  o.data_dir = absl::GetFlag(FLAGS_data_dir);
  o.store = absl::GetFlag(FLAGS_store);
  o.blob_store = absl::GetFlag(FLAGS_blob_store);
  o.replica_id = absl::GetFlag(FLAGS_replica_id);
  o.job_lease_ms = absl::GetFlag(FLAGS_job_lease_ms);
  o.job_poll_ms = absl::GetFlag(FLAGS_job_poll_ms);
  o.registry_poll_ms = absl::GetFlag(FLAGS_registry_poll_ms);
  o.runtime.model_dir = absl::GetFlag(FLAGS_model_dir);
  o.runtime.device = absl::GetFlag(FLAGS_device);
  o.runtime.max_batch_size = absl::GetFlag(FLAGS_max_batch_size);
  o.runtime.batch_timeout_ms = absl::GetFlag(FLAGS_batch_timeout_ms);
  o.runtime.num_threads = absl::GetFlag(FLAGS_num_threads);
  o.runtime.max_queue = absl::GetFlag(FLAGS_max_queue);
  o.runtime.base_only_inference = absl::GetFlag(FLAGS_inference_base_only);
  o.runtime.head_dtype = absl::GetFlag(FLAGS_head_dtype);
  o.runtime.kv_cache_mb = absl::GetFlag(FLAGS_kv_cache_mb);
  o.runtime.max_running_sequences = absl::GetFlag(FLAGS_max_running_sequences);
  o.runtime.max_generate_queue = absl::GetFlag(FLAGS_max_generate_queue);
  o.runtime.default_max_tokens = absl::GetFlag(FLAGS_default_max_tokens);
  o.runtime.checkpoint_every_steps = absl::GetFlag(FLAGS_checkpoint_every_steps);
  o.max_queued_jobs = absl::GetFlag(FLAGS_max_queued_jobs);
  o.max_upload_bytes = absl::GetFlag(FLAGS_max_upload_bytes);
  o.metrics_task_labels = absl::GetFlag(FLAGS_metrics_task_labels);
  o.shutdown_grace_ms = absl::GetFlag(FLAGS_shutdown_grace_ms);
  o.auth_tokens = absl::GetFlag(FLAGS_auth_tokens);
  o.insecure_allow_open_network = absl::GetFlag(FLAGS_insecure_allow_open_network);
  o.metrics_password_file = absl::GetFlag(FLAGS_metrics_password_file);
  o.metrics_user = absl::GetFlag(FLAGS_metrics_user);
  o.tls = {absl::GetFlag(FLAGS_tls_cert), absl::GetFlag(FLAGS_tls_key),
           absl::GetFlag(FLAGS_tls_client_ca)};
  o.default_quotas.max_concurrent_jobs = absl::GetFlag(FLAGS_quota_max_concurrent_jobs);
  o.default_quotas.max_queued_jobs = absl::GetFlag(FLAGS_quota_max_queued_jobs);
  o.default_quotas.max_dataset_bytes = absl::GetFlag(FLAGS_quota_max_dataset_bytes);
  o.default_quotas.max_tasks = absl::GetFlag(FLAGS_quota_max_tasks);
  o.max_request_bytes = absl::GetFlag(FLAGS_max_request_bytes);
  o.max_predict_inputs = absl::GetFlag(FLAGS_max_predict_inputs);
  o.job_limits.max_batch_size = absl::GetFlag(FLAGS_max_job_batch_size);
  o.job_limits.max_sequence_length = absl::GetFlag(FLAGS_max_sequence_length);
  o.job_limits.max_tasks_per_job = absl::GetFlag(FLAGS_max_tasks_per_job);
  o.job_limits.max_steps = absl::GetFlag(FLAGS_max_steps);
  o.job_limits.max_rank_times_tasks = absl::GetFlag(FLAGS_max_rank_times_tasks);
  o.job_limits.max_labels_per_task = absl::GetFlag(FLAGS_max_labels_per_task);
  o.max_import_bytes = absl::GetFlag(FLAGS_max_import_bytes);
  o.max_event_streams = absl::GetFlag(FLAGS_max_event_streams);
  o.max_concurrent_streams = absl::GetFlag(FLAGS_max_concurrent_streams);
  o.max_rpc_threads = absl::GetFlag(FLAGS_max_rpc_threads);
  o.keepalive_time_ms = absl::GetFlag(FLAGS_keepalive_time_ms);
  o.keepalive_timeout_ms = absl::GetFlag(FLAGS_keepalive_timeout_ms);
  o.max_connection_idle_ms = absl::GetFlag(FLAGS_max_connection_idle_ms);
  o.max_connection_age_ms = absl::GetFlag(FLAGS_max_connection_age_ms);
  o.max_connection_age_grace_ms = absl::GetFlag(FLAGS_max_connection_age_grace_ms);
  return o;
}

int Fail(const absl::Status& status) {
  std::fprintf(stderr, "[metatt-server] %s\n", status.ToString().c_str());
  return 1;
}

int Run() {
  // Signals are taken by sigwait() on the main thread: block them before any
  // thread starts so every thread inherits the mask.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  auto server = Server::Create(OptionsFromFlags());
  if (!server.ok()) return Fail(server.status());
  absl::Status started = (*server)->Start();
  if (!started.ok()) return Fail(started);
  // METRICS first: LISTENING is the last line, the "ready" signal scripts wait for.
  if ((*server)->metrics_port() > 0) std::printf("METRICS %d\n", (*server)->metrics_port());
  std::printf("LISTENING %d\n", (*server)->port());
  std::fflush(stdout);

  int sig = 0;
  sigwait(&signals, &sig);
  (*server)->Shutdown(absl::StrCat("signal ", sig));
  return 0;
}

}  // namespace
}  // namespace metatt

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("MetaTT fine-tuning and inference server (gRPC metatt.v1)");
  absl::ParseCommandLine(argc, argv);
  return metatt::Run();
}
