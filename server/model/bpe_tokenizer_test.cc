// Unit tests of the byte-level BPE tokenizer on a tiny hand-made
// tokenizer.json (written here), and its refusals. Parity with Hugging Face
// on the real SmolLM2 tokenizer is tests/python/test_bpe_tokenizer_parity.py.
#include "server/model/bpe_tokenizer.h"

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace metatt {
namespace {

using json = nlohmann::json;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// Byte-level alphabet: 'Ġ' is the space byte, 'Ã' + '©' the UTF-8 bytes of 'é'.
json TinyTokenizer() {
  json vocab = {{"<s>", 0}, {"</s>", 1}, {"a", 2},  {"b", 3},   {"c", 4},    {"Ġ", 5},
                {"1", 6},   {"2", 7},    {"!", 8},  {"ab", 9},  {"abc", 10}, {"Ġa", 11},
                {"Ġab", 12}, {"12", 13}, {"Ã", 14}, {"©", 15},  {"Ã©", 16},  {"'", 17},
                {"s", 18},  {"'s", 19},  {"Ċ", 20}, {"ĊĊ", 21}, {"ĠĠ", 22}};
  json merges = json::array({json::array({"a", "b"}), json::array({"ab", "c"}),
                             json::array({"Ġ", "a"}), json::array({"Ġa", "b"}),
                             json::array({"1", "2"}), json::array({"Ã", "©"}),
                             json::array({"'", "s"}), json::array({"Ċ", "Ċ"}),
                             json::array({"Ġ", "Ġ"})});
  return {
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens",
       json::array({{{"id", 0}, {"content", "<s>"}, {"single_word", false}, {"lstrip", false},
                     {"rstrip", false}, {"normalized", false}, {"special", true}},
                    {{"id", 1}, {"content", "</s>"}, {"single_word", false}, {"lstrip", false},
                     {"rstrip", false}, {"normalized", false}, {"special", true}},
                    {{"id", 23}, {"content", "<x y>"}, {"single_word", false}, {"lstrip", false},
                     {"rstrip", false}, {"normalized", true}, {"special", false}}})},
      {"normalizer", nullptr},
      {"pre_tokenizer",
       {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true},
        {"use_regex", true}}},
      {"post_processor", nullptr},
      {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true},
                   {"use_regex", true}}},
      {"model",
       {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr},
        {"continuing_subword_prefix", ""}, {"end_of_word_suffix", ""}, {"fuse_unk", false},
        {"byte_fallback", false}, {"ignore_merges", false}, {"vocab", vocab},
        {"merges", merges}}}};
}

constexpr char kSystem[] = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

std::string SmolTemplate(const std::string& system) {
  return "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
         "{{ '<|im_start|>system\n" +
         system +
         "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
         "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
         "{{ '<|im_start|>assistant\n' }}{% endif %}";
}

BpeTokenizer Make(const json& j, const json& cfg = json()) {
  auto tok = BpeTokenizer::FromJson(j.dump(), cfg.is_null() ? std::string() : cfg.dump());
  EXPECT_TRUE(tok.ok()) << tok.status();
  return *std::move(tok);
}

TEST(BpeTokenizerTest, MergesByRankAndSplitsLikeGpt2) {
  BpeTokenizer tok = Make(TinyTokenizer());
  EXPECT_THAT(tok.Encode("abc"), ElementsAre(10));
  // " ab" is one word (' ?\p{L}+'), but a+b (rank 0) comes before Ġ+a (rank
  // 2), and there is no Ġ+ab merge; in " abc", ab+c (rank 1) follows.
  // (Checked against `tokenizers` 0.23.3 on the same file.)
  EXPECT_THAT(tok.EncodeToTokens("ab ab abc"), ElementsAre("ab", "Ġ", "ab", "Ġ", "abc"));
  // Contraction "'s" is its own word; digits merge within a number run.
  EXPECT_THAT(tok.EncodeToTokens("a's 12!"), ElementsAre("a", "'s", "Ġ", "12", "!"));
  // Whitespace runs: "\n\n" then " a" (the run backs off one before a letter).
  EXPECT_THAT(tok.EncodeToTokens("\n\n   a"), ElementsAre("ĊĊ", "ĠĠ", "Ġa"));
  EXPECT_THAT(tok.Encode("é"), ElementsAre(16));
  EXPECT_TRUE(tok.Encode("").empty());
}

TEST(BpeTokenizerTest, ARepeatedMergeTakesItsLastRank) {
  // [b c] before the second [a b]: "abc" -> a, bc (as `tokenizers` 0.23.3).
  json j = TinyTokenizer();
  j["model"]["vocab"]["bc"] = 24;
  j["model"]["merges"] = json::array(
      {json::array({"a", "b"}), json::array({"b", "c"}), json::array({"a", "b"})});
  EXPECT_THAT(Make(j).EncodeToTokens("abc"), ElementsAre("a", "bc"));
  j["model"]["merges"] = json::array({json::array({"a", "b"}), json::array({"b", "c"})});
  EXPECT_THAT(Make(j).EncodeToTokens("abc"), ElementsAre("ab", "c"));
}

TEST(BpeTokenizerTest, BytesMissingFromTheVocabAreDroppedWithoutUnk) {
  BpeTokenizer tok = Make(TinyTokenizer());
  // 'z' has no byte token and there is no unk token: it vanishes, and the
  // neighbours it separated merge.
  EXPECT_THAT(tok.EncodeToTokens("azb"), ElementsAre("ab"));
  json j = TinyTokenizer();
  j["model"]["unk_token"] = "!";
  j["model"]["fuse_unk"] = true;
  BpeTokenizer with_unk = Make(j);
  EXPECT_THAT(with_unk.EncodeToTokens("azzb"), ElementsAre("a", "!", "b"));
}

TEST(BpeTokenizerTest, InvalidUtf8BytesAreEncodedAsTheirOwnBytes) {
  BpeTokenizer tok = Make(TinyTokenizer());
  // A lone lead byte (0xC3 = 'Ã') is an "other" character, split from the
  // letter before it; it does not merge with a continuation byte that is
  // itself invalid there either.
  EXPECT_THAT(tok.EncodeToTokens("a\xC3"), ElementsAre("a", "Ã"));
  EXPECT_THAT(tok.EncodeToTokens("\xC3\xA9"), ElementsAre("Ã©"));  // valid 'é'
  EXPECT_THAT(tok.EncodeToTokens("\xC3" "a\xA9"), ElementsAre("Ã", "a", "©"));
  EXPECT_EQ(tok.Decode(tok.Encode("a\xC3")), "a\xEF\xBF\xBD");
}

TEST(BpeTokenizerTest, AddedTokensAreRecognisedInText) {
  BpeTokenizer tok = Make(TinyTokenizer());
  EXPECT_THAT(tok.Encode("ab<s>ab</s>"), ElementsAre(9, 0, 9, 1));
  EXPECT_THAT(tok.Encode("a<x y>b"), ElementsAre(2, 23, 3));
  EXPECT_THAT(tok.Encode("<s"), ElementsAre(18));  // not the token; '<' has no byte token
  EXPECT_TRUE(tok.IsSpecial(0));
  EXPECT_FALSE(tok.IsSpecial(23));
  EXPECT_EQ(tok.TokenToId("<x y>"), 23);
  EXPECT_EQ(tok.TokenToId("Ġab"), 12);
  EXPECT_EQ(tok.TokenToId("zz"), -1);
  EXPECT_EQ(tok.IdToToken(12), "Ġab");
  EXPECT_EQ(tok.IdToToken(999), std::nullopt);
  EXPECT_EQ(tok.vocab_size(), 24);
}

TEST(BpeTokenizerTest, DecodesBytesAndRepairsUtf8) {
  BpeTokenizer tok = Make(TinyTokenizer());
  EXPECT_EQ(tok.Decode({0, 9, 12, 16, 1}), "<s>ab abé</s>");
  EXPECT_EQ(tok.Decode({0, 9, 12, 16, 1}, /*skip_special_tokens=*/true), "ab abé");
  // An added token outside the byte alphabet (a plain space) keeps its UTF-8.
  EXPECT_EQ(tok.Decode({2, 23, 3}), "a<x y>b");
  // Half of 'é' alone is invalid UTF-8: one U+FFFD.
  EXPECT_EQ(tok.Decode({14}), "\xEF\xBF\xBD");
  EXPECT_EQ(tok.Decode({14, 2}), "\xEF\xBF\xBD" "a");
  EXPECT_EQ(tok.Decode({14, 15}), "é");
  EXPECT_EQ(tok.Decode({1000, -1, 2}), "a");  // unknown ids are skipped
  EXPECT_EQ(RepairUtf8("\xE2\x82" "a\xFF\xF0\x9F\x98\x80"), "\xEF\xBF\xBD" "a\xEF\xBF\xBD" "😀");
}

TEST(BpeTokenizerTest, DecodeStreamConcatenatesToDecode) {
  BpeTokenizer tok = Make(TinyTokenizer());
  const std::vector<int64_t> ids = {9, 14, 15, 12, 14, 2, 0, 14};
  BpeDecodeStream stream(&tok);
  std::vector<std::string> pieces;
  for (int64_t id : ids) pieces.push_back(stream.Step(id));
  pieces.push_back(stream.Finish());
  EXPECT_THAT(pieces, ElementsAre("ab", "", "é", " ab", "", "\xEF\xBF\xBD" "a", "<s>", "",
                                  "\xEF\xBF\xBD"));
  std::string joined;
  for (const auto& p : pieces) joined += p;
  EXPECT_EQ(joined, tok.Decode(ids));
}

TEST(BpeTokenizerTest, DigitsPreTokenizerIsolatesDigits) {
  json j = TinyTokenizer();
  j["pre_tokenizer"] = {{"type", "Sequence"},
                        {"pretokenizers",
                         json::array({{{"type", "Digits"}, {"individual_digits", true}},
                                      j["pre_tokenizer"]})}};
  BpeTokenizer tok = Make(j);
  EXPECT_THAT(tok.EncodeToTokens("a12 12"), ElementsAre("a", "1", "2", "Ġ", "1", "2"));
}

TEST(BpeTokenizerTest, TemplateProcessingAddsSpecialTokens) {
  json j = TinyTokenizer();
  j["post_processor"] = {
      {"type", "TemplateProcessing"},
      {"single", json::array({{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}},
                              {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}})},
      {"pair", json::array()},
      {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {0}}, {"tokens", {"<s>"}}}}}}};
  BpeTokenizer tok = Make(j);
  EXPECT_THAT(tok.Encode("ab"), ElementsAre(0, 9));
  EXPECT_THAT(tok.Encode("ab", /*add_special_tokens=*/false), ElementsAre(9));
}

json ChatTokenizer() {
  json j = TinyTokenizer();
  j["added_tokens"].push_back({{"id", 30}, {"content", "<|im_start|>"}, {"special", true},
                               {"normalized", false}});
  j["added_tokens"].push_back({{"id", 31}, {"content", "<|im_end|>"}, {"special", true},
                               {"normalized", false}});
  return j;
}

TEST(BpeTokenizerTest, ChatTemplateRendersChatMl) {
  json cfg = {{"bos_token", "<|im_start|>"},
              {"eos_token", {{"__type", "AddedToken"}, {"content", "<|im_end|>"}}},
              {"pad_token", "<|im_end|>"},
              {"unk_token", nullptr},
              {"chat_template", SmolTemplate(kSystem)}};
  BpeTokenizer tok = Make(ChatTokenizer(), cfg);
  EXPECT_EQ(tok.bos_id(), 30);
  EXPECT_EQ(tok.eos_id(), 31);
  EXPECT_EQ(tok.pad_id(), 31);
  EXPECT_EQ(tok.unk_id(), -1);
  ASSERT_TRUE(tok.chat_template_status().ok()) << tok.chat_template_status();
  EXPECT_EQ(tok.default_system_prompt(), kSystem);
  std::vector<ChatMessage> user = {{"user", "ab"}, {"assistant", "abc"}};
  EXPECT_EQ(*tok.ApplyChatTemplate(user, /*add_generation_prompt=*/false),
            std::string("<|im_start|>system\n") + kSystem +
                "<|im_end|>\n<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\nabc"
                "<|im_end|>\n");
  std::vector<ChatMessage> sys = {{"system", "a"}, {"user", "b"}};
  EXPECT_EQ(*tok.ApplyChatTemplate(sys, /*add_generation_prompt=*/true),
            "<|im_start|>system\na<|im_end|>\n<|im_start|>user\nb<|im_end|>\n"
            "<|im_start|>assistant\n");
  EXPECT_EQ(tok.ApplyChatTemplate({}, true).status().code(), absl::StatusCode::kInvalidArgument);
  auto ids = tok.EncodeChat(sys, false);
  ASSERT_TRUE(ids.ok());
  // "system" keeps only its two 's' (the other letters have no byte token).
  EXPECT_THAT(*ids, ElementsAre(30, 18, 18, 20, 2, 31, 20, 30, 18, 20, 3, 31, 20));
}

TEST(BpeTokenizerTest, ChatTemplateFromJinjaFileWinsAndOthersAreRefused) {
  // A trailing newline (dropped by Jinja) and another system prompt are fine.
  auto tok = BpeTokenizer::FromJson(ChatTokenizer().dump(),
                                    json{{"chat_template", "{{ messages }}"}}.dump(),
                                    SmolTemplate("Be brief.") + "\n");
  ASSERT_TRUE(tok.ok());
  ASSERT_TRUE(tok->chat_template_status().ok());
  EXPECT_EQ(tok->default_system_prompt(), "Be brief.");

  auto other = BpeTokenizer::FromJson(ChatTokenizer().dump(),
                                      json{{"chat_template", "{{ messages }}"}}.dump());
  ASSERT_TRUE(other.ok());  // plain tokenisation still works
  auto r = other->ApplyChatTemplate({{"user", "a"}}, true);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("chat_template"));
  // A changed template (extra whitespace) is not the one implemented.
  auto changed = BpeTokenizer::FromJson(ChatTokenizer().dump(), "",
                                        SmolTemplate(kSystem) + " ");
  ASSERT_TRUE(changed.ok());
  EXPECT_FALSE(changed->chat_template_status().ok());
  auto none = Make(ChatTokenizer());
  EXPECT_FALSE(none.EncodeChat({{"user", "a"}}, true).ok());
}

void ExpectRefused(const json& j, const std::string& field) {
  auto tok = BpeTokenizer::FromJson(j.dump());
  ASSERT_FALSE(tok.ok()) << "accepted, expected a refusal naming " << field;
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(tok.status().message()), HasSubstr(field));
}

TEST(BpeTokenizerTest, RefusesWhatItDoesNotImplementNamingTheField) {
  // Each case sets one JSON pointer of the tiny tokenizer ("-": appended).
  struct Refusal {
    const char* pointer;
    json value;
    const char* field;  // what the refusal must name
  };
  const std::vector<Refusal> refusals = {
      {"/normalizer", {{"type", "NFC"}}, "normalizer"},
      {"/pre_tokenizer", {{"type", "Metaspace"}}, "pre_tokenizer.type"},
      {"/pre_tokenizer",
       {{"type", "Sequence"}, {"pretokenizers", json::array({{{"type", "Split"}}})}},
       "pre_tokenizer.pretokenizers[0].type"},
      {"/model/type", "WordPiece", "model.type"},
      {"/model/byte_fallback", true, "model.byte_fallback"},
      {"/model/dropout", 0.1, "model.dropout"},
      {"/model/merges/-", json::array({"c", "zz"}), "model.merges[9]"},
      {"/model/merges/-", 42, "model.merges[9]"},
      {"/model/vocab/x", "seven", "model.vocab"},
      {"/model/unk_token", "<unk>", "model.unk_token"},
      {"/added_tokens/1/lstrip", true, "added_tokens[1].lstrip"},
      {"/decoder", {{"type", "Metaspace"}}, "decoder.type"},
      {"/post_processor", {{"type", "RobertaProcessing"}}, "post_processor.type"},
  };
  for (const Refusal& r : refusals) {
    SCOPED_TRACE(r.pointer);
    json j = TinyTokenizer();
    j[json::json_pointer(r.pointer)] = r.value;
    ExpectRefused(j, r.field);
  }
  json j = TinyTokenizer();
  j.erase("model");
  ExpectRefused(j, "model");

  auto bad = BpeTokenizer::FromJson("{\"model\": ");
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("not valid JSON"));
  auto bad_cfg = BpeTokenizer::FromJson(TinyTokenizer().dump(), "[1]");
  ASSERT_FALSE(bad_cfg.ok());
  EXPECT_THAT(std::string(bad_cfg.status().message()), HasSubstr("tokenizer_config.json"));
  auto bad_bos = BpeTokenizer::FromJson(TinyTokenizer().dump(), json{{"bos_token", "<q>"}}.dump());
  ASSERT_FALSE(bad_bos.ok());
  EXPECT_THAT(std::string(bad_bos.status().message()), HasSubstr("bos_token"));
}

TEST(BpeTokenizerTest, LoadsFromADirectoryAndNamesMissingFiles) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::path(testing::TempDir()) / "bpe_tokenizer_test_dir";
  fs::remove_all(dir);
  auto missing = BpeTokenizer::Create(dir.string());
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("tokenizer.json"));

  fs::create_directories(dir);
  std::ofstream(dir / "tokenizer.json") << ChatTokenizer().dump();
  std::ofstream(dir / "tokenizer_config.json")
      << json{{"eos_token", "<|im_end|>"}, {"chat_template", SmolTemplate(kSystem)}}.dump();
  auto tok = BpeTokenizer::Create(dir.string());
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ(tok->eos_id(), 31);
  EXPECT_TRUE(tok->chat_template_status().ok());
  auto by_file = BpeTokenizer::Create((dir / "tokenizer.json").string());
  ASSERT_TRUE(by_file.ok()) << by_file.status();
  EXPECT_EQ(by_file->eos_id(), 31);

  std::ofstream(dir / "tokenizer.json") << "{\"normalizer\": {\"type\": \"NFKC\"}}";
  auto refused = BpeTokenizer::Create(dir.string());
  ASSERT_FALSE(refused.ok());
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("normalizer"));
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr(dir.string()));
  fs::remove_all(dir);
}

}  // namespace
}  // namespace metatt
