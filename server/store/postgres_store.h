// Store on PostgreSQL (libpq), for several metatt-server replicas on one
// database. Numbered schema migrations like the SQLite store, applied in one
// transaction under an advisory lock (two replicas starting together migrate
// once). Job claiming: `SELECT ... FOR UPDATE SKIP LOCKED` over QUEUED jobs,
// a claim records the replica id and a lease on the database clock, renewed
// by the holder; an expired lease lets another replica take the job over
// (see Store::ClaimNextJob and JobManager's shared mode).
//
// One connection guarded by a mutex (the store is never on a hot path); a
// broken connection is re-established on the next call. Connecting waits at
// most Timeouts::connect_ms (libpq connect_timeout, unless the URI sets one)
// and every statement at most Timeouts::statement_ms, measured here, not by
// the server: a statement whose answer does not come (a paused network, a
// hung server) fails UNAVAILABLE and the connection is dropped, so a call
// never blocks a replica for longer.
//
// Fencing (Store::HoldFence): jobs.claim_epoch is raised by every claim and
// take-over; writes for a job this replica holds a fence on carry the epoch
// and are refused when it is stale.
//
// blob_store(): a BlobStore (blob_store.h) in the same database (table
// `blobs`, migration 6: bytea, size and FNV-1a 64 checked on every read), on
// the same connection, timeouts and fences: a Put for a fenced job is
// refused once the job was taken over.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "server/store/blob_store.h"
#include "server/store/store.h"

struct pg_conn;

namespace metatt {

class PostgresStore : public Store {
 public:
  // `uri`: a libpq connection URI, e.g. postgresql://user@127.0.0.1:5432/metatt.
  // Connects and applies every pending migration.
  struct Timeouts {
    int64_t connect_ms = 5000;
    int64_t statement_ms = 10000;
  };
  static absl::StatusOr<std::unique_ptr<PostgresStore>> Create(const std::string& uri);
  static absl::StatusOr<std::unique_ptr<PostgresStore>> Create(const std::string& uri,
                                                               const Timeouts& timeouts);
  ~PostgresStore() override;

  // True for "postgresql://..." and "postgres://..." (what --store accepts).
  static bool IsPostgresUri(const std::string& s);

  // Number of applied schema migrations.
  absl::StatusOr<int> SchemaVersion();

  absl::Status PutDataset(const DatasetRecord& d) override;
  absl::StatusOr<DatasetRecord> GetDataset(const std::string& id) override;
  absl::StatusOr<std::vector<DatasetRecord>> ListDatasets() override;
  absl::Status DeleteDataset(const std::string& id) override;

  absl::StatusOr<JobRecord> CreateJob(const JobRecord& j) override;
  absl::StatusOr<JobRecord> FindJobByIdempotencyKey(const std::string& key) override;
  absl::Status UpdateJob(const JobRecord& j) override;
  absl::StatusOr<JobRecord> GetJob(const std::string& id) override;
  absl::StatusOr<std::vector<JobRecord>> ListJobs(std::optional<JobState> state, int64_t page_size,
                                                  const std::string& page_token,
                                                  std::string* next_page_token) override;
  absl::Status AppendJobEvent(const std::string& job_id, const JobEvent& e) override;
  absl::StatusOr<std::vector<JobEvent>> ListJobEvents(const std::string& job_id) override;

  absl::Status PublishFamilyVersion(const FamilyVersionRecord& f) override;
  absl::StatusOr<std::vector<FamilyVersionRecord>> ListFamilyVersions(
      const std::string& family) override;
  absl::StatusOr<std::vector<FamilyVersionRecord>> ListFamilyVersionSummaries(
      const std::string& family) override;
  absl::StatusOr<FamilyVersionRecord> GetFamilyVersion(const std::string& family,
                                                       int64_t version) override;
  absl::StatusOr<FamilyVersionRecord> GetFamilyVersionTasks(const std::string& family,
                                                            int64_t version, int64_t first_task,
                                                            int64_t max_tasks) override;
  absl::Status DeleteFamily(const std::string& family) override;
  absl::Status CompactFamilyVersion(const std::string& family, int64_t version,
                                    const std::vector<TaskRecord>& tasks) override;

  bool SupportsClaims() const override { return true; }
  absl::StatusOr<JobRecord> ClaimNextJob(const std::string& replica, int64_t lease_ms) override;
  absl::StatusOr<bool> RenewLease(const std::string& job_id, const std::string& replica,
                                  int64_t lease_ms) override;
  absl::Status RequestCancel(const std::string& job_id) override;
  absl::Status ReleaseClaim(const std::string& job_id, const std::string& replica) override;
  absl::StatusOr<JobRecord> TakeOverExpiredJob(const std::string& replica, int64_t lease_ms,
                                               std::string* previous_holder) override;
  void HoldFence(const std::string& job_id, int64_t epoch) override;
  void DropFence(const std::string& job_id) override;
  absl::Status Ping() override;

  // The blob store on this database and connection (owned by the store).
  BlobStore* blob_store();

 private:
  class Blobs;
  PostgresStore(std::string uri, pg_conn* conn);
  // FAILED_PRECONDITION when this replica holds a fence on `job_id` and the
  // job's claim_epoch is no longer it. Locks the job row (FOR SHARE) until
  // the caller's transaction ends, so a take-over waits for the write.
  absl::Status CheckFenceLocked(const std::string& job_id, const char* what)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::optional<int64_t> FenceLocked(const std::string& job_id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status Migrate() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<std::vector<FamilyVersionRecord>> ListFamilies(const std::string& family,
                                                                bool with_tasks);
  absl::Status EnsureConnected() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::string uri_;
  absl::Mutex mu_;
  pg_conn* conn_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, int64_t> fences_ ABSL_GUARDED_BY(mu_);  // job id -> claim epoch
  std::unique_ptr<Blobs> blobs_;
};

}  // namespace metatt
