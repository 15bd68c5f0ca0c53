#include "server/store/postgres_store.h"

#include <libpq-fe.h>
#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <nlohmann/json.hpp>
#include <optional>
#include <utility>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "base/file_io.h"
#include "base/status_macros.h"
#include "server/store/job_json.h"
#include "server/store/json_slice.h"
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
Param NullIfEmpty(const std::string& s) { return s.empty() ? Param() : Param(s); }

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

// BEGIN ... COMMIT, rolled back unless Commit() succeeded.
class Transaction {
 public:
  explicit Transaction(PGconn* conn) : conn_(conn) { status_ = Exec(conn, "BEGIN").status(); }
  ~Transaction() {
    if (status_.ok() && !committed_) Exec(conn_, "ROLLBACK").status().IgnoreError();
  }
  const absl::Status& status() const { return status_; }
  absl::Status Commit() {
    RETURN_IF_ERROR(Exec(conn_, "COMMIT").status());
    committed_ = true;
    return absl::OkStatus();
  }

 private:
  PGconn* conn_;
  absl::Status status_;
  bool committed_ = false;
};

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

DatasetRecord ReadDataset(const Result& r, int row) { return DatasetFromRow(PgRow(r, row)); }
absl::StatusOr<JobRecord> ReadJob(const Result& r, int row) { return JobFromRow(PgRow(r, row)); }
absl::StatusOr<FamilyVersionRecord> ReadFamily(const Result& r, int row, bool with_tasks,
                                               int64_t first_task = 0, int64_t max_tasks = -1) {
  return FamilyFromRow(PgRow(r, row), with_tasks, first_task, max_tasks);
}

// "$1, $2, ..., $n"
std::string Placeholders(int n) {
  std::string out;
  for (int i = 1; i <= n; ++i) absl::StrAppend(&out, i > 1 ? ", " : "", "$", i);
  return out;
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
      Transaction tx(s_->conn_);
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
  Transaction tx(conn_);
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
  if (current > n) {
    return absl::FailedPreconditionError(absl::StrCat("database schema version ", current,
                                                      " is newer than this server (", n,
                                                      "); refusing to open it"));
  }
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

absl::StatusOr<int> PostgresStore::SchemaVersion() {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(EnsureConnected());
  ASSIGN_OR_RETURN(Result r, Exec(conn_, "SELECT COALESCE(MAX(version), 0) FROM schema_migrations"));
  return static_cast<int>(r.Int(0, 0));
}

// ---- Datasets ---------------------------------------------------------------

absl::Status PostgresStore::PutDataset(const DatasetRecord& d) {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(EnsureConnected());
  auto r = Exec(conn_,
                absl::StrCat("INSERT INTO datasets(", kDatasetCols, ") VALUES (",
                             Placeholders(12), ")"),
                {P(d.id), P(d.name), P(d.format), P(d.spec_json), P(d.sha256), P(d.path),
                 P(d.num_rows), P(d.size_bytes), P(StringsToJson(d.label_names)),
                 P(d.regression), P(d.created_unix_ms), P(d.tenant)});
  if (absl::IsAlreadyExists(r.status())) {
    return absl::AlreadyExistsError(absl::StrCat("dataset ", d.id, " already exists"));
  }
  return r.status();
}

absl::StatusOr<DatasetRecord> PostgresStore::GetDataset(const std::string& id) {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(EnsureConnected());
  ASSIGN_OR_RETURN(Result r, Exec(conn_,
                                  absl::StrCat("SELECT ", kDatasetCols, " FROM datasets WHERE id = $1"),
                                  {P(id)}));
  if (r.rows() == 0) return absl::NotFoundError(absl::StrCat("dataset ", id, " not found"));
  return ReadDataset(r, 0);
}

absl::StatusOr<std::vector<DatasetRecord>> PostgresStore::ListDatasets() {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(EnsureConnected());
  ASSIGN_OR_RETURN(
      Result r,
      Exec(conn_, absl::StrCat("SELECT ", kDatasetCols, " FROM datasets ORDER BY created_unix_ms, id")));
  std::vector<DatasetRecord> out;
  for (int i = 0; i < r.rows(); ++i) out.push_back(ReadDataset(r, i));
  return out;
}

absl::Status PostgresStore::DeleteDataset(const std::string& id) {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(EnsureConnected());
  Transaction tx(conn_);
  RETURN_IF_ERROR(tx.status());
  // Lock the dataset row: a concurrent CreateJob referencing it waits for us.
  ASSIGN_OR_RETURN(Result ds, Exec(conn_, "SELECT id FROM datasets WHERE id = $1 FOR UPDATE", {P(id)}));
  if (ds.rows() == 0) return absl::NotFoundError(absl::StrCat("dataset ", id, " not found"));
  ASSIGN_OR_RETURN(Result ref, Exec(conn_,
                                    "SELECT job_id FROM job_datasets WHERE dataset_id = $1 "
                                    "ORDER BY job_id LIMIT 1",
                                    {P(id)}));
  if (ref.rows() > 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("dataset ", id, " is referenced by job ", ref.Text(0, 0)));
  }
  RETURN_IF_ERROR(Exec(conn_, "DELETE FROM datasets WHERE id = $1", {P(id)}).status());
  return tx.Commit();
}

// ---- Jobs -------------------------------------------------------------------

absl::StatusOr<JobRecord> PostgresStore::CreateJob(const JobRecord& j) {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(EnsureConnected());
  Transaction tx(conn_);
  RETURN_IF_ERROR(tx.status());
  // ON CONFLICT DO NOTHING on the key: a concurrent create with the same key
  // (another replica) waits for the first and then inserts nothing.
  auto ins_or =
      Exec(conn_,
           "INSERT INTO jobs(id, idempotency_key, spec_json, state, failure_reason, "
           "created_unix_ms, updated_unix_ms, step, total_steps, result_family, result_version, "
           "tenant) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12) "
           "ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
           {P(j.id), NullIfEmpty(j.spec.idempotency_key), P(JobSpecToJson(j.spec)),
            P(std::string(JobStateName(j.state))), P(j.failure_reason), P(j.created_unix_ms),
            P(j.updated_unix_ms), P(j.step), P(j.total_steps), P(j.result_family),
            P(j.result_version), P(j.tenant)});
  if (absl::IsAlreadyExists(ins_or.status())) {
    return absl::AlreadyExistsError(absl::StrCat("job ", j.id, " already exists"));
  }
  RETURN_IF_ERROR(ins_or.status());
  const Result& ins = *ins_or;
  if (ins.rows() == 0) {
    ASSIGN_OR_RETURN(Result r, Exec(conn_,
                                    absl::StrCat("SELECT ", JobCols(),
                                                 " FROM jobs WHERE idempotency_key = $1"),
                                    {P(j.spec.idempotency_key)}));
    if (r.rows() == 0) return absl::InternalError("idempotency key conflict without a job");
    return ReadJob(r, 0);
  }
  for (const auto& t : j.spec.tasks) {
    for (const std::string* ds : {&t.dataset_id, &t.eval_dataset_id}) {
      if (ds->empty()) continue;
      RETURN_IF_ERROR(Exec(conn_,
                           "INSERT INTO job_datasets(job_id, dataset_id) VALUES ($1, $2) "
                           "ON CONFLICT DO NOTHING",
                           {P(j.id), P(*ds)})
                          .status());
    }
  }
  RETURN_IF_ERROR(tx.Commit());
  return j;
}

absl::StatusOr<JobRecord> PostgresStore::FindJobByIdempotencyKey(const std::string& key) {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(EnsureConnected());
  ASSIGN_OR_RETURN(Result r, Exec(conn_,
                                  absl::StrCat("SELECT ", JobCols(),
                                               " FROM jobs WHERE idempotency_key = $1"),
                                  {P(key)}));
  if (r.rows() == 0) return absl::NotFoundError(absl::StrCat("no job with idempotency key ", key));
  return ReadJob(r, 0);
}

absl::Status PostgresStore::UpdateJob(const JobRecord& j) {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(EnsureConnected());
  const std::optional<int64_t> fence = FenceLocked(j.id);
  std::vector<Param> params = {P(std::string(JobStateName(j.state))), P(j.failure_reason),
                               P(j.updated_unix_ms), P(j.step), P(j.total_steps),
                               P(j.result_family), P(j.result_version), P(j.id)};
  if (fence) params.push_back(P(*fence));
  // The epoch in the WHERE clause: checked atomically with the write.
  ASSIGN_OR_RETURN(Result r,
                   Exec(conn_,
                        absl::StrCat("UPDATE jobs SET state = $1, failure_reason = $2, "
                                     "updated_unix_ms = $3, step = $4, total_steps = $5, "
                                     "result_family = $6, result_version = $7 WHERE id = $8",
                                     fence ? " AND claim_epoch = $9" : ""),
                        params));
  if (r.affected() == 0) {
    if (fence) RETURN_IF_ERROR(CheckFenceLocked(j.id, "update"));
    return absl::NotFoundError(absl::StrCat("job ", j.id, " not found"));
  }
  return absl::OkStatus();
}

absl::StatusOr<JobRecord> PostgresStore::GetJob(const std::string& id) {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(EnsureConnected());
  ASSIGN_OR_RETURN(Result r, Exec(conn_, absl::StrCat("SELECT ", JobCols(), " FROM jobs WHERE id = $1"),
                                  {P(id)}));
  if (r.rows() == 0) return absl::NotFoundError(absl::StrCat("job ", id, " not found"));
  return ReadJob(r, 0);
}

absl::StatusOr<std::vector<JobRecord>> PostgresStore::ListJobs(std::optional<JobState> state,
                                                               int64_t page_size,
                                                               const std::string& page_token,
                                                               std::string* next_page_token) {
  int64_t after = 0;
  if (!page_token.empty() && !absl::SimpleAtoi(page_token, &after)) {
    return absl::InvalidArgumentError(absl::StrCat("page_token: invalid token '", page_token, "'"));
  }
  if (page_size <= 0) page_size = 50;
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(EnsureConnected());
  std::vector<Param> params = {P(after)};
  if (state) params.push_back(P(std::string(JobStateName(*state))));
  params.push_back(P(page_size + 1));
  ASSIGN_OR_RETURN(Result r, Exec(conn_,
                                  absl::StrCat("SELECT ", JobCols(), " FROM jobs WHERE seq > $1",
                                               state ? " AND state = $2 ORDER BY seq LIMIT $3"
                                                     : " ORDER BY seq LIMIT $2"),
                                  params));
  std::vector<JobRecord> out;
  int64_t last_seq = 0;
  const bool more = r.rows() > page_size;
  for (int i = 0; i < r.rows() && i < page_size; ++i) {
    ASSIGN_OR_RETURN(JobRecord j, ReadJob(r, i));
    last_seq = r.Int(i, 0);
    out.push_back(std::move(j));
  }
  if (next_page_token) *next_page_token = more ? absl::StrCat(last_seq) : "";
  return out;
}

absl::Status PostgresStore::AppendJobEvent(const std::string& job_id, const JobEvent& e) {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(EnsureConnected());
  const std::string json = JobEventToJson(e);
  // Two replicas may append to one job at once (a cancel request next to the
  // holder's progress): the loser of the (job_id, seq) race retries.
  absl::Status st;
  for (int attempt = 0; attempt < 8; ++attempt) {
    if (FenceLocked(job_id)) {
      // The epoch check (row locked until commit) and the insert, together.
      Transaction tx(conn_);
      RETURN_IF_ERROR(tx.status());
      RETURN_IF_ERROR(CheckFenceLocked(job_id, "event"));
      st = Exec(conn_,
                "INSERT INTO job_events(job_id, seq, event_json) SELECT $1, "
                "COALESCE(MAX(seq) + 1, 0), $2 FROM job_events WHERE job_id = $1",
                {P(job_id), P(json)})
               .status();
      if (st.ok()) st = tx.Commit();
    } else {
      st = Exec(conn_,
                "INSERT INTO job_events(job_id, seq, event_json) SELECT $1, "
                "COALESCE(MAX(seq) + 1, 0), $2 FROM job_events WHERE job_id = $1",
                {P(job_id), P(json)})
               .status();
    }
    if (!absl::IsAlreadyExists(st)) return st;
  }
  return st;
}

absl::StatusOr<std::vector<JobEvent>> PostgresStore::ListJobEvents(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(EnsureConnected());
  ASSIGN_OR_RETURN(Result j, Exec(conn_, "SELECT 1 FROM jobs WHERE id = $1", {P(job_id)}));
  if (j.rows() == 0) return absl::NotFoundError(absl::StrCat("job ", job_id, " not found"));
  ASSIGN_OR_RETURN(Result r, Exec(conn_,
                                  "SELECT event_json FROM job_events WHERE job_id = $1 ORDER BY seq",
                                  {P(job_id)}));
  std::vector<JobEvent> out;
  for (int i = 0; i < r.rows(); ++i) {
    ASSIGN_OR_RETURN(JobEvent e, JobEventFromJson(r.Text(i, 0)));
    out.push_back(std::move(e));
  }
  return out;
}

// ---- Families ---------------------------------------------------------------

absl::Status PostgresStore::PublishFamilyVersion(const FamilyVersionRecord& f) {
  if (f.family.empty()) return absl::InvalidArgumentError("family: must not be empty");
  if (f.version <= 0) return absl::InvalidArgumentError("version: must be >= 1");
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(EnsureConnected());
  // The compare-and-swap and the insert in one transaction; a transaction
  // advisory lock on the family key serialises publications of one family
  // across replicas (a row lock cannot cover a family with no row yet).
  Transaction tx(conn_);
  RETURN_IF_ERROR(tx.status());
  RETURN_IF_ERROR(
      Exec(conn_, "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", {P(f.family)})
          .status());
  // A job's version: only while this replica still holds the job's claim.
  if (!f.created_by_job.empty() && FenceLocked(f.created_by_job)) {
    RETURN_IF_ERROR(CheckFenceLocked(f.created_by_job, "publication"));
  }
  ASSIGN_OR_RETURN(Result cur, Exec(conn_,
                                    "SELECT version, tenant FROM family_versions WHERE family = $1 "
                                    "ORDER BY version DESC LIMIT 1",
                                    {P(f.family)}));
  const int64_t newest = cur.rows() > 0 ? cur.Int(0, 0) : 0;
  const std::string owner = cur.rows() > 0 ? cur.Text(0, 1) : "";
  if (newest >= f.version) {
    return absl::AlreadyExistsError(absl::StrCat("family ", f.family, " version ", f.version,
                                                 " is already published (versions are immutable)"));
  }
  RETURN_IF_ERROR(CheckPublication(f.family, f.version, f.tenant, newest, owner));
  auto r = Exec(conn_,
                absl::StrCat("INSERT INTO family_versions(", kFamilyCols, ") VALUES (",
                             Placeholders(13), ")"),
                {P(f.family), P(f.version), P(f.form), P(f.config_json),
                 P(f.base_model_fingerprint), P(f.path), P(f.adapter_parameters),
                 P(TasksToJson(f.tasks)), P(f.created_by_job), P(f.created_unix_ms), P(f.tenant),
                 P(TaskCountOf(f)), P(f.parent_version)});
  if (absl::IsAlreadyExists(r.status())) {
    return absl::AlreadyExistsError(absl::StrCat("family ", f.family, " version ", f.version,
                                                 " is already published (versions are immutable)"));
  }
  RETURN_IF_ERROR(r.status());
  return tx.Commit();
}

absl::StatusOr<std::vector<FamilyVersionRecord>> PostgresStore::ListFamilyVersions(
    const std::string& family) {
  return ListFamilies(family, /*with_tasks=*/true);
}

absl::StatusOr<std::vector<FamilyVersionRecord>> PostgresStore::ListFamilyVersionSummaries(
    const std::string& family) {
  return ListFamilies(family, /*with_tasks=*/false);
}

absl::StatusOr<std::vector<FamilyVersionRecord>> PostgresStore::ListFamilies(
    const std::string& family, bool with_tasks) {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(EnsureConnected());
  std::vector<Param> params;
  if (!family.empty()) params.push_back(P(family));
  ASSIGN_OR_RETURN(Result r, Exec(conn_,
                                  absl::StrCat("SELECT ",
                                               with_tasks ? kFamilyCols : kFamilySummaryCols,
                                               " FROM family_versions",
                                               family.empty() ? "" : " WHERE family = $1",
                                               " ORDER BY family, version"),
                                  params));
  std::vector<FamilyVersionRecord> out;
  for (int i = 0; i < r.rows(); ++i) {
    ASSIGN_OR_RETURN(FamilyVersionRecord f, ReadFamily(r, i, with_tasks));
    out.push_back(std::move(f));
  }
  return out;
}

absl::StatusOr<FamilyVersionRecord> PostgresStore::GetFamilyVersion(const std::string& family,
                                                                    int64_t version) {
  return GetFamilyVersionTasks(family, version, 0, -1);
}

absl::StatusOr<FamilyVersionRecord> PostgresStore::GetFamilyVersionTasks(const std::string& family,
                                                                         int64_t version,
                                                                         int64_t first_task,
                                                                         int64_t max_tasks) {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(EnsureConnected());
  ASSIGN_OR_RETURN(Result r, Exec(conn_,
                                  absl::StrCat("SELECT ", kFamilyCols,
                                               " FROM family_versions WHERE family = $1 AND "
                                               "version = $2"),
                                  {P(family), P(version)}));
  if (r.rows() == 0) return FamilyVersionNotFound(family, version);
  return ReadFamily(r, 0, /*with_tasks=*/true, std::max<int64_t>(first_task, 0), max_tasks);
}

absl::Status PostgresStore::CompactFamilyVersion(const std::string& family, int64_t version,
                                                 const std::vector<TaskRecord>& tasks) {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(EnsureConnected());
  ASSIGN_OR_RETURN(Result r,
                   Exec(conn_,
                        "UPDATE family_versions SET tasks_json = $1, task_count = $2, "
                        "parent_version = 0 WHERE family = $3 AND version = $4",
                        {P(TasksToJson(tasks)), P(static_cast<int64_t>(tasks.size())), P(family),
                         P(version)}));
  if (r.affected() == 0) return FamilyVersionNotFound(family, version);
  return absl::OkStatus();
}

absl::Status PostgresStore::DeleteFamily(const std::string& family) {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(EnsureConnected());
  ASSIGN_OR_RETURN(Result r,
                   Exec(conn_, "DELETE FROM family_versions WHERE family = $1", {P(family)}));
  if (r.affected() == 0) return absl::NotFoundError(absl::StrCat("family ", family, " not found"));
  return absl::OkStatus();
}

// ---- Claims -----------------------------------------------------------------

absl::StatusOr<JobRecord> PostgresStore::ClaimNextJob(const std::string& replica,
                                                      int64_t lease_ms) {
  if (replica.empty()) return absl::InvalidArgumentError("replica: must not be empty");
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(EnsureConnected());
  // The queue pattern: the subquery locks the oldest claimable row, skipping
  // rows another replica is claiming right now; the UPDATE takes it.
  ASSIGN_OR_RETURN(
      Result r,
      Exec(conn_,
           absl::StrCat("UPDATE jobs SET claimed_by = $1, cancel_requested = false, "
                        "lease_until = now() + $2 * interval '1 millisecond', "
                        "claim_epoch = claim_epoch + 1 "
                        "WHERE seq = (SELECT seq FROM jobs WHERE state = 'QUEUED' AND "
                        "claimed_by IS NULL ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED) "
                        "RETURNING ",
                        JobCols(), ", claim_epoch"),
           {P(replica), P(lease_ms)}));
  if (r.rows() == 0) return absl::NotFoundError("no queued job to claim");
  ASSIGN_OR_RETURN(JobRecord j, ReadJob(r, 0));
  j.claim_epoch = r.Int(0, 13);
  return j;
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
  if (replica.empty()) return absl::InvalidArgumentError("replica: must not be empty");
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(EnsureConnected());
  ASSIGN_OR_RETURN(
      Result r,
      Exec(conn_,
           absl::StrCat("WITH victim AS (SELECT seq, claimed_by AS prev FROM jobs "
                        "WHERE state IN ('QUEUED', 'VALIDATING', 'RUNNING') AND claimed_by IS "
                        "NOT NULL AND lease_until < now() ORDER BY seq LIMIT 1 "
                        "FOR UPDATE SKIP LOCKED) "
                        "UPDATE jobs j SET claimed_by = $1, "
                        "lease_until = now() + $2 * interval '1 millisecond', "
                        "claim_epoch = j.claim_epoch + 1 FROM victim "
                        "WHERE j.seq = victim.seq RETURNING ",
                        JobCols("j."), ", victim.prev, j.claim_epoch"),
           {P(replica), P(lease_ms)}));
  if (r.rows() == 0) return absl::NotFoundError("no expired claim");
  if (previous_holder) *previous_holder = r.Text(0, 13);
  ASSIGN_OR_RETURN(JobRecord j, ReadJob(r, 0));
  j.claim_epoch = r.Int(0, 14);
  return j;
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
