// metatt-tokenize: JSONL in, JSONL out.
//
// Each input line is {"a": "...", "b": "..." (optional or null)}; each output
// line is {"ids": [...], "type_ids": [...], "attention_mask": [...]} for that
// input, encoded with longest_first truncation to --max_length (no padding).
// With --batch, all inputs are encoded as one batch (padded to the longest).
//
//   metatt-tokenize --model_dir=DIR [--input=FILE|-] [--output=FILE|-]
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "nlohmann/json.hpp"
#include "server/model/jsonl_streams.h"
#include "server/model/model_dir.h"
#include "server/model/tokenizer.h"

namespace {
std::string DefaultModelDir() {
  auto dir = metatt::ResolveModelDir("");
  return dir.ok() ? *dir : "";
}
}  // namespace

ABSL_FLAG(std::string, model_dir, DefaultModelDir(),
          "Model dir (tokenizer.json or vocab.txt) or tokenizer file; default "
          "$METATT_MODEL_DIR, else the repository's models/all-MiniLM-L6-v2");
ABSL_FLAG(std::string, input, "-", "JSONL input file, '-' for stdin");
ABSL_FLAG(std::string, output, "-", "JSONL output file, '-' for stdout");
ABSL_FLAG(int, max_length, 128, "Truncation length (<= 0: none)");
ABSL_FLAG(bool, batch, false, "Encode all lines as one padded batch");

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const auto tok = metatt::WordPieceTokenizer::Create(absl::GetFlag(FLAGS_model_dir));
  metatt::JsonlStreams io;
  if (!io.Start("metatt-tokenize", tok, absl::GetFlag(FLAGS_input), absl::GetFlag(FLAGS_output)))
    return 1;
  const int max_length = absl::GetFlag(FLAGS_max_length);

  std::vector<std::pair<std::string, std::optional<std::string>>> inputs;
  std::string line;
  size_t line_no = 0;
  while (std::getline(io.in(), line)) {
    ++line_no;
    if (line.empty()) continue;
    nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object() || !j.contains("a") || !j["a"].is_string()) {
      std::cerr << "metatt-tokenize: line " << line_no
                << ": expected {\"a\": string, \"b\": string|null}\n";
      return 2;
    }
    std::optional<std::string> b;
    if (j.contains("b") && !j["b"].is_null()) {
      if (!j["b"].is_string()) {
        std::cerr << "metatt-tokenize: line " << line_no << ": \"b\" must be a string or null\n";
        return 2;
      }
      b = j["b"].get<std::string>();
    }
    inputs.emplace_back(j["a"].get<std::string>(), std::move(b));
  }

  auto write = [&](const metatt::Encoding& e) {
    nlohmann::json o = {
        {"ids", e.ids}, {"type_ids", e.type_ids}, {"attention_mask", e.attention_mask}};
    io.out() << o.dump() << "\n";
  };
  if (absl::GetFlag(FLAGS_batch)) {
    for (const auto& e : tok->EncodeBatch(inputs, max_length)) write(e);
  } else {
    for (const auto& [a, b] : inputs) {
      std::optional<std::string_view> bv;
      if (b.has_value()) bv = *b;
      write(tok->Encode(a, bv, max_length));
    }
  }
  return io.Finish();
}
