// metatt-bpe-tokenize: JSONL in, JSONL out, one output line per input line,
// for the byte-level BPE tokenizer (driven by
// tests/python/test_bpe_tokenizer_parity.py with many inputs in one process).
//
// Input lines (one of):
//   {"text": "...", "add_special_tokens": true}      -> {"ids": [...]}
//   {"decode": [ids], "skip_special_tokens": false}  -> {"text": "..."}
//   {"stream": [ids], "skip_special_tokens": false}  -> {"pieces": ["...", ...]}
//       (BpeDecodeStream: one piece per id, then the Finish piece)
//   {"messages": [{"role": ..., "content": ...}], "add_generation_prompt": false}
//                                                    -> {"text": "...", "ids": [...]}
//   {"info": true} -> {"bos_id", "eos_id", "pad_id", "unk_id", "vocab_size",
//                      "chat_template": "ok" | error}
// A request that fails answers {"error": "..."}.
//
//   metatt-bpe-tokenize --model_dir=DIR|tokenizer.json [--input=FILE|-] [--output=FILE|-]
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "nlohmann/json.hpp"
#include "server/model/jsonl_streams.h"
#include "server/model/bpe_tokenizer.h"

ABSL_FLAG(std::string, model_dir, "models/SmolLM2-135M-Instruct",
          "Model dir holding tokenizer.json (+ tokenizer_config.json, chat_template.jinja), "
          "or a tokenizer.json file");
ABSL_FLAG(std::string, input, "-", "JSONL input file, '-' for stdin");
ABSL_FLAG(std::string, output, "-", "JSONL output file, '-' for stdout");

namespace {

using json = nlohmann::json;

json Handle(const metatt::BpeTokenizer& tok, const json& j) {
  if (j.contains("text")) {
    if (!j["text"].is_string()) return {{"error", "\"text\" must be a string"}};
    return {{"ids", tok.Encode(j["text"].get<std::string>(),
                               j.value("add_special_tokens", true))}};
  }
  const bool skip = j.value("skip_special_tokens", false);
  if (j.contains("decode")) {
    return {{"text", tok.Decode(j["decode"].get<std::vector<int64_t>>(), skip)}};
  }
  if (j.contains("stream")) {
    metatt::BpeDecodeStream stream(&tok, skip);
    std::vector<std::string> pieces;
    for (int64_t id : j["stream"].get<std::vector<int64_t>>()) pieces.push_back(stream.Step(id));
    pieces.push_back(stream.Finish());
    return {{"pieces", pieces}};
  }
  if (j.contains("messages")) {
    std::vector<metatt::ChatMessage> messages;
    for (const json& m : j["messages"]) {
      if (!m.is_object() || !m.contains("role") || !m["role"].is_string() ||
          !m.contains("content") || !m["content"].is_string()) {
        return {{"error", "each message needs string \"role\" and \"content\""}};
      }
      messages.push_back({m["role"].get<std::string>(), m["content"].get<std::string>()});
    }
    const bool gen = j.value("add_generation_prompt", false);
    auto text = tok.ApplyChatTemplate(messages, gen);
    if (!text.ok()) return {{"error", std::string(text.status().message())}};
    auto ids = tok.EncodeChat(messages, gen);
    if (!ids.ok()) return {{"error", std::string(ids.status().message())}};
    return {{"text", *text}, {"ids", *ids}};
  }
  if (j.contains("info")) {
    const absl::Status& chat = tok.chat_template_status();
    return {{"bos_id", tok.bos_id()},
            {"eos_id", tok.eos_id()},
            {"pad_id", tok.pad_id()},
            {"unk_id", tok.unk_id()},
            {"vocab_size", tok.vocab_size()},
            {"chat_template", chat.ok() ? std::string("ok") : std::string(chat.message())},
            {"default_system_prompt", tok.default_system_prompt()}};
  }
  return {{"error", "expected one of text, decode, stream, messages, info"}};
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const auto tok = metatt::BpeTokenizer::Create(absl::GetFlag(FLAGS_model_dir));
  metatt::JsonlStreams io;
  if (!io.Start("metatt-bpe-tokenize", tok, absl::GetFlag(FLAGS_input),
                absl::GetFlag(FLAGS_output)))
    return 1;
  std::string line;
  size_t line_no = 0;
  while (std::getline(io.in(), line)) {
    ++line_no;
    json j = json::parse(line, nullptr, false);
    json answer;
    if (j.is_discarded() || !j.is_object()) {
      answer = {{"error", "line " + std::to_string(line_no) + ": not a JSON object"}};
    } else {
      try {
        answer = Handle(*tok, j);
      } catch (const json::exception& e) {
        answer = {{"error", "line " + std::to_string(line_no) + ": " + e.what()}};
      }
    }
    io.out() << answer.dump(-1, ' ', /*ensure_ascii=*/true, json::error_handler_t::replace) << "\n";
  }
  return io.Finish();
}
