#include "server/store/sqlite_store.h"

#include <sqlite3.h>

#include <algorithm>
#include <nlohmann/json.hpp>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "server/store/job_json.h"
#include "server/store/json_slice.h"
#include "server/store/sql_rows.h"

namespace metatt {
namespace {

// Schema migrations, applied in order; entry i brings the schema to version i+1.
// Never edit a shipped entry: append a new one.
const char* const kMigrations[] = {
    R"sql(
CREATE TABLE datasets (
  id TEXT PRIMARY KEY,
  name TEXT NOT NULL,
  format TEXT NOT NULL,
  spec_json TEXT NOT NULL,
  sha256 TEXT NOT NULL,
  path TEXT NOT NULL,
  num_rows INTEGER NOT NULL,
  size_bytes INTEGER NOT NULL,
  label_names_json TEXT NOT NULL,
  regression INTEGER NOT NULL,
  created_unix_ms INTEGER NOT NULL
);
CREATE TABLE jobs (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  idempotency_key TEXT UNIQUE,
  spec_json TEXT NOT NULL,
  state TEXT NOT NULL,
  failure_reason TEXT NOT NULL,
  created_unix_ms INTEGER NOT NULL,
  updated_unix_ms INTEGER NOT NULL,
  step INTEGER NOT NULL,
  total_steps INTEGER NOT NULL,
  result_family TEXT NOT NULL,
  result_version INTEGER NOT NULL
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
  seq INTEGER NOT NULL,
  event_json TEXT NOT NULL,
  PRIMARY KEY (job_id, seq)
);
CREATE TABLE family_versions (
  family TEXT NOT NULL,
  version INTEGER NOT NULL,
  form TEXT NOT NULL,
  config_json TEXT NOT NULL,
  base_model_fingerprint TEXT NOT NULL,
  path TEXT NOT NULL,
  adapter_parameters INTEGER NOT NULL,
  tasks_json TEXT NOT NULL,
  created_by_job TEXT NOT NULL,
  created_unix_ms INTEGER NOT NULL,
  PRIMARY KEY (family, version)
);
)sql",
    // 2: owner tenant of every record (rows written before tenants belong to "default").
    R"sql(
ALTER TABLE datasets ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default';
ALTER TABLE jobs ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default';
ALTER TABLE family_versions ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default';
)sql",
    // 3: task counts, so listings read no task list (existing rows: counted once
    // here). The table is rebuilt with tasks_json last: a row's columns are
    // stored in order, and a column stored after a large task list is reached
    // only by walking its overflow pages.
    R"sql(
CREATE TABLE family_versions_v3 (
  family TEXT NOT NULL,
  version INTEGER NOT NULL,
  form TEXT NOT NULL,
  config_json TEXT NOT NULL,
  base_model_fingerprint TEXT NOT NULL,
  path TEXT NOT NULL,
  adapter_parameters INTEGER NOT NULL,
  created_by_job TEXT NOT NULL,
  created_unix_ms INTEGER NOT NULL,
  tenant TEXT NOT NULL DEFAULT 'default',
  task_count INTEGER NOT NULL,
  tasks_json TEXT NOT NULL,
  PRIMARY KEY (family, version)
);
INSERT INTO family_versions_v3
  SELECT family, version, form, config_json, base_model_fingerprint, path, adapter_parameters,
         created_by_job, created_unix_ms, tenant, json_array_length(tasks_json), tasks_json
  FROM family_versions;
DROP TABLE family_versions;
ALTER TABLE family_versions_v3 RENAME TO family_versions;
)sql",
    // 4: appended versions (an add-task publication records only its new
    // tasks and the version it extends).
    R"sql(
ALTER TABLE family_versions ADD COLUMN parent_version INTEGER NOT NULL DEFAULT 0;
)sql",
    // 5: family names are per tenant (store.h FamilyKey): another tenant's
    // family gets its "<tenant>~" key; its files stay where `path` says.
    R"sql(
UPDATE family_versions SET family = tenant || '~' || family
  WHERE tenant <> 'default' AND instr(family, '~') = 0;
)sql",
};

// RAII prepared statement with typed binders / readers.
class Stmt : public SqlRow {
 public:
  Stmt(sqlite3* db, const char* sql) : db_(db) {
    rc_ = sqlite3_prepare_v2(db, sql, -1, &stmt_, nullptr);
  }
  ~Stmt() { sqlite3_finalize(stmt_); }
  Stmt(const Stmt&) = delete;
  Stmt& operator=(const Stmt&) = delete;

  absl::Status status() const {
    if (rc_ == SQLITE_OK) return absl::OkStatus();
    return absl::InternalError(absl::StrCat("sqlite prepare: ", sqlite3_errmsg(db_)));
  }
  Stmt& Bind(int i, const std::string& s) {
    sqlite3_bind_text(stmt_, i, s.data(), static_cast<int>(s.size()), SQLITE_TRANSIENT);
    return *this;
  }
  Stmt& BindNullableText(int i, const std::string& s) {
    if (s.empty()) {
      sqlite3_bind_null(stmt_, i);
      return *this;
    }
    return Bind(i, s);
  }
  Stmt& Bind(int i, int64_t v) {
    sqlite3_bind_int64(stmt_, i, v);
    return *this;
  }
  // SQLITE_ROW -> true, SQLITE_DONE -> false, else error.
  absl::StatusOr<bool> Step() {
    RETURN_IF_ERROR(status());
    int rc = sqlite3_step(stmt_);
    if (rc == SQLITE_ROW) return true;
    if (rc == SQLITE_DONE) return false;
    if (rc == SQLITE_CONSTRAINT) {
      return absl::AlreadyExistsError(absl::StrCat("sqlite: ", sqlite3_errmsg(db_)));
    }
    return absl::InternalError(absl::StrCat("sqlite step: ", sqlite3_errmsg(db_)));
  }
  absl::Status Run() {
    auto r = Step();
    return r.ok() ? absl::OkStatus() : r.status();
  }
  std::string Text(int col) const override {
    const unsigned char* p = sqlite3_column_text(stmt_, col);
    int n = sqlite3_column_bytes(stmt_, col);
    return p ? std::string(reinterpret_cast<const char*>(p), n) : std::string();
  }
  int64_t Int(int col) const override { return sqlite3_column_int64(stmt_, col); }
  bool Bool(int col) const override { return Int(col) != 0; }

 private:
  sqlite3* db_;
  sqlite3_stmt* stmt_ = nullptr;
  int rc_;
};

absl::Status Exec(sqlite3* db, const char* sql) {
  char* err = nullptr;
  if (sqlite3_exec(db, sql, nullptr, nullptr, &err) != SQLITE_OK) {
    std::string msg = err ? err : "unknown error";
    sqlite3_free(err);
    return absl::InternalError(absl::StrCat("sqlite: ", msg));
  }
  return absl::OkStatus();
}

// BEGIN IMMEDIATE ... COMMIT, rolled back unless Commit() succeeded.
class Transaction {
 public:
  explicit Transaction(sqlite3* db) : db_(db) { status_ = Exec(db, "BEGIN IMMEDIATE"); }
  ~Transaction() {
    if (status_.ok() && !committed_) Exec(db_, "ROLLBACK").IgnoreError();
  }
  const absl::Status& status() const { return status_; }
  absl::Status Commit() {
    RETURN_IF_ERROR(Exec(db_, "COMMIT"));
    committed_ = true;
    return absl::OkStatus();
  }

 private:
  sqlite3* db_;
  absl::Status status_;
  bool committed_ = false;
};

// Row mapping and column lists: sql_rows.h (shared with the PostgreSQL store).
DatasetRecord ReadDataset(const Stmt& s) { return DatasetFromRow(s); }
absl::StatusOr<JobRecord> ReadJob(const Stmt& s) { return JobFromRow(s); }
absl::StatusOr<FamilyVersionRecord> ReadFamily(const Stmt& s, bool with_tasks,
                                               int64_t first_task = 0, int64_t max_tasks = -1) {
  return FamilyFromRow(s, with_tasks, first_task, max_tasks);
}

}  // namespace

absl::StatusOr<std::unique_ptr<SqliteStore>> SqliteStore::Create(const std::string& path) {
  sqlite3* db = nullptr;
  int rc =
      sqlite3_open_v2(path.c_str(), &db,
                      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX, nullptr);
  if (rc != SQLITE_OK) {
    std::string msg = db ? sqlite3_errmsg(db) : "out of memory";
    sqlite3_close(db);
    return absl::UnavailableError(absl::StrCat("cannot open database ", path, ": ", msg));
  }
  std::unique_ptr<SqliteStore> store(new SqliteStore(db));
  absl::MutexLock lock(&store->mu_);
  sqlite3_busy_timeout(db, 5000);
  RETURN_IF_ERROR(Exec(db, "PRAGMA journal_mode=WAL"));
  // FULL, not NORMAL: in WAL mode NORMAL fsyncs only at checkpoints, so a
  // commit the caller was told about (an upload, a job, a published version)
  // can roll back on power loss. FULL fsyncs the WAL at every commit.
  RETURN_IF_ERROR(Exec(db, "PRAGMA synchronous=FULL"));
  RETURN_IF_ERROR(Exec(db, "PRAGMA foreign_keys=ON"));
  RETURN_IF_ERROR(store->Migrate());
  return store;
}

SqliteStore::~SqliteStore() {
  absl::MutexLock lock(&mu_);
  sqlite3_close(db_);
}

absl::Status SqliteStore::Migrate() {
  RETURN_IF_ERROR(Exec(db_,
                       "CREATE TABLE IF NOT EXISTS schema_migrations ("
                       "version INTEGER PRIMARY KEY, applied_unix_ms INTEGER NOT NULL)"));
  int64_t current = 0;
  {
    Stmt s(db_, "SELECT COALESCE(MAX(version), 0) FROM schema_migrations");
    ASSIGN_OR_RETURN(bool row, s.Step());
    if (row) current = s.Int(0);
  }
  const int64_t n = static_cast<int64_t>(sizeof(kMigrations) / sizeof(kMigrations[0]));
  if (current > n) {
    return absl::FailedPreconditionError(absl::StrCat("database schema version ", current,
                                                      " is newer than this server (", n,
                                                      "); refusing to open it"));
  }
  for (int64_t v = current; v < n; ++v) {
    Transaction tx(db_);
    RETURN_IF_ERROR(tx.status());
    RETURN_IF_ERROR(Exec(db_, kMigrations[v]));
    Stmt s(db_,
           "INSERT INTO schema_migrations(version, applied_unix_ms) "
           "VALUES (?, CAST(strftime('%s','now') AS INTEGER) * 1000)");
    s.Bind(1, v + 1);
    RETURN_IF_ERROR(s.Run());
    RETURN_IF_ERROR(tx.Commit());
  }
  return absl::OkStatus();
}

absl::StatusOr<int> SqliteStore::SchemaVersion() {
  absl::MutexLock lock(&mu_);
  Stmt s(db_, "SELECT COALESCE(MAX(version), 0) FROM schema_migrations");
  ASSIGN_OR_RETURN(bool row, s.Step());
  return row ? static_cast<int>(s.Int(0)) : 0;
}

// ---- Datasets ---------------------------------------------------------------

absl::Status SqliteStore::PutDataset(const DatasetRecord& d) {
  absl::MutexLock lock(&mu_);
  Stmt s(db_,
         absl::StrCat("INSERT INTO datasets(", kDatasetCols, ") VALUES (?,?,?,?,?,?,?,?,?,?,?,?)")
             .c_str());
  s.Bind(1, d.id).Bind(2, d.name).Bind(3, d.format).Bind(4, d.spec_json).Bind(5, d.sha256);
  s.Bind(6, d.path).Bind(7, d.num_rows).Bind(8, d.size_bytes);
  s.Bind(9, StringsToJson(d.label_names)).Bind(10, int64_t{d.regression ? 1 : 0});
  s.Bind(11, d.created_unix_ms).Bind(12, d.tenant);
  auto st = s.Run();
  if (absl::IsAlreadyExists(st)) {
    return absl::AlreadyExistsError(absl::StrCat("dataset ", d.id, " already exists"));
  }
  return st;
}

absl::StatusOr<DatasetRecord> SqliteStore::GetDataset(const std::string& id) {
  absl::MutexLock lock(&mu_);
  Stmt s(db_, absl::StrCat("SELECT ", kDatasetCols, " FROM datasets WHERE id = ?").c_str());
  s.Bind(1, id);
  ASSIGN_OR_RETURN(bool row, s.Step());
  if (!row) return absl::NotFoundError(absl::StrCat("dataset ", id, " not found"));
  return ReadDataset(s);
}

absl::StatusOr<std::vector<DatasetRecord>> SqliteStore::ListDatasets() {
  absl::MutexLock lock(&mu_);
  Stmt s(
      db_,
      absl::StrCat("SELECT ", kDatasetCols, " FROM datasets ORDER BY created_unix_ms, id").c_str());
  std::vector<DatasetRecord> out;
  while (true) {
    ASSIGN_OR_RETURN(bool row, s.Step());
    if (!row) break;
    out.push_back(ReadDataset(s));
  }
  return out;
}

absl::Status SqliteStore::DeleteDataset(const std::string& id) {
  absl::MutexLock lock(&mu_);
  Transaction tx(db_);
  RETURN_IF_ERROR(tx.status());
  {
    Stmt s(db_, "SELECT job_id FROM job_datasets WHERE dataset_id = ? ORDER BY job_id LIMIT 1");
    s.Bind(1, id);
    ASSIGN_OR_RETURN(bool row, s.Step());
    if (row) {
      return absl::FailedPreconditionError(
          absl::StrCat("dataset ", id, " is referenced by job ", s.Text(0)));
    }
  }
  Stmt d(db_, "DELETE FROM datasets WHERE id = ?");
  d.Bind(1, id);
  RETURN_IF_ERROR(d.Run());
  if (sqlite3_changes(db_) == 0) {
    return absl::NotFoundError(absl::StrCat("dataset ", id, " not found"));
  }
  return tx.Commit();
}

// ---- Jobs -------------------------------------------------------------------

absl::StatusOr<JobRecord> SqliteStore::GetJobLocked(const std::string& id) {
  Stmt s(db_, absl::StrCat("SELECT ", JobCols(), " FROM jobs WHERE id = ?").c_str());
  s.Bind(1, id);
  ASSIGN_OR_RETURN(bool row, s.Step());
  if (!row) return absl::NotFoundError(absl::StrCat("job ", id, " not found"));
  return ReadJob(s);
}

absl::StatusOr<JobRecord> SqliteStore::CreateJob(const JobRecord& j) {
  absl::MutexLock lock(&mu_);
  Transaction tx(db_);
  RETURN_IF_ERROR(tx.status());
  if (!j.spec.idempotency_key.empty()) {
    Stmt s(db_, absl::StrCat("SELECT ", JobCols(), " FROM jobs WHERE idempotency_key = ?").c_str());
    s.Bind(1, j.spec.idempotency_key);
    ASSIGN_OR_RETURN(bool row, s.Step());
    if (row) return ReadJob(s);
  }
  Stmt s(db_,
         "INSERT INTO jobs(id, idempotency_key, spec_json, state, failure_reason, "
         "created_unix_ms, updated_unix_ms, step, total_steps, result_family, "
         "result_version, tenant) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)");
  s.Bind(1, j.id).BindNullableText(2, j.spec.idempotency_key).Bind(3, JobSpecToJson(j.spec));
  s.Bind(4, std::string(JobStateName(j.state))).Bind(5, j.failure_reason);
  s.Bind(6, j.created_unix_ms).Bind(7, j.updated_unix_ms).Bind(8, j.step).Bind(9, j.total_steps);
  s.Bind(10, j.result_family).Bind(11, j.result_version).Bind(12, j.tenant);
  auto st = s.Run();
  if (absl::IsAlreadyExists(st)) {
    return absl::AlreadyExistsError(absl::StrCat("job ", j.id, " already exists"));
  }
  RETURN_IF_ERROR(st);
  for (const auto& t : j.spec.tasks) {
    for (const std::string* ds : {&t.dataset_id, &t.eval_dataset_id}) {
      if (ds->empty()) continue;
      Stmt r(db_, "INSERT OR IGNORE INTO job_datasets(job_id, dataset_id) VALUES (?, ?)");
      r.Bind(1, j.id).Bind(2, *ds);
      RETURN_IF_ERROR(r.Run());
    }
  }
  RETURN_IF_ERROR(tx.Commit());
  return j;
}

absl::StatusOr<JobRecord> SqliteStore::FindJobByIdempotencyKey(const std::string& key) {
  absl::MutexLock lock(&mu_);
  Stmt s(db_, absl::StrCat("SELECT ", JobCols(), " FROM jobs WHERE idempotency_key = ?").c_str());
  s.Bind(1, key);
  ASSIGN_OR_RETURN(bool row, s.Step());
  if (!row) return absl::NotFoundError(absl::StrCat("no job with idempotency key ", key));
  return ReadJob(s);
}

absl::Status SqliteStore::UpdateJob(const JobRecord& j) {
  absl::MutexLock lock(&mu_);
  Stmt s(db_,
         "UPDATE jobs SET state = ?, failure_reason = ?, updated_unix_ms = ?, step = ?, "
         "total_steps = ?, result_family = ?, result_version = ? WHERE id = ?");
  s.Bind(1, std::string(JobStateName(j.state))).Bind(2, j.failure_reason);
  s.Bind(3, j.updated_unix_ms).Bind(4, j.step).Bind(5, j.total_steps);
  s.Bind(6, j.result_family).Bind(7, j.result_version).Bind(8, j.id);
  RETURN_IF_ERROR(s.Run());
  if (sqlite3_changes(db_) == 0)
    return absl::NotFoundError(absl::StrCat("job ", j.id, " not found"));
  return absl::OkStatus();
}

absl::StatusOr<JobRecord> SqliteStore::GetJob(const std::string& id) {
  absl::MutexLock lock(&mu_);
  return GetJobLocked(id);
}

absl::StatusOr<std::vector<JobRecord>> SqliteStore::ListJobs(std::optional<JobState> state,
                                                             int64_t page_size,
                                                             const std::string& page_token,
                                                             std::string* next_page_token) {
  int64_t after = 0;
  if (!page_token.empty() && !absl::SimpleAtoi(page_token, &after)) {
    return absl::InvalidArgumentError(absl::StrCat("page_token: invalid token '", page_token, "'"));
  }
  if (page_size <= 0) page_size = 50;
  absl::MutexLock lock(&mu_);
  std::string sql = absl::StrCat("SELECT ", JobCols(), " FROM jobs WHERE seq > ?",
                                 state ? " AND state = ?" : "", " ORDER BY seq LIMIT ?");
  Stmt s(db_, sql.c_str());
  int i = 1;
  s.Bind(i++, after);
  if (state) s.Bind(i++, std::string(JobStateName(*state)));
  s.Bind(i++, page_size + 1);
  std::vector<JobRecord> out;
  int64_t last_seq = 0;
  bool more = false;
  while (true) {
    ASSIGN_OR_RETURN(bool row, s.Step());
    if (!row) break;
    if (static_cast<int64_t>(out.size()) == page_size) {
      more = true;
      break;
    }
    ASSIGN_OR_RETURN(JobRecord j, ReadJob(s));
    last_seq = s.Int(0);
    out.push_back(std::move(j));
  }
  if (next_page_token) *next_page_token = more ? absl::StrCat(last_seq) : "";
  return out;
}

absl::Status SqliteStore::AppendJobEvent(const std::string& job_id, const JobEvent& e) {
  absl::MutexLock lock(&mu_);
  Stmt s(db_,
         "INSERT INTO job_events(job_id, seq, event_json) VALUES (?, "
         "(SELECT COALESCE(MAX(seq) + 1, 0) FROM job_events WHERE job_id = ?), ?)");
  s.Bind(1, job_id).Bind(2, job_id).Bind(3, JobEventToJson(e));
  return s.Run();
}

absl::StatusOr<std::vector<JobEvent>> SqliteStore::ListJobEvents(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(GetJobLocked(job_id).status());
  Stmt s(db_, "SELECT event_json FROM job_events WHERE job_id = ? ORDER BY seq");
  s.Bind(1, job_id);
  std::vector<JobEvent> out;
  while (true) {
    ASSIGN_OR_RETURN(bool row, s.Step());
    if (!row) break;
    ASSIGN_OR_RETURN(JobEvent e, JobEventFromJson(s.Text(0)));
    out.push_back(std::move(e));
  }
  return out;
}

// ---- Families ---------------------------------------------------------------

absl::Status SqliteStore::PublishFamilyVersion(const FamilyVersionRecord& f) {
  if (f.family.empty()) return absl::InvalidArgumentError("family: must not be empty");
  if (f.version <= 0) return absl::InvalidArgumentError("version: must be >= 1");
  absl::MutexLock lock(&mu_);
  // The compare-and-swap and the insert in one write transaction.
  Transaction tx(db_);
  RETURN_IF_ERROR(tx.status());
  int64_t newest = 0;
  std::string owner;
  {
    Stmt q(db_,
           "SELECT version, tenant FROM family_versions WHERE family = ? "
           "ORDER BY version DESC LIMIT 1");
    q.Bind(1, f.family);
    ASSIGN_OR_RETURN(bool row, q.Step());
    if (row) {
      newest = q.Int(0);
      owner = q.Text(1);
    }
  }
  if (newest >= f.version) {
    return absl::AlreadyExistsError(absl::StrCat("family ", f.family, " version ", f.version,
                                                 " is already published (versions are immutable)"));
  }
  RETURN_IF_ERROR(CheckPublication(f.family, f.version, f.tenant, newest, owner));
  Stmt s(db_,
         absl::StrCat("INSERT INTO family_versions(", kFamilyCols,
                      ") VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)")
             .c_str());
  s.Bind(1, f.family).Bind(2, f.version).Bind(3, f.form).Bind(4, f.config_json);
  s.Bind(5, f.base_model_fingerprint).Bind(6, f.path).Bind(7, f.adapter_parameters);
  s.Bind(8, TasksToJson(f.tasks)).Bind(9, f.created_by_job).Bind(10, f.created_unix_ms);
  s.Bind(11, f.tenant).Bind(12, TaskCountOf(f)).Bind(13, f.parent_version);
  auto st = s.Run();
  if (absl::IsAlreadyExists(st)) {
    return absl::AlreadyExistsError(absl::StrCat("family ", f.family, " version ", f.version,
                                                 " is already published (versions are immutable)"));
  }
  RETURN_IF_ERROR(st);
  return tx.Commit();
}

absl::StatusOr<std::vector<FamilyVersionRecord>> SqliteStore::ListFamilyVersions(
    const std::string& family) {
  return ListFamilies(family, /*with_tasks=*/true);
}

absl::StatusOr<std::vector<FamilyVersionRecord>> SqliteStore::ListFamilyVersionSummaries(
    const std::string& family) {
  return ListFamilies(family, /*with_tasks=*/false);
}

absl::StatusOr<std::vector<FamilyVersionRecord>> SqliteStore::ListFamilies(
    const std::string& family, bool with_tasks) {
  absl::MutexLock lock(&mu_);
  std::string sql = absl::StrCat("SELECT ", with_tasks ? kFamilyCols : kFamilySummaryCols,
                                 " FROM family_versions", family.empty() ? "" : " WHERE family = ?",
                                 " ORDER BY family, version");
  Stmt s(db_, sql.c_str());
  if (!family.empty()) s.Bind(1, family);
  std::vector<FamilyVersionRecord> out;
  while (true) {
    ASSIGN_OR_RETURN(bool row, s.Step());
    if (!row) break;
    ASSIGN_OR_RETURN(FamilyVersionRecord f, ReadFamily(s, with_tasks));
    out.push_back(std::move(f));
  }
  return out;
}

absl::StatusOr<FamilyVersionRecord> SqliteStore::GetFamilyVersion(const std::string& family,
                                                                  int64_t version) {
  return GetFamilyVersionTasks(family, version, 0, -1);
}

absl::StatusOr<FamilyVersionRecord> SqliteStore::GetFamilyVersionTasks(const std::string& family,
                                                                       int64_t version,
                                                                       int64_t first_task,
                                                                       int64_t max_tasks) {
  absl::MutexLock lock(&mu_);
  Stmt s(db_, absl::StrCat("SELECT ", kFamilyCols,
                           " FROM family_versions WHERE family = ? AND version = ?")
                  .c_str());
  s.Bind(1, family).Bind(2, version);
  ASSIGN_OR_RETURN(bool row, s.Step());
  if (!row) return FamilyVersionNotFound(family, version);
  return ReadFamily(s, /*with_tasks=*/true, std::max<int64_t>(first_task, 0), max_tasks);
}

absl::Status SqliteStore::CompactFamilyVersion(const std::string& family, int64_t version,
                                               const std::vector<TaskRecord>& tasks) {
  absl::MutexLock lock(&mu_);
  Stmt s(db_,
         "UPDATE family_versions SET tasks_json = ?, task_count = ?, parent_version = 0 "
         "WHERE family = ? AND version = ?");
  s.Bind(1, TasksToJson(tasks)).Bind(2, static_cast<int64_t>(tasks.size()));
  s.Bind(3, family).Bind(4, version);
  RETURN_IF_ERROR(s.Run());
  if (sqlite3_changes(db_) == 0) return FamilyVersionNotFound(family, version);
  return absl::OkStatus();
}

absl::Status SqliteStore::DeleteFamily(const std::string& family) {
  absl::MutexLock lock(&mu_);
  Stmt s(db_, "DELETE FROM family_versions WHERE family = ?");
  s.Bind(1, family);
  RETURN_IF_ERROR(s.Run());
  if (sqlite3_changes(db_) == 0) {
    return absl::NotFoundError(absl::StrCat("family ", family, " not found"));
  }
  return absl::OkStatus();
}

}  // namespace metatt
