#include "server/jobs/dataset_manager.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cerrno>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "server/store/sqlite_store.h"
#include "server/store/store_test_util.h"
#include "server/jobs/test_util.h"

namespace metatt {
namespace {

namespace fs = std::filesystem;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

class DatasetManagerTest : public testing_util::SqliteStoreFixture {
 protected:
  void SetUp() override {
    SqliteStoreFixture::SetUp();
    DatasetManagerOptions o;
    o.data_dir = (dir_ / "data").string();
    o.max_upload_bytes = 1000;
    o.parse = FakeDatasetParse;
    auto m = DatasetManager::Create(o, store_.get());
    ASSERT_TRUE(m.ok()) << m.status();
    manager_ = std::move(*m);
  }
  size_t FilesUnderDatasets() {
    size_t n = 0;
    for (const auto& e : fs::recursive_directory_iterator(dir_ / "data" / "datasets")) {
      if (e.is_regular_file()) ++n;
    }
    return n;
  }
  static DatasetUpload Header() { return {"tiny", "tsv", R"({"format":"tsv"})"}; }

  std::unique_ptr<DatasetManager> manager_;
};

TEST_F(DatasetManagerTest, StoresBytesWithShaAndLabels) {
  const std::string bytes = "good movie\tpos\nbad movie\tneg\nok\tpos\n";
  auto d = manager_->Upload(Header(), bytes);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->num_rows, 3);
  EXPECT_EQ(d->size_bytes, static_cast<int64_t>(bytes.size()));
  EXPECT_THAT(d->label_names, ElementsAre("neg", "pos"));
  EXPECT_EQ(d->sha256, Sha256Hex(bytes));
  EXPECT_EQ(Sha256Hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  std::ifstream in(d->path);
  std::stringstream ss;
  ss << in.rdbuf();
  EXPECT_EQ(ss.str(), bytes);
  EXPECT_EQ(fs::path(d->path).parent_path().filename(), d->id);
  auto got = manager_->Get(d->id);
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(got->sha256, d->sha256);
  EXPECT_EQ(manager_->List()->size(), 1u);
}

TEST_F(DatasetManagerTest, MalformedDatasetListsEveryBadLineAndStoresNothing) {
  auto d = manager_->Upload(Header(), "a\t1\nno label here\nb\t0\nalso bad\n");
  EXPECT_TRUE(absl::IsInvalidArgument(d.status())) << d.status();
  EXPECT_THAT(d.status().message(), HasSubstr("line 2"));
  EXPECT_THAT(d.status().message(), HasSubstr("line 4"));
  EXPECT_EQ(FilesUnderDatasets(), 0u);
  EXPECT_TRUE(store_->ListDatasets()->empty());
}

TEST_F(DatasetManagerTest, SizeLimitAndHeaderChecks) {
  auto big = manager_->Upload(Header(), std::string(1001, 'x'));
  EXPECT_TRUE(absl::IsResourceExhausted(big.status()));
  EXPECT_THAT(big.status().message(), HasSubstr("max_upload_bytes=1000"));
  DatasetUpload h = Header();
  h.format = "xlsx";
  EXPECT_THAT(manager_->Upload(h, "a\t1\n").status().message(), HasSubstr("header.format"));
  h = Header();
  h.name = "";
  EXPECT_THAT(manager_->Upload(h, "a\t1\n").status().message(), HasSubstr("header.name"));
  EXPECT_EQ(FilesUnderDatasets(), 0u);
}

TEST_F(DatasetManagerTest, DeleteRefusedWhileAJobReferencesIt) {
  auto d = manager_->Upload(Header(), "a\t1\nb\t0\n");
  ASSERT_TRUE(d.ok());
  JobRecord j;
  j.id = "job-1";
  j.spec.family = "f";
  j.spec.tasks.push_back({"t", d->id, "", 0.1, ""});
  ASSERT_TRUE(store_->CreateJob(j).ok());
  auto st = manager_->Delete(d->id);
  EXPECT_TRUE(absl::IsFailedPrecondition(st));
  EXPECT_THAT(st.message(), HasSubstr("job-1"));
  EXPECT_TRUE(fs::exists(d->path));

  auto e = manager_->Upload(Header(), "c\t1\n");
  ASSERT_TRUE(e.ok());
  ASSERT_TRUE(manager_->Delete(e->id).ok());
  EXPECT_FALSE(fs::exists(e->path));
  EXPECT_TRUE(absl::IsNotFound(manager_->Get(e->id).status()));
}

}  // namespace
}  // namespace metatt

namespace metatt {
namespace {

// The durability helper of Upload: fsync of a directory's own entries.
// A blob store (PostgreSQL replicas without a shared directory; a
// LocalBlobStore on another directory stands in for it here): the upload is
// stored as a blob named in the record, another replica with its own data
// directory reads it through its cache, checked against the sha256, and a
// delete removes the blob.
TEST_F(DatasetManagerTest, BlobStoreHoldsTheBytesAndOtherReplicasReadThroughTheirCache) {
  auto blobs = LocalBlobStore::Create((dir_ / "blobs").string());
  ASSERT_TRUE(blobs.ok()) << blobs.status();
  DatasetManagerOptions o;
  o.data_dir = (dir_ / "replica-a").string();
  o.max_upload_bytes = 1000;
  o.parse = FakeDatasetParse;
  o.blobs = blobs->get();
  auto a = DatasetManager::Create(o, store_.get());
  ASSERT_TRUE(a.ok()) << a.status();
  const std::string bytes = "good movie\tpos\nbad movie\tneg\n";
  auto d = (*a)->Upload(Header(), bytes);
  ASSERT_TRUE(d.ok()) << d.status();
  const std::string key = "datasets/" + d->id + "/data.tsv";
  EXPECT_EQ(d->path, "blob:" + key);
  EXPECT_EQ(*(*blobs)->Get(key), bytes);
  EXPECT_EQ(store_->GetDataset(d->id)->path, "blob:" + key);

  // Replica B: nothing cached yet; the read fetches, checks and caches it.
  const std::string cache_b = (dir_ / "replica-b").string();
  auto got = ReadDatasetBytes(*d, blobs->get(), cache_b, "tasks[0].dataset_id");
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, bytes);
  EXPECT_TRUE(fs::is_regular_file(fs::path(cache_b) / key));
  // A rotten cached copy is fetched again.
  std::ofstream(fs::path(cache_b) / key, std::ios::trunc) << "rotten";
  EXPECT_EQ(*ReadDatasetBytes(*d, blobs->get(), cache_b, "f"), bytes);
  // A rotten blob is refused, naming the dataset and the blob.
  ASSERT_TRUE((*blobs)->Put(key, "bad movie\tpos\n").ok());
  fs::remove(fs::path(cache_b) / key);
  auto bad = ReadDatasetBytes(*d, blobs->get(), cache_b, "tasks[0].dataset_id");
  EXPECT_TRUE(absl::IsFailedPrecondition(bad.status())) << bad.status();
  EXPECT_THAT(std::string(bad.status().message()),
              HasSubstr("tasks[0].dataset_id: dataset " + d->id + " is corrupt"));
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr(key));
  // Without a blob store the reference is refused with the reason.
  auto none = ReadDatasetBytes(*d, nullptr, cache_b, "f");
  EXPECT_TRUE(absl::IsFailedPrecondition(none.status())) << none.status();

  ASSERT_TRUE((*a)->Delete(d->id).ok());
  EXPECT_FALSE(*(*blobs)->Exists(key));
  EXPECT_FALSE(fs::exists(dir_ / "replica-a" / "datasets" / d->id));
}

TEST(SyncDirectoryEntriesTest, SyncsADirectoryAndNamesAMissingOne) {
  namespace fs = std::filesystem;
  fs::path dir = testing_util::NewTestDirPath("sync_dir_test_");
  fs::create_directories(dir);
  EXPECT_TRUE(SyncDirectoryEntries(dir).ok());
  absl::Status missing = SyncDirectoryEntries(dir / "nope");
  // The errno decides the code (absl::ErrnoToStatus): ENOENT, ENOTDIR; a
  // full disk (ENOSPC) is RESOURCE_EXHAUSTED the same way.
  EXPECT_EQ(missing.code(), absl::ErrnoToStatusCode(ENOENT));
  EXPECT_THAT(std::string(missing.message()), ::testing::HasSubstr((dir / "nope").string()));
  std::ofstream(dir / "file") << "x";
  absl::Status not_dir = SyncDirectoryEntries(dir / "file");  // O_DIRECTORY refuses a file
  EXPECT_EQ(not_dir.code(), absl::ErrnoToStatusCode(ENOTDIR));
  EXPECT_EQ(absl::ErrnoToStatusCode(ENOSPC), absl::StatusCode::kResourceExhausted);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace metatt
