// Random identifiers for jobs and datasets ("job-3f9c2a..."). Torch-free.
#pragma once

#include <string>

namespace metatt {

// `prefix` + "-" + 16 lowercase hex digits from a process-wide random source.
std::string NewId(const std::string& prefix);

}  // namespace metatt
