// Store on an embedded SQLite database (WAL mode, busy timeout, numbered
// schema migrations). One connection guarded by a mutex: the store is called
// from RPC threads and the job manager, never on a hot path.
#pragma once

#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "server/store/store.h"

struct sqlite3;

namespace metatt {

class SqliteStore : public Store {
 public:
  // Opens (creating if needed) the database file at `path` and applies every
  // pending migration. ":memory:" works for tests.
  static absl::StatusOr<std::unique_ptr<SqliteStore>> Create(const std::string& path);
  ~SqliteStore() override;

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

 private:
  explicit SqliteStore(sqlite3* db) : db_(db) {}
  absl::Status Migrate() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<JobRecord> GetJobLocked(const std::string& id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<std::vector<FamilyVersionRecord>> ListFamilies(const std::string& family,
                                                                bool with_tasks);

  absl::Mutex mu_;
  sqlite3* db_ ABSL_GUARDED_BY(mu_);
};

}  // namespace metatt
