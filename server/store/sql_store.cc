#include "server/store/sql_store.h"

#include <algorithm>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "server/store/job_json.h"

namespace metatt {
namespace {

// "$1, $2, ..., $n"
std::string Placeholders(int n) {
  std::string out;
  for (int i = 1; i <= n; ++i) absl::StrAppend(&out, i > 1 ? ", " : "", "$", i);
  return out;
}

absl::Status AlreadyPublished(const FamilyVersionRecord& f) {
  return absl::AlreadyExistsError(absl::StrCat("family ", f.family, " version ", f.version,
                                               " is already published (versions are immutable)"));
}

absl::StatusOr<JobRecord> ReadJob(const SqlRow& r) { return JobFromRow(r); }
absl::StatusOr<DatasetRecord> ReadDataset(const SqlRow& r) { return DatasetFromRow(r); }

}  // namespace

absl::Status CheckSchemaNotNewer(int64_t current, int64_t known) {
  if (current <= known) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat("database schema version ", current,
                                                    " is newer than this server (", known,
                                                    "); refusing to open it"));
}

SqlStore::Transaction::Transaction(SqlStore* s) : s_(s) {
  status_ = s_->RunLocked(s_->BeginSql(), {}).status();
}

SqlStore::Transaction::~Transaction() ABSL_NO_THREAD_SAFETY_ANALYSIS {
  if (status_.ok() && !committed_) s_->RunLocked("ROLLBACK", {}).status().IgnoreError();
}

absl::Status SqlStore::Transaction::Commit() ABSL_NO_THREAD_SAFETY_ANALYSIS {
  RETURN_IF_ERROR(s_->RunLocked("COMMIT", {}).status());
  committed_ = true;
  return absl::OkStatus();
}

absl::StatusOr<int> SqlStore::SchemaVersion() {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(ReadyLocked());
  int version = 0;
  RETURN_IF_ERROR(RunLocked("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", {},
                            [&](const SqlRow& r) {
                              version = static_cast<int>(r.Int(0));
                              return absl::OkStatus();
                            })
                      .status());
  return version;
}

// ---- Datasets ---------------------------------------------------------------

absl::Status SqlStore::PutDataset(const DatasetRecord& d) {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(ReadyLocked());
  absl::Status st =
      RunLocked(
          absl::StrCat("INSERT INTO datasets(", kDatasetCols, ") VALUES (", Placeholders(12), ")"),
          {d.id, d.name, d.format, d.spec_json, d.sha256, d.path, d.num_rows, d.size_bytes,
           StringsToJson(d.label_names), d.regression, d.created_unix_ms, d.tenant})
          .status();
  if (absl::IsAlreadyExists(st)) {
    return absl::AlreadyExistsError(absl::StrCat("dataset ", d.id, " already exists"));
  }
  return st;
}

absl::StatusOr<DatasetRecord> SqlStore::GetDataset(const std::string& id) {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(ReadyLocked());
  ASSIGN_OR_RETURN(std::vector<DatasetRecord> ds,
                   QueryLocked<DatasetRecord>(
                       absl::StrCat("SELECT ", kDatasetCols, " FROM datasets WHERE id = $1"), {id},
                       ReadDataset));
  if (ds.empty()) return absl::NotFoundError(absl::StrCat("dataset ", id, " not found"));
  return std::move(ds[0]);
}

absl::StatusOr<std::vector<DatasetRecord>> SqlStore::ListDatasets() {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(ReadyLocked());
  return QueryLocked<DatasetRecord>(
      absl::StrCat("SELECT ", kDatasetCols, " FROM datasets ORDER BY created_unix_ms, id"), {},
      ReadDataset);
}

absl::Status SqlStore::DeleteDataset(const std::string& id) {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(ReadyLocked());
  Transaction tx(this);
  RETURN_IF_ERROR(tx.status());
  // Lock the dataset row: a concurrent CreateJob referencing it waits for us.
  ASSIGN_OR_RETURN(
      int64_t found,
      RunLocked(absl::StrCat("SELECT id FROM datasets WHERE id = $1", RowLockClause()), {id}));
  if (found == 0) return absl::NotFoundError(absl::StrCat("dataset ", id, " not found"));
  std::string job;
  RETURN_IF_ERROR(RunLocked("SELECT job_id FROM job_datasets WHERE dataset_id = $1 "
                            "ORDER BY job_id LIMIT 1",
                            {id},
                            [&](const SqlRow& r) {
                              job = r.Text(0);
                              return absl::OkStatus();
                            })
                      .status());
  if (!job.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat("dataset ", id, " is referenced by job ", job));
  }
  RETURN_IF_ERROR(RunLocked("DELETE FROM datasets WHERE id = $1", {id}).status());
  return tx.Commit();
}

// ---- Jobs -------------------------------------------------------------------

absl::StatusOr<std::vector<JobRecord>> SqlStore::JobsLocked(const std::string& where,
                                                            const std::vector<SqlValue>& params) {
  return QueryLocked<JobRecord>(absl::StrCat("SELECT ", JobCols(), " FROM jobs WHERE ", where),
                                params, ReadJob);
}

absl::StatusOr<JobRecord> SqlStore::CreateJob(const JobRecord& j) {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(ReadyLocked());
  Transaction tx(this);
  RETURN_IF_ERROR(tx.status());
  // ON CONFLICT DO NOTHING on the key: a concurrent create with the same key
  // (another replica) waits for the first and then inserts nothing.
  auto inserted = RunLocked(
      "INSERT INTO jobs(id, idempotency_key, spec_json, state, failure_reason, "
      "created_unix_ms, updated_unix_ms, step, total_steps, result_family, result_version, "
      "tenant) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12) "
      "ON CONFLICT (idempotency_key) DO NOTHING",
      {j.id, NullIfEmpty(j.spec.idempotency_key), JobSpecToJson(j.spec),
       std::string(JobStateName(j.state)), j.failure_reason, j.created_unix_ms, j.updated_unix_ms,
       j.step, j.total_steps, j.result_family, j.result_version, j.tenant});
  if (absl::IsAlreadyExists(inserted.status())) {
    return absl::AlreadyExistsError(absl::StrCat("job ", j.id, " already exists"));
  }
  RETURN_IF_ERROR(inserted.status());
  if (*inserted == 0) {
    ASSIGN_OR_RETURN(std::vector<JobRecord> existing,
                     JobsLocked("idempotency_key = $1", {j.spec.idempotency_key}));
    if (existing.empty()) return absl::InternalError("idempotency key conflict without a job");
    return std::move(existing[0]);
  }
  for (const auto& t : j.spec.tasks) {
    for (const std::string* ds : {&t.dataset_id, &t.eval_dataset_id}) {
      if (ds->empty()) continue;
      RETURN_IF_ERROR(RunLocked("INSERT INTO job_datasets(job_id, dataset_id) VALUES ($1, $2) "
                                "ON CONFLICT DO NOTHING",
                                {j.id, *ds})
                          .status());
    }
  }
  RETURN_IF_ERROR(tx.Commit());
  return j;
}

absl::StatusOr<JobRecord> SqlStore::FindJobByIdempotencyKey(const std::string& key) {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(ReadyLocked());
  ASSIGN_OR_RETURN(std::vector<JobRecord> jobs, JobsLocked("idempotency_key = $1", {key}));
  if (jobs.empty()) return absl::NotFoundError(absl::StrCat("no job with idempotency key ", key));
  return std::move(jobs[0]);
}

absl::Status SqlStore::UpdateJob(const JobRecord& j) {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(ReadyLocked());
  const std::optional<int64_t> fence = FenceLocked(j.id);
  std::vector<SqlValue> params = {std::string(JobStateName(j.state)),
                                  j.failure_reason,
                                  j.updated_unix_ms,
                                  j.step,
                                  j.total_steps,
                                  j.result_family,
                                  j.result_version,
                                  j.id};
  if (fence) params.push_back(*fence);
  // The epoch in the WHERE clause: checked atomically with the write.
  ASSIGN_OR_RETURN(int64_t changed,
                   RunLocked(absl::StrCat("UPDATE jobs SET state = $1, failure_reason = $2, "
                                          "updated_unix_ms = $3, step = $4, total_steps = $5, "
                                          "result_family = $6, result_version = $7 WHERE id = $8",
                                          fence ? " AND claim_epoch = $9" : ""),
                             params));
  if (changed == 0) {
    if (fence) RETURN_IF_ERROR(CheckFenceLocked(j.id, "update"));
    return absl::NotFoundError(absl::StrCat("job ", j.id, " not found"));
  }
  return absl::OkStatus();
}

absl::StatusOr<JobRecord> SqlStore::GetJob(const std::string& id) {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(ReadyLocked());
  ASSIGN_OR_RETURN(std::vector<JobRecord> jobs, JobsLocked("id = $1", {id}));
  if (jobs.empty()) return absl::NotFoundError(absl::StrCat("job ", id, " not found"));
  return std::move(jobs[0]);
}

absl::StatusOr<std::vector<JobRecord>> SqlStore::ListJobs(std::optional<JobState> state,
                                                          int64_t page_size,
                                                          const std::string& page_token,
                                                          std::string* next_page_token) {
  int64_t after = 0;
  if (!page_token.empty() && !absl::SimpleAtoi(page_token, &after)) {
    return absl::InvalidArgumentError(absl::StrCat("page_token: invalid token '", page_token, "'"));
  }
  if (page_size <= 0) page_size = 50;
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(ReadyLocked());
  std::vector<SqlValue> params = {after};
  if (state) params.push_back(std::string(JobStateName(*state)));
  params.push_back(page_size + 1);
  std::vector<JobRecord> out;
  int64_t last_seq = 0;
  bool more = false;
  RETURN_IF_ERROR(RunLocked(absl::StrCat("SELECT ", JobCols(), " FROM jobs WHERE seq > $1",
                                         state ? " AND state = $2 ORDER BY seq LIMIT $3"
                                               : " ORDER BY seq LIMIT $2"),
                            params,
                            [&](const SqlRow& r) -> absl::Status {
                              if (static_cast<int64_t>(out.size()) == page_size) {
                                more = true;
                                return absl::OkStatus();
                              }
                              ASSIGN_OR_RETURN(JobRecord j, ReadJob(r));
                              last_seq = r.Int(0);
                              out.push_back(std::move(j));
                              return absl::OkStatus();
                            })
                      .status());
  if (next_page_token) *next_page_token = more ? absl::StrCat(last_seq) : "";
  return out;
}

absl::Status SqlStore::AppendJobEvent(const std::string& job_id, const JobEvent& e) {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(ReadyLocked());
  const std::string json = JobEventToJson(e);
  const std::string insert =
      "INSERT INTO job_events(job_id, seq, event_json) SELECT $1, "
      "COALESCE(MAX(seq) + 1, 0), $2 FROM job_events WHERE job_id = $1";
  // Two replicas may append to one job at once (a cancel request next to the
  // holder's progress): the loser of the (job_id, seq) race retries.
  absl::Status st;
  for (int attempt = 0; attempt < 8; ++attempt) {
    if (FenceLocked(job_id)) {
      // The epoch check (row locked until commit) and the insert, together.
      Transaction tx(this);
      RETURN_IF_ERROR(tx.status());
      RETURN_IF_ERROR(CheckFenceLocked(job_id, "event"));
      st = RunLocked(insert, {job_id, json}).status();
      if (st.ok()) st = tx.Commit();
    } else {
      st = RunLocked(insert, {job_id, json}).status();
    }
    if (!absl::IsAlreadyExists(st)) return st;
  }
  return st;
}

absl::StatusOr<std::vector<JobEvent>> SqlStore::ListJobEvents(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(ReadyLocked());
  ASSIGN_OR_RETURN(int64_t jobs, RunLocked("SELECT 1 FROM jobs WHERE id = $1", {job_id}));
  if (jobs == 0) return absl::NotFoundError(absl::StrCat("job ", job_id, " not found"));
  return QueryLocked<JobEvent>("SELECT event_json FROM job_events WHERE job_id = $1 ORDER BY seq",
                               {job_id},
                               [](const SqlRow& r) { return JobEventFromJson(r.Text(0)); });
}

// ---- Families ---------------------------------------------------------------

absl::Status SqlStore::PublishFamilyVersion(const FamilyVersionRecord& f) {
  if (f.family.empty()) return absl::InvalidArgumentError("family: must not be empty");
  if (f.version <= 0) return absl::InvalidArgumentError("version: must be >= 1");
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(ReadyLocked());
  // The compare-and-swap and the insert in one write transaction.
  Transaction tx(this);
  RETURN_IF_ERROR(tx.status());
  RETURN_IF_ERROR(LockFamilyLocked(f.family));
  // A job's version: only while this store still holds the job's claim.
  if (!f.created_by_job.empty() && FenceLocked(f.created_by_job)) {
    RETURN_IF_ERROR(CheckFenceLocked(f.created_by_job, "publication"));
  }
  int64_t newest = 0;
  std::string owner;
  RETURN_IF_ERROR(RunLocked("SELECT version, tenant FROM family_versions WHERE family = $1 "
                            "ORDER BY version DESC LIMIT 1",
                            {f.family},
                            [&](const SqlRow& r) {
                              newest = r.Int(0);
                              owner = r.Text(1);
                              return absl::OkStatus();
                            })
                      .status());
  if (newest >= f.version) return AlreadyPublished(f);
  RETURN_IF_ERROR(CheckPublication(f.family, f.version, f.tenant, newest, owner));
  absl::Status st = RunLocked(absl::StrCat("INSERT INTO family_versions(", kFamilyCols,
                                           ") VALUES (", Placeholders(13), ")"),
                              {f.family, f.version, f.form, f.config_json, f.base_model_fingerprint,
                               f.path, f.adapter_parameters, TasksToJson(f.tasks), f.created_by_job,
                               f.created_unix_ms, f.tenant, TaskCountOf(f), f.parent_version})
                        .status();
  if (absl::IsAlreadyExists(st)) return AlreadyPublished(f);
  RETURN_IF_ERROR(st);
  return tx.Commit();
}

absl::StatusOr<std::vector<FamilyVersionRecord>> SqlStore::ListFamilyVersions(
    const std::string& family) {
  return ListFamilies(family, /*with_tasks=*/true);
}

absl::StatusOr<std::vector<FamilyVersionRecord>> SqlStore::ListFamilyVersionSummaries(
    const std::string& family) {
  return ListFamilies(family, /*with_tasks=*/false);
}

absl::StatusOr<std::vector<FamilyVersionRecord>> SqlStore::ListFamilies(const std::string& family,
                                                                        bool with_tasks) {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(ReadyLocked());
  std::vector<SqlValue> params;
  if (!family.empty()) params.push_back(family);
  return QueryLocked<FamilyVersionRecord>(
      absl::StrCat("SELECT ", with_tasks ? kFamilyCols : kFamilySummaryCols,
                   " FROM family_versions", family.empty() ? "" : " WHERE family = $1",
                   " ORDER BY family, version"),
      params, [with_tasks](const SqlRow& r) { return FamilyFromRow(r, with_tasks); });
}

absl::StatusOr<FamilyVersionRecord> SqlStore::GetFamilyVersion(const std::string& family,
                                                               int64_t version) {
  return GetFamilyVersionTasks(family, version, 0, -1);
}

absl::StatusOr<FamilyVersionRecord> SqlStore::GetFamilyVersionTasks(const std::string& family,
                                                                    int64_t version,
                                                                    int64_t first_task,
                                                                    int64_t max_tasks) {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(ReadyLocked());
  first_task = std::max<int64_t>(first_task, 0);
  ASSIGN_OR_RETURN(std::vector<FamilyVersionRecord> found,
                   QueryLocked<FamilyVersionRecord>(
                       absl::StrCat("SELECT ", kFamilyCols,
                                    " FROM family_versions WHERE family = $1 AND version = $2"),
                       {family, version}, [&](const SqlRow& r) {
                         return FamilyFromRow(r, /*with_tasks=*/true, first_task, max_tasks);
                       }));
  if (found.empty()) return FamilyVersionNotFound(family, version);
  return std::move(found[0]);
}

absl::Status SqlStore::CompactFamilyVersion(const std::string& family, int64_t version,
                                            const std::vector<TaskRecord>& tasks) {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(ReadyLocked());
  ASSIGN_OR_RETURN(
      int64_t changed,
      RunLocked("UPDATE family_versions SET tasks_json = $1, task_count = $2, "
                "parent_version = 0 WHERE family = $3 AND version = $4",
                {TasksToJson(tasks), static_cast<int64_t>(tasks.size()), family, version}));
  if (changed == 0) return FamilyVersionNotFound(family, version);
  return absl::OkStatus();
}

absl::Status SqlStore::DeleteFamily(const std::string& family) {
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(ReadyLocked());
  ASSIGN_OR_RETURN(int64_t changed,
                   RunLocked("DELETE FROM family_versions WHERE family = $1", {family}));
  if (changed == 0) return absl::NotFoundError(absl::StrCat("family ", family, " not found"));
  return absl::OkStatus();
}

}  // namespace metatt
