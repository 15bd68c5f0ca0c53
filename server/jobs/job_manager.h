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
#include "server/jobs/job_types.h"
#include "server/jobs/store.h"

namespace metatt {

struct ServerMetrics;

struct JobManagerOptions {
  // CreateJob fails with RESOURCE_EXHAUSTED once this many jobs are queued.
  int64_t max_queued_jobs = 16;
  // Clock (tests inject a fake one).
  std::function<int64_t()> now_unix_ms;
  // Optional metrics (metatt_jobs{state}, steps, loss, throughput, queue depth).
  ServerMetrics* metrics = nullptr;
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
  absl::StatusOr<JobRecord> CreateJob(const JobSpec& spec);
  absl::StatusOr<JobRecord> GetJob(const std::string& id);
  absl::StatusOr<std::vector<JobRecord>> ListJobs(std::optional<JobState> state, int64_t page_size,
                                                  const std::string& page_token,
                                                  std::string* next_page_token);
  // QUEUED -> CANCELLED at once; VALIDATING/RUNNING -> the executor is asked
  // to stop (the job ends CANCELLED after its current step). Cancelling a
  // cancelled job is a no-op; a finished one is FAILED_PRECONDITION.
  absl::StatusOr<JobRecord> CancelJob(const std::string& id);
  absl::StatusOr<std::unique_ptr<JobEventSubscription>> Subscribe(const std::string& job_id);

  // Validates a spec without creating anything (also used by CreateJob).
  absl::Status ValidateSpec(const JobSpec& spec);

  int64_t queued_count();
  std::optional<std::string> running_job();

  // Stops the dispatcher and ends every subscription. Jobs keep their state in
  // the store (a running one is recovered at the next start).
  void Shutdown();

 private:
  friend class JobEventSubscription;
  JobManager(JobManagerOptions options, Store* store, JobExecutor* executor);
  absl::Status Recover();
  void DispatchLoop();
  void OnEvent(const std::string& job_id, JobEvent e);
  void OnEventLocked(const std::string& job_id, JobEvent e) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Unsubscribe(JobEventSubscription* sub);
  void UpdateGaugesLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  int64_t Now() const;

  JobManagerOptions options_;
  Store* store_;
  JobExecutor* executor_;

  absl::Mutex mu_;
  std::deque<std::string> queue_ ABSL_GUARDED_BY(mu_);
  std::optional<std::string> running_ ABSL_GUARDED_BY(mu_);
  std::set<std::string> cancel_requested_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::vector<JobEventSubscription*>> subscribers_ ABSL_GUARDED_BY(mu_);
  std::map<JobState, int64_t> state_counts_ ABSL_GUARDED_BY(mu_);
  bool shutdown_ ABSL_GUARDED_BY(mu_) = false;
  std::thread dispatcher_;
};

}  // namespace metatt
