// The Store contract, run against every backend: the embedded SQLite store and
// PostgreSQL (a throw-away server started by the test from the machine's
// packages; when it cannot start the PostgreSQL cases FAIL with the reason).
// PostgreSQL-only cases cover job claiming by several replicas.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <arpa/inet.h>
#include <libpq-fe.h>
#include <netinet/in.h>
#include <sqlite3.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <thread>

#include "absl/strings/match.h"
#include "absl/synchronization/mutex.h"
#include "server/jobs/job_manager.h"
#include "server/store/blob_store.h"
#include "server/store/pg_test_server.h"
#include "server/store/postgres_store.h"
#include "server/store/sqlite_store.h"
#include "server/store/store_test_util.h"
#include "server/jobs/test_util.h"

namespace metatt {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// One PostgreSQL server for the whole binary, a fresh database per test.
class PgEnv {
 public:
  static PgEnv& Get() {
    static PgEnv* env = new PgEnv();
    return *env;
  }
  absl::StatusOr<std::string> NewDatabase() {
    absl::MutexLock lock(&mu_);
    if (!server_) {
      if (!start_.ok()) return start_;
      auto s = PgTestServer::Start();
      if (!s.ok()) {
        start_ = s.status();
        return start_;
      }
      server_ = std::move(*s);
    }
    std::string name = "conf" + std::to_string(++n_);
    absl::Status st = server_->CreateDatabase(name);
    if (!st.ok()) return st;
    return server_->Uri(name);
  }
  void Stop() {
    absl::MutexLock lock(&mu_);
    server_.reset();
  }

 private:
  absl::Mutex mu_;
  std::unique_ptr<PgTestServer> server_;
  absl::Status start_;
  int n_ = 0;
};

class StopPgAtExit : public ::testing::Environment {
 public:
  void TearDown() override { PgEnv::Get().Stop(); }
};
const auto* const kStopPg = ::testing::AddGlobalTestEnvironment(new StopPgAtExit);

class StoreConformance : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (GetParam() == "sqlite") {
      dir_ = testing_util::NewTestDirPath("store_conformance_");
      std::filesystem::create_directories(dir_);
      auto s = SqliteStore::Create((dir_ / "metatt.db").string());
      ASSERT_TRUE(s.ok()) << s.status();
      store_ = std::move(*s);
    } else {
      auto uri = PgEnv::Get().NewDatabase();
      ASSERT_TRUE(uri.ok()) << "PostgreSQL could not start: " << uri.status();
      uri_ = *uri;
      auto s = PostgresStore::Create(uri_);
      ASSERT_TRUE(s.ok()) << s.status();
      store_ = std::move(*s);
    }
  }
  void TearDown() override {
    store_.reset();
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }
  // The family's version summaries (none, and a test failure, on an error).
  std::vector<FamilyVersionRecord> Summaries(const std::string& family) {
    auto summaries = store_->ListFamilyVersionSummaries(family);
    EXPECT_TRUE(summaries.ok()) << summaries.status();
    return summaries.ok() ? *std::move(summaries) : std::vector<FamilyVersionRecord>{};
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
    d.regression = true;
    d.created_unix_ms = 5;
    d.tenant = "acme";
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
    j.tenant = "acme";
    return j;
  }

  std::filesystem::path dir_;
  std::string uri_;
  std::unique_ptr<Store> store_;
};

TEST_P(StoreConformance, DatasetRoundTripAndNotFound) {
  ASSERT_TRUE(store_->PutDataset(Dataset("ds-1")).ok());
  EXPECT_TRUE(absl::IsAlreadyExists(store_->PutDataset(Dataset("ds-1"))));
  auto d = store_->GetDataset("ds-1");
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->name, "mrpc-train");
  EXPECT_EQ(d->format, "tsv");
  EXPECT_EQ(d->spec_json, R"({"format":"tsv"})");
  EXPECT_EQ(d->sha256, "abc");
  EXPECT_EQ(d->path, "/x/ds-1");
  EXPECT_EQ(d->num_rows, 10);
  EXPECT_EQ(d->size_bytes, 100);
  EXPECT_THAT(d->label_names, ElementsAre("0", "1"));
  EXPECT_TRUE(d->regression);
  EXPECT_EQ(d->created_unix_ms, 5);
  EXPECT_EQ(d->tenant, "acme");
  auto missing = store_->GetDataset("nope");
  EXPECT_TRUE(absl::IsNotFound(missing.status()));
  EXPECT_THAT(missing.status().message(), HasSubstr("nope"));
  ASSERT_TRUE(store_->PutDataset(Dataset("ds-2")).ok());
  EXPECT_EQ(store_->ListDatasets()->size(), 2u);
}

TEST_P(StoreConformance, DatasetReferencedByJobCannotBeDeleted) {
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

TEST_P(StoreConformance, JobRoundTripKeepsEveryField) {
  ASSERT_TRUE(store_->CreateJob(Job("job-1", "k")).ok());
  EXPECT_TRUE(absl::IsAlreadyExists(store_->CreateJob(Job("job-1")).status()));
  auto j = store_->GetJob("job-1");
  ASSERT_TRUE(j.ok()) << j.status();
  EXPECT_EQ(j->spec.family, "glue");
  EXPECT_EQ(j->spec.idempotency_key, "k");
  ASSERT_EQ(j->spec.tasks.size(), 1u);
  EXPECT_EQ(j->spec.tasks[0].dataset_id, "ds-1");
  EXPECT_DOUBLE_EQ(j->spec.tasks[0].eval_fraction, 0.2);
  EXPECT_THAT(j->spec.adapter.ranks, ElementsAre(4, 6, 8));
  ASSERT_EQ(j->spec.hparams.rank_schedule.size(), 2u);
  EXPECT_EQ(j->spec.hparams.rank_schedule[1].second, 2);
  EXPECT_EQ(j->state, JobState::kQueued);
  EXPECT_EQ(j->created_unix_ms, 7);
  EXPECT_EQ(j->tenant, "acme");

  j->state = JobState::kSucceeded;
  j->failure_reason = "none";
  j->step = 12;
  j->total_steps = 40;
  j->updated_unix_ms = 99;
  j->result_family = "glue";
  j->result_version = 3;
  ASSERT_TRUE(store_->UpdateJob(*j).ok());
  auto k = store_->GetJob("job-1");
  ASSERT_TRUE(k.ok());
  EXPECT_EQ(k->state, JobState::kSucceeded);
  EXPECT_EQ(k->failure_reason, "none");
  EXPECT_EQ(k->step, 12);
  EXPECT_EQ(k->total_steps, 40);
  EXPECT_EQ(k->updated_unix_ms, 99);
  EXPECT_EQ(k->result_family, "glue");
  EXPECT_EQ(k->result_version, 3);
  EXPECT_TRUE(absl::IsNotFound(store_->GetJob("job-2").status()));
  JobRecord ghost = Job("job-2");
  EXPECT_TRUE(absl::IsNotFound(store_->UpdateJob(ghost)));
}

TEST_P(StoreConformance, IdempotencyKeyReturnsTheFirstJob) {
  auto a = store_->CreateJob(Job("job-1", "key-1"));
  ASSERT_TRUE(a.ok());
  auto b = store_->CreateJob(Job("job-2", "key-1"));
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(b->id, "job-1");
  EXPECT_TRUE(absl::IsNotFound(store_->GetJob("job-2").status()));
  EXPECT_EQ(store_->FindJobByIdempotencyKey("key-1")->id, "job-1");
  EXPECT_TRUE(absl::IsNotFound(store_->FindJobByIdempotencyKey("key-2").status()));
  EXPECT_TRUE(store_->CreateJob(Job("job-3")).ok());
  EXPECT_TRUE(store_->CreateJob(Job("job-4")).ok());
}

TEST_P(StoreConformance, ListJobsPagesAndFilters) {
  for (int i = 0; i < 5; ++i) {
    JobRecord j = Job("job-" + std::to_string(i));
    if (i % 2 == 1) j.state = JobState::kSucceeded;
    ASSERT_TRUE(store_->CreateJob(j).ok());
  }
  std::string next;
  auto p1 = store_->ListJobs(std::nullopt, 2, "", &next);
  ASSERT_TRUE(p1.ok()) << p1.status();
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

TEST_P(StoreConformance, JobEventsKeepOrderAndContent) {
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

TEST_P(StoreConformance, FamilyVersionsAreImmutableAndRoundTrip) {
  FamilyVersionRecord f;
  f.family = "glue";
  f.version = 1;
  f.form = "4+1d";
  f.config_json = R"({"form":"4+1d"})";
  f.base_model_fingerprint = "fp";
  f.path = "/data/families/glue/v1";
  f.adapter_parameters = 1234;
  f.created_by_job = "job-1";
  f.created_unix_ms = 77;
  f.tenant = "acme";
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
  t.regression = true;
  f.tasks.push_back(t);
  ASSERT_TRUE(store_->PublishFamilyVersion(f).ok());
  FamilyVersionRecord other = f;
  other.family = "other";
  other.version = 1;
  ASSERT_TRUE(store_->PublishFamilyVersion(other).ok());
  EXPECT_TRUE(absl::IsInvalidArgument(store_->PublishFamilyVersion(FamilyVersionRecord{})));

  auto glue = store_->ListFamilyVersions("glue");
  ASSERT_TRUE(glue.ok()) << glue.status();
  ASSERT_EQ(glue->size(), 2u);
  const FamilyVersionRecord& g = (*glue)[1];
  EXPECT_EQ(g.version, 2);
  EXPECT_EQ(g.form, "4+1d");
  EXPECT_EQ(g.config_json, R"({"form":"4+1d"})");
  EXPECT_EQ(g.base_model_fingerprint, "fp");
  EXPECT_EQ(g.path, "/data/families/glue/v1");
  EXPECT_EQ(g.adapter_parameters, 1234);
  EXPECT_EQ(g.created_by_job, "job-1");
  EXPECT_EQ(g.created_unix_ms, 77);
  EXPECT_EQ(g.tenant, "acme");
  ASSERT_EQ(g.tasks.size(), 2u);
  EXPECT_EQ(g.tasks[1].name, "SST-2");
  EXPECT_EQ(g.tasks[1].index, 1);
  EXPECT_TRUE(g.tasks[1].regression);
  EXPECT_THAT(g.tasks[0].label_names, ElementsAre("0", "1"));
  EXPECT_DOUBLE_EQ(g.tasks[0].eval_metrics.at("f1"), 0.8);
  EXPECT_EQ(store_->ListFamilyVersions("")->size(), 3u);
  ASSERT_TRUE(store_->DeleteFamily("glue").ok());
  EXPECT_TRUE(store_->ListFamilyVersions("glue")->empty());
  EXPECT_TRUE(absl::IsNotFound(store_->DeleteFamily("glue")));
}

// Publication is a compare-and-swap on the family's newest version and its
// owner, atomic with the insert (issue 17, hole 3).
TEST_P(StoreConformance, PublicationChecksBaseVersionAndOwner) {
  FamilyVersionRecord f;
  f.family = "cas";
  f.form = "4+1d";
  f.tenant = "acme";
  f.version = 2;  // the family has no v1: a publication that started from v1 is stale
  auto st = store_->PublishFamilyVersion(f);
  EXPECT_TRUE(absl::IsFailedPrecondition(st)) << st;
  EXPECT_THAT(std::string(st.message()), HasSubstr("is at v0, not v1"));
  f.version = 1;
  ASSERT_TRUE(store_->PublishFamilyVersion(f).ok());
  f.version = 3;  // skips v2
  EXPECT_TRUE(absl::IsFailedPrecondition(store_->PublishFamilyVersion(f)));
  f.version = 2;
  f.tenant = "beta";  // another tenant's family: refused, nothing recorded
  st = store_->PublishFamilyVersion(f);
  EXPECT_TRUE(absl::IsFailedPrecondition(st)) << st;
  EXPECT_THAT(std::string(st.message()), HasSubstr("another tenant"));
  EXPECT_EQ(store_->ListFamilyVersionSummaries("cas")->size(), 1u);
  f.tenant = "acme";
  ASSERT_TRUE(store_->PublishFamilyVersion(f).ok());
  // Two publishers racing from the same base: exactly one wins.
  FamilyVersionRecord race = f;
  race.version = 3;
  std::atomic<int> won{0}, refused{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&, i] {
      FamilyVersionRecord mine = race;
      mine.created_by_job = "job-" + std::to_string(i);
      auto s = store_->PublishFamilyVersion(mine);
      (s.ok() ? won : refused)++;
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(won.load(), 1);
  EXPECT_EQ(refused.load(), 3);
  EXPECT_EQ(store_->ListFamilyVersionSummaries("cas")->size(), 3u);
  // Keys: the name for "default", "<tenant>~<name>" otherwise.
  EXPECT_EQ(FamilyKey("default", "x"), "x");
  EXPECT_EQ(FamilyKey("acme", "x"), "acme~x");
  EXPECT_EQ(FamilyKeyTenant("acme~x"), "acme");
  EXPECT_EQ(FamilyKeyTenant("x"), "default");
  EXPECT_EQ(FamilyKeyName("acme~x"), "x");
}

// A version record of `family` with `n` tasks named t0, t1, ...
FamilyVersionRecord VersionWithTasks(const std::string& family, int64_t version, int n) {
  FamilyVersionRecord f;
  f.family = family;
  f.version = version;
  f.form = "4+1d";
  f.config_json = "{}";
  f.path = "/data/" + family;
  f.adapter_parameters = 10 * version;
  f.created_by_job = "job-" + std::to_string(version);
  f.tenant = "acme";
  for (int i = 0; i < n; ++i) {
    TaskRecord t;
    t.name = "t" + std::to_string(i);
    t.index = i;
    t.num_labels = 2;
    t.eval_metrics["acc"] = 0.5 + 0.01 * i;
    f.tasks.push_back(t);
  }
  f.task_count = 999;  // ignored: the stores count tasks themselves
  return f;
}

TEST_P(StoreConformance, FamilySummariesCarryTaskCountsAndNoTasks) {
  ASSERT_TRUE(store_->PublishFamilyVersion(VersionWithTasks("glue", 1, 3)).ok());
  ASSERT_TRUE(store_->PublishFamilyVersion(VersionWithTasks("glue", 2, 5)).ok());
  ASSERT_TRUE(store_->PublishFamilyVersion(VersionWithTasks("other", 1, 1)).ok());
  const auto glue = Summaries("glue");
  ASSERT_EQ(glue.size(), 2u);
  EXPECT_EQ(glue[0].version, 1);
  EXPECT_EQ(glue[0].task_count, 3);
  EXPECT_EQ(glue[1].version, 2);
  EXPECT_EQ(glue[1].task_count, 5);
  EXPECT_EQ(glue[1].adapter_parameters, 20);
  EXPECT_EQ(glue[1].created_by_job, "job-2");
  EXPECT_EQ(glue[1].tenant, "acme");
  EXPECT_EQ(glue[1].path, "/data/glue");
  for (const auto& v : glue) EXPECT_TRUE(v.tasks.empty()) << "v" << v.version;
  const auto all = Summaries("");
  ASSERT_EQ(all.size(), 3u);
  EXPECT_EQ(all[2].family, "other");
  EXPECT_EQ(all[2].task_count, 1);
  // Full listings carry the count too.
  auto full = store_->ListFamilyVersions("glue");
  ASSERT_TRUE(full.ok()) << full.status();
  EXPECT_EQ((*full)[1].task_count, 5);
  EXPECT_EQ((*full)[1].tasks.size(), 5u);
  EXPECT_TRUE(store_->ListFamilyVersionSummaries("missing")->empty());
}

TEST_P(StoreConformance, GetFamilyVersionRoundTripsOneVersion) {
  ASSERT_TRUE(store_->PublishFamilyVersion(VersionWithTasks("glue", 1, 2)).ok());
  ASSERT_TRUE(store_->PublishFamilyVersion(VersionWithTasks("glue", 2, 4)).ok());
  auto v1 = store_->GetFamilyVersion("glue", 1);
  ASSERT_TRUE(v1.ok()) << v1.status();
  EXPECT_EQ(v1->family, "glue");
  EXPECT_EQ(v1->version, 1);
  EXPECT_EQ(v1->task_count, 2);
  ASSERT_EQ(v1->tasks.size(), 2u);
  EXPECT_EQ(v1->tasks[1].name, "t1");
  EXPECT_EQ(v1->tasks[1].index, 1);
  EXPECT_DOUBLE_EQ(v1->tasks[1].eval_metrics.at("acc"), 0.51);
  EXPECT_EQ(v1->created_by_job, "job-1");
  auto v2 = store_->GetFamilyVersion("glue", 2);
  ASSERT_TRUE(v2.ok()) << v2.status();
  EXPECT_EQ(v2->tasks.size(), 4u);
  auto missing = store_->GetFamilyVersion("glue", 3);
  EXPECT_TRUE(absl::IsNotFound(missing.status())) << missing.status();
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("'glue'"));
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("version 3"));
  EXPECT_TRUE(absl::IsNotFound(store_->GetFamilyVersion("nope", 1).status()));

  // A range of the tasks, counting them all.
  auto mid = store_->GetFamilyVersionTasks("glue", 2, 1, 2);
  ASSERT_TRUE(mid.ok()) << mid.status();
  EXPECT_EQ(mid->task_count, 4);
  ASSERT_EQ(mid->tasks.size(), 2u);
  EXPECT_EQ(mid->tasks[0].name, "t1");
  EXPECT_EQ(mid->tasks[1].index, 2);
  EXPECT_DOUBLE_EQ(mid->tasks[1].eval_metrics.at("acc"), 0.52);
  EXPECT_EQ(store_->GetFamilyVersionTasks("glue", 2, 3, 100)->tasks.size(), 1u);
  EXPECT_EQ(store_->GetFamilyVersionTasks("glue", 2, 0, -1)->tasks.size(), 4u);
  EXPECT_TRUE(store_->GetFamilyVersionTasks("glue", 2, 4, 10)->tasks.empty());
  EXPECT_EQ(store_->GetFamilyVersionTasks("glue", 2, 9, 10)->task_count, 4);
  EXPECT_TRUE(absl::IsNotFound(store_->GetFamilyVersionTasks("glue", 5, 0, 1).status()));
}

// A row written before the task_count column existed: the column and its
// migration record are dropped, and reopening the store migrates again,
// counting the tasks from tasks_json. (Undoes the newest migrations back to
// task_count: per-tenant family keys (data only), parent_version,
// task_count; move this along when one is added.)
TEST_P(StoreConformance, MigrationCountsTasksOfRowsWrittenBeforeTaskCount) {
  ASSERT_TRUE(store_->PublishFamilyVersion(VersionWithTasks("old", 1, 7)).ok());
  ASSERT_TRUE(store_->PublishFamilyVersion(VersionWithTasks("old", 2, 0)).ok());
  store_.reset();
  // PostgreSQL has two more: the jobs' claim_epoch (fencing tokens) and the
  // blobs table.
  const char* undo =
      GetParam() == "sqlite"
          ? "ALTER TABLE family_versions DROP COLUMN parent_version; "
            "ALTER TABLE family_versions DROP COLUMN task_count; "
            "DELETE FROM schema_migrations WHERE version > (SELECT MAX(version) - 3 FROM "
            "schema_migrations);"
          : "DROP TABLE blobs; "
            "ALTER TABLE jobs DROP COLUMN claim_epoch; "
            "ALTER TABLE family_versions DROP COLUMN parent_version; "
            "ALTER TABLE family_versions DROP COLUMN task_count; "
            "DELETE FROM schema_migrations WHERE version > (SELECT MAX(version) - 5 FROM "
            "schema_migrations);";
  if (GetParam() == "sqlite") {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open((dir_ / "metatt.db").string().c_str(), &db), SQLITE_OK);
    char* err = nullptr;
    int rc = sqlite3_exec(db, undo, nullptr, nullptr, &err);
    std::string msg = err ? err : "";
    sqlite3_free(err);
    sqlite3_close(db);
    ASSERT_EQ(rc, SQLITE_OK) << msg;
    auto s = SqliteStore::Create((dir_ / "metatt.db").string());
    ASSERT_TRUE(s.ok()) << s.status();
    store_ = std::move(*s);
  } else {
    PGconn* conn = PQconnectdb(uri_.c_str());
    PGresult* r = PQexec(conn, undo);
    const bool ok = PQresultStatus(r) == PGRES_COMMAND_OK;
    std::string msg = PQerrorMessage(conn);
    PQclear(r);
    PQfinish(conn);
    ASSERT_TRUE(ok) << msg;
    auto s = PostgresStore::Create(uri_);
    ASSERT_TRUE(s.ok()) << s.status();
    store_ = std::move(*s);
  }
  // The per-tenant key migration moved tenant acme's "old" to its key.
  EXPECT_TRUE(store_->ListFamilyVersionSummaries("old")->empty());
  const auto old = Summaries("acme~old");
  ASSERT_EQ(old.size(), 2u);
  EXPECT_EQ(old[0].task_count, 7);
  EXPECT_EQ(old[1].task_count, 0);
  EXPECT_EQ(old[0].path, "/data/old");  // the files stay where they are
  auto full = store_->GetFamilyVersion("acme~old", 1);
  ASSERT_TRUE(full.ok()) << full.status();
  EXPECT_EQ(full->tasks.size(), 7u);
}

// An add-task publication records only its tasks and the version it extends;
// compaction turns it into a full row of the same version.
TEST_P(StoreConformance, AppendedVersionsChainToTheirParentsAndCompact) {
  ASSERT_TRUE(store_->PublishFamilyVersion(VersionWithTasks("fam", 1, 3)).ok());
  for (int64_t v = 2; v <= 3; ++v) {
    FamilyVersionRecord add = VersionWithTasks("fam", v, 0);
    add.parent_version = v - 1;
    TaskRecord t;
    t.name = "added" + std::to_string(v);
    t.index = v + 1;  // 3, 4
    t.num_labels = 2;
    add.tasks.push_back(t);
    add.task_count = v + 2;  // the whole family's: 4, 5
    ASSERT_TRUE(store_->PublishFamilyVersion(add).ok());
  }
  const auto summaries = Summaries("fam");
  ASSERT_EQ(summaries.size(), 3u);
  EXPECT_EQ(summaries[2].task_count, 5);
  EXPECT_EQ(summaries[2].parent_version, 2);
  EXPECT_EQ(summaries[0].parent_version, 0);
  auto v3 = store_->GetFamilyVersion("fam", 3);
  ASSERT_TRUE(v3.ok()) << v3.status();
  ASSERT_EQ(v3->tasks.size(), 1u);
  EXPECT_EQ(v3->task_count, 5);
  auto full = store_->GetFamilyVersionFull("fam", 3);
  ASSERT_TRUE(full.ok()) << full.status();
  ASSERT_EQ(full->tasks.size(), 5u);
  EXPECT_EQ(full->tasks[0].name, "t0");
  EXPECT_EQ(full->tasks[3].name, "added2");
  EXPECT_EQ(full->tasks[4].name, "added3");
  EXPECT_EQ(full->task_count, 5);

  ASSERT_TRUE(store_->CompactFamilyVersion("fam", 3, full->tasks).ok());
  auto compacted = store_->GetFamilyVersion("fam", 3);
  ASSERT_TRUE(compacted.ok()) << compacted.status();
  EXPECT_EQ(compacted->parent_version, 0);
  ASSERT_EQ(compacted->tasks.size(), 5u);
  EXPECT_EQ(compacted->tasks[4].name, "added3");
  EXPECT_EQ(compacted->created_by_job, "job-3");  // the same version, not a new one
  EXPECT_TRUE(absl::IsNotFound(store_->CompactFamilyVersion("fam", 9, full->tasks)));
  // A missing parent is an error naming the version, not a short list.
  ASSERT_TRUE(store_->PublishFamilyVersion(VersionWithTasks("orphan", 1, 1)).ok());
  FamilyVersionRecord orphan = VersionWithTasks("orphan", 2, 0);
  orphan.parent_version = 7;
  orphan.task_count = 1;
  ASSERT_TRUE(store_->PublishFamilyVersion(orphan).ok());
  auto broken = store_->GetFamilyVersionFull("orphan", 2);
  EXPECT_TRUE(absl::IsNotFound(broken.status())) << broken.status();
  EXPECT_THAT(std::string(broken.status().message()), HasSubstr("parent"));
}

TEST_P(StoreConformance, ClaimsOnlyWhereSeveralReplicasCanShareTheStore) {
  ASSERT_TRUE(store_->CreateJob(Job("job-1")).ok());
  if (GetParam() == "sqlite") {
    EXPECT_FALSE(store_->SupportsClaims());
    EXPECT_TRUE(absl::IsUnimplemented(store_->ClaimNextJob("r1", 1000).status()));
    return;
  }
  ASSERT_TRUE(store_->SupportsClaims());
  auto c = store_->ClaimNextJob("r1", 60000);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->id, "job-1");
  EXPECT_EQ(c->state, JobState::kQueued);  // claiming does not change the state
  EXPECT_TRUE(absl::IsNotFound(store_->ClaimNextJob("r2", 60000).status()));
  // Only the holder renews; a cancel request reaches it through the renewal.
  auto renewed = store_->RenewLease("job-1", "r1", 60000);
  ASSERT_TRUE(renewed.ok()) << renewed.status();
  EXPECT_FALSE(*renewed);
  auto wrong = store_->RenewLease("job-1", "r2", 60000);
  EXPECT_TRUE(absl::IsFailedPrecondition(wrong.status()));
  EXPECT_THAT(wrong.status().message(), HasSubstr("r1"));
  ASSERT_TRUE(store_->RequestCancel("job-1").ok());
  EXPECT_TRUE(*store_->RenewLease("job-1", "r1", 60000));
  EXPECT_TRUE(absl::IsNotFound(store_->RequestCancel("job-x")));
  // A live lease is never taken over.
  std::string prev;
  EXPECT_TRUE(absl::IsNotFound(store_->TakeOverExpiredJob("r2", 60000, &prev).status()));
  // Released: claimable again.
  ASSERT_TRUE(store_->ReleaseClaim("job-1", "r1").ok());
  EXPECT_TRUE(absl::IsFailedPrecondition(store_->ReleaseClaim("job-1", "r1")));
  auto again = store_->ClaimNextJob("r2", 60000);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->id, "job-1");
}

TEST_P(StoreConformance, ExpiredLeaseIsTakenOverOnce) {
  std::string prev;
  if (GetParam() == "sqlite") {  // one process: no claims, said so
    EXPECT_TRUE(absl::IsUnimplemented(store_->TakeOverExpiredJob("r2", 1, &prev).status()));
    return;
  }
  JobRecord j = Job("job-1");
  ASSERT_TRUE(store_->CreateJob(j).ok());
  ASSERT_TRUE(store_->ClaimNextJob("dead", 1).ok());
  j.state = JobState::kRunning;
  ASSERT_TRUE(store_->UpdateJob(j).ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  auto t = store_->TakeOverExpiredJob("r2", 60000, &prev);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->id, "job-1");
  EXPECT_EQ(t->state, JobState::kRunning);
  EXPECT_EQ(prev, "dead");
  EXPECT_TRUE(absl::IsNotFound(store_->TakeOverExpiredJob("r3", 60000, &prev).status()));
  EXPECT_TRUE(store_->RenewLease("job-1", "r2", 60000).ok());
  EXPECT_FALSE(store_->RenewLease("job-1", "dead", 60000).ok());
  // Terminal jobs are never taken over, whatever their lease.
  ASSERT_TRUE(store_->CreateJob(Job("job-2")).ok());
  ASSERT_TRUE(store_->ClaimNextJob("dead", 1).ok());
  JobRecord done = Job("job-2");
  done.state = JobState::kSucceeded;
  ASSERT_TRUE(store_->UpdateJob(done).ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_TRUE(absl::IsNotFound(store_->TakeOverExpiredJob("r3", 60000, &prev).status()));
}

// Several replicas (connections) claiming concurrently: every job exactly once.
TEST_P(StoreConformance, ConcurrentReplicasClaimEveryJobExactlyOnce) {
  if (GetParam() == "sqlite") {  // one process: no claims, said so
    EXPECT_TRUE(absl::IsUnimplemented(store_->RenewLease("job-1", "r1", 1).status()));
    return;
  }
  constexpr int kJobs = 40, kReplicas = 4;
  for (int i = 0; i < kJobs; ++i) ASSERT_TRUE(store_->CreateJob(Job("job-" + std::to_string(i))).ok());
  absl::Mutex mu;
  std::multiset<std::string> claimed;
  std::vector<std::thread> threads;
  std::atomic<int> errors{0};
  for (int r = 0; r < kReplicas; ++r) {
    threads.emplace_back([&, r] {
      auto s = PostgresStore::Create(uri_);
      if (!s.ok()) {
        errors++;
        return;
      }
      while (true) {
        auto c = (*s)->ClaimNextJob("replica-" + std::to_string(r), 60000);
        if (absl::IsNotFound(c.status())) return;
        if (!c.ok()) {
          errors++;
          return;
        }
        absl::MutexLock lock(&mu);
        claimed.insert(c->id);
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(errors.load(), 0);
  EXPECT_EQ(claimed.size(), static_cast<size_t>(kJobs));
  for (const auto& id : claimed) EXPECT_EQ(claimed.count(id), 1u) << id;
}

TEST(PostgresStore, MigratesOnceAndRefusesBadUris) {
  EXPECT_TRUE(absl::IsInvalidArgument(PostgresStore::Create("mysql://x").status()));
  EXPECT_TRUE(PostgresStore::IsPostgresUri("postgres://u@h/db"));
  EXPECT_FALSE(PostgresStore::IsPostgresUri("sqlite"));
  auto uri = PgEnv::Get().NewDatabase();
  ASSERT_TRUE(uri.ok()) << "PostgreSQL could not start: " << uri.status();
  // Two replicas starting together: both open, the schema is applied once.
  std::unique_ptr<PostgresStore> a, b;
  std::thread ta([&] { a = std::move(PostgresStore::Create(*uri)).value(); });
  std::thread tb([&] { b = std::move(PostgresStore::Create(*uri)).value(); });
  ta.join();
  tb.join();
  EXPECT_EQ(*a->SchemaVersion(), 6);
  EXPECT_EQ(*b->SchemaVersion(), 6);
  auto unreachable = PostgresStore::Create("postgresql://postgres@127.0.0.1:1/none");
  EXPECT_TRUE(absl::IsUnavailable(unreachable.status())) << unreachable.status();
}

// Two replicas' stores (a, b) on one new PostgreSQL database.
struct TwoReplicas {
  std::string uri;
  std::unique_ptr<PostgresStore> a, b;
};
void OpenTwoReplicas(TwoReplicas* r) {
  auto uri = PgEnv::Get().NewDatabase();
  ASSERT_TRUE(uri.ok()) << "PostgreSQL could not start: " << uri.status();
  r->uri = *uri;
  auto a = PostgresStore::Create(r->uri);
  auto b = PostgresStore::Create(r->uri);
  ASSERT_TRUE(a.ok() && b.ok());
  r->a = std::move(*a);
  r->b = std::move(*b);
}

// Replica `replica` claims the next queued job (`job_id`) on `store`, or,
// with `take_over`, the job whose lease has lapsed; it holds the claim's
// fencing token from then on: `*epoch`.
void ClaimAndHoldFence(PostgresStore* store, const std::string& replica,
                       const std::string& job_id, bool take_over, int64_t* epoch) {
  std::string prev;
  auto claimed = take_over ? store->TakeOverExpiredJob(replica, 60000, &prev)
                           : store->ClaimNextJob(replica, 1);
  ASSERT_TRUE(claimed.ok()) << claimed.status();
  ASSERT_EQ(claimed->id, job_id);
  *epoch = claimed->claim_epoch;
  store->HoldFence(job_id, *epoch);
}

// Fencing tokens (issue 17, hole 4): replica A paused past its lease; B took
// the job over. Every write A still makes for the job is refused, its
// publication included, and B's go through.
TEST(PostgresStore, StaleFencingTokensAreRefused) {
  TwoReplicas r;
  ASSERT_NO_FATAL_FAILURE(OpenTwoReplicas(&r));
  PostgresStore* a = r.a.get();
  PostgresStore* b = r.b.get();
  JobRecord j;
  j.id = "job-f";
  j.spec.family = "fam";
  j.tenant = "acme";
  ASSERT_TRUE(a->CreateJob(j).ok());
  int64_t epoch = 0;
  ASSERT_NO_FATAL_FAILURE(ClaimAndHoldFence(a, "A", "job-f", /*take_over=*/false, &epoch));
  EXPECT_EQ(epoch, 1);
  j.state = JobState::kRunning;
  ASSERT_TRUE(a->UpdateJob(j).ok());  // still the holder
  ASSERT_TRUE(a->AppendJobEvent("job-f", JobEvent{}).ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  ASSERT_NO_FATAL_FAILURE(ClaimAndHoldFence(b, "B", "job-f", /*take_over=*/true, &epoch));
  EXPECT_EQ(epoch, 2);
  // A, with epoch 1: refused, naming the stale token.
  j.state = JobState::kSucceeded;
  auto st = a->UpdateJob(j);
  EXPECT_TRUE(absl::IsFailedPrecondition(st)) << st;
  EXPECT_THAT(std::string(st.message()), HasSubstr("stale fencing token"));
  EXPECT_TRUE(absl::IsFailedPrecondition(a->AppendJobEvent("job-f", JobEvent{})));
  EXPECT_TRUE(absl::IsFailedPrecondition(a->RenewLease("job-f", "A", 60000).status()));
  FamilyVersionRecord v;
  v.family = "acme~fam";
  v.version = 1;
  v.tenant = "acme";
  v.created_by_job = "job-f";
  st = a->PublishFamilyVersion(v);
  EXPECT_TRUE(absl::IsFailedPrecondition(st)) << st;
  EXPECT_THAT(std::string(st.message()), HasSubstr("publication was refused"));
  EXPECT_TRUE(b->ListFamilyVersionSummaries("acme~fam")->empty());
  // B, the holder: its writes go through; the job ends once, as B says.
  j.state = JobState::kFailed;
  j.failure_reason = "taken over";
  ASSERT_TRUE(b->UpdateJob(j).ok());
  ASSERT_TRUE(b->AppendJobEvent("job-f", JobEvent{}).ok());
  EXPECT_EQ(a->GetJob("job-f")->state, JobState::kFailed);
  EXPECT_EQ(a->ListJobEvents("job-f")->size(), 2u);  // A's first and B's
  // Without a fence (another replica's cancel, the embedded store) writes are as before.
  a->DropFence("job-f");
  EXPECT_TRUE(a->AppendJobEvent("job-f", JobEvent{}).ok());
}

// Store timeouts: a server that accepts the connection and never answers
// costs a call at most the connect timeout; Ping says UNAVAILABLE.
TEST(PostgresStore, UnansweredConnectionTimesOut) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(::listen(fd, 8), 0);  // accepts (the kernel does), never answers
  socklen_t len = sizeof(addr);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  const std::string uri =
      "postgresql://postgres@127.0.0.1:" + std::to_string(ntohs(addr.sin_port)) + "/none";
  const auto t0 = std::chrono::steady_clock::now();
  auto s = PostgresStore::Create(uri, PostgresStore::Timeouts{2000, 1000});
  const double waited =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_TRUE(absl::IsUnavailable(s.status())) << s.status();
  EXPECT_LT(waited, 10.0);
  ::close(fd);
}

// ---- Two job managers (replicas) on one PostgreSQL database ------------------

class SharedJobManagers : public ::testing::Test {
 protected:
  struct Replica {
    std::string id;
    std::unique_ptr<PostgresStore> store;
    FakeExecutor executor;
    std::unique_ptr<JobManager> jobs;
  };
  void SetUp() override {
    auto uri = PgEnv::Get().NewDatabase();
    ASSERT_TRUE(uri.ok()) << "PostgreSQL could not start: " << uri.status();
    for (const char* id : {"replica-a", "replica-b"}) {
      auto r = std::make_unique<Replica>();
      r->id = id;
      auto s = PostgresStore::Create(*uri);
      ASSERT_TRUE(s.ok()) << s.status();
      r->store = std::move(*s);
      replicas_.push_back(std::move(r));
    }
    DatasetRecord d;
    d.id = "ds-1";
    d.name = "d";
    d.format = "tsv";
    ASSERT_TRUE(replicas_[0]->store->PutDataset(d).ok());
    for (auto& r : replicas_) ASSERT_NO_FATAL_FAILURE(StartManager(*r));
  }
  void StartManager(Replica& r) {
    JobManagerOptions o;
    o.replica_id = r.id;
    o.lease_ms = 600;
    o.poll_ms = 30;
    auto m = JobManager::Create(o, r.store.get(), &r.executor);
    ASSERT_TRUE(m.ok()) << m.status();
    r.jobs = std::move(*m);
  }
  static JobSpec Spec(const std::string& family) {
    JobSpec s;
    s.family = family;
    s.tasks.push_back({"T", "ds-1", "", 0.1, ""});
    return s;
  }
  // The replica whose executor started `job_id` (waits up to 10 s).
  Replica* WaitHolder(const std::string& job_id) {
    for (int i = 0; i < 1000; ++i) {
      for (auto& r : replicas_) {
        auto started = r->executor.started();
        if (std::find(started.begin(), started.end(), job_id) != started.end()) return r.get();
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return nullptr;
  }
  JobState WaitTerminal(const std::string& job_id, JobRecord* out = nullptr) {
    for (int i = 0; i < 1000; ++i) {
      auto j = replicas_[0]->store->GetJob(job_id);
      if (j.ok() && IsTerminal(j->state)) {
        if (out) *out = *j;
        return j->state;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return JobState::kQueued;
  }
  Replica* Other(Replica* r) {
    return r == replicas_[0].get() ? replicas_[1].get() : replicas_[0].get();
  }
  std::vector<std::unique_ptr<Replica>> replicas_;
};

TEST_F(SharedJobManagers, JobCreatedOnOneReplicaRunsExactlyOnceAndStreamsEverywhere) {
  auto job = replicas_[0]->jobs->CreateJob(Spec("fam"));
  ASSERT_TRUE(job.ok()) << job.status();
  Replica* holder = WaitHolder(job->id);
  ASSERT_NE(holder, nullptr) << "no replica started the job";
  Replica* other = Other(holder);
  // Subscribed on the replica that does not run it: events come from the store.
  auto sub = other->jobs->Subscribe(job->id);
  ASSERT_TRUE(sub.ok()) << sub.status();
  holder->executor.Progress(job->id, 5, 10, 0.5);
  holder->executor.Succeed(job->id, "fam", 1);
  std::vector<JobEvent> seen;
  JobEvent e;
  while ((*sub)->Next(&e, absl::Seconds(10)) == JobEventSubscription::Result::kEvent) {
    seen.push_back(e);
  }
  ASSERT_FALSE(seen.empty());
  EXPECT_EQ(seen.back().state, JobState::kSucceeded);
  EXPECT_TRUE(std::any_of(seen.begin(), seen.end(), [](const JobEvent& x) {
    return x.type == JobEvent::Type::kProgress && x.step == 5;
  }));
  EXPECT_EQ(WaitTerminal(job->id), JobState::kSucceeded);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // several polls
  EXPECT_TRUE(other->executor.started().empty());
  EXPECT_EQ(holder->executor.started().size(), 1u);
  auto events = holder->store->ListJobEvents(job->id);
  ASSERT_TRUE(events.ok());
  int claims = 0;
  for (const JobEvent& x : *events) claims += absl::StrContains(x.message, "claimed by replica");
  EXPECT_EQ(claims, 1);
}

TEST_F(SharedJobManagers, DeadReplicasJobIsFailedWithTheReasonByTheOther) {
  auto job = replicas_[1]->jobs->CreateJob(Spec("fam"));
  ASSERT_TRUE(job.ok()) << job.status();
  Replica* holder = WaitHolder(job->id);
  ASSERT_NE(holder, nullptr);
  holder->executor.Progress(job->id, 1, 10, 0.9);
  const std::string dead = holder->id;
  holder->jobs->Shutdown();  // stops renewing, like a killed process
  JobRecord done;
  EXPECT_EQ(WaitTerminal(job->id, &done), JobState::kFailed);
  EXPECT_THAT(done.failure_reason, HasSubstr("replica " + dead + " stopped renewing its lease"));
  EXPECT_THAT(done.failure_reason, HasSubstr("no resumable checkpoint"));
  EXPECT_TRUE(Other(holder)->executor.started().empty());
}

TEST_F(SharedJobManagers, ResumableJobIsTakenOverByTheOther) {
  for (auto& r : replicas_) r->executor.set_can_resume(true);
  auto job = replicas_[0]->jobs->CreateJob(Spec("fam"));
  ASSERT_TRUE(job.ok()) << job.status();
  Replica* holder = WaitHolder(job->id);
  ASSERT_NE(holder, nullptr);
  Replica* other = Other(holder);
  holder->jobs->Shutdown();
  ASSERT_TRUE(other->executor.WaitStarted(job->id)) << "the live replica never took it over";
  other->executor.Succeed(job->id, "fam", 1);
  EXPECT_EQ(WaitTerminal(job->id), JobState::kSucceeded);
}

TEST_F(SharedJobManagers, CancelThroughTheOtherReplicaReachesTheHolder) {
  auto job = replicas_[0]->jobs->CreateJob(Spec("fam"));
  ASSERT_TRUE(job.ok()) << job.status();
  Replica* holder = WaitHolder(job->id);
  ASSERT_NE(holder, nullptr);
  auto c = Other(holder)->jobs->CancelJob(job->id);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(WaitTerminal(job->id), JobState::kCancelled);
  EXPECT_EQ(holder->executor.cancels().size(), 1u);
}

TEST(SharedJobManager, RefusesAStoreOfOneProcess) {
  auto s = SqliteStore::Create(":memory:");
  ASSERT_TRUE(s.ok());
  FakeExecutor ex;
  JobManagerOptions o;
  o.replica_id = "a";
  auto m = JobManager::Create(o, s->get(), &ex);
  EXPECT_TRUE(absl::IsInvalidArgument(m.status())) << m.status();
}

// ---- The BlobStore contract (blob_store.h): the local directory (SQLite
// mode's layout) and PostgreSQL's blobs table ----------------------------------

class BlobStoreConformance : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (GetParam() == "dir") {
      dir_ = testing_util::NewTestDirPath("blob_conformance_");
      blobs_ = Reopen();
    } else {
      auto uri = PgEnv::Get().NewDatabase();
      ASSERT_TRUE(uri.ok()) << "PostgreSQL could not start: " << uri.status();
      uri_ = *uri;
      blobs_ = Reopen();
    }
    ASSERT_NE(blobs_, nullptr);
  }
  void TearDown() override {
    blobs_ = nullptr;
    pg_.clear();
    local_.clear();
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }
  // A fresh store object on the same directory or database (another
  // process, a restart, another replica).
  BlobStore* Reopen() {
    if (GetParam() == "dir") {
      auto s = LocalBlobStore::Create(dir_.string());
      if (!s.ok()) return nullptr;
      local_.push_back(std::move(*s));
      return local_.back().get();
    }
    auto s = PostgresStore::Create(uri_);
    if (!s.ok()) return nullptr;
    pg_.push_back(std::move(*s));
    return pg_.back()->blob_store();
  }
  static std::string Bytes(size_t n, uint32_t seed) {
    std::mt19937 rng(seed);
    std::string out(n, '\0');
    for (char& c : out) c = static_cast<char>(rng() & 0xff);
    return out;
  }

  std::filesystem::path dir_;
  std::string uri_;
  std::vector<std::unique_ptr<LocalBlobStore>> local_;
  std::vector<std::unique_ptr<PostgresStore>> pg_;
  BlobStore* blobs_ = nullptr;
};

TEST_P(BlobStoreConformance, PutGetListDeleteRoundTrip) {
  const std::string bin = std::string("a\0b\xff\x00z", 6);  // NULs and high bytes survive
  ASSERT_TRUE(blobs_->Put("families/glue/v1-x/cores.safetensors", bin).ok());
  ASSERT_TRUE(blobs_->Put("families/glue/v1-x/family.json", "{}").ok());
  ASSERT_TRUE(blobs_->Put("families/glue2/v1-y/family.json", "{\"n\":2}").ok());
  ASSERT_TRUE(blobs_->Put("datasets/ds-1/data.tsv", "").ok());  // empty is a value
  EXPECT_EQ(*blobs_->Get("families/glue/v1-x/cores.safetensors"), bin);
  EXPECT_EQ(*blobs_->Get("datasets/ds-1/data.tsv"), "");
  EXPECT_TRUE(*blobs_->Exists("families/glue/v1-x/family.json"));
  EXPECT_FALSE(*blobs_->Exists("families/glue/v2-x/family.json"));
  // A plain string prefix, sorted; a sibling with a longer name is not under "glue/".
  EXPECT_THAT(*blobs_->List("families/glue/"),
              ElementsAre("families/glue/v1-x/cores.safetensors", "families/glue/v1-x/family.json"));
  EXPECT_THAT(*blobs_->List("families/glue"),
              ElementsAre("families/glue/v1-x/cores.safetensors", "families/glue/v1-x/family.json",
                          "families/glue2/v1-y/family.json"));
  EXPECT_TRUE(blobs_->List("checkpoints/")->empty());
  // Put replaces the whole value.
  ASSERT_TRUE(blobs_->Put("families/glue/v1-x/family.json", "{\"v\":2}").ok());
  EXPECT_EQ(*blobs_->Get("families/glue/v1-x/family.json"), "{\"v\":2}");
  // Missing: NOT_FOUND naming the key. Delete is idempotent.
  auto missing = blobs_->Get("families/glue/v9-z/family.json");
  EXPECT_TRUE(absl::IsNotFound(missing.status())) << missing.status();
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("families/glue/v9-z/family.json"));
  ASSERT_TRUE(blobs_->Delete("families/glue/v1-x/family.json").ok());
  ASSERT_TRUE(blobs_->Delete("families/glue/v1-x/family.json").ok());
  EXPECT_FALSE(*blobs_->Exists("families/glue/v1-x/family.json"));
  EXPECT_THAT(*blobs_->List("families/glue/"), ElementsAre("families/glue/v1-x/cores.safetensors"));
}

TEST_P(BlobStoreConformance, KeysFollowOneRule) {
  for (const char* bad : {"", "/abs", "a//b", "a/../b", "./a", "a/", "a b", "a/x.tmp.12",
                          "a\\b", "a/\xc3\xa9"}) {
    auto st = blobs_->Put(bad, "x");
    EXPECT_TRUE(absl::IsInvalidArgument(st)) << "'" << bad << "': " << st;
    EXPECT_TRUE(absl::IsInvalidArgument(blobs_->Get(bad).status())) << bad;
  }
  // Tenant-scoped family keys ('~') and every id the server makes are fine.
  EXPECT_TRUE(blobs_->Put("families/acme~glue/v3-0f/appended.json", "{}").ok());
  EXPECT_TRUE(blobs_->Put("checkpoints/job-0123abcd/step-000000050.ckpt", "c").ok());
  EXPECT_TRUE(ValidateBlobKey(std::string(1024, 'a')).ok());
  EXPECT_TRUE(absl::IsInvalidArgument(ValidateBlobKey(std::string(1025, 'a'))));
}

TEST_P(BlobStoreConformance, LargeValuesAreDurableAcrossReopening) {
  const std::string big = Bytes(3 << 20, 7);  // a checkpoint-sized value
  ASSERT_TRUE(blobs_->Put("checkpoints/job-1/step-000000050.ckpt", big).ok());
  BlobStore* other = Reopen();  // another replica, or the same one restarted
  ASSERT_NE(other, nullptr);
  auto got = other->Get("checkpoints/job-1/step-000000050.ckpt");
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(*got == big);
  EXPECT_THAT(*other->List("checkpoints/job-1/"),
              ElementsAre("checkpoints/job-1/step-000000050.ckpt"));
}

TEST_P(BlobStoreConformance, ConcurrentWritersOfOneKeyLeaveOneWholeValue) {
  const std::string a = Bytes(1 << 20, 1), b = Bytes(1 << 20, 2);
  BlobStore* other = Reopen();
  ASSERT_NE(other, nullptr);
  std::thread ta([&] {
    for (int i = 0; i < 5; ++i) EXPECT_TRUE(blobs_->Put("datasets/ds-x/data.tsv", a).ok());
  });
  std::thread tb([&] {
    for (int i = 0; i < 5; ++i) EXPECT_TRUE(other->Put("datasets/ds-x/data.tsv", b).ok());
  });
  ta.join();
  tb.join();
  auto got = blobs_->Get("datasets/ds-x/data.tsv");
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(*got == a || *got == b);  // never a mix
}

// The directory store: a write cut off before its rename (a crash) leaves the
// previous value, and its scratch file is no key.
TEST(LocalBlobStore, InterruptedWriteLeavesThePreviousValue) {
  const auto dir = testing_util::NewTestDirPath("blob_local_");
  auto s = LocalBlobStore::Create(dir.string());
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_TRUE((*s)->Put("datasets/ds-1/data.tsv", "old").ok());
  // Today's layout: the key is the file under the root.
  EXPECT_TRUE(std::filesystem::is_regular_file(dir / "datasets/ds-1/data.tsv"));
  std::ofstream(dir / "datasets/ds-1/data.tsv.tmp.999") << "half of the n";
  EXPECT_EQ(*(*s)->Get("datasets/ds-1/data.tsv"), "old");
  EXPECT_THAT(*(*s)->List("datasets/"), ElementsAre("datasets/ds-1/data.tsv"));
  std::filesystem::remove_all(dir);
}

// PostgreSQL: the bytes are checked against their recorded size and hash on
// every read; a checkpoint write of a job this replica lost is refused.
TEST(PostgresBlobStore, CorruptBytesAreDataLossAndStaleFencesAreRefused) {
  TwoReplicas r;
  ASSERT_NO_FATAL_FAILURE(OpenTwoReplicas(&r));
  PostgresStore* a = r.a.get();
  PostgresStore* b = r.b.get();
  BlobStore* blobs = a->blob_store();
  ASSERT_TRUE(blobs->Put("datasets/ds-1/data.tsv", "label\ttext\n1\tgood\n").ok());
  {
    PGconn* c = PQconnectdb(r.uri.c_str());
    ASSERT_EQ(PQstatus(c), CONNECTION_OK) << PQerrorMessage(c);
    PGresult* r = PQexec(c, "UPDATE blobs SET bytes = 'rotten'::bytea WHERE key = 'datasets/ds-1/data.tsv'");
    EXPECT_EQ(PQresultStatus(r), PGRES_COMMAND_OK) << PQerrorMessage(c);
    PQclear(r);
    PQfinish(c);
  }
  auto got = b->blob_store()->Get("datasets/ds-1/data.tsv");
  EXPECT_TRUE(absl::IsDataLoss(got.status())) << got.status();
  EXPECT_THAT(std::string(got.status().message()), HasSubstr("datasets/ds-1/data.tsv"));

  JobRecord j;
  j.id = "job-c";
  j.spec.family = "fam";
  ASSERT_TRUE(a->CreateJob(j).ok());
  int64_t epoch = 0;
  ASSERT_NO_FATAL_FAILURE(ClaimAndHoldFence(a, "A", "job-c", /*take_over=*/false, &epoch));
  const std::string key = "checkpoints/job-c/step-000000010.ckpt";
  ASSERT_TRUE(blobs->Put(key, "a@10", "job-c").ok());  // still the holder
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  ASSERT_NO_FATAL_FAILURE(ClaimAndHoldFence(b, "B", "job-c", /*take_over=*/true, &epoch));
  ASSERT_TRUE(b->blob_store()->Put(key, "b@10", "job-c").ok());
  auto st = blobs->Put(key, "a@10 again", "job-c");
  EXPECT_TRUE(absl::IsFailedPrecondition(st)) << st;
  EXPECT_THAT(std::string(st.message()), HasSubstr("stale fencing token"));
  EXPECT_EQ(*b->blob_store()->Get(key), "b@10");  // A's late write did not land
  // Writes that belong to no job are not fenced.
  EXPECT_TRUE(blobs->Put("families/fam/v1-a/family.json", "{}").ok());
}

INSTANTIATE_TEST_SUITE_P(Backends, BlobStoreConformance, ::testing::Values("dir", "postgresql"),
                         [](const auto& info) { return info.param; });

INSTANTIATE_TEST_SUITE_P(Backends, StoreConformance, ::testing::Values("sqlite", "postgresql"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace metatt
