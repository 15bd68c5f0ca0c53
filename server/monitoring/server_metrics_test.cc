#include "server/monitoring/server_metrics.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "server/registry/test_util.h"  // InMemoryStore (header-only, over store.h)

namespace metatt {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

TEST(ServerMetricsTest, RendersEveryMetricName) {
  auto reg = MetricsRegistry::Create();
  ServerMetrics& m = reg->metrics();
  m.JobsIn(JobState::kRunning).Set(1);
  m.job_steps_total.Increment(3);
  m.PredictRequests("OK").Increment();
  m.predict_latency_seconds.Observe(0.01);
  m.batch_size.Observe(4);
  m.batch_tasks.Observe(2);
  std::string text = reg->Render();
  for (const char* name :
       {"metatt_jobs{state=\"RUNNING\"} 1", "metatt_job_steps_total 3", "metatt_train_loss",
        "metatt_train_examples_per_second", "metatt_predict_requests_total{code=\"OK\"} 1",
        "metatt_predict_latency_seconds_bucket", "metatt_batch_size_count 1",
        "metatt_batch_tasks_sum 2"}) {
    EXPECT_THAT(text, HasSubstr(name));
  }
}

// Read from the store and the runtime callback at every render (scrape).
TEST(ServerMetricsTest, SampledGaugesAreReadAtScrapeTime) {
  auto reg = MetricsRegistry::Create();
  testing_util::InMemoryStore store;
  FamilyVersionRecord v1;
  v1.family = "glue";
  v1.version = 1;
  v1.adapter_parameters = 1000;
  FamilyVersionRecord v2 = v1;
  v2.version = 2;
  v2.adapter_parameters = 1234;
  ASSERT_TRUE(store.PublishFamilyVersion(v1).ok());
  ASSERT_TRUE(store.PublishFamilyVersion(v2).ok());
  RuntimeGauges g;
  reg->AddCollectable(std::make_shared<SampledGauges>(&store, [&g] { return g; }));
  g.queue_depth = 3;
  g.tasks_resident = 7;
  g.device_memory_bytes = 4096;
  std::string text = reg->Render();
  for (const char* line :
       {"metatt_queue_depth 3", "metatt_tasks_resident 7", "metatt_device_memory_bytes 4096",
        "metatt_adapter_parameters{family=\"glue\"} 1234", "# TYPE metatt_queue_depth gauge"}) {
    EXPECT_THAT(text, HasSubstr(line));
  }
  g.queue_depth = 0;
  EXPECT_THAT(reg->Render(), HasSubstr("metatt_queue_depth 0"));
}

TEST(ServerMetricsTest, TaskLabelsAreBoundedToTheFirstK) {
  auto reg = MetricsRegistry::Create();
  ServerMetrics& m = reg->metrics();
  m.SetTaskLabelLimit(2);
  for (int i = 0; i < 100; ++i) m.CountPredictInput("f/t" + std::to_string(i % 10), "OK");
  m.CountPredictInput("f/t0", "NOT_FOUND");
  const std::string text = reg->Render();
  EXPECT_THAT(text, HasSubstr("metatt_predict_inputs_total{code=\"OK\",task=\"f/t0\"} 10"));
  EXPECT_THAT(text, HasSubstr("metatt_predict_inputs_total{code=\"OK\",task=\"f/t1\"} 10"));
  EXPECT_THAT(text, HasSubstr("metatt_predict_inputs_total{code=\"OK\",task=\"other\"} 80"));
  EXPECT_THAT(text,
              HasSubstr("metatt_predict_inputs_total{code=\"NOT_FOUND\",task=\"f/t0\"} 1"));
  EXPECT_THAT(text, Not(HasSubstr("task=\"f/t2\"")));
  // Limit 0: every task is "other".
  auto reg0 = MetricsRegistry::Create();
  reg0->metrics().SetTaskLabelLimit(0);
  reg0->metrics().CountPredictInput("f/t0", "OK");
  EXPECT_THAT(reg0->Render(), HasSubstr("metatt_predict_inputs_total{code=\"OK\",task=\"other\"} 1"));
}

TEST(ServerMetricsTest, ServesOnAFreePort) {
  auto reg = MetricsRegistry::Create();
  auto port = reg->Serve("127.0.0.1:0");
  ASSERT_TRUE(port.ok()) << port.status();
  EXPECT_GT(*port, 0);
}

}  // namespace
}  // namespace metatt
