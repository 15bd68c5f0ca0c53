// Elements [first, first + count) of a JSON array held as text, found by
// scanning (strings and nesting respected) without parsing the rest: a
// family version's tasks_json can hold 10^6 tasks, and a listing that shows
// its first 100 reads only those. Torch-free.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace metatt {

// "[e_first, ..., e_last]" (fewer at the end, "[]" past it). `count` < 0 =
// to the end. DATA_LOSS when `json` is not a well-formed array up to the
// last element taken.
absl::StatusOr<std::string> JsonArraySlice(const std::string& json, int64_t first, int64_t count);

}  // namespace metatt
