// Fuzz/sanitizer shim: a torch-free stand-in for adapters/util/safetensors.h.
//
// server/training/dataset.cc includes the real header only for
// ReadFileToString(), but that header pulls in <torch/torch.h>. The torch-free
// fuzzers (and the sanitized dataset/metrics tests) put tests/fuzz/shim first
// on the include path so dataset.cc compiles without LibTorch; the matching
// definitions are in tests/fuzz/shim/file_util_shim.cc. If dataset.cc starts
// using more of the real header, this stops compiling: extend the shim, or
// (better) move the file helpers to a torch-free header.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace metatt {

absl::Status WriteFileAtomically(const std::string& path, const std::string& bytes);
absl::StatusOr<std::string> ReadFileToString(const std::string& path);

}  // namespace metatt
