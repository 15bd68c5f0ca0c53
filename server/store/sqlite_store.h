// Store on an embedded SQLite database (WAL mode, busy timeout, numbered
// schema migrations). One connection guarded by a mutex: the store is called
// from RPC threads and the job manager, never on a hot path. The operations
// are SqlStore's (sql_store.h), shared with the PostgreSQL store; this file
// runs their statements on SQLite.
#pragma once

#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "server/store/sql_store.h"

struct sqlite3;

namespace metatt {

// The status of SQLite result code `rc` on `db` (the one mapping the store
// uses for every call): a unique-constraint violation is ALREADY_EXISTS, a
// full disk (or a database at its max_page_count) RESOURCE_EXHAUSTED
// naming the cause, anything else INTERNAL. `what`: the failed call.
absl::Status SqliteStatus(sqlite3* db, int rc, const char* what);

class SqliteStore : public SqlStore {
 public:
  // Opens (creating if needed) the database file at `path` and applies every
  // pending migration. ":memory:" works for tests.
  static absl::StatusOr<std::unique_ptr<SqliteStore>> Create(const std::string& path);
  ~SqliteStore() override;

 protected:
  absl::StatusOr<int64_t> RunLocked(const std::string& sql, const std::vector<SqlValue>& params,
                                    const RowFn& row = nullptr) override
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  const char* BeginSql() const override { return "BEGIN IMMEDIATE"; }
  // BEGIN IMMEDIATE already holds the database's one write lock.
  const char* RowLockClause() const override { return ""; }

 private:
  explicit SqliteStore(sqlite3* db) : db_(db) {}
  absl::Status Migrate() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  sqlite3* db_ ABSL_GUARDED_BY(mu_);
};

}  // namespace metatt
