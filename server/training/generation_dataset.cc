#include "server/training/generation_dataset.h"

#include <algorithm>
#include <cctype>
#include <optional>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "base/file_io.h"
#include "base/status_macros.h"

namespace metatt {
namespace {

// One record's JSON text and the line it starts on.
struct RawRecord {
  int line = 0;
  std::string text;
  std::string error;  // non-empty: the container itself is broken here
};

bool IsBlank(std::string_view s) {
  return std::all_of(s.begin(), s.end(), [](unsigned char c) { return std::isspace(c); });
}

std::vector<RawRecord> SplitLines(const std::string& text) {
  std::vector<RawRecord> out;
  ForEachLine(text, [&](int line, std::string l) {
    if (!IsBlank(l)) out.push_back({line, std::move(l), ""});
  });
  return out;
}

// Splits a top-level JSON array into its elements' texts, each with the line
// where it starts: a scan over strings (with escapes) and bracket depth, so a
// bad element is reported at its own line instead of failing the whole parse.
std::vector<RawRecord> SplitArray(const std::string& text, size_t open) {
  std::vector<RawRecord> out;
  int line = 1;
  for (size_t i = 0; i < open; ++i) line += text[i] == '\n';
  int depth = 0;
  bool in_string = false, escape = false;
  size_t start = std::string::npos;
  int start_line = line;
  bool closed = false;
  for (size_t i = open + 1; i < text.size(); ++i) {
    const char c = text[i];
    if (c == '\n') ++line;
    if (in_string) {
      if (escape) {
        escape = false;
      } else if (c == '\\') {
        escape = true;
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    if (start == std::string::npos && !std::isspace(static_cast<unsigned char>(c)) && c != ',' &&
        !(c == ']' && depth == 0)) {
      start = i;
      start_line = line;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      ++depth;
    } else if (c == ']' || c == '}') {
      if (depth == 0 && c == ']') {
        if (start != std::string::npos) out.push_back({start_line, text.substr(start, i - start), ""});
        start = std::string::npos;
        closed = true;
        if (!IsBlank(std::string_view(text).substr(i + 1))) {
          out.push_back({line, "", "text after the closing ']' of the JSON array"});
        }
        break;
      }
      --depth;
    } else if (c == ',' && depth == 0) {
      if (start != std::string::npos) {
        out.push_back({start_line, text.substr(start, i - start), ""});
      } else {
        out.push_back({line, "", "empty element in the JSON array"});
      }
      start = std::string::npos;
    }
  }
  if (!closed) {
    out.push_back({start != std::string::npos ? start_line : line, "",
                   "JSON array not closed (missing ']')"});
  }
  return out;
}

std::string Describe(const nlohmann::json& v) {
  if (v.is_null()) return "null";
  if (v.is_string()) return "a string";
  if (v.is_boolean()) return "a boolean";
  if (v.is_number()) return "a number";
  if (v.is_array()) return "an array";
  return "an object";
}

// Reads the string field `key`; records a reason naming it when absent,
// not a string, or (when `required_text`) blank.
std::optional<std::string> StringField(const nlohmann::json& j, const std::string& key,
                                       bool required, bool required_text,
                                       std::vector<std::string>* reasons) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (required) reasons->push_back(absl::StrCat("missing field '", key, "'"));
    return std::nullopt;
  }
  if (!it->is_string()) {
    reasons->push_back(absl::StrCat("field '", key, "': must be a string, not ", Describe(*it)));
    return std::nullopt;
  }
  std::string s = it->get<std::string>();
  if (required_text && IsBlank(s)) {
    reasons->push_back(absl::StrCat("field '", key, "': empty"));
    return std::nullopt;
  }
  return s;
}

GenerationFormat Detect(const nlohmann::json& j) {
  if (j.contains("messages")) return GenerationFormat::kChat;
  if (j.contains("instruction")) return GenerationFormat::kInstruction;
  if (j.contains("prompt") || j.contains("completion")) return GenerationFormat::kPromptCompletion;
  return GenerationFormat::kAuto;
}

void ParseChat(const nlohmann::json& j, GenerationExample* ex, std::vector<std::string>* reasons) {
  const nlohmann::json& m = j["messages"];
  if (!m.is_array()) {
    reasons->push_back(absl::StrCat("field 'messages': must be an array, not ", Describe(m)));
    return;
  }
  if (m.size() < 2) {
    reasons->push_back(absl::StrCat("field 'messages': needs at least 2 messages (a prompt and ",
                                    "the assistant's reply), has ", m.size()));
    return;
  }
  std::vector<ChatMessage> msgs;
  for (size_t i = 0; i < m.size(); ++i) {
    const std::string where = absl::StrCat("field 'messages[", i, "]");
    if (!m[i].is_object()) {
      reasons->push_back(absl::StrCat(where, "': must be an object, not ", Describe(m[i])));
      continue;
    }
    std::vector<std::string> sub;
    auto role = StringField(m[i], "role", true, true, &sub);
    auto content = StringField(m[i], "content", true, false, &sub);
    for (const std::string& s : sub) {
      // "missing field 'role'" -> "field 'messages[2].role': missing"
      reasons->push_back(absl::StrCat(where, "': ", s));
    }
    if (!role || !content) continue;
    if (*role != "system" && *role != "user" && *role != "assistant") {
      reasons->push_back(absl::StrCat(where, ".role': '", *role,
                                      "' is not one of system, user, assistant"));
      continue;
    }
    msgs.push_back({*role, *content});
  }
  if (!reasons->empty()) return;
  if (msgs.back().role != "assistant") {
    reasons->push_back(absl::StrCat("field 'messages[", m.size() - 1, "].role': the last message ",
                                    "must be the assistant's (the completion), not '",
                                    msgs.back().role, "'"));
    return;
  }
  if (IsBlank(msgs.back().content)) {
    reasons->push_back(absl::StrCat("field 'messages[", m.size() - 1,
                                    "].content': the completion is empty"));
    return;
  }
  ex->completion = msgs.back().content;
  msgs.pop_back();
  bool has_user = false;
  for (const ChatMessage& c : msgs) has_user |= c.role == "user";
  if (!has_user) {
    reasons->push_back("field 'messages': no user message before the assistant's reply");
    return;
  }
  ex->prompt = std::move(msgs);
}

}  // namespace

absl::StatusOr<GenerationFormat> ParseGenerationFormat(const std::string& name) {
  const std::string n = absl::AsciiStrToLower(name);
  if (n.empty() || n == "auto") return GenerationFormat::kAuto;
  if (n == "prompt_completion" || n == "prompt-completion") return GenerationFormat::kPromptCompletion;
  if (n == "instruction") return GenerationFormat::kInstruction;
  if (n == "chat" || n == "messages") return GenerationFormat::kChat;
  return absl::InvalidArgumentError(absl::StrCat(
      "generation format '", name, "' is not one of auto, prompt_completion, instruction, chat"));
}

std::string GenerationFormatName(GenerationFormat f) {
  switch (f) {
    case GenerationFormat::kAuto: return "auto";
    case GenerationFormat::kPromptCompletion: return "prompt_completion";
    case GenerationFormat::kInstruction: return "instruction";
    case GenerationFormat::kChat: return "chat";
  }
  return "auto";
}

bool GenerationDataset::all_answered() const {
  if (examples.empty()) return false;
  for (const auto& e : examples)
    if (e.answer.empty()) return false;
  return true;
}

absl::StatusOr<GenerationDataset> ParseGenerationDataset(const std::string& bytes_in,
                                                         const GenerationSpec& spec,
                                                         std::vector<BadLine>* bad_lines_out) {
  std::string_view bytes(bytes_in);
  if (bytes.size() >= 3 && bytes.substr(0, 3) == "\xEF\xBB\xBF") bytes.remove_prefix(3);
  const std::string text(bytes);
  size_t first = 0;
  while (first < text.size() && std::isspace(static_cast<unsigned char>(text[first]))) ++first;
  if (first == text.size()) {
    return absl::InvalidArgumentError(absl::StrCat(spec.origin, ": empty file (no examples)"));
  }
  const std::vector<RawRecord> records =
      text[first] == '[' ? SplitArray(text, first) : SplitLines(text);

  std::vector<BadLine> bad;
  GenerationDataset ds;
  for (const RawRecord& rec : records) {
    if (!rec.error.empty()) {
      bad.push_back({rec.line, rec.error});
      continue;
    }
    nlohmann::json j = nlohmann::json::parse(rec.text, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object()) {
      bad.push_back({rec.line, j.is_discarded() ? "not valid JSON" : "not a JSON object"});
      continue;
    }
    GenerationFormat format = spec.format;
    if (format == GenerationFormat::kAuto) format = Detect(j);
    std::vector<std::string> reasons;
    GenerationExample ex;
    ex.line = rec.line;
    switch (format) {
      case GenerationFormat::kAuto:
        reasons.push_back(
            "no known fields: want 'prompt' + 'completion', 'instruction' + 'output', or "
            "'messages'");
        break;
      case GenerationFormat::kPromptCompletion: {
        auto p = StringField(j, "prompt", true, true, &reasons);
        auto c = StringField(j, "completion", true, true, &reasons);
        if (p && c) {
          ex.prompt = {{"user", *p}};
          ex.completion = *c;
        }
        break;
      }
      case GenerationFormat::kInstruction: {
        auto ins = StringField(j, "instruction", true, true, &reasons);
        auto input = StringField(j, "input", false, false, &reasons);
        auto out = StringField(j, "output", true, true, &reasons);
        if (ins && out) {
          std::string prompt = *ins;
          if (input && !IsBlank(*input)) absl::StrAppend(&prompt, "\n\n", *input);
          ex.prompt = {{"user", std::move(prompt)}};
          ex.completion = *out;
        }
        break;
      }
      case GenerationFormat::kChat:
        if (!j.contains("messages")) {
          reasons.push_back("missing field 'messages'");
        } else {
          ParseChat(j, &ex, &reasons);
        }
        break;
    }
    if (auto it = j.find("answer"); it != j.end() && !it->is_null()) {
      if (it->is_string()) {
        ex.answer = std::string(absl::StripAsciiWhitespace(it->get<std::string>()));
      } else if (it->is_boolean()) {
        ex.answer = it->get<bool>() ? "true" : "false";
      } else {
        reasons.push_back(absl::StrCat("field 'answer': must be a string or a boolean, not ",
                                       Describe(*it)));
      }
    }
    if (!reasons.empty()) {
      std::string why;
      for (size_t i = 0; i < reasons.size(); ++i) absl::StrAppend(&why, i ? "; " : "", reasons[i]);
      bad.push_back({rec.line, std::move(why)});
      continue;
    }
    ds.examples.push_back(std::move(ex));
  }
  if (!bad.empty()) return BadLinesError(spec.origin, "record", std::move(bad), bad_lines_out);
  if (ds.examples.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(spec.origin, ": no examples"));
  }
  return ds;
}

absl::StatusOr<GenerationDataset> ReadGenerationDataset(const std::string& path,
                                                        GenerationSpec spec) {
  ASSIGN_OR_RETURN(std::string bytes, ReadFileToString(path));
  if (spec.origin == "dataset" || spec.origin.empty()) spec.origin = path;
  return ParseGenerationDataset(bytes, spec);
}

absl::StatusOr<std::string> CanonicalCommonsenseName(const std::string& name) {
  std::string n = absl::AsciiStrToLower(name);
  n.erase(std::remove_if(n.begin(), n.end(), [](char c) { return c == '-' || c == '_'; }),
          n.end());
  if (n == "arceasy" || n == "arce") return std::string("ARC-Easy");
  if (n == "boolq") return std::string("BoolQ");
  if (n == "openbookqa" || n == "obqa") return std::string("OpenBookQA");
  return absl::InvalidArgumentError(
      absl::StrCat("unknown commonsense task '", name, "' (ARC-Easy, BoolQ or OpenBookQA)"));
}

}  // namespace metatt
