#include "adapters/metatt_config.h"

#include <gtest/gtest.h>

#include "adapters/tensor_train.h"

namespace metatt {
namespace {

MetaTTConfig Base() {
  MetaTTConfig c;
  c.d_in = c.d_out = 16;
  c.num_layers = 4;
  c.num_heads = 4;
  return c;
}

TEST(MetaTTConfigTest, DefaultsValidateAndDocumentScale) {
  MetaTTConfig c = Base();
  EXPECT_TRUE(c.Validate().ok());
  EXPECT_EQ(c.BondRanks(), (std::vector<int64_t>{8, 8, 8}));
  EXPECT_DOUBLE_EQ(c.Scale(), 1.0);  // default alpha = r1
  c.alpha = 16;
  EXPECT_DOUBLE_EQ(c.Scale(), 2.0);
  EXPECT_EQ(c.AdaptedLayers().size(), 4u);
}

TEST(MetaTTConfigTest, ValidateNamesTheBadField) {
  auto expect_bad = [](MetaTTConfig c, const std::string& field) {
    absl::Status s = c.Validate();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << field;
    EXPECT_NE(std::string(s.message()).find("'" + field + "'"), std::string::npos) << s;
  };
  MetaTTConfig c = Base();
  c.ranks = {4, 4};
  expect_bad(c, "ranks");
  c = Base();
  c.ranks = {0};
  expect_bad(c, "ranks");
  c = Base();
  c.projections = {Projection::kQuery, Projection::kQuery};
  expect_bad(c, "projections");
  c = Base();
  c.projections = {Projection::kFfnUp};
  expect_bad(c, "d_ffn");  // FFN needs the intermediate size
  c.d_ffn = 64;
  EXPECT_TRUE(c.Validate().ok());
  c.form = TTForm::k5D;
  expect_bad(c, "projections");  // 5d has no FFN boundary blocks
  c = Base();
  c.layers = {0, 7};
  expect_bad(c, "layers");
  c = Base();
  c.num_tasks = 3;
  expect_bad(c, "num_tasks");
  c = Base();
  c.form = TTForm::k5D;
  c.num_heads = 5;
  expect_bad(c, "num_heads");
  c = Base();
  c.alpha = -1;
  expect_bad(c, "alpha");
  c = Base();
  c.init = "ze-bogus";
  expect_bad(c, "init");
  c = Base();
  c.init = "ze-id-id-id-id-id";
  expect_bad(c, "init");
  c = Base();
  c.d_in = 0;
  expect_bad(c, "d_in");
  // Bounds (fuzz regressions: a crafted family.json must not allocate 12 GB
  // or overflow the parameter count).
  c = Base();
  c.num_layers = 3000000000LL;
  expect_bad(c, "num_layers");
  c = Base();
  c.d_in = int64_t{1} << 40;
  expect_bad(c, "d_in");
  c = Base();
  c.ranks = {int64_t{1} << 31};
  expect_bad(c, "ranks");
}

TEST(MetaTTConfigTest, InitSpecParsing) {
  auto i = ParseInitSpec("ze-id-id-id", 5);
  ASSERT_TRUE(i.ok());
  ASSERT_EQ(i->size(), 5u);
  EXPECT_EQ((*i)[0].kind, CoreInit::Kind::kZeros);
  EXPECT_EQ((*i)[4].kind, CoreInit::Kind::kIdentity);
  auto n = ParseInitSpec("normal(0.2)", 4);
  ASSERT_TRUE(n.ok());
  for (const auto& c : *n) {
    EXPECT_EQ(c.kind, CoreInit::Kind::kNormal);
    EXPECT_DOUBLE_EQ(c.std, 0.2);
  }
  auto no = ParseInitSpec("no", 4);
  ASSERT_TRUE(no.ok());
  EXPECT_DOUBLE_EQ((*no)[3].std, 0.2);
  EXPECT_FALSE(ParseInitSpec("normal(x)", 4).ok());
  EXPECT_FALSE(ParseInitSpec("", 4).ok());
}

TEST(MetaTTConfigTest, JsonRoundTrip) {
  MetaTTConfig c = Base();
  c.form = TTForm::k4Plus1D;
  c.ranks = {3, 4, 5, 6};
  c.projections = {Projection::kKey, Projection::kAttnOutput};
  c.layers = {3, 1};
  c.alpha = 2.5;
  c.init = "no";
  c.num_tasks = 7;
  c.d_ffn = 40;
  auto back = MetaTTConfig::FromJson(c.ToJson());
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->ToJson(), c.ToJson());
  EXPECT_EQ(back->layers, c.layers);
  EXPECT_EQ(back->alpha, c.alpha);

  auto shorthand =
      MetaTTConfig::FromJsonString(R"({"form":"5d","rank":4,"d_in":8,"d_out":8,"num_layers":2,
                                       "num_heads":2,"projections":["query","value"]})");
  ASSERT_TRUE(shorthand.ok()) << shorthand.status();
  EXPECT_EQ(shorthand->BondRanks(), (std::vector<int64_t>{4, 4, 4, 4}));
  EXPECT_FALSE(shorthand->alpha.has_value());
  auto bad = MetaTTConfig::FromJsonString(R"({"form":"7d","d_in":8,"d_out":8,"num_layers":2})");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(bad.status().message()).find("form"), std::string::npos);
  EXPECT_FALSE(MetaTTConfig::FromJsonString("{not json").ok());
}

TEST(MetaTTConfigTest, ParameterCountFormulas) {
  // METATT.md worked example and the equal-rank formulas.
  const int64_t D = 768, L = 12, M = 2, r = 8, H = 12, T = 10;
  TTShape s{TTForm::k4D, D, D, L, M, H, 1, {r}};
  EXPECT_EQ(MetaTTParameterCount(s), D * r + L * r * r + M * r * r + r * D);
  EXPECT_EQ(MetaTTParameterCount(s), 13184);
  EXPECT_EQ(LoraParameterCount(L, M, D, D, r), 294912);
  s.form = TTForm::k5D;
  EXPECT_EQ(MetaTTParameterCount(s), D * r + (L + M + H) * r * r + r * D / H);
  s.form = TTForm::k4Plus1D;
  s.num_tasks = T;
  EXPECT_EQ(MetaTTParameterCount(s), 13184 + T * r * r);
  s.ranks = {2, 3, 4, 5};
  EXPECT_EQ(MetaTTParameterCount(s), D * 2 + L * 2 * 3 + M * 3 * 4 + T * 4 * 5 + 5 * D);
}

TEST(MetaTTConfigTest, FormNamesAndAliases) {
  for (TTForm f : {TTForm::k4D, TTForm::k5D, TTForm::k4Plus1D}) {
    auto back = ParseTTForm(TTFormName(f));
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(*back, f);
  }
  EXPECT_STREQ(TTFormName(TTForm::k4Plus1D), "4+1d");
  for (const char* alias : {"4+1D", "(4+1)d", "4PLUS1D"}) {
    auto f = ParseTTForm(alias);
    ASSERT_TRUE(f.ok()) << alias;
    EXPECT_EQ(*f, TTForm::k4Plus1D);
  }
  EXPECT_EQ(ParseTTForm("3d").status().message(),
            "metatt config: field 'form' '3d' is not one of 4d, 5d, 4+1d");
}

}  // namespace
}  // namespace metatt
