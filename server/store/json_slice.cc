#include "server/store/json_slice.h"

#include <cctype>

#include "absl/strings/str_cat.h"

namespace metatt {

absl::StatusOr<std::string> JsonArraySlice(const std::string& json, int64_t first, int64_t count) {
  auto bad = [](const char* why) {
    return absl::DataLossError(absl::StrCat("task list: malformed JSON array (", why, ")"));
  };
  if (first < 0) return absl::InvalidArgumentError("first: must be >= 0");
  size_t i = 0;
  while (i < json.size() && std::isspace(static_cast<unsigned char>(json[i]))) ++i;
  if (i == json.size() || json[i] != '[') return bad("no '['");
  ++i;
  if (count == 0) return std::string("[]");
  const int64_t stop = count < 0 ? INT64_MAX : first + count;  // element index to stop at
  int64_t index = 0;   // element being scanned
  size_t begin = 0;    // offset of element `first`
  size_t end = 0;      // offset just past element stop - 1
  bool have_begin = false;
  bool empty = true;   // no element seen yet (for "[]")
  int depth = 0;       // nesting inside the current element
  bool done = false;
  if (first == 0) {
    begin = i;
    have_begin = true;
  }
  for (; i < json.size() && !done; ++i) {
    const char c = json[i];
    if (c == '"') {
      empty = false;
      for (++i; i < json.size() && json[i] != '"'; ++i) {
        if (json[i] == '\\') ++i;
      }
      if (i >= json.size()) return bad("unterminated string");
      continue;
    }
    if (c == '{' || c == '[') {
      ++depth;
      empty = false;
    } else if (c == '}' || (c == ']' && depth > 0)) {
      if (--depth < 0) return bad("unbalanced brackets");
    } else if (c == ']') {  // the array's end
      end = i;
      if (empty) index = -1;  // "[]" holds no element
      done = true;
    } else if (c == ',' && depth == 0) {
      ++index;
      if (index == first) {
        begin = i + 1;
        have_begin = true;
      }
      if (index == stop) {
        end = i;
        done = true;
      }
    } else if (!std::isspace(static_cast<unsigned char>(c))) {
      empty = false;
    }
  }
  if (!done) return bad("no closing ']'");
  if (!have_begin || index < first || begin > end) return std::string("[]");
  return absl::StrCat("[", json.substr(begin, end - begin), "]");
}

}  // namespace metatt
