#include "server/store/job_types.h"

#include "base/enum_names.h"

namespace metatt {

namespace {
constexpr EnumName<JobState> kJobStates[] = {
    {JobState::kQueued, "QUEUED"},   {JobState::kValidating, "VALIDATING"},
    {JobState::kRunning, "RUNNING"}, {JobState::kSucceeded, "SUCCEEDED"},
    {JobState::kFailed, "FAILED"},   {JobState::kCancelled, "CANCELLED"},
};
}  // namespace

const char* JobStateName(JobState s) { return NameOf(kJobStates, s, "UNKNOWN"); }

std::optional<JobState> JobStateFromName(const std::string& name) {
  return ValueOf(kJobStates, name);
}

bool IsTerminal(JobState s) {
  return s == JobState::kSucceeded || s == JobState::kFailed || s == JobState::kCancelled;
}

}  // namespace metatt
