#include "server/runtime/predictor.h"

#include <algorithm>
#include <optional>
#include <string_view>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace metatt {
namespace {

absl::Status WithInput(const absl::Status& st, size_t i) {
  return absl::Status(st.code(), absl::StrCat("inputs[", i, "].", st.message()));
}

}  // namespace

absl::StatusOr<std::vector<PredictOutput>> ScheduledPredictor::Predict(
    const std::vector<PredictInput>& inputs, int64_t deadline_unix_ms,
    const std::function<bool()>& cancelled) {
  if (inputs.empty()) return absl::InvalidArgumentError("inputs: at least one input is required");
  if (static_cast<int64_t>(inputs.size()) > options_.max_inputs) {
    return absl::InvalidArgumentError(absl::StrCat("inputs: ", inputs.size(),
                                                   " inputs, at most ", options_.max_inputs));
  }
  auto request = std::make_shared<InferenceRequest>();
  request->deadline = deadline_unix_ms > 0 ? absl::FromUnixMillis(deadline_unix_ms)
                                           : absl::InfiniteFuture();
  request->rows.reserve(inputs.size());
  std::vector<int64_t> input_of_row;
  input_of_row.reserve(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    const PredictInput& in = inputs[i];
    if (in.text.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("inputs[", i, "].text: empty"));
    }
    if (static_cast<int64_t>(in.text.size()) > options_.max_text_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("inputs[", i, "].text: longer than ",
                                                     options_.max_text_bytes, " bytes"));
    }
    if (in.text_pair && static_cast<int64_t>(in.text_pair->size()) > options_.max_text_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("inputs[", i, "].text_pair: longer than ",
                                                     options_.max_text_bytes, " bytes"));
    }
    if (in.version < 0) {
      return absl::InvalidArgumentError(absl::StrCat("inputs[", i, "].version: negative"));
    }
    // The rows of this input: one task, or one per task of a list / "all".
    std::vector<ResolvedTask> tasks;
    if (in.all_tasks || !in.tasks.empty()) {
      std::string first = in.all_tasks ? std::string() : in.tasks[0];
      auto fam = registry_->Resolve(in.family, in.version, first, in.all_tasks ? 0 : -1);
      if (!fam.ok()) {
        return WithInput(in.all_tasks ? fam.status()
                                      : absl::Status(fam.status().code(),
                                                     absl::StrCat("tasks[0]: ", fam.status().message())),
                         i);
      }
      const int64_t n = in.all_tasks ? fam->family->num_tasks()
                                     : static_cast<int64_t>(in.tasks.size());
      if (static_cast<int64_t>(request->rows.size()) + n > options_.max_inputs) {
        return absl::InvalidArgumentError(absl::StrCat(
            "inputs[", i, "].tasks: ", n, " tasks bring the call to more than ",
            options_.max_inputs, " rows (inputs x tasks; max_predict_inputs)"));
      }
      for (int64_t t = 0; t < n; ++t) {
        int64_t index = t;
        if (!in.all_tasks) {
          index = fam->family->task_by_name.Find(in.tasks[t]);
          if (index < 0) {
            return absl::NotFoundError(absl::StrCat("inputs[", i, "].tasks[", t, "]: '",
                                                    in.tasks[t], "' not found in family '",
                                                    fam->family->family(), "' v",
                                                    fam->family->version()));
          }
        }
        tasks.push_back(ResolvedTask{fam->family, index});
      }
    } else {
      auto resolved = registry_->Resolve(in.family, in.version, in.task, in.task_index);
      if (!resolved.ok()) return WithInput(resolved.status(), i);
      tasks.push_back(std::move(*resolved));
    }
    if (static_cast<int64_t>(request->rows.size() + tasks.size()) > options_.max_inputs) {
      return absl::InvalidArgumentError(absl::StrCat("inputs: more than ", options_.max_inputs,
                                                     " rows (inputs x tasks)"));
    }
    std::optional<std::string_view> pair;
    if (in.text_pair && !in.text_pair->empty()) pair = *in.text_pair;
    // One tokenisation per input, whatever the number of its tasks.
    Encoding enc =
        tokenizer_->Encode(in.text, pair, static_cast<int>(tasks[0].family->max_length));
    for (ResolvedTask& r : tasks) {
      InferenceRow row;
      row.family = std::move(r.family);
      row.task = r.task;
      row.ids = enc.ids;
      row.type_ids = enc.type_ids;
      request->rows.push_back(std::move(row));
      input_of_row.push_back(static_cast<int64_t>(i));
    }
  }
  if (request->deadline <= absl::Now()) {
    return absl::DeadlineExceededError("deadline passed before the request was queued");
  }
  // A caller that left while its inputs were resolved and tokenised (a
  // burst of cancelled large calls, say) never takes a place in the queue.
  if (cancelled && cancelled()) {
    return absl::CancelledError("the caller cancelled the request before it was queued");
  }
  absl::Status st = scheduler_->Submit(request);
  if (!st.ok()) return st;
  // Wait for the batch; poll the caller's cancellation meanwhile. A request
  // the caller abandoned is withdrawn while still queued (it never runs);
  // one already taken into a batch completes and is dropped here.
  bool finished = false;
  while (!finished) {
    absl::Time until = request->deadline;
    if (cancelled) until = std::min(until, absl::Now() + kCancelPoll);
    finished = request->done.WaitForNotificationWithDeadline(until);
    if (finished) break;
    if (cancelled && cancelled()) {
      scheduler_->Withdraw(request);  // if still queued; else the batch drops it
      return absl::CancelledError("the caller cancelled the request");
    }
    if (absl::Now() >= request->deadline) {
      scheduler_->Withdraw(request);  // if still queued; else the batch drops it
      return absl::DeadlineExceededError(
          absl::StrCat("deadline exceeded after ",
                       absl::FormatDuration(absl::Now() - request->enqueued), " in the queue"));
    }
  }
  if (!request->status.ok()) return request->status;
  std::vector<PredictOutput> outputs(request->rows.size());
  const double queue_s = absl::ToDoubleSeconds(request->started - request->enqueued);
  const double model_s = absl::ToDoubleSeconds(request->finished - request->started);
  for (size_t i = 0; i < request->rows.size(); ++i) {
    const InferenceRow& row = request->rows[i];
    RowResult& res = request->results[i];
    const TaskRecord& task = row.family->record.tasks[row.task];
    PredictOutput& out = outputs[i];
    out.input_index = input_of_row[i];
    out.task = task.name;
    out.task_index = row.task;
    out.label = res.label;
    out.regression = res.regression;
    if (!res.regression && res.label >= 0 &&
        res.label < static_cast<int64_t>(task.label_names.size())) {
      out.label_name = task.label_names[res.label];
    }
    out.scores = std::move(res.scores);
    out.queue_seconds = queue_s;
    out.model_seconds = model_s;
  }
  return outputs;
}

}  // namespace metatt
