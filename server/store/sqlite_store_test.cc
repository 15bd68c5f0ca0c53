#include "server/store/sqlite_store.h"
#include "server/store/job_json.h"

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
  EXPECT_EQ(*v, 3);
  EXPECT_TRUE(std::filesystem::exists(path_ + "-wal"));
  // Reopening applies nothing new and keeps the data.
  ASSERT_TRUE(store_->PutDataset(Dataset("ds-1")).ok());
  store_.reset();
  auto again = SqliteStore::Create(path_);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(*(*again)->SchemaVersion(), 3);
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

}  // namespace
}  // namespace metatt
