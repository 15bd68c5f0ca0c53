// Prometheus metrics of the server. One registry object, created by the
// Server and injected (no global singleton); every layer updates the plain
// references in ServerMetrics (pushed: counters, histograms, job gauges).
// State gauges (queue depth, resident tasks, device memory, adapter
// parameters) are read at scrape time by SampledGauges, a
// prometheus::Collectable: no polling thread. Torch-free and protobuf-free:
// the runtime includes it too.
//
// Names end with their unit (see ARCHITECTURE.md "Metrics"). Labels are
// bounded: no per-job label; per-task labels only on
// metatt_predict_inputs_total{task,code}, where the first `task_label_limit`
// distinct tasks requested get their own value ("family/task") and every
// later one counts under "other" (so ten thousand tasks make at most K+1
// series per code).
#pragma once

#include <prometheus/collectable.h>
#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_set>
#include <vector>

#include "absl/status/statusor.h"
#include "server/jobs/job_manager.h"
#include "server/store/job_types.h"
#include "server/store/store.h"

namespace prometheus {
class Exposer;
}

namespace metatt {

class TaskLabels;

struct ServerMetrics {
  prometheus::Family<prometheus::Gauge>& jobs;   // metatt_jobs{state}
  prometheus::Counter& job_steps_total;          // metatt_job_steps_total
  prometheus::Gauge& train_loss;                 // metatt_train_loss
  prometheus::Gauge& train_examples_per_second;  // metatt_train_examples_per_second
  prometheus::Family<prometheus::Counter>& predict_requests_total;  // {code}
  prometheus::Histogram& predict_latency_seconds;
  prometheus::Histogram& batch_size;   // metatt_batch_size (rows per device batch)
  prometheus::Histogram& batch_tasks;  // metatt_batch_tasks (distinct tasks per batch)
  prometheus::Family<prometheus::Counter>& predict_inputs_total;  // {task, code}
  prometheus::Gauge& predict_in_flight;  // metatt_predict_in_flight (Predict RPCs being served)
  // Generation (decoder servers).
  prometheus::Family<prometheus::Counter>& generate_requests_total;  // {code, finish_reason}
  prometheus::Counter& generated_tokens_total;  // metatt_generated_tokens_total
  prometheus::Counter& prompt_tokens_total;     // metatt_generate_prompt_tokens_total
  prometheus::Histogram& time_to_first_token_seconds;  // metatt_time_to_first_token_seconds
  prometheus::Gauge& generate_in_flight;        // metatt_generate_in_flight

  // Convenience: the gauge of one job state / one status code.
  prometheus::Gauge& JobsIn(JobState s);
  prometheus::Counter& PredictRequests(const std::string& code);
  prometheus::Counter& GenerateRequests(const std::string& code, const std::string& finish);
  // One Predict input of `task` ("family/task") ended with `code`; the task
  // label is bounded (see above). Thread-safe.
  void CountPredictInput(const std::string& task, const std::string& code);
  // Distinct tasks that get their own label value (default 16; 0 = all "other").
  void SetTaskLabelLimit(int64_t k);
  std::string TaskLabel(const std::string& task);

  TaskLabels* task_labels;  // owned by the MetricsRegistry
};

// The job manager's observer (JobManagerOptions::observer): metatt_jobs{state},
// metatt_job_steps_total, metatt_train_loss, metatt_train_examples_per_second.
class JobMetrics : public JobObserver {
 public:
  explicit JobMetrics(ServerMetrics* m) : m_(m) {}
  void OnJobCount(JobState s, int64_t n) override;
  void OnTrainingProgress(int64_t steps, double loss, double examples_per_second) override;
  void OnJobEnded() override;

 private:
  ServerMetrics* m_;
};

// The bounded set of task label values (first K distinct tasks). Thread-safe.
class TaskLabels {
 public:
  void SetLimit(int64_t k);
  std::string Label(const std::string& task);

 private:
  std::mutex mu_;
  std::unordered_set<std::string> labelled_;
  int64_t limit_ = 16;
};

// What the runtime reports at scrape time (filled by a callback, so this
// layer needs no runtime header).
struct RuntimeGauges {
  int64_t queue_depth = 0;          // metatt_queue_depth (predictions waiting for a batch)
  int64_t tasks_resident = 0;       // metatt_tasks_resident
  int64_t device_memory_bytes = 0;  // metatt_device_memory_bytes
};

// metatt_queue_depth, metatt_tasks_resident, metatt_device_memory_bytes
// (from `runtime`) and metatt_adapter_parameters{family} (the latest version
// of every family in `store`), read when /metrics is scraped. Thread-safe as
// far as `store` and `runtime` are; both must outlive it.
class SampledGauges : public prometheus::Collectable {
 public:
  SampledGauges(Store* store, std::function<RuntimeGauges()> runtime)
      : store_(store), runtime_(std::move(runtime)) {}
  std::vector<prometheus::MetricFamily> Collect() const override;

 private:
  Store* store_;  // null = no adapter_parameters
  std::function<RuntimeGauges()> runtime_;
};

class MetricsRegistry {
 public:
  static std::unique_ptr<MetricsRegistry> Create();
  ~MetricsRegistry();

  std::shared_ptr<prometheus::Registry> registry() const { return registry_; }
  ServerMetrics& metrics() { return *metrics_; }

  // Starts an HTTP exposer serving /metrics on `listen` ("host:port"; port 0
  // picks a free port). Returns the bound port.
  absl::StatusOr<int> Serve(const std::string& listen);
  // Adds a collectable read at every scrape (and by Render) beside the
  // registry, e.g. SampledGauges. Before or after Serve.
  void AddCollectable(std::shared_ptr<prometheus::Collectable> c);
  // Text exposition format of every metric (for tests and debugging).
  std::string Render() const;

 private:
  MetricsRegistry() = default;
  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<ServerMetrics> metrics_;
  std::unique_ptr<TaskLabels> task_labels_;
  std::vector<std::shared_ptr<prometheus::Collectable>> collectables_;  // beyond registry_
  std::unique_ptr<prometheus::Exposer> exposer_;
};

}  // namespace metatt
