#include "server/store/postgres_store.h"

#include <libpq-fe.h>
#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <optional>
#include <utility>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "base/file_io.h"
#include "base/status_macros.h"
#include "server/store/sql_rows.h"

namespace metatt {
namespace {

// Schema migrations, applied in order; entry i brings the schema to version i+1.
// Never edit a shipped entry: append a new one. Same records as the SQLite
// schema, plus the claim columns of the jobs table.
const char* const kMigrations[] = {
    R"sql(
CREATE TABLE datasets (
  id TEXT PRIMARY KEY,
  name TEXT NOT NULL,
  format TEXT NOT NULL,
  spec_json TEXT NOT NULL,
  sha256 TEXT NOT NULL,
  path TEXT NOT NULL,
  num_rows BIGINT NOT NULL,
  size_bytes BIGINT NOT NULL,
  label_names_json TEXT NOT NULL,
  regression BOOLEAN NOT NULL,
  created_unix_ms BIGINT NOT NULL,
  tenant TEXT NOT NULL DEFAULT 'default'
);
CREATE TABLE jobs (
  seq BIGSERIAL PRIMARY KEY,
  id TEXT NOT NULL UNIQUE,
  idempotency_key TEXT UNIQUE,
  spec_json TEXT NOT NULL,
  state TEXT NOT NULL,
  failure_reason TEXT NOT NULL,
  created_unix_ms BIGINT NOT NULL,
  updated_unix_ms BIGINT NOT NULL,
  step BIGINT NOT NULL,
  total_steps BIGINT NOT NULL,
  result_family TEXT NOT NULL,
  result_version BIGINT NOT NULL,
  tenant TEXT NOT NULL DEFAULT 'default',
  claimed_by TEXT,
  lease_until TIMESTAMPTZ,
  cancel_requested BOOLEAN NOT NULL DEFAULT false
);
CREATE INDEX jobs_state ON jobs(state, seq);
CREATE TABLE job_datasets (
  job_id TEXT NOT NULL,
  dataset_id TEXT NOT NULL,
  PRIMARY KEY (job_id, dataset_id)
);
CREATE INDEX job_datasets_dataset ON job_datasets(dataset_id);
CREATE TABLE job_events (
  job_id TEXT NOT NULL,
  seq BIGINT NOT NULL,
  event_json TEXT NOT NULL,
  PRIMARY KEY (job_id, seq)
);
CREATE TABLE family_versions (
  family TEXT NOT NULL,
  version BIGINT NOT NULL,
  form TEXT NOT NULL,
  config_json TEXT NOT NULL,
  base_model_fingerprint TEXT NOT NULL,
  path TEXT NOT NULL,
  adapter_parameters BIGINT NOT NULL,
  tasks_json TEXT NOT NULL,
  created_by_job TEXT NOT NULL,
  created_unix_ms BIGINT NOT NULL,
  tenant TEXT NOT NULL DEFAULT 'default',
  PRIMARY KEY (family, version)
);
)sql",
    // 2: task counts, so listings read no task list (existing rows: counted once
    // here, under the migration lock). Same as SQLite migration 3.
    R"sql(
ALTER TABLE family_versions ADD COLUMN task_count BIGINT NOT NULL DEFAULT 0;
UPDATE family_versions SET task_count = json_array_length(tasks_json::json);
)sql",
    // 3: appended versions. Same as SQLite migration 4.
    R"sql(
ALTER TABLE family_versions ADD COLUMN parent_version BIGINT NOT NULL DEFAULT 0;
)sql",
    // 4: family names are per tenant. Same as SQLite migration 5.
    R"sql(
UPDATE family_versions SET family = tenant || '~' || family
  WHERE tenant <> 'default' AND strpos(family, '~') = 0;
)sql",
    // 5: fencing tokens: every claim and take-over raises the job's epoch.
    R"sql(
ALTER TABLE jobs ADD COLUMN claim_epoch BIGINT NOT NULL DEFAULT 0;
)sql",
    // 6: the blob store (blob_store.h): family version files, uploaded
    // datasets and job checkpoints, so replicas share no directory. Stored
    // uncompressed out of line (tensors do not compress); size and FNV-1a 64
    // are checked on every read.
    R"sql(
CREATE TABLE blobs (
  key TEXT COLLATE "C" PRIMARY KEY,
  bytes BYTEA NOT NULL,
  size BIGINT NOT NULL,
  fnv1a64 TEXT NOT NULL,
  updated_unix_ms BIGINT NOT NULL
);
ALTER TABLE blobs ALTER COLUMN bytes SET STORAGE EXTERNAL;
)sql",
};

// Any number; every replica uses the same one to serialise migrations.
constexpr int64_t kMigrationLockKey = 0x6d6574617474;  // "metatt"

using Param = std::optional<std::string>;  // nullopt = SQL NULL

Param P(const std::string& s) { return s; }
Param P(int64_t v) { return std::to_string(v); }
Param P(bool b) { return std::string(b ? "true" : "false"); }

// RAII result of one statement.
class Result {
 public:
  explicit Result(PGresult* r) : r_(r) {}
  Result(Result&& o) noexcept : r_(std::exchange(o.r_, nullptr)) {}
  Result& operator=(Result&& o) noexcept {
    std::swap(r_, o.r_);
    return *this;
  }
  Result(const Result&) = delete;
  Result& operator=(const Result&) = delete;
  ~Result() { PQclear(r_); }

  absl::Status status(PGconn* conn) const {
    ExecStatusType st = PQresultStatus(r_);
    if (r_ != nullptr && (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK)) {
      return absl::OkStatus();
    }
    std::string msg = r_ ? PQresultErrorMessage(r_) : PQerrorMessage(conn);
    while (!msg.empty() && (msg.back() == '\n' || msg.back() == ' ')) msg.pop_back();
    const char* code = r_ ? PQresultErrorField(r_, PG_DIAG_SQLSTATE) : nullptr;
    std::string sqlstate = code ? code : "";
    if (sqlstate == "23505") return absl::AlreadyExistsError(absl::StrCat("postgresql: ", msg));
    // Class 53, insufficient resources: 53100 disk_full, 53200 out_of_memory, ...
    if (absl::StartsWith(sqlstate, "53")) {
      return absl::ResourceExhaustedError(
          absl::StrCat("postgresql: ", sqlstate == "53100" ? "the database's disk is full: " : "",
                       msg, " (SQLSTATE ", sqlstate, ")"));
    }
    if (PQstatus(conn) != CONNECTION_OK || absl::StartsWith(sqlstate, "08") ||
        absl::StartsWith(sqlstate, "57P")) {
      return absl::UnavailableError(absl::StrCat("postgresql: ", msg));
    }
    return absl::InternalError(absl::StrCat("postgresql: ", msg, " (SQLSTATE ", sqlstate, ")"));
  }
  int rows() const { return PQntuples(r_); }
  int64_t affected() const {
    int64_t n = 0;
    return absl::SimpleAtoi(PQcmdTuples(r_), &n) ? n : 0;
  }
  bool IsNull(int row, int col) const { return PQgetisnull(r_, row, col) != 0; }
  std::string Text(int row, int col) const {
    return std::string(PQgetvalue(r_, row, col), PQgetlength(r_, row, col));
  }
  int64_t Int(int row, int col) const {
    int64_t v = 0;
    return absl::SimpleAtoi(Text(row, col), &v) ? v : 0;
  }
  bool Bool(int row, int col) const { return Text(row, col) == "t"; }

 private:
  PGresult* r_;
};

// The statement timeout of every store in the process (PostgresStore::Timeouts).
std::atomic<int64_t> g_statement_timeout_ms{10000};

std::string ConnError(PGconn* conn) {
  std::string msg = PQerrorMessage(conn);
  while (!msg.empty() && (msg.back() == '\n' || msg.back() == ' ')) msg.pop_back();
  return msg;
}

// Waits until the connection's socket is ready for `events` or the deadline
// passes (false).
bool WaitSocket(PGconn* conn, short events, std::chrono::steady_clock::time_point deadline) {
  while (true) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                          deadline - std::chrono::steady_clock::now())
                          .count();
    if (left <= 0) return false;
    pollfd p{PQsocket(conn), events, 0};
    const int n = ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left, 1000)));
    if (n > 0) return true;
    if (n < 0 && errno != EINTR) return true;  // let libpq report the error
  }
}

// One statement, answered within g_statement_timeout_ms: sent and read
// asynchronously; past the deadline the connection is shut down (the next
// call reconnects) and the statement fails UNAVAILABLE.
// `binary_params` (optional, one flag per parameter): send those as bytes
// (bytea); `binary_result`: read every column in binary format.
absl::StatusOr<Result> Exec(PGconn* conn, const std::string& sql,
                            const std::vector<Param>& params = {},
                            const std::vector<int>& binary_params = {},
                            bool binary_result = false) {
  std::vector<const char*> values;
  std::vector<int> lengths;
  values.reserve(params.size());
  for (const Param& p : params) {
    values.push_back(p ? p->data() : nullptr);
    lengths.push_back(p ? static_cast<int>(p->size()) : 0);
  }
  std::vector<int> formats(params.size(), 0);
  for (size_t i = 0; i < binary_params.size() && i < formats.size(); ++i) {
    formats[i] = binary_params[i];
  }
  const int64_t timeout_ms = g_statement_timeout_ms.load();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  auto timed_out = [&]() -> absl::Status {
    ::shutdown(PQsocket(conn), SHUT_RDWR);  // PQstatus turns bad: EnsureConnected resets
    PQconsumeInput(conn);
    return absl::UnavailableError(absl::StrCat(
        "postgresql: no answer within the statement timeout (", timeout_ms, " ms)"));
  };
  if (PQstatus(conn) != CONNECTION_OK) {
    return absl::UnavailableError(absl::StrCat("postgresql: ", ConnError(conn)));
  }
  if (PQsendQueryParams(conn, sql.c_str(), static_cast<int>(values.size()), nullptr,
                        values.data(), lengths.data(), formats.data(),
                        /*resultFormat=*/binary_result ? 1 : 0) == 0) {
    return absl::UnavailableError(absl::StrCat("postgresql: ", ConnError(conn)));
  }
  PQsetnonblocking(conn, 1);
  absl::Cleanup blocking = [conn] { PQsetnonblocking(conn, 0); };
  while (true) {
    const int f = PQflush(conn);
    if (f == 0) break;
    if (f < 0) return absl::UnavailableError(absl::StrCat("postgresql: ", ConnError(conn)));
    if (!WaitSocket(conn, POLLIN | POLLOUT, deadline)) return timed_out();
    if (PQconsumeInput(conn) == 0) {
      return absl::UnavailableError(absl::StrCat("postgresql: ", ConnError(conn)));
    }
  }
  PGresult* last = nullptr;
  while (true) {
    while (PQisBusy(conn)) {
      if (!WaitSocket(conn, POLLIN, deadline)) {
        PQclear(last);
        return timed_out();
      }
      if (PQconsumeInput(conn) == 0) break;  // PQgetResult reports it
    }
    PGresult* r = PQgetResult(conn);
    if (r == nullptr) break;
    // Keep the first failure (a later result would hide it), else the last.
    if (last != nullptr && PQresultStatus(last) != PGRES_COMMAND_OK &&
        PQresultStatus(last) != PGRES_TUPLES_OK) {
      PQclear(r);
      continue;
    }
    PQclear(last);
    last = r;
    if (PQstatus(conn) == CONNECTION_BAD) break;
  }
  Result r(last);
  RETURN_IF_ERROR(r.status(conn));
  return r;
}

// One row of a Result as the shared row mapping reads it (sql_rows.h).
class PgRow : public SqlRow {
 public:
  PgRow(const Result& r, int row) : r_(r), row_(row) {}
  std::string Text(int col) const override { return r_.Text(row_, col); }
  int64_t Int(int col) const override { return r_.Int(row_, col); }
  bool Bool(int col) const override { return r_.Bool(row_, col); }

 private:
  const Result& r_;
  int row_;
};

// A shared statement's parameter as libpq text.
Param P(const SqlValue& v) {
  if (const auto* s = std::get_if<std::string>(&v)) return *s;
  if (const auto* n = std::get_if<int64_t>(&v)) return P(*n);
  if (const auto* b = std::get_if<bool>(&v)) return P(*b);
  return std::nullopt;
}

// Keeps the server's notices (e.g. "relation already exists, skipping") off stderr.
void QuietNotices(void*, const char*) {}

}  // namespace

bool PostgresStore::IsPostgresUri(const std::string& s) {
  return absl::StartsWith(s, "postgresql://") || absl::StartsWith(s, "postgres://");
}

absl::StatusOr<std::unique_ptr<PostgresStore>> PostgresStore::Create(const std::string& uri) {
  return Create(uri, Timeouts{});
}

absl::StatusOr<std::unique_ptr<PostgresStore>> PostgresStore::Create(const std::string& uri,
                                                                     const Timeouts& timeouts) {
  if (!IsPostgresUri(uri)) {
    return absl::InvalidArgumentError(
        absl::StrCat("store: '", uri, "' is not a postgresql:// connection URI"));
  }
  if (timeouts.statement_ms > 0) g_statement_timeout_ms = timeouts.statement_ms;
  // connect_timeout first: a value in the URI (expanded after it) wins.
  const std::string connect_s =
      std::to_string(std::max<int64_t>(1, (timeouts.connect_ms + 999) / 1000));
  const char* keys[] = {"connect_timeout", "dbname", nullptr};
  const char* vals[] = {connect_s.c_str(), uri.c_str(), nullptr};
  PGconn* conn = PQconnectdbParams(keys, vals, /*expand_dbname=*/1);
  if (conn == nullptr || PQstatus(conn) != CONNECTION_OK) {
    std::string msg = conn ? PQerrorMessage(conn) : "out of memory";
    while (!msg.empty() && msg.back() == '\n') msg.pop_back();
    PQfinish(conn);
    return absl::UnavailableError(absl::StrCat("cannot connect to PostgreSQL: ", msg));
  }
  PQsetNoticeProcessor(conn, QuietNotices, nullptr);
  std::unique_ptr<PostgresStore> store(new PostgresStore(uri, conn));
  absl::MutexLock lock(&store->mu_);
  RETURN_IF_ERROR(store->Migrate());
  return store;
}

// ---- Blobs ------------------------------------------------------------------

class PostgresStore::Blobs : public BlobStore {
 public:
  explicit Blobs(PostgresStore* store) : s_(store) {}

  absl::Status Put(const std::string& key, const std::string& bytes,
                   const std::string& fence_job) override {
    RETURN_IF_ERROR(ValidateBlobKey(key));
    absl::MutexLock lock(&s_->mu_);
    RETURN_IF_ERROR(s_->EnsureConnected());
    const std::string upsert =
        "INSERT INTO blobs(key, bytes, size, fnv1a64, updated_unix_ms) VALUES ($1, $2, $3, $4, "
        "(extract(epoch from now()) * 1000)::bigint) ON CONFLICT (key) DO UPDATE SET "
        "bytes = EXCLUDED.bytes, size = EXCLUDED.size, fnv1a64 = EXCLUDED.fnv1a64, "
        "updated_unix_ms = EXCLUDED.updated_unix_ms";
    const std::vector<Param> params = {P(key), P(bytes), P(static_cast<int64_t>(bytes.size())),
                                       P(Fnv1a64Hex(bytes))};
    absl::Status st;
    if (!fence_job.empty() && s_->FenceLocked(fence_job)) {
      // The epoch check (job row locked until commit) and the write, together.
      Transaction tx(s_);
      RETURN_IF_ERROR(tx.status());
      RETURN_IF_ERROR(s_->CheckFenceLocked(fence_job, absl::StrCat("write of blob ", key).c_str()));
      st = Exec(s_->conn_, upsert, params, {0, 1}).status();
      if (st.ok()) st = tx.Commit();
    } else {
      st = Exec(s_->conn_, upsert, params, {0, 1}).status();
    }
    if (!st.ok()) return absl::Status(st.code(), absl::StrCat("blob ", key, ": ", st.message()));
    return absl::OkStatus();
  }

  absl::StatusOr<std::string> Get(const std::string& key) override {
    RETURN_IF_ERROR(ValidateBlobKey(key));
    absl::MutexLock lock(&s_->mu_);
    RETURN_IF_ERROR(s_->EnsureConnected());
    // Binary results: the bytes as stored; size as text (no int8 decoding).
    ASSIGN_OR_RETURN(Result r, Exec(s_->conn_,
                                    "SELECT bytes, size::text, fnv1a64 FROM blobs WHERE key = $1",
                                    {P(key)}, {}, /*binary_result=*/true));
    if (r.rows() == 0) {
      return absl::NotFoundError(absl::StrCat("blob ", key, " not found in ", Describe()));
    }
    std::string bytes = r.Text(0, 0);
    if (std::to_string(bytes.size()) != r.Text(0, 1) || Fnv1a64Hex(bytes) != r.Text(0, 2)) {
      return absl::DataLossError(absl::StrCat("blob ", key, " in ", Describe(),
                                              ": the bytes do not match their recorded size "
                                              "and hash"));
    }
    return bytes;
  }

  absl::StatusOr<bool> Exists(const std::string& key) override {
    RETURN_IF_ERROR(ValidateBlobKey(key));
    absl::MutexLock lock(&s_->mu_);
    RETURN_IF_ERROR(s_->EnsureConnected());
    ASSIGN_OR_RETURN(Result r, Exec(s_->conn_, "SELECT 1 FROM blobs WHERE key = $1", {P(key)}));
    return r.rows() > 0;
  }

  absl::StatusOr<std::vector<std::string>> List(const std::string& prefix) override {
    absl::MutexLock lock(&s_->mu_);
    RETURN_IF_ERROR(s_->EnsureConnected());
    // The key column's "C" collation: byte order, and a range scan of the
    // primary key finds a prefix.
    ASSIGN_OR_RETURN(Result r, Exec(s_->conn_,
                                    "SELECT key FROM blobs WHERE starts_with(key, $1) "
                                    "ORDER BY key",
                                    {P(prefix)}));
    std::vector<std::string> out;
    for (int i = 0; i < r.rows(); ++i) out.push_back(r.Text(i, 0));
    return out;
  }

  absl::Status Delete(const std::string& key) override {
    RETURN_IF_ERROR(ValidateBlobKey(key));
    absl::MutexLock lock(&s_->mu_);
    RETURN_IF_ERROR(s_->EnsureConnected());
    return Exec(s_->conn_, "DELETE FROM blobs WHERE key = $1", {P(key)}).status();
  }

  std::string Describe() const override { return "postgresql"; }

 private:
  PostgresStore* s_;
};

PostgresStore::PostgresStore(std::string uri, pg_conn* conn)
    : uri_(std::move(uri)), conn_(conn), blobs_(new Blobs(this)) {}

BlobStore* PostgresStore::blob_store() { return blobs_.get(); }

PostgresStore::~PostgresStore() {
  absl::MutexLock lock(&mu_);
  PQfinish(conn_);
}

absl::Status PostgresStore::EnsureConnected() {
  if (PQstatus(conn_) == CONNECTION_OK) return absl::OkStatus();
  PQreset(conn_);
  if (PQstatus(conn_) != CONNECTION_OK) {
    std::string msg = PQerrorMessage(conn_);
    while (!msg.empty() && msg.back() == '\n') msg.pop_back();
    return absl::UnavailableError(absl::StrCat("PostgreSQL connection lost: ", msg));
  }
  PQsetNoticeProcessor(conn_, QuietNotices, nullptr);
  return absl::OkStatus();
}

absl::Status PostgresStore::Migrate() {
  Transaction tx(this);
  RETURN_IF_ERROR(tx.status());
  RETURN_IF_ERROR(Exec(conn_, "SELECT pg_advisory_xact_lock($1)", {P(kMigrationLockKey)}).status());
  RETURN_IF_ERROR(Exec(conn_,
                       "CREATE TABLE IF NOT EXISTS schema_migrations ("
                       "version BIGINT PRIMARY KEY, applied_unix_ms BIGINT NOT NULL)")
                      .status());
  ASSIGN_OR_RETURN(Result cur,
                   Exec(conn_, "SELECT COALESCE(MAX(version), 0) FROM schema_migrations"));
  const int64_t current = cur.Int(0, 0);
  const int64_t n = static_cast<int64_t>(sizeof(kMigrations) / sizeof(kMigrations[0]));
  RETURN_IF_ERROR(CheckSchemaNotNewer(current, n));
  for (int64_t v = current; v < n; ++v) {
    // Simple query protocol: one migration may hold several statements.
    Result r(PQexec(conn_, kMigrations[v]));
    RETURN_IF_ERROR(r.status(conn_));
    RETURN_IF_ERROR(Exec(conn_,
                         "INSERT INTO schema_migrations(version, applied_unix_ms) "
                         "VALUES ($1, (extract(epoch from now()) * 1000)::bigint)",
                         {P(v + 1)})
                        .status());
  }
  return tx.Commit();
}

absl::StatusOr<int64_t> PostgresStore::RunLocked(const std::string& sql,
                                                 const std::vector<SqlValue>& params,
                                                 const RowFn& row) {
  std::vector<Param> text;
  text.reserve(params.size());
  for (const SqlValue& v : params) text.push_back(P(v));
  ASSIGN_OR_RETURN(Result r, Exec(conn_, sql, text));
  if (row) {
    for (int i = 0; i < r.rows(); ++i) RETURN_IF_ERROR(row(PgRow(r, i)));
  }
  return r.affected();  // PQcmdTuples: rows changed, or returned by a SELECT
}

absl::Status PostgresStore::LockFamilyLocked(const std::string& family) {
  // A transaction advisory lock on the family key serialises publications of
  // one family across replicas (a row lock cannot cover a family with no row
  // yet).
  return Exec(conn_, "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", {P(family)}).status();
}

// ---- Claims -----------------------------------------------------------------

absl::StatusOr<JobRecord> PostgresStore::Claim(const std::string& sql, const std::string& replica,
                                               int64_t lease_ms, const char* none,
                                               std::string* previous_holder) {
  if (replica.empty()) return absl::InvalidArgumentError("replica: must not be empty");
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(EnsureConnected());
  ASSIGN_OR_RETURN(Result r, Exec(conn_, sql, {P(replica), P(lease_ms)}));
  if (r.rows() == 0) return absl::NotFoundError(none);
  ASSIGN_OR_RETURN(JobRecord j, JobFromRow(PgRow(r, 0)));
  j.claim_epoch = r.Int(0, 13);
  if (previous_holder) *previous_holder = r.Text(0, 14);
  return j;
}

absl::StatusOr<JobRecord> PostgresStore::ClaimNextJob(const std::string& replica,
                                                      int64_t lease_ms) {
  // The queue pattern: the subquery locks the oldest claimable row, skipping
  // rows another replica is claiming right now; the UPDATE takes it.
  return Claim(absl::StrCat("UPDATE jobs SET claimed_by = $1, cancel_requested = false, "
                            "lease_until = now() + $2 * interval '1 millisecond', "
                            "claim_epoch = claim_epoch + 1 "
                            "WHERE seq = (SELECT seq FROM jobs WHERE state = 'QUEUED' AND "
                            "claimed_by IS NULL ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED) "
                            "RETURNING ",
                            JobCols(), ", claim_epoch"),
               replica, lease_ms, "no queued job to claim", nullptr);
}

absl::StatusOr<bool> PostgresStore::RenewLease(const std::string& job_id,
                                               const std::string& replica, int64_t lease_ms) {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(EnsureConnected());
  const std::optional<int64_t> fence = FenceLocked(job_id);
  std::vector<Param> params = {P(job_id), P(replica), P(lease_ms)};
  if (fence) params.push_back(P(*fence));
  ASSIGN_OR_RETURN(Result r, Exec(conn_,
                                  absl::StrCat("UPDATE jobs SET lease_until = now() + $3 * "
                                               "interval '1 millisecond' WHERE id = $1 AND "
                                               "claimed_by = $2",
                                               fence ? " AND claim_epoch = $4" : "",
                                               " RETURNING cancel_requested"),
                                  params));
  if (r.rows() > 0) return r.Bool(0, 0);
  if (fence) RETURN_IF_ERROR(CheckFenceLocked(job_id, "lease renewal"));
  ASSIGN_OR_RETURN(Result h, Exec(conn_, "SELECT claimed_by FROM jobs WHERE id = $1", {P(job_id)}));
  if (h.rows() == 0) return absl::NotFoundError(absl::StrCat("job ", job_id, " not found"));
  return absl::FailedPreconditionError(
      absl::StrCat("job ", job_id, " is no longer held by replica ", replica, " (held by ",
                   h.IsNull(0, 0) ? std::string("nobody") : h.Text(0, 0), ")"));
}

absl::Status PostgresStore::RequestCancel(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(EnsureConnected());
  ASSIGN_OR_RETURN(Result r, Exec(conn_, "UPDATE jobs SET cancel_requested = true WHERE id = $1",
                                  {P(job_id)}));
  if (r.affected() == 0) return absl::NotFoundError(absl::StrCat("job ", job_id, " not found"));
  return absl::OkStatus();
}

absl::Status PostgresStore::ReleaseClaim(const std::string& job_id, const std::string& replica) {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(EnsureConnected());
  ASSIGN_OR_RETURN(Result r, Exec(conn_,
                                  "UPDATE jobs SET claimed_by = NULL, lease_until = NULL "
                                  "WHERE id = $1 AND claimed_by = $2",
                                  {P(job_id), P(replica)}));
  if (r.affected() == 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("job ", job_id, " is not held by replica ", replica));
  }
  return absl::OkStatus();
}

absl::StatusOr<JobRecord> PostgresStore::TakeOverExpiredJob(const std::string& replica,
                                                            int64_t lease_ms,
                                                            std::string* previous_holder) {
  return Claim(absl::StrCat("WITH victim AS (SELECT seq, claimed_by AS prev FROM jobs "
                            "WHERE state IN ('QUEUED', 'VALIDATING', 'RUNNING') AND claimed_by IS "
                            "NOT NULL AND lease_until < now() ORDER BY seq LIMIT 1 "
                            "FOR UPDATE SKIP LOCKED) "
                            "UPDATE jobs j SET claimed_by = $1, "
                            "lease_until = now() + $2 * interval '1 millisecond', "
                            "claim_epoch = j.claim_epoch + 1 FROM victim "
                            "WHERE j.seq = victim.seq RETURNING ",
                            JobCols("j."), ", j.claim_epoch, victim.prev"),
               replica, lease_ms, "no expired claim", previous_holder);
}

// ---- Fencing and health -----------------------------------------------------

void PostgresStore::HoldFence(const std::string& job_id, int64_t epoch) {
  absl::MutexLock lock(&mu_);
  fences_[job_id] = epoch;
}

void PostgresStore::DropFence(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  fences_.erase(job_id);
}

std::optional<int64_t> PostgresStore::FenceLocked(const std::string& job_id) {
  auto it = fences_.find(job_id);
  if (it == fences_.end()) return std::nullopt;
  return it->second;
}

absl::Status PostgresStore::CheckFenceLocked(const std::string& job_id, const char* what) {
  const std::optional<int64_t> fence = FenceLocked(job_id);
  if (!fence) return absl::OkStatus();
  ASSIGN_OR_RETURN(Result r, Exec(conn_,
                                  "SELECT claim_epoch, COALESCE(claimed_by, '') FROM jobs "
                                  "WHERE id = $1 FOR SHARE",
                                  {P(job_id)}));
  if (r.rows() == 0) return absl::NotFoundError(absl::StrCat("job ", job_id, " not found"));
  if (r.Int(0, 0) != *fence) {
    return absl::FailedPreconditionError(absl::StrCat(
        "job ", job_id, ": stale fencing token: this replica's claim is epoch ", *fence,
        ", the job's is ", r.Int(0, 0), " (taken over", r.Text(0, 1).empty() ? "" : " by ",
        r.Text(0, 1), "); the ", what, " was refused"));
  }
  return absl::OkStatus();
}

absl::Status PostgresStore::Ping() {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(EnsureConnected());
  return Exec(conn_, "SELECT 1").status();
}

}  // namespace metatt
