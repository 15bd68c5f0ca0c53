#include "server/store/sqlite_store.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sqlite3.h>

#include <filesystem>

#include "server/store/job_json.h"
#include "server/store/store_test_util.h"

namespace metatt {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

class SqliteStoreTest : public testing_util::SqliteStoreFixture {
 protected:
  // Every field's round trip is store_conformance_test's; these tests read
  // the label names and the tenant.
  static DatasetRecord Dataset(const std::string& id) {
    DatasetRecord d;
    d.id = id;
    d.label_names = {"0", "1"};
    return d;
  }

};

TEST_F(SqliteStoreTest, UsesWalAndRecordsMigrations) {
  auto v = store_->SchemaVersion();
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(*v, 5);
  EXPECT_TRUE(std::filesystem::exists(db_path() + "-wal"));
  // Reopening applies nothing new and keeps the data.
  ASSERT_TRUE(store_->PutDataset(Dataset("ds-1")).ok());
  store_.reset();
  auto again = SqliteStore::Create(db_path());
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(*(*again)->SchemaVersion(), 5);
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

// A full disk is RESOURCE_EXHAUSTED naming the cause, not INTERNAL (issue
// 17): SQLITE_FULL provoked with a small max_page_count, through the one
// mapping the store uses for every SQLite call.
TEST_F(SqliteStoreTest, FullDatabaseIsResourceExhausted) {
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open((dir_ / "full.db").string().c_str(), &db), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(db, "CREATE TABLE t(x BLOB); PRAGMA max_page_count = 4", nullptr, nullptr,
                         nullptr),
            SQLITE_OK);
  int rc = SQLITE_OK;
  for (int i = 0; i < 100 && rc == SQLITE_OK; ++i) {
    rc = sqlite3_exec(db, "INSERT INTO t VALUES (zeroblob(2000))", nullptr, nullptr, nullptr);
  }
  ASSERT_EQ(rc, SQLITE_FULL) << sqlite3_errmsg(db);
  const absl::Status st = SqliteStatus(db, rc, "step");
  EXPECT_TRUE(absl::IsResourceExhausted(st)) << st;
  EXPECT_THAT(std::string(st.message()), HasSubstr("full"));
  sqlite3_close(db);
}

// The Store contract itself (datasets, jobs, idempotency, paging, events,
// family versions) is tested once for every backend in
// store_conformance_test.cc, which also runs under ASan + UBSan
// (scripts/sanitize.sh); this file keeps what is SQLite's own.

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

TEST(JobJson, UnsetFieldsRoundTripAsAbsent) {
  JobSpec s;
  s.family = "f";
  s.hparams.learning_rate = 5e-3;
  s.hparams.weight_decay = 0.0;  // set to zero: kept, not "auto"
  s.adapter.ranks = {4};
  const std::string text = JobSpecToJson(s);
  EXPECT_EQ(text.find("max_steps"), std::string::npos) << text;
  EXPECT_EQ(text.find("projections"), std::string::npos) << text;
  EXPECT_EQ(text.find("form"), std::string::npos) << text;
  auto back = JobSpecFromJson(text);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_FALSE(back->hparams.max_steps.is_set());
  EXPECT_FALSE(back->hparams.seed.is_set());
  EXPECT_FALSE(back->adapter.alpha.is_set());
  EXPECT_TRUE(back->adapter.form.empty());
  EXPECT_TRUE(back->adapter.projections.empty());
  ASSERT_TRUE(back->hparams.learning_rate.is_set());
  EXPECT_EQ(back->hparams.learning_rate.value(), 5e-3);
  ASSERT_TRUE(back->hparams.weight_decay.is_set());
  EXPECT_EQ(back->hparams.weight_decay.value(), 0.0);
  EXPECT_EQ(back->adapter.ranks, (std::vector<int64_t>{4}));
  EXPECT_EQ(JobSpecToJson(*back), text);
}

TEST(JobJson, RowsWrittenBeforeAutoLoadWithEveryFieldSet) {
  // A job row as written before hyper-parameters could be left unset.
  auto old = JobSpecFromJson(
      R"({"kind":"TRAIN_FAMILY","family":"glue","idempotency_key":"",)"
      R"("tasks":[{"task_name":"MRPC","dataset_id":"d1","eval_dataset_id":"","eval_fraction":0.1,"metric":""}],)"
      R"("adapter":{"form":"4+1d","ranks":[8],"projections":["q","k","v","o"],"init":"ze-id-id-id","alpha":0.0},)"
      R"("hparams":{"max_steps":200,"batch_size":16,"learning_rate":0.0005,"weight_decay":0.0,)"
      R"("warmup_ratio":0.06,"grad_clip":1.0,"eval_every":50,"max_length":128,)"
      R"("early_stop_patience":0,"pooling":"mean","seed":42,"rank_schedule":[]}})");
  ASSERT_TRUE(old.ok()) << old.status();
  EXPECT_EQ(old->adapter.form, "4+1d");
  EXPECT_EQ(old->adapter.projections.size(), 4u);
  ASSERT_TRUE(old->adapter.alpha.is_set());
  EXPECT_EQ(old->adapter.alpha.value(), 0.0);
  ASSERT_TRUE(old->hparams.max_steps.is_set());
  EXPECT_EQ(old->hparams.max_steps.value(), 200);
  EXPECT_EQ(old->hparams.learning_rate.value(), 5e-4);
  EXPECT_EQ(old->hparams.seed.value(), 42u);
  EXPECT_TRUE(old->hparams.early_stop_patience.is_set());
  EXPECT_FALSE(old->hparams.inner_lr_multiplier.is_set());  // not in old rows
  EXPECT_EQ(old->hparams.pooling, "mean");
  EXPECT_TRUE(old->hparams.rank_schedule.empty());
}

}  // namespace
}  // namespace metatt
