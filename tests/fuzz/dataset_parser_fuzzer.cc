// libFuzzer target: server/training/dataset.h ParseDataset() on arbitrary bytes.
//
// Input layout: byte 0 = flags, byte 1 = column selectors, rest = file bytes.
//   flags bits 0-1: 0 tsv, 1 csv, 2 jsonl, 3 a GLUE preset (byte 1 picks it)
//         bit 2: has_header   bit 3: quoting   bit 4: regression labels
//         bit 5: text pair    bit 6: columns by name (else by index)
//         bit 7: fixed label vocabulary {"0", "1"}
// Invariants checked on success: every example's label is inside the label
// vocabulary (classification) and finite (regression); line numbers are
// positive and non-decreasing. Any failure is a status, never a crash.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "tests/fuzz/fuzz_check.h"
#include "server/training/dataset.h"

namespace {

const char* const kNames[] = {"sentence", "label", "sentence1", "sentence2", "score",
                              "text",     "0",     "#1 String", "Quality",   ""};
const char* const kGlue[] = {"MRPC", "CoLA", "SST-2", "STS-B"};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  const uint8_t flags = data[0], cols = data[1];
  const std::string bytes(reinterpret_cast<const char*>(data + 2), size - 2);

  metatt::DatasetSpec spec;
  if ((flags & 3) == 3) {
    auto preset = metatt::GluePreset(kGlue[cols % 4]);
    FUZZ_CHECK(preset.ok());
    spec = *preset;
    FUZZ_CHECK(metatt::GluePrimaryMetric(kGlue[cols % 4]).ok());
  } else {
    spec.format = static_cast<metatt::DataFormat>(flags & 3);
    spec.has_header = flags & 4;
    spec.quoting = flags & 8;
    spec.label_kind =
        (flags & 16) ? metatt::LabelKind::kRegression : metatt::LabelKind::kClassification;
    const int a = cols & 7, b = (cols >> 3) & 7, c = cols >> 6;
    if (flags & 64) {
      spec.text = metatt::ColumnRef::Name(kNames[a]);
      spec.label = metatt::ColumnRef::Name(kNames[b]);
      if (flags & 32) spec.text_pair = metatt::ColumnRef::Name(kNames[c + 2]);
      if (kNames[a][0] == '\0') spec.text = metatt::ColumnRef::Parse("0");
    } else {
      spec.text = metatt::ColumnRef::Index(a);
      spec.label = metatt::ColumnRef::Index(b);
      if (flags & 32) spec.text_pair = metatt::ColumnRef::Index(c);
    }
    if (flags & 128) spec.label_vocab = {"0", "1"};
  }
  spec.origin = "fuzz";

  std::vector<metatt::BadLine> bad;
  auto ds = metatt::ParseDataset(bytes, spec, &bad);
  if (!ds.ok()) {
    FUZZ_CHECK(!ds.status().message().empty());
    return 0;
  }
  FUZZ_CHECK(bad.empty());
  int last_line = 0;
  for (const auto& ex : ds->examples) {
    FUZZ_CHECK(ex.line > 0 && ex.line >= last_line);
    last_line = ex.line;
    if (ds->label_kind == metatt::LabelKind::kClassification) {
      FUZZ_CHECK(ex.label_id >= 0 && ex.label_id < ds->num_labels());
    } else {
      FUZZ_CHECK_KNOWN("dataset_inf_label", std::isfinite(ex.label_value));
    }
    FUZZ_CHECK(ex.text_pair.has_value() == spec.text_pair.has_value());
  }
  return 0;
}
