#include "server/training/dataset.h"

#include <cstdlib>
#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "server/model/model_dir.h"

namespace metatt {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// A parse that must fail: its bad lines, and their line numbers.
std::vector<BadLine> BadLinesOf(const std::string& text, const DatasetSpec& spec) {
  std::vector<BadLine> bad;
  EXPECT_FALSE(ParseDataset(text, spec, &bad).ok()) << text;
  return bad;
}
std::vector<int> Lines(const std::vector<BadLine>& bad) {
  std::vector<int> lines;
  for (const BadLine& b : bad) lines.push_back(b.line);
  return lines;
}

DatasetSpec TsvSpec() {
  DatasetSpec s;
  s.format = DataFormat::kTsv;
  s.has_header = true;
  s.text = ColumnRef::Name("sentence");
  s.label = ColumnRef::Name("label");
  s.quoting = false;
  return s;
}

TEST(DatasetTest, ParsesTsvWithBomAndHeader) {
  auto ds = ParseDataset("\xEF\xBB\xBFsentence\tlabel\nhello world\t1\nbad movie\t0\n", TsvSpec());
  ASSERT_TRUE(ds.ok()) << ds.status();
  ASSERT_EQ(ds->size(), 2u);
  EXPECT_EQ(ds->examples[0].text, "hello world");
  EXPECT_EQ(ds->examples[0].label_id, 1);
  EXPECT_EQ(ds->examples[0].line, 2);
  EXPECT_EQ(ds->examples[1].label_id, 0);
  EXPECT_EQ(ds->label_vocab, (std::vector<std::string>{"0", "1"}));
}

TEST(DatasetTest, EveryBadLineReportedWithNumberAndFileRefused) {
  const std::string tsv =
      "sentence\tlabel\n"
      "fine\t1\n"           // line 2 ok
      "no label here\n"     // line 3: missing column
      "\t0\n"               // line 4: empty text
      "ok again\t\n"        // line 5: empty label
      "good\t0\n";          // line 6 ok
  std::vector<BadLine> bad;
  auto ds = ParseDataset(tsv, TsvSpec(), &bad);
  ASSERT_FALSE(ds.ok());
  EXPECT_EQ(ds.status().code(), absl::StatusCode::kInvalidArgument);
  ASSERT_EQ(bad.size(), 3u);
  EXPECT_EQ(bad[0].line, 3);
  EXPECT_THAT(bad[0].reason, HasSubstr("missing column"));
  EXPECT_EQ(bad[1].line, 4);
  EXPECT_THAT(bad[1].reason, HasSubstr("empty text"));
  EXPECT_EQ(bad[2].line, 5);
  EXPECT_THAT(bad[2].reason, HasSubstr("empty label"));
  EXPECT_THAT(std::string(ds.status().message()), HasSubstr("3 bad lines"));
  EXPECT_THAT(std::string(ds.status().message()), HasSubstr("line 3:"));
  EXPECT_THAT(std::string(ds.status().message()), HasSubstr("line 5:"));
}

TEST(DatasetTest, ManyBadLinesListsFirstTwentyAndCount) {
  std::string tsv = "sentence\tlabel\n";
  for (int i = 0; i < 30; ++i) tsv += "no tab\n";
  std::vector<BadLine> bad;
  auto ds = ParseDataset(tsv, TsvSpec(), &bad);
  ASSERT_FALSE(ds.ok());
  EXPECT_EQ(bad.size(), 30u);
  EXPECT_EQ(bad.back().line, 31);
  const std::string msg(ds.status().message());
  EXPECT_THAT(msg, HasSubstr("30 bad lines"));
  EXPECT_THAT(msg, HasSubstr("line 21:"));
  EXPECT_THAT(msg, ::testing::Not(HasSubstr("line 22:")));
  EXPECT_THAT(msg, HasSubstr("and 10 more"));
}

TEST(DatasetTest, RegressionLabelsMustBeFiniteNumbers) {
  DatasetSpec s = TsvSpec();
  s.label_kind = LabelKind::kRegression;
  const std::vector<BadLine> bad = BadLinesOf("sentence\tlabel\na\t1.5\nb\tfoo\nc\tnan\nd\t4\n", s);
  ASSERT_THAT(Lines(bad), ElementsAre(3, 4));
  EXPECT_THAT(bad[0].reason, HasSubstr("bad label 'foo'"));
  auto good = ParseDataset("sentence\tlabel\na\t1.5\nd\t4\n", s);
  ASSERT_TRUE(good.ok()) << good.status();
  EXPECT_FLOAT_EQ(good->examples[0].label_value, 1.5f);
  EXPECT_EQ(good->num_labels(), 1);
  // Regression for the fuzzer's finding: finite as double, inf as float.
  const std::vector<BadLine> big = BadLinesOf("sentence\tlabel\na\t1e39\nb\t-1e300\nc\t3e38\n", s);
  ASSERT_THAT(Lines(big), ElementsAre(2, 3));
}

TEST(DatasetTest, StringLabelsSortedAndFixedVocabEnforced) {
  DatasetSpec s = TsvSpec();
  auto ds = ParseDataset("sentence\tlabel\na\tpos\nb\tneg\nc\tneutral\n", s);
  ASSERT_TRUE(ds.ok()) << ds.status();
  EXPECT_EQ(ds->label_vocab, (std::vector<std::string>{"neg", "neutral", "pos"}));
  EXPECT_EQ(ds->examples[0].label_id, 2);
  s.label_vocab = ds->label_vocab;
  const std::vector<BadLine> bad = BadLinesOf("sentence\tlabel\nx\tpos\ny\tother\n", s);
  ASSERT_THAT(Lines(bad), ElementsAre(3));
  EXPECT_THAT(bad[0].reason, HasSubstr("'other'"));
}

TEST(DatasetTest, IntegerLabelsKeptAsIs) {
  auto ds = ParseDataset("sentence\tlabel\na\t2\nb\t0\n", TsvSpec());
  ASSERT_TRUE(ds.ok()) << ds.status();
  EXPECT_EQ(ds->num_labels(), 3);
  EXPECT_EQ(ds->examples[0].label_id, 2);
}

TEST(DatasetTest, CsvQuotingSpansLinesAndLineNumbersFollow) {
  DatasetSpec s;
  s.format = DataFormat::kCsv;
  s.has_header = true;
  s.text = ColumnRef::Name("text");
  s.text_pair = ColumnRef::Name("pair");
  s.label = ColumnRef::Name("y");
  s.quoting = true;
  const std::string csv =
      "text,pair,y\r\n"
      "\"a, with comma\",\"two\nlines\",1\r\n"  // lines 2-3
      "\"say \"\"hi\"\"\",b,0\n"                 // line 4
      "only,two\n"                               // line 5: missing y
      "\"unterminated,x,1\n";                    // line 6
  const std::vector<BadLine> bad = BadLinesOf(csv, s);
  ASSERT_THAT(Lines(bad), ElementsAre(5, 6));
  EXPECT_THAT(bad[1].reason, HasSubstr("unterminated"));
  auto ok = ParseDataset(csv.substr(0, csv.find("only,two")), s);
  ASSERT_TRUE(ok.ok()) << ok.status();
  ASSERT_EQ(ok->size(), 2u);
  EXPECT_EQ(ok->examples[0].text, "a, with comma");
  EXPECT_EQ(*ok->examples[0].text_pair, "two\nlines");
  EXPECT_EQ(ok->examples[1].text, "say \"hi\"");
  EXPECT_EQ(ok->examples[1].line, 4);
}

TEST(DatasetTest, Jsonl) {
  DatasetSpec s;
  s.format = DataFormat::kJsonl;
  s.text = ColumnRef::Name("text");
  s.label = ColumnRef::Name("label");
  const std::vector<BadLine> bad = BadLinesOf(
      "{\"text\": \"good\", \"label\": 1}\n\n{\"text\": \"x\"}\nnot "
      "json\n{\"text\":\"\",\"label\":0}\n",
      s);
  ASSERT_THAT(Lines(bad), ElementsAre(3, 4, 5));
  EXPECT_THAT(bad[0].reason, HasSubstr("missing key 'label'"));
  auto ok = ParseDataset("{\"text\": \"good\", \"label\": 1}\n{\"text\": \"bad\", \"label\": 0}", s);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->size(), 2u);
}

TEST(DatasetTest, NamedColumnWithoutHeaderIsRefused) {
  DatasetSpec s = TsvSpec();
  s.has_header = false;
  auto ds = ParseDataset("a\t1\n", s);
  ASSERT_FALSE(ds.ok());
  EXPECT_THAT(std::string(ds.status().message()), HasSubstr("no header"));
  s = TsvSpec();
  s.label = ColumnRef::Name("nope");
  ds = ParseDataset("sentence\tlabel\na\t1\n", s);
  ASSERT_FALSE(ds.ok());
  EXPECT_THAT(std::string(ds.status().message()), HasSubstr("line 1"));
}

TEST(DatasetTest, EmptyFileRefused) {
  EXPECT_FALSE(ParseDataset("sentence\tlabel\n", TsvSpec()).ok());
  EXPECT_FALSE(ParseDataset("", TsvSpec()).ok());
}

std::string GlueDir() {
  auto shared = ResolveSharedDir();
  if (!shared.ok()) {
    ADD_FAILURE() << shared.status();
    return "";
  }
  return absl::StrCat(*shared, "/data/glue/");
}

struct GlueCase {
  const char* task;
  const char* split;
  size_t rows;
};

TEST(DatasetTest, GlueFilesParseAsTheyAre) {
  const GlueCase cases[] = {{"MRPC", "train", 3668}, {"MRPC", "dev", 408},
                            {"CoLA", "train", 8551}, {"CoLA", "dev", 1043},
                            {"SST-2", "dev", 872},   {"STS-B", "train", 5749},
                            {"STS-B", "dev", 1500},  {"RTE", "train", 2490},
                            {"RTE", "dev", 277}};
  for (const GlueCase& c : cases) {
    auto spec = GluePreset(c.task);
    ASSERT_TRUE(spec.ok());
    auto ds = ReadDataset(absl::StrCat(GlueDir(), c.task, "/", c.split, ".tsv"), *spec);
    ASSERT_TRUE(ds.ok()) << c.task << " " << c.split << ": " << ds.status();
    EXPECT_EQ(ds->size(), c.rows) << c.task << " " << c.split;
  }
  auto mrpc = ReadDataset(GlueDir() + "MRPC/dev.tsv", *GluePreset("mrpc"));
  ASSERT_TRUE(mrpc.ok());
  int64_t pos = 0;
  for (const auto& e : mrpc->examples) pos += e.label_id;
  EXPECT_EQ(pos, 279);
  EXPECT_TRUE(mrpc->examples[0].text_pair.has_value());
  auto cola = ReadDataset(GlueDir() + "CoLA/dev.tsv", *GluePreset("CoLA"));
  ASSERT_TRUE(cola.ok());
  pos = 0;
  for (const auto& e : cola->examples) pos += e.label_id;
  EXPECT_EQ(pos, 721);
  EXPECT_EQ(cola->examples[0].line, 1);
  auto stsb = ReadDataset(GlueDir() + "STS-B/dev.tsv", *GluePreset("STS-B"));
  ASSERT_TRUE(stsb.ok());
  for (const auto& e : stsb->examples) {
    EXPECT_GE(e.label_value, 0.f);
    EXPECT_LE(e.label_value, 5.f);
  }
  EXPECT_EQ(*GluePrimaryMetric("cola"), "mcc");
  EXPECT_FALSE(GluePreset("QQP").ok());
}

}  // namespace
}  // namespace metatt
