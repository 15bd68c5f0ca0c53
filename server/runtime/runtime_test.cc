// Runtime facade on the real base model (skipped when it is not installed):
// create, train a tiny family through the JobExecutor, predict, restart.
#include "server/runtime/runtime.h"

#include <filesystem>
#include <fstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/synchronization/notification.h"
#include "server/registry/test_util.h"

namespace metatt {
namespace {

using testing_util::InMemoryStore;
using testing_util::ScratchDir;

std::string ModelDir() {
  const char* src = std::getenv("METATT_SOURCE_DIR");
  const std::string dir = std::string(src ? src : ".") + "/models/all-MiniLM-L6-v2";
  return std::filesystem::exists(dir + "/config.json") ? dir : "";
}

TEST(RuntimeTest, TrainPredictAndReload) {
  const std::string model_dir = ModelDir();
  if (model_dir.empty()) GTEST_SKIP() << "base model not installed";
  ScratchDir dir;
  InMemoryStore store;
  RuntimeOptions o;
  o.model_dir = model_dir;
  o.device = "cpu";
  o.data_dir = dir.path();
  auto rt = Runtime::Create(o, &store);
  ASSERT_TRUE(rt.ok()) << rt.status();
  EXPECT_EQ((*rt)->device(), "cpu");
  EXPECT_FALSE((*rt)->base_model_fingerprint().empty());
  EXPECT_TRUE((*rt)->ListFamilies().empty());
  PredictInput in;
  in.task = "sst";
  in.text = "a fine film";
  EXPECT_EQ((*rt)->predictor()->Predict({in}, 0).status().code(), absl::StatusCode::kNotFound);

  const std::string path = dir.path() + "/sst.tsv";
  {
    std::ofstream f(path);
    f << "sentence\tlabel\n";
    for (int i = 0; i < 12; ++i) {
      f << (i % 2 ? "a wonderful moving film\t1\n" : "a dull tedious mess\t0\n");
    }
  }
  DatasetRecord d;
  d.id = "sst";
  d.format = "tsv";
  d.spec_json = R"({"text_column":"sentence","label_column":"label"})";
  d.path = path;
  ASSERT_TRUE(store.PutDataset(d).ok());
  JobRecord job;
  job.id = "job";
  job.spec.kind = JobKind::kTrainFamily;
  job.spec.family = "glue";
  job.spec.tasks.push_back({"sst", "sst", "", 0.25, ""});
  job.spec.hparams.max_steps = 3;
  job.spec.hparams.batch_size = 4;
  job.spec.hparams.max_length = 16;
  job.spec.hparams.eval_every = 0;
  absl::Notification done;
  JobEvent last;
  ASSERT_TRUE((*rt)->job_executor()
                  ->Start(job,
                          [&](const JobEvent& e) {
                            if (e.type == JobEvent::Type::kState &&
                                (e.state == JobState::kSucceeded ||
                                 e.state == JobState::kFailed ||
                                 e.state == JobState::kCancelled)) {
                              last = e;
                              done.Notify();
                            }
                          })
                  .ok());
  ASSERT_TRUE(done.WaitForNotificationWithTimeout(absl::Seconds(100)));
  ASSERT_EQ(last.state, JobState::kSucceeded) << last.message;
  auto out = (*rt)->predictor()->Predict({in}, 0);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ((*out)[0].task, "sst");
  EXPECT_EQ((*out)[0].scores.size(), 2u);
  EXPECT_EQ((*rt)->ResidentTasks(), 1);
  ASSERT_EQ((*rt)->ListFamilies().size(), 1u);
  EXPECT_EQ((*rt)->ListFamilies()[0].record->version, 1);
  // The resident record itself, not a copy (it can hold 10^6 tasks).
  EXPECT_EQ((*rt)->ListFamilies()[0].record.get(), (*rt)->GetFamily("glue", 0)->record.get());
  rt->reset();

  // Restart: the published family is reloaded and answers the same.
  auto rt2 = Runtime::Create(o, &store);
  ASSERT_TRUE(rt2.ok()) << rt2.status();
  EXPECT_TRUE((*rt2)->load_warnings().empty());
  auto out2 = (*rt2)->predictor()->Predict({in}, 0);
  ASSERT_TRUE(out2.ok()) << out2.status();
  EXPECT_NEAR((*out2)[0].scores[0], (*out)[0].scores[0], 1e-5);
}

}  // namespace
}  // namespace metatt
