#include "server/jobs/sqlite_store.h"
#include "server/jobs/job_json.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <random>

namespace metatt {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

class SqliteStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("sqlite_store_test_" + std::to_string(std::random_device{}()));
    std::filesystem::create_directories(dir_);
    path_ = (dir_ / "metatt.db").string();
    auto s = SqliteStore::Create(path_);
    ASSERT_TRUE(s.ok()) << s.status();
    store_ = std::move(*s);
  }
  void TearDown() override {
    store_.reset();
    std::filesystem::remove_all(dir_);
  }
  static DatasetRecord Dataset(const std::string& id) {
    DatasetRecord d;
    d.id = id;
    d.name = "mrpc-train";
    d.format = "tsv";
    d.spec_json = R"({"format":"tsv"})";
    d.sha256 = "abc";
    d.path = "/x/" + id;
    d.num_rows = 10;
    d.size_bytes = 100;
    d.label_names = {"0", "1"};
    d.created_unix_ms = 5;
    return d;
  }
  static JobRecord Job(const std::string& id, const std::string& key = "") {
    JobRecord j;
    j.id = id;
    j.spec.family = "glue";
    j.spec.tasks.push_back({"MRPC", "ds-1", "", 0.2, "f1"});
    j.spec.adapter.ranks = {4, 6, 8};
    j.spec.hparams.rank_schedule = {{1, 4}, {2, 2}};
    j.spec.idempotency_key = key;
    j.created_unix_ms = j.updated_unix_ms = 7;
    return j;
  }

  std::filesystem::path dir_;
  std::string path_;
  std::unique_ptr<SqliteStore> store_;
};

TEST_F(SqliteStoreTest, UsesWalAndRecordsMigrations) {
  auto v = store_->SchemaVersion();
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(*v, 2);
  EXPECT_TRUE(std::filesystem::exists(path_ + "-wal"));
  // Reopening applies nothing new and keeps the data.
  ASSERT_TRUE(store_->PutDataset(Dataset("ds-1")).ok());
  store_.reset();
  auto again = SqliteStore::Create(path_);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(*(*again)->SchemaVersion(), 2);
  auto d = (*again)->GetDataset("ds-1");
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_THAT(d->label_names, ElementsAre("0", "1"));
}

TEST_F(SqliteStoreTest, RecordsKeepTheirTenant) {
  DatasetRecord d = Dataset("ds-t");
  d.tenant = "acme";
  ASSERT_TRUE(store_->PutDataset(d).ok());
  EXPECT_EQ(store_->GetDataset("ds-t")->tenant, "acme");
  EXPECT_EQ((*store_->ListDatasets())[0].tenant, "acme");
  JobRecord j;
  j.id = "job-t";
  j.spec.family = "fam";
  j.tenant = "acme";
  ASSERT_TRUE(store_->CreateJob(j).ok());
  EXPECT_EQ(store_->GetJob("job-t")->tenant, "acme");
  FamilyVersionRecord f;
  f.family = "fam";
  f.version = 1;
  f.tenant = "acme";
  ASSERT_TRUE(store_->PublishFamilyVersion(f).ok());
  EXPECT_EQ((*store_->ListFamilyVersions("fam"))[0].tenant, "acme");
  // Records written without a tenant belong to "default".
  ASSERT_TRUE(store_->PutDataset(Dataset("ds-d")).ok());
  EXPECT_EQ(store_->GetDataset("ds-d")->tenant, "default");
}

TEST_F(SqliteStoreTest, DatasetRoundTripAndNotFound) {
  ASSERT_TRUE(store_->PutDataset(Dataset("ds-1")).ok());
  EXPECT_TRUE(absl::IsAlreadyExists(store_->PutDataset(Dataset("ds-1"))));
  auto d = store_->GetDataset("ds-1");
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->num_rows, 10);
  EXPECT_EQ(d->path, "/x/ds-1");
  auto missing = store_->GetDataset("nope");
  EXPECT_TRUE(absl::IsNotFound(missing.status()));
  EXPECT_THAT(missing.status().message(), HasSubstr("nope"));
  ASSERT_TRUE(store_->PutDataset(Dataset("ds-2")).ok());
  EXPECT_EQ(store_->ListDatasets()->size(), 2u);
}

TEST_F(SqliteStoreTest, DatasetReferencedByJobCannotBeDeleted) {
  ASSERT_TRUE(store_->PutDataset(Dataset("ds-1")).ok());
  ASSERT_TRUE(store_->PutDataset(Dataset("ds-2")).ok());
  ASSERT_TRUE(store_->CreateJob(Job("job-1")).ok());
  absl::Status st = store_->DeleteDataset("ds-1");
  EXPECT_TRUE(absl::IsFailedPrecondition(st)) << st;
  EXPECT_THAT(st.message(), HasSubstr("job-1"));
  EXPECT_TRUE(store_->GetDataset("ds-1").ok());
  EXPECT_TRUE(store_->DeleteDataset("ds-2").ok());
  EXPECT_TRUE(absl::IsNotFound(store_->DeleteDataset("ds-2")));
}

TEST_F(SqliteStoreTest, JobRoundTripKeepsSpec) {
  ASSERT_TRUE(store_->CreateJob(Job("job-1")).ok());
  auto j = store_->GetJob("job-1");
  ASSERT_TRUE(j.ok()) << j.status();
  EXPECT_EQ(j->spec.family, "glue");
  ASSERT_EQ(j->spec.tasks.size(), 1u);
  EXPECT_EQ(j->spec.tasks[0].dataset_id, "ds-1");
  EXPECT_DOUBLE_EQ(j->spec.tasks[0].eval_fraction, 0.2);
  EXPECT_THAT(j->spec.adapter.ranks, ElementsAre(4, 6, 8));
  ASSERT_EQ(j->spec.hparams.rank_schedule.size(), 2u);
  EXPECT_EQ(j->spec.hparams.rank_schedule[1].second, 2);
  EXPECT_EQ(j->state, JobState::kQueued);

  j->state = JobState::kFailed;
  j->failure_reason = "boom";
  j->step = 12;
  ASSERT_TRUE(store_->UpdateJob(*j).ok());
  auto k = store_->GetJob("job-1");
  EXPECT_EQ(k->state, JobState::kFailed);
  EXPECT_EQ(k->failure_reason, "boom");
  EXPECT_EQ(k->step, 12);
  EXPECT_TRUE(absl::IsNotFound(store_->GetJob("job-2").status()));
}

TEST_F(SqliteStoreTest, IdempotencyKeyReturnsTheFirstJob) {
  auto a = store_->CreateJob(Job("job-1", "key-1"));
  ASSERT_TRUE(a.ok());
  auto b = store_->CreateJob(Job("job-2", "key-1"));
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->id, "job-1");
  EXPECT_TRUE(absl::IsNotFound(store_->GetJob("job-2").status()));
  EXPECT_EQ(store_->FindJobByIdempotencyKey("key-1")->id, "job-1");
  EXPECT_TRUE(absl::IsNotFound(store_->FindJobByIdempotencyKey("key-2").status()));
  // Jobs without a key never collide.
  EXPECT_TRUE(store_->CreateJob(Job("job-3")).ok());
  EXPECT_TRUE(store_->CreateJob(Job("job-4")).ok());
}

TEST_F(SqliteStoreTest, ListJobsPagesAndFilters) {
  for (int i = 0; i < 5; ++i) {
    JobRecord j = Job("job-" + std::to_string(i));
    if (i % 2 == 1) j.state = JobState::kSucceeded;
    ASSERT_TRUE(store_->CreateJob(j).ok());
  }
  std::string next;
  auto p1 = store_->ListJobs(std::nullopt, 2, "", &next);
  ASSERT_TRUE(p1.ok());
  ASSERT_EQ(p1->size(), 2u);
  EXPECT_EQ((*p1)[0].id, "job-0");
  ASSERT_FALSE(next.empty());
  auto p2 = store_->ListJobs(std::nullopt, 2, next, &next);
  EXPECT_EQ((*p2)[0].id, "job-2");
  auto p3 = store_->ListJobs(std::nullopt, 2, next, &next);
  ASSERT_EQ(p3->size(), 1u);
  EXPECT_EQ((*p3)[0].id, "job-4");
  EXPECT_TRUE(next.empty());

  auto done = store_->ListJobs(JobState::kSucceeded, 10, "", &next);
  ASSERT_EQ(done->size(), 2u);
  EXPECT_EQ((*done)[0].id, "job-1");
  EXPECT_EQ((*done)[1].id, "job-3");
  EXPECT_TRUE(absl::IsInvalidArgument(store_->ListJobs(std::nullopt, 2, "zz", &next).status()));
}

TEST_F(SqliteStoreTest, JobEventsKeepOrderAndContent) {
  ASSERT_TRUE(store_->CreateJob(Job("job-1")).ok());
  JobEvent p;
  p.type = JobEvent::Type::kProgress;
  p.step = 3;
  p.total_steps = 10;
  p.loss = 0.5;
  JobEvent s;
  s.type = JobEvent::Type::kSweep;
  s.bonds.push_back({1, 8, 4, 0.01});
  JobEvent e;
  e.type = JobEvent::Type::kEval;
  e.metrics["MRPC/f1"] = 0.8;
  JobEvent t;
  t.type = JobEvent::Type::kState;
  t.state = JobState::kFailed;
  t.message = "out of memory";
  for (const auto& ev : {p, s, e, t}) ASSERT_TRUE(store_->AppendJobEvent("job-1", ev).ok());
  auto events = store_->ListJobEvents("job-1");
  ASSERT_TRUE(events.ok()) << events.status();
  ASSERT_EQ(events->size(), 4u);
  EXPECT_EQ((*events)[0].step, 3);
  EXPECT_DOUBLE_EQ((*events)[0].loss, 0.5);
  ASSERT_EQ((*events)[1].bonds.size(), 1u);
  EXPECT_EQ((*events)[1].bonds[0].new_rank, 4);
  EXPECT_DOUBLE_EQ((*events)[2].metrics.at("MRPC/f1"), 0.8);
  EXPECT_EQ((*events)[3].state, JobState::kFailed);
  EXPECT_EQ((*events)[3].message, "out of memory");
  EXPECT_TRUE(absl::IsNotFound(store_->ListJobEvents("job-x").status()));
}

TEST_F(SqliteStoreTest, FamilyVersionsAreImmutable) {
  FamilyVersionRecord f;
  f.family = "glue";
  f.version = 1;
  f.form = "4+1d";
  f.adapter_parameters = 1234;
  TaskRecord t;
  t.name = "MRPC";
  t.num_labels = 2;
  t.label_names = {"0", "1"};
  t.eval_metrics["f1"] = 0.8;
  f.tasks.push_back(t);
  ASSERT_TRUE(store_->PublishFamilyVersion(f).ok());
  EXPECT_TRUE(absl::IsAlreadyExists(store_->PublishFamilyVersion(f)));
  f.version = 2;
  t.name = "SST-2";
  t.index = 1;
  f.tasks.push_back(t);
  ASSERT_TRUE(store_->PublishFamilyVersion(f).ok());
  FamilyVersionRecord other = f;
  other.family = "other";
  other.version = 1;
  ASSERT_TRUE(store_->PublishFamilyVersion(other).ok());

  auto glue = store_->ListFamilyVersions("glue");
  ASSERT_EQ(glue->size(), 2u);
  EXPECT_EQ((*glue)[1].version, 2);
  ASSERT_EQ((*glue)[1].tasks.size(), 2u);
  EXPECT_EQ((*glue)[1].tasks[1].name, "SST-2");
  EXPECT_EQ((*glue)[1].tasks[1].index, 1);
  EXPECT_DOUBLE_EQ((*glue)[1].tasks[0].eval_metrics.at("f1"), 0.8);
  EXPECT_EQ(store_->ListFamilyVersions("")->size(), 3u);
  ASSERT_TRUE(store_->DeleteFamily("glue").ok());
  EXPECT_TRUE(store_->ListFamilyVersions("glue")->empty());
  EXPECT_TRUE(absl::IsNotFound(store_->DeleteFamily("glue")));
}

// Fuzz regression (jobspec_float_to_int): a float where an integer belongs is
// refused naming the field, never cast (1e300 was undefined behaviour).
TEST(JobJson, FloatsWhereIntegersBelongAreRefused) {
  for (const char* text : {R"({"hparams":{"max_steps":1e300}})", R"({"hparams":{"max_steps":1.5}})",
                           R"({"hparams":{"rank_schedule":[[1e300,1]]}})"}) {
    auto spec = JobSpecFromJson(text);
    ASSERT_FALSE(spec.ok()) << text;
    EXPECT_NE(std::string(spec.status().message()).find("integer"), std::string::npos)
        << spec.status();
  }
  auto ok = JobSpecFromJson(R"({"hparams":{"max_steps":7,"rank_schedule":[[1,4]]}})");
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->hparams.max_steps, 7);
}

}  // namespace
}  // namespace metatt
