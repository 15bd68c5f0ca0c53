// Text-classification / regression datasets read from TSV, CSV or JSONL.
//
// Parsing is all-or-nothing: every bad line is collected with its 1-based line
// number and a reason, and a file with any bad line is refused as a whole
// (INVALID_ARGUMENT listing the first bad lines and the total count). A file is
// never half-read.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace metatt {

enum class DataFormat { kTsv, kCsv, kJsonl };
enum class LabelKind { kClassification, kRegression };

absl::StatusOr<DataFormat> ParseDataFormat(const std::string& name);  // tsv|csv|jsonl
absl::StatusOr<LabelKind> ParseLabelKind(const std::string& name);  // classification|regression

// A column, by header name or by 0-based index. JSONL columns are keys (a
// numeric spec "3" is the key "3").
struct ColumnRef {
  std::string name;   // used when non-empty
  int index = -1;     // used when name is empty
  static ColumnRef Index(int i) { return ColumnRef{"", i}; }
  static ColumnRef Name(std::string n) { return ColumnRef{std::move(n), -1}; }
  // "3" -> index 3, anything else -> name.
  static ColumnRef Parse(const std::string& spec);
  std::string DebugString() const;
};

struct DatasetSpec {
  DataFormat format = DataFormat::kTsv;
  bool has_header = true;  // ignored for JSONL
  ColumnRef text = ColumnRef::Index(0);
  std::optional<ColumnRef> text_pair;
  ColumnRef label = ColumnRef::Index(1);
  LabelKind label_kind = LabelKind::kClassification;
  // Double-quote quoting (RFC 4180). Off for GLUE TSV files, whose sentences
  // hold unbalanced quotes.
  bool quoting = true;
  // Fixed label vocabulary (an eval set uses its train set's). Empty: derive
  // it from the data (integers as-is: "0".."max"; otherwise sorted strings).
  std::vector<std::string> label_vocab;
  // Name used in error messages.
  std::string origin = "dataset";
};

// Specs for the GLUE TSV files in shared/data/glue: "MRPC", "CoLA", "SST-2",
// "STS-B", "RTE" (case-insensitive, "SST2"/"STSB" accepted). RTE's labels are
// the words "not_entailment" (id 0) and "entailment" (id 1).
absl::StatusOr<DatasetSpec> GluePreset(const std::string& task_name);
// The primary metric GLUE reports for a task ("f1_acc", "mcc", "accuracy",
// "pearson_spearman"); see metrics.h.
absl::StatusOr<std::string> GluePrimaryMetric(const std::string& task_name);
// Canonical spelling ("MRPC", "CoLA", "SST-2", "STS-B", "RTE").
absl::StatusOr<std::string> CanonicalGlueName(const std::string& task_name);

struct Example {
  std::string text;
  std::optional<std::string> text_pair;
  int64_t label_id = 0;     // classification
  float label_value = 0.f;  // regression
  int line = 0;             // 1-based line where the record starts
};

struct Dataset {
  std::vector<Example> examples;
  LabelKind label_kind = LabelKind::kClassification;
  std::vector<std::string> label_vocab;  // classification: index -> label string
  int64_t num_labels() const {
    return label_kind == LabelKind::kRegression ? 1
                                                : static_cast<int64_t>(label_vocab.size());
  }
  size_t size() const { return examples.size(); }
};

struct BadLine {
  int line = 0;
  std::string reason;
};

// Parses a whole file's bytes. On failure, `bad_lines` (if given) receives
// every bad line; the status lists the first kMaxReportedBadLines.
constexpr int kMaxReportedBadLines = 20;
absl::StatusOr<Dataset> ParseDataset(const std::string& bytes, const DatasetSpec& spec,
                                     std::vector<BadLine>* bad_lines = nullptr);
absl::StatusOr<Dataset> ReadDataset(const std::string& path, DatasetSpec spec);

// Calls fn(line number from 1, the line) for every '\n'-separated line of
// `text`, a trailing '\r' dropped (the JSONL readers of both parsers).
void ForEachLine(const std::string& text, const std::function<void(int, std::string)>& fn);

// The refusal of a file with bad lines (the classification and generation
// parsers alike): INVALID_ARGUMENT "<origin>: N bad <unit>s; file refused:"
// listing the first kMaxReportedBadLines; `bad` moves to *bad_lines_out
// when given. `unit`: "line" or "record".
absl::Status BadLinesError(const std::string& origin, const char* unit,
                           std::vector<BadLine> bad, std::vector<BadLine>* bad_lines_out);

}  // namespace metatt
