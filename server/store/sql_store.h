// The Store operations of the SQLite and PostgreSQL stores, written once:
// the same statements (placeholders $1..$n; the SQLite store reads them as
// ?1..?n), the same row mapping (sql_rows.h) and the same status for the
// same outcome. A dialect provides how one statement runs on its connection
// and the few places where the databases differ: the BEGIN statement, a row
// lock clause, reconnecting, fencing tokens and the per-family publication
// lock (only PostgreSQL has several replicas on one database).
// Schema migrations, opening and job claiming stay with each store.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "server/store/sql_rows.h"
#include "server/store/store.h"

namespace metatt {

// One statement parameter: NULL (monostate), text, integer or boolean.
using SqlValue = std::variant<std::monostate, std::string, int64_t, bool>;
inline SqlValue NullIfEmpty(const std::string& s) { return s.empty() ? SqlValue() : SqlValue(s); }

// FAILED_PRECONDITION when the database's schema is newer than the
// `known` migrations this server has.
absl::Status CheckSchemaNotNewer(int64_t current, int64_t known);

class SqlStore : public Store {
 public:
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

 protected:
  // Called for each result row; an error stops the statement and is returned.
  using RowFn = std::function<absl::Status(const SqlRow&)>;

  // Runs one statement (placeholders $1..$n) on the connection, calling
  // `row` (when given) for every result row. Returns the number of rows the
  // statement changed (INSERT / UPDATE / DELETE) or returned (SELECT).
  // A unique-constraint violation is ALREADY_EXISTS, a full disk
  // RESOURCE_EXHAUSTED.
  virtual absl::StatusOr<int64_t> RunLocked(const std::string& sql,
                                            const std::vector<SqlValue>& params,
                                            const RowFn& row = nullptr)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) = 0;
  // The dialect's differences.
  virtual const char* BeginSql() const = 0;       // starts a write transaction
  virtual const char* RowLockClause() const = 0;  // locks the rows a SELECT read
  // Before every operation (PostgreSQL: re-establishes a broken connection).
  virtual absl::Status ReadyLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return absl::OkStatus(); }
  // Fencing (Store::HoldFence): the epoch this store holds for `job_id`, and
  // the check that it is still the job's (FAILED_PRECONDITION otherwise,
  // naming `what` was refused). No fences by default.
  virtual std::optional<int64_t> FenceLocked(const std::string& job_id)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    (void)job_id;
    return std::nullopt;
  }
  virtual absl::Status CheckFenceLocked(const std::string& job_id, const char* what)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    (void)job_id, (void)what;
    return absl::OkStatus();
  }
  // Inside PublishFamilyVersion's transaction, before it reads the newest
  // version: serialises publications of `family` (PostgreSQL: across replicas).
  virtual absl::Status LockFamilyLocked(const std::string& family)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    (void)family;
    return absl::OkStatus();
  }

  // BeginSql() ... COMMIT, rolled back unless Commit() succeeded.
  class Transaction {
   public:
    explicit Transaction(SqlStore* s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s->mu_);
    ~Transaction();
    const absl::Status& status() const { return status_; }
    absl::Status Commit();

   private:
    SqlStore* s_;
    absl::Status status_;
    bool committed_ = false;
  };

  // Runs a statement and returns its rows mapped by `read`.
  template <typename T>
  absl::StatusOr<std::vector<T>> QueryLocked(
      const std::string& sql, const std::vector<SqlValue>& params,
      const std::function<absl::StatusOr<T>(const SqlRow&)>& read)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    std::vector<T> out;
    absl::StatusOr<int64_t> n = RunLocked(sql, params, [&](const SqlRow& r) -> absl::Status {
      absl::StatusOr<T> v = read(r);
      if (!v.ok()) return v.status();
      out.push_back(std::move(*v));
      return absl::OkStatus();
    });
    if (!n.ok()) return n.status();
    return out;
  }
  absl::StatusOr<std::vector<JobRecord>> JobsLocked(const std::string& where,
                                                    const std::vector<SqlValue>& params)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  absl::Mutex mu_;

 private:
  absl::StatusOr<std::vector<FamilyVersionRecord>> ListFamilies(const std::string& family,
                                                                bool with_tasks);
};

}  // namespace metatt
