// Store on PostgreSQL (libpq), for several metatt-server replicas on one
// database. Numbered schema migrations like the SQLite store, applied in one
// transaction under an advisory lock (two replicas starting together migrate
// once). Job claiming: `SELECT ... FOR UPDATE SKIP LOCKED` over QUEUED jobs,
// a claim records the replica id and a lease on the database clock, renewed
// by the holder; an expired lease lets another replica take the job over
// (see Store::ClaimNextJob and JobManager's shared mode).
//
// The Store operations are SqlStore's (sql_store.h), shared with the SQLite
// store; this file runs their statements on libpq and adds what only
// PostgreSQL has (claims, fences, the advisory locks, blobs).
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
#include "server/store/blob_store.h"
#include "server/store/sql_store.h"

struct pg_conn;

namespace metatt {

class PostgresStore : public SqlStore {
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
  absl::StatusOr<int64_t> RunLocked(const std::string& sql, const std::vector<SqlValue>& params,
                                    const RowFn& row = nullptr) override
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  const char* BeginSql() const override { return "BEGIN"; }
  const char* RowLockClause() const override { return " FOR UPDATE"; }
  absl::Status ReadyLocked() override ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return EnsureConnected();
  }
  // FAILED_PRECONDITION when this replica holds a fence on `job_id` and the
  // job's claim_epoch is no longer it. Locks the job row (FOR SHARE) until
  // the caller's transaction ends, so a take-over waits for the write.
  absl::Status CheckFenceLocked(const std::string& job_id, const char* what) override
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::optional<int64_t> FenceLocked(const std::string& job_id) override
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status LockFamilyLocked(const std::string& family) override
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A claiming UPDATE with parameters $1 replica, $2 lease_ms that returns
  // JobCols(), claim_epoch and (for a take-over) the previous holder; `none`:
  // the NOT_FOUND message when it took no job.
  absl::StatusOr<JobRecord> Claim(const std::string& sql, const std::string& replica,
                                  int64_t lease_ms, const char* none, std::string* previous_holder);
  absl::Status Migrate() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status EnsureConnected() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::string uri_;
  pg_conn* conn_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, int64_t> fences_ ABSL_GUARDED_BY(mu_);  // job id -> claim epoch
  std::unique_ptr<Blobs> blobs_;
};

}  // namespace metatt
