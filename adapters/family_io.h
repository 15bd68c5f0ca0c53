// Save/load of a MetaTT adapter family: one directory with
//   cores.safetensors  every core leaf ("core.<name>", e.g. core.in,
//                      core.task.3) and every prediction head ("head.<key>")
//   family.json        format_version, the adapter config (form, current
//                      ranks, projections, layers, alpha, init, dims), the
//                      fixed scale s, tasks (name + index), base model id,
//                      base config fingerprint, and the size + FNV-1a-64 hash
//                      of cores.safetensors.
// Both files are written atomically (temp + fsync + rename); family.json is
// written last and is the commit point. Loading checks the fingerprint, the
// file hash and every tensor's shape against the metadata; the round trip is
// bit-exact.
#pragma once

#include <torch/torch.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "adapters/metatt_adapter.h"

namespace metatt {

inline constexpr int kFamilyFormatVersion = 1;

absl::Status SaveFamily(const std::string& dir, const MetaTTAdapter& adapter,
                        const std::vector<std::string>& task_names,
                        const std::map<std::string, torch::Tensor>& heads,
                        const std::string& base_model_id,
                        const std::string& base_config_fingerprint);

struct LoadedFamily {
  std::unique_ptr<MetaTTAdapter> adapter;
  std::vector<std::string> task_names;  // index = task index
  std::map<std::string, torch::Tensor> heads;
  std::string base_model_id;
  std::string base_config_fingerprint;
};

// `expected_fingerprint` is the fingerprint of the base model the caller will
// run the family on; a different recorded fingerprint is FAILED_PRECONDITION
// naming both. Missing/corrupt files or tensors that disagree with the
// metadata are errors naming the file or tensor.
absl::StatusOr<LoadedFamily> LoadFamily(const std::string& dir,
                                        const std::string& expected_fingerprint,
                                        torch::Device device = torch::kCPU);

}  // namespace metatt
