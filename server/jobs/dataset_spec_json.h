// The JSON form of a DatasetSpec stored with every dataset record
// (DatasetRecord::spec_json), and the parse function main injects into the
// DatasetManager. This header is torch-free; its library compiles against
// server/training (which links LibTorch PRIVATE), so gRPC targets may link it.
//
// JSON (keys = DatasetHeader field names; "text", "text_pair", "label"
// accepted on input): {"format": "tsv", "has_header": true,
//        "text_column": "sentence1", "text_pair_column": "sentence2" (optional),
//        "label_column": "0" (digits = index),
//        "label_kind": "classification" | "regression", "quoting": false,
//        "label_vocab": ["0", "1"] (optional)}
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "server/jobs/dataset_manager.h"
#include <optional>

#include "server/training/dataset.h"
#include "server/training/generation_dataset.h"

namespace metatt {

std::string DatasetSpecToJson(const DatasetSpec& spec);
// INVALID_ARGUMENT naming the field.
absl::StatusOr<DatasetSpec> DatasetSpecFromJson(const std::string& json);

// Generation datasets (decoder servers): {"label_kind": "generation",
// "generation_format": "auto" | "prompt_completion" | "instruction" | "chat"}
// (server/training/generation_dataset.h). std::nullopt when `json` is not a
// generation spec; INVALID_ARGUMENT naming the field when it is a bad one.
absl::StatusOr<std::optional<GenerationSpec>> GenerationSpecFromJson(const std::string& json);

// DatasetParseFn backed by ParseDataset (ParseGenerationDataset for a
// generation spec): every bad line in the status.
absl::StatusOr<ParsedDatasetInfo> ParseUploadedDataset(const std::string& bytes,
                                                       const std::string& spec_json);

}  // namespace metatt
