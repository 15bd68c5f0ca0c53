// Fakes for tests of the job manager and the gRPC layer (no device, no torch).
#pragma once

#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/jobs/dataset_manager.h"
#include "server/store/job_types.h"

namespace metatt {

// A JobExecutor the test drives by hand: Start() records the job and emits
// RUNNING; the test then emits progress and a terminal state.
class FakeExecutor : public JobExecutor {
 public:
  absl::Status Start(const JobRecord& job, EmitFn emit) override {
    absl::Status st;
    {
      absl::MutexLock lock(&mu_);
      started_.push_back(job.id);
      emit_[job.id] = emit;
      st = start_status_;
    }
    if (st.ok()) {
      JobEvent e;
      e.type = JobEvent::Type::kState;
      e.state = JobState::kRunning;
      emit(e);
    }
    return st;
  }
  void Cancel(const std::string& job_id) override {
    bool known;
    {
      absl::MutexLock lock(&mu_);
      cancels_.push_back(job_id);
      known = emit_.count(job_id) > 0;
    }
    if (known) End(job_id, JobState::kCancelled, "cancelled by the client");
  }
  bool CanResume(const JobRecord&) override {
    absl::MutexLock lock(&mu_);
    return can_resume_;
  }

  // ---- test side ----
  void set_start_status(absl::Status s) {
    absl::MutexLock lock(&mu_);
    start_status_ = std::move(s);
  }
  void set_can_resume(bool b) {
    absl::MutexLock lock(&mu_);
    can_resume_ = b;
  }
  void Emit(const std::string& job_id, const JobEvent& e) {
    EmitFn fn;
    {
      absl::MutexLock lock(&mu_);
      fn = emit_.at(job_id);
    }
    fn(e);
  }
  void Progress(const std::string& job_id, int64_t step, int64_t total, double loss) {
    JobEvent e;
    e.type = JobEvent::Type::kProgress;
    e.step = step;
    e.total_steps = total;
    e.loss = loss;
    e.examples_per_second = 100;
    e.eta_seconds = static_cast<double>(total - step) / 10;
    Emit(job_id, e);
  }
  void Succeed(const std::string& job_id, const std::string& family, int64_t version) {
    JobEvent c;
    c.type = JobEvent::Type::kCheckpoint;
    c.family = family;
    c.version = version;
    Emit(job_id, c);
    End(job_id, JobState::kSucceeded, "");
  }
  void End(const std::string& job_id, JobState s, const std::string& message) {
    JobEvent e;
    e.type = JobEvent::Type::kState;
    e.state = s;
    e.message = message;
    Emit(job_id, e);
  }
  // Waits until Start() has been called for `job_id`.
  bool WaitStarted(const std::string& job_id, absl::Duration timeout = absl::Seconds(10)) {
    absl::MutexLock lock(&mu_);
    auto started = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return emit_.count(job_id) > 0; };
    return mu_.AwaitWithTimeout(absl::Condition(&started), timeout);
  }
  std::vector<std::string> started() {
    absl::MutexLock lock(&mu_);
    return started_;
  }
  std::vector<std::string> cancels() {
    absl::MutexLock lock(&mu_);
    return cancels_;
  }

 private:
  absl::Mutex mu_;
  std::vector<std::string> started_ ABSL_GUARDED_BY(mu_);
  std::vector<std::string> cancels_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, EmitFn> emit_ ABSL_GUARDED_BY(mu_);
  absl::Status start_status_ ABSL_GUARDED_BY(mu_);
  bool can_resume_ ABSL_GUARDED_BY(mu_) = false;
};

// A DatasetParseFn for tests: every non-empty line must be "text<TAB>label";
// labels are the sorted distinct strings. Bad lines are all reported.
inline absl::StatusOr<ParsedDatasetInfo> FakeDatasetParse(const std::string& bytes,
                                                          const std::string& /*spec_json*/) {
  ParsedDatasetInfo info;
  std::set<std::string> labels;
  std::vector<std::string> bad;
  int line = 0;
  for (absl::string_view l : absl::StrSplit(bytes, '\n')) {
    ++line;
    if (l.empty()) continue;
    std::vector<std::string> f = absl::StrSplit(l, '\t');
    if (f.size() != 2 || f[1].empty()) {
      bad.push_back(absl::StrCat("line ", line, ": expected 2 fields, got ", f.size()));
      continue;
    }
    labels.insert(f[1]);
    ++info.num_rows;
  }
  if (!bad.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(bad.size(), " bad lines: ", absl::StrJoin(bad, "; ")));
  }
  info.label_names.assign(labels.begin(), labels.end());
  return info;
}

}  // namespace metatt
