// Paging through the tasks of a family version (AdapterService: ListTasks,
// and the first tasks inlined into FamilyVersion). A family can hold 10^6
// tasks, far past one gRPC message: responses carry pages, read in place from
// the version's record. Torch-free.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/store/store.h"

namespace metatt {

// Tasks a FamilyVersion carries in ListFamilies / GetFamily / DeleteTask
// (the first ones by index); its task_count says how many there are.
inline constexpr int64_t kInlineFamilyTasks = 100;
inline constexpr int64_t kDefaultTaskPageSize = 1000;  // page_size 0
inline constexpr int64_t kMaxTaskPageSize = 10000;     // larger page_size is taken as this

// The tasks a FamilyVersion inlines: [0, min(count, kInlineFamilyTasks)).
inline int64_t InlineTaskCount(const FamilyVersionRecord& v) {
  return std::min<int64_t>(static_cast<int64_t>(v.tasks.size()), kInlineFamilyTasks);
}

// One page: version.tasks[begin, end). `version` is moved out of the list
// handed in (no task record is copied).
struct TaskPage {
  FamilyVersionRecord version;
  int64_t begin = 0;
  int64_t end = 0;
  std::string next_page_token;  // "" on the last page
};

// A page of `version` (0 = latest, or the version `page_token` pins) of the
// family whose versions (oldest first, not empty) are `versions`.
// page_size: 0 = kDefaultTaskPageSize, above kMaxTaskPageSize is clamped,
// < 0 INVALID_ARGUMENT naming page_size. page_token: "" = first page, else a
// next_page_token of an earlier page; a malformed one, one past the version's
// tasks or one issued for another version is INVALID_ARGUMENT naming
// page_token. A missing version is NOT_FOUND.
absl::StatusOr<TaskPage> PageTasks(std::vector<FamilyVersionRecord> versions, int64_t version,
                                   int64_t page_size, const std::string& page_token);

// The same in two steps, for a caller that reads the one version itself
// (FamilyAccess::Version) instead of every version's tasks:
// 1. the version a request names: `version` (0 = latest) or the one its
//    page_token pins; INVALID_ARGUMENT as above.
absl::StatusOr<int64_t> TaskPageVersion(int64_t version, const std::string& page_token);
// 2. the page of that version's record (read in full).
struct TaskRange {
  int64_t begin = 0;
  int64_t end = 0;
  std::string next_page_token;  // "" on the last page
};
absl::StatusOr<TaskRange> PageTaskRange(const FamilyVersionRecord& version, int64_t page_size,
                                        const std::string& page_token);

}  // namespace metatt
