// main() of a command-line tool whose work is one function returning a
// status: parses the flags, runs it, and on failure prints
// "<tool>: <status>" to stderr and exits with `failure_code`. Header-only
// (the tool links absl::flags_parse).
#pragma once

#include <iostream>

#include "absl/flags/parse.h"
#include "absl/status/status.h"

namespace metatt {

template <typename Run>
int ToolMain(int argc, char** argv, const char* tool, Run run, int failure_code = 1) {
  absl::ParseCommandLine(argc, argv);
  const absl::Status st = run();
  if (st.ok()) return 0;
  std::cerr << tool << ": " << st << std::endl;
  return failure_code;
}

}  // namespace metatt
