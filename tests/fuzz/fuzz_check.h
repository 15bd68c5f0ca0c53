// Shared check macros for the fuzz targets.
//
// FUZZ_CHECK(cond): an invariant; a violation aborts (libFuzzer saves a
// reproducer).
// FUZZ_CHECK_KNOWN(id, cond): an invariant already reported as finding `id`
// (see tests/fuzz/regressions/README.md). It aborts like FUZZ_CHECK unless
// `id` is listed in the comma-separated env var METATT_FUZZ_KNOWN, so a
// campaign can keep running while the fix is pending. Remove the id from the
// env (default: empty) once fixed.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#define FUZZ_CHECK(cond)                                                        \
  do {                                                                          \
    if (!(cond)) {                                                              \
      std::fprintf(stderr, "FUZZ_CHECK failed: %s (%s:%d)\n", #cond, __FILE__, \
                   __LINE__);                                                   \
      std::abort();                                                             \
    }                                                                           \
  } while (0)

namespace metatt_fuzz {
inline bool KnownFinding(const char* id) {
  const char* env = std::getenv("METATT_FUZZ_KNOWN");
  if (env == nullptr) return false;
  const std::string list = std::string(",") + env + ",";
  return list.find(std::string(",") + id + ",") != std::string::npos;
}
}  // namespace metatt_fuzz

#define FUZZ_CHECK_KNOWN(id, cond)                                                    \
  do {                                                                                \
    if (!(cond) && !metatt_fuzz::KnownFinding(id)) {                                  \
      std::fprintf(stderr, "FUZZ_CHECK failed [%s]: %s (%s:%d)\n", id, #cond, __FILE__, \
                   __LINE__);                                                         \
      std::abort();                                                                   \
    }                                                                                 \
  } while (0)
