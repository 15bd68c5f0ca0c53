// libFuzzer target: server/store/json_slice.h JsonArraySlice() on arbitrary
// text (the hand-written scanner that serves the first tasks of a family
// without parsing its whole task list).
//
// Input layout: byte 0 = first element, byte 1 = count (255 = to the end),
// rest = the JSON text.
// Invariants: never a crash or a sanitizer report; when the whole text is a
// JSON array (nlohmann parses it), the slice succeeds and parses to exactly
// the elements [first, first + count) of the full parse.
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "server/store/json_slice.h"
#include "tests/fuzz/fuzz_check.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  const int64_t first = data[0] % 16;
  const int64_t count = data[1] == 255 ? -1 : data[1] % 16;
  const std::string text(reinterpret_cast<const char*>(data + 2), size - 2);
  auto slice = metatt::JsonArraySlice(text, first, count);
  nlohmann::json all = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (all.is_discarded() || !all.is_array()) return 0;
  FUZZ_CHECK(slice.ok());
  nlohmann::json got = nlohmann::json::parse(*slice, nullptr, /*allow_exceptions=*/false);
  FUZZ_CHECK(!got.is_discarded());
  nlohmann::json want = nlohmann::json::array();
  for (int64_t i = first; i < static_cast<int64_t>(all.size()) && (count < 0 || i < first + count);
       ++i)
    want.push_back(all[i]);
  FUZZ_CHECK(got == want);
  return 0;
}
