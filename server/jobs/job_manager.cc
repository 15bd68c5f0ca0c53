#include "server/jobs/job_manager.h"

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/status_macros.h"
#include "server/jobs/ids.h"
#include "server/jobs/job_recipe.h"
#include "server/jobs/dataset_manager.h"
#include "server/jobs/job_validation.h"
#include "server/store/job_json.h"

namespace metatt {
namespace {

JobEvent StateEvent(JobState s, std::string message) {
  JobEvent e;
  e.type = JobEvent::Type::kState;
  e.state = s;
  e.message = std::move(message);
  return e;
}

JobEvent LogEvent(std::string message) {
  JobEvent e;
  e.type = JobEvent::Type::kLog;
  e.message = std::move(message);
  return e;
}

std::string SpecForCompare(JobSpec s) {
  s.idempotency_key.clear();
  return JobSpecToJson(s);
}

// Idempotency keys are per tenant: the stored key of a tenant other than
// "default" (the tenant of rows written before tenants) carries its name.
constexpr char kKeySeparator = '\x1f';

std::string ScopedKey(const std::string& tenant, const std::string& key) {
  if (key.empty() || tenant == kDefaultTenant) return key;
  return absl::StrCat(tenant, std::string(1, kKeySeparator), key);
}

// A record as callers see it: the key the client sent, the family by its
// name in the job's tenant (store.h FamilyKey).
JobRecord Outgoing(JobRecord j) {
  const std::string prefix = absl::StrCat(j.tenant, std::string(1, kKeySeparator));
  if (j.tenant != kDefaultTenant && j.spec.idempotency_key.rfind(prefix, 0) == 0) {
    j.spec.idempotency_key = j.spec.idempotency_key.substr(prefix.size());
  }
  const Caller owner{j.tenant, false};
  j.spec.family = FamilyNameFor(owner, j.spec.family);
  j.failure_reason = WithFamilyNamesFor(owner, std::move(j.failure_reason));
  if (!j.result_family.empty()) j.result_family = FamilyNameFor(owner, j.result_family);
  return j;
}

absl::StatusOr<JobRecord> Outgoing(absl::StatusOr<JobRecord> j) {
  if (!j.ok()) return j;
  return Outgoing(*std::move(j));
}

}  // namespace

// ---- Subscription -------------------------------------------------------------

JobEventSubscription::~JobEventSubscription() { manager_->Unsubscribe(this); }

void JobEventSubscription::Push(const JobEvent& e) {
  absl::MutexLock lock(&mu_);
  pending_.push_back(e);
}

void JobEventSubscription::Close() {
  absl::MutexLock lock(&mu_);
  closed_ = true;
}

JobEventSubscription::Result JobEventSubscription::Next(JobEvent* event, absl::Duration timeout) {
  if (ended_) return Result::kEnd;
  absl::MutexLock lock(&mu_);
  auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !pending_.empty() || closed_; };
  mu_.AwaitWithTimeout(absl::Condition(&ready), timeout);
  if (!pending_.empty()) {
    *event = std::move(pending_.front());
    pending_.pop_front();
    ++sequence_;
    if (event->type == JobEvent::Type::kState && IsTerminal(event->state)) ended_ = true;
    return Result::kEvent;
  }
  if (closed_) {
    ended_ = true;
    return Result::kEnd;
  }
  return Result::kTimeout;
}

// ---- Manager ------------------------------------------------------------------

JobManager::JobManager(JobManagerOptions options, Store* store, JobExecutor* executor)
    : options_(std::move(options)), store_(store), executor_(executor) {}

absl::StatusOr<std::unique_ptr<JobManager>> JobManager::Create(JobManagerOptions options,
                                                               Store* store,
                                                               JobExecutor* executor) {
  if (store == nullptr) return absl::InvalidArgumentError("JobManager: store is null");
  if (executor == nullptr) return absl::InvalidArgumentError("JobManager: executor is null");
  if (options.max_queued_jobs < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_queued_jobs: must be >= 1, got ", options.max_queued_jobs));
  }
  if (!options.replica_id.empty()) {
    if (!store->SupportsClaims()) {
      return absl::InvalidArgumentError(
          "replica_id: several replicas need a shared store (PostgreSQL); this one serves one "
          "process");
    }
    if (options.lease_ms < 100 || options.poll_ms < 1 || options.poll_ms * 2 > options.lease_ms) {
      return absl::InvalidArgumentError(absl::StrCat(
          "lease_ms: ", options.lease_ms, " must be >= 100 and at least twice poll_ms (",
          options.poll_ms, ")"));
    }
  }
  std::unique_ptr<JobManager> m(new JobManager(std::move(options), store, executor));
  RETURN_IF_ERROR(m->Recover());
  m->dispatcher_ = std::thread([p = m.get()] { p->DispatchLoop(); });
  return m;
}

JobManager::~JobManager() { Shutdown(); }

int64_t JobManager::Now() const {
  if (options_.now_unix_ms) return options_.now_unix_ms();
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

absl::Status JobManager::Recover() {
  absl::MutexLock lock(&mu_);
  std::string token;
  std::vector<JobRecord> all;
  do {
    std::string next;
    ASSIGN_OR_RETURN(auto page, store_->ListJobs(std::nullopt, 500, token, &next));
    for (auto& j : page) all.push_back(std::move(j));
    token = next;
  } while (!token.empty());
  for (const JobRecord& j : all) state_counts_[j.state]++;
  if (shared()) {
    // Queued jobs wait in the store; running ones belong to their replica
    // (an expired lease is taken over by the dispatcher, job_claims.cc).
    UpdateGaugesLocked();
    return absl::OkStatus();
  }
  std::vector<FamilyVersionRecord> versions;
  for (const JobRecord& j : all) {
    if (j.state == JobState::kRunning || j.state == JobState::kValidating) {
      ASSIGN_OR_RETURN(versions, store_->ListFamilyVersionSummaries(""));
      break;
    }
  }
  for (const JobRecord& j : all) {
    if (j.state == JobState::kQueued) {
      queue_.push_back(j.id);
      unfinished_tenant_[j.id] = j.tenant;
    } else if (j.state == JobState::kRunning || j.state == JobState::kValidating) {
      if (SucceedIfPublishedLocked(j, versions)) continue;
      if (executor_->CanResume(j)) {
        unfinished_tenant_[j.id] = j.tenant;
        OnEventLocked(j.id, StateEvent(JobState::kQueued, "re-queued after a server restart"));
        queue_.push_back(j.id);
      } else {
        OnEventLocked(j.id, StateEvent(JobState::kFailed, kRestartFailureReason));
      }
    }
  }
  UpdateGaugesLocked();
  return absl::OkStatus();
}

void JobManager::FlushUnpersisted() {
  absl::MutexLock l(&unpersisted_mu_);
  for (auto it = unpersisted_.begin(); it != unpersisted_.end();) {
    Unpersisted& u = it->second;
    if (!u.record_written) u.record_written = store_->UpdateJob(u.record).ok();
    if (u.record_written && store_->AppendJobEvent(it->first, u.event).ok()) {
      std::fprintf(stderr, "job %s: its end (%s) is recorded now\n", it->first.c_str(),
                   JobStateName(u.record.state));
      it = unpersisted_.erase(it);
    } else {
      ++it;
    }
  }
}

std::optional<JobRecord> JobManager::UnpersistedRecord(const std::string& id) {
  absl::MutexLock l(&unpersisted_mu_);
  auto it = unpersisted_.find(id);
  if (it == unpersisted_.end()) return std::nullopt;
  return it->second.record;
}

absl::StatusOr<JobRecord> JobManager::GetVisible(const std::string& id, const Caller& caller) {
  FlushUnpersisted();
  auto j = store_->GetJob(id);
  if (j.ok()) {
    if (auto mem = UnpersistedRecord(id)) j = *mem;
  }
  if (absl::IsNotFound(j.status()) || (j.ok() && !caller.CanSee(j->tenant))) {
    return NotFoundFor("job", id);
  }
  return j;
}

absl::Status JobManager::CheckJobQuotasLocked(const std::string& tenant) {
  if (!options_.quotas) return absl::OkStatus();
  const TenantQuotas q = options_.quotas(tenant);
  int64_t unfinished = 0, queued = 0;
  for (const auto& [id, t] : unfinished_tenant_) unfinished += t == tenant;
  for (const std::string& id : queue_) {
    auto it = unfinished_tenant_.find(id);
    queued += it != unfinished_tenant_.end() && it->second == tenant;
  }
  if (q.max_queued_jobs > 0 && queued >= q.max_queued_jobs) {
    return absl::ResourceExhaustedError(
        absl::StrCat("tenant '", tenant, "' has ", queued, " jobs queued; quota max_queued_jobs=",
                     q.max_queued_jobs, "; retry after one starts"));
  }
  if (q.max_concurrent_jobs > 0 && unfinished >= q.max_concurrent_jobs) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "tenant '", tenant, "' has ", unfinished,
        " unfinished jobs; quota max_concurrent_jobs=", q.max_concurrent_jobs,
        "; retry after one finishes"));
  }
  return absl::OkStatus();
}

absl::Status JobManager::ValidateSpec(const JobSpec& spec, const Caller& caller) {
  // The rules on the spec itself (job_validation.h), with the server's limits;
  // below, what needs the store: families, tasks and datasets the caller sees.
  const JobLimits& limits = options_.limits;
  // `spec.family` is the caller's name; the store knows the family by its
  // key in the caller's tenant (tenants.h FamilyKeyFor): another tenant's
  // "x" is neither seen nor in the way, and the lookup is the same either way.
  const std::string key = FamilyKeyFor(caller, spec.family);
  {
    JobSpec named = spec;
    named.family = key.empty() ? key : FamilyKeyName(key);
    RETURN_IF_ERROR(ValidateJobSpec(named, limits));
  }

  ASSIGN_OR_RETURN(auto versions, store_->ListFamilyVersionSummaries(key));
  const bool visible = !versions.empty() && caller.CanSee(versions.back().tenant);
  if (spec.kind == JobKind::kAddTask) {
    if (!visible) {
      return absl::NotFoundError(absl::StrCat("spec.family: family '", spec.family,
                                              "' not found (an add-task job extends an existing "
                                              "family)"));
    }
    if (versions.back().form != "4+1d") {
      return absl::FailedPreconditionError(absl::StrCat("spec.family: family '", spec.family,
                                                        "' has form ", versions.back().form,
                                                        "; only a 4+1d family can take new tasks"));
    }
  } else if (!versions.empty()) {
    return absl::AlreadyExistsError(
        absl::StrCat("spec.family: family '", spec.family,
                     "' already exists; use an ADD_TASK job or another name"));
  }
  // The latest version's task names, read only for an add-task job.
  std::vector<TaskRecord> existing_tasks;
  if (visible && spec.kind == JobKind::kAddTask) {
    ASSIGN_OR_RETURN(FamilyVersionRecord latest,
                     store_->GetFamilyVersionFull(key, versions.back().version));
    existing_tasks = std::move(latest.tasks);
    int64_t max_rank = 0;
    for (int64_t r : spec.adapter.ranks) max_rank = std::max(max_rank, r);
    RETURN_IF_ERROR(ValidateFamilyCapacity(static_cast<int64_t>(existing_tasks.size()) + 1,
                                           max_rank, "spec.adapter.ranks", limits));
  }
  // A dataset the caller sees (another tenant's reads as not found); errors
  // are prefixed with `where`.
  auto visible_dataset = [&](const std::string& id,
                             const std::string& where) -> absl::StatusOr<DatasetRecord> {
    auto d = store_->GetDataset(id);
    if (absl::IsNotFound(d.status()) || (d.ok() && !caller.CanSee(d->tenant))) {
      d = NotFoundFor("dataset", id);
    }
    if (!d.ok()) {
      return absl::Status(d.status().code(), absl::StrCat(where, ": ", d.status().message()));
    }
    return d;
  };
  for (size_t i = 0; i < spec.tasks.size(); ++i) {
    const JobTaskSpec& t = spec.tasks[i];
    std::string field = absl::StrCat("spec.tasks[", i, "]");
    if (visible) {
      for (const TaskRecord& existing : existing_tasks) {
        if (existing.name == t.task_name) {
          return absl::AlreadyExistsError(absl::StrCat(field, ".task_name: family '", spec.family,
                                                       "' already has task '", t.task_name, "'"));
        }
      }
    }
    const std::string ds_field = field + ".dataset_id";
    ASSIGN_OR_RETURN(const DatasetRecord ds, visible_dataset(t.dataset_id, ds_field));
    // A dataset uploaded under a higher limit (or before there was one).
    if (!ds.regression) {
      RETURN_IF_ERROR(ValidateLabelCount(static_cast<int64_t>(ds.label_names.size()), ds_field,
                                         limits));
    }
    if (options_.verify_dataset_files) RETURN_IF_ERROR(VerifyDatasetFile(ds, ds_field));
    if (!t.eval_dataset_id.empty()) {
      const std::string eval_field = field + ".eval_dataset_id";
      ASSIGN_OR_RETURN(const DatasetRecord eds, visible_dataset(t.eval_dataset_id, eval_field));
      if (options_.verify_dataset_files) RETURN_IF_ERROR(VerifyDatasetFile(eds, eval_field));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<JobRecord> JobManager::CreateJob(const JobSpec& request, const Caller& caller) {
  JobSpec spec = request;
  spec.idempotency_key = ScopedKey(caller.tenant, request.idempotency_key);
  spec.family = FamilyKeyFor(caller, request.family);  // the store and runtime use keys
  // The form is fixed when the job is created (it picks the recipe); every
  // other unset field stays "auto" until the job starts (job_recipe.h).
  if (spec.adapter.form.empty()) spec.adapter.form = DefaultForm();
  if (!spec.idempotency_key.empty()) {
    auto existing = store_->FindJobByIdempotencyKey(spec.idempotency_key);
    if (existing.ok()) {
      if (SpecForCompare(existing->spec) != SpecForCompare(spec)) {
        return absl::FailedPreconditionError(
            absl::StrCat("idempotency_key: '", request.idempotency_key, "' was used for job ",
                         existing->id, " with a different spec"));
      }
      return Outgoing(*existing);
    }
    if (!absl::IsNotFound(existing.status()) && !absl::IsUnimplemented(existing.status())) {
      return existing.status();
    }
  }
  {
    JobSpec named = spec;
    named.family = request.family;
    RETURN_IF_ERROR(ValidateSpec(named, caller));
  }
  if (options_.quotas) {
    RETURN_IF_ERROR(CheckTaskQuota(store_, caller.tenant, options_.quotas(caller.tenant),
                                   static_cast<int64_t>(spec.tasks.size())));
  }
  absl::MutexLock lock(&mu_);
  if (shutdown_) return absl::UnavailableError("the server is shutting down");
  const int64_t queued = shared() ? QueuedInStoreLocked() : static_cast<int64_t>(queue_.size());
  if (queued >= options_.max_queued_jobs) {
    return absl::ResourceExhaustedError(
        absl::StrCat("job queue is full: ", queued, " jobs queued (limit max_queued_jobs=",
                     options_.max_queued_jobs, "); retry after a job finishes"));
  }
  RETURN_IF_ERROR(CheckJobQuotasLocked(caller.tenant));
  JobRecord j;
  j.tenant = caller.tenant;
  j.id = NewId("job");
  j.spec = spec;
  j.state = JobState::kQueued;
  j.created_unix_ms = j.updated_unix_ms = Now();
  // Unset steps: the recipe's for the job's form. 0 = by epochs: known when
  // the job starts.
  ASSIGN_OR_RETURN(Recipe recipe, ResolveJobRecipe(spec));
  j.total_steps = recipe.max_steps;
  ASSIGN_OR_RETURN(JobRecord created, store_->CreateJob(j));
  if (created.id != j.id) return Outgoing(created);  // a concurrent create with the same key won
  unfinished_tenant_[j.id] = j.tenant;
  state_counts_[JobState::kQueued]++;
  JobEvent e = StateEvent(JobState::kQueued, "");
  e.time_unix_ms = j.created_unix_ms;
  e.total_steps = j.total_steps;
  auto st = store_->AppendJobEvent(j.id, e);
  if (!st.ok())
    std::fprintf(stderr, "job %s: cannot persist event: %s\n", j.id.c_str(), st.ToString().c_str());
  if (shared()) {
    wake_ = true;  // any replica may claim it; this one looks now
  } else {
    queue_.push_back(j.id);
  }
  UpdateGaugesLocked();
  return Outgoing(created);
}

absl::StatusOr<JobRecord> JobManager::GetJob(const std::string& id, const Caller& caller) {
  return Outgoing(GetVisible(id, caller));
}

absl::StatusOr<std::vector<JobCheckpointInfo>> JobManager::ListJobCheckpoints(
    const std::string& id, const Caller& caller) {
  RETURN_IF_ERROR(GetVisible(id, caller).status());
  return executor_->ListCheckpoints(id);
}

absl::StatusOr<std::vector<JobRecord>> JobManager::ListJobs(std::optional<JobState> state,
                                                            int64_t page_size,
                                                            const std::string& page_token,
                                                            std::string* next_page_token,
                                                            const Caller& caller) {
  if (page_size < 0) return absl::InvalidArgumentError("page_size: must be >= 0");
  page_size = std::min<int64_t>(page_size == 0 ? 50 : page_size, 1000);
  FlushUnpersisted();
  std::string token = page_token;
  std::string next;
  std::vector<JobRecord> out;
  // Pages of the store, asking each time for no more rows than are still
  // missing: the store's token after a page then resumes exactly after it.
  do {
    ASSIGN_OR_RETURN(std::vector<JobRecord> page,
                     store_->ListJobs(state, page_size - static_cast<int64_t>(out.size()), token,
                                      &next));
    for (JobRecord& j : page) {
      if (auto mem = UnpersistedRecord(j.id)) j = *mem;
      if (caller.CanSee(j.tenant)) out.push_back(Outgoing(std::move(j)));
    }
    token = next;
  } while (!next.empty() && static_cast<int64_t>(out.size()) < page_size);
  if (next_page_token) *next_page_token = next;
  return out;
}

absl::StatusOr<JobRecord> JobManager::CancelJob(const std::string& id, const Caller& caller) {
  {
    absl::MutexLock lock(&mu_);
    ASSIGN_OR_RETURN(JobRecord j, GetVisible(id, caller));
    if (j.state == JobState::kCancelled) return Outgoing(j);
    if (IsTerminal(j.state)) {
      return absl::FailedPreconditionError(
          absl::StrCat("job ", id, " already ", JobStateName(j.state), "; nothing to cancel"));
    }
    if (j.state == JobState::kQueued) {
      queue_.erase(std::remove(queue_.begin(), queue_.end(), id), queue_.end());
      OnEventLocked(id, StateEvent(JobState::kCancelled, "cancelled by the client while queued"));
      UpdateGaugesLocked();
      return Outgoing(store_->GetJob(id));
    }
    if (cancel_requested_.insert(id).second) {
      OnEventLocked(id, LogEvent("cancellation requested; the job stops after its current step"));
    }
    if (shared() && running_ != id) {
      // Held by another replica: it sees the request when it renews its lease.
      RETURN_IF_ERROR(store_->RequestCancel(id));
      return Outgoing(store_->GetJob(id));
    }
  }
  executor_->Cancel(id);
  return Outgoing(store_->GetJob(id));
}

absl::StatusOr<std::unique_ptr<JobEventSubscription>> JobManager::Subscribe(
    const std::string& job_id, const Caller& caller) {
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(JobRecord j, GetVisible(job_id, caller));
  if (options_.max_event_streams > 0 && open_streams_ >= options_.max_event_streams) {
    return absl::ResourceExhaustedError(
        absl::StrCat("job_id: ", open_streams_, " event streams are open; server limit "
                     "max_event_streams=", options_.max_event_streams,
                     "; poll GetJob or retry later"));
  }
  ASSIGN_OR_RETURN(std::vector<JobEvent> past, store_->ListJobEvents(job_id));
  std::unique_ptr<JobEventSubscription> sub(new JobEventSubscription(this, job_id));
  ++open_streams_;
  for (const JobEvent& e : past) sub->Push(e);
  sub->delivered_ = static_cast<int64_t>(past.size());
  if (IsTerminal(j.state) || shutdown_) {
    sub->Close();
  } else {
    subscribers_[job_id].push_back(sub.get());
  }
  return sub;
}

void JobManager::Unsubscribe(JobEventSubscription* sub) {
  absl::MutexLock lock(&mu_);
  --open_streams_;
  auto it = subscribers_.find(sub->job_id_);
  if (it == subscribers_.end()) return;
  auto& v = it->second;
  v.erase(std::remove(v.begin(), v.end(), sub), v.end());
  if (v.empty()) subscribers_.erase(it);
}

int64_t JobManager::queued_count() {
  absl::MutexLock lock(&mu_);
  return static_cast<int64_t>(queue_.size());
}

std::optional<std::string> JobManager::running_job() {
  absl::MutexLock lock(&mu_);
  return running_;
}

bool JobManager::SucceedIfPublishedLocked(const JobRecord& j,
                                          const std::vector<FamilyVersionRecord>& versions) {
  const FamilyVersionRecord* found = nullptr;
  for (const auto& v : versions) {
    if (v.created_by_job == j.id && (found == nullptr || v.version > found->version)) found = &v;
  }
  if (found == nullptr) return false;
  JobEvent cp;
  cp.type = JobEvent::Type::kCheckpoint;
  cp.family = found->family;
  cp.version = found->version;
  cp.message = absl::StrCat("published ", FamilyKeyName(found->family), " v", found->version,
                            " before the server restarted");
  OnEventLocked(j.id, cp);
  JobEvent done = StateEvent(JobState::kSucceeded, cp.message);
  done.family = cp.family;
  done.version = cp.version;
  OnEventLocked(j.id, done);
  return true;
}

std::optional<std::string> JobManager::FailRunning(const std::string& reason) {
  absl::MutexLock lock(&mu_);
  std::optional<std::string> id = running_;
  if (!id) return std::nullopt;
  // A job with a resumable checkpoint stays RUNNING: restart recovery (or a
  // replica's take-over) re-queues it and it continues from the checkpoint.
  if (auto rec = store_->GetJob(*id); rec.ok() && executor_->CanResume(*rec)) {
    OnEventLocked(*id, LogEvent("server shut down; the job resumes from its newest checkpoint "
                                "when a server starts on this store"));
    running_.reset();
    UpdateGaugesLocked();
    return std::nullopt;
  }
  OnEventLocked(*id, StateEvent(JobState::kFailed, reason));  // resets running_
  UpdateGaugesLocked();
  return id;
}

void JobManager::OnEvent(const std::string& job_id, JobEvent e) {
  absl::MutexLock lock(&mu_);
  OnEventLocked(job_id, std::move(e));
  UpdateGaugesLocked();
}

void JobManager::OnEventLocked(const std::string& job_id, JobEvent e) {
  if (e.time_unix_ms == 0) e.time_unix_ms = Now();
  if (lost_.count(job_id) > 0) {
    // Shared mode: another replica took this job over; our copy's events
    // are not the job's any more. Its end frees this replica.
    if (e.type == JobEvent::Type::kState && IsTerminal(e.state)) {
      lost_.erase(job_id);
      store_->DropFence(job_id);
      if (running_ == job_id) running_.reset();
    }
    return;
  }
  auto rec = store_->GetJob(job_id);
  if (!rec.ok()) {
    std::fprintf(stderr, "event for unknown job %s dropped: %s\n", job_id.c_str(),
                 rec.status().ToString().c_str());
    return;
  }
  JobRecord& j = *rec;
  if (IsTerminal(j.state)) return;  // late events after the end are dropped
  JobObserver* m = options_.observer;
  switch (e.type) {
    case JobEvent::Type::kState:
      if (e.state == j.state) return;
      state_counts_[j.state]--;
      state_counts_[e.state]++;
      j.state = e.state;
      if (e.state == JobState::kFailed || e.state == JobState::kCancelled) {
        j.failure_reason = e.message;
      }
      break;
    case JobEvent::Type::kProgress:
      if (m != nullptr) {
        m->OnTrainingProgress(e.step > j.step ? e.step - j.step : 0, e.loss,
                              e.examples_per_second);
      }
      j.step = e.step;
      if (e.total_steps > 0) j.total_steps = e.total_steps;
      break;
    case JobEvent::Type::kCheckpoint:
      j.result_family = e.family;
      j.result_version = e.version;
      break;
    default:
      break;
  }
  j.updated_unix_ms = e.time_unix_ms;
  auto st = store_->UpdateJob(j);
  if (st.ok()) st = store_->AppendJobEvent(job_id, e);
  if (!st.ok()) {
    std::fprintf(stderr, "job %s: cannot persist event: %s\n", job_id.c_str(),
                 st.ToString().c_str());
    if (shared() && absl::IsFailedPrecondition(st)) {
      // A stale fencing token: another replica took the job over. Nothing of
      // our copy reaches the job any more; the lease check stops it.
      lost_.insert(job_id);
      const bool terminal_here = e.type == JobEvent::Type::kState && IsTerminal(e.state);
      if (terminal_here) {
        lost_.erase(job_id);
        store_->DropFence(job_id);
        if (running_ == job_id) running_.reset();
      }
      return;
    }
    if (!shared() && e.type == JobEvent::Type::kState && IsTerminal(e.state)) {
      // The end must not be lost (e.g. the disk is full): kept and retried.
      // Not with several replicas: a retry would write without the job's
      // fence; there the unrenewed lease lets a replica fail the job instead.
      absl::MutexLock l(&unpersisted_mu_);
      Unpersisted& u = unpersisted_[job_id];
      u.record = j;
      u.event = e;
      u.record_written = false;
    }
  }
  const bool terminal = e.type == JobEvent::Type::kState && IsTerminal(e.state);
  // Shared mode: subscribers read the store (DeliverStoredEventsLocked), which
  // also holds the events of other replicas.
  auto it = shared() ? subscribers_.end() : subscribers_.find(job_id);
  if (it != subscribers_.end()) {
    for (JobEventSubscription* sub : it->second) {
      sub->Push(e);
      if (terminal) sub->Close();
    }
    if (terminal) subscribers_.erase(it);
  }
  if (terminal) {
    store_->DropFence(job_id);
    unfinished_tenant_.erase(job_id);
    cancel_requested_.erase(job_id);
    if (running_ == job_id) running_.reset();
    if (m != nullptr) m->OnJobEnded();
  }
}

void JobManager::UpdateGaugesLocked() {
  JobObserver* m = options_.observer;
  if (m == nullptr) return;
  for (const auto& [state, n] : state_counts_) m->OnJobCount(state, n);
}

void JobManager::DispatchLoop() {
  if (shared()) {
    SharedDispatchLoop();
    return;
  }
  while (true) {
    JobRecord job;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return shutdown_ || (!running_ && !queue_.empty());
      };
      mu_.Await(absl::Condition(&ready));
      if (shutdown_) return;
      // Fair share between tenants: the oldest queued job of the tenant that
      // was served least recently, so one tenant's backlog cannot keep
      // another's first job waiting behind all of it. One tenant: FIFO.
      auto tenant_of = [this](const std::string& job_id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        auto t = unfinished_tenant_.find(job_id);
        return t != unfinished_tenant_.end() ? t->second : std::string();
      };
      auto pick = queue_.begin();
      int64_t best = INT64_MAX;
      for (auto it = queue_.begin(); it != queue_.end(); ++it) {
        auto served = last_served_.find(tenant_of(*it));
        const int64_t v = served == last_served_.end() ? 0 : served->second;
        if (v < best) {
          best = v;
          pick = it;
        }
      }
      std::string id = *pick;
      queue_.erase(pick);
      last_served_[tenant_of(id)] = ++served_seq_;
      auto rec = store_->GetJob(id);
      if (!rec.ok() || rec->state != JobState::kQueued) continue;
      running_ = id;
      OnEventLocked(id, StateEvent(JobState::kValidating, ""));
      UpdateGaugesLocked();
      job = *rec;
      job.state = JobState::kValidating;
    }
    StartOnExecutor(job);
  }
}

void JobManager::StartOnExecutor(const JobRecord& job) {
  const std::string id = job.id;
  absl::Status st = executor_->Start(job, [this, id](const JobEvent& e) { OnEvent(id, e); });
  bool cancel = false;
  {
    absl::MutexLock lock(&mu_);
    if (!st.ok()) {
      if (running_ == id) {
        OnEventLocked(id, StateEvent(JobState::kFailed, std::string(st.message())));
        UpdateGaugesLocked();
      }
    } else {
      cancel = running_ == id && cancel_requested_.count(id) > 0;
    }
  }
  if (cancel) executor_->Cancel(id);
}

void JobManager::Shutdown() {
  {
    absl::MutexLock lock(&mu_);
    shutdown_ = true;
    for (auto& [id, subs] : subscribers_) {
      for (JobEventSubscription* s : subs) s->Close();
    }
    subscribers_.clear();
  }
  if (dispatcher_.joinable()) dispatcher_.join();
}

}  // namespace metatt
