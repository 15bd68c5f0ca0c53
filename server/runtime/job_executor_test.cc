// RuntimeJobExecutor end to end on a tiny random BERT: train a family, add a
// task while predictions stream, publish immutable versions.
#include "server/runtime/job_executor.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <thread>

#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "server/runtime/predictor.h"
#include "server/runtime/test_runtime.h"
#include "server/training/text_batch.h"

namespace metatt {
namespace {

using ::testing::HasSubstr;

bool Terminal(JobState s) {
  return s == JobState::kSucceeded || s == JobState::kFailed || s == JobState::kCancelled;
}

// Collects a job's events; Wait() returns the terminal state event.
class EventLog {
 public:
  JobExecutor::EmitFn Fn() {
    return [this](const JobEvent& e) {
      std::lock_guard<std::mutex> l(mu_);
      events_.push_back(e);
      if (e.type == JobEvent::Type::kState && Terminal(e.state)) {
        ++terminal_;
        if (!done_.HasBeenNotified()) done_.Notify();
      }
    };
  }
  JobEvent Wait() {
    EXPECT_TRUE(done_.WaitForNotificationWithTimeout(absl::Seconds(50)));
    std::lock_guard<std::mutex> l(mu_);
    for (const auto& e : events_) {
      if (e.type == JobEvent::Type::kState && Terminal(e.state)) return e;
    }
    return JobEvent();
  }
  bool done() const { return done_.HasBeenNotified(); }
  std::vector<JobEvent> events() {
    std::lock_guard<std::mutex> l(mu_);
    return events_;
  }
  int terminal() {
    std::lock_guard<std::mutex> l(mu_);
    return terminal_;
  }

 private:
  std::mutex mu_;
  std::vector<JobEvent> events_;
  int terminal_ = 0;
  absl::Notification done_;
};

class JobExecutorTest : public testing_util::RuntimeTest {
 protected:
  void SetUp() override {
    ASSERT_NO_FATAL_FAILURE(MakeEncoderAndRegistry(3));
    DeviceScheduler::Options so;
    so.batch_timeout_ms = 1;
    so.train_share = 2;
    ASSERT_NO_FATAL_FAILURE(StartScheduler(so));
    RuntimeJobExecutor::Options eo;
    eo.progress_every = 5;
    executor_ =
        std::make_unique<RuntimeJobExecutor>(eo, &store_, registry_.get(), scheduler_.get(),
                                             MakeBatchTokenizer(testing_util::TinyTokenizer()));
  }
  void TearDown() override { scheduler_->Shutdown(); }

  // Writes a TSV dataset (header "sentence\tlabel") and registers it.
  std::string AddDataset(const std::string& id, int n, uint64_t seed, const std::string& cue,
                         bool regression = false) {
    Dataset ds = testing_util::SyntheticDataset(n, seed, regression, cue);
    const std::string path = dir_.path() + "/" + id + ".tsv";
    std::ofstream f(path);
    f << "sentence\tlabel\n";
    for (const auto& e : ds.examples) {
      f << e.text << "\t";
      if (regression) {
        f << e.label_value << "\n";
      } else {
        f << (e.label_id ? "pos" : "neg") << "\n";
      }
    }
    f.close();
    DatasetRecord r;
    r.id = id;
    r.name = id;
    r.format = "tsv";
    r.spec_json = regression
                      ? R"({"text_column":"sentence","label_column":"label","label_kind":"regression"})"
                      : R"({"text_column":"sentence","label_column":"label"})";
    r.path = path;
    r.num_rows = n;
    r.regression = regression;
    EXPECT_TRUE(store_.PutDataset(r).ok());
    return id;
  }

  JobRecord Job(const std::string& id, JobKind kind, const std::string& family,
                std::vector<std::pair<std::string, std::string>> tasks, int64_t steps) {
    JobRecord j;
    j.id = id;
    j.spec.kind = kind;
    j.spec.family = family;
    for (auto& [name, ds] : tasks) {
      JobTaskSpec t;
      t.task_name = name;
      t.dataset_id = ds;
      t.eval_fraction = 0.2;
      j.spec.tasks.push_back(t);
    }
    j.spec.adapter.form = "4+1d";
    j.spec.adapter.ranks = {4};
    j.spec.adapter.projections = {"q", "v"};
    j.spec.hparams.max_steps = steps;
    j.spec.hparams.batch_size = 8;
    j.spec.hparams.learning_rate = 5e-3;
    j.spec.hparams.eval_every = 10;
    j.spec.hparams.max_length = 32;
    return j;
  }

  absl::StatusOr<std::vector<PredictOutput>> PredictTask(const std::string& task,
                                                         int64_t version = 0) {
    std::vector<PredictInput> in(3);
    const char* texts[] = {"the movie was great", "a very bad plot", "the actor was good"};
    for (int i = 0; i < 3; ++i) {
      in[i].family = "fam";
      in[i].version = version;
      in[i].task = task;
      in[i].text = texts[i];
    }
    return predictor_->Predict(in, 0);
  }

  std::unique_ptr<RuntimeJobExecutor> executor_;
};

TEST_F(JobExecutorTest, TrainThenAddTaskWhilePredicting) {
  AddDataset("ds_a", 80, 1, "great");
  AddDataset("ds_b", 80, 2, "bad");
  AddDataset("ds_c", 80, 3, "good", /*regression=*/true);

  // 1. A new two-task 4+1D family.
  EventLog log1;
  ASSERT_TRUE(executor_
                  ->Start(Job("job1", JobKind::kMultiTask, "fam", {{"A", "ds_a"}, {"B", "ds_b"}},
                              30),
                          log1.Fn())
                  .ok());
  JobEvent end1 = log1.Wait();
  ASSERT_EQ(end1.state, JobState::kSucceeded) << end1.message;
  EXPECT_EQ(end1.family, "fam");
  EXPECT_EQ(end1.version, 1);
  EXPECT_EQ(log1.terminal(), 1);
  bool saw_progress = false, saw_eval = false, saw_checkpoint = false, saw_running = false;
  bool saw_recipe = false;
  for (const auto& e : log1.events()) {
    // The resolved hyper-parameters: set ones as set, the rest marked auto.
    saw_recipe |= e.type == JobEvent::Type::kLog &&
                  e.message.find("learning_rate=0.005 ") != std::string::npos &&
                  e.message.find("weight_decay=0 (auto)") != std::string::npos;
    saw_progress |= e.type == JobEvent::Type::kProgress && e.total_steps == 30;
    saw_eval |= e.type == JobEvent::Type::kEval && e.metrics.count("A/accuracy") > 0;
    saw_checkpoint |= e.type == JobEvent::Type::kCheckpoint && e.version == 1;
    saw_running |= e.type == JobEvent::Type::kState && e.state == JobState::kRunning;
  }
  EXPECT_TRUE(saw_recipe);
  EXPECT_TRUE(saw_progress);
  EXPECT_TRUE(saw_eval);
  EXPECT_TRUE(saw_checkpoint);
  EXPECT_TRUE(saw_running);
  auto a_v1 = PredictTask("A");
  ASSERT_TRUE(a_v1.ok()) << a_v1.status();
  EXPECT_THAT((*a_v1)[0].label_name, ::testing::AnyOf("neg", "pos"));

  // 2. Add a regression task; predictions keep flowing meanwhile.
  EventLog log2;
  ASSERT_TRUE(executor_
                  ->Start(Job("job2", JobKind::kAddTask, "fam", {{"C", "ds_c"}}, 40),
                          log2.Fn())
                  .ok());
  int served_while_training = 0;
  while (!log2.done()) {
    auto out = PredictTask(served_while_training % 2 ? "A" : "B");
    ASSERT_TRUE(out.ok()) << out.status();
    ++served_while_training;
    absl::SleepFor(absl::Milliseconds(5));
  }
  EXPECT_GE(served_while_training, 3) << "predictions stalled while the job trained";
  JobEvent end2 = log2.Wait();
  ASSERT_EQ(end2.state, JobState::kSucceeded) << end2.message;
  EXPECT_EQ(end2.version, 2);
  // The recipe event shows the structure that trains: the family's.
  bool saw_family_structure = false;
  for (const auto& e : log2.events()) {
    saw_family_structure |= e.type == JobEvent::Type::kLog &&
                            e.message.find("ranks=4 (family)") != std::string::npos &&
                            e.message.find("projections=q,v (family)") != std::string::npos;
  }
  EXPECT_TRUE(saw_family_structure);

  auto fam = registry_->Get("fam");
  ASSERT_TRUE(fam.ok());
  EXPECT_EQ((*fam)->version(), 2);
  ASSERT_EQ((*fam)->num_tasks(), 3);
  EXPECT_EQ((*fam)->record.tasks[0].name, "A");
  EXPECT_EQ((*fam)->record.tasks[1].name, "B");
  EXPECT_EQ((*fam)->record.tasks[2].name, "C");
  EXPECT_TRUE((*fam)->record.tasks[2].regression);
  EXPECT_EQ((*fam)->record.created_by_job, "job2");
  // An add-task job publishes an appended version: only the new task's
  // slice and head on disk, only its record (and the parent) in the store.
  EXPECT_TRUE(std::filesystem::exists(dir_.path() + "/families/fam/v2/appended.json"));
  EXPECT_FALSE(std::filesystem::exists(dir_.path() + "/families/fam/v2/family.json"));
  auto recs = store_.ListFamilyVersions("fam");
  ASSERT_TRUE(recs.ok());
  ASSERT_EQ(recs->size(), 2u);
  EXPECT_EQ((*recs)[1].parent_version, 1);
  ASSERT_EQ((*recs)[1].tasks.size(), 1u);
  EXPECT_EQ((*recs)[1].tasks[0].name, "C");

  // The new task is served; earlier tasks answer exactly as before (shared
  // cores, their slices and heads were frozen); v1 stays addressable.
  auto c = PredictTask("C");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE((*c)[0].regression);
  EXPECT_EQ((*c)[0].task_index, 2);
  auto a_v2 = PredictTask("A");
  ASSERT_TRUE(a_v2.ok());
  for (int i = 0; i < 3; ++i) {
    ASSERT_EQ((*a_v2)[i].scores.size(), (*a_v1)[i].scores.size());
    for (size_t k = 0; k < (*a_v1)[i].scores.size(); ++k) {
      EXPECT_NEAR((*a_v2)[i].scores[k], (*a_v1)[i].scores[k], 1e-5);
    }
  }
  EXPECT_EQ(PredictTask("C", 1).status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(PredictTask("A", 1).ok());

  // A fresh registry reloads v2 with every task from disk.
  AdapterRegistry::Options ro;
  ro.data_dir = dir_.path();
  auto reg2 = AdapterRegistry::Create(ro, &store_);
  ASSERT_TRUE(reg2.ok());
  ASSERT_TRUE((*reg2)->LoadAll().ok());
  auto reloaded = (*reg2)->Get("fam");
  ASSERT_TRUE(reloaded.ok()) << reloaded.status();
  EXPECT_EQ((*reloaded)->version(), 2);
  EXPECT_EQ((*reloaded)->num_tasks(), 3);
  EXPECT_TRUE(torch::equal((*reloaded)->head_weight, (*fam)->head_weight));
}

TEST_F(JobExecutorTest, ValidationNamesTheField) {
  AddDataset("ds", 20, 1, "great");
  EventLog log;
  auto st = executor_->Start(Job("j", JobKind::kTrainFamily, "fam", {{"A", "nope"}}, 5),
                             log.Fn());
  EXPECT_EQ(st.code(), absl::StatusCode::kNotFound) << st;
  EXPECT_THAT(std::string(st.message()), HasSubstr("tasks[0].dataset_id"));

  st = executor_->Start(Job("j", JobKind::kAddTask, "missing", {{"A", "ds"}}, 5), log.Fn());
  EXPECT_EQ(st.code(), absl::StatusCode::kNotFound) << st;
  EXPECT_THAT(std::string(st.message()), HasSubstr("family"));

  JobRecord j = Job("j", JobKind::kTrainFamily, "fam", {{"A", "ds"}}, 5);
  j.spec.adapter.form = "7d";
  st = executor_->Start(j, log.Fn());
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_THAT(std::string(st.message()), HasSubstr("adapter.form"));

  j = Job("j", JobKind::kTrainFamily, "fam", {{"A", "ds"}, {"A", "ds"}}, 5);
  st = executor_->Start(j, log.Fn());
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_THAT(std::string(st.message()), HasSubstr("tasks[1].task_name"));

  j = Job("j", JobKind::kTrainFamily, "fam", {{"A", "ds"}}, 0);
  st = executor_->Start(j, log.Fn());
  EXPECT_THAT(std::string(st.message()), HasSubstr("hparams.max_steps"));

  j = Job("j", JobKind::kTrainFamily, "fam", {{"A", "ds"}}, 5);
  j.spec.adapter.form = "4d";
  j.spec.tasks.push_back(j.spec.tasks[0]);
  j.spec.tasks[1].task_name = "B";
  st = executor_->Start(j, log.Fn());
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;

  // A family that exists cannot be trained anew; an existing task cannot be added.
  EventLog ok_log;
  ASSERT_TRUE(
      executor_->Start(Job("j1", JobKind::kTrainFamily, "fam", {{"A", "ds"}}, 3), ok_log.Fn())
          .ok());
  ASSERT_EQ(ok_log.Wait().state, JobState::kSucceeded);
  st = executor_->Start(Job("j2", JobKind::kTrainFamily, "fam", {{"A", "ds"}}, 3), log.Fn());
  EXPECT_EQ(st.code(), absl::StatusCode::kAlreadyExists) << st;
  st = executor_->Start(Job("j3", JobKind::kAddTask, "fam", {{"A", "ds"}}, 3), log.Fn());
  EXPECT_EQ(st.code(), absl::StatusCode::kAlreadyExists) << st;
  EXPECT_THAT(std::string(st.message()), HasSubstr("tasks[0].task_name"));
  // An added task keeps the family's structure (ranks 4 on q,v): a spec
  // asking for another is refused naming the field; the same one, in any
  // order or as one rank per bond, is accepted (below).
  j = Job("j4", JobKind::kAddTask, "fam", {{"B", "ds"}}, 3);
  j.spec.adapter.ranks = {8};
  st = executor_->Start(j, log.Fn());
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_THAT(std::string(st.message()), HasSubstr("adapter.ranks: 8 differs"));
  EXPECT_THAT(std::string(st.message()), HasSubstr("ranks 4,4,4,4 on q,v"));
  j = Job("j4", JobKind::kAddTask, "fam", {{"B", "ds"}}, 3);
  j.spec.adapter.projections = {"q", "k", "v"};
  st = executor_->Start(j, log.Fn());
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_THAT(std::string(st.message()), HasSubstr("adapter.projections"));
  j = Job("j4", JobKind::kAddTask, "fam", {{"B", "ds"}}, 3);
  j.spec.adapter.alpha = 16.0;
  st = executor_->Start(j, log.Fn());
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_THAT(std::string(st.message()), HasSubstr("adapter.alpha"));
  EXPECT_TRUE(log.events().empty());
  EventLog same_log;
  j = Job("j5", JobKind::kAddTask, "fam", {{"B", "ds"}}, 3);
  j.spec.adapter.projections = {"v", "q"};
  j.spec.adapter.ranks = {4, 4, 4, 4};
  ASSERT_TRUE(executor_->Start(j, same_log.Fn()).ok());
  EXPECT_EQ(same_log.Wait().state, JobState::kSucceeded);
}

TEST_F(JobExecutorTest, CancelEndsCancelledWithoutPublishing) {
  AddDataset("ds", 40, 1, "great");
  EventLog log;
  ASSERT_TRUE(
      executor_->Start(Job("jc", JobKind::kTrainFamily, "fam", {{"A", "ds"}}, 100000), log.Fn())
          .ok());
  // Let it run a little, then cancel.
  bool progressed = false;
  for (int i = 0; i < 5000 && !progressed; ++i) {
    for (const auto& e : log.events()) progressed |= e.type == JobEvent::Type::kProgress;
    absl::SleepFor(absl::Milliseconds(2));
  }
  EXPECT_TRUE(progressed);
  executor_->Cancel("jc");
  JobEvent end = log.Wait();
  EXPECT_EQ(end.state, JobState::kCancelled);
  EXPECT_EQ(log.terminal(), 1);
  EXPECT_EQ(registry_->Get("fam").status().code(), absl::StatusCode::kNotFound);
}

TEST(DatasetSpecFromRecordTest, ReadsColumnMapping) {
  DatasetRecord r;
  r.id = "d";
  r.format = "csv";
  r.spec_json = R"({"text_column":"s1","text_pair_column":"2","label_column":"y",
                    "has_header":true,"quoting":false,"label_vocab":["a","b"]})";
  auto spec = DatasetSpecFromRecord(r);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->format, DataFormat::kCsv);
  EXPECT_EQ(spec->text.name, "s1");
  ASSERT_TRUE(spec->text_pair.has_value());
  EXPECT_EQ(spec->text_pair->index, 2);
  EXPECT_EQ(spec->label.name, "y");
  EXPECT_FALSE(spec->quoting);
  EXPECT_EQ(spec->label_vocab, (std::vector<std::string>{"a", "b"}));
  r.spec_json = "not json";
  EXPECT_EQ(DatasetSpecFromRecord(r).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace metatt
