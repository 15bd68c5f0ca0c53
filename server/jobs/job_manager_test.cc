#include "server/jobs/job_manager.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <thread>

#include "absl/time/clock.h"
#include "server/store/sqlite_store.h"
#include "server/store/store_test_util.h"
#include "server/jobs/test_util.h"

namespace metatt {
namespace {

using ::testing::AllOf;
using ::testing::Each;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;

class JobManagerTest : public testing_util::SqliteStoreFixture {
 protected:
  void SetUp() override {
    SqliteStoreFixture::SetUp();
    DatasetRecord d;
    d.id = "ds-1";
    d.name = "train";
    d.format = "tsv";
    d.num_rows = 3;
    ASSERT_TRUE(store_->PutDataset(d).ok());
  }
  void StartManager(int64_t max_queued = 16) {
    JobManagerOptions o;
    o.max_queued_jobs = max_queued;
    auto m = JobManager::Create(o, store_.get(), &executor_);
    ASSERT_TRUE(m.ok()) << m.status();
    manager_ = std::move(*m);
  }
  // A restart: the manager again on the same store, with `executor`.
  void RestartManager(FakeExecutor* executor) {
    auto m = JobManager::Create({}, store_.get(), executor);
    ASSERT_TRUE(m.ok()) << m.status();
    manager_ = std::move(*m);
  }
  // Waits until the executor started job `id` and the manager records it RUNNING.
  void ExpectRunning(const std::string& id) {
    ASSERT_TRUE(executor_.WaitStarted(id));
    ASSERT_EQ(WaitForState(id, JobState::kRunning), JobState::kRunning);
  }
  // The manager started, a job of family "a" created and running, and (when
  // `queued` is given) a job of family "b" queued behind it: their ids.
  void StartRunningJob(std::string* running, std::string* queued = nullptr) {
    StartManager();
    auto a = manager_->CreateJob(Spec("a"));
    ASSERT_TRUE(a.ok()) << a.status();
    *running = a->id;
    if (queued != nullptr) {
      auto b = manager_->CreateJob(Spec("b"));
      ASSERT_TRUE(b.ok()) << b.status();
      *queued = b->id;
    }
    ExpectRunning(*running);
  }
  static JobSpec Spec(const std::string& family = "glue", const std::string& key = "") {
    JobSpec s;
    s.family = family;
    s.tasks.push_back({"MRPC", "ds-1", "", 0.1, ""});
    s.hparams.max_steps = 10;
    s.idempotency_key = key;
    return s;
  }
  JobState WaitForState(const std::string& id, JobState want) {
    JobState last = JobState::kQueued;
    for (int i = 0; i < 500; ++i) {
      auto j = manager_->GetJob(id);
      if (j.ok()) {
        last = j->state;
        if (last == want) return last;
      }
      absl::SleepFor(absl::Milliseconds(10));
    }
    return last;
  }

  FakeExecutor executor_;
  std::unique_ptr<JobManager> manager_;
};

TEST_F(JobManagerTest, RunsAJobToSuccessAndRecordsEvents) {
  StartManager();
  auto job = manager_->CreateJob(Spec());
  ASSERT_TRUE(job.ok()) << job.status();
  ASSERT_TRUE(executor_.WaitStarted(job->id));
  EXPECT_EQ(WaitForState(job->id, JobState::kRunning), JobState::kRunning);
  executor_.Progress(job->id, 5, 10, 0.7);
  executor_.Succeed(job->id, "glue", 1);
  auto done = manager_->GetJob(job->id);
  ASSERT_TRUE(done.ok());
  EXPECT_EQ(done->state, JobState::kSucceeded);
  EXPECT_EQ(done->step, 5);
  EXPECT_EQ(done->result_family, "glue");
  EXPECT_EQ(done->result_version, 1);

  auto sub = manager_->Subscribe(job->id);
  ASSERT_TRUE(sub.ok());
  std::vector<std::string> seen;
  JobEvent e;
  while ((*sub)->Next(&e, absl::Seconds(1)) == JobEventSubscription::Result::kEvent) {
    if (e.type == JobEvent::Type::kState) {
      seen.push_back(JobStateName(e.state));
    } else if (e.type == JobEvent::Type::kProgress) {
      seen.push_back("progress");
    } else if (e.type == JobEvent::Type::kCheckpoint) {
      seen.push_back("checkpoint");
    }
  }
  EXPECT_THAT(
      seen, ElementsAre("QUEUED", "VALIDATING", "RUNNING", "progress", "checkpoint", "SUCCEEDED"));
  EXPECT_EQ((*sub)->Next(&e, absl::Milliseconds(1)), JobEventSubscription::Result::kEnd);
}

TEST_F(JobManagerTest, LiveSubscriberFollowsUntilTerminalState) {
  StartManager();
  auto job = manager_->CreateJob(Spec());
  ASSERT_TRUE(job.ok());
  ASSERT_TRUE(executor_.WaitStarted(job->id));
  auto sub = manager_->Subscribe(job->id);
  ASSERT_TRUE(sub.ok());
  std::vector<int64_t> steps;
  JobState final_state = JobState::kQueued;
  std::thread follower([&] {
    JobEvent e;
    while (true) {
      auto r = (*sub)->Next(&e, absl::Seconds(5));
      if (r != JobEventSubscription::Result::kEvent) break;
      if (e.type == JobEvent::Type::kProgress) steps.push_back(e.step);
      if (e.type == JobEvent::Type::kState) final_state = e.state;
    }
  });
  for (int s = 1; s <= 3; ++s) executor_.Progress(job->id, s, 3, 1.0 / s);
  executor_.End(job->id, JobState::kFailed, "diverged");
  follower.join();
  EXPECT_THAT(steps, ElementsAre(1, 2, 3));
  EXPECT_EQ(final_state, JobState::kFailed);
  EXPECT_EQ(manager_->GetJob(job->id)->failure_reason, "diverged");
}

TEST_F(JobManagerTest, ValidationNamesTheField) {
  StartManager();
  JobSpec s = Spec();
  s.tasks[0].dataset_id = "ds-missing";
  auto r = manager_->CreateJob(s);
  EXPECT_TRUE(absl::IsNotFound(r.status())) << r.status();
  EXPECT_THAT(r.status().message(), HasSubstr("spec.tasks[0].dataset_id"));

  s = Spec();
  s.adapter.form = "3d";
  r = manager_->CreateJob(s);
  EXPECT_TRUE(absl::IsInvalidArgument(r.status()));
  EXPECT_THAT(r.status().message(), HasSubstr("spec.adapter.form"));

  s = Spec("bad name!");
  EXPECT_THAT(manager_->CreateJob(s).status().message(), HasSubstr("spec.family"));

  s = Spec();
  s.hparams.learning_rate = 0;
  EXPECT_THAT(manager_->CreateJob(s).status().message(), HasSubstr("spec.hparams.learning_rate"));

  s = Spec();
  s.kind = JobKind::kAddTask;
  r = manager_->CreateJob(s);
  EXPECT_TRUE(absl::IsNotFound(r.status()));
  EXPECT_THAT(r.status().message(), HasSubstr("family 'glue' not found"));

  FamilyVersionRecord f;
  f.family = "glue";
  f.version = 1;
  f.form = "4+1d";
  f.tasks.push_back({"MRPC", 0, 2, false, {"0", "1"}, {}});
  ASSERT_TRUE(store_->PublishFamilyVersion(f).ok());
  EXPECT_TRUE(absl::IsAlreadyExists(manager_->CreateJob(Spec()).status()));
  r = manager_->CreateJob(s);  // add MRPC again
  EXPECT_TRUE(absl::IsAlreadyExists(r.status()));
  EXPECT_THAT(r.status().message(), HasSubstr("already has task 'MRPC'"));
  s.tasks[0].task_name = "SST-2";
  EXPECT_TRUE(manager_->CreateJob(s).ok());
}

TEST_F(JobManagerTest, OneJobAtATimeInFifoOrder) {
  StartManager();
  auto a = manager_->CreateJob(Spec("a"));
  auto b = manager_->CreateJob(Spec("b"));
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_TRUE(executor_.WaitStarted(a->id));
  absl::SleepFor(absl::Milliseconds(50));
  EXPECT_THAT(executor_.started(), ElementsAre(a->id));
  EXPECT_EQ(manager_->GetJob(b->id)->state, JobState::kQueued);
  executor_.Succeed(a->id, "a", 1);
  ASSERT_TRUE(executor_.WaitStarted(b->id));
  EXPECT_THAT(executor_.started(), ElementsAre(a->id, b->id));
}

TEST_F(JobManagerTest, QueueLimitIsResourceExhausted) {
  StartManager(/*max_queued=*/2);
  auto a = manager_->CreateJob(Spec("a"));
  ASSERT_TRUE(a.ok());
  ASSERT_TRUE(executor_.WaitStarted(a->id));  // running, no longer queued
  ASSERT_TRUE(manager_->CreateJob(Spec("b")).ok());
  ASSERT_TRUE(manager_->CreateJob(Spec("c")).ok());
  auto d = manager_->CreateJob(Spec("d"));
  EXPECT_TRUE(absl::IsResourceExhausted(d.status())) << d.status();
  EXPECT_THAT(d.status().message(), HasSubstr("max_queued_jobs=2"));
}

TEST_F(JobManagerTest, IdempotencyKeyReturnsTheSameJob) {
  StartManager();
  auto a = manager_->CreateJob(Spec("glue", "k1"));
  auto b = manager_->CreateJob(Spec("glue", "k1"));
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->id, b->id);
  auto c = manager_->CreateJob(Spec("other", "k1"));
  EXPECT_TRUE(absl::IsFailedPrecondition(c.status())) << c.status();
  EXPECT_THAT(c.status().message(), HasSubstr("idempotency_key"));
}

TEST_F(JobManagerTest, CancelQueuedRunningAndFinished) {
  std::string a, b;
  ASSERT_NO_FATAL_FAILURE(StartRunningJob(&a, &b));

  auto cb = manager_->CancelJob(b);
  ASSERT_TRUE(cb.ok());
  EXPECT_EQ(cb->state, JobState::kCancelled);
  EXPECT_THAT(cb->failure_reason, HasSubstr("queued"));

  auto ca = manager_->CancelJob(a);
  ASSERT_TRUE(ca.ok());
  // Only a is cancelled. A cancel that lands while the worker is still
  // returning from Start() is delivered once more by the worker (it cannot
  // tell whether the executor saw the first), so a may appear twice:
  // executors treat Cancel as idempotent.
  EXPECT_THAT(executor_.cancels(), AllOf(Not(IsEmpty()), Each(a)));
  EXPECT_LE(executor_.cancels().size(), 2u);
  EXPECT_EQ(WaitForState(a, JobState::kCancelled), JobState::kCancelled);
  EXPECT_TRUE(manager_->CancelJob(a).ok());  // no-op

  auto c = manager_->CreateJob(Spec("c"));
  ASSERT_TRUE(executor_.WaitStarted(c->id));  // b was skipped
  EXPECT_THAT(executor_.started(), ElementsAre(a, c->id));
  executor_.Succeed(c->id, "c", 1);
  auto cc = manager_->CancelJob(c->id);
  EXPECT_TRUE(absl::IsFailedPrecondition(cc.status()));
  EXPECT_TRUE(absl::IsNotFound(manager_->CancelJob("job-nope").status()));
}

TEST_F(JobManagerTest, StartFailureFailsTheJobWithTheReason) {
  executor_.set_start_status(absl::FailedPreconditionError("spec.tasks[0]: dataset has 1 label"));
  StartManager();
  auto a = manager_->CreateJob(Spec());
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(WaitForState(a->id, JobState::kFailed), JobState::kFailed);
  EXPECT_THAT(manager_->GetJob(a->id)->failure_reason, HasSubstr("dataset has 1 label"));
}

TEST_F(JobManagerTest, RestartFailsRunningJobsAndKeepsQueuedOnes) {
  std::string a, b;
  ASSERT_NO_FATAL_FAILURE(StartRunningJob(&a, &b));
  manager_.reset();  // "crash": a stays RUNNING in the store
  store_.reset();
  OpenStore();
  EXPECT_EQ(store_->GetJob(a)->state, JobState::kRunning);

  FakeExecutor fresh;
  ASSERT_NO_FATAL_FAILURE(RestartManager(&fresh));
  auto ra = manager_->GetJob(a);
  EXPECT_EQ(ra->state, JobState::kFailed);
  EXPECT_EQ(ra->failure_reason, kRestartFailureReason);
  ASSERT_TRUE(fresh.WaitStarted(b));
  EXPECT_THAT(fresh.started(), ElementsAre(b));
  manager_.reset();  // before `fresh` goes away
}

TEST_F(JobManagerTest, GracefulShutdownFailsTheRunningJobWithTheReason) {
  std::string a, b;
  ASSERT_NO_FATAL_FAILURE(StartRunningJob(&a, &b));
  manager_->Shutdown();
  EXPECT_EQ(manager_->FailRunning("server shut down"), std::optional<std::string>(a));
  EXPECT_EQ(manager_->FailRunning("again"), std::nullopt);
  executor_.Succeed(a, "a", 1);  // a late event of the stopped executor is dropped
  auto ra = manager_->GetJob(a);
  EXPECT_EQ(ra->state, JobState::kFailed);
  EXPECT_EQ(ra->failure_reason, "server shut down");
  EXPECT_EQ(manager_->GetJob(b)->state, JobState::kQueued);  // runs after the restart
  manager_.reset();
}

TEST_F(JobManagerTest, RestartSucceedsARunningJobWhoseVersionWasPublished) {
  std::string a;
  ASSERT_NO_FATAL_FAILURE(StartRunningJob(&a));
  manager_.reset();  // "crash" after the publication, before the SUCCEEDED event
  FamilyVersionRecord v;
  v.family = "a";
  v.version = 1;
  v.form = "4+1d";
  v.created_by_job = a;
  ASSERT_TRUE(store_->PublishFamilyVersion(v).ok());

  FakeExecutor fresh;
  ASSERT_NO_FATAL_FAILURE(RestartManager(&fresh));
  auto ra = manager_->GetJob(a);
  EXPECT_EQ(ra->state, JobState::kSucceeded);
  EXPECT_EQ(ra->result_family, "a");
  EXPECT_EQ(ra->result_version, 1);
  EXPECT_TRUE(fresh.started().empty());
  manager_.reset();
}

TEST_F(JobManagerTest, RestartRequeuesResumableJobs) {
  std::string a;
  ASSERT_NO_FATAL_FAILURE(StartRunningJob(&a));
  manager_.reset();

  FakeExecutor fresh;
  fresh.set_can_resume(true);
  ASSERT_NO_FATAL_FAILURE(RestartManager(&fresh));
  ASSERT_TRUE(fresh.WaitStarted(a));
  fresh.Succeed(a, "a", 1);
  EXPECT_EQ(manager_->GetJob(a)->state, JobState::kSucceeded);
  manager_.reset();
}

}  // namespace
}  // namespace metatt
