// Save/load of a MetaTT adapter family: one directory with
//   cores.safetensors  every core leaf ("core.<name>", e.g. core.in,
//                      core.task.3) and every prediction head ("head.<key>")
//   family.json        format_version, the adapter config (form, current
//                      ranks, projections, layers, alpha, init, dims), the
//                      fixed scale s, tasks (name + index), base model id,
//                      base config fingerprint, and the size + FNV-1a-64 hash
//                      of cores.safetensors; optionally an "extra" object
//                      that the library keeps verbatim (the server's registry
//                      records pooling, max_length and task records there).
// Heads: a family holds either layout, or both (a stacked family extended by
// metatt-train --base_family):
//   per task  "<task>.weight" [n, D], "<task>.bias" [n]       (metatt-train)
//   stacked   "stacked.weight" [T, max_n, D], "stacked.bias" [T, max_n],
//             "stacked.num_labels" int64 [T]                (the registry;
//             a million tasks are three tensors, not two million)
// FamilyTaskHead() reads task t's head from either.
// Both files are written atomically (temp + fsync + rename); family.json is
// written last and is the commit point. Loading checks the fingerprint, the
// file hash and every tensor's shape against the metadata; the round trip is
// bit-exact.
#pragma once

#include <torch/torch.h>

#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "adapters/lora_adapter.h"
#include "adapters/metatt_adapter.h"

namespace metatt {

inline constexpr int kFamilyFormatVersion = 1;
inline constexpr char kFamilyCoresFile[] = "cores.safetensors";
inline constexpr char kFamilyMetaFile[] = "family.json";

// `extra`: null or a JSON object stored as family.json "extra".
absl::Status SaveFamily(const std::string& dir, const MetaTTAdapter& adapter,
                        const std::vector<std::string>& task_names,
                        const std::map<std::string, torch::Tensor>& heads,
                        const std::string& base_model_id,
                        const std::string& base_config_fingerprint,
                        const nlohmann::json& extra = nlohmann::json());

struct LoadedFamily {
  std::unique_ptr<MetaTTAdapter> adapter;
  std::vector<std::string> task_names;  // index = task index
  std::map<std::string, torch::Tensor> heads;
  std::string base_model_id;
  std::string base_config_fingerprint;
  nlohmann::json extra;  // null when the family has none
};

// Head of task `t` (weight [n, D], bias [n]) in either layout; per-task
// tensors win over the stacked ones. NOT_FOUND when the family has none.
absl::StatusOr<std::pair<torch::Tensor, torch::Tensor>> FamilyTaskHead(const LoadedFamily& family,
                                                                       int64_t t);

// `expected_fingerprint` is the fingerprint of the base model the caller will
// run the family on; a different recorded fingerprint is FAILED_PRECONDITION
// naming both. Missing/corrupt files or tensors that disagree with the
// metadata are errors naming the file or tensor.
// `leaves`: kFrozen for a family that will only be served or copied (no
// per-task leaf tensor: a family may hold 10^6 tasks).
absl::StatusOr<LoadedFamily> LoadFamily(
    const std::string& dir, const std::string& expected_fingerprint,
    torch::Device device = torch::kCPU,
    MetaTTAdapter::Leaves leaves = MetaTTAdapter::Leaves::kTrainable);

// ---------------------------------------------------------------------------
// LoRA families (adapters/FORMAT.md "LoRA families"): a PEFT folder
// (adapter_config.json + adapter_model.safetensors, PEFT's key names for a
// transformers BertModel or LlamaModel) with heads.safetensors ("<task>.weight"
// [n, D], "<task>.bias" [n]) and family.json (format_version 1, config.form
// "lora", tasks, fingerprint, the files' sizes and hashes, `extra`) beside it.
inline constexpr char kPeftConfigFile[] = "adapter_config.json";
inline constexpr char kPeftWeightsFile[] = "adapter_model.safetensors";
inline constexpr char kFamilyHeadsFile[] = "heads.safetensors";

// The two PEFT files of `adapter` (name -> bytes). target_modules is a list of
// module names, or an exact regular expression when a list would also match
// modules that are not adapted (ffn_down without o; a subset of layers).
absl::StatusOr<std::map<std::string, std::string>> PeftFiles(const LoraAdapter& adapter,
                                                            const std::string& base_model_id);

// The LoRA config as family.json / the store record show it (form "lora").
nlohmann::json LoraConfigJson(const LoraConfig& config);

// `heads`: "<task>.weight" / "<task>.bias" for every task in `task_names`.
absl::Status SaveLoraFamily(const std::string& dir, const LoraAdapter& adapter,
                            const std::vector<std::string>& task_names,
                            const std::map<std::string, torch::Tensor>& heads,
                            const std::string& base_model_id,
                            const std::string& base_config_fingerprint,
                            const nlohmann::json& extra = nlohmann::json());

struct LoadedLoraFamily {
  std::unique_ptr<LoraAdapter> adapter;
  std::vector<std::string> task_names;         // index = task index
  std::map<std::string, torch::Tensor> heads;  // "<task>.weight" / ".bias"
  std::string base_config_fingerprint;         // "" for a PEFT folder without family.json
  nlohmann::json extra;                        // null when absent
  bool has_family_json = false;
};

// True when `dir` holds a LoRA family or a PEFT folder (adapter_config.json).
bool IsLoraFamilyDir(const std::string& dir);
// Reads a LoRA family, or a PEFT LoRA folder trained elsewhere with
// heads.safetensors beside it (family.json optional: tasks are then the
// heads' names in sorted order). Checks format_version, the fingerprint
// (FAILED_PRECONDITION naming both), the recorded sizes and hashes, and
// that every head reads the adapter's hidden width. `options` as
// LoadPeftAdapter's (the base model's dimensions when known).
absl::StatusOr<LoadedLoraFamily> LoadLoraFamily(const std::string& dir,
                                                const std::string& expected_fingerprint,
                                                const LoadPeftOptions& options = {});

}  // namespace metatt
