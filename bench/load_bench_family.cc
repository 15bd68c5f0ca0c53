// metatt-bench-family: publishes a random (4+1)D family with N task slices
// straight into a server data directory (SQLite store + safetensors under
// <data_dir>/families), without training, for the load benchmark. The server
// started on that --data_dir loads it like any published family.
//
//   metatt-bench-family --data_dir=/tmp/d --family=f10000 --tasks=10000
//
// Random cores and heads (testing_util::RandomFamily: ranks 4 on Q and V,
// 2-4 labels or regression per task): the answers mean nothing, the shapes
// and the serving work are those of a real family.
#include <cstdio>
#include <filesystem>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "bench/bench_model_dir.h"
#include "server/store/sqlite_store.h"
#include "server/model/bert_config.h"
#include "server/registry/adapter_registry.h"
#include "server/registry/test_family.h"

ABSL_FLAG(std::string, data_dir, "", "server data directory (created)");
ABSL_FLAG(std::string, family, "bench", "family name");
ABSL_FLAG(int64_t, tasks, 100, "task slices");
ABSL_FLAG(int64_t, seed, 1, "random seed");

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  using namespace metatt;
  const std::string data_dir = absl::GetFlag(FLAGS_data_dir);
  if (data_dir.empty()) {
    std::fprintf(stderr, "--data_dir: required\n");
    return 2;
  }
  if (absl::GetFlag(FLAGS_tasks) < 1) {
    std::fprintf(stderr, "--tasks: must be >= 1\n");
    return 2;
  }
  auto model_dir = BenchModelDir();
  if (!model_dir.ok()) {
    std::fprintf(stderr, "%s\n", model_dir.status().ToString().c_str());
    return 1;
  }
  auto config = BertConfig::FromFile((std::filesystem::path(*model_dir) / "config.json").string());
  if (!config.ok()) {
    std::fprintf(stderr, "%s\n", config.status().ToString().c_str());
    return 1;
  }
  std::filesystem::create_directories(data_dir);
  auto store = SqliteStore::Create((std::filesystem::path(data_dir) / "metatt.db").string());
  if (!store.ok()) {
    std::fprintf(stderr, "%s\n", store.status().ToString().c_str());
    return 1;
  }
  AdapterRegistry::Options ro;
  ro.data_dir = data_dir;
  ro.base_model_fingerprint = config->Fingerprint();
  auto registry = AdapterRegistry::Create(ro, store->get());
  if (!registry.ok()) {
    std::fprintf(stderr, "%s\n", registry.status().ToString().c_str());
    return 1;
  }
  const absl::Time start = absl::Now();
  PublishRequest req =
      testing_util::RandomFamily(absl::GetFlag(FLAGS_family), absl::GetFlag(FLAGS_tasks), *config,
                                 static_cast<uint64_t>(absl::GetFlag(FLAGS_seed)));
  req.max_length = 64;
  req.created_by_job = "bench";
  auto fam = (*registry)->Publish(req);
  if (!fam.ok()) {
    std::fprintf(stderr, "%s\n", fam.status().ToString().c_str());
    return 1;
  }
  std::printf("published %s v%lld with %lld tasks in %.1f s\n", req.family.c_str(),
              static_cast<long long>((*fam)->version()),
              static_cast<long long>((*fam)->num_tasks()),
              absl::ToDoubleSeconds(absl::Now() - start));
  return 0;
}
