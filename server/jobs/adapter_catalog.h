// Operations on adapter families that need the registry's tensors (the
// runtime implements this interface; listing comes straight from the Store).
// Torch-free and protobuf-free.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/store/store.h"

namespace metatt {

struct FamilyFile {
  std::string name;  // e.g. "cores.safetensors", "family.json"
  std::string bytes;
};

class AdapterCatalog {
 public:
  virtual ~AdapterCatalog() = default;
  // Publishes a new version of `family` without `task` (the task core keeps
  // its other slices; indices of the remaining tasks are unchanged or
  // documented by the implementation). NOT_FOUND for an unknown family/task.
  virtual absl::StatusOr<FamilyVersionRecord> DeleteTask(const std::string& family,
                                                         const std::string& task) = 0;
  // The files of one published version (version 0 = latest).
  virtual absl::StatusOr<std::vector<FamilyFile>> ExportFamily(const std::string& family,
                                                               int64_t version) = 0;
  // Validates the files against the loaded base model and publishes them as
  // a new family (`family` "" = the name in family.json) owned by `tenant`.
  // ALREADY_EXISTS when the family exists.
  virtual absl::StatusOr<FamilyVersionRecord> ImportFamily(const std::string& family,
                                                           const std::vector<FamilyFile>& files,
                                                           const std::string& tenant) = 0;
};

}  // namespace metatt
