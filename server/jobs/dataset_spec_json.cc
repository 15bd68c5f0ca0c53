#include "server/jobs/dataset_spec_json.h"

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "base/enum_names.h"
#include "base/status_macros.h"

namespace metatt {

namespace {
constexpr EnumName<DataFormat> kFormatNames[] = {
    {DataFormat::kTsv, "tsv"}, {DataFormat::kCsv, "csv"}, {DataFormat::kJsonl, "jsonl"}};
const char* FormatName(DataFormat f) { return NameOf(kFormatNames, f, "tsv"); }
std::string ColumnSpec(const ColumnRef& c) {
  return c.name.empty() ? std::to_string(c.index) : c.name;
}
}  // namespace

std::string DatasetSpecToJson(const DatasetSpec& spec) {
  nlohmann::json j;
  j["format"] = FormatName(spec.format);
  j["has_header"] = spec.has_header;
  j["text_column"] = ColumnSpec(spec.text);
  if (spec.text_pair) j["text_pair_column"] = ColumnSpec(*spec.text_pair);
  j["label_column"] = ColumnSpec(spec.label);
  j["label_kind"] = spec.label_kind == LabelKind::kRegression ? "regression" : "classification";
  j["quoting"] = spec.quoting;
  if (!spec.label_vocab.empty()) j["label_vocab"] = spec.label_vocab;
  return j.dump();
}

absl::StatusOr<DatasetSpec> DatasetSpecFromJson(const std::string& text) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("dataset spec: not JSON: ", e.what()));
  }
  DatasetSpec spec;
  try {
    ASSIGN_OR_RETURN(spec.format, ParseDataFormat(j.value("format", std::string("tsv"))));
    spec.has_header = j.value("has_header", true);
    // Long keys (the DatasetHeader field names) first, short ones accepted.
    auto str = [&j](const char* key, const char* short_key, const char* def) {
      if (j.contains(key)) return j[key].get<std::string>();
      if (j.contains(short_key)) return j[short_key].get<std::string>();
      return std::string(def);
    };
    std::string text_col = str("text_column", "text", "0");
    if (text_col.empty()) return absl::InvalidArgumentError("text_column: required");
    spec.text = ColumnRef::Parse(text_col);
    std::string pair = str("text_pair_column", "text_pair", "");
    if (!pair.empty()) spec.text_pair = ColumnRef::Parse(pair);
    std::string label = str("label_column", "label", "1");
    if (label.empty()) return absl::InvalidArgumentError("label_column: required");
    spec.label = ColumnRef::Parse(label);
    ASSIGN_OR_RETURN(spec.label_kind,
                     ParseLabelKind(j.value("label_kind", std::string("classification"))));
    spec.quoting = j.value("quoting", true);
    spec.label_vocab = j.value("label_vocab", std::vector<std::string>{});
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("dataset spec: ", e.what()));
  }
  return spec;
}

absl::StatusOr<std::optional<GenerationSpec>> GenerationSpecFromJson(const std::string& text) {
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return std::optional<GenerationSpec>();
  auto kind = j.find("label_kind");
  if (kind == j.end() || !kind->is_string() || kind->get<std::string>() != "generation") {
    return std::optional<GenerationSpec>();
  }
  GenerationSpec spec;
  auto f = j.find("generation_format");
  if (f != j.end()) {
    if (!f->is_string()) return absl::InvalidArgumentError("generation_format: must be a string");
    auto format = ParseGenerationFormat(f->get<std::string>());
    if (!format.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("generation_format: ", format.status().message()));
    }
    spec.format = *format;
  }
  return std::optional<GenerationSpec>(spec);
}

absl::StatusOr<ParsedDatasetInfo> ParseUploadedDataset(const std::string& bytes,
                                                       const std::string& spec_json) {
  ASSIGN_OR_RETURN(std::optional<GenerationSpec> gen, GenerationSpecFromJson(spec_json));
  if (gen.has_value()) {
    ASSIGN_OR_RETURN(GenerationDataset ds, ParseGenerationDataset(bytes, *gen));
    ParsedDatasetInfo info;
    info.num_rows = static_cast<int64_t>(ds.size());
    return info;
  }
  ASSIGN_OR_RETURN(DatasetSpec spec, DatasetSpecFromJson(spec_json));
  ASSIGN_OR_RETURN(Dataset ds, ParseDataset(bytes, spec));
  ParsedDatasetInfo info;
  info.num_rows = static_cast<int64_t>(ds.size());
  info.regression = ds.label_kind == LabelKind::kRegression;
  if (!info.regression) info.label_names = ds.label_vocab;
  return info;
}

}  // namespace metatt
