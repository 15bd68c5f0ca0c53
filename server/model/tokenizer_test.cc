#include "server/model/tokenizer.h"
#include "server/model/model_dir.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace metatt {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using Strs = std::vector<std::string>;

const std::vector<std::string>& SmallVocab() {
  static const std::vector<std::string> v = {
      "[PAD]", "[UNK]",  "[CLS]", "[SEP]", "[MASK]",                         // 0-4
      "hello", "world",  "un",    "##aff", "##able", ",", "!",       ".",    // 5-12
      "cafe",  "resume", "你",    "好",    "a",      "b", "c",       "d",    // 13-20
      "##s",   "the",    "—",     "ab",    "cd",     "[", "]",       "sep",  // 21-28
      "e",     "f",      "g",     "h",     "¿",      "i", "istanbul"};       // 29-35
  return v;
}

WordPieceTokenizer Small(WordPieceTokenizer::Options o = {}) {
  auto t = WordPieceTokenizer::FromVocab(SmallVocab(), o);
  EXPECT_TRUE(t.ok()) << t.status();
  return *std::move(t);
}

std::string TempDir(const std::string& name) {
  std::filesystem::path p = std::filesystem::path(::testing::TempDir()) / ("metatt_tok_" + name);
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  return p.string();
}

void WriteFile(const std::string& path, const std::string& content) {
  std::ofstream(path, std::ios::binary) << content;
}

TEST(WordPieceTokenizerTest, SpecialIds) {
  auto t = Small();
  EXPECT_EQ(t.pad_id(), 0);
  EXPECT_EQ(t.unk_id(), 1);
  EXPECT_EQ(t.cls_id(), 2);
  EXPECT_EQ(t.sep_id(), 3);
  EXPECT_EQ(t.vocab_size(), SmallVocab().size());
}

TEST(WordPieceTokenizerTest, LowercaseAndPunctuation) {
  auto t = Small();
  EXPECT_THAT(t.TokenizeToStrings("Hello, WORLD!"), ElementsAre("hello", ",", "world", "!"));
  EXPECT_THAT(t.TokenizeToStrings("a.b"), ElementsAre("a", ".", "b"));
  // Unicode punctuation (Pd, Po) is isolated too.
  EXPECT_THAT(t.TokenizeToStrings("a—b¿c"), ElementsAre("a", "—", "b", "¿", "c"));
  // ASCII symbols that are not Unicode P* ($, +, ^, `) still split (BERT).
  EXPECT_THAT(t.PreTokenize("a$b+c^d`e"), ElementsAre("a", "$", "b", "+", "c", "^", "d", "`", "e"));
}

TEST(WordPieceTokenizerTest, AccentsAreStripped) {
  auto t = Small();
  EXPECT_THAT(t.TokenizeToStrings("Café RÉSUMÉ"), ElementsAre("cafe", "resume"));
  // Decomposed input (e + U+0301) gives the same.
  EXPECT_THAT(t.TokenizeToStrings("cafe\xCC\x81"), ElementsAre("cafe"));
  // U+0130 (I with dot above) -> "i" after NFD, mark removal, lowercase.
  EXPECT_THAT(t.TokenizeToStrings("İstanbul"), ElementsAre("istanbul"));
  WordPieceTokenizer::Options keep;
  keep.strip_accents = false;
  EXPECT_THAT(Small(keep).PreTokenize("Café"), ElementsAre("café"));
  WordPieceTokenizer::Options cased;
  cased.lowercase = false;
  cased.strip_accents = false;
  EXPECT_THAT(Small(cased).PreTokenize("Café"), ElementsAre("Café"));
}

TEST(WordPieceTokenizerTest, ChineseCharsAreSplit) {
  auto t = Small();
  EXPECT_THAT(t.TokenizeToStrings("你好a"), ElementsAre("你", "好", "a"));
  WordPieceTokenizer::Options o;
  o.tokenize_chinese_chars = false;
  EXPECT_THAT(Small(o).PreTokenize("你好a"), ElementsAre("你好a"));
}

TEST(WordPieceTokenizerTest, CleanText) {
  auto t = Small();
  // \x01 (Cc) and U+00AD (Cf) are dropped, tab/newline are whitespace,
  // U+FFFD and NUL are dropped.
  EXPECT_THAT(t.PreTokenize(std::string("a\x01"
                                        "b\tc\xC2\xAD"
                                        "d\n\xEF\xBF\xBD",
                                        13) +
                            std::string(1, '\0') + "e"),
              ElementsAre("ab", "cd", "e"));
  EXPECT_THAT(t.PreTokenize("a\xE3\x80\x80"
                            "b"),
              ElementsAre("a", "b"));  // U+3000
  // Invalid UTF-8 bytes become U+FFFD and are dropped.
  EXPECT_THAT(t.PreTokenize("a\xFF"
                            "b"),
              ElementsAre("ab"));
  EXPECT_TRUE(t.Tokenize(" \t\n ").empty());
}

TEST(WordPieceTokenizerTest, WordPiecesAndUnknown) {
  auto t = Small();
  EXPECT_THAT(t.TokenizeToStrings("unaffable"), ElementsAre("un", "##aff", "##able"));
  EXPECT_THAT(t.TokenizeToStrings("worlds"), ElementsAre("world", "##s"));
  // Longest match first: "ab" beats "a" + ...; "abs" -> "ab" "##s".
  EXPECT_THAT(t.TokenizeToStrings("abs"), ElementsAre("ab", "##s"));
  // One unmatched piece makes the whole word [UNK].
  EXPECT_THAT(t.TokenizeToStrings("unaffxyz hello"), ElementsAre("[UNK]", "hello"));
  EXPECT_THAT(t.TokenizeToStrings("🤗"), ElementsAre("[UNK]"));
}

TEST(WordPieceTokenizerTest, LongWordsAreUnknown) {
  auto t = Small();
  // A 100-char word still tokenizes; 101 chars is [UNK].
  std::string ok = "world" + std::string(95, 's');  // 100 chars
  EXPECT_EQ(t.Tokenize(ok).size(), 96u);
  EXPECT_THAT(t.TokenizeToStrings(ok + "s"), ElementsAre("[UNK]"));  // 101
  WordPieceTokenizer::Options o;
  o.max_input_chars_per_word = 5;
  EXPECT_THAT(Small(o).TokenizeToStrings("worlds world"), ElementsAre("[UNK]", "world"));
}

TEST(WordPieceTokenizerTest, SpecialTokensInTextAreMatchedVerbatim) {
  auto t = Small();
  EXPECT_THAT(t.TokenizeToStrings("hello [SEP] world[MASK]"),
              ElementsAre("hello", "[SEP]", "world", "[MASK]"));
  // Matching is on the raw text: case matters.
  EXPECT_THAT(t.TokenizeToStrings("[sep]"), ElementsAre("[", "sep", "]"));
}

TEST(WordPieceTokenizerTest, EncodeSingleAndPair) {
  auto t = Small();
  Encoding e = t.Encode("Hello world", std::nullopt, 128);
  EXPECT_THAT(e.ids, ElementsAre(2, 5, 6, 3));
  EXPECT_THAT(e.type_ids, ElementsAre(0, 0, 0, 0));
  EXPECT_THAT(e.attention_mask, ElementsAre(1, 1, 1, 1));
  e = t.Encode("hello", std::string_view("world !"), 128);
  EXPECT_THAT(e.ids, ElementsAre(2, 5, 3, 6, 11, 3));
  EXPECT_THAT(e.type_ids, ElementsAre(0, 0, 0, 1, 1, 1));
  // Empty second text: no pair (as transformers' tokenizer(a, "")).
  e = t.Encode("hello", std::string_view(""), 128);
  EXPECT_THAT(e.ids, ElementsAre(2, 5, 3));
  e = t.Encode("", std::nullopt, 128);
  EXPECT_THAT(e.ids, ElementsAre(2, 3));
}

TEST(WordPieceTokenizerTest, SingleTruncation) {
  auto t = Small();
  Encoding e = t.Encode("a b c d e f", std::nullopt, 5);
  EXPECT_THAT(e.ids, ElementsAre(2, 17, 18, 19, 3));
  e = t.Encode("a b c d e f", std::nullopt, 0);  // no truncation
  EXPECT_EQ(e.ids.size(), 8u);
}

TEST(WordPieceTokenizerTest, PairTruncationLongestFirst) {
  auto t = Small();
  // a: 8 tokens, b: 2 tokens, max 9 -> budget 6: only a is cut, to 4.
  Encoding e = t.Encode("a b c d e f g h", std::string_view("a b"), 9);
  EXPECT_THAT(e.ids, ElementsAre(2, 17, 18, 19, 20, 3, 17, 18, 3));
  EXPECT_THAT(e.type_ids, ElementsAre(0, 0, 0, 0, 0, 0, 1, 1, 1));
  // a: 2, b: 8, max 9 -> b cut to 4.
  e = t.Encode("a b", std::string_view("a b c d e f g h"), 9);
  EXPECT_THAT(e.ids, ElementsAre(2, 17, 18, 3, 17, 18, 19, 20, 3));
  // Both long, equal: budget 7 -> a 3, b 4 (HF gives the odd token to b).
  e = t.Encode("a b c d e f", std::string_view("e f g h a b"), 10);
  EXPECT_THAT(e.ids, ElementsAre(2, 17, 18, 19, 3, 29, 30, 31, 32, 3));
  // a longer than b, both over half: budget 7 -> a 4, b 3.
  e = t.Encode("a b c d e f g", std::string_view("e f g h a b"), 10);
  EXPECT_THAT(e.ids, ElementsAre(2, 17, 18, 19, 20, 3, 29, 30, 31, 3));
}

TEST(WordPieceTokenizerTest, EncodeBatchPads) {
  auto t = Small();
  auto batch = t.EncodeBatch({{"hello", std::nullopt}, {"a b", "c d"}}, 128);
  ASSERT_EQ(batch.size(), 2u);
  EXPECT_THAT(batch[0].ids, ElementsAre(2, 5, 3, 0, 0, 0, 0));
  EXPECT_THAT(batch[0].type_ids, ElementsAre(0, 0, 0, 0, 0, 0, 0));
  EXPECT_THAT(batch[0].attention_mask, ElementsAre(1, 1, 1, 0, 0, 0, 0));
  EXPECT_THAT(batch[1].ids, ElementsAre(2, 17, 18, 3, 19, 20, 3));
  EXPECT_THAT(batch[1].type_ids, ElementsAre(0, 0, 0, 0, 1, 1, 1));
  EXPECT_THAT(batch[1].attention_mask, ElementsAre(1, 1, 1, 1, 1, 1, 1));
}

TEST(WordPieceTokenizerTest, LoadsVocabTxtFromDirAndFile) {
  std::string dir = TempDir("vocab_txt");
  std::string content;
  for (const auto& s : SmallVocab()) content += s + "\n";
  WriteFile(dir + "/vocab.txt", content);
  auto t = WordPieceTokenizer::Create(dir);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->vocab_size(), SmallVocab().size());
  EXPECT_THAT(t->Encode("Hello", std::nullopt, 8).ids, ElementsAre(2, 5, 3));
  auto f = WordPieceTokenizer::Create(dir + "/vocab.txt");
  ASSERT_TRUE(f.ok()) << f.status();
  WriteFile(dir + "/tokenizer_config.json", R"({"do_lower_case": false})");
  auto cased = WordPieceTokenizer::Create(dir);
  ASSERT_TRUE(cased.ok()) << cased.status();
  EXPECT_THAT(cased->TokenizeToStrings("Hello"), ElementsAre("[UNK]"));
}

TEST(WordPieceTokenizerTest, LoadsTokenizerJson) {
  std::string dir = TempDir("tok_json");
  WriteFile(dir + "/tokenizer.json", R"({
    "added_tokens": [{"id": 0, "content": "[PAD]", "normalized": false},
                     {"id": 1, "content": "[UNK]", "normalized": false},
                     {"id": 2, "content": "[CLS]", "normalized": false},
                     {"id": 3, "content": "[SEP]", "normalized": false}],
    "normalizer": {"type": "BertNormalizer", "clean_text": true,
                   "handle_chinese_chars": true, "strip_accents": null,
                   "lowercase": false},
    "pre_tokenizer": {"type": "BertPreTokenizer"},
    "post_processor": {"type": "BertProcessing", "sep": ["[SEP]", 3],
                       "cls": ["[CLS]", 2]},
    "model": {"type": "WordPiece", "unk_token": "[UNK]",
              "continuing_subword_prefix": "##", "max_input_chars_per_word": 100,
              "vocab": {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3,
                        "Hello": 4, "Café": 5}}})");
  auto t = WordPieceTokenizer::Create(dir + "/tokenizer.json");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_FALSE(t->options().lowercase);
  EXPECT_FALSE(t->options().strip_accents);  // null -> follows lowercase
  EXPECT_THAT(t->Encode("Hello Café hello", std::nullopt, 0).ids, ElementsAre(2, 4, 5, 1, 3));
}

TEST(WordPieceTokenizerTest, BadInputsGiveClearStatus) {
  auto missing = WordPieceTokenizer::Create("/nonexistent/metatt/vocab.txt");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("/nonexistent/metatt/vocab.txt"));

  std::string dir = TempDir("bad");
  auto empty_dir = WordPieceTokenizer::Create(dir);
  EXPECT_EQ(empty_dir.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(empty_dir.status().message()),
              HasSubstr("no tokenizer.json or vocab.txt"));

  WriteFile(dir + "/empty.txt", "");
  auto empty = WordPieceTokenizer::Create(dir + "/empty.txt");
  EXPECT_EQ(empty.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(empty.status().message()), HasSubstr("empty"));

  WriteFile(dir + "/nounk.txt", "[CLS]\n[SEP]\nhello\n");
  auto nounk = WordPieceTokenizer::Create(dir + "/nounk.txt");
  EXPECT_EQ(nounk.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(nounk.status().message()), HasSubstr("[UNK]"));

  WriteFile(dir + "/broken.json", "{\"model\": ");
  auto broken = WordPieceTokenizer::Create(dir + "/broken.json");
  EXPECT_EQ(broken.status().code(), absl::StatusCode::kInvalidArgument);

  WriteFile(dir + "/bpe.json", R"({"model": {"type": "BPE", "vocab": {}}})");
  auto bpe = WordPieceTokenizer::Create(dir + "/bpe.json");
  EXPECT_EQ(bpe.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bpe.status().message()), HasSubstr("WordPiece"));
}

// Against the real model when present (ids checked with HF's fast tokenizer).
TEST(WordPieceTokenizerTest, RealModelMatchesHuggingFace) {
  auto resolved = ResolveModelDir("");
  if (!resolved.ok()) GTEST_SKIP() << resolved.status();
  const std::string dir = *resolved;
  auto t = WordPieceTokenizer::Create(dir);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->vocab_size(), 30522u);
  EXPECT_EQ(t->pad_id(), 0);
  EXPECT_EQ(t->unk_id(), 100);
  EXPECT_EQ(t->cls_id(), 101);
  EXPECT_EQ(t->sep_id(), 102);
  EXPECT_THAT(t->Encode("Hello, world! Héllo naïve café — “quoted” 你好 🤗 unaffable",
                        std::nullopt, 128)
                  .ids,
              ElementsAre(101, 7592, 1010, 2088, 999, 7592, 15743, 7668, 1517, 1523, 9339, 1524,
                          100, 100, 100, 14477, 20961, 3468, 102));
  EXPECT_THAT(t->Encode("x [SEP] y", std::nullopt, 128).ids,
              ElementsAre(101, 1060, 102, 1061, 102));
  Encoding e = t->Encode("The quick brown fox.", std::string_view("jumps over the lazy dog"), 8);
  EXPECT_THAT(e.ids, ElementsAre(101, 1996, 4248, 102, 14523, 2058, 1996, 102));
  EXPECT_THAT(e.type_ids, ElementsAre(0, 0, 0, 0, 1, 1, 1, 1));
}

}  // namespace
}  // namespace metatt
