#include "server/monitoring/server_metrics.h"

#include <prometheus/exposer.h>
#include <prometheus/text_serializer.h>

#include <exception>
#include <map>

#include "absl/strings/str_cat.h"

namespace metatt {

prometheus::Gauge& ServerMetrics::JobsIn(JobState s) {
  return jobs.Add({{"state", JobStateName(s)}});
}

prometheus::Counter& ServerMetrics::PredictRequests(const std::string& code) {
  return predict_requests_total.Add({{"code", code}});
}

prometheus::Counter& ServerMetrics::GenerateRequests(const std::string& code,
                                                     const std::string& finish) {
  return generate_requests_total.Add({{"code", code}, {"finish_reason", finish}});
}

void TaskLabels::SetLimit(int64_t k) {
  std::lock_guard<std::mutex> l(mu_);
  limit_ = k < 0 ? 0 : k;
}

std::string TaskLabels::Label(const std::string& task) {
  std::lock_guard<std::mutex> l(mu_);
  if (labelled_.count(task) != 0) return task;
  if (static_cast<int64_t>(labelled_.size()) < limit_) {
    labelled_.insert(task);
    return task;
  }
  return "other";
}

void ServerMetrics::SetTaskLabelLimit(int64_t k) { task_labels->SetLimit(k); }

std::string ServerMetrics::TaskLabel(const std::string& task) {
  return task_labels->Label(task);
}

void ServerMetrics::CountPredictInput(const std::string& task, const std::string& code) {
  predict_inputs_total.Add({{"task", TaskLabel(task)}, {"code", code}}).Increment();
}

std::unique_ptr<MetricsRegistry> MetricsRegistry::Create() {
  std::unique_ptr<MetricsRegistry> m(new MetricsRegistry());
  m->registry_ = std::make_shared<prometheus::Registry>();
  m->task_labels_ = std::make_unique<TaskLabels>();
  prometheus::Registry& r = *m->registry_;
  using prometheus::BuildCounter;
  using prometheus::BuildGauge;
  using prometheus::BuildHistogram;
  using prometheus::Histogram;
  // A metric family by name and help, registered on `r`; `.Add({})` is its
  // one unlabelled series.
  auto family = [&r](auto builder, const char* name, const char* help) -> auto& {
    return builder.Name(name).Help(help).Register(r);
  };
  auto& jobs = family(BuildGauge(), "metatt_jobs", "Jobs by state");
  auto& steps =
      family(BuildCounter(), "metatt_job_steps_total", "Training steps run by all jobs").Add({});
  auto& loss = family(BuildGauge(), "metatt_train_loss", "Latest training loss").Add({});
  auto& eps = family(BuildGauge(), "metatt_train_examples_per_second",
                     "Training throughput of the running job")
                  .Add({});
  auto& predict =
      family(BuildCounter(), "metatt_predict_requests_total", "Predict RPCs by status code");
  auto& latency =
      family(BuildHistogram(), "metatt_predict_latency_seconds", "Predict RPC latency")
          .Add({}, Histogram::BucketBoundaries{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                               0.5, 1, 2.5, 5});
  auto& batch = family(BuildHistogram(), "metatt_batch_size", "Rows per device inference batch")
                    .Add({}, Histogram::BucketBoundaries{1, 2, 4, 8, 16, 32, 64, 128, 256});
  auto& batch_tasks = family(BuildHistogram(), "metatt_batch_tasks",
                             "Distinct tasks per device inference batch")
                          .Add({}, Histogram::BucketBoundaries{1, 2, 4, 8, 16, 32, 64});
  auto& inputs = family(BuildCounter(), "metatt_predict_inputs_total",
                        "Predict inputs by task (first K tasks by name, the rest \"other\") "
                        "and status code");
  auto& in_flight =
      family(BuildGauge(), "metatt_predict_in_flight", "Predict RPCs being served right now")
          .Add({});
  auto& gen_requests = family(BuildCounter(), "metatt_generate_requests_total",
                              "Generate RPCs by status code and finish reason");
  auto& gen_tokens = family(BuildCounter(), "metatt_generated_tokens_total",
                            "Tokens generated (completion tokens of finished generations)")
                         .Add({});
  auto& prompt_tokens = family(BuildCounter(), "metatt_generate_prompt_tokens_total",
                               "Prompt tokens of finished generations")
                            .Add({});
  auto& ttft = family(BuildHistogram(), "metatt_time_to_first_token_seconds",
                      "Generate: time from queueing to the first token")
                   .Add({}, Histogram::BucketBoundaries{0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                                                        5, 10, 30});
  auto& gen_in_flight =
      family(BuildGauge(), "metatt_generate_in_flight", "Generate RPCs being served right now")
          .Add({});
  m->metrics_.reset(new ServerMetrics{jobs, steps, loss, eps, predict, latency, batch, batch_tasks,
                                      inputs, in_flight, gen_requests, gen_tokens, prompt_tokens,
                                      ttft, gen_in_flight, m->task_labels_.get()});
  for (auto s : {JobState::kQueued, JobState::kValidating, JobState::kRunning, JobState::kSucceeded,
                 JobState::kFailed, JobState::kCancelled}) {
    m->metrics_->JobsIn(s).Set(0);
  }
  return m;
}

MetricsRegistry::~MetricsRegistry() = default;

absl::StatusOr<int> MetricsRegistry::Serve(const std::string& listen) {
  try {
    exposer_ = std::make_unique<prometheus::Exposer>(listen);
    exposer_->RegisterCollectable(registry_);
    for (const auto& c : collectables_) exposer_->RegisterCollectable(c);
    auto ports = exposer_->GetListeningPorts();
    if (ports.empty())
      return absl::UnavailableError(absl::StrCat("metrics: cannot listen on ", listen));
    return static_cast<int>(ports.front());
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("--metrics_listen: cannot listen on ", listen, ": ", e.what()));
  }
}

void MetricsRegistry::AddCollectable(std::shared_ptr<prometheus::Collectable> c) {
  if (exposer_ != nullptr) exposer_->RegisterCollectable(c);
  collectables_.push_back(std::move(c));
}

std::string MetricsRegistry::Render() const {
  std::vector<prometheus::MetricFamily> all = registry_->Collect();
  for (const auto& c : collectables_) {
    for (auto& f : c->Collect()) all.push_back(std::move(f));
  }
  prometheus::TextSerializer s;
  return s.Serialize(all);
}

namespace {

prometheus::MetricFamily GaugeFamily(std::string name, std::string help) {
  prometheus::MetricFamily f;
  f.name = std::move(name);
  f.help = std::move(help);
  f.type = prometheus::MetricType::Gauge;
  return f;
}

prometheus::MetricFamily OneGauge(std::string name, std::string help, int64_t value) {
  prometheus::MetricFamily f = GaugeFamily(std::move(name), std::move(help));
  f.metric.emplace_back();
  f.metric.back().gauge.value = static_cast<double>(value);
  return f;
}

}  // namespace

std::vector<prometheus::MetricFamily> SampledGauges::Collect() const {
  const RuntimeGauges g = runtime_ ? runtime_() : RuntimeGauges{};
  std::vector<prometheus::MetricFamily> out;
  out.push_back(OneGauge("metatt_queue_depth", "Predictions waiting for a device batch",
                         g.queue_depth));
  out.push_back(OneGauge("metatt_tasks_resident", "Tasks whose adapter is resident on the device",
                         g.tasks_resident));
  out.push_back(OneGauge("metatt_device_memory_bytes", "Device memory allocated by the server",
                         g.device_memory_bytes));
  prometheus::MetricFamily params = GaugeFamily(
      "metatt_adapter_parameters", "Trainable adapter parameters of the latest version of a family");
  if (store_ != nullptr) {
    auto all = store_->ListFamilyVersionSummaries("");
    if (all.ok()) {
      // Ordered by (family, version): the last record of each family is its latest.
      std::map<std::string, int64_t> latest;
      for (const auto& v : *all) latest[v.family] = v.adapter_parameters;
      for (const auto& [family, n] : latest) {
        params.metric.emplace_back();
        params.metric.back().label = {{"family", family}};
        params.metric.back().gauge.value = static_cast<double>(n);
      }
    }
  }
  out.push_back(std::move(params));
  return out;
}

void JobMetrics::OnJobCount(JobState s, int64_t n) {
  m_->JobsIn(s).Set(static_cast<double>(n));
}

void JobMetrics::OnTrainingProgress(int64_t steps, double loss, double examples_per_second) {
  if (steps > 0) m_->job_steps_total.Increment(static_cast<double>(steps));
  m_->train_loss.Set(loss);
  m_->train_examples_per_second.Set(examples_per_second);
}

void JobMetrics::OnJobEnded() { m_->train_examples_per_second.Set(0); }

}  // namespace metatt
