// Job manager: validates and creates jobs (idempotent), keeps a FIFO queue,
// hands one job at a time to the JobExecutor, persists every event and fans it
// out to StreamJobEvents subscribers, and recovers after a restart.
//
// Threads: RPC threads call the public methods; one dispatcher thread starts
// queued jobs (never holding the lock while calling the executor); the
// executor's `emit` runs on the device thread.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/store/job_types.h"
#include "server/store/store.h"
#include "server/jobs/job_validation.h"
#include "server/jobs/tenants.h"

namespace metatt {

// What the job manager reports as jobs move (the monitoring layer implements
// it with Prometheus gauges; server/monitoring/server_metrics.h). Called with
// the manager's lock held: implementations must be quick and must not call
// back into the JobManager.
class JobObserver {
 public:
  virtual ~JobObserver() = default;
  // `n` jobs are now in state `s` (after every change of the counts).
  virtual void OnJobCount(JobState s, int64_t n) = 0;
  // The running job made `steps` more optimizer steps; its latest loss and
  // throughput.
  virtual void OnTrainingProgress(int64_t steps, double loss, double examples_per_second) = 0;
  // The running job ended (throughput back to 0).
  virtual void OnJobEnded() = 0;
};

struct JobManagerOptions {
  // CreateJob fails with RESOURCE_EXHAUSTED once this many jobs are queued.
  int64_t max_queued_jobs = 16;
  // Clock (tests inject a fake one).
  std::function<int64_t()> now_unix_ms;
  // Optional observer of job counts, steps, loss and throughput (metrics).
  JobObserver* observer = nullptr;
  // Per-tenant quotas (max_concurrent_jobs, max_queued_jobs, max_tasks); null = none.
  QuotaFn quotas;
  // Limits on a job's hparams and on what one job makes the server hold
  // (job_validation.h; INVALID_ARGUMENT naming the limit).
  JobLimits limits = JobLimits::ServerDefaults();
  // Open StreamJobEvents subscriptions (each holds an RPC thread); Subscribe
  // answers RESOURCE_EXHAUSTED naming max_event_streams beyond it. 0 = none.
  int64_t max_event_streams = 1000;
  // CreateJob re-hashes every dataset file it names against the sha256 of
  // its upload (FAILED_PRECONDITION when it changed). The server sets it.
  bool verify_dataset_files = false;
  // Several replicas on one store (Store::SupportsClaims, i.e. PostgreSQL):
  // non-empty = shared mode (job_claims.cc). Jobs are claimed from the store
  // instead of an in-memory queue; the holder renews a lease every poll;
  // an expired lease (dead replica) is taken over by a live one, which fails
  // the job with the reason (or re-queues it when the executor can resume);
  // event streams of jobs held elsewhere are read from the store every poll.
  std::string replica_id;
  int64_t lease_ms = 10000;
  int64_t poll_ms = 250;
};

// The reason a job that was RUNNING when the server stopped gets on restart.
inline constexpr char kRestartFailureReason[] =
    "server restarted while the job was running; no resumable checkpoint";

class JobManager;

// Past events of a job, then its live ones, ending after the terminal state.
class JobEventSubscription {
 public:
  enum class Result { kEvent, kTimeout, kEnd };
  ~JobEventSubscription();
  // Waits up to `timeout` for the next event. kEnd once the terminal state
  // event has been returned (or the manager shut down).
  Result Next(JobEvent* event, absl::Duration timeout);
  // 0-based sequence number of the event last returned by Next.
  int64_t sequence() const { return sequence_; }

 private:
  friend class JobManager;
  JobEventSubscription(JobManager* m, std::string job_id)
      : manager_(m), job_id_(std::move(job_id)) {}
  void Push(const JobEvent& e);  // called under the manager's lock
  void Close();

  JobManager* manager_;
  std::string job_id_;
  absl::Mutex mu_;
  std::deque<JobEvent> pending_ ABSL_GUARDED_BY(mu_);
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  bool ended_ = false;  // consumer side only
  int64_t sequence_ = -1;
  int64_t delivered_ = 0;  // shared mode: stored events pushed so far (manager's lock)
};

class JobManager {
 public:
  // Recovers persisted jobs (RUNNING/VALIDATING -> FAILED with
  // kRestartFailureReason unless the executor can resume them; QUEUED stay
  // queued in creation order) and starts the dispatcher.
  static absl::StatusOr<std::unique_ptr<JobManager>> Create(JobManagerOptions options, Store* store,
                                                            JobExecutor* executor);
  ~JobManager();  // calls Shutdown()

  // Validates `spec` (INVALID_ARGUMENT naming the field, NOT_FOUND for unknown
  // datasets / families, ALREADY_EXISTS for an existing family or task) and
  // queues it. The same non-empty idempotency key returns the first job.
  //
  // Every method takes the caller: a job belongs to its creator's tenant;
  // another tenant's job (or dataset, or family) is NOT_FOUND like a missing
  // one; lists show only the caller's jobs (an admin's: all). Idempotency
  // keys are per tenant. Quotas (RESOURCE_EXHAUSTED naming the limit) apply
  // to the caller's tenant.
  absl::StatusOr<JobRecord> CreateJob(const JobSpec& spec, const Caller& caller = Caller::Local());
  absl::StatusOr<JobRecord> GetJob(const std::string& id, const Caller& caller = Caller::Local());
  // The job's resumable checkpoints (JobExecutor::ListCheckpoints), oldest
  // first; NOT_FOUND when the caller cannot see the job.
  absl::StatusOr<std::vector<JobCheckpointInfo>> ListJobCheckpoints(
      const std::string& id, const Caller& caller = Caller::Local());
  absl::StatusOr<std::vector<JobRecord>> ListJobs(std::optional<JobState> state, int64_t page_size,
                                                  const std::string& page_token,
                                                  std::string* next_page_token,
                                                  const Caller& caller = Caller::Local());
  // QUEUED -> CANCELLED at once; VALIDATING/RUNNING -> the executor is asked
  // to stop (the job ends CANCELLED after its current step). Cancelling a
  // cancelled job is a no-op; a finished one is FAILED_PRECONDITION.
  absl::StatusOr<JobRecord> CancelJob(const std::string& id, const Caller& caller = Caller::Local());
  absl::StatusOr<std::unique_ptr<JobEventSubscription>> Subscribe(
      const std::string& job_id, const Caller& caller = Caller::Local());

  // Validates a spec without creating anything (also used by CreateJob).
  absl::Status ValidateSpec(const JobSpec& spec, const Caller& caller = Caller::Local());

  int64_t queued_count();
  std::optional<std::string> running_job();

  // Stops the dispatcher and ends every subscription. Jobs keep their state in
  // the store (a running one is recovered at the next start).
  void Shutdown();
  // Graceful shutdown, after the executor has stopped (so no step or
  // publication of the job can follow): the job still VALIDATING/RUNNING ends
  // FAILED with `reason`, unless the executor can resume it from a
  // checkpoint (it stays RUNNING for restart recovery). Returns the id of the
  // job it failed, if any.
  std::optional<std::string> FailRunning(const std::string& reason);

 private:
  friend class JobEventSubscription;
  JobManager(JobManagerOptions options, Store* store, JobExecutor* executor);
  absl::Status Recover();
  void DispatchLoop();
  // Hands the job that is now running_ to the executor (mu_ not held); fails
  // it when the executor refuses it, and passes on a cancel that arrived
  // meanwhile. Both dispatch loops end with it.
  void StartOnExecutor(const JobRecord& job) ABSL_LOCKS_EXCLUDED(mu_);
  void OnEvent(const std::string& job_id, JobEvent e);
  void OnEventLocked(const std::string& job_id, JobEvent e) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Unsubscribe(JobEventSubscription* sub);
  void UpdateGaugesLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A job stopped (crash) between publishing its family version and its
  // SUCCEEDED event: records the version and SUCCEEDED instead of failing a
  // job whose output serves. False if `versions` has none by this job.
  bool SucceedIfPublishedLocked(const JobRecord& j,
                                const std::vector<FamilyVersionRecord>& versions)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  int64_t Now() const;
  // Shared mode (job_claims.cc).
  bool shared() const { return !options_.replica_id.empty(); }
  void SharedDispatchLoop();
  // Renews the running job's lease; returns a job to cancel locally (a cancel
  // was requested on another replica, or the lease was lost), if any.
  std::optional<std::string> RenewLeaseLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ReapExpiredLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void DeliverStoredEventsLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  int64_t QueuedInStoreLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The job if the caller may see it, else NOT_FOUND "job '<id>' not found".
  absl::StatusOr<JobRecord> GetVisible(const std::string& id, const Caller& caller);
  // A job's end that the store refused to record (a full disk): the record
  // is served from memory (GetJob, ListJobs) and written again on every
  // later call until the store takes it, so no job stays RUNNING while the
  // server runs; after a restart the recovery fails a RUNNING job anyway.
  // One replica only (shared mode: the unrenewed lease ends such a job).
  struct Unpersisted {
    JobRecord record;
    JobEvent event;
    bool record_written = false;
  };
  void FlushUnpersisted();
  std::optional<JobRecord> UnpersistedRecord(const std::string& id);
  // Quotas of the caller's tenant on creating one more job.
  absl::Status CheckJobQuotasLocked(const std::string& tenant) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  JobManagerOptions options_;
  Store* store_;
  JobExecutor* executor_;

  absl::Mutex mu_;
  std::deque<std::string> queue_ ABSL_GUARDED_BY(mu_);
  std::optional<std::string> running_ ABSL_GUARDED_BY(mu_);
  std::set<std::string> cancel_requested_ ABSL_GUARDED_BY(mu_);
  // Tenant of every unfinished (queued / validating / running) job.
  std::map<std::string, std::string> unfinished_tenant_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::vector<JobEventSubscription*>> subscribers_ ABSL_GUARDED_BY(mu_);
  int64_t open_streams_ ABSL_GUARDED_BY(mu_) = 0;  // live JobEventSubscriptions
  // Fair share (single replica): the next job is the oldest queued one of the
  // tenant served least recently (FIFO within a tenant).
  std::map<std::string, int64_t> last_served_ ABSL_GUARDED_BY(mu_);
  int64_t served_seq_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<JobState, int64_t> state_counts_ ABSL_GUARDED_BY(mu_);
  bool shutdown_ ABSL_GUARDED_BY(mu_) = false;
  bool wake_ ABSL_GUARDED_BY(mu_) = false;           // shared mode: a job was created here
  std::set<std::string> lost_ ABSL_GUARDED_BY(mu_);  // shared mode: leases taken from us
  absl::Mutex unpersisted_mu_;  // never held while calling out, except the store
  std::map<std::string, Unpersisted> unpersisted_ ABSL_GUARDED_BY(unpersisted_mu_);
  std::thread dispatcher_;
};

}  // namespace metatt
