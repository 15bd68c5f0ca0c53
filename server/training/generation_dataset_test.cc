#include "server/training/generation_dataset.h"

#include <gtest/gtest.h>

#include "server/training/eval_scores.h"

namespace metatt {
namespace {

GenerationSpec Spec(GenerationFormat f = GenerationFormat::kAuto) {
  GenerationSpec s;
  s.format = f;
  s.origin = "train.jsonl";
  return s;
}

void ExpectRefused(const std::string& text, int line, const std::string& what,
                   GenerationFormat f = GenerationFormat::kAuto) {
  std::vector<BadLine> bad;
  auto ds = ParseGenerationDataset(text, Spec(f), &bad);
  ASSERT_FALSE(ds.ok()) << text;
  EXPECT_EQ(ds.status().code(), absl::StatusCode::kInvalidArgument);
  const std::string needle = "line " + std::to_string(line) + ": ";
  EXPECT_NE(ds.status().message().find(needle), std::string::npos) << ds.status();
  EXPECT_NE(ds.status().message().find(what), std::string::npos) << ds.status();
  EXPECT_NE(ds.status().message().find("train.jsonl"), std::string::npos) << ds.status();
}

TEST(GenerationDataset, ReadsPromptCompletionJsonl) {
  auto ds = ParseGenerationDataset(
      "{\"prompt\": \"2+2?\", \"completion\": \"4\"}\n\n{\"prompt\": \"Capital of France?\", "
      "\"completion\": \"Paris\", \"answer\": \"paris\"}\n",
      Spec());
  ASSERT_TRUE(ds.ok()) << ds.status();
  ASSERT_EQ(ds->size(), 2u);
  ASSERT_EQ(ds->examples[0].prompt.size(), 1u);
  EXPECT_EQ(ds->examples[0].prompt[0].role, "user");
  EXPECT_EQ(ds->examples[0].prompt[0].content, "2+2?");
  EXPECT_EQ(ds->examples[0].completion, "4");
  EXPECT_EQ(ds->examples[1].line, 3);
  EXPECT_EQ(ds->examples[1].answer, "paris");
  EXPECT_FALSE(ds->all_answered());
}

TEST(GenerationDataset, ReadsInstructionJsonArrayWithLines) {
  const std::string text =
      "[\n"
      "  {\"instruction\": \"Pick one.\\n\\nAnswer1: a Answer2: b\", \"input\": \"\",\n"
      "   \"output\": \"the correct answer is answer2\", \"answer\": \"answer2\"},\n"
      "  {\"instruction\": \"Is it [true]?\", \"input\": \"ctx, with {braces}\", "
      "\"output\": \"the correct answer is true\", \"answer\": \"true\"}\n"
      "]\n";
  auto ds = ParseGenerationDataset(text, Spec(GenerationFormat::kInstruction));
  ASSERT_TRUE(ds.ok()) << ds.status();
  ASSERT_EQ(ds->size(), 2u);
  EXPECT_EQ(ds->examples[0].line, 2);
  EXPECT_EQ(ds->examples[1].line, 4);
  EXPECT_EQ(ds->examples[0].prompt[0].content, "Pick one.\n\nAnswer1: a Answer2: b");
  EXPECT_EQ(ds->examples[1].prompt[0].content, "Is it [true]?\n\nctx, with {braces}");
  EXPECT_EQ(ds->examples[0].completion, "the correct answer is answer2");
  EXPECT_TRUE(ds->all_answered());
}

TEST(GenerationDataset, ReadsChatMessages) {
  auto ds = ParseGenerationDataset(
      R"({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Name?"}, {"role": "assistant", "content": "Bot"}]})",
      Spec());
  ASSERT_TRUE(ds.ok()) << ds.status();
  ASSERT_EQ(ds->examples[0].prompt.size(), 4u);
  EXPECT_EQ(ds->examples[0].prompt[2].role, "assistant");
  EXPECT_EQ(ds->examples[0].completion, "Bot");
}

TEST(GenerationDataset, BadRecordsNameLineAndField) {
  ExpectRefused("{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"a\"}\n", 2,
                "missing field 'completion'");
  ExpectRefused("{\"prompt\": \"a\", \"completion\": 3}\n", 1,
                "field 'completion': must be a string, not a number");
  ExpectRefused("{\"prompt\": \"  \", \"completion\": \"x\"}\n", 1, "field 'prompt': empty");
  ExpectRefused("{\"prompt\": \"a\", \"completion\": \"b\"}\nnot json\n", 2, "not valid JSON");
  ExpectRefused("{\"text\": \"a\"}\n", 1, "no known fields");
  ExpectRefused("{\"prompt\": \"a\", \"completion\": \"b\", \"answer\": [1]}\n", 1,
                "field 'answer': must be a string or a boolean");
  ExpectRefused(R"({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]})",
                1, "field 'messages[1].role': 'bot' is not one of");
  ExpectRefused(R"({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})",
                1, "the last message must be the assistant's");
  ExpectRefused(R"({"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]})", 1,
                "field 'messages[1]': missing field 'content'");
  ExpectRefused(R"({"messages": [{"role": "user", "content": "a"}]})", 1,
                "needs at least 2 messages");
  ExpectRefused("[\n{\"instruction\": \"a\", \"output\": \"b\"},\n{\"instruction\": \"a\"}\n]", 3,
                "missing field 'output'", GenerationFormat::kInstruction);
  ExpectRefused("[\n{\"instruction\": \"a\", \"output\": \"b\"}\n", 2, "not closed");
  ExpectRefused("{\"instruction\": \"a\", \"output\": \"b\"}\n", 1, "missing field 'messages'",
                GenerationFormat::kChat);
}

TEST(GenerationDataset, ReportsEveryBadRecord) {
  std::vector<BadLine> bad;
  auto ds = ParseGenerationDataset("{\"prompt\": \"a\"}\n{\"prompt\": \"a\", \"completion\": \"b\"}\n"
                                   "{\"completion\": \"b\"}\n",
                                   Spec(), &bad);
  ASSERT_FALSE(ds.ok());
  ASSERT_EQ(bad.size(), 2u);
  EXPECT_EQ(bad[0].line, 1);
  EXPECT_EQ(bad[1].line, 3);
  EXPECT_NE(ds.status().message().find("2 bad records"), std::string::npos);
}

TEST(GenerationDataset, EmptyFileIsRefused) {
  EXPECT_FALSE(ParseGenerationDataset("  \n", Spec()).ok());
  EXPECT_FALSE(ParseGenerationDataset("[]", Spec()).ok());
}

TEST(GenerationDataset, FormatsAndTaskNames) {
  EXPECT_EQ(*ParseGenerationFormat("chat"), GenerationFormat::kChat);
  EXPECT_EQ(*ParseGenerationFormat(""), GenerationFormat::kAuto);
  EXPECT_FALSE(ParseGenerationFormat("tsv").ok());
  EXPECT_EQ(*CanonicalCommonsenseName("arc_easy"), "ARC-Easy");
  EXPECT_EQ(*CanonicalCommonsenseName("BOOLQ"), "BoolQ");
  EXPECT_EQ(*CanonicalCommonsenseName("obqa"), "OpenBookQA");
  EXPECT_FALSE(CanonicalCommonsenseName("piqa").ok());
}

TEST(AnswerExtraction, FirstAnswerOfTheGoldKind) {
  EXPECT_EQ(ExtractAnswer("the correct answer is answer3", "answer3"), "answer3");
  EXPECT_EQ(ExtractAnswer("Answer2, not answer1", "answer1"), "answer2");
  EXPECT_EQ(ExtractAnswer("the correct answer is false", "true"), "false");
  EXPECT_EQ(ExtractAnswer("no idea", "answer1"), "");
  EXPECT_EQ(ExtractAnswer(" Paris, France", "paris"), "paris");
  EXPECT_DOUBLE_EQ(AnswerAccuracy({"answer1", "answer2 answer1", "true"},
                                  {"answer1", "answer1", "false"}),
                   1.0 / 3.0);
  EXPECT_DOUBLE_EQ(ExactMatch({" 4 ", "5"}, {"4", "4"}), 0.5);
}

}  // namespace
}  // namespace metatt
