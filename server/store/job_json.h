// JSON (de)serialisation of the plain job types, used by the SQLite store's
// JSON columns and by tools. Torch-free, protobuf-free.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/store/job_types.h"
#include "server/store/store.h"

namespace metatt {

// JobStateFromName is beside JobStateName in job_types.h.
const char* JobKindName(JobKind k);  // "TRAIN_FAMILY" ...
std::optional<JobKind> JobKindFromName(const std::string& name);

std::string JobSpecToJson(const JobSpec& spec);
absl::StatusOr<JobSpec> JobSpecFromJson(const std::string& json);

std::string JobEventToJson(const JobEvent& e);
absl::StatusOr<JobEvent> JobEventFromJson(const std::string& json);

std::string TasksToJson(const std::vector<TaskRecord>& tasks);
absl::StatusOr<std::vector<TaskRecord>> TasksFromJson(const std::string& json);

}  // namespace metatt
