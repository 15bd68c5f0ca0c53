// What the WordPiece and byte-level BPE tokenizers share: code point range
// tables (their generated *_unicode_tables.inc), UTF-8 encoding of one code
// point, and reading a tokenizer file. Header-only, torch-free.
#pragma once

#include <algorithm>
#include <cstddef>
#include <fstream>
#include <sstream>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace metatt {

// An inclusive range of code points; tables are sorted and disjoint.
struct CpRange {
  char32_t lo, hi;
};

template <size_t N>
bool InRanges(const CpRange (&table)[N], char32_t c) {
  const CpRange* end = table + N;
  const CpRange* it =
      std::upper_bound(table, end, c, [](char32_t v, const CpRange& r) { return v < r.lo; });
  return it != table && c <= (it - 1)->hi;
}

inline void AppendUtf8(char32_t c, std::string* out) {
  if (c < 0x80) {
    out->push_back(static_cast<char>(c));
  } else if (c < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (c >> 6)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else if (c < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (c >> 12)));
    out->push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (c >> 18)));
    out->push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  }
}

// The whole file; NOT_FOUND / DATA_LOSS naming `who` (the tokenizer) and the path.
inline absl::StatusOr<std::string> ReadTokenizerFile(const std::string& path,
                                                     const char* who) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(who, ": cannot open '", path, "'"));
  std::stringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat(who, ": cannot read '", path, "'"));
  return ss.str();
}

}  // namespace metatt
