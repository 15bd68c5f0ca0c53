// What the SQLite and PostgreSQL stores share where the dialects agree: the
// column lists of the datasets / jobs / family_versions tables and the
// mapping of one result row to a record. Each store adapts its own result
// type (sqlite3_stmt, PGresult) to SqlRow.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/store/store.h"

namespace metatt {

// One row of a query result, columns 0-based in the order of the lists below.
class SqlRow {
 public:
  virtual ~SqlRow() = default;
  virtual std::string Text(int col) const = 0;  // "" for NULL
  virtual int64_t Int(int col) const = 0;       // 0 for NULL
  virtual bool Bool(int col) const = 0;
};

std::string StringsToJson(const std::vector<std::string>& v);
std::vector<std::string> StringsFromJson(const std::string& s);  // {} when not a string array

inline constexpr char kDatasetCols[] =
    "id, name, format, spec_json, sha256, path, num_rows, size_bytes, label_names_json, "
    "regression, created_unix_ms, tenant";
// The job columns; `prefix` qualifies them (e.g. "j.") where a query joins.
std::string JobCols(const std::string& prefix = "");
inline constexpr char kFamilyCols[] =
    "family, version, form, config_json, base_model_fingerprint, path, adapter_parameters, "
    "tasks_json, created_by_job, created_unix_ms, tenant, task_count, parent_version";
// The same columns with '[]' for tasks_json: a summary reads no task list.
inline constexpr char kFamilySummaryCols[] =
    "family, version, form, config_json, base_model_fingerprint, path, adapter_parameters, "
    "'[]', created_by_job, created_unix_ms, tenant, task_count, parent_version";

// The task_count column: the whole family's, also for an appended version
// (whose tasks list only the appended tasks).
inline int64_t TaskCountOf(const FamilyVersionRecord& f) {
  return f.parent_version > 0 ? f.task_count : static_cast<int64_t>(f.tasks.size());
}

DatasetRecord DatasetFromRow(const SqlRow& r);
absl::StatusOr<JobRecord> JobFromRow(const SqlRow& r);
// with_tasks: tasks [first_task, first_task + max_tasks) (max_tasks < 0 = all).
absl::StatusOr<FamilyVersionRecord> FamilyFromRow(const SqlRow& r, bool with_tasks,
                                                  int64_t first_task = 0,
                                                  int64_t max_tasks = -1);

}  // namespace metatt
