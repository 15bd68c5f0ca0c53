#include "server/registry/adapter_registry.h"

#include <filesystem>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "server/registry/test_family.h"
#include "server/registry/test_util.h"

namespace metatt {
namespace {

using ::testing::HasSubstr;
using testing_util::InMemoryStore;
using testing_util::RandomFamily;
using testing_util::ScratchDir;

BertConfig Base() {
  BertConfig c;
  c.vocab_size = 64;
  c.hidden_size = 16;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 2;
  c.intermediate_size = 32;
  return c;
}

std::unique_ptr<AdapterRegistry> MakeRegistry(const std::string& dir, Store* store,
                                              const std::string& fp = "fp-1") {
  AdapterRegistry::Options o;
  o.data_dir = dir;
  o.base_model_fingerprint = fp;
  auto r = AdapterRegistry::Create(o, store);
  EXPECT_TRUE(r.ok()) << r.status();
  return std::move(*r);
}

TEST(AdapterRegistryTest, PublishWritesVersionAndResolves) {
  ScratchDir dir;
  InMemoryStore store;
  auto reg = MakeRegistry(dir.path(), &store);
  auto v1 = reg->Publish(RandomFamily("fam", 6, Base(), 1));
  ASSERT_TRUE(v1.ok()) << v1.status();
  EXPECT_EQ((*v1)->version(), 1);
  EXPECT_EQ((*v1)->num_tasks(), 6);
  // Heads are stacked: one tensor for every task, padded to the widest head.
  EXPECT_EQ((*v1)->head_weight.sizes().vec(), (std::vector<int64_t>{6, 4, 16}));
  EXPECT_TRUE(std::filesystem::exists(dir.path() + "/families/fam/v1/adapter.safetensors"));
  EXPECT_TRUE(std::filesystem::exists(dir.path() + "/families/fam/v1/family.json"));
  auto recs = store.ListFamilyVersions("fam");
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
  auto v2 = reg->Publish(RandomFamily("fam", 7, Base(), 2));
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
  for (const auto& e : std::filesystem::directory_iterator(dir.path() + "/families/fam")) {
    EXPECT_THAT(e.path().filename().string(), ::testing::StartsWith("v"));
  }
}

TEST(AdapterRegistryTest, LoadAllRestoresLatestVersions) {
  ScratchDir dir;
  InMemoryStore store;
  std::shared_ptr<const PublishedFamily> published;
  {
    auto reg = MakeRegistry(dir.path(), &store);
    ASSERT_TRUE(reg->Publish(RandomFamily("a", 3, Base(), 1)).ok());
    auto p = reg->Publish(RandomFamily("a", 5, Base(), 2));
    ASSERT_TRUE(p.ok());
    published = *p;
    ASSERT_TRUE(reg->Publish(RandomFamily("b", 2, Base(), 3)).ok());
  }
  auto reg = MakeRegistry(dir.path(), &store);
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
  auto v3 = reg->Publish(RandomFamily("a", 5, Base(), 4));
  ASSERT_TRUE(v3.ok());
  EXPECT_EQ((*v3)->version(), 3);
}

TEST(AdapterRegistryTest, OtherBaseModelIsSkippedWithWarning) {
  ScratchDir dir;
  InMemoryStore store;
  {
    auto reg = MakeRegistry(dir.path(), &store, "fp-1");
    ASSERT_TRUE(reg->Publish(RandomFamily("a", 2, Base(), 1)).ok());
  }
  auto reg = MakeRegistry(dir.path(), &store, "fp-2");
  auto warnings = reg->LoadAll();
  ASSERT_TRUE(warnings.ok());
  ASSERT_EQ(warnings->size(), 1u);
  EXPECT_THAT((*warnings)[0], HasSubstr("another base model"));
  EXPECT_TRUE(reg->Latest().empty());
}

TEST(AdapterRegistryTest, RejectsBadRequests) {
  ScratchDir dir;
  InMemoryStore store;
  auto reg = MakeRegistry(dir.path(), &store);
  auto req = RandomFamily("../evil", 2, Base(), 1);
  EXPECT_EQ(reg->Publish(req).status().code(), absl::StatusCode::kInvalidArgument);
  req = RandomFamily("ok", 2, Base(), 1);
  req.head_weights.pop_back();
  EXPECT_EQ(reg->Publish(req).status().code(), absl::StatusCode::kInvalidArgument);
  req = RandomFamily("ok", 2, Base(), 1);
  req.tasks[1].name = "task0";  // duplicate
  EXPECT_FALSE(reg->Publish(req).ok());
  auto recs = store.ListFamilyVersions("");
  ASSERT_TRUE(recs.ok());
  EXPECT_TRUE(recs->empty());
  EXPECT_FALSE(std::filesystem::exists(dir.path() + "/families/ok/v1"));
}

TEST(AdapterRegistryTest, DeleteTaskPublishesVersionWithoutIt) {
  ScratchDir dir;
  InMemoryStore store;
  auto reg = MakeRegistry(dir.path(), &store);
  auto v1 = reg->Publish(RandomFamily("fam", 4, Base(), 1));
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

TEST(AdapterRegistryTest, ExportImportRoundTrip) {
  ScratchDir dir;
  InMemoryStore store;
  auto reg = MakeRegistry(dir.path(), &store);
  auto v1 = reg->Publish(RandomFamily("fam", 3, Base(), 1));
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
  auto other = MakeRegistry(other_dir.path(), &store, "fp-other");
  EXPECT_EQ(other->Import("x", *files).status().code(), absl::StatusCode::kFailedPrecondition);
  (*files)["family.json"] = "{";
  EXPECT_EQ(reg->Import("y", *files).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace metatt
