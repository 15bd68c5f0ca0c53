#include "server/runtime/scheduler.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "base/status_macros.h"

namespace metatt {
namespace {

// Runs rows[begin, end) of one family in one forward; fills `out` (same
// order). Rows may belong to different tasks of the family.
absl::Status ForwardFamilyRows(const BertEncoder& encoder, const PublishedFamily& fam,
                               const std::vector<const InferenceRow*>& rows, bool base_only,
                               std::vector<RowResult>* out) {
  const int64_t B = static_cast<int64_t>(rows.size());
  int64_t S = 1;
  for (const InferenceRow* r : rows) S = std::max<int64_t>(S, r->ids.size());
  torch::Tensor ids = torch::zeros({B, S}, torch::kLong);
  torch::Tensor types = torch::zeros({B, S}, torch::kLong);
  torch::Tensor mask = torch::zeros({B, S}, torch::kLong);
  torch::Tensor task = torch::empty({B}, torch::kLong);
  {
    auto ia = ids.accessor<int64_t, 2>();
    auto ta = types.accessor<int64_t, 2>();
    auto ma = mask.accessor<int64_t, 2>();
    auto ka = task.accessor<int64_t, 1>();
    for (int64_t b = 0; b < B; ++b) {
      const InferenceRow& r = *rows[b];
      for (size_t s = 0; s < r.ids.size(); ++s) {
        ia[b][s] = r.ids[s];
        ta[b][s] = s < r.type_ids.size() ? r.type_ids[s] : 0;
        ma[b][s] = 1;
      }
      ka[b] = r.task;
    }
  }
  const torch::Device dev = encoder.device();
  EncoderInput in;
  AdapterBatch ab;  // with the host copy: the adapter reads task ids without a device sync
  RETURN_IF_ERROR(TorchTry("moving the batch to the device", [&] {
    in.input_ids = ids.to(dev);
    in.token_type_ids = types.to(dev);
    in.attention_mask = mask.to(dev);
    ab = AdapterBatch::FromHost(task, dev);
  }));
  const torch::Tensor& task_dev = ab.task_index;
  ASSIGN_OR_RETURN(torch::Tensor hidden,
                   encoder.Forward(in, base_only ? nullptr : fam.adapter.get(), ab));
  torch::Tensor logits;
  RETURN_IF_ERROR(TorchTry("heads", [&] {
    torch::Tensor pooled = Pool(hidden, in.attention_mask, fam.pooling).to(torch::kFloat32);
    // [B, Lmax, D] / [B, Lmax]: only the gathered rows are upcast from the
    // registry's (maybe compact) head_dtype.
    auto [w, bias] = fam.GatherHeads(task_dev, torch::kFloat32);
    logits = (torch::bmm(w, pooled.unsqueeze(2)).squeeze(2) + bias).to(torch::kCPU).contiguous();
  }));
  auto la = logits.accessor<float, 2>();
  out->resize(rows.size());
  for (int64_t b = 0; b < B; ++b) {
    const TaskRecord& tr = fam.record.tasks[rows[b]->task];
    RowResult& res = (*out)[b];
    res.regression = tr.regression;
    if (tr.regression) {
      res.scores = {la[b][0]};
      res.label = -1;
      continue;
    }
    const int64_t n = tr.num_labels;
    float mx = la[b][0];
    for (int64_t j = 1; j < n; ++j) mx = std::max(mx, la[b][j]);
    double sum = 0;
    res.scores.resize(n);
    for (int64_t j = 0; j < n; ++j) {
      res.scores[j] = std::exp(la[b][j] - mx);
      sum += res.scores[j];
    }
    int64_t best = 0;
    for (int64_t j = 0; j < n; ++j) {
      res.scores[j] = static_cast<float>(res.scores[j] / sum);
      if (res.scores[j] > res.scores[best]) best = j;
    }
    res.label = best;
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<DeviceScheduler>> DeviceScheduler::Create(
    const Options& options, std::shared_ptr<const BertEncoder> encoder) {
  if (encoder == nullptr) return absl::InvalidArgumentError("scheduler: encoder is null");
  return Create(options, BaseModel::Encoder(std::move(encoder), nullptr));
}

absl::StatusOr<std::unique_ptr<DeviceScheduler>> DeviceScheduler::Create(
    const Options& options, std::shared_ptr<const BaseModel> model) {
  if (model == nullptr) return absl::InvalidArgumentError("scheduler: base model is null");
  if (options.max_batch_size < 1) {
    return absl::InvalidArgumentError("max_batch_size: must be >= 1");
  }
  if (options.batch_timeout_ms < 0) {
    return absl::InvalidArgumentError("batch_timeout_ms: must be >= 0");
  }
  if (options.max_queue < 1) return absl::InvalidArgumentError("max_queue: must be >= 1");
  if (options.train_share < 1) return absl::InvalidArgumentError("train_share: must be >= 1");
  std::unique_ptr<DeviceScheduler> s(new DeviceScheduler(options, std::move(model)));
  s->thread_ = std::thread([p = s.get()] { p->Loop(); });
  return s;
}

DeviceScheduler::~DeviceScheduler() { Shutdown(); }

void DeviceScheduler::Shutdown() {
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

absl::Status DeviceScheduler::Submit(std::shared_ptr<InferenceRequest> request) {
  const int64_t n = static_cast<int64_t>(request->rows.size());
  if (n == 0) return absl::InvalidArgumentError("inputs: empty");
  if (encoder_ == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        "this server holds a ", model_->kind_name(), " base model: Predict needs an encoder"));
  }
  {
    std::lock_guard<std::mutex> l(mu_);
    if (stop_) return absl::UnavailableError("the device scheduler is shutting down");
    if (queued_rows_ + n > options_.max_queue) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "inference queue full (", queued_rows_, " rows queued, limit ", options_.max_queue,
          "); retry later"));
    }
    request->enqueued = absl::Now();
    queued_rows_ += n;
    queue_.push_back(std::move(request));
  }
  cv_.notify_all();
  return absl::OkStatus();
}

bool DeviceScheduler::Withdraw(const std::shared_ptr<InferenceRequest>& request) {
  std::lock_guard<std::mutex> l(mu_);
  auto it = std::find(queue_.begin(), queue_.end(), request);
  if (it == queue_.end()) return false;
  queued_rows_ -= static_cast<int64_t>((*it)->rows.size());
  queue_.erase(it);
  return true;
}

absl::Status DeviceScheduler::AddTrainingTask(std::shared_ptr<TrainingTask> task) {
  {
    std::lock_guard<std::mutex> l(mu_);
    if (stop_) return absl::UnavailableError("the device scheduler is shutting down");
    jobs_.push_back(std::move(task));
  }
  cv_.notify_all();
  return absl::OkStatus();
}

absl::Status DeviceScheduler::RunOnDevice(std::function<void()> fn) {
  if (std::this_thread::get_id() == thread_.get_id()) {
    fn();
    return absl::OkStatus();
  }
  auto done = std::make_shared<absl::Notification>();
  {
    std::lock_guard<std::mutex> l(mu_);
    if (stop_) return absl::UnavailableError("the device scheduler is shutting down");
    device_calls_.push_back([fn = std::move(fn), done] {
      fn();
      done->Notify();
    });
  }
  cv_.notify_all();
  done->WaitForNotification();
  return absl::OkStatus();
}

void DeviceScheduler::SetStepWork(StepWork* work) {
  {
    std::lock_guard<std::mutex> l(mu_);
    step_work_ = work;
  }
  cv_.notify_all();
}

void DeviceScheduler::Wake() {
  { std::lock_guard<std::mutex> l(mu_); }
  cv_.notify_all();
}

void DeviceScheduler::SetBatchObserver(BatchObserver observer) {
  std::lock_guard<std::mutex> l(mu_);
  observer_ = std::move(observer);
}

int64_t DeviceScheduler::queue_depth() const {
  std::lock_guard<std::mutex> l(mu_);
  return queued_rows_;
}

int64_t DeviceScheduler::pending_training_tasks() const {
  std::lock_guard<std::mutex> l(mu_);
  return static_cast<int64_t>(jobs_.size());
}

std::vector<std::shared_ptr<InferenceRequest>> DeviceScheduler::TakeBatchLocked() {
  std::vector<std::shared_ptr<InferenceRequest>> batch;
  int64_t rows = 0;
  const absl::Time now = absl::Now();
  while (!queue_.empty()) {
    std::shared_ptr<InferenceRequest>& front = queue_.front();
    const int64_t n = static_cast<int64_t>(front->rows.size());
    if (front->deadline < now) {  // expired while queued
      queued_rows_ -= n;
      front->status = absl::DeadlineExceededError("deadline passed while queued");
      front->done.Notify();
      queue_.pop_front();
      continue;
    }
    if (!batch.empty() && rows + n > options_.max_batch_size) break;
    rows += n;
    queued_rows_ -= n;
    batch.push_back(std::move(front));
    queue_.pop_front();
  }
  return batch;
}

void DeviceScheduler::RunBatch(const std::vector<std::shared_ptr<InferenceRequest>>& batch) {
  torch::NoGradGuard no_grad;
  const absl::Time start = absl::Now();
  // Group rows by family version, keeping (request, row) coordinates.
  std::map<const PublishedFamily*, std::vector<std::pair<size_t, size_t>>> groups;
  std::set<std::pair<const PublishedFamily*, int64_t>> tasks;
  int64_t total = 0;
  for (size_t q = 0; q < batch.size(); ++q) {
    batch[q]->started = start;
    batch[q]->results.assign(batch[q]->rows.size(), RowResult());
    for (size_t r = 0; r < batch[q]->rows.size(); ++r) {
      const InferenceRow& row = batch[q]->rows[r];
      groups[row.family.get()].push_back({q, r});
      tasks.insert({row.family.get(), row.task});
      ++total;
    }
  }
  for (const auto& [fam, coords] : groups) {
    for (size_t begin = 0; begin < coords.size();
         begin += static_cast<size_t>(options_.max_batch_size)) {
      const size_t end =
          std::min(coords.size(), begin + static_cast<size_t>(options_.max_batch_size));
      std::vector<const InferenceRow*> rows;
      for (size_t i = begin; i < end; ++i) {
        rows.push_back(&batch[coords[i].first]->rows[coords[i].second]);
      }
      std::vector<RowResult> out;
      absl::Status st;
      try {
        st = ForwardFamilyRows(*encoder_, *fam, rows, options_.base_only, &out);
      } catch (const std::exception& e) {
        std::string msg = e.what();
        msg.resize(std::min(msg.size(), msg.find('\n')));
        st = absl::InternalError(absl::StrCat("inference: ", msg));
      }
      for (size_t i = begin; i < end; ++i) {
        InferenceRequest& req = *batch[coords[i].first];
        if (!st.ok()) {
          if (req.status.ok()) req.status = st;
        } else {
          req.results[coords[i].second] = std::move(out[i - begin]);
        }
      }
    }
  }
  const absl::Time end = absl::Now();
  batches_run_.fetch_add(1);
  BatchObserver observer;
  BatchStats stats;
  {
    std::lock_guard<std::mutex> l(mu_);
    observer = observer_;
    stats.queue_depth = queued_rows_;
  }
  if (observer) {
    stats.batch_size = total;
    stats.distinct_tasks = static_cast<int64_t>(tasks.size());
    stats.distinct_families = static_cast<int64_t>(groups.size());
    stats.model_seconds = absl::ToDoubleSeconds(end - start);
    observer(stats);
  }
  // Notify last, so a caller that returns sees this batch in the stats.
  for (const auto& req : batch) {
    req->finished = end;
    req->done.Notify();
  }
}

void DeviceScheduler::Loop() {
  while (true) {
    std::vector<std::shared_ptr<InferenceRequest>> batch;
    std::shared_ptr<TrainingTask> job;
    std::deque<std::function<void()>> calls;
    StepWork* step = nullptr;
    {
      std::unique_lock<std::mutex> l(mu_);
      cv_.wait(l, [&] {
        return stop_ || !queue_.empty() || !jobs_.empty() || !device_calls_.empty() ||
               (step_work_ != nullptr && step_work_->HasWork());
      });
      if (stop_) break;
      bool window = !queue_.empty() && jobs_.empty() && device_calls_.empty() &&
                    queued_rows_ < options_.max_batch_size && options_.batch_timeout_ms > 0;
      // Adaptive: once a window gathered nothing (one closed-loop client,
      // say), waiting only adds latency; skip it, probing again every
      // kWindowProbeEvery batches, until a window gathers rows again.
      if (window && window_misses_ > 0 && ++windows_skipped_ % kWindowProbeEvery != 0) {
        window = false;
      }
      if (window) {
        // Batching window: wait for more rows, at most until the oldest
        // request has waited batch_timeout_ms.
        const absl::Time until =
            queue_.front()->enqueued + absl::Milliseconds(options_.batch_timeout_ms);
        const bool waits = absl::Now() < until;
        const size_t before = queue_.size();
        cv_.wait_until(l, absl::ToChronoTime(until), [&] {
          return stop_ || queue_.empty() || queued_rows_ >= options_.max_batch_size ||
                 !jobs_.empty() || !device_calls_.empty();
        });
        if (stop_) break;
        if (waits) window_misses_ = queue_.size() > before ? 0 : window_misses_ + 1;
      }
      batch = TakeBatchLocked();
      calls.swap(device_calls_);
      if (!jobs_.empty()) job = jobs_.front();
      if (step_work_ != nullptr && step_work_->HasWork()) step = step_work_;
    }
    for (auto& fn : calls) fn();
    if (!batch.empty()) {
      RunBatch(batch);
      batch.clear();  // release the requests (and their family versions) now
    }
    if (step != nullptr) step->RunStep();
    if (job == nullptr) continue;
    for (int64_t i = 0; i < options_.train_share; ++i) {
      const bool more = job->Step();
      training_steps_run_.fetch_add(1);
      if (!more) {
        std::lock_guard<std::mutex> l(mu_);
        if (!jobs_.empty() && jobs_.front() == job) jobs_.pop_front();
        break;
      }
      std::lock_guard<std::mutex> l(mu_);
      if (!queue_.empty() || !device_calls_.empty() || stop_ ||
          (step_work_ != nullptr && step_work_->HasWork())) {
        break;  // inference first
      }
    }
  }
  // Fail what is still queued.
  std::deque<std::shared_ptr<InferenceRequest>> left;
  std::deque<std::function<void()>> calls;
  StepWork* step = nullptr;
  {
    std::lock_guard<std::mutex> l(mu_);
    step = step_work_;
    left.swap(queue_);
    queued_rows_ = 0;
    jobs_.clear();
    calls.swap(device_calls_);
  }
  for (auto& req : left) {
    req->status = absl::UnavailableError("the server is shutting down");
    req->done.Notify();
  }
  for (auto& fn : calls) fn();
  if (step != nullptr) step->Abort(absl::UnavailableError("the server is shutting down"));
}

}  // namespace metatt
