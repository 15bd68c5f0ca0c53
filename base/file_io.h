// Torch-free file helpers shared by every layer.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace metatt {

// Writes atomically: to `path.tmp.<pid>`, fsync, rename, fsync the directory.
absl::Status WriteFileAtomically(const std::string& path, const std::string& bytes);
absl::StatusOr<std::string> ReadFileToString(const std::string& path);
// FNV-1a 64 of `bytes` as 16 hex digits: the content check recorded next to
// a file (family.json, appended.json).
std::string Fnv1a64Hex(const std::string& bytes);
// fsync of a directory (after a rename or create in it: the entry is durable).
absl::Status SyncDirectory(const std::string& dir);

}  // namespace metatt
