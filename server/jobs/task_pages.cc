#include "server/jobs/task_pages.h"

#include <algorithm>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "base/status_macros.h"

namespace metatt {
namespace {

// Tokens read "<version>:<first task index>", e.g. "3:5000": the version they
// were issued for keeps the pages of one listing consistent.
struct Token {
  int64_t version = 0;
  int64_t offset = 0;
};

absl::StatusOr<Token> ParseToken(const std::string& token) {
  std::vector<std::string> parts = absl::StrSplit(token, ':');
  Token t;
  if (parts.size() != 2 || !absl::SimpleAtoi(parts[0], &t.version) ||
      !absl::SimpleAtoi(parts[1], &t.offset) || t.version <= 0 || t.offset <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("page_token: invalid token '", token,
                                                   "' (pass a next_page_token back unchanged)"));
  }
  return t;
}

}  // namespace

absl::StatusOr<int64_t> TaskPageVersion(int64_t version, const std::string& page_token) {
  if (version < 0) return absl::InvalidArgumentError("version: must be >= 0 (0 = latest)");
  if (page_token.empty()) return version;
  ASSIGN_OR_RETURN(Token token, ParseToken(page_token));
  if (version != 0 && version != token.version) {
    return absl::InvalidArgumentError(absl::StrCat("page_token: issued for version ",
                                                   token.version, ", the request names version ",
                                                   version));
  }
  return token.version;
}

absl::StatusOr<TaskRange> PageTaskRange(const FamilyVersionRecord& version, int64_t page_size,
                                        const std::string& page_token) {
  if (page_size < 0) return absl::InvalidArgumentError("page_size: must be >= 0 (0 = 1000)");
  page_size = page_size == 0 ? kDefaultTaskPageSize : std::min(page_size, kMaxTaskPageSize);
  Token token;
  if (!page_token.empty()) {
    ASSIGN_OR_RETURN(token, ParseToken(page_token));
  }
  const auto count = static_cast<int64_t>(version.tasks.size());
  if (token.offset >= count && token.offset > 0) {
    return absl::InvalidArgumentError(absl::StrCat("page_token: '", page_token, "' is past the ",
                                                   count, " tasks of version ", version.version));
  }
  TaskRange r;
  r.begin = token.offset;
  r.end = std::min(count, r.begin + page_size);
  if (r.end < count) r.next_page_token = absl::StrCat(version.version, ":", r.end);
  return r;
}

absl::StatusOr<TaskPage> PageTasks(std::vector<FamilyVersionRecord> versions, int64_t version,
                                   int64_t page_size, const std::string& page_token) {
  if (versions.empty()) return absl::NotFoundError("family: no versions");
  if (version < 0) return absl::InvalidArgumentError("version: must be >= 0 (0 = latest)");
  if (page_size < 0) return absl::InvalidArgumentError("page_size: must be >= 0 (0 = 1000)");
  ASSIGN_OR_RETURN(version, TaskPageVersion(version, page_token));
  const std::string& family = versions.back().family;
  auto it = versions.end() - 1;
  if (version != 0) {
    it = std::find_if(versions.begin(), versions.end(),
                      [&](const FamilyVersionRecord& v) { return v.version == version; });
    if (it == versions.end()) {
      return absl::NotFoundError(absl::StrCat("family '", family, "' has no version ", version,
                                              " (latest is ", versions.back().version, ")"));
    }
  }
  TaskPage page;
  page.version = std::move(*it);
  ASSIGN_OR_RETURN(TaskRange r, PageTaskRange(page.version, page_size, page_token));
  page.begin = r.begin;
  page.end = r.end;
  page.next_page_token = std::move(r.next_page_token);
  return page;
}

}  // namespace metatt
