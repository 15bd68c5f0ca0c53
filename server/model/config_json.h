// What the two config.json readers (BertConfig, LlamaConfig) share: the
// document parsed as one JSON object, and the error that names a field.
// Header-only, torch-free.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace metatt::config_json {

// INVALID_ARGUMENT "<origin>: field '<field>' <why>".
inline absl::Status Bad(const std::string& origin, const std::string& field,
                        const std::string& why) {
  return absl::InvalidArgumentError(absl::StrCat(origin, ": field '", field, "' ", why));
}

// `text` parsed; INVALID_ARGUMENT "<origin>: not a JSON object" when it is not one.
inline absl::StatusOr<nlohmann::json> ParseObject(const std::string& text,
                                                 const std::string& origin) {
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object())
    return absl::InvalidArgumentError(absl::StrCat(origin, ": not a JSON object"));
  return j;
}

}  // namespace metatt::config_json
