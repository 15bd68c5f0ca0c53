// Tenants: the tokens file, token hashing and authentication, and the
// ownership and quota rules of the job and dataset managers and FamilyAccess.
#include "server/jobs/tenants.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>

#include "absl/time/clock.h"
#include "server/jobs/dataset_manager.h"
#include "server/jobs/job_manager.h"
#include "server/store/sqlite_store.h"
#include "server/store/store_test_util.h"
#include "server/jobs/test_util.h"

namespace metatt {
namespace {

using ::testing::HasSubstr;

TEST(HashTokenTest, IsHexSha256) {
  // FIPS 180-2 test vector.
  EXPECT_EQ(HashToken("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

std::string ConfigJson() {
  return R"({"tokens": [
    {"tenant": "acme", "role": "user", "token_sha256": ")" + HashToken("acme-secret") + R"("},
    {"tenant": "acme", "token_sha256": ")" + HashToken("acme-second") + R"("},
    {"tenant": "ops", "role": "admin", "token_sha256": ")" + HashToken("ops-secret") + R"("}],
   "tenants": {"acme": {"max_queued_jobs": 3, "max_tasks": 7}}})";
}

TEST(TenantConfigTest, AuthenticatesKnownTokensOnly) {
  TenantQuotas defaults;
  defaults.max_queued_jobs = 10;
  defaults.max_dataset_bytes = 100;
  auto cfg = TenantConfig::Parse(ConfigJson(), defaults);
  ASSERT_TRUE(cfg.ok()) << cfg.status();
  EXPECT_EQ(cfg->num_tokens(), 3u);
  auto acme = cfg->Authenticate("acme-secret");
  ASSERT_TRUE(acme.ok());
  EXPECT_EQ(acme->tenant, "acme");
  EXPECT_FALSE(acme->admin);
  EXPECT_EQ(cfg->Authenticate("acme-second")->tenant, "acme");
  auto ops = cfg->Authenticate("ops-secret");
  ASSERT_TRUE(ops.ok());
  EXPECT_TRUE(ops->admin);
  EXPECT_TRUE(absl::IsUnauthenticated(cfg->Authenticate("wrong").status()));
  EXPECT_TRUE(absl::IsUnauthenticated(cfg->Authenticate("").status()));
  // The hash itself is not a token.
  EXPECT_TRUE(absl::IsUnauthenticated(cfg->Authenticate(HashToken("acme-secret")).status()));

  // Quotas: the tenant's entry over the defaults.
  TenantQuotas q = cfg->QuotasFor("acme");
  EXPECT_EQ(q.max_queued_jobs, 3);
  EXPECT_EQ(q.max_tasks, 7);
  EXPECT_EQ(q.max_dataset_bytes, 100);
  EXPECT_EQ(cfg->QuotasFor("ops").max_queued_jobs, 10);
}

TEST(TenantConfigTest, BadFilesNameTheField) {
  TenantQuotas d;
  const std::string h = HashToken("x");
  struct Case {
    std::string json, field;
  } cases[] = {
      {"[]", "not a JSON object"},
      {"{}", "tokens:"},
      {R"({"tokens": [{"role": "user", "token_sha256": ")" + h + R"("}]})", "tokens[0].tenant"},
      {R"({"tokens": [{"tenant": "a/b", "token_sha256": ")" + h + R"("}]})", "tokens[0].tenant"},
      {R"({"tokens": [{"tenant": "a", "role": "root", "token_sha256": ")" + h + R"("}]})",
       "tokens[0].role"},
      {R"({"tokens": [{"tenant": "a", "token_sha256": "abc"}]})", "tokens[0].token_sha256"},
      {R"({"tokens": [{"tenant": "a", "token_sha256": ")" + std::string(64, 'z') + R"("}]})",
       "tokens[0].token_sha256"},
      {R"({"tokens": [{"tenant": "a", "token": "plain"}]})", "tokens[0].token: unknown field"},
      {R"({"tokens": [{"tenant": "a", "token_sha256": ")" + h + R"("},
                      {"tenant": "b", "token_sha256": ")" + h + R"("}]})",
       "tokens[1].token_sha256: the same token"},
      {R"({"tokens": [{"tenant": "a", "token_sha256": ")" + h + R"("}],
           "tenants": {"a": {"max_tasks": -1}}})",
       "tenants.a.max_tasks"},
      {R"({"tokens": [{"tenant": "a", "token_sha256": ")" + h + R"("}],
           "tenants": {"a": {"max_jobs": 1}}})",
       "tenants.a.max_jobs: unknown field"},
  };
  for (const auto& c : cases) {
    auto cfg = TenantConfig::Parse(c.json, d);
    ASSERT_FALSE(cfg.ok()) << c.json;
    EXPECT_TRUE(absl::IsInvalidArgument(cfg.status())) << cfg.status();
    EXPECT_THAT(std::string(cfg.status().message()), HasSubstr(c.field)) << c.json;
  }
  EXPECT_TRUE(absl::IsNotFound(TenantConfig::Load("/nonexistent/tokens.json", d).status()));
}

// ---- Ownership and quotas in the managers -------------------------------------

class TenantRulesTest : public testing_util::SqliteStoreFixture {
 protected:
  void SetUp() override {
    SqliteStoreFixture::SetUp();
    DatasetManagerOptions o;
    o.data_dir = dir_.string();
    o.parse = FakeDatasetParse;
    o.quotas = [this](const std::string& t) { return Quotas(t); };
    auto dm = DatasetManager::Create(o, store_.get());
    ASSERT_TRUE(dm.ok()) << dm.status();
    datasets_ = std::move(*dm);
  }
  TenantQuotas Quotas(const std::string& tenant) {
    auto it = quotas_.find(tenant);
    return it == quotas_.end() ? TenantQuotas{} : it->second;
  }
  void StartJobs(int64_t max_batch = 4096, int64_t max_len = 4096) {
    JobManagerOptions o;
    o.quotas = [this](const std::string& t) { return Quotas(t); };
    o.limits.max_batch_size = max_batch;
    o.limits.max_sequence_length = max_len;
    auto m = JobManager::Create(o, store_.get(), &executor_);
    ASSERT_TRUE(m.ok()) << m.status();
    jobs_ = std::move(*m);
  }
  std::string Upload(const Caller& c, const std::string& bytes = "a\t0\nb\t1\n") {
    auto d = datasets_->Upload({"train", "tsv", "{}"}, bytes, c);
    EXPECT_TRUE(d.ok()) << d.status();
    return d.ok() ? d->id : "";
  }
  static JobSpec Spec(const std::string& family, const std::string& ds,
                      JobKind kind = JobKind::kTrainFamily, const std::string& task = "t1") {
    JobSpec s;
    s.kind = kind;
    s.family = family;
    s.tasks.push_back({task, ds, "", 0.1, ""});
    s.hparams.max_steps = 10;
    s.hparams.max_length = 32;
    return s;
  }
  void Publish(const std::string& family, const std::string& tenant, int tasks = 1) {
    FamilyVersionRecord f;
    f.family = FamilyKey(tenant, family);  // names are per tenant
    f.version = 1;
    f.form = "4+1d";
    f.tenant = tenant;
    for (int i = 0; i < tasks; ++i) {
      TaskRecord t;
      t.name = "task" + std::to_string(i);
      t.index = i;
      t.num_labels = 2;
      f.tasks.push_back(t);
    }
    ASSERT_TRUE(store_->PublishFamilyVersion(f).ok());
  }

  const Caller a_{"acme", false};
  const Caller b_{"beta", false};
  const Caller admin_{"ops", true};
  std::map<std::string, TenantQuotas> quotas_;
  std::unique_ptr<DatasetManager> datasets_;
  FakeExecutor executor_;
  std::unique_ptr<JobManager> jobs_;
};

TEST_F(TenantRulesTest, DatasetsAreInvisibleToOtherTenants) {
  const std::string id = Upload(a_);
  EXPECT_EQ(datasets_->Get(id, a_)->tenant, "acme");
  auto missing = datasets_->Get("ds-missing", b_);
  auto foreign = datasets_->Get(id, b_);
  ASSERT_TRUE(absl::IsNotFound(foreign.status()));
  // Same message shape as a missing one: nothing tells that it exists.
  EXPECT_EQ(foreign.status().message(), absl::StrCat("dataset '", id, "' not found"));
  EXPECT_EQ(missing.status().message(), "dataset 'ds-missing' not found");
  EXPECT_TRUE(datasets_->List(b_)->empty());
  EXPECT_EQ(datasets_->List(a_)->size(), 1u);
  EXPECT_EQ(datasets_->List(admin_)->size(), 1u);
  EXPECT_TRUE(absl::IsNotFound(datasets_->Delete(id, b_)));
  EXPECT_TRUE(datasets_->Get(id, a_).ok());  // B's delete did nothing
  EXPECT_TRUE(datasets_->Delete(id, a_).ok());
  EXPECT_TRUE(absl::IsNotFound(datasets_->Get(id, a_).status()));
}

TEST_F(TenantRulesTest, DatasetBytesQuota) {
  quotas_["acme"].max_dataset_bytes = 20;
  Upload(a_, "abc\t0\nabd\t1\n");  // 12 bytes
  auto over = datasets_->Upload({"more", "tsv", "{}"}, "abc\t0\nabd\t1\n", a_);
  ASSERT_TRUE(absl::IsResourceExhausted(over.status())) << over.status();
  EXPECT_THAT(std::string(over.status().message()), HasSubstr("max_dataset_bytes=20"));
  // Another tenant's usage is its own.
  Upload(b_, "abc\t0\nabd\t1\n");
}

TEST_F(TenantRulesTest, JobsAreInvisibleToOtherTenants) {
  StartJobs();
  const std::string ds_a = Upload(a_);
  auto job = jobs_->CreateJob(Spec("fam-a", ds_a), a_);
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->tenant, "acme");
  const std::string id = job->id;

  auto foreign = jobs_->GetJob(id, b_);
  ASSERT_TRUE(absl::IsNotFound(foreign.status()));
  EXPECT_EQ(foreign.status().message(), absl::StrCat("job '", id, "' not found"));
  EXPECT_EQ(jobs_->GetJob("job-missing", b_).status().message(), "job 'job-missing' not found");
  EXPECT_TRUE(absl::IsNotFound(jobs_->CancelJob(id, b_).status()));
  EXPECT_TRUE(absl::IsNotFound(jobs_->Subscribe(id, b_).status()));
  EXPECT_TRUE(jobs_->GetJob(id, a_).ok());
  EXPECT_TRUE(jobs_->GetJob(id, admin_).ok());

  std::string next;
  EXPECT_TRUE(jobs_->ListJobs(std::nullopt, 0, "", &next, b_)->empty());
  EXPECT_EQ(jobs_->ListJobs(std::nullopt, 0, "", &next, a_)->size(), 1u);
  EXPECT_EQ(jobs_->ListJobs(std::nullopt, 0, "", &next, admin_)->size(), 1u);

  // B cannot train on A's dataset: NOT_FOUND like a missing dataset.
  auto use = jobs_->CreateJob(Spec("fam-b", ds_a), b_);
  ASSERT_TRUE(absl::IsNotFound(use.status())) << use.status();
  EXPECT_THAT(std::string(use.status().message()), HasSubstr("dataset '" + ds_a + "' not found"));
  // Nor add a task to A's family.
  Publish("fam-a", "acme");
  const std::string ds_b = Upload(b_);
  auto add = jobs_->CreateJob(Spec("fam-a", ds_b, JobKind::kAddTask, "t2"), b_);
  ASSERT_TRUE(absl::IsNotFound(add.status())) << add.status();
  auto add_own = jobs_->CreateJob(Spec("fam-a", ds_a, JobKind::kAddTask, "t2"), a_);
  EXPECT_TRUE(add_own.ok()) << add_own.status();
  // B cancelling A's job left it alone.
  EXPECT_TRUE(executor_.cancels().empty());
}

TEST_F(TenantRulesTest, ListJobsPagesOverOtherTenantsJobs) {
  StartJobs();
  const std::string ds_a = Upload(a_), ds_b = Upload(b_);
  std::vector<std::string> mine;
  for (int i = 0; i < 5; ++i) {
    ASSERT_TRUE(jobs_->CreateJob(Spec("fb" + std::to_string(i), ds_b), b_).ok());
    auto j = jobs_->CreateJob(Spec("fa" + std::to_string(i), ds_a), a_);
    ASSERT_TRUE(j.ok()) << j.status();
    mine.push_back(j->id);
  }
  std::vector<std::string> seen;
  std::string token, next;
  do {
    auto page = jobs_->ListJobs(std::nullopt, 2, token, &next, a_);
    ASSERT_TRUE(page.ok()) << page.status();
    EXPECT_LE(page->size(), 2u);
    for (const auto& j : *page) {
      EXPECT_EQ(j.tenant, "acme");
      seen.push_back(j.id);
    }
    token = next;
  } while (!token.empty());
  EXPECT_EQ(seen, mine);
}

TEST_F(TenantRulesTest, IdempotencyKeysArePerTenant) {
  StartJobs();
  const std::string ds_a = Upload(a_), ds_b = Upload(b_);
  JobSpec sa = Spec("fam-a", ds_a);
  sa.idempotency_key = "k1";
  JobSpec sb = Spec("fam-b", ds_b);
  sb.idempotency_key = "k1";
  auto ja = jobs_->CreateJob(sa, a_);
  auto jb = jobs_->CreateJob(sb, b_);
  ASSERT_TRUE(ja.ok() && jb.ok()) << ja.status() << jb.status();
  EXPECT_NE(ja->id, jb->id);
  EXPECT_EQ(jb->tenant, "beta");
  EXPECT_EQ(ja->spec.idempotency_key, "k1");  // as the client sent it
  EXPECT_EQ(jobs_->GetJob(jb->id, b_)->spec.idempotency_key, "k1");
  EXPECT_EQ(jobs_->CreateJob(sa, a_)->id, ja->id);  // a retry finds A's job
}

TEST_F(TenantRulesTest, JobQuotasNameTheLimit) {
  quotas_["acme"].max_queued_jobs = 1;
  quotas_["beta"].max_concurrent_jobs = 1;
  StartJobs();
  const std::string ds_a = Upload(a_), ds_b = Upload(b_);
  auto first = jobs_->CreateJob(Spec("f1", ds_a), a_);  // starts running
  ASSERT_TRUE(first.ok());
  ASSERT_TRUE(executor_.WaitStarted(first->id));
  ASSERT_TRUE(jobs_->CreateJob(Spec("f2", ds_a), a_).ok());  // queued
  auto third = jobs_->CreateJob(Spec("f3", ds_a), a_);
  ASSERT_TRUE(absl::IsResourceExhausted(third.status())) << third.status();
  EXPECT_THAT(std::string(third.status().message()), HasSubstr("max_queued_jobs=1"));

  auto g1 = jobs_->CreateJob(Spec("g1", ds_b), b_);  // queued behind A's
  ASSERT_TRUE(g1.ok()) << g1.status();
  auto second_b = jobs_->CreateJob(Spec("g2", ds_b), b_);
  ASSERT_TRUE(absl::IsResourceExhausted(second_b.status())) << second_b.status();
  EXPECT_THAT(std::string(second_b.status().message()), HasSubstr("max_concurrent_jobs=1"));

  // A's running job finishing frees the device: the tenant served least
  // recently goes first (B's g1, fair share), so A's job stays queued and
  // A's queue is still full...
  executor_.End(first->id, JobState::kSucceeded, "");
  ASSERT_TRUE(executor_.WaitStarted(g1->id));
  EXPECT_TRUE(absl::IsResourceExhausted(jobs_->CreateJob(Spec("f4", ds_a), a_).status()));
  // ... until B's job ends and A's queued job starts.
  executor_.End(g1->id, JobState::kSucceeded, "");
  for (int i = 0; i < 500 && jobs_->queued_count() > 0; ++i) absl::SleepFor(absl::Milliseconds(5));
  EXPECT_TRUE(jobs_->CreateJob(Spec("f5", ds_a), a_).ok());
}

TEST_F(TenantRulesTest, TaskQuotaAndGlobalLimits) {
  quotas_["acme"].max_tasks = 2;
  StartJobs(/*max_batch=*/32, /*max_len=*/64);
  Publish("fam-a", "acme", 2);
  Publish("fam-b", "beta", 5);  // another tenant's tasks do not count
  const std::string ds_a = Upload(a_);
  auto over = jobs_->CreateJob(Spec("new-a", ds_a), a_);
  ASSERT_TRUE(absl::IsResourceExhausted(over.status())) << over.status();
  EXPECT_THAT(std::string(over.status().message()), HasSubstr("max_tasks=2"));
  FamilyAccess fa(store_.get(), [this](const std::string& t) { return Quotas(t); });
  EXPECT_TRUE(absl::IsResourceExhausted(fa.CheckImportQuota(a_)));
  EXPECT_TRUE(fa.CheckImportQuota(b_).ok());

  JobSpec big = Spec("x", Upload(b_));
  big.hparams.batch_size = 64;
  auto st = jobs_->CreateJob(big, b_).status();
  ASSERT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_THAT(std::string(st.message()), HasSubstr("max_job_batch_size=32"));
  big.hparams.batch_size = 8;
  big.hparams.max_length = 128;
  st = jobs_->CreateJob(big, b_).status();
  ASSERT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_THAT(std::string(st.message()), HasSubstr("max_sequence_length=64"));
}

TEST_F(TenantRulesTest, FamilyAccessListsSummariesAndReadsOneVersionInFull) {
  Publish("fam-a", "acme", 3);
  Publish("fam-b", "beta", 2);
  FamilyAccess fa(store_.get());
  auto versions = fa.Versions(a_, "fam-a");
  ASSERT_TRUE(versions.ok()) << versions.status();
  EXPECT_TRUE((*versions)[0].tasks.empty());
  EXPECT_EQ((*versions)[0].task_count, 3);
  EXPECT_TRUE((*fa.ListAll(admin_))[1].tasks.empty());
  EXPECT_EQ((*fa.ListAll(admin_))[1].task_count, 2);

  auto full = fa.Version(a_, "fam-a", 0);
  ASSERT_TRUE(full.ok()) << full.status();
  ASSERT_EQ((*full)->tasks.size(), 3u);
  EXPECT_EQ((*full)->tasks[2].name, "task2");
  // Versions are immutable: a second read is the cached record.
  EXPECT_EQ(fa.Version(a_, "fam-a", 1)->get(), full->get());
  // Another tenant's family and a missing version are NOT_FOUND.
  EXPECT_EQ(fa.Version(a_, "fam-b", 0).status().message(), "family 'fam-b' not found");
  EXPECT_EQ(fa.Version(a_, "fam-a", 4).status().message(),
            "family 'fam-a' has no version 4 (latest is 1)");
  EXPECT_TRUE(absl::IsInvalidArgument(fa.Version(a_, "fam-a", -1).status()));
  // Bounded: reading other versions evicts the oldest entry.
  Publish("fam-c", "acme", 1);
  Publish("fam-d", "acme", 1);
  ASSERT_TRUE(fa.Version(a_, "fam-c", 1).ok());
  ASSERT_TRUE(fa.Version(a_, "fam-d", 1).ok());
  auto again = fa.Version(a_, "fam-a", 1);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_NE(again->get(), full->get());
  EXPECT_EQ((*again)->tasks.size(), 3u);
  // A family deleted and published again under the same version number is
  // read afresh, not served from the cache.
  ASSERT_TRUE(store_->DeleteFamily("acme~fam-a").ok());
  Publish("fam-a", "acme", 5);
  auto republished = fa.Version(a_, "fam-a", 1);
  ASSERT_TRUE(republished.ok()) << republished.status();
  EXPECT_EQ((*republished)->tasks.size(), 5u);
}

TEST_F(TenantRulesTest, FamilyAccess) {
  Publish("fam-a", "acme");
  Publish("fam-b", "beta");
  FamilyAccess fa(store_.get());
  EXPECT_TRUE(fa.Versions(a_, "fam-a").ok());
  auto foreign = fa.Versions(a_, "fam-b");
  ASSERT_TRUE(absl::IsNotFound(foreign.status()));
  EXPECT_EQ(foreign.status().message(), "family 'fam-b' not found");
  EXPECT_EQ(fa.Versions(a_, "nope").status().message(), "family 'nope' not found");
  EXPECT_EQ(fa.Check(a_, "fam-b").message(), "family 'fam-b' not found");
  EXPECT_EQ(fa.Check(a_, "nope").message(), "family 'nope' not found");
  EXPECT_TRUE(fa.Check(a_, "fam-a").ok());
  EXPECT_TRUE(fa.Check(admin_, "beta~fam-b").ok());
  EXPECT_TRUE(fa.Versions(admin_, "beta~fam-b").ok());  // an admin names it by its key
  ASSERT_EQ(fa.ListAll(a_)->size(), 1u);
  EXPECT_EQ((*fa.ListAll(a_))[0].family, "acme~fam-a");  // records carry keys
  EXPECT_EQ(FamilyNameFor(a_, "acme~fam-a"), "fam-a");    // callers see names
  EXPECT_EQ(FamilyNameFor(admin_, "acme~fam-a"), "acme~fam-a");
  EXPECT_EQ(WithFamilyNamesFor(a_, "published acme~fam-a v2; beta~x"), "published fam-a v2; beta~x");
  EXPECT_EQ(fa.ListAll(admin_)->size(), 2u);
  // "" = the caller's only family, never another tenant's (keys returned).
  EXPECT_EQ(*fa.ResolveForPredict(a_, ""), "acme~fam-a");
  EXPECT_EQ(*fa.ResolveForPredict(b_, ""), "beta~fam-b");
  EXPECT_EQ(*fa.ResolveForPredict(a_, "fam-a"), "acme~fam-a");
  EXPECT_TRUE(absl::IsNotFound(fa.ResolveForPredict(Caller{"gamma", false}, "").status()));
  EXPECT_TRUE(absl::IsNotFound(fa.ResolveForPredict(b_, "fam-a").status()));
  EXPECT_EQ(*fa.ResolveForPredict(admin_, ""), "");
}

// Family names are per tenant (issue 17, hole 3): B's "x" neither sees nor
// collides with A's "x", and B's lookups answer the same whether A has one.
TEST_F(TenantRulesTest, FamilyNamesArePerTenant) {
  StartJobs();
  const std::string ds_a = Upload(a_), ds_b = Upload(b_);
  FamilyAccess fa(store_.get());
  const std::string before = std::string(fa.Versions(b_, "x").status().message());
  auto before_job = jobs_->CreateJob(Spec("x", ds_b, JobKind::kAddTask, "t2"), b_).status();
  Publish("x", "acme");
  // B: the same answers as before A had "x".
  EXPECT_EQ(std::string(fa.Versions(b_, "x").status().message()), before);
  auto after_job = jobs_->CreateJob(Spec("x", ds_b, JobKind::kAddTask, "t2"), b_).status();
  EXPECT_EQ(after_job, before_job);
  // B creates its own "x": no collision with A's.
  auto b_job = jobs_->CreateJob(Spec("x", ds_b), b_);
  ASSERT_TRUE(b_job.ok()) << b_job.status();
  EXPECT_EQ(b_job->spec.family, "x");  // the caller's name, not the key
  EXPECT_EQ(store_->GetJob(b_job->id)->spec.family, "beta~x");
  // A's "x" already exists for A.
  auto a_again = jobs_->CreateJob(Spec("x", ds_a), a_);
  EXPECT_TRUE(absl::IsAlreadyExists(a_again.status())) << a_again.status();
  // A non-admin cannot reach a key with '~', whatever its tenant.
  for (const Caller& c : {b_, Caller{"default", false}}) {
    EXPECT_TRUE(absl::IsNotFound(fa.Versions(c, "acme~x").status()));
    EXPECT_NE(FamilyKeyFor(c, "acme~x"), "acme~x");
    auto st = jobs_->CreateJob(Spec("acme~x", ds_b, JobKind::kAddTask, "t3"), c).status();
    EXPECT_FALSE(st.ok());
    EXPECT_FALSE(absl::IsAlreadyExists(st)) << st;
  }
}

}  // namespace
}  // namespace metatt
