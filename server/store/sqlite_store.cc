#include "server/store/sqlite_store.h"

#include <sqlite3.h>

#include <variant>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"

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

// The shared statements' placeholders $1..$n as SQLite's numbered ?1..?n.
std::string NumberedParams(const std::string& sql) {
  std::string out = sql;
  for (size_t i = 0; i + 1 < out.size(); ++i) {
    if (out[i] == '$' && out[i + 1] >= '0' && out[i + 1] <= '9') out[i] = '?';
  }
  return out;
}

// RAII prepared statement with typed binders / readers.
class Stmt : public SqlRow {
 public:
  Stmt(sqlite3* db, const std::string& sql) : db_(db) {
    rc_ = sqlite3_prepare_v2(db, NumberedParams(sql).c_str(), -1, &stmt_, nullptr);
  }
  ~Stmt() { sqlite3_finalize(stmt_); }
  Stmt(const Stmt&) = delete;
  Stmt& operator=(const Stmt&) = delete;

  absl::Status status() const {
    if (rc_ == SQLITE_OK) return absl::OkStatus();
    return SqliteStatus(db_, rc_, "prepare");
  }
  void Bind(int i, const SqlValue& v) {
    if (const auto* s = std::get_if<std::string>(&v)) {
      sqlite3_bind_text(stmt_, i, s->data(), static_cast<int>(s->size()), SQLITE_TRANSIENT);
    } else if (const auto* n = std::get_if<int64_t>(&v)) {
      sqlite3_bind_int64(stmt_, i, *n);
    } else if (const auto* b = std::get_if<bool>(&v)) {
      sqlite3_bind_int64(stmt_, i, *b ? 1 : 0);
    } else {
      sqlite3_bind_null(stmt_, i);
    }
  }
  bool ReadOnly() const { return stmt_ != nullptr && sqlite3_stmt_readonly(stmt_) != 0; }
  // SQLITE_ROW -> true, SQLITE_DONE -> false, else error.
  absl::StatusOr<bool> Step() {
    RETURN_IF_ERROR(status());
    int rc = sqlite3_step(stmt_);
    if (rc == SQLITE_ROW) return true;
    if (rc == SQLITE_DONE) return false;
    return SqliteStatus(db_, rc, "step");
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

// Several statements (a migration, a PRAGMA), no parameters.
absl::Status Exec(sqlite3* db, const char* sql) {
  char* err = nullptr;
  const int rc = sqlite3_exec(db, sql, nullptr, nullptr, &err);
  if (rc != SQLITE_OK) {
    sqlite3_free(err);
    return SqliteStatus(db, rc, "exec");
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status SqliteStatus(sqlite3* db, int rc, const char* what) {
  const std::string msg = db ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
  switch (rc & 0xff) {
    case SQLITE_CONSTRAINT:
      return absl::AlreadyExistsError(absl::StrCat("sqlite: ", msg));
    case SQLITE_FULL:
      return absl::ResourceExhaustedError(
          absl::StrCat("sqlite ", what, ": the database or its disk is full (", msg, ")"));
    default:
      return absl::InternalError(absl::StrCat("sqlite ", what, ": ", msg));
  }
}

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
  RETURN_IF_ERROR(RunLocked("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", {},
                            [&](const SqlRow& r) {
                              current = r.Int(0);
                              return absl::OkStatus();
                            })
                      .status());
  const int64_t n = static_cast<int64_t>(sizeof(kMigrations) / sizeof(kMigrations[0]));
  RETURN_IF_ERROR(CheckSchemaNotNewer(current, n));
  for (int64_t v = current; v < n; ++v) {
    Transaction tx(this);
    RETURN_IF_ERROR(tx.status());
    RETURN_IF_ERROR(Exec(db_, kMigrations[v]));
    RETURN_IF_ERROR(RunLocked("INSERT INTO schema_migrations(version, applied_unix_ms) "
                              "VALUES ($1, CAST(strftime('%s','now') AS INTEGER) * 1000)",
                              {v + 1})
                        .status());
    RETURN_IF_ERROR(tx.Commit());
  }
  return absl::OkStatus();
}

absl::StatusOr<int64_t> SqliteStore::RunLocked(const std::string& sql,
                                               const std::vector<SqlValue>& params,
                                               const RowFn& row) {
  Stmt s(db_, sql);
  RETURN_IF_ERROR(s.status());
  for (size_t i = 0; i < params.size(); ++i) s.Bind(static_cast<int>(i + 1), params[i]);
  int64_t rows = 0;
  while (true) {
    ASSIGN_OR_RETURN(bool more, s.Step());
    if (!more) break;
    ++rows;
    if (row) RETURN_IF_ERROR(row(s));
  }
  return s.ReadOnly() ? rows : static_cast<int64_t>(sqlite3_changes(db_));
}

}  // namespace metatt
