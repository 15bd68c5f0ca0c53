#include "server/model/bpe_tokenizer.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <queue>
#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "nlohmann/json.hpp"
#include "server/model/tokenizer_text.h"

namespace metatt {
namespace {

using json = nlohmann::json;

#include "server/model/bpe_tokenizer_unicode_tables.inc"

// Classes of the GPT-2 split regex. Every code point is exactly one of them;
// a byte outside valid UTF-8 counts as kOther.
enum CharClass : uint8_t { kLetter, kNumber, kSpace, kOther };

CharClass ClassOf(char32_t c) {
  if (c < 128) {
    if ((c | 0x20) >= 'a' && (c | 0x20) <= 'z') return kLetter;
    if (c >= '0' && c <= '9') return kNumber;
    if (c == ' ' || (c >= 0x09 && c <= 0x0D)) return kSpace;
    return kOther;
  }
  if (InRanges(kBpeLetter, c)) return kLetter;
  if (InRanges(kBpeNumber, c)) return kNumber;
  if (InRanges(kBpeSpace, c)) return kSpace;
  return kOther;
}

bool IsNumeric(char32_t c) {
  if (c < 128) return c >= '0' && c <= '9';
  return InRanges(kBpeNumeric, c);
}

// One code point at s[i]: its value and length in bytes. Strict UTF-8 (no
// overlongs, surrogates or values above U+10FFFF); an invalid byte is
// returned alone with valid = false.
struct Utf8Char {
  char32_t cp;
  int len;
  bool valid;
};

// Length of the valid sequence starting at s[i] (0 when s[i] does not start
// one), and how many bytes form a valid-so-far prefix (the "maximal subpart").
int ValidPrefix(std::string_view s, size_t i, int* need) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  int len;
  unsigned char lo = 0x80, hi = 0xBF;  // range of the second byte
  if (b0 < 0x80) {
    *need = 1;
    return 1;
  } else if (b0 >= 0xC2 && b0 <= 0xDF) {
    len = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    len = 3;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    len = 4;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    *need = 1;
    return 0;
  }
  *need = len;
  int k = 1;
  for (; k < len && i + k < s.size(); ++k) {
    const auto b = static_cast<unsigned char>(s[i + k]);
    const unsigned char l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
    if (b < l || b > h) break;
  }
  return k;  // == len: complete; < len: a prefix of k bytes (truncated or broken)
}

Utf8Char NextChar(std::string_view s, size_t i) {
  int need;
  const int k = ValidPrefix(s, i, &need);
  if (k != need || k == 0) return {static_cast<unsigned char>(s[i]), 1, false};
  const auto b0 = static_cast<unsigned char>(s[i]);
  if (need == 1) return {b0, 1, true};
  char32_t cp = b0 & (need == 2 ? 0x1F : need == 3 ? 0x0F : 0x07);
  for (int j = 1; j < need; ++j) cp = (cp << 6) | (static_cast<unsigned char>(s[i + j]) & 0x3F);
  return {cp, need, true};
}

// GPT-2's reversible byte <-> printable character map: printable Latin-1
// bytes stand for themselves, the other 68 bytes take U+0100.. in order.
struct ByteMap {
  std::array<char32_t, 256> to_char{};
  absl::flat_hash_map<char32_t, uint8_t> to_byte;
  ByteMap() {
    char32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      to_char[b] = printable ? static_cast<char32_t>(b) : next++;
      to_byte[to_char[b]] = static_cast<uint8_t>(b);
    }
  }
};

const ByteMap& Bytes() {
  static const ByteMap* map = new ByteMap();
  return *map;
}

std::string ByteLevelString(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size() * 2);
  for (unsigned char b : bytes) AppendUtf8(Bytes().to_char[b], &out);
  return out;
}

// The GPT-2 split: matches of
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// found left to right (first alternative that matches wins, each one greedy).
// Every character belongs to some alternative, so the matches tile the text.
void SplitGpt2(std::string_view s, std::vector<std::string>* out) {
  // Decode once: classes and byte offsets.
  std::vector<CharClass> cls;
  std::vector<size_t> off;
  cls.reserve(s.size());
  off.reserve(s.size() + 1);
  for (size_t i = 0; i < s.size();) {
    const Utf8Char c = NextChar(s, i);
    cls.push_back(c.valid ? ClassOf(c.cp) : kOther);
    off.push_back(i);
    i += c.len;
  }
  const size_t n = cls.size();
  off.push_back(s.size());
  auto is_space_char = [&](size_t k) { return off[k + 1] - off[k] == 1 && s[off[k]] == ' '; };
  auto run = [&](size_t k, CharClass c) {
    while (k < n && cls[k] == c) ++k;
    return k;
  };
  size_t i = 0;
  while (i < n) {
    size_t j = i;  // end (in characters) of the match at i
    if (s[off[i]] == '\'' && i + 1 < n) {
      const std::string_view rest = s.substr(off[i + 1]);
      for (std::string_view suffix : {"s", "t", "re", "ve", "m", "ll", "d"}) {
        if (rest.substr(0, suffix.size()) == suffix) {
          j = i + 1 + suffix.size();  // ASCII letters: one byte each
          break;
        }
      }
    }
    if (j == i) {
      const size_t body = is_space_char(i) && i + 1 < n && cls[i + 1] != kSpace ? i + 1 : i;
      if (cls[body] != kSpace) {
        // ' ?\p{L}+', ' ?\p{N}+' or ' ?[^\s\p{L}\p{N}]+', whichever class follows.
        j = run(body, cls[body]);
      } else {
        const size_t end = run(i, kSpace);
        // '\s+(?!\S)' backs off one character before a non-space; with a run
        // of one that leaves nothing and '\s+' takes the one character.
        j = (end == n || end - i == 1) ? end : end - 1;
      }
    }
    out->emplace_back(s.substr(off[i], off[j] - off[i]));
    i = j;
  }
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  return ReadTokenizerFile(path, "bpe tokenizer");
}

// Debian's Abseil has its own string_view type: convert at the boundary.
absl::string_view Sv(std::string_view s) { return absl::string_view(s.data(), s.size()); }

absl::Status Unsupported(absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(
      absl::StrCat("bpe tokenizer: tokenizer.json ", field, ": ", what));
}

// Reads an optional boolean `key` of `obj` (absent or null: `def`).
absl::StatusOr<bool> GetBool(const json& obj, const char* key, bool def, absl::string_view field) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return def;
  if (!it->is_boolean()) return Unsupported(absl::StrCat(field, ".", key), "must be a boolean");
  return it->get<bool>();
}

std::string TypeOf(const json& obj) {
  auto it = obj.find("type");
  return it != obj.end() && it->is_string() ? it->get<std::string>() : std::string();
}

// The chat template SmolLM2 ships: ChatML, with a default system message when
// the first message is not a system one. Recognised as kChatPrefix + <default
// system prompt> + kChatSuffix (Jinja drops one trailing newline, so one is
// allowed); the prompt is a Jinja string literal, so it may not contain a
// quote or a backslash.
constexpr std::string_view kChatPrefix =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n";
constexpr std::string_view kChatSuffix =
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}";

absl::Status RecognizeChatTemplate(std::string_view t, std::string* system_prompt) {
  if (!t.empty() && t.back() == '\n') t.remove_suffix(1);
  const bool shape = t.size() >= kChatPrefix.size() + kChatSuffix.size() &&
                     t.substr(0, kChatPrefix.size()) == kChatPrefix &&
                     t.substr(t.size() - kChatSuffix.size()) == kChatSuffix;
  if (shape) {
    std::string_view prompt =
        t.substr(kChatPrefix.size(), t.size() - kChatPrefix.size() - kChatSuffix.size());
    if (prompt.find_first_of("'\\") == std::string_view::npos) {
      *system_prompt = std::string(prompt);
      return absl::OkStatus();
    }
  }
  return absl::FailedPreconditionError(absl::StrCat(
      "bpe tokenizer: chat_template is not the ChatML template with a default system "
      "prompt (SmolLM2's), the only one implemented; template starts with: ",
      Sv(t.substr(0, 120))));
}

// A special token named in tokenizer_config.json: a string, an AddedToken
// object {"content": ...}, or null.
absl::StatusOr<std::optional<std::string>> ConfigToken(const json& cfg, const char* key) {
  auto it = cfg.find(key);
  if (it == cfg.end() || it->is_null()) return std::optional<std::string>();
  if (it->is_string()) return std::optional<std::string>(it->get<std::string>());
  if (it->is_object() && it->contains("content") && (*it)["content"].is_string()) {
    return std::optional<std::string>((*it)["content"].get<std::string>());
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "bpe tokenizer: tokenizer_config.json ", key, " must be a string or {\"content\": ...}"));
}

}  // namespace

std::string RepairUtf8(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    int need;
    const int k = ValidPrefix(s, i, &need);
    if (k == need) {
      out.append(s.substr(i, k));
      i += k;
    } else {
      out.append("\xEF\xBF\xBD");  // U+FFFD for the maximal invalid prefix
      i += std::max(k, 1);
    }
  }
  return out;
}

absl::StatusOr<BpeTokenizer> BpeTokenizer::Create(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::path dir = path, file = path;
  if (!fs::exists(path, ec)) {
    return absl::NotFoundError(
        absl::StrCat("bpe tokenizer: no tokenizer.json at '", path, "' (no such file or directory)"));
  }
  if (fs::is_directory(path, ec)) {
    file = dir / "tokenizer.json";
  } else {
    dir = file.parent_path();
  }
  auto tok_json = ReadFile(file.string());
  if (!tok_json.ok()) return tok_json.status();
  std::string config_json;
  if (fs::exists(dir / "tokenizer_config.json", ec)) {
    auto c = ReadFile((dir / "tokenizer_config.json").string());
    if (!c.ok()) return c.status();
    config_json = *std::move(c);
  }
  std::optional<std::string> chat_template;
  if (fs::exists(dir / "chat_template.jinja", ec)) {
    auto c = ReadFile((dir / "chat_template.jinja").string());
    if (!c.ok()) return c.status();
    chat_template = *std::move(c);
  }
  auto tok = FromJson(*tok_json, config_json, std::move(chat_template));
  if (!tok.ok()) {
    return absl::Status(tok.status().code(),
                        absl::StrCat(tok.status().message(), " (", file.string(), ")"));
  }
  return tok;
}

absl::StatusOr<BpeTokenizer> BpeTokenizer::FromJson(std::string_view tokenizer_json,
                                                    std::string_view config_json,
                                                    std::optional<std::string> chat_template) {
  const json j = json::parse(tokenizer_json, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Unsupported("(file)", "not valid JSON");
  if (!j.is_object()) return Unsupported("(file)", "not a JSON object");
  BpeTokenizer tok;

  // normalizer
  if (auto it = j.find("normalizer"); it != j.end() && !it->is_null()) {
    return Unsupported("normalizer",
                       absl::StrCat("type '", TypeOf(*it), "' is not supported (only null)"));
  }

  // pre_tokenizer
  {
    auto it = j.find("pre_tokenizer");
    if (it == j.end() || it->is_null()) {
      return Unsupported("pre_tokenizer", "null is not supported (ByteLevel, Digits or a Sequence)");
    }
    std::vector<std::pair<const json*, std::string>> parts;
    if (TypeOf(*it) == "Sequence") {
      auto p = it->find("pretokenizers");
      if (p == it->end() || !p->is_array() || p->empty()) {
        return Unsupported("pre_tokenizer.pretokenizers", "must be a non-empty array");
      }
      for (size_t k = 0; k < p->size(); ++k) {
        parts.emplace_back(&(*p)[k], absl::StrCat("pre_tokenizer.pretokenizers[", k, "]"));
      }
    } else {
      parts.emplace_back(&*it, "pre_tokenizer");
    }
    for (const auto& [pj, field] : parts) {
      const std::string type = TypeOf(*pj);
      PreTokenizer pre;
      if (type == "ByteLevel") {
        pre.kind = PreTokenizer::kByteLevel;
        auto a = GetBool(*pj, "add_prefix_space", true, field);
        auto r = GetBool(*pj, "use_regex", true, field);
        if (!a.ok()) return a.status();
        if (!r.ok()) return r.status();
        pre.add_prefix_space = *a;
        pre.use_regex = *r;
      } else if (type == "Digits") {
        pre.kind = PreTokenizer::kDigits;
        auto d = GetBool(*pj, "individual_digits", false, field);
        if (!d.ok()) return d.status();
        pre.individual_digits = *d;
      } else {
        return Unsupported(absl::StrCat(field, ".type"),
                           absl::StrCat("'", type, "' is not supported (ByteLevel, Digits, Sequence)"));
      }
      tok.pre_.push_back(pre);
    }
    if (std::none_of(tok.pre_.begin(), tok.pre_.end(),
                     [](const PreTokenizer& p) { return p.kind == PreTokenizer::kByteLevel; })) {
      return Unsupported("pre_tokenizer", "has no ByteLevel step (byte-level BPE only)");
    }
  }

  // model
  auto mit = j.find("model");
  if (mit == j.end() || !mit->is_object()) return Unsupported("model", "missing");
  const json& model = *mit;
  if (TypeOf(model) != "BPE") {
    return Unsupported("model.type", absl::StrCat("'", TypeOf(model), "' is not supported (BPE)"));
  }
  if (auto it = model.find("dropout"); it != model.end() && !it->is_null()) {
    if (!it->is_number() || it->get<double>() != 0.0) {
      return Unsupported("model.dropout", "must be null (BPE dropout is random)");
    }
  }
  {
    auto bf = GetBool(model, "byte_fallback", false, "model");
    if (!bf.ok()) return bf.status();
    if (*bf) return Unsupported("model.byte_fallback", "true is not supported");
    auto fu = GetBool(model, "fuse_unk", false, "model");
    if (!fu.ok()) return fu.status();
    tok.fuse_unk_ = *fu;
    auto im = GetBool(model, "ignore_merges", false, "model");
    if (!im.ok()) return im.status();
    tok.ignore_merges_ = *im;
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    auto it = model.find(key);
    if (it != model.end() && !it->is_null() && !(it->is_string() && it->get<std::string>().empty())) {
      return Unsupported(absl::StrCat("model.", key), "must be empty or null");
    }
  }
  auto vit = model.find("vocab");
  if (vit == model.end() || !vit->is_object() || vit->empty()) {
    return Unsupported("model.vocab", "must be a non-empty object {token: id}");
  }
  int64_t max_id = -1;
  for (auto it = vit->begin(); it != vit->end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 ||
        it.value().get<int64_t>() > (int64_t{1} << 30)) {
      return Unsupported("model.vocab", absl::StrCat("id of '", it.key(), "' is not a valid id"));
    }
    const int64_t id = it.value().get<int64_t>();
    tok.vocab_[it.key()] = id;
    max_id = std::max(max_id, id);
  }

  // added_tokens
  struct Added {
    std::string content;
    int64_t id;
    bool special, normalized;
  };
  std::vector<Added> added;
  if (auto at = j.find("added_tokens"); at != j.end() && !at->is_null()) {
    if (!at->is_array()) return Unsupported("added_tokens", "must be an array");
    for (size_t k = 0; k < at->size(); ++k) {
      const json& a = (*at)[k];
      const std::string field = absl::StrCat("added_tokens[", k, "]");
      if (!a.is_object() || !a.contains("id") || !a["id"].is_number_integer() ||
          a["id"].get<int64_t>() < 0 || a["id"].get<int64_t>() > (int64_t{1} << 30) ||
          !a.contains("content") || !a["content"].is_string()) {
        return Unsupported(field, "needs an integer \"id\" and a string \"content\"");
      }
      for (const char* flag : {"lstrip", "rstrip", "single_word"}) {
        auto v = GetBool(a, flag, false, field);
        if (!v.ok()) return v.status();
        if (*v) return Unsupported(absl::StrCat(field, ".", flag), "true is not supported");
      }
      auto special = GetBool(a, "special", false, field);
      auto normalized = GetBool(a, "normalized", false, field);
      if (!special.ok()) return special.status();
      if (!normalized.ok()) return normalized.status();
      added.push_back({a["content"].get<std::string>(), a["id"].get<int64_t>(), *special,
                       *normalized});
      max_id = std::max(max_id, added.back().id);
    }
  }

  tok.id_to_token_.assign(max_id + 1, std::string());
  tok.special_.assign(max_id + 1, 0);
  tok.is_added_.assign(max_id + 1, 0);
  std::vector<uint8_t> has_token(max_id + 1, 0);
  for (const auto& [t, id] : tok.vocab_) {
    tok.id_to_token_[id] = t;
    has_token[id] = 1;
  }
  for (const Added& a : added) {
    tok.id_to_token_[a.id] = a.content;
    has_token[a.id] = 1;
    tok.is_added_[a.id] = 1;
    tok.special_[a.id] = a.special;
    tok.added_ids_[a.content] = a.id;
    if (a.content.empty()) continue;  // never matches
    // `tokenizers` partitions on "normalized" alone (special or not).
    (a.normalized ? tok.added_normalized_ : tok.added_raw_).push_back({a.content, a.id});
  }
  // Longest first within each pass, so the first hit at a position is the
  // longest (leftmost-longest matching).
  for (auto* v : {&tok.added_raw_, &tok.added_normalized_}) {
    std::stable_sort(v->begin(), v->end(), [](const AddedToken& a, const AddedToken& b) {
      return a.content.size() > b.content.size();
    });
  }

  // unk
  if (auto it = model.find("unk_token"); it != model.end() && !it->is_null()) {
    if (!it->is_string()) return Unsupported("model.unk_token", "must be a string or null");
    auto v = tok.vocab_.find(it->get<std::string>());
    if (v == tok.vocab_.end()) {
      return Unsupported("model.unk_token", absl::StrCat("'", it->get<std::string>(), "' is not in model.vocab"));
    }
    tok.model_unk_ = v->second;
  }

  // merges
  auto mg = model.find("merges");
  if (mg == model.end() || !mg->is_array()) return Unsupported("model.merges", "must be an array");
  tok.merges_.reserve(mg->size());
  for (size_t k = 0; k < mg->size(); ++k) {
    const json& m = (*mg)[k];
    std::string a, b;
    if (m.is_string()) {
      std::vector<std::string> parts = absl::StrSplit(m.get<std::string>(), ' ');
      if (parts.size() != 2) {
        return Unsupported(absl::StrCat("model.merges[", k, "]"), "must be \"left right\"");
      }
      a = std::move(parts[0]);
      b = std::move(parts[1]);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      a = m[0].get<std::string>();
      b = m[1].get<std::string>();
    } else {
      return Unsupported(absl::StrCat("model.merges[", k, "]"),
                         "must be a \"left right\" string or a [left, right] pair");
    }
    auto ia = tok.vocab_.find(a), ib = tok.vocab_.find(b), iab = tok.vocab_.find(a + b);
    if (ia == tok.vocab_.end() || ib == tok.vocab_.end() || iab == tok.vocab_.end()) {
      return Unsupported(absl::StrCat("model.merges[", k, "]"),
                         absl::StrCat("'", a, "' + '", b, "': a part or the result is not in model.vocab"));
    }
    const uint64_t key = (static_cast<uint64_t>(ia->second) << 32) | static_cast<uint64_t>(ib->second);
    // A repeated pair takes its last rank, as in `tokenizers` (later entries
    // overwrite earlier ones in its merge map).
    tok.merges_[key] = {static_cast<int32_t>(k), static_cast<int32_t>(iab->second)};
  }
  for (int b = 0; b < 256; ++b) {
    std::string c;
    AppendUtf8(Bytes().to_char[b], &c);
    auto v = tok.vocab_.find(c);
    tok.byte_id_[b] = v == tok.vocab_.end() ? -1 : v->second;
  }

  // decoder
  {
    auto it = j.find("decoder");
    if (it == j.end() || it->is_null() || TypeOf(*it) != "ByteLevel") {
      return Unsupported("decoder.type",
                         absl::StrCat("'", it == j.end() || it->is_null() ? "null" : TypeOf(*it),
                                      "' is not supported (ByteLevel)"));
    }
  }

  // post_processor
  if (auto it = j.find("post_processor"); it != j.end() && !it->is_null()) {
    std::vector<std::pair<const json*, std::string>> parts;
    if (TypeOf(*it) == "Sequence") {
      auto p = it->find("processors");
      if (p == it->end() || !p->is_array()) {
        return Unsupported("post_processor.processors", "must be an array");
      }
      for (size_t k = 0; k < p->size(); ++k) {
        parts.emplace_back(&(*p)[k], absl::StrCat("post_processor.processors[", k, "]"));
      }
    } else {
      parts.emplace_back(&*it, "post_processor");
    }
    bool have_template = false;
    for (const auto& [pj, field] : parts) {
      const std::string type = TypeOf(*pj);
      if (type == "ByteLevel") continue;  // offsets only
      if (type != "TemplateProcessing" || have_template) {
        return Unsupported(absl::StrCat(field, ".type"),
                           absl::StrCat("'", type, "' is not supported (ByteLevel, one TemplateProcessing)"));
      }
      have_template = true;
      auto single = pj->find("single");
      auto specials = pj->find("special_tokens");
      if (single == pj->end() || !single->is_array()) {
        return Unsupported(absl::StrCat(field, ".single"), "must be an array");
      }
      bool seen_a = false;
      for (size_t k = 0; k < single->size(); ++k) {
        const json& piece = (*single)[k];
        const std::string pf = absl::StrCat(field, ".single[", k, "]");
        if (piece.contains("Sequence")) {
          if (seen_a) return Unsupported(pf, "a second Sequence is not supported");
          seen_a = true;
        } else if (piece.contains("SpecialToken") && piece["SpecialToken"].contains("id") &&
                   piece["SpecialToken"]["id"].is_string()) {
          const std::string name = piece["SpecialToken"]["id"].get<std::string>();
          if (specials == pj->end() || !specials->is_object() || !specials->contains(name) ||
              !(*specials)[name].contains("ids") || !(*specials)[name]["ids"].is_array()) {
            return Unsupported(absl::StrCat(field, ".special_tokens"),
                               absl::StrCat("has no ids for '", name, "'"));
          }
          for (const json& id : (*specials)[name]["ids"]) {
            if (!id.is_number_integer()) {
              return Unsupported(absl::StrCat(field, ".special_tokens.", name, ".ids"),
                                 "must be integers");
            }
            (seen_a ? tok.suffix_ids_ : tok.prefix_ids_).push_back(id.get<int64_t>());
          }
        } else {
          return Unsupported(pf, "must be {\"Sequence\": ...} or {\"SpecialToken\": {\"id\": ...}}");
        }
      }
      if (!seen_a) return Unsupported(absl::StrCat(field, ".single"), "has no Sequence");
    }
  }

  // tokenizer_config.json: special token names, chat template.
  json cfg = json::object();
  if (!config_json.empty()) {
    cfg = json::parse(config_json, nullptr, false);
    if (cfg.is_discarded() || !cfg.is_object()) {
      return absl::InvalidArgumentError("bpe tokenizer: tokenizer_config.json is not a JSON object");
    }
  }
  for (auto [key, out] : {std::pair<const char*, int64_t*>{"bos_token", &tok.bos_id_},
                          {"eos_token", &tok.eos_id_},
                          {"pad_token", &tok.pad_id_},
                          {"unk_token", &tok.unk_id_}}) {
    auto name = ConfigToken(cfg, key);
    if (!name.ok()) return name.status();
    if (!name->has_value()) continue;
    *out = tok.TokenToId(**name);
    if (*out < 0) {
      return absl::InvalidArgumentError(absl::StrCat("bpe tokenizer: tokenizer_config.json ", key,
                                                     " '", **name, "' is not a token"));
    }
  }
  if (!chat_template.has_value()) {
    auto it = cfg.find("chat_template");
    if (it != cfg.end() && it->is_string()) {
      chat_template = it->get<std::string>();
    } else if (it != cfg.end() && it->is_array()) {
      for (const json& t : *it) {  // [{"name": ..., "template": ...}]: "default" is used
        if (t.is_object() && t.value("name", "") == "default" && t.contains("template") &&
            t["template"].is_string()) {
          chat_template = t["template"].get<std::string>();
        }
      }
      if (!chat_template.has_value()) {
        tok.chat_status_ = absl::FailedPreconditionError(
            "bpe tokenizer: tokenizer_config.json chat_template lists no \"default\" template");
      }
    } else if (it != cfg.end() && !it->is_null()) {
      return absl::InvalidArgumentError(
          "bpe tokenizer: tokenizer_config.json chat_template must be a string or a list");
    }
  }
  if (chat_template.has_value()) {
    tok.chat_status_ = RecognizeChatTemplate(*chat_template, &tok.default_system_);
    if (tok.chat_status_.ok()) {
      for (const char* t : {"<|im_start|>", "<|im_end|>"}) {
        if (tok.added_ids_.find(t) == tok.added_ids_.end()) {
          tok.chat_status_ = absl::FailedPreconditionError(
              absl::StrCat("bpe tokenizer: the chat template needs the added token ", t));
        }
      }
    }
  }
  return tok;
}

int64_t BpeTokenizer::TokenToId(std::string_view token) const {
  if (auto it = added_ids_.find(Sv(token)); it != added_ids_.end()) return it->second;
  if (auto it = vocab_.find(Sv(token)); it != vocab_.end()) return it->second;
  return -1;
}

std::optional<std::string> BpeTokenizer::IdToToken(int64_t id) const {
  if (id < 0 || id >= vocab_size()) return std::nullopt;
  if (id_to_token_[id].empty() && !is_added_[id]) return std::nullopt;
  return id_to_token_[id];
}

bool BpeTokenizer::IsSpecial(int64_t id) const {
  return id >= 0 && id < vocab_size() && special_[id];
}

// Splits every text piece at the leftmost, then longest, occurrence of any of
// `tokens` (sorted longest first); matched pieces carry the token's id.
void BpeTokenizer::SplitAdded(const std::vector<AddedToken>& tokens,
                              std::vector<Piece>* pieces) const {
  if (tokens.empty()) return;
  std::vector<Piece> out;
  for (Piece& p : *pieces) {
    if (p.added_id >= 0) {
      out.push_back(std::move(p));
      continue;
    }
    const std::string_view s = p.text;
    size_t start = 0, i = 0;
    while (i < s.size()) {
      const AddedToken* hit = nullptr;
      for (const AddedToken& t : tokens) {
        if (s.compare(i, t.content.size(), t.content) == 0) {
          hit = &t;
          break;
        }
      }
      if (hit == nullptr) {
        ++i;
        continue;
      }
      if (i > start) out.push_back({std::string(s.substr(start, i - start)), -1});
      out.push_back({std::string(), hit->id});
      i += hit->content.size();
      start = i;
    }
    if (start < s.size()) out.push_back({std::string(s.substr(start)), -1});
  }
  *pieces = std::move(out);
}

// Runs the pre-tokenizer steps in order over `words` (empty pieces dropped
// after each step, as `tokenizers` does).
void BpeTokenizer::PreTokenize(std::vector<std::string>* words) const {
  for (const PreTokenizer& pre : pre_) {
    std::vector<std::string> out;
    for (std::string& w : *words) {
      if (pre.kind == PreTokenizer::kDigits) {
        // Numeric characters isolated one by one, or as contiguous runs.
        size_t start = 0;
        bool prev_numeric = false;
        for (size_t i = 0; i < w.size();) {
          const Utf8Char c = NextChar(w, i);
          const bool numeric = c.valid && IsNumeric(c.cp);
          if (i > start && (numeric != prev_numeric || (numeric && pre.individual_digits))) {
            out.push_back(w.substr(start, i - start));
            start = i;
          }
          prev_numeric = numeric;
          i += c.len;
        }
        if (start < w.size()) out.push_back(w.substr(start));
      } else {
        if (pre.add_prefix_space && w[0] != ' ') w.insert(w.begin(), ' ');
        if (pre.use_regex) {
          SplitGpt2(w, &out);
        } else {
          out.push_back(std::move(w));
        }
      }
    }
    *words = std::move(out);
  }
}

// BPE over the bytes of one pre-tokenized word: start from one symbol per
// byte, then repeatedly apply the best-ranked merge, leftmost first among
// equal ranks (the order `tokenizers` uses).
void BpeTokenizer::Bpe(std::string_view word, std::vector<int64_t>* ids) const {
  if (ignore_merges_) {
    auto it = vocab_.find(ByteLevelString(word));
    if (it != vocab_.end()) {
      ids->push_back(it->second);
      return;
    }
  }
  struct Symbol {
    int64_t id;
    int prev, next;
    bool alive;
  };
  std::vector<Symbol> sym;
  sym.reserve(word.size());
  for (unsigned char b : word) {
    int64_t id = byte_id_[b];
    if (id < 0) {
      if (model_unk_ < 0) continue;  // dropped, as `tokenizers` does without an unk token
      if (fuse_unk_ && !sym.empty() && sym.back().id == model_unk_) continue;
      id = model_unk_;
    }
    const int k = static_cast<int>(sym.size());
    sym.push_back({id, k - 1, k + 1, true});
  }
  if (sym.empty()) return;
  sym.back().next = -1;
  if (sym.size() > 1) {
    struct Cand {
      int32_t rank;
      int pos;
      int32_t new_id;
      bool operator>(const Cand& o) const {
        return rank != o.rank ? rank > o.rank : pos > o.pos;
      }
    };
    auto find = [&](int64_t a, int64_t b) -> const Merge* {
      auto it = merges_.find((static_cast<uint64_t>(a) << 32) | static_cast<uint64_t>(b));
      return it == merges_.end() ? nullptr : &it->second;
    };
    std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> queue;
    for (int k = 0; k + 1 < static_cast<int>(sym.size()); ++k) {
      if (const Merge* m = find(sym[k].id, sym[k + 1].id)) queue.push({m->rank, k, m->id});
    }
    while (!queue.empty()) {
      const Cand top = queue.top();
      queue.pop();
      Symbol& left = sym[top.pos];
      if (!left.alive || left.next < 0) continue;
      const int right_pos = left.next;
      const Merge* m = find(left.id, sym[right_pos].id);
      if (m == nullptr || m->id != top.new_id) continue;  // stale entry
      left.id = top.new_id;
      sym[right_pos].alive = false;
      left.next = sym[right_pos].next;
      if (left.next >= 0) sym[left.next].prev = top.pos;
      if (left.prev >= 0) {
        if (const Merge* pm = find(sym[left.prev].id, left.id)) {
          queue.push({pm->rank, left.prev, pm->id});
        }
      }
      if (left.next >= 0) {
        if (const Merge* nm = find(left.id, sym[left.next].id)) {
          queue.push({nm->rank, top.pos, nm->id});
        }
      }
    }
  }
  for (int k = 0; k >= 0; k = sym[k].next) ids->push_back(sym[k].id);
}

void BpeTokenizer::EncodeInto(std::string_view text, bool add_special_tokens,
                              std::vector<int64_t>* ids) const {
  if (add_special_tokens) ids->insert(ids->end(), prefix_ids_.begin(), prefix_ids_.end());
  std::vector<Piece> pieces;
  if (!text.empty()) pieces.push_back({std::string(text), -1});
  SplitAdded(added_raw_, &pieces);
  SplitAdded(added_normalized_, &pieces);  // no normalizer: same text, second pass
  std::vector<std::string> words;
  for (Piece& p : pieces) {
    if (p.added_id >= 0) {
      ids->push_back(p.added_id);
      continue;
    }
    words.clear();
    words.push_back(std::move(p.text));
    PreTokenize(&words);
    for (const std::string& w : words) Bpe(w, ids);
  }
  if (add_special_tokens) ids->insert(ids->end(), suffix_ids_.begin(), suffix_ids_.end());
}

std::vector<int64_t> BpeTokenizer::Encode(std::string_view text, bool add_special_tokens) const {
  std::vector<int64_t> ids;
  EncodeInto(text, add_special_tokens, &ids);
  return ids;
}

std::vector<std::string> BpeTokenizer::EncodeToTokens(std::string_view text,
                                                      bool add_special_tokens) const {
  std::vector<std::string> out;
  for (int64_t id : Encode(text, add_special_tokens)) out.push_back(id_to_token_[id]);
  return out;
}

std::string BpeTokenizer::TokenBytes(int64_t id, bool skip_special_tokens) const {
  if (id < 0 || id >= vocab_size() || (skip_special_tokens && special_[id])) return {};
  const std::string& t = id_to_token_[id];
  // Each character back to its byte; a token with a character outside the
  // byte alphabet (an added token) contributes its UTF-8 as is.
  std::string out;
  out.reserve(t.size());
  for (size_t i = 0; i < t.size();) {
    const Utf8Char c = NextChar(t, i);
    auto it = Bytes().to_byte.find(c.cp);
    if (!c.valid || it == Bytes().to_byte.end()) return t;
    out.push_back(static_cast<char>(it->second));
    i += c.len;
  }
  return out;
}

std::string BpeTokenizer::Decode(absl::Span<const int64_t> ids, bool skip_special_tokens) const {
  std::string bytes;
  for (int64_t id : ids) bytes += TokenBytes(id, skip_special_tokens);
  return RepairUtf8(bytes);
}

absl::StatusOr<std::string> BpeTokenizer::ApplyChatTemplate(absl::Span<const ChatMessage> messages,
                                                            bool add_generation_prompt) const {
  if (!chat_status_.ok()) return chat_status_;
  if (messages.empty()) {  // transformers refuses an empty conversation too
    return absl::InvalidArgumentError("chat template: no messages");
  }
  std::string out;
  for (size_t i = 0; i < messages.size(); ++i) {
    if (i == 0 && messages[0].role != "system") {
      absl::StrAppend(&out, "<|im_start|>system\n", default_system_, "<|im_end|>\n");
    }
    absl::StrAppend(&out, "<|im_start|>", messages[i].role, "\n", messages[i].content,
                    "<|im_end|>\n");
  }
  if (add_generation_prompt) out += "<|im_start|>assistant\n";
  return out;
}

absl::StatusOr<std::vector<int64_t>> BpeTokenizer::EncodeChat(
    absl::Span<const ChatMessage> messages, bool add_generation_prompt) const {
  auto text = ApplyChatTemplate(messages, add_generation_prompt);
  if (!text.ok()) return text.status();
  return Encode(*text, /*add_special_tokens=*/false);
}

std::string BpeDecodeStream::Step(int64_t id) {
  pending_ += tok_->TokenBytes(id, skip_special_);
  // Emit everything except a trailing sequence that may still become a valid
  // character with more bytes.
  size_t keep = pending_.size();
  for (size_t back = 1; back <= 3 && back <= pending_.size(); ++back) {
    const size_t i = pending_.size() - back;
    const auto b = static_cast<unsigned char>(pending_[i]);
    if ((b & 0xC0) == 0x80) continue;  // continuation byte: look further back
    int need;
    const int k = ValidPrefix(pending_, i, &need);
    if (k == static_cast<int>(back) && k < need) keep = i;  // valid so far, incomplete
    break;
  }
  std::string out = RepairUtf8(std::string_view(pending_).substr(0, keep));
  pending_.erase(0, keep);
  return out;
}

std::string BpeDecodeStream::Finish() {
  std::string out = RepairUtf8(pending_);
  pending_.clear();
  return out;
}

}  // namespace metatt
