#include "server/registry/adapter_registry.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <random>
#include <stdexcept>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "adapters/family_io.h"
#include "base/file_io.h"
#include "server/runtime/predictor.h"
#include "server/runtime/scheduler.h"
#include "server/registry/test_family.h"
#include "server/registry/test_fixture.h"
#include "server/registry/test_util.h"
#include "server/training/test_util.h"

namespace metatt {
namespace {

using ::testing::HasSubstr;
using testing_util::InMemoryStore;
using testing_util::RandomFamily;
using testing_util::ScratchDir;

std::unique_ptr<AdapterRegistry> MakeRegistry(const std::string& dir, Store* store,
                                              const std::string& fp = "fp-1",
                                              BlobStore* blobs = nullptr) {
  AdapterRegistry::Options o;
  o.data_dir = dir;
  o.blobs = blobs;
  o.base_model_fingerprint = fp;
  auto r = AdapterRegistry::Create(o, store);
  EXPECT_TRUE(r.ok()) << r.status();
  return std::move(*r);
}

class AdapterRegistryTest : public testing_util::ScratchStoreTest {};

TEST_F(AdapterRegistryTest, PublishWritesVersionAndResolves) {
  auto reg = MakeRegistry(dir_.path(), &store_);
  auto v1 = reg->Publish(RandomFamily("fam", 6, TinyBertConfig(), 1));
  ASSERT_TRUE(v1.ok()) << v1.status();
  EXPECT_EQ((*v1)->version(), 1);
  EXPECT_EQ((*v1)->num_tasks(), 6);
  // Heads are stacked: one tensor for every task, padded to the widest head.
  EXPECT_EQ((*v1)->head_weight.sizes().vec(), (std::vector<int64_t>{6, 4, 16}));
  EXPECT_TRUE(std::filesystem::exists(dir_.path() + "/families/fam/v1/cores.safetensors"));
  EXPECT_TRUE(std::filesystem::exists(dir_.path() + "/families/fam/v1/family.json"));
  auto recs = store_.ListFamilyVersions("fam");
  ASSERT_TRUE(recs.ok());
  ASSERT_EQ(recs->size(), 1u);
  EXPECT_EQ((*recs)[0].tasks.size(), 6u);
  EXPECT_EQ((*recs)[0].form, "4+1d");
  EXPECT_GT((*recs)[0].adapter_parameters, 0);

  auto r = reg->Resolve("fam", 0, "task3", -1);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->task, 3);
  r = reg->Resolve("", 0, "", 5);  // the only family, by index
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->task, 5);
  EXPECT_EQ(reg->Resolve("fam", 0, "nope", -1).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(reg->Resolve("fam", 0, "", 6).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(reg->Resolve("other", 0, "task0", -1).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(reg->Resolve("fam", 7, "task0", -1).status().code(), absl::StatusCode::kNotFound);

  // Version 2 replaces the latest at once; version 1 stays reachable.
  auto v2 = reg->Publish(RandomFamily("fam", 7, TinyBertConfig(), 2));
  ASSERT_TRUE(v2.ok()) << v2.status();
  EXPECT_EQ((*v2)->version(), 2);
  r = reg->Resolve("fam", 0, "task6", -1);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->family->version(), 2);
  r = reg->Resolve("fam", 1, "task5", -1);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->family->version(), 1);
  EXPECT_EQ(reg->Resolve("fam", 1, "task6", -1).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(reg->ResidentTasks(), 7);
  // No temporary directories left behind.
  for (const auto& e : std::filesystem::directory_iterator(dir_.path() + "/families/fam")) {
    EXPECT_THAT(e.path().filename().string(), ::testing::StartsWith("v"));
  }
}

TEST_F(AdapterRegistryTest, LoadAllRestoresLatestVersions) {
  std::shared_ptr<const PublishedFamily> published;
  {
    auto reg = MakeRegistry(dir_.path(), &store_);
    ASSERT_TRUE(reg->Publish(RandomFamily("a", 3, TinyBertConfig(), 1)).ok());
    auto p = reg->Publish(RandomFamily("a", 5, TinyBertConfig(), 2));
    ASSERT_TRUE(p.ok());
    published = *p;
    ASSERT_TRUE(reg->Publish(RandomFamily("b", 2, TinyBertConfig(), 3)).ok());
  }
  auto reg = MakeRegistry(dir_.path(), &store_);
  auto warnings = reg->LoadAll();
  ASSERT_TRUE(warnings.ok()) << warnings.status();
  EXPECT_TRUE(warnings->empty());
  EXPECT_EQ(reg->Latest().size(), 2u);
  auto a = reg->Get("a");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ((*a)->version(), 2);
  EXPECT_EQ((*a)->num_tasks(), 5);
  EXPECT_TRUE(torch::equal((*a)->head_weight, published->head_weight));
  EXPECT_TRUE(torch::equal((*a)->head_bias, published->head_bias));
  auto pa = published->adapter->NamedParameters();
  auto la = (*a)->adapter->NamedParameters();
  ASSERT_EQ(pa.size(), la.size());
  for (size_t i = 0; i < pa.size(); ++i) {
    EXPECT_EQ(pa[i].first, la[i].first);
    EXPECT_TRUE(torch::equal(pa[i].second, la[i].second)) << pa[i].first;
  }
  EXPECT_EQ((*a)->record.tasks[4].name, "task4");
  EXPECT_TRUE((*a)->record.tasks[4].regression);
  EXPECT_EQ((*a)->record.tasks[1].label_names, (std::vector<std::string>{"L0", "L1", "L2"}));
  // Several families: the family must be named.
  EXPECT_EQ(reg->Resolve("", 0, "task0", -1).status().code(),
            absl::StatusCode::kInvalidArgument);
  // The next publish continues the numbering.
  auto v3 = reg->Publish(RandomFamily("a", 5, TinyBertConfig(), 4));
  ASSERT_TRUE(v3.ok());
  EXPECT_EQ((*v3)->version(), 3);
}

// Two replicas on one store and one data directory: what one publishes the
// other serves after Refresh(); a family deleted from the store is dropped.
TEST_F(AdapterRegistryTest, RefreshSeesVersionsPublishedByAnotherReplica) {
  auto a = MakeRegistry(dir_.path(), &store_);
  auto b = MakeRegistry(dir_.path(), &store_);
  ASSERT_TRUE(a->Publish(RandomFamily("fam", 2, TinyBertConfig(), 1)).ok());
  EXPECT_EQ(b->Resolve("fam", 0, "task1", -1).status().code(), absl::StatusCode::kNotFound);
  auto changed = b->Refresh();
  ASSERT_TRUE(changed.ok()) << changed.status();
  EXPECT_THAT(*changed, ::testing::ElementsAre("fam v1"));
  auto r = b->Resolve("fam", 0, "task1", -1);
  ASSERT_TRUE(r.ok()) << r.status();
  std::shared_ptr<const PublishedFamily> held = r->family;  // an in-flight request
  EXPECT_TRUE(b->Refresh()->empty());                      // nothing new: no reload

  ASSERT_TRUE(a->Publish(RandomFamily("fam", 3, TinyBertConfig(), 2)).ok());
  EXPECT_THAT(*b->Refresh(), ::testing::ElementsAre("fam v2"));
  r = b->Resolve("fam", 0, "task2", -1);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->family->version(), 2);
  EXPECT_EQ(held->version(), 1);  // the swapped-out version stays valid for its holders

  ASSERT_TRUE(store_.DeleteFamily("fam").ok());
  EXPECT_THAT(*b->Refresh(), ::testing::ElementsAre("-fam"));
  EXPECT_EQ(b->Resolve("fam", 0, "task0", -1).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(AdapterRegistryTest, OtherBaseModelIsSkippedWithWarning) {
  {
    auto reg = MakeRegistry(dir_.path(), &store_, "fp-1");
    ASSERT_TRUE(reg->Publish(RandomFamily("a", 2, TinyBertConfig(), 1)).ok());
  }
  auto reg = MakeRegistry(dir_.path(), &store_, "fp-2");
  auto warnings = reg->LoadAll();
  ASSERT_TRUE(warnings.ok());
  ASSERT_EQ(warnings->size(), 1u);
  EXPECT_THAT((*warnings)[0], HasSubstr("another base model"));
  EXPECT_TRUE(reg->Latest().empty());
}

TEST_F(AdapterRegistryTest, StartRemovesScratchDirsOfDeadProcessesOnly) {
  char host[256] = {0};
  ASSERT_EQ(::gethostname(host, sizeof(host) - 1), 0);
  namespace fs = std::filesystem;
  const fs::path fam = fs::path(dir_.path()) / "families" / "f";
  // A publication of this host's process that died (pid beyond pid_max), an
  // import scratch dir of it, a live process's publication, and a fresh one
  // of another replica (another host): only the first two are leftovers.
  const fs::path dead = fam / (std::string(".tmp-v2-") + host + "-999999999");
  const fs::path dead_import =
      fs::path(dir_.path()) / "families" / (std::string(".import-") + host + "-999999999-0");
  const fs::path live = fam / (std::string(".tmp-v3-") + host + "-" + std::to_string(getppid()));
  const fs::path other = fam / ".tmp-v4-another-host-1";
  for (const auto& p : {dead, dead_import, live, other}) {
    fs::create_directories(p);
    ASSERT_TRUE(WriteFileAtomically((p / "family.json").string(), "{").ok());
  }
  auto reg = MakeRegistry(dir_.path(), &store_);
  EXPECT_FALSE(fs::exists(dead));
  EXPECT_FALSE(fs::exists(dead_import));
  EXPECT_TRUE(fs::exists(live));
  EXPECT_TRUE(fs::exists(other));
}

TEST_F(AdapterRegistryTest, RejectsBadRequests) {
  auto reg = MakeRegistry(dir_.path(), &store_);
  auto req = RandomFamily("../evil", 2, TinyBertConfig(), 1);
  EXPECT_EQ(reg->Publish(req).status().code(), absl::StatusCode::kInvalidArgument);
  req = RandomFamily("ok", 2, TinyBertConfig(), 1);
  req.head_weights.pop_back();
  EXPECT_EQ(reg->Publish(req).status().code(), absl::StatusCode::kInvalidArgument);
  req = RandomFamily("ok", 2, TinyBertConfig(), 1);
  req.tasks[1].name = "task0";  // duplicate
  EXPECT_THAT(reg->Publish(req).status().message(), HasSubstr("duplicate task name task0"));
  auto recs = store_.ListFamilyVersions("");
  ASSERT_TRUE(recs.ok());
  EXPECT_TRUE(recs->empty());
  EXPECT_FALSE(std::filesystem::exists(dir_.path() + "/families/ok/v1"));
}

TEST_F(AdapterRegistryTest, DeleteTaskPublishesVersionWithoutIt) {
  auto reg = MakeRegistry(dir_.path(), &store_);
  auto v1 = reg->Publish(RandomFamily("fam", 4, TinyBertConfig(), 1));
  ASSERT_TRUE(v1.ok());
  auto v2 = reg->DeleteTask("fam", "task1");
  ASSERT_TRUE(v2.ok()) << v2.status();
  EXPECT_EQ((*v2)->version(), 2);
  ASSERT_EQ((*v2)->num_tasks(), 3);
  EXPECT_EQ((*v2)->record.tasks[0].name, "task0");
  EXPECT_EQ((*v2)->record.tasks[1].name, "task2");  // moved down one index
  EXPECT_EQ((*v2)->record.tasks[1].index, 1);
  EXPECT_EQ((*v2)->adapter->num_tasks(), 3);
  // The moved task keeps its slice and head.
  auto old_slice = (*v1)->adapter->NamedParameters();
  auto new_slice = (*v2)->adapter->NamedParameters();
  auto find = [](const auto& named, const std::string& n) {
    for (const auto& [k, v] : named) {
      if (k == n) return v;
    }
    return torch::Tensor();
  };
  EXPECT_TRUE(torch::equal(find(old_slice, "task.2"), find(new_slice, "task.1")));
  EXPECT_TRUE(torch::equal((*v1)->TaskHeadTensors(2).first, (*v2)->TaskHeadTensors(1).first));
  EXPECT_EQ(reg->DeleteTask("fam", "task1").status().code(), absl::StatusCode::kNotFound);
  ASSERT_TRUE(reg->DeleteTask("fam", "task0").ok());
  ASSERT_TRUE(reg->DeleteTask("fam", "task2").ok());
  EXPECT_EQ(reg->DeleteTask("fam", "task3").status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST_F(AdapterRegistryTest, ExportImportRoundTrip) {
  auto reg = MakeRegistry(dir_.path(), &store_);
  auto v1 = reg->Publish(RandomFamily("fam", 3, TinyBertConfig(), 1));
  ASSERT_TRUE(v1.ok());
  auto files = reg->ExportFiles("fam", 0);
  ASSERT_TRUE(files.ok()) << files.status();
  EXPECT_EQ(files->size(), 2u);
  EXPECT_EQ(reg->Import("", *files).status().code(), absl::StatusCode::kAlreadyExists);
  auto copy = reg->Import("copy", *files);
  ASSERT_TRUE(copy.ok()) << copy.status();
  EXPECT_EQ((*copy)->version(), 1);
  EXPECT_EQ((*copy)->num_tasks(), 3);
  EXPECT_TRUE(torch::equal((*copy)->head_weight, (*v1)->head_weight));
  ScratchDir other_dir;
  auto other = MakeRegistry(other_dir.path(), &store_, "fp-other");
  EXPECT_EQ(other->Import("x", *files).status().code(), absl::StatusCode::kFailedPrecondition);
  (*files)["family.json"] = "{";
  EXPECT_EQ(reg->Import("y", *files).status().code(), absl::StatusCode::kInvalidArgument);
}

// A LoRA family (form "lora"): published, served through the seam, reloaded,
// exported as a PEFT folder, imported back (also without family.json), a task
// deleted; every copy holds the same factors and heads.
void ExpectSameLora(const LoraAdapter& a, const LoraAdapter& b) {
  ASSERT_EQ(a.factors().size(), b.factors().size());
  for (const auto& [k, f] : a.factors()) {
    ASSERT_TRUE(b.factors().count(k));
    EXPECT_TRUE(torch::equal(f.a.cpu(), b.factors().at(k).a.cpu()));
    EXPECT_TRUE(torch::equal(f.b.cpu(), b.factors().at(k).b.cpu()));
  }
  EXPECT_EQ(a.scale(), b.scale());
}

TEST_F(AdapterRegistryTest, LoraFamilyPublishesReloadsExportsImportsAndDeletesTasks) {
  auto reg = MakeRegistry(dir_.path(), &store_);
  LoraConfig c;
  c.rank = 2;
  c.alpha = 4;
  c.projections = {Projection::kQuery, Projection::kValue, Projection::kFfnDown};
  c.num_layers = 2;
  c.hidden_size = 16;
  c.intermediate_size = 32;
  c.init = "random";
  LoraAdapter::Options lo;
  lo.seed = 3;
  auto lora = LoraAdapter::Create(c, lo);
  ASSERT_TRUE(lora.ok()) << lora.status();
  PublishRequest req;
  req.family = "lf";
  req.lora = lora->get();
  for (const char* name : {"t0", "t1"}) {
    TaskRecord t;
    t.name = name;
    t.label_names = {"a", "b", "c"};
    req.tasks.push_back(t);
    req.head_weights.push_back(torch::randn({3, 16}));
    req.head_biases.push_back(torch::randn({3}));
  }
  auto v1 = reg->Publish(req);
  ASSERT_TRUE(v1.ok()) << v1.status();
  ASSERT_TRUE((*v1)->adapter.is_lora());
  EXPECT_EQ((*v1)->record.form, "lora");
  EXPECT_EQ((*v1)->record.adapter_parameters, (*lora)->NumParameters());
  EXPECT_TRUE(std::filesystem::exists(dir_.path() + "/families/lf/v1/adapter_config.json"));
  ExpectSameLora(**lora, *(*v1)->adapter.lora());
  // Served through the seam: the same deltas as the trained adapter.
  {
    torch::NoGradGuard ng;
    torch::Tensor x = torch::randn({2, 3, 32});
    auto want = (*lora)->Deltas(1, x, {Projection::kFfnDown}, {});
    auto got = (*v1)->adapter.get()->Deltas(1, x, {Projection::kFfnDown}, {});
    EXPECT_TRUE(torch::allclose(want[0], got[0]));
  }
  auto r = reg->Resolve("lf", 0, "t1", -1);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->task, 1);

  // A restart reloads it.
  auto reg2 = MakeRegistry(dir_.path(), &store_);
  ASSERT_TRUE(reg2->LoadAll().ok());
  auto again = reg2->Get("lf", 0);
  ASSERT_TRUE(again.ok()) << again.status();
  ASSERT_TRUE((*again)->adapter.is_lora());
  ExpectSameLora(**lora, *(*again)->adapter.lora());
  EXPECT_TRUE(torch::equal((*again)->head_weight, (*v1)->head_weight));
  EXPECT_EQ((*again)->record.tasks[0].label_names, (std::vector<std::string>{"a", "b", "c"}));

  // Export: a PEFT folder and our files; import it back, and without family.json.
  auto files = reg->ExportFiles("lf", 0);
  ASSERT_TRUE(files.ok()) << files.status();
  std::vector<std::string> names;
  for (const auto& [n, b] : *files) names.push_back(n);
  EXPECT_EQ(names, (std::vector<std::string>{"adapter_config.json", "adapter_model.safetensors",
                                             "family.json", "heads.safetensors"}));
  auto copy = reg->Import("lf-copy", *files);
  ASSERT_TRUE(copy.ok()) << copy.status();
  ExpectSameLora(**lora, *(*copy)->adapter.lora());
  EXPECT_TRUE(torch::equal((*copy)->head_weight, (*v1)->head_weight));
  auto peft_only = *files;
  peft_only.erase("family.json");
  EXPECT_THAT(std::string(reg->Import("", peft_only).status().message()), HasSubstr("family"));
  auto bare = reg->Import("lf-bare", peft_only);
  ASSERT_TRUE(bare.ok()) << bare.status();
  EXPECT_EQ((*bare)->num_tasks(), 2);
  EXPECT_EQ((*bare)->record.tasks[1].num_labels, 3);
  auto no_heads = peft_only;
  no_heads.erase("heads.safetensors");
  auto st = reg->Import("lf-x", no_heads).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(st.message()), HasSubstr("heads.safetensors"));

  // DeleteTask keeps the LoRA and drops one head.
  auto v2 = reg->DeleteTask("lf", "t0");
  ASSERT_TRUE(v2.ok()) << v2.status();
  ASSERT_TRUE((*v2)->adapter.is_lora());
  EXPECT_EQ((*v2)->num_tasks(), 1);
  EXPECT_TRUE(torch::equal((*v2)->head_weight[0], (*v1)->head_weight[1]));
}

// One on-disk format: adapters/family_io. A family written by the library
// (as metatt-train writes it: per-task heads) imports into the registry, and
// a published version loads with LoadFamily.
std::map<std::string, std::string> ReadFamilyFiles(const std::string& dir) {
  std::map<std::string, std::string> files;
  for (const char* n : {kFamilyCoresFile, kFamilyMetaFile}) {
    auto b = ReadFileToString(dir + "/" + n);
    EXPECT_TRUE(b.ok()) << b.status();
    files[n] = *b;
  }
  return files;
}

void ExpectSameCores(const MetaTTAdapter& a, const MetaTTAdapter& b) {
  auto pa = a.NamedParameters(), pb = b.NamedParameters();
  ASSERT_EQ(pa.size(), pb.size());
  for (size_t i = 0; i < pa.size(); ++i) {
    EXPECT_EQ(pa[i].first, pb[i].first);
    EXPECT_TRUE(torch::equal(pa[i].second.cpu(), pb[i].second.cpu())) << pa[i].first;
  }
}

TEST_F(AdapterRegistryTest, LibraryFamilyImportsAndPublishedVersionLoadsWithLoadFamily) {
  auto reg = MakeRegistry(dir_.path(), &store_);
  const BertConfig base = TinyBertConfig();
  PublishRequest spec = RandomFamily("unused", 2, base, 4);
  auto lib = MetaTTAdapter::FromTensors(spec.config, spec.scale, spec.adapter_tensors);
  ASSERT_TRUE(lib.ok()) << lib.status();
  std::map<std::string, torch::Tensor> heads = {
      {"sst2.weight", torch::randn({3, base.hidden_size})}, {"sst2.bias", torch::randn({3})},
      {"stsb.weight", torch::randn({1, base.hidden_size})}, {"stsb.bias", torch::randn({1})}};
  ScratchDir lib_dir;
  ASSERT_TRUE(
      SaveFamily(lib_dir.path(), **lib, {"sst2", "stsb"}, heads, "models/tiny", "fp-1").ok());

  auto imported = reg->Import("lib", ReadFamilyFiles(lib_dir.path()));
  ASSERT_TRUE(imported.ok()) << imported.status();
  const auto& fam = **imported;
  EXPECT_EQ(fam.num_tasks(), 2);
  EXPECT_EQ(fam.task_by_name.at("stsb"), 1);
  EXPECT_EQ(fam.record.tasks[0].num_labels, 3);
  EXPECT_FALSE(fam.record.tasks[0].regression);
  EXPECT_TRUE(fam.record.tasks[1].regression);  // one output, no registry record
  EXPECT_TRUE(torch::equal(fam.TaskHeadTensors(0).first, heads["sst2.weight"]));
  EXPECT_TRUE(torch::equal(fam.TaskHeadTensors(1).second, heads["stsb.bias"]));
  ExpectSameCores(*fam.adapter, **lib);
  // Another base model is refused by the library's fingerprint check.
  ScratchDir other_dir;
  auto other = MakeRegistry(other_dir.path(), &store_, "fp-other");
  EXPECT_EQ(other->Import("lib", ReadFamilyFiles(lib_dir.path())).status().code(),
            absl::StatusCode::kFailedPrecondition);

  // Registry -> library: the published directory is a family_io family.
  auto pub = reg->Publish(RandomFamily("fam", 4, base, 6));
  ASSERT_TRUE(pub.ok()) << pub.status();
  auto loaded = LoadFamily((*pub)->record.path, "fp-1");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ASSERT_EQ(loaded->task_names.size(), 4u);
  EXPECT_EQ(loaded->task_names[3], "task3");
  EXPECT_EQ(loaded->extra.value("pooling", ""), "mean");
  for (int64_t t = 0; t < 4; ++t) {
    auto h = FamilyTaskHead(*loaded, t);
    ASSERT_TRUE(h.ok()) << h.status();
    EXPECT_TRUE(torch::equal(h->first, (*pub)->TaskHeadTensors(t).first));
    EXPECT_TRUE(torch::equal(h->second, (*pub)->TaskHeadTensors(t).second));
  }
  ExpectSameCores(*loaded->adapter, *(*pub)->adapter);
  EXPECT_EQ(LoadFamily((*pub)->record.path, "fp-other").status().code(),
            absl::StatusCode::kFailedPrecondition);

  // metatt-train --base_family on a published family: stacked heads for the
  // old tasks plus per-task heads for the new one; imports with all heads.
  ASSERT_TRUE(loaded->adapter->AddTask().ok());
  auto names = loaded->task_names;
  names.push_back("new");
  auto ext_heads = loaded->heads;
  ext_heads["new.weight"] = torch::randn({2, base.hidden_size});
  ext_heads["new.bias"] = torch::randn({2});
  ScratchDir ext_dir;
  ASSERT_TRUE(SaveFamily(ext_dir.path(), *loaded->adapter, names, ext_heads, "m", "fp-1").ok());
  auto ext = reg->Import("extended", ReadFamilyFiles(ext_dir.path()));
  ASSERT_TRUE(ext.ok()) << ext.status();
  EXPECT_EQ((*ext)->num_tasks(), 5);
  EXPECT_TRUE(torch::equal((*ext)->TaskHeadTensors(4).first, ext_heads["new.weight"]));
  EXPECT_TRUE(torch::equal((*ext)->TaskHeadTensors(2).first, (*pub)->TaskHeadTensors(2).first));

  // A fresh registry on the same store reloads every version from disk.
  auto again = MakeRegistry(dir_.path(), &store_);
  auto warnings = again->LoadAll();
  ASSERT_TRUE(warnings.ok());
  EXPECT_TRUE(warnings->empty());
  auto reloaded = again->Get("extended", 0);
  ASSERT_TRUE(reloaded.ok()) << reloaded.status();
  EXPECT_TRUE(torch::equal((*reloaded)->head_weight, (*ext)->head_weight));
}

// A registry keeping its heads in `head_dtype`, with `publish` published
// when given; null (and a test failure) when either fails.
std::unique_ptr<AdapterRegistry> MakeRegistryWithHeads(const std::string& dir, Store* store,
                                                       const std::string& head_dtype,
                                                       const PublishRequest* publish = nullptr) {
  AdapterRegistry::Options o;
  o.data_dir = dir;
  o.base_model_fingerprint = "fp-1";
  o.head_dtype = head_dtype;
  auto r = AdapterRegistry::Create(o, store);
  EXPECT_TRUE(r.ok()) << r.status();
  if (!r.ok()) return nullptr;
  if (publish != nullptr) {
    auto published = (*r)->Publish(*publish);
    EXPECT_TRUE(published.ok()) << published.status();
    if (!published.ok()) return nullptr;
  }
  return std::move(*r);
}

// DeleteTask(family, task), then the files of the version it published
// loaded back from disk (not the registry's resident copy); that version in
// `*published` when given.
absl::StatusOr<LoadedFamily> DeleteTaskAndLoad(
    AdapterRegistry* reg, const std::string& family, const std::string& task,
    std::shared_ptr<const PublishedFamily>* published = nullptr) {
  auto v = reg->DeleteTask(family, task);
  if (!v.ok()) return v.status();
  if (published != nullptr) *published = *v;
  return LoadFamily((*v)->record.path, "fp-1");
}

// Task `t`'s head in `family` is exactly (`weight`, `bias`).
void ExpectExactHead(const LoadedFamily& family, int64_t t, const torch::Tensor& weight,
                     const torch::Tensor& bias) {
  auto h = FamilyTaskHead(family, t);
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_TRUE(torch::equal(h->first, weight)) << "task " << t;
  EXPECT_TRUE(torch::equal(h->second, bias)) << "task " << t;
}

TEST_F(AdapterRegistryTest, InvalidHeadDtypeIsRefusedNamingIt) {
  for (const std::string bad : {"float8", "fp16", ""}) {
    AdapterRegistry::Options o;
    o.data_dir = dir_.path();
    o.head_dtype = bad;
    auto r = AdapterRegistry::Create(o, &store_);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(r.status().message(), HasSubstr("head_dtype"));
    EXPECT_THAT(r.status().message(), HasSubstr("'" + bad + "'"));
  }
  for (const std::string good : {"float32", "float16", "bfloat16"}) {
    EXPECT_TRUE(ParseHeadDtype(good).ok()) << good;
  }
}

// float16 heads: half the resident head bytes, the same predictions (within
// float16 rounding) through the scheduler the server uses, and float32 files.
TEST_F(AdapterRegistryTest, Float16HeadsHalveBytesAndPredictLikeFloat32) {
  auto encoder = testing_util::TinyEncoder(5);
  ASSERT_NE(encoder, nullptr);
  ScratchDir dir32, dir16;
  InMemoryStore store32, store16;
  auto reg32 = MakeRegistryWithHeads(dir32.path(), &store32, "float32");
  auto reg16 = MakeRegistryWithHeads(dir16.path(), &store16, "float16");
  ASSERT_NE(reg32, nullptr);
  ASSERT_NE(reg16, nullptr);
  constexpr int64_t kTasks = 12;
  const PublishRequest req = RandomFamily("fam", kTasks, encoder->config(), 9);
  auto f32 = reg32->Publish(req);
  auto f16 = reg16->Publish(req);
  ASSERT_TRUE(f32.ok()) << f32.status();
  ASSERT_TRUE(f16.ok()) << f16.status();
  EXPECT_EQ((*f32)->head_weight.scalar_type(), torch::kFloat32);
  EXPECT_EQ((*f16)->head_weight.scalar_type(), torch::kFloat16);
  EXPECT_EQ((*f16)->head_bias.scalar_type(), torch::kFloat16);
  const ResidentStats b32 = reg32->ResidentBytes(), b16 = reg16->ResidentBytes();
  // The whole head storage counts, spare rows for added tasks included
  // (~3 %, at least 8 rows).
  const auto& hs = *(*f32)->head_storage;
  EXPECT_EQ(b32.heads, hs.weight.numel() * 4 + hs.bias.numel() * 4);
  EXPECT_EQ(hs.weight.size(0), kTasks + std::clamp<int64_t>(kTasks / 32, 8, 32768));
  EXPECT_EQ(b16.heads * 2, b32.heads);
  EXPECT_EQ(b16.task_records, b32.task_records);
  EXPECT_GT(b32.task_records, 0);
  // The compact name index: a few bytes per task, not a string per task.
  EXPECT_GT(b32.name_index, 0);
  EXPECT_LE(b32.name_index, 16 * kTasks);

  // Published files hold the float32 heads exactly, whatever head_dtype.
  for (const auto* fam : {&*f32, &*f16}) {
    auto loaded = LoadFamily((*fam)->record.path, "fp-1");
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    for (int64_t t = 0; t < kTasks; ++t) {
      auto h = FamilyTaskHead(*loaded, t);
      ASSERT_TRUE(h.ok()) << h.status();
      EXPECT_TRUE(torch::equal(h->first, req.head_weights[t])) << t;
      EXPECT_TRUE(torch::equal(h->second, req.head_biases[t])) << t;
    }
    auto exact = (*fam)->ExactHeads();
    ASSERT_TRUE(exact.ok()) << exact.status();
    EXPECT_TRUE(torch::equal(exact->first, (*f32)->head_weight));
    EXPECT_TRUE(torch::equal(exact->second, (*f32)->head_bias));
  }
  // The resident float16 copy is rounded (the test would pass vacuously if
  // the heads were exactly representable).
  EXPECT_FALSE(torch::equal((*f16)->TaskHeadTensors(0).first, req.head_weights[0]));

  // Same fixed inputs through the server's scheduler + predictor.
  std::vector<PredictInput> inputs;
  std::mt19937_64 rng(11);
  for (int i = 0; i < 48; ++i) {
    PredictInput in;
    in.family = "fam";
    in.task_index = i % kTasks;
    in.text = testing_util::RandomSentence(rng);
    inputs.push_back(in);
  }
  std::vector<std::vector<PredictOutput>> outs;
  for (AdapterRegistry* reg : {reg32.get(), reg16.get()}) {
    auto sched = DeviceScheduler::Create(DeviceScheduler::Options(), encoder);
    ASSERT_TRUE(sched.ok()) << sched.status();
    ScheduledPredictor p(ScheduledPredictor::Options(), reg, sched->get(),
                         testing_util::TinyTokenizer());
    auto out = p.Predict(inputs, 0);
    ASSERT_TRUE(out.ok()) << out.status();
    outs.push_back(std::move(*out));
    (*sched)->Shutdown();
  }
  ASSERT_EQ(outs[0].size(), inputs.size());
  ASSERT_EQ(outs[1].size(), inputs.size());
  double max_rel = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const PredictOutput &a = outs[0][i], &b = outs[1][i];
    EXPECT_EQ(a.label, b.label) << i;
    EXPECT_EQ(a.label_name, b.label_name) << i;
    ASSERT_EQ(a.scores.size(), b.scores.size()) << i;
    for (size_t j = 0; j < a.scores.size(); ++j) {
      // Relative to the float32 score (regression outputs near 0: to 0.1).
      const double denom = std::max(0.1, std::abs(static_cast<double>(a.scores[j])));
      const double rel = std::abs(static_cast<double>(a.scores[j]) - b.scores[j]) / denom;
      max_rel = std::max(max_rel, rel);
      EXPECT_LE(rel, 1e-2) << "input " << i << " score " << j;
    }
  }
  EXPECT_GT(max_rel, 0.0);  // the float16 heads were really used
}

// Republishing from a float16 registry (DeleteTask; reload with LoadAll)
// starts from the float32 heads on disk, not the rounded resident copy.
TEST_F(AdapterRegistryTest, Float16RegistryRepublishesExactFloat32Heads) {
  const PublishRequest req = RandomFamily("fam", 5, TinyBertConfig(), 4);
  // Published by one registry, closed, reloaded by the next.
  ASSERT_NE(MakeRegistryWithHeads(dir_.path(), &store_, "float16", &req), nullptr);
  auto reg = MakeRegistryWithHeads(dir_.path(), &store_, "float16");
  ASSERT_NE(reg, nullptr);
  auto warnings = reg->LoadAll();
  ASSERT_TRUE(warnings.ok()) << warnings.status();
  auto v1 = reg->Get("fam");
  ASSERT_TRUE(v1.ok()) << v1.status();
  EXPECT_EQ((*v1)->head_weight.scalar_type(), torch::kFloat16);
  std::shared_ptr<const PublishedFamily> v2;
  auto loaded = DeleteTaskAndLoad(reg.get(), "fam", "task1", &v2);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  const std::vector<int64_t> kept = {0, 2, 3, 4};
  for (size_t t = 0; t < kept.size(); ++t) {
    ExpectExactHead(*loaded, static_cast<int64_t>(t), req.head_weights[kept[t]],
                    req.head_biases[kept[t]]);
  }
  EXPECT_EQ(v2->task_by_name.at("task2"), 1);
  EXPECT_EQ(v2->task_by_name.count("task1"), 0u);
}

// An add-task publication: only the new slice + head, on top of v`base`.
AppendRequest AppendOne(const std::string& family, int64_t base, const std::string& task,
                        int64_t num_labels, uint64_t seed) {
  torch::manual_seed(seed);
  AppendRequest req;
  req.family = family;
  req.base_version = base;
  req.task_slices = torch::randn({1, 4, 4});
  TaskRecord r;
  r.name = task;
  r.num_labels = num_labels;
  for (int64_t l = 0; l < num_labels; ++l) r.label_names.push_back(absl::StrCat("L", l));
  req.tasks.push_back(r);
  req.head_weights.push_back(torch::randn({num_labels, TinyBertConfig().hidden_size}));
  req.head_biases.push_back(torch::randn({num_labels}));
  req.created_by_job = "job-" + task;
  return req;
}

// The served family equals one published in full with the same tensors.
void ExpectSameFamily(const PublishedFamily& a, const PublishedFamily& b) {
  ASSERT_EQ(a.num_tasks(), b.num_tasks());
  EXPECT_TRUE(torch::equal(a.head_weight.to(torch::kFloat32), b.head_weight.to(torch::kFloat32)));
  EXPECT_TRUE(torch::equal(a.head_bias.to(torch::kFloat32), b.head_bias.to(torch::kFloat32)));
  auto pa = a.adapter->NamedParameters();
  auto pb = b.adapter->NamedParameters();
  ASSERT_EQ(pa.size(), pb.size());
  for (size_t i = 0; i < pa.size(); ++i) {
    EXPECT_EQ(pa[i].first, pb[i].first);
    EXPECT_TRUE(torch::equal(pa[i].second, pb[i].second)) << pa[i].first;
  }
  for (int64_t t = 0; t < a.num_tasks(); ++t) {
    EXPECT_EQ(a.record.tasks[t].name, b.record.tasks[t].name);
    EXPECT_EQ(a.record.tasks[t].num_labels, b.record.tasks[t].num_labels);
    EXPECT_EQ(a.task_by_name.Find(a.record.tasks[t].name), t);
  }
}

TEST_F(AdapterRegistryTest, PublishAppendWritesOnlyTheNewTaskAndServesIt) {
  auto reg = MakeRegistry(dir_.path(), &store_);
  auto v1 = reg->Publish(RandomFamily("fam", 3, TinyBertConfig(), 1));
  ASSERT_TRUE(v1.ok()) << v1.status();
  const AppendRequest add = AppendOne("fam", 1, "new", 4, 7);
  auto v2 = reg->PublishAppend(add);
  ASSERT_TRUE(v2.ok()) << v2.status();
  EXPECT_EQ((*v2)->version(), 2);
  EXPECT_EQ((*v2)->num_tasks(), 4);
  // The heads of v1 were not copied: v2 reads the same storage.
  EXPECT_EQ((*v2)->head_storage, (*v1)->head_storage);
  EXPECT_TRUE(torch::equal((*v2)->head_weight.narrow(0, 0, 3), (*v1)->head_weight));
  auto h = (*v2)->TaskHeadTensors(3);
  EXPECT_TRUE(torch::equal(h.first, add.head_weights[0]));
  EXPECT_TRUE(torch::equal(h.second, add.head_biases[0]));
  EXPECT_TRUE(torch::equal((*v2)->adapter->TaskSlice(3), add.task_slices[0]));
  EXPECT_EQ((*v1)->num_tasks(), 3);  // the older version is unchanged
  auto r = reg->Resolve("fam", 0, "new", -1);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->task, 3);
  // The Store holds only the appended task; the whole list is rebuilt.
  auto rec = store_.GetFamilyVersion("fam", 2);
  ASSERT_TRUE(rec.ok());
  EXPECT_EQ(rec->parent_version, 1);
  ASSERT_EQ(rec->tasks.size(), 1u);
  EXPECT_EQ(rec->tasks[0].index, 3);
  EXPECT_EQ(rec->task_count, 4);
  auto full = store_.GetFamilyVersionFull("fam", 2);
  ASSERT_TRUE(full.ok());
  ASSERT_EQ(full->tasks.size(), 4u);
  EXPECT_EQ(full->tasks[3].name, "new");
  // The version directory holds only the appended tensors.
  EXPECT_TRUE(std::filesystem::exists(std::filesystem::path(rec->path) / kAppendedTensorsFile));
  EXPECT_FALSE(FamilyCatalog::HoldsFullFamily(rec->path));
}

TEST_F(AdapterRegistryTest, PublishAppendRefusesAStaleBaseOrADuplicateName) {
  auto reg = MakeRegistry(dir_.path(), &store_);
  ASSERT_TRUE(reg->Publish(RandomFamily("fam", 2, TinyBertConfig(), 1)).ok());
  ASSERT_TRUE(reg->PublishAppend(AppendOne("fam", 1, "x", 2, 1)).ok());
  // A second job that also trained on v1: the family moved on.
  auto stale = reg->PublishAppend(AppendOne("fam", 1, "y", 2, 2));
  EXPECT_EQ(stale.status().code(), absl::StatusCode::kFailedPrecondition) << stale.status();
  EXPECT_THAT(std::string(stale.status().message()), HasSubstr("v2"));
  auto dup = reg->PublishAppend(AppendOne("fam", 2, "task0", 2, 3));
  EXPECT_EQ(dup.status().code(), absl::StatusCode::kAlreadyExists) << dup.status();
  EXPECT_EQ(reg->PublishAppend(AppendOne("gone", 1, "z", 2, 4)).status().code(),
            absl::StatusCode::kFailedPrecondition);
  // Nothing was published by the refused requests.
  EXPECT_EQ((*reg->Get("fam"))->version(), 2);
  EXPECT_EQ(store_.ListFamilyVersionSummaries("fam")->size(), 2u);
}

// Restart, another replica, export and compaction all see the same family.
TEST_F(AdapterRegistryTest, AppendedVersionsReloadRefreshExportAndCompact) {
  auto reg = MakeRegistry(dir_.path(), &store_);
  auto replica = MakeRegistry(dir_.path(), &store_);
  ASSERT_TRUE(reg->Publish(RandomFamily("fam", 3, TinyBertConfig(), 1)).ok());
  ASSERT_TRUE(replica->LoadAll().ok());
  int64_t version = 1;
  const int64_t n = AdapterRegistry::kCompactAfter + 2;
  for (int64_t i = 0; i < n; ++i) {
    auto v = reg->PublishAppend(AppendOne("fam", version, absl::StrCat("t", i), 2 + i % 5, 10 + i));
    ASSERT_TRUE(v.ok()) << v.status();
    version = (*v)->version();
    if (i == 2) {  // a replica applies the appended versions to the one it serves
      auto changed = replica->Refresh();
      ASSERT_TRUE(changed.ok()) << changed.status();
      ExpectSameFamily(**replica->Get("fam"), **reg->Get("fam"));
    }
  }
  auto latest = reg->Get("fam");
  ASSERT_TRUE(latest.ok());
  EXPECT_EQ((*latest)->num_tasks(), 3 + n);
  // Export of an appended version is the whole family; it imports as one.
  auto files = reg->ExportFiles("fam", 5);
  ASSERT_TRUE(files.ok()) << files.status();
  auto imported = reg->Import("copy", *files);
  ASSERT_TRUE(imported.ok()) << imported.status();
  auto v5 = reg->Get("fam", 5);
  ASSERT_TRUE(v5.ok()) << v5.status();
  ExpectSameFamily(**imported, **v5);
  // The compactor wrote a full version once the chain reached kCompactAfter.
  reg->WaitForCompactions();
  auto summaries = store_.ListFamilyVersionSummaries("fam");
  ASSERT_TRUE(summaries.ok());
  bool compacted = false;
  for (const auto& s : *summaries) {
    if (s.version > 1 && s.parent_version == 0) {
      compacted = true;
      EXPECT_TRUE(FamilyCatalog::HoldsFullFamily(s.path)) << s.version;
      auto full = store_.GetFamilyVersion("fam", s.version);
      EXPECT_EQ(static_cast<int64_t>(full->tasks.size()), full->task_count);
    }
  }
  EXPECT_TRUE(compacted);
  // A restart rebuilds the latest version from files and records.
  auto restarted = MakeRegistry(dir_.path(), &store_);
  auto warnings = restarted->LoadAll();
  ASSERT_TRUE(warnings.ok()) << warnings.status();
  EXPECT_TRUE(warnings->empty());
  ExpectSameFamily(**restarted->Get("fam"), **latest);
  ExpectSameFamily(**restarted->Get("fam", 4), **reg->Get("fam", 4));
  EXPECT_TRUE(replica->Refresh().ok());
  ExpectSameFamily(**replica->Get("fam"), **latest);
}

// Replicas without a shared directory (PostgreSQL's blob store; a
// LocalBlobStore on a third directory stands in for it): every version is
// objects under families/<family>/v<N>-<id>/ named by its record; a replica
// with its own, empty data directory loads, refreshes, exports and restarts
// from them, appended and compacted versions included.
TEST_F(AdapterRegistryTest, ReplicasWithSeparateDataDirsShareVersionsThroughTheBlobStore) {
  ScratchDir dir_a, dir_b, blob_dir;
  InMemoryStore store;
  auto blobs = LocalBlobStore::Create(blob_dir.path());
  ASSERT_TRUE(blobs.ok()) << blobs.status();
  auto a = MakeRegistry(dir_a.path(), &store, "fp-1", blobs->get());
  auto b = MakeRegistry(dir_b.path(), &store, "fp-1", blobs->get());
  ASSERT_TRUE(a->Publish(RandomFamily("fam", 3, TinyBertConfig(), 1)).ok());
  auto rec = store.GetFamilyVersion("fam", 1);
  ASSERT_TRUE(rec.ok());
  ASSERT_TRUE(IsBlobRef(rec->path)) << rec->path;
  const std::string key = BlobKeyOf(rec->path);
  EXPECT_THAT(*(*blobs)->List(key + "/"),
              ::testing::ElementsAre(key + "/cores.safetensors", key + "/family.json"));
  EXPECT_THAT(*b->Refresh(), ::testing::ElementsAre("fam v1"));
  ExpectSameFamily(**b->Get("fam"), **a->Get("fam"));
  // B's copy is a cache in its own data directory.
  EXPECT_TRUE(std::filesystem::exists(std::filesystem::path(dir_b.path()) / key / "family.json"));

  // An add-task publication on B is served by A; compaction uploads the full files.
  int64_t version = 1;
  const int64_t n = AdapterRegistry::kCompactAfter + 1;
  for (int64_t i = 0; i < n; ++i) {
    auto v = b->PublishAppend(AppendOne("fam", version, absl::StrCat("t", i), 2, 20 + i));
    ASSERT_TRUE(v.ok()) << v.status();
    version = (*v)->version();
    if (i == 0) {
      EXPECT_THAT(*a->Refresh(), ::testing::ElementsAre("fam v2"));
      ExpectSameFamily(**a->Get("fam"), **b->Get("fam"));
    }
  }
  b->WaitForCompactions();
  bool compacted = false;
  const auto summaries = store.ListFamilyVersionSummaries("fam");
  ASSERT_TRUE(summaries.ok());
  for (const auto& v : *summaries) {
    if (v.version > 1 && v.parent_version == 0) {
      compacted = true;
      EXPECT_TRUE(*(*blobs)->Exists(BlobKeyOf(v.path) + "/family.json")) << v.version;
    }
  }
  EXPECT_TRUE(compacted);
  ASSERT_TRUE(a->Refresh().ok());
  ExpectSameFamily(**a->Get("fam"), **b->Get("fam"));

  // A replica started on an empty data directory: everything from the blobs.
  ScratchDir dir_c;
  auto c = MakeRegistry(dir_c.path(), &store, "fp-1", blobs->get());
  auto warnings = c->LoadAll();
  ASSERT_TRUE(warnings.ok()) << warnings.status();
  EXPECT_TRUE(warnings->empty()) << ::testing::PrintToString(*warnings);
  ExpectSameFamily(**c->Get("fam"), **b->Get("fam"));
  ExpectSameFamily(**c->Get("fam", 3), **b->Get("fam", 3));
  auto files = c->ExportFiles("fam", 2);
  ASSERT_TRUE(files.ok()) << files.status();
  auto imported = c->Import("copy", *files);
  ASSERT_TRUE(imported.ok()) << imported.status();
  ExpectSameFamily(**imported, **b->Get("fam", 2));

  // A version whose objects are gone fails to load naming them.
  ScratchDir dir_d;
  auto d = MakeRegistry(dir_d.path(), &store, "fp-1", blobs->get());
  ASSERT_TRUE(d->LoadAll().ok());  // the latest version needs no object of v1
  const auto objects = (*blobs)->List(key + "/");
  ASSERT_TRUE(objects.ok());
  for (const auto& k : *objects) ASSERT_TRUE((*blobs)->Delete(k).ok());
  auto gone = d->Get("fam", 1);
  EXPECT_EQ(gone.status().code(), absl::StatusCode::kNotFound) << gone.status();
  EXPECT_THAT(std::string(gone.status().message()), HasSubstr(key));
}

TEST_F(AdapterRegistryTest, Float16AppendedVersionRepublishesExactFloat32Heads) {
  const PublishRequest req = RandomFamily("fam", 3, TinyBertConfig(), 4);
  auto reg = MakeRegistryWithHeads(dir_.path(), &store_, "float16", &req);
  ASSERT_NE(reg, nullptr);
  const AppendRequest add = AppendOne("fam", 1, "new", 3, 5);
  ASSERT_TRUE(reg->PublishAppend(add).ok());
  // ExactHeads of an appended version reads v1's files, then v2's.
  auto loaded = DeleteTaskAndLoad(reg.get(), "fam", "task1");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ExpectExactHead(*loaded, 2, add.head_weights[0], add.head_biases[0]);  // task0, task2, new
}

TEST(TaskNameIndexTest, FindsEveryNameAndRejectsDuplicates) {
  std::vector<TaskRecord> tasks(1000);
  for (size_t i = 0; i < tasks.size(); ++i) {
    // Long names live on the heap: the index must read them, not copy them.
    tasks[i].name = absl::StrCat(i % 2 ? "a-rather-long-task-name-" : "t", i);
  }
  TaskNameIndex index;
  ASSERT_TRUE(index.Build(&tasks).ok());
  EXPECT_EQ(index.size(), tasks.size());
  for (size_t i = 0; i < tasks.size(); ++i) {
    EXPECT_EQ(index.Find(tasks[i].name), static_cast<int64_t>(i));
  }
  EXPECT_EQ(index.Find("t1"), -1);
  EXPECT_EQ(index.Find(""), -1);
  EXPECT_THROW(index.at("nope"), std::out_of_range);
  EXPECT_LE(index.MemoryBytes(), static_cast<int64_t>(5 * 2 * 1024 + 64));
  tasks[7].name = tasks[3].name;
  TaskNameIndex dup;
  absl::Status st = dup.Build(&tasks);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("duplicate task name a-rather-long-task-name-3"));
}

}  // namespace
}  // namespace metatt
