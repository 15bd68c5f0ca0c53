// JobManager's shared mode: several metatt-server replicas on one store
// (PostgreSQL). The protocol:
//
//  * claim   — an idle replica takes the oldest QUEUED unclaimed job with
//              SELECT ... FOR UPDATE SKIP LOCKED (Store::ClaimNextJob); the
//              claim records the replica id and a lease on the database clock.
//  * renew   — every poll the holder renews the lease; the renewal also
//              carries a cancel requested through another replica.
//  * take over — a replica that finds an expired lease (its holder died or
//              lost the database for longer than the lease) takes the job over
//              atomically (Store::TakeOverExpiredJob, again SKIP LOCKED, so one
//              replica decides) and FAILS it with a reason naming the dead
//              replica, because a half-trained job has no resumable checkpoint;
//              a job the executor can resume (JobExecutor::CanResume) and a job
//              claimed but never started are re-queued for any replica instead.
//  * fence   — every claim and take-over raises the job's claim epoch (its
//              fencing token); the replica holding the claim registers it
//              with its store (Store::HoldFence), so that each of its writes
//              for the job (state, events, lease, the family version the job
//              publishes) is refused once another replica took the job over:
//              a replica that paused past its lease cannot publish or end the
//              job a second time.
//  * streams — StreamJobEvents subscribers on any replica read the job's
//              events from the store every poll.
#include <algorithm>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "server/jobs/job_manager.h"

namespace metatt {
namespace {

JobEvent Event(JobEvent::Type type, JobState s, std::string message) {
  JobEvent e;
  e.type = type;
  e.state = s;
  e.message = std::move(message);
  return e;
}

void Warn(const std::string& msg) {
  std::fprintf(stderr, "[job manager] %s\n", msg.c_str());
  std::fflush(stderr);
}

}  // namespace

int64_t JobManager::QueuedInStoreLocked() {
  std::string next;
  auto queued = store_->ListJobs(JobState::kQueued, options_.max_queued_jobs + 1, "", &next);
  return queued.ok() ? static_cast<int64_t>(queued->size()) : 0;
}

std::optional<std::string> JobManager::RenewLeaseLocked() {
  if (!running_ || lost_.count(*running_) > 0) return std::nullopt;
  const std::string id = *running_;
  auto renewed = store_->RenewLease(id, options_.replica_id, options_.lease_ms);
  if (renewed.ok()) {
    if (*renewed && cancel_requested_.insert(id).second) return id;  // asked elsewhere
    return std::nullopt;
  }
  if (absl::IsFailedPrecondition(renewed.status())) {
    // Another replica decided the job's fate while we could not renew: stop
    // our copy and ignore what it still reports.
    Warn(absl::StrCat("lost the lease on job ", id, ": ", renewed.status().message(),
                      "; stopping the local copy"));
    lost_.insert(id);
    return id;
  }
  Warn(absl::StrCat("cannot renew the lease on job ", id, ": ", renewed.status().ToString()));
  return std::nullopt;
}

void JobManager::ReapExpiredLocked() {
  for (int i = 0; i < 16; ++i) {
    std::string dead;
    auto j = store_->TakeOverExpiredJob(options_.replica_id, options_.lease_ms, &dead);
    if (!j.ok()) {
      if (!absl::IsNotFound(j.status())) Warn(j.status().ToString());
      return;
    }
    store_->HoldFence(j->id, j->claim_epoch);  // our writes carry the new epoch
    const std::string why =
        absl::StrCat("replica ", dead, " stopped renewing its lease on the job (no heartbeat for ",
                     options_.lease_ms, " ms; replica ", options_.replica_id, " took it over)");
    if (j->state == JobState::kQueued) {
      OnEventLocked(j->id, Event(JobEvent::Type::kLog, j->state,
                                 absl::StrCat(why, " before it started; re-queued")));
    } else if (executor_->CanResume(*j)) {
      OnEventLocked(j->id, Event(JobEvent::Type::kState, JobState::kQueued,
                                 absl::StrCat(why, "; re-queued to resume from its checkpoint")));
    } else {
      OnEventLocked(j->id, Event(JobEvent::Type::kState, JobState::kFailed,
                                 absl::StrCat(why, " while it was ", JobStateName(j->state),
                                              "; failed: no resumable checkpoint")));
      continue;
    }
    auto st = store_->ReleaseClaim(j->id, options_.replica_id);  // claimable by anyone
    if (!st.ok()) Warn(st.ToString());
    store_->DropFence(j->id);
    wake_ = true;
  }
}

void JobManager::DeliverStoredEventsLocked() {
  for (auto it = subscribers_.begin(); it != subscribers_.end();) {
    auto events = store_->ListJobEvents(it->first);
    if (!events.ok()) {
      ++it;
      continue;
    }
    const int64_t n = static_cast<int64_t>(events->size());
    bool terminal = false;
    for (const JobEvent& e : *events) {
      terminal |= e.type == JobEvent::Type::kState && IsTerminal(e.state);
    }
    for (JobEventSubscription* sub : it->second) {
      for (int64_t i = sub->delivered_; i < n; ++i) sub->Push((*events)[i]);
      sub->delivered_ = std::max(sub->delivered_, n);
      if (terminal) sub->Close();
    }
    it = terminal ? subscribers_.erase(it) : std::next(it);
  }
}

void JobManager::SharedDispatchLoop() {
  while (true) {
    std::optional<std::string> cancel;
    bool idle = false;
    {
      absl::MutexLock lock(&mu_);
      auto woken = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return shutdown_ || wake_; };
      mu_.AwaitWithTimeout(absl::Condition(&woken), absl::Milliseconds(options_.poll_ms));
      if (shutdown_) return;
      wake_ = false;
      cancel = RenewLeaseLocked();
      ReapExpiredLocked();
      DeliverStoredEventsLocked();
      UpdateGaugesLocked();
      idle = !running_.has_value();
    }
    if (cancel) executor_->Cancel(*cancel);  // never under the lock: it may emit
    if (!idle) continue;

    auto claimed = store_->ClaimNextJob(options_.replica_id, options_.lease_ms);
    if (!claimed.ok()) {
      if (!absl::IsNotFound(claimed.status())) Warn(claimed.status().ToString());
      continue;
    }
    JobRecord job;
    {
      absl::MutexLock lock(&mu_);
      const std::string id = claimed->id;
      store_->HoldFence(id, claimed->claim_epoch);
      running_ = id;
      unfinished_tenant_[id] = claimed->tenant;
      OnEventLocked(id, Event(JobEvent::Type::kLog, JobState::kQueued,
                              absl::StrCat("claimed by replica ", options_.replica_id)));
      OnEventLocked(id, Event(JobEvent::Type::kState, JobState::kValidating, ""));
      UpdateGaugesLocked();
      auto cur = store_->GetJob(id);
      if (!cur.ok() || cur->state != JobState::kValidating) {
        // Cancelled between the claim and now: nothing to run.
        if (running_ == id) running_.reset();
        store_->DropFence(id);
        continue;
      }
      if (shutdown_) {
        OnEventLocked(id, Event(JobEvent::Type::kState, JobState::kQueued,
                                "replica shutting down before the job started; re-queued"));
        store_->ReleaseClaim(id, options_.replica_id).IgnoreError();
        store_->DropFence(id);
        running_.reset();
        return;
      }
      job = *cur;
    }
    StartOnExecutor(job);
  }
}

}  // namespace metatt
