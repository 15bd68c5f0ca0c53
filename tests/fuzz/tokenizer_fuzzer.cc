// libFuzzer target: server/model/tokenizer.h WordPieceTokenizer::Encode() on
// arbitrary bytes (invalid UTF-8 included), with the real MiniLM vocabulary.
//
// The tokenizer is built once from $METATT_MODEL_DIR (default: the repo's
// models/all-MiniLM-L6-v2, compiled in as METATT_FUZZ_DEFAULT_MODEL_DIR).
// Input layout: byte 0 = max_length (bits 0-6; 0: no truncation),
//               byte 1 = split ratio for a pair (bits 0-6; bit 7 set: single text),
//               rest   = text a (+ text b).
// Bits 0x80 of byte 0 and 0x40 of byte 1 both set: also PreTokenize /
// TokenizeToStrings, and a differential check against the same vocabulary
// loaded from vocab.txt.
// Invariants: [CLS] first, [SEP] last, every id in [0, vocab_size), ids /
// type_ids / attention_mask of equal length, length <= max(max_length, number
// of special tokens), type ids 0 then 1, attention mask all ones.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>

#include "tests/fuzz/fuzz_check.h"
#include "server/model/tokenizer.h"

#ifndef METATT_FUZZ_DEFAULT_MODEL_DIR
#define METATT_FUZZ_DEFAULT_MODEL_DIR "models/all-MiniLM-L6-v2"
#endif

namespace {

const metatt::WordPieceTokenizer* Load(const std::string& path) {
  auto t = metatt::WordPieceTokenizer::Create(path);
  if (!t.ok()) {
    std::fprintf(stderr, "tokenizer_fuzzer: cannot load a tokenizer from %s: %s\n",
                 path.c_str(), std::string(t.status().message()).c_str());
    std::abort();
  }
  return new metatt::WordPieceTokenizer(std::move(*t));
}

std::string ModelDir() {
  const char* env = std::getenv("METATT_MODEL_DIR");
  return env && *env ? env : METATT_FUZZ_DEFAULT_MODEL_DIR;
}

// The production path: the model directory (tokenizer.json when present).
const metatt::WordPieceTokenizer& Tokenizer() {
  static const metatt::WordPieceTokenizer* tok = Load(ModelDir());
  return *tok;
}
// The same vocabulary loaded from vocab.txt (+ tokenizer_config.json flags):
// must give identical encodings.
const metatt::WordPieceTokenizer& VocabTxtTokenizer() {
  static const metatt::WordPieceTokenizer* tok = Load(ModelDir() + "/vocab.txt");
  return *tok;
}

void CheckEncoding(const metatt::WordPieceTokenizer& tok, const metatt::Encoding& e,
                   int max_length, bool pair) {
  const size_t specials = pair ? 3 : 2;
  FUZZ_CHECK(e.ids.size() >= specials);
  FUZZ_CHECK(e.type_ids.size() == e.ids.size());
  FUZZ_CHECK(e.attention_mask.size() == e.ids.size());
  if (max_length > 0)
    FUZZ_CHECK(e.ids.size() <= std::max<size_t>(static_cast<size_t>(max_length), specials));
  FUZZ_CHECK(e.ids.front() == tok.cls_id());
  FUZZ_CHECK(e.ids.back() == tok.sep_id());
  const int64_t vocab = static_cast<int64_t>(tok.vocab_size());
  size_t seps = 0;
  bool seen_one = false;
  for (size_t i = 0; i < e.ids.size(); ++i) {
    FUZZ_CHECK(e.ids[i] >= 0 && e.ids[i] < vocab);
    FUZZ_CHECK(e.attention_mask[i] == 1);
    FUZZ_CHECK(e.type_ids[i] == 0 || e.type_ids[i] == 1);
    if (e.type_ids[i] == 1) seen_one = true;
    else FUZZ_CHECK(!seen_one);  // 0s then 1s
    if (e.ids[i] == tok.sep_id()) ++seps;
  }
  FUZZ_CHECK(seps >= (pair ? 2u : 1u));
  FUZZ_CHECK(seen_one == pair);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  (void)Tokenizer();
  (void)VocabTxtTokenizer();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  const auto& tok = Tokenizer();
  const int max_length = data[0] & 0x7f;
  const bool single = data[1] & 0x80;
  const std::string_view rest(reinterpret_cast<const char*>(data + 2), size - 2);

  std::string_view a = rest;
  std::optional<std::string_view> b;
  if (!single) {
    const size_t cut = rest.size() * (data[1] & 0x7f) / 127;
    a = rest.substr(0, cut);
    b = rest.substr(cut);
  }
  const metatt::Encoding e = tok.Encode(a, b, max_length);
  CheckEncoding(tok, e, max_length, b.has_value() && !b->empty());

  // Untruncated tokenization agrees with the encoding when nothing was cut.
  const auto ids = tok.Tokenize(a);
  for (int64_t id : ids) FUZZ_CHECK(id >= 0 && id < static_cast<int64_t>(tok.vocab_size()));
  if (single && max_length == 0) FUZZ_CHECK(e.ids.size() == ids.size() + 2);
  if ((data[0] & 0x80) && (data[1] & 0x40)) {  // ~1 input in 4: the costlier checks
    (void)tok.PreTokenize(a);
    (void)tok.TokenizeToStrings(a);
    // Differential: tokenizer.json vs vocab.txt loading.
    const metatt::Encoding e2 = VocabTxtTokenizer().Encode(a, b, max_length);
    FUZZ_CHECK(e2.ids == e.ids);
    FUZZ_CHECK(e2.type_ids == e.type_ids);
  }
  return 0;
}
