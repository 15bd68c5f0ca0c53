#include "server/jobs/job_validation.h"

#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace metatt {
namespace {

using ::testing::HasSubstr;

JobSpec Valid() {
  JobSpec s;
  s.family = "glue";
  JobTaskSpec t;
  t.task_name = "MRPC";
  t.dataset_id = "ds1";
  s.tasks.push_back(t);
  return s;
}

std::string Message(const JobSpec& s, const JobLimits& l = {}) {
  absl::Status st = ValidateJobSpec(s, l);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  return std::string(st.message());
}

TEST(JobValidationTest, DefaultsAreValid) {
  EXPECT_TRUE(ValidateJobSpec(Valid()).ok());
}

TEST(JobValidationTest, LoraFormTakesOneRankAndItsOwnInits) {
  JobSpec s = Valid();
  s.adapter.form = "lora";
  s.adapter.ranks = {8};
  s.adapter.init = "random";
  EXPECT_TRUE(ValidateJobSpec(s).ok());
  s.adapter.ranks = {8, 4};
  EXPECT_THAT(Message(s), HasSubstr("spec.adapter.ranks"));
  s.adapter.ranks = {8};
  s.adapter.init = "ze-id-id-id";
  EXPECT_THAT(Message(s), HasSubstr("spec.adapter.init"));
  s.adapter.form = "lora2";
  EXPECT_THAT(Message(s), HasSubstr("4d, 5d, 4+1d, lora"));
}

TEST(JobValidationTest, Names) {
  EXPECT_TRUE(IsValidName("SST-2"));
  EXPECT_TRUE(IsValidName("a.b_c-9"));
  EXPECT_TRUE(IsValidName(std::string(kMaxNameLength, 'x')));
  EXPECT_FALSE(IsValidName(""));
  EXPECT_FALSE(IsValidName(std::string(kMaxNameLength + 1, 'x')));
  EXPECT_FALSE(IsValidName("."));
  EXPECT_FALSE(IsValidName(".."));
  EXPECT_FALSE(IsValidName(".hidden"));
  EXPECT_FALSE(IsValidName("a/b"));
  EXPECT_FALSE(IsValidName("a b"));
  EXPECT_THAT(std::string(ValidateName("a/b", "family").message()), HasSubstr("family: 'a/b'"));

  EXPECT_TRUE(ValidateDatasetName("my data (v2)", "header.name").ok());
  EXPECT_FALSE(ValidateDatasetName("", "header.name").ok());
  EXPECT_FALSE(ValidateDatasetName(std::string(kMaxDatasetNameLength + 1, 'x'), "n").ok());

  JobSpec s = Valid();
  s.family = "../x";
  EXPECT_THAT(Message(s), HasSubstr("spec.family"));
  s = Valid();
  s.tasks[0].task_name = "";
  EXPECT_THAT(Message(s), HasSubstr("spec.tasks[0].task_name"));
}

TEST(JobValidationTest, FormKindAndTasks) {
  JobSpec s = Valid();
  s.adapter.form = "7d";
  EXPECT_THAT(Message(s), HasSubstr("spec.adapter.form"));
  s = Valid();
  s.kind = JobKind::kMultiTask;
  s.adapter.form = "4d";
  EXPECT_THAT(Message(s), HasSubstr("multi-task job needs form 4+1d"));
  s = Valid();
  s.adapter.form = "5d";
  s.tasks.push_back(s.tasks[0]);
  s.tasks[1].task_name = "B";
  EXPECT_THAT(Message(s), HasSubstr("several tasks"));
  s = Valid();
  s.tasks.push_back(s.tasks[0]);
  EXPECT_THAT(Message(s), HasSubstr("spec.tasks[1].task_name: duplicate"));
  s.kind = JobKind::kAddTask;
  s.tasks[1].task_name = "B";
  EXPECT_THAT(Message(s), HasSubstr("exactly one task"));
  s = Valid();
  s.tasks.clear();
  EXPECT_THAT(Message(s), HasSubstr("spec.tasks"));
  s = Valid();
  s.tasks[0].dataset_id.clear();
  EXPECT_THAT(Message(s), HasSubstr("spec.tasks[0].dataset_id"));
  s = Valid();
  s.tasks[0].eval_fraction = 1;
  EXPECT_THAT(Message(s), HasSubstr("spec.tasks[0].eval_fraction"));
  s.tasks[0].eval_dataset_id = "ds2";  // the fraction is unused then
  EXPECT_TRUE(ValidateJobSpec(s).ok());
}

TEST(JobValidationTest, Adapter) {
  JobSpec s = Valid();
  s.adapter.ranks = {8, 0};
  EXPECT_THAT(Message(s), HasSubstr("spec.adapter.ranks[1]"));
  s.adapter.ranks = {kMaxRank + 1};
  EXPECT_THAT(Message(s), HasSubstr("spec.adapter.ranks[0]"));
  s.adapter.ranks.clear();  // empty = auto (the form's default ranks)
  EXPECT_TRUE(ValidateJobSpec(s).ok());
  s = Valid();
  s.adapter.projections = {"q", "v", "q"};
  EXPECT_THAT(Message(s), HasSubstr("spec.adapter.projections[2]: duplicate"));
  s.adapter.projections.clear();  // empty = auto
  EXPECT_TRUE(ValidateJobSpec(s).ok());
  s = Valid();
  s.adapter.alpha = -1;
  EXPECT_THAT(Message(s), HasSubstr("spec.adapter.alpha"));
}

TEST(JobValidationTest, HyperParamsAndLimits) {
  JobSpec s = Valid();
  s.hparams.max_steps = 0;
  EXPECT_THAT(Message(s), HasSubstr("spec.hparams.max_steps"));
  s = Valid();
  s.hparams.batch_size = kMaxBatchSize + 1;
  EXPECT_THAT(Message(s), HasSubstr("spec.hparams.batch_size"));
  s.hparams.batch_size = 64;
  JobLimits l;
  l.max_batch_size = 32;
  EXPECT_THAT(Message(s, l), HasSubstr("max_job_batch_size=32"));
  s = Valid();
  s.hparams.learning_rate = 0;
  EXPECT_THAT(Message(s), HasSubstr("spec.hparams.learning_rate"));
  s.hparams.learning_rate = kMaxLearningRate * 2;
  EXPECT_THAT(Message(s), HasSubstr("spec.hparams.learning_rate"));
  // One max_length rule for the job manager and the executor.
  s = Valid();
  s.hparams.max_length = kMinSequenceLength - 1;
  EXPECT_THAT(Message(s), HasSubstr("spec.hparams.max_length"));
  s.hparams.max_length = kMinSequenceLength;
  EXPECT_TRUE(ValidateJobSpec(s).ok());
  s.hparams.max_length = 600;
  l = JobLimits();
  l.max_sequence_length = 512;
  l.sequence_limit_name = "max_position_embeddings";
  EXPECT_THAT(Message(s, l), HasSubstr("max_position_embeddings=512"));
  s = Valid();
  s.hparams.pooling = "max";
  EXPECT_THAT(Message(s), HasSubstr("spec.hparams.pooling"));
  s = Valid();
  s.hparams.warmup_ratio = 2;
  EXPECT_THAT(Message(s), HasSubstr("spec.hparams.warmup_ratio"));
  s = Valid();
  s.hparams.head_first_ratio = 1.0;  // the adapter would never train
  EXPECT_THAT(Message(s), HasSubstr("spec.hparams.head_first_ratio"));
  s.hparams.head_first_ratio = 0.1;
  EXPECT_TRUE(ValidateJobSpec(s).ok());
  s = Valid();
  s.hparams.rank_schedule = {{0, 0}};
  EXPECT_THAT(Message(s), HasSubstr("spec.hparams.rank_schedule[0]"));
  s.hparams.rank_schedule = {{1, 4}};
  EXPECT_TRUE(ValidateJobSpec(s).ok());
  s.kind = JobKind::kAddTask;
  EXPECT_THAT(Message(s), HasSubstr("not allowed when adding a task"));
}

TEST(JobValidationTest, ResourceLimitsNameThemselves) {
  JobLimits l;
  l.max_tasks_per_job = 2;
  l.max_steps = 100;
  l.max_rank_times_tasks = 64;
  l.max_labels_per_task = 10;
  JobSpec s = Valid();
  s.kind = JobKind::kMultiTask;
  s.adapter.form = "4+1d";
  for (int i = 0; i < 2; ++i) {
    JobTaskSpec t;
    t.task_name = "t" + std::to_string(i);
    t.dataset_id = "ds";
    s.tasks.push_back(t);
  }
  EXPECT_THAT(Message(s, l), HasSubstr("spec.tasks: 3 tasks exceed the server limit "
                                       "max_tasks_per_job=2"));
  s.tasks.pop_back();
  EXPECT_TRUE(ValidateJobSpec(s, l).ok());
  s.hparams.max_steps = Auto<int64_t>(101);
  EXPECT_THAT(Message(s, l), HasSubstr("spec.hparams.max_steps: 101 exceeds the server limit "
                                       "max_steps=100"));
  s.hparams.max_steps = Auto<int64_t>(100);
  s.adapter.ranks = {33};
  EXPECT_THAT(Message(s, l), HasSubstr("rank 33 x 2 tasks = 66 exceeds the server limit "
                                       "max_rank_times_tasks=64"));
  s.adapter.ranks = {32};
  EXPECT_TRUE(ValidateJobSpec(s, l).ok());
  // Unset limits (0) are not checked: a job read back from the store.
  s.hparams.max_steps = Auto<int64_t>(1000000000);
  EXPECT_TRUE(ValidateJobSpec(s, JobLimits{}).ok());
  EXPECT_TRUE(ValidateLabelCount(10, "labels", l).ok());
  absl::Status labels = ValidateLabelCount(100000, "labels", l);
  EXPECT_EQ(labels.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(labels.message()),
              HasSubstr("labels: 100000 classes exceed the server limit max_labels_per_task=10"));
  EXPECT_TRUE(ValidateFamilyCapacity(1000, 0, "ranks", l).ok());  // unset rank: the recipe's
  EXPECT_FALSE(ValidateFamilyCapacity(3, 32, "ranks", l).ok());
}

}  // namespace
}  // namespace metatt
