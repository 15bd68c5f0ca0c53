// A small, strict reader/writer for the safetensors format
// (https://huggingface.co/docs/safetensors): 8-byte little-endian header
// length, a JSON header {name: {dtype, shape, data_offsets}}, then raw data.
// Every malformed file yields an absl::Status naming the file and the tensor
// or header field; never a crash.
#pragma once

#include <map>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "absl/status/statusor.h"
#include "base/file_io.h"

namespace metatt {

struct SafetensorsFile {
  std::map<std::string, torch::Tensor> tensors;  // CPU, contiguous, owned
  std::map<std::string, std::string> metadata;   // the optional "__metadata__"
};

// Parses a whole safetensors buffer. `origin` names it in errors.
absl::StatusOr<SafetensorsFile> ParseSafetensors(const std::string& bytes,
                                                 const std::string& origin);
absl::StatusOr<SafetensorsFile> ReadSafetensors(const std::string& path);

// Serialises tensors (moved to CPU, made contiguous) in sorted name order, so
// the same tensors always give the same bytes.
absl::StatusOr<std::string> SerializeSafetensors(
    const std::map<std::string, torch::Tensor>& tensors,
    const std::map<std::string, std::string>& metadata = {});

// Writes atomically: to `path.tmp.<pid>`, fsync, rename, fsync the directory.
absl::Status WriteSafetensors(const std::string& path,
                              const std::map<std::string, torch::Tensor>& tensors,
                              const std::map<std::string, std::string>& metadata = {});


}  // namespace metatt
