// The on-disk side of the registry: where a family version's files live and
// how they are written, read and cleaned up. The served view
// (adapter_registry.h) decides what to publish and keeps versions resident;
// this file owns the directory layout under <data_dir>/families:
//
//   <family>/v<N>/                 one immutable version
//     cores.safetensors, family.json   a full version (adapters/family_io
//                                      format: every core, stacked heads)
//     appended.safetensors,            an appended version (an add-task
//     appended.json                    publication): only the new task
//                                      slices and head rows, and the version
//                                      they extend
//   <family>/.tmp-v<N>-<host>-<pid>/   a version being written
//   .import-<host>-<pid>-<seq>/        an import being checked
//
// A version directory is written in a scratch directory and renamed into
// place (the parent directory is fsynced); its metadata file is written last
// and is the commit point. An appended version may later also receive a full
// family.json + cores.safetensors (compaction): the same logical version,
// readable without its parents. Torch-free callers never see this file.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>

#include <torch/torch.h>

#include "absl/status/statusor.h"

namespace metatt {

// What an add-task publication adds to its parent version (CPU, float32).
struct AppendedTensors {
  int64_t parent_version = 0;
  torch::Tensor task_slices;  // [k, r3, r4]
  torch::Tensor head_weight;  // [k, n, D] (n = the largest label count of the k)
  torch::Tensor head_bias;    // [k, n]
};

inline constexpr char kAppendedTensorsFile[] = "appended.safetensors";
inline constexpr char kAppendedMetaFile[] = "appended.json";

class FamilyCatalog {
 public:
  // Creates <data_dir>/families and removes scratch directories left by a
  // process that died (same host and gone, or untouched for an hour).
  static absl::StatusOr<std::unique_ptr<FamilyCatalog>> Create(const std::string& data_dir);

  std::string VersionDir(const std::string& family, int64_t version) const;

  // Writes version `version` of `family`: `write` fills a scratch directory,
  // `before_commit` may refuse (e.g. another replica published the version
  // meanwhile), then the directory is renamed into place and its parent
  // fsynced. On error nothing is left behind. Returns the version directory.
  absl::StatusOr<std::string> WriteVersion(
      const std::string& family, int64_t version,
      const std::function<absl::Status(const std::string& dir)>& write,
      const std::function<absl::Status()>& before_commit);
  // Removes a version directory (a version the Store refused).
  void RemoveVersion(const std::string& family, int64_t version);

  // An appended version's files, written into `dir` (appended.json last).
  static absl::Status WriteAppended(const std::string& dir, const AppendedTensors& t);
  // Reads and checks them (size and hash recorded in appended.json, shapes).
  static absl::StatusOr<AppendedTensors> ReadAppended(const std::string& dir);
  // Whether `dir` holds a full family (family.json): a full version, or an
  // appended one that was compacted.
  static bool HoldsFullFamily(const std::string& dir);

  // A scratch directory for checking imported files; removed by the caller.
  absl::StatusOr<std::string> MakeImportScratch();

 private:
  explicit FamilyCatalog(std::string families) : families_(std::move(families)) {}
  std::string families_;  // <data_dir>/families
};

}  // namespace metatt
