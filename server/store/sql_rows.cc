#include "server/store/sql_rows.h"

#include <exception>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "server/store/job_json.h"
#include "server/store/json_slice.h"

namespace metatt {

std::string StringsToJson(const std::vector<std::string>& v) { return nlohmann::json(v).dump(); }

std::vector<std::string> StringsFromJson(const std::string& s) {
  try {
    return nlohmann::json::parse(s).get<std::vector<std::string>>();
  } catch (const std::exception&) {
    return {};
  }
}

std::string JobCols(const std::string& prefix) {
  std::string out;
  for (const char* c : {"seq", "id", "idempotency_key", "spec_json", "state", "failure_reason",
                        "created_unix_ms", "updated_unix_ms", "step", "total_steps",
                        "result_family", "result_version", "tenant"}) {
    absl::StrAppend(&out, out.empty() ? "" : ", ", prefix, c);
  }
  return out;
}

DatasetRecord DatasetFromRow(const SqlRow& r) {
  DatasetRecord d;
  d.id = r.Text(0);
  d.name = r.Text(1);
  d.format = r.Text(2);
  d.spec_json = r.Text(3);
  d.sha256 = r.Text(4);
  d.path = r.Text(5);
  d.num_rows = r.Int(6);
  d.size_bytes = r.Int(7);
  d.label_names = StringsFromJson(r.Text(8));
  d.regression = r.Bool(9);
  d.created_unix_ms = r.Int(10);
  d.tenant = r.Text(11);
  return d;
}

absl::StatusOr<JobRecord> JobFromRow(const SqlRow& r) {
  JobRecord j;
  j.id = r.Text(1);
  ASSIGN_OR_RETURN(j.spec, JobSpecFromJson(r.Text(3)));
  j.spec.idempotency_key = r.Text(2);  // "" for NULL
  auto st = JobStateFromName(r.Text(4));
  if (!st) return absl::DataLossError(absl::StrCat("job ", j.id, ": bad state ", r.Text(4)));
  j.state = *st;
  j.failure_reason = r.Text(5);
  j.created_unix_ms = r.Int(6);
  j.updated_unix_ms = r.Int(7);
  j.step = r.Int(8);
  j.total_steps = r.Int(9);
  j.result_family = r.Text(10);
  j.result_version = r.Int(11);
  j.tenant = r.Text(12);
  return j;
}

absl::StatusOr<FamilyVersionRecord> FamilyFromRow(const SqlRow& r, bool with_tasks,
                                                  int64_t first_task, int64_t max_tasks) {
  FamilyVersionRecord f;
  f.family = r.Text(0);
  f.version = r.Int(1);
  f.form = r.Text(2);
  f.config_json = r.Text(3);
  f.base_model_fingerprint = r.Text(4);
  f.path = r.Text(5);
  f.adapter_parameters = r.Int(6);
  const bool whole = first_task == 0 && max_tasks < 0;
  if (with_tasks && whole) {
    ASSIGN_OR_RETURN(f.tasks, TasksFromJson(r.Text(7)));
  } else if (with_tasks) {
    ASSIGN_OR_RETURN(std::string slice, JsonArraySlice(r.Text(7), first_task, max_tasks));
    ASSIGN_OR_RETURN(f.tasks, TasksFromJson(slice));
  }
  f.created_by_job = r.Text(8);
  f.created_unix_ms = r.Int(9);
  f.tenant = r.Text(10);
  f.parent_version = r.Int(12);
  f.task_count = with_tasks && whole && f.parent_version == 0
                     ? static_cast<int64_t>(f.tasks.size())
                     : r.Int(11);
  return f;
}

}  // namespace metatt
