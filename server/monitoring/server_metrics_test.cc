#include "server/monitoring/server_metrics.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

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
  m.adapter_parameters.Add({{"family", "glue"}}).Set(1234);
  std::string text = reg->Render();
  for (const char* name :
       {"metatt_jobs{state=\"RUNNING\"} 1", "metatt_job_steps_total 3", "metatt_train_loss",
        "metatt_train_examples_per_second", "metatt_predict_requests_total{code=\"OK\"} 1",
        "metatt_predict_latency_seconds_bucket", "metatt_batch_size_count 1",
        "metatt_batch_tasks_sum 2", "metatt_queue_depth", "metatt_tasks_resident",
        "metatt_adapter_parameters{family=\"glue\"} 1234", "metatt_device_memory_bytes"}) {
    EXPECT_THAT(text, HasSubstr(name));
  }
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
