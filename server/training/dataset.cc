#include "server/training/dataset.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <limits>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/enum_names.h"
#include "base/file_io.h"
#include "base/status_macros.h"

namespace metatt {
namespace {

struct Record {
  int line = 0;
  std::vector<std::string> fields;
  std::string error;  // non-empty: the record itself is malformed
};

bool IsBlank(const std::string& s) {
  return std::all_of(s.begin(), s.end(), [](unsigned char c) { return std::isspace(c); });
}

// Splits delimited text into records. Without quoting a record is one line.
// With quoting, a field starting with '"' runs to the closing quote ("" is an
// escaped quote) and may span lines; the record's line is where it starts.
std::vector<Record> SplitDelimited(const std::string& text, char delim, bool quoting) {
  std::vector<Record> out;
  const size_t n = text.size();
  size_t pos = 0;
  int line = 1;
  while (pos < n) {
    Record rec;
    rec.line = line;
    std::string field;
    bool done = false;
    bool field_start = true;
    while (!done) {
      if (pos >= n) {
        rec.fields.push_back(std::move(field));
        break;
      }
      char c = text[pos];
      if (quoting && field_start && c == '"') {
        // Quoted field.
        ++pos;
        bool closed = false;
        while (pos < n) {
          char q = text[pos];
          if (q == '"') {
            if (pos + 1 < n && text[pos + 1] == '"') {
              field.push_back('"');
              pos += 2;
              continue;
            }
            ++pos;
            closed = true;
            break;
          }
          if (q == '\n') ++line;
          field.push_back(q);
          ++pos;
        }
        if (!closed) {
          rec.error = "unterminated quoted field";
          rec.fields.push_back(std::move(field));
          pos = n;
          break;
        }
        field_start = false;
        // After the closing quote only a delimiter or end of record may follow.
        if (pos < n && text[pos] != delim && text[pos] != '\n' && text[pos] != '\r') {
          rec.error = "characters after a closing quote";
        }
        continue;
      }
      field_start = false;
      if (c == delim) {
        rec.fields.push_back(std::move(field));
        field.clear();
        field_start = true;
        ++pos;
      } else if (c == '\n' || c == '\r') {
        if (c == '\r' && pos + 1 < n && text[pos + 1] == '\n') ++pos;
        ++pos;
        ++line;
        rec.fields.push_back(std::move(field));
        done = true;
      } else {
        field.push_back(c);
        ++pos;
      }
    }
    out.push_back(std::move(rec));
  }
  return out;
}

std::vector<Record> SplitJsonl(const std::string& text) {
  std::vector<Record> out;
  ForEachLine(text, [&](int line, std::string l) {
    Record rec;
    rec.line = line;
    rec.fields.push_back(std::move(l));
    out.push_back(std::move(rec));
  });
  return out;
}

// Resolves a column reference against a header (or none) to an index.
absl::StatusOr<int> ResolveColumn(const ColumnRef& ref, const std::string& role,
                                  const std::vector<std::string>* header) {
  if (ref.name.empty()) {
    if (ref.index < 0) return absl::InvalidArgumentError(absl::StrCat(role, " column is not set"));
    return ref.index;
  }
  if (header == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(role, " column '", ref.name,
                                                   "' given by name but the file has no header"));
  }
  for (size_t i = 0; i < header->size(); ++i) {
    if (absl::StripAsciiWhitespace((*header)[i]) == ref.name) return static_cast<int>(i);
  }
  return absl::InvalidArgumentError(absl::StrCat("line 1: header has no column '", ref.name,
                                                 "' (", role, ")"));
}

// One raw example before label mapping.
struct RawRow {
  int line;
  std::string text;
  std::optional<std::string> pair;
  std::string label;
};

std::string JsonFieldToString(const nlohmann::json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_number_integer()) return std::to_string(v.get<int64_t>());
  if (v.is_boolean()) return v.get<bool>() ? "true" : "false";
  return v.dump();
}

bool ParseNonNegInt(const std::string& s, int64_t* out) {
  if (s.empty() || s.size() > 12) return false;
  for (char c : s)
    if (!std::isdigit(static_cast<unsigned char>(c))) return false;
  return absl::SimpleAtoi(s, out);
}

}  // namespace

ColumnRef ColumnRef::Parse(const std::string& spec) {
  int64_t i;
  if (ParseNonNegInt(spec, &i)) return Index(static_cast<int>(i));
  return Name(spec);
}

std::string ColumnRef::DebugString() const {
  return name.empty() ? absl::StrCat("column ", index) : absl::StrCat("column '", name, "'");
}

namespace {
constexpr EnumName<DataFormat> kDataFormats[] = {{DataFormat::kTsv, "tsv"},
                                                 {DataFormat::kCsv, "csv"},
                                                 {DataFormat::kJsonl, "jsonl"},
                                                 {DataFormat::kJsonl, "ndjson"}};
constexpr EnumName<LabelKind> kLabelKinds[] = {{LabelKind::kClassification, "classification"},
                                               {LabelKind::kRegression, "regression"}};
}  // namespace

absl::StatusOr<DataFormat> ParseDataFormat(const std::string& name) {
  if (auto f = ValueOfIgnoringCase(kDataFormats, name)) return *f;
  return absl::InvalidArgumentError(absl::StrCat("unknown data format '", name,
                                                 "' (tsv, csv or jsonl)"));
}

absl::StatusOr<LabelKind> ParseLabelKind(const std::string& name) {
  if (auto k = ValueOfIgnoringCase(kLabelKinds, name)) return *k;
  return absl::InvalidArgumentError(absl::StrCat("unknown label kind '", name,
                                                 "' (classification or regression)"));
}

absl::StatusOr<std::string> CanonicalGlueName(const std::string& task_name) {
  std::string n = absl::AsciiStrToLower(task_name);
  n.erase(std::remove(n.begin(), n.end(), '-'), n.end());
  if (n == "mrpc") return std::string("MRPC");
  if (n == "cola") return std::string("CoLA");
  if (n == "sst2") return std::string("SST-2");
  if (n == "stsb") return std::string("STS-B");
  if (n == "rte") return std::string("RTE");
  return absl::InvalidArgumentError(absl::StrCat("unknown GLUE task '", task_name,
                                                 "' (MRPC, CoLA, SST-2, STS-B, RTE)"));
}

absl::StatusOr<DatasetSpec> GluePreset(const std::string& task_name) {
  ASSIGN_OR_RETURN(std::string name, CanonicalGlueName(task_name));
  // GLUE's TSV columns: header row, sentence, sentence pair (-1: none), label.
  struct GlueColumns {
    const char* name;
    bool has_header;
    int text, text_pair, label;
  };
  static constexpr GlueColumns kGlue[] = {
      {"MRPC", true, 3, 4, 0}, {"CoLA", false, 3, -1, 1}, {"SST-2", true, 0, -1, 1},
      {"RTE", true, 1, 2, 3},  {"STS-B", true, 7, 8, 9},
  };
  DatasetSpec s;
  s.format = DataFormat::kTsv;
  s.quoting = false;
  s.origin = name;
  for (const GlueColumns& g : kGlue) {
    if (name != g.name) continue;
    s.has_header = g.has_header;
    s.text = ColumnRef::Index(g.text);
    if (g.text_pair >= 0) s.text_pair = ColumnRef::Index(g.text_pair);
    s.label = ColumnRef::Index(g.label);
  }
  if (name == "STS-B") s.label_kind = LabelKind::kRegression;
  if (name == "RTE")
    s.label_vocab = {"not_entailment", "entailment"};
  else if (s.label_kind == LabelKind::kClassification)
    s.label_vocab = {"0", "1"};
  return s;
}

absl::StatusOr<std::string> GluePrimaryMetric(const std::string& task_name) {
  ASSIGN_OR_RETURN(std::string name, CanonicalGlueName(task_name));
  if (name == "MRPC") return std::string("f1_acc");
  if (name == "CoLA") return std::string("mcc");
  if (name == "SST-2" || name == "RTE") return std::string("accuracy");
  return std::string("pearson_spearman");
}

absl::StatusOr<Dataset> ParseDataset(const std::string& bytes_in, const DatasetSpec& spec,
                                     std::vector<BadLine>* bad_lines_out) {
  std::string_view bytes(bytes_in);
  if (bytes.size() >= 3 && bytes.substr(0, 3) == "\xEF\xBB\xBF") bytes.remove_prefix(3);
  const std::string text(bytes);

  std::vector<Record> records =
      spec.format == DataFormat::kJsonl
          ? SplitJsonl(text)
          : SplitDelimited(text, spec.format == DataFormat::kTsv ? '\t' : ',', spec.quoting);

  std::vector<BadLine> bad;
  std::vector<RawRow> rows;
  const bool jsonl = spec.format == DataFormat::kJsonl;
  size_t first = 0;
  int text_col = -1, pair_col = -1, label_col = -1;
  if (!jsonl) {
    const std::vector<std::string>* header = nullptr;
    if (spec.has_header) {
      while (first < records.size() && records[first].fields.size() == 1 &&
             IsBlank(records[first].fields[0]))
        ++first;
      if (first == records.size()) {
        return absl::InvalidArgumentError(absl::StrCat(spec.origin, ": empty file (no header)"));
      }
      header = &records[first].fields;
      ++first;
    }
    auto pick = [&](const ColumnRef& ref, const std::string& role) -> absl::StatusOr<int> {
      auto r = ResolveColumn(ref, role, header);
      if (!r.ok()) return absl::InvalidArgumentError(absl::StrCat(spec.origin, ": ", r.status().message()));
      return r;
    };
    ASSIGN_OR_RETURN(text_col, pick(spec.text, "text"));
    if (spec.text_pair) {
      ASSIGN_OR_RETURN(pair_col, pick(*spec.text_pair, "text_pair"));
    }
    ASSIGN_OR_RETURN(label_col, pick(spec.label, "label"));
  }
  auto key_of = [](const ColumnRef& r) {
    return r.name.empty() ? std::to_string(r.index) : r.name;
  };

  for (size_t i = first; i < records.size(); ++i) {
    const Record& rec = records[i];
    if (rec.fields.size() == 1 && IsBlank(rec.fields[0])) continue;  // blank line
    if (!rec.error.empty()) {
      bad.push_back({rec.line, rec.error});
      continue;
    }
    RawRow row;
    row.line = rec.line;
    std::vector<std::string> reasons;
    if (jsonl) {
      nlohmann::json j = nlohmann::json::parse(rec.fields[0], nullptr, /*allow_exceptions=*/false);
      if (j.is_discarded() || !j.is_object()) {
        bad.push_back({rec.line, "not a JSON object"});
        continue;
      }
      auto get = [&](const ColumnRef& ref, const std::string& role) -> std::optional<std::string> {
        std::string k = key_of(ref);
        auto it = j.find(k);
        if (it == j.end() || it->is_null()) {
          reasons.push_back(absl::StrCat("missing key '", k, "' (", role, ")"));
          return std::nullopt;
        }
        return JsonFieldToString(*it);
      };
      auto t = get(spec.text, "text");
      std::optional<std::string> p;
      if (spec.text_pair) p = get(*spec.text_pair, "text_pair");
      auto l = get(spec.label, "label");
      if (t) row.text = *t;
      if (p) row.pair = *p;
      if (l) row.label = *l;
    } else {
      const int ncols = static_cast<int>(rec.fields.size());
      auto get = [&](int col, const std::string& role) -> std::optional<std::string> {
        if (col >= ncols) {
          reasons.push_back(absl::StrCat("missing column ", col, " (", role, "); the row has ",
                                         ncols, " column", ncols == 1 ? "" : "s"));
          return std::nullopt;
        }
        return rec.fields[col];
      };
      auto t = get(text_col, "text");
      std::optional<std::string> p;
      if (spec.text_pair) p = get(pair_col, "text_pair");
      auto l = get(label_col, "label");
      if (t) row.text = *t;
      if (p) row.pair = *p;
      if (l) row.label = *l;
    }
    if (reasons.empty()) {
      if (IsBlank(row.text)) reasons.push_back("empty text");
      if (spec.text_pair && IsBlank(*row.pair)) reasons.push_back("empty text_pair");
      std::string lab(absl::StripAsciiWhitespace(row.label));
      if (lab.empty()) {
        reasons.push_back("empty label");
      } else if (spec.label_kind == LabelKind::kRegression) {
        double v;
        // Labels are stored as float: a double beyond float range would become inf.
        if (!absl::SimpleAtod(lab, &v) || !std::isfinite(v) ||
            std::fabs(v) > std::numeric_limits<float>::max()) {
          reasons.push_back(absl::StrCat("bad label '", lab, "': not a finite float number"));
        }
      } else if (!spec.label_vocab.empty() &&
                 std::find(spec.label_vocab.begin(), spec.label_vocab.end(), lab) ==
                     spec.label_vocab.end()) {
        reasons.push_back(absl::StrCat("bad label '", lab, "': not one of {",
                                       absl::StrJoin(spec.label_vocab, ", "), "}"));
      }
      row.label = lab;
    }
    if (!reasons.empty()) {
      bad.push_back({rec.line, absl::StrJoin(reasons, "; ")});
      continue;
    }
    rows.push_back(std::move(row));
  }

  if (!bad.empty()) return BadLinesError(spec.origin, "line", std::move(bad), bad_lines_out);
  if (rows.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(spec.origin, ": no examples"));
  }

  Dataset ds;
  ds.label_kind = spec.label_kind;
  std::map<std::string, int64_t> label_index;
  if (spec.label_kind == LabelKind::kClassification) {
    if (!spec.label_vocab.empty()) {
      ds.label_vocab = spec.label_vocab;
    } else {
      std::set<std::string> uniq;
      bool all_int = true;
      int64_t max_int = -1;
      for (const RawRow& r : rows) {
        uniq.insert(r.label);
        int64_t v;
        if (ParseNonNegInt(r.label, &v) && std::to_string(v) == r.label) {
          max_int = std::max(max_int, v);
        } else {
          all_int = false;
        }
      }
      if (all_int && max_int < 100000) {
        for (int64_t v = 0; v <= max_int; ++v) ds.label_vocab.push_back(std::to_string(v));
      } else {
        ds.label_vocab.assign(uniq.begin(), uniq.end());
      }
    }
    for (size_t i = 0; i < ds.label_vocab.size(); ++i) label_index[ds.label_vocab[i]] = i;
  }
  ds.examples.reserve(rows.size());
  for (RawRow& r : rows) {
    Example e;
    e.line = r.line;
    e.text = std::move(r.text);
    e.text_pair = std::move(r.pair);
    if (spec.label_kind == LabelKind::kClassification) {
      e.label_id = label_index.at(r.label);
    } else {
      double v = 0;
      (void)absl::SimpleAtod(r.label, &v);
      e.label_value = static_cast<float>(v);
    }
    ds.examples.push_back(std::move(e));
  }
  return ds;
}

void ForEachLine(const std::string& text, const std::function<void(int, std::string)>& fn) {
  size_t pos = 0;
  int line = 1;
  while (pos < text.size()) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) nl = text.size();
    std::string l = text.substr(pos, nl - pos);
    if (!l.empty() && l.back() == '\r') l.pop_back();
    fn(line++, std::move(l));
    pos = nl + 1;
  }
}

absl::Status BadLinesError(const std::string& origin, const char* unit,
                           std::vector<BadLine> bad, std::vector<BadLine>* bad_lines_out) {
  std::string msg = absl::StrCat(origin, ": ", bad.size(), " bad ", unit,
                                 bad.size() == 1 ? "" : "s", "; file refused:");
  for (size_t i = 0; i < bad.size() && i < static_cast<size_t>(kMaxReportedBadLines); ++i) {
    absl::StrAppend(&msg, "\n  line ", bad[i].line, ": ", bad[i].reason);
  }
  if (bad.size() > static_cast<size_t>(kMaxReportedBadLines)) {
    absl::StrAppend(&msg, "\n  ... and ", bad.size() - kMaxReportedBadLines, " more");
  }
  if (bad_lines_out) *bad_lines_out = std::move(bad);
  return absl::InvalidArgumentError(msg);
}

absl::StatusOr<Dataset> ReadDataset(const std::string& path, DatasetSpec spec) {
  ASSIGN_OR_RETURN(std::string bytes, ReadFileToString(path));
  if (spec.origin == "dataset" || spec.origin.empty()) spec.origin = path;
  return ParseDataset(bytes, spec);
}

}  // namespace metatt
