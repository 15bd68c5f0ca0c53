#include "server/model/tokenizer.h"

#include <algorithm>
#include <array>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <system_error>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"
#include "server/model/tokenizer_text.h"

namespace metatt {
namespace {

struct CccRange {
  char32_t lo, hi;
  uint8_t ccc;
};
struct CpMapping {
  char32_t cp;
  uint32_t offset, len;
};

#include "server/model/tokenizer_unicode_tables.inc"

uint8_t CombiningClass(char32_t c) {
  if (c < 0x300) return 0;
  const CccRange* begin = kCombiningClass;
  const CccRange* end = begin + std::size(kCombiningClass);
  const CccRange* it =
      std::upper_bound(begin, end, c, [](char32_t v, const CccRange& r) { return v < r.lo; });
  if (it != begin && c <= (it - 1)->hi) return (it - 1)->ccc;
  return 0;
}

template <size_t N, size_t P>
bool LookupMapping(const CpMapping (&table)[N], const char32_t (&pool)[P], char32_t c,
                   std::u32string* out) {
  const CpMapping* end = table + N;
  const CpMapping* it =
      std::lower_bound(table, end, c, [](const CpMapping& m, char32_t v) { return m.cp < v; });
  if (it == end || it->cp != c) return false;
  out->append(pool + it->offset, it->len);
  return true;
}

// Per-ASCII-char class bits, precomputed from the tables.
enum : uint8_t {
  kDrop = 1,
  kSpace = 2,     // clean_text maps to ' '
  kWs = 4,        // pre-tokenizer whitespace
  kPunctBit = 8,  // pre-tokenizer punctuation
};

const std::array<uint8_t, 128>& AsciiClasses() {
  static const std::array<uint8_t, 128> table = [] {
    std::array<uint8_t, 128> t{};
    for (char32_t c = 0; c < 128; ++c) {
      uint8_t v = 0;
      if (InRanges(kCleanDrop, c)) v |= kDrop;
      if (InRanges(kCleanSpace, c)) v |= kSpace;
      if (InRanges(kWhitespace, c)) v |= kWs;
      if (InRanges(kPunct, c)) v |= kPunctBit;
      t[c] = v;
    }
    return t;
  }();
  return table;
}

bool IsDrop(char32_t c) { return c < 128 ? (AsciiClasses()[c] & kDrop) : InRanges(kCleanDrop, c); }
bool IsCleanSpace(char32_t c) {
  return c < 128 ? (AsciiClasses()[c] & kSpace) : InRanges(kCleanSpace, c);
}
bool IsWhitespace(char32_t c) {
  return c < 128 ? (AsciiClasses()[c] & kWs) : InRanges(kWhitespace, c);
}
bool IsPunct(char32_t c) { return c < 128 ? (AsciiClasses()[c] & kPunctBit) : InRanges(kPunct, c); }

void Decompose(char32_t c, std::u32string* out) {
  if (c < 0xC0) {
    out->push_back(c);
    return;
  }
  constexpr char32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7,
                     kTCount = 28, kNCount = 588, kSCount = 11172;
  if (c >= kSBase && c < kSBase + kSCount) {
    char32_t s = c - kSBase;
    out->push_back(kLBase + s / kNCount);
    out->push_back(kVBase + (s % kNCount) / kTCount);
    if (s % kTCount != 0) out->push_back(kTBase + s % kTCount);
    return;
  }
  if (!LookupMapping(kDecomposition, kDecompositionPool, c, out)) {
    out->push_back(c);
  }
}

void AppendLower(char32_t c, std::u32string* out) {
  if (c < 128) {
    out->push_back(c >= 'A' && c <= 'Z' ? c + 32 : c);
    return;
  }
  if (!LookupMapping(kLowercase, kLowercasePool, c, out)) out->push_back(c);
}

// ---- UTF-8 ------------------------------------------------------------------

// Decodes UTF-8; each byte of an invalid sequence becomes U+FFFD.
std::u32string DecodeUtf8(std::string_view s) {
  std::u32string out;
  out.reserve(s.size());
  size_t i = 0;
  const size_t n = s.size();
  while (i < n) {
    unsigned char b0 = static_cast<unsigned char>(s[i]);
    if (b0 < 0x80) {
      out.push_back(b0);
      ++i;
      continue;
    }
    int len = 0;
    char32_t cp = 0, min = 0;
    if ((b0 & 0xE0) == 0xC0) {
      len = 2, cp = b0 & 0x1F, min = 0x80;
    } else if ((b0 & 0xF0) == 0xE0) {
      len = 3, cp = b0 & 0x0F, min = 0x800;
    } else if ((b0 & 0xF8) == 0xF0) {
      len = 4, cp = b0 & 0x07, min = 0x10000;
    }
    bool ok = len > 0 && i + len <= n;
    for (int k = 1; ok && k < len; ++k) {
      unsigned char b = static_cast<unsigned char>(s[i + k]);
      if ((b & 0xC0) != 0x80) {
        ok = false;
      } else {
        cp = (cp << 6) | (b & 0x3F);
      }
    }
    if (ok && (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))) {
      ok = false;
    }
    if (ok) {
      out.push_back(cp);
      i += len;
    } else {
      out.push_back(0xFFFD);
      ++i;
    }
  }
  return out;
}

std::string EncodeUtf8(std::u32string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char32_t c : s) AppendUtf8(c, &out);
  return out;
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  return ReadTokenizerFile(path, "tokenizer");
}

// The JSON object in the file at `path` (tokenizer.json, tokenizer_config.json).
absl::StatusOr<nlohmann::json> ReadJsonObject(const std::string& path) {
  auto text = ReadFile(path);
  if (!text.ok()) return text.status();
  nlohmann::json j = nlohmann::json::parse(*text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer: '", path, "' is not a valid JSON object"));
  }
  return j;
}

// Leftmost-longest split of `text` on `tokens` (HF AddedVocabulary matching).
// Calls on_text(segment) for unmatched text and on_token(id) for matches.
template <typename OnText, typename OnToken>
void SplitOnTokens(std::u32string_view text, const std::vector<const std::u32string*>& contents,
                   const std::vector<int64_t>& ids, OnText on_text, OnToken on_token) {
  size_t seg_start = 0;
  size_t i = 0;
  while (i < text.size()) {
    size_t best_len = 0;
    int64_t best_id = -1;
    for (size_t t = 0; t < contents.size(); ++t) {
      const std::u32string& tok = *contents[t];
      if (tok.size() > best_len && tok.size() <= text.size() - i &&
          text.compare(i, tok.size(), tok) == 0) {
        best_len = tok.size();
        best_id = ids[t];
      }
    }
    if (best_len == 0) {
      ++i;
      continue;
    }
    if (i > seg_start) on_text(text.substr(seg_start, i - seg_start));
    on_token(best_id);
    i += best_len;
    seg_start = i;
  }
  if (seg_start < text.size()) on_text(text.substr(seg_start));
}

}  // namespace

// ---- Construction -------------------------------------------------------------

absl::Status WordPieceTokenizer::Finish() {
  if (vocab_.empty()) {
    return absl::InvalidArgumentError("tokenizer: vocabulary is empty");
  }
  auto need = [this](const std::string& tok, const char* what, int64_t* id) -> absl::Status {
    auto it = vocab_.find(tok);
    if (it == vocab_.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer: ", what, " token '", tok, "' is not in the vocabulary"));
    }
    *id = it->second;
    return absl::OkStatus();
  };
  if (auto s = need(options_.unk_token, "unk", &unk_id_); !s.ok()) return s;
  if (auto s = need(options_.cls_token, "cls", &cls_id_); !s.ok()) return s;
  if (auto s = need(options_.sep_token, "sep", &sep_id_); !s.ok()) return s;
  if (options_.max_input_chars_per_word < 0) {
    return absl::InvalidArgumentError("tokenizer: max_input_chars_per_word must be >= 0");
  }
  for (const auto& [tok, id] : vocab_) id_to_token_[id] = tok;
  // Normalized added tokens are matched against normalized text, so their
  // content is normalized too (as HF does).
  for (AddedToken& t : added_) {
    if (t.normalized) t.content = Normalize(t.content);
  }
  added_.erase(std::remove_if(added_.begin(), added_.end(),
                              [](const AddedToken& t) { return t.content.empty(); }),
               added_.end());
  return absl::OkStatus();
}

absl::StatusOr<WordPieceTokenizer> WordPieceTokenizer::FromVocab(
    const std::vector<std::string>& vocab, Options options) {
  WordPieceTokenizer tok;
  tok.options_ = std::move(options);
  for (size_t i = 0; i < vocab.size(); ++i) {
    tok.vocab_[vocab[i]] = static_cast<int64_t>(i);  // later duplicates win
  }
  auto pad = tok.vocab_.find(tok.options_.pad_token);
  tok.pad_id_ = pad == tok.vocab_.end() ? 0 : pad->second;
  // transformers registers the five BERT special tokens as added tokens.
  for (const std::string& s :
       {tok.options_.pad_token, tok.options_.unk_token, tok.options_.cls_token,
        tok.options_.sep_token, std::string("[MASK]")}) {
    auto it = tok.vocab_.find(s);
    if (it != tok.vocab_.end() && !s.empty()) {
      tok.added_.push_back({DecodeUtf8(s), it->second, false});
    }
  }
  if (auto s = tok.Finish(); !s.ok()) return s;
  return tok;
}

namespace {

absl::StatusOr<WordPieceTokenizer> LoadVocabTxt(const std::string& vocab_path,
                                                const std::string& config_path) {
  auto text = ReadFile(vocab_path);
  if (!text.ok()) return text.status();
  std::vector<std::string> vocab;
  size_t pos = 0;
  const std::string& t = *text;
  while (pos < t.size()) {
    size_t nl = t.find('\n', pos);
    if (nl == std::string::npos) nl = t.size();
    vocab.emplace_back(t.substr(pos, nl - pos));  // like rstrip("\n")
    pos = nl + 1;
  }
  if (vocab.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer: vocabulary file '", vocab_path, "' is empty"));
  }
  WordPieceTokenizer::Options opts;
  std::error_code ec;
  if (!config_path.empty() && std::filesystem::exists(config_path, ec)) {
    auto read = ReadJsonObject(config_path);
    if (!read.ok()) return read.status();
    nlohmann::json cfg = std::move(*read);
    try {
      if (cfg.contains("do_lower_case") && cfg["do_lower_case"].is_boolean()) {
        opts.lowercase = cfg["do_lower_case"].get<bool>();
      }
      opts.strip_accents = opts.lowercase;
      if (cfg.contains("strip_accents") && cfg["strip_accents"].is_boolean()) {
        opts.strip_accents = cfg["strip_accents"].get<bool>();
      }
      if (cfg.contains("tokenize_chinese_chars") && cfg["tokenize_chinese_chars"].is_boolean()) {
        opts.tokenize_chinese_chars = cfg["tokenize_chinese_chars"].get<bool>();
      }
      for (auto [key, field] : {std::pair<const char*, std::string*>{"unk_token", &opts.unk_token},
                                {"cls_token", &opts.cls_token},
                                {"sep_token", &opts.sep_token},
                                {"pad_token", &opts.pad_token}}) {
        if (cfg.contains(key) && cfg[key].is_string()) {
          *field = cfg[key].get<std::string>();
        }
      }
    } catch (const nlohmann::json::exception& e) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer: bad '", config_path, "': ", e.what()));
    }
  }
  return WordPieceTokenizer::FromVocab(vocab, std::move(opts));
}

}  // namespace

absl::StatusOr<WordPieceTokenizer> WordPieceTokenizer::Create(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  std::string json_path, vocab_path, config_path;
  if (fs::is_directory(path, ec)) {
    fs::path dir(path);
    if (fs::exists(dir / "tokenizer.json", ec)) {
      json_path = (dir / "tokenizer.json").string();
    } else if (fs::exists(dir / "vocab.txt", ec)) {
      vocab_path = (dir / "vocab.txt").string();
      config_path = (dir / "tokenizer_config.json").string();
    } else {
      return absl::NotFoundError(
          absl::StrCat("tokenizer: no tokenizer.json or vocab.txt in '", path, "'"));
    }
  } else if (fs::exists(path, ec)) {
    if (absl::EndsWith(path, ".json")) {
      json_path = path;
    } else {
      vocab_path = path;
    }
  } else {
    return absl::NotFoundError(absl::StrCat("tokenizer: '", path, "' does not exist"));
  }
  if (!vocab_path.empty()) return LoadVocabTxt(vocab_path, config_path);

  auto read = ReadJsonObject(json_path);
  if (!read.ok()) return read.status();
  nlohmann::json j = std::move(*read);
  auto bad = [&](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer: '", json_path, "': ", why));
  };
  WordPieceTokenizer tok;
  Options& o = tok.options_;
  try {
    const nlohmann::json& model = j.value("model", nlohmann::json());
    if (!model.is_object() || model.value("type", "") != "WordPiece") {
      return bad("model.type must be \"WordPiece\"");
    }
    const nlohmann::json& vocab = model.value("vocab", nlohmann::json());
    if (!vocab.is_object() || vocab.empty()) {
      return bad("model.vocab missing or empty");
    }
    for (const auto& [token, id] : vocab.items()) {
      if (!id.is_number_integer()) return bad("non-integer id in model.vocab");
      tok.vocab_[token] = id.get<int64_t>();
    }
    o.unk_token = model.value("unk_token", o.unk_token);
    o.continuing_subword_prefix =
        model.value("continuing_subword_prefix", o.continuing_subword_prefix);
    o.max_input_chars_per_word =
        model.value("max_input_chars_per_word", o.max_input_chars_per_word);

    const nlohmann::json& norm = j.value("normalizer", nlohmann::json());
    if (norm.is_null()) {
      o.clean_text = o.lowercase = o.strip_accents = false;
      o.tokenize_chinese_chars = false;
    } else if (norm.is_object() && norm.value("type", "") == "BertNormalizer") {
      o.clean_text = norm.value("clean_text", true);
      o.tokenize_chinese_chars = norm.value("handle_chinese_chars", true);
      o.lowercase = norm.value("lowercase", true);
      const auto sa = norm.find("strip_accents");
      o.strip_accents = (sa == norm.end() || sa->is_null()) ? o.lowercase : sa->get<bool>();
    } else {
      return bad("unsupported normalizer (only BertNormalizer)");
    }
    const nlohmann::json& pre = j.value("pre_tokenizer", nlohmann::json());
    if (!pre.is_object() || pre.value("type", "") != "BertPreTokenizer") {
      return bad("unsupported pre_tokenizer (only BertPreTokenizer)");
    }
    const nlohmann::json& post = j.value("post_processor", nlohmann::json());
    if (post.is_object() && post.value("type", "") == "TemplateProcessing") {
      const auto& single = post.at("single");
      if (single.is_array() && single.size() >= 2 && single.front().contains("SpecialToken") &&
          single.back().contains("SpecialToken")) {
        o.cls_token = single.front()["SpecialToken"].at("id").get<std::string>();
        o.sep_token = single.back()["SpecialToken"].at("id").get<std::string>();
      } else {
        return bad("unsupported TemplateProcessing (expected [CLS] $A [SEP])");
      }
    } else if (post.is_object() && post.value("type", "") == "BertProcessing") {
      o.cls_token = post.at("cls").at(0).get<std::string>();
      o.sep_token = post.at("sep").at(0).get<std::string>();
    } else if (!post.is_null()) {
      return bad("unsupported post_processor");
    }
    const nlohmann::json& pad = j.value("padding", nlohmann::json());
    bool have_pad_id = false;
    if (pad.is_object()) {
      o.pad_token = pad.value("pad_token", o.pad_token);
      if (pad.contains("pad_id") && pad["pad_id"].is_number_integer()) {
        tok.pad_id_ = pad["pad_id"].get<int64_t>();
        have_pad_id = true;
      }
    }
    if (!have_pad_id) {
      auto it = tok.vocab_.find(o.pad_token);
      tok.pad_id_ = it == tok.vocab_.end() ? 0 : it->second;
    }
    const nlohmann::json& added = j.value("added_tokens", nlohmann::json());
    if (added.is_array()) {
      for (const auto& a : added) {
        std::string content = a.at("content").get<std::string>();
        int64_t id = a.at("id").get<int64_t>();
        // Added tokens outside model.vocab still map to their id.
        tok.vocab_.try_emplace(content, id);
        tok.added_.push_back({DecodeUtf8(content), id, a.value("normalized", false)});
      }
    }
  } catch (const nlohmann::json::exception& e) {
    return bad(e.what());
  }
  if (auto s = tok.Finish(); !s.ok()) return s;
  return tok;
}

int64_t WordPieceTokenizer::TokenToId(std::string_view token) const {
  auto it = vocab_.find(absl::string_view(token.data(), token.size()));
  return it == vocab_.end() ? -1 : it->second;
}

// ---- Pipeline -----------------------------------------------------------------

std::u32string WordPieceTokenizer::Normalize(std::u32string_view text) const {
  std::u32string s;
  s.reserve(text.size() + 8);
  for (char32_t c : text) {
    if (options_.clean_text) {
      if (c == 0 || c == 0xFFFD || IsDrop(c)) continue;
      if (IsCleanSpace(c)) c = U' ';
    }
    if (options_.tokenize_chinese_chars && c >= 0x3400 && InRanges(kChinese, c)) {
      s.push_back(U' ');
      s.push_back(c);
      s.push_back(U' ');
    } else {
      s.push_back(c);
    }
  }
  if (options_.strip_accents) {
    // NFD: full decomposition + canonical reordering, then drop Mn.
    std::u32string d;
    d.reserve(s.size());
    for (char32_t c : s) Decompose(c, &d);
    for (size_t i = 0; i < d.size();) {
      if (CombiningClass(d[i]) == 0) {
        ++i;
        continue;
      }
      size_t j = i;
      while (j < d.size() && CombiningClass(d[j]) != 0) ++j;
      if (j - i > 1) {
        std::stable_sort(d.begin() + i, d.begin() + j, [](char32_t x, char32_t y) {
          return CombiningClass(x) < CombiningClass(y);
        });
      }
      i = j;
    }
    s.clear();
    for (char32_t c : d) {
      if (c >= 0x300 && InRanges(kNonSpacingMark, c)) continue;
      s.push_back(c);
    }
  }
  if (options_.lowercase) {
    std::u32string l;
    l.reserve(s.size());
    for (char32_t c : s) AppendLower(c, &l);
    s = std::move(l);
  }
  return s;
}

std::vector<std::u32string> WordPieceTokenizer::SplitWords(std::u32string_view text) const {
  std::vector<std::u32string> words;
  std::u32string cur;
  for (char32_t c : text) {
    if (IsWhitespace(c)) {
      if (!cur.empty()) words.push_back(std::move(cur));
      cur.clear();
    } else if (IsPunct(c)) {
      if (!cur.empty()) words.push_back(std::move(cur));
      cur.clear();
      words.emplace_back(1, c);
    } else {
      cur.push_back(c);
    }
  }
  if (!cur.empty()) words.push_back(std::move(cur));
  return words;
}

void WordPieceTokenizer::WordPiece(std::u32string_view word, std::vector<int64_t>* ids) const {
  if (word.size() > static_cast<size_t>(options_.max_input_chars_per_word)) {
    ids->push_back(unk_id_);
    return;
  }
  // Byte offset of each char boundary.
  std::string utf8;
  std::vector<size_t> off;
  off.reserve(word.size() + 1);
  for (char32_t c : word) {
    off.push_back(utf8.size());
    AppendUtf8(c, &utf8);
  }
  off.push_back(utf8.size());
  const size_t n = word.size();
  const size_t mark = ids->size();
  std::string piece;
  size_t start = 0;
  while (start < n) {
    size_t end = n;
    int64_t found = -1;
    while (start < end) {
      std::string_view sub(utf8.data() + off[start], off[end] - off[start]);
      if (start > 0) {
        piece.assign(options_.continuing_subword_prefix);
        piece.append(sub);
        sub = piece;
      }
      auto it = vocab_.find(absl::string_view(sub.data(), sub.size()));
      if (it != vocab_.end()) {
        found = it->second;
        break;
      }
      --end;
    }
    if (found < 0) {
      ids->resize(mark);
      ids->push_back(unk_id_);
      return;
    }
    ids->push_back(found);
    start = end;
  }
}

void WordPieceTokenizer::TokenizeNormalized(std::u32string_view normalized,
                                            std::vector<int64_t>* ids) const {
  for (const std::u32string& w : SplitWords(normalized)) WordPiece(w, ids);
}

void WordPieceTokenizer::TokenizeSegment(std::u32string_view raw, std::vector<int64_t>* ids) const {
  std::u32string norm = Normalize(raw);
  std::vector<const std::u32string*> contents;
  std::vector<int64_t> tok_ids;
  for (const AddedToken& t : added_) {
    if (t.normalized) {
      contents.push_back(&t.content);
      tok_ids.push_back(t.id);
    }
  }
  if (contents.empty()) {
    TokenizeNormalized(norm, ids);
    return;
  }
  SplitOnTokens(
      norm, contents, tok_ids, [&](std::u32string_view seg) { TokenizeNormalized(seg, ids); },
      [&](int64_t id) { ids->push_back(id); });
}

std::vector<int64_t> WordPieceTokenizer::Tokenize(std::string_view text) const {
  std::u32string raw = DecodeUtf8(text);
  std::vector<int64_t> ids;
  std::vector<const std::u32string*> contents;
  std::vector<int64_t> tok_ids;
  for (const AddedToken& t : added_) {
    if (!t.normalized) {
      contents.push_back(&t.content);
      tok_ids.push_back(t.id);
    }
  }
  SplitOnTokens(
      raw, contents, tok_ids, [&](std::u32string_view seg) { TokenizeSegment(seg, &ids); },
      [&](int64_t id) { ids.push_back(id); });
  return ids;
}

std::vector<std::string> WordPieceTokenizer::TokenizeToStrings(std::string_view text) const {
  std::vector<std::string> out;
  for (int64_t id : Tokenize(text)) {
    auto it = id_to_token_.find(id);
    out.push_back(it == id_to_token_.end() ? std::string("<?>") : it->second);
  }
  return out;
}

std::vector<std::string> WordPieceTokenizer::PreTokenize(std::string_view text) const {
  std::vector<std::string> out;
  for (const std::u32string& w : SplitWords(Normalize(DecodeUtf8(text)))) {
    out.push_back(EncodeUtf8(w));
  }
  return out;
}

Encoding WordPieceTokenizer::Encode(std::string_view a, std::optional<std::string_view> b,
                                    int max_length) const {
  std::vector<int64_t> ia = Tokenize(a);
  const bool pair = b.has_value() && !b->empty();
  std::vector<int64_t> ib;
  if (pair) ib = Tokenize(*b);

  if (max_length > 0) {
    const size_t added = pair ? 3 : 2;
    const size_t budget = static_cast<size_t>(max_length) > added ? max_length - added : 0;
    if (!pair) {
      if (ia.size() > budget) ia.resize(budget);
    } else if (ia.size() + ib.size() > budget) {
      // tokenizers' TruncationStrategy::LongestFirst.
      size_t n1 = ia.size(), n2 = ib.size();
      const bool swap = n1 > n2;
      if (swap) std::swap(n1, n2);
      if (n1 > budget) {
        n2 = n1;
      } else {
        n2 = std::max(n1, budget - n1);
      }
      if (n1 + n2 > budget) {
        n1 = budget / 2;
        n2 = n1 + budget % 2;
      }
      if (swap) std::swap(n1, n2);
      if (ia.size() > n1) ia.resize(n1);
      if (ib.size() > n2) ib.resize(n2);
    }
  }

  Encoding e;
  const size_t total = ia.size() + ib.size() + (pair ? 3 : 2);
  e.ids.reserve(total);
  e.type_ids.reserve(total);
  e.ids.push_back(cls_id_);
  e.ids.insert(e.ids.end(), ia.begin(), ia.end());
  e.ids.push_back(sep_id_);
  e.type_ids.assign(e.ids.size(), 0);
  if (pair) {
    e.ids.insert(e.ids.end(), ib.begin(), ib.end());
    e.ids.push_back(sep_id_);
    e.type_ids.resize(e.ids.size(), 1);
  }
  e.attention_mask.assign(e.ids.size(), 1);
  return e;
}

std::vector<Encoding> WordPieceTokenizer::EncodeBatch(
    const std::vector<std::pair<std::string, std::optional<std::string>>>& inputs,
    int max_length) const {
  std::vector<Encoding> out;
  out.reserve(inputs.size());
  size_t longest = 0;
  for (const auto& [a, b] : inputs) {
    std::optional<std::string_view> bv;
    if (b.has_value()) bv = *b;
    out.push_back(Encode(a, bv, max_length));
    longest = std::max(longest, out.back().ids.size());
  }
  for (Encoding& e : out) {
    e.ids.resize(longest, pad_id_);
    e.type_ids.resize(longest, 0);
    e.attention_mask.resize(longest, 0);
  }
  return out;
}

}  // namespace metatt
