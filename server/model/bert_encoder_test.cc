#include "server/model/bert_encoder.h"

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "server/model/test_util.h"

namespace metatt {
namespace {

std::map<std::string, torch::Tensor> RandomWeights(const BertConfig& c) {
  torch::manual_seed(0);
  return RandomBertWeights(c, {/*embedding_std=*/1.0, /*weight_std=*/0.1, /*bias_std=*/0.1});
}

TEST(BertConfig, ParsesAndNamesBadFields) {
  auto ok = BertConfig::FromJson(R"({"model_type":"bert","vocab_size":10,"hidden_size":8,
      "num_hidden_layers":1,"num_attention_heads":2,"intermediate_size":16,"hidden_act":"gelu_new"})",
                                 "c.json");
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->hidden_act, Activation::kGeluTanh);
  auto bad = BertConfig::FromJson(R"({"vocab_size":10,"hidden_size":8,"num_hidden_layers":1,
      "num_attention_heads":3,"intermediate_size":16})", "c.json");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("num_attention_heads"), std::string::npos);
  auto missing = BertConfig::FromJson(R"({"vocab_size":10})", "c.json");
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("hidden_size"), std::string::npos);
  auto act = BertConfig::FromJson(R"({"vocab_size":10,"hidden_size":8,"num_hidden_layers":1,
      "num_attention_heads":2,"intermediate_size":16,"hidden_act":"swish"})", "c.json");
  ASSERT_FALSE(act.ok());
  EXPECT_NE(act.status().message().find("hidden_act"), std::string::npos);
}

TEST(BertEncoder, WrongShapeAndDtypeNameTheTensor) {
  BertConfig c = TinyBertConfig();
  auto w = RandomWeights(c);
  w["encoder.layer.1.attention.self.key.weight"] = torch::randn({16, 15});
  auto e = BertEncoder::FromTensors(c, w, torch::kCPU);
  ASSERT_FALSE(e.ok());
  EXPECT_NE(e.status().message().find("encoder.layer.1.attention.self.key.weight"),
            std::string::npos)
      << e.status();
  w = RandomWeights(c);
  w["embeddings.LayerNorm.bias"] = torch::zeros({16}, torch::kInt64);
  e = BertEncoder::FromTensors(c, w, torch::kCPU);
  ASSERT_FALSE(e.ok());
  EXPECT_NE(e.status().message().find("dtype"), std::string::npos);
  w = RandomWeights(c);
  w.erase("encoder.layer.0.output.dense.bias");
  e = BertEncoder::FromTensors(c, w, torch::kCPU);
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.status().code(), absl::StatusCode::kNotFound);
}

TEST(BertEncoder, PaddingDoesNotChangeRealTokens) {
  BertConfig c = TinyBertConfig();
  auto e = BertEncoder::FromTensors(c, RandomWeights(c), torch::kCPU);
  ASSERT_TRUE(e.ok()) << e.status();
  torch::Tensor ids = torch::tensor({{2, 5, 7, 9}}, torch::kInt64);
  auto short_out = (*e)->Forward({ids, {}, {}});
  torch::Tensor padded = torch::tensor({{2, 5, 7, 9, 0, 0}}, torch::kInt64);
  torch::Tensor mask = torch::tensor({{1, 1, 1, 1, 0, 0}}, torch::kInt64);
  auto long_out = (*e)->Forward({padded, {}, mask});
  ASSERT_TRUE(short_out.ok() && long_out.ok());
  EXPECT_TRUE(torch::allclose(*short_out, long_out->slice(1, 0, 4), 1e-5, 1e-5));
  // Mean pooling ignores padding.
  auto p1 = Pool(*short_out, torch::ones({1, 4}, torch::kInt64), Pooling::kMean);
  auto p2 = Pool(*long_out, mask, Pooling::kMean);
  EXPECT_TRUE(torch::allclose(p1, p2, 1e-5, 1e-5));
}

TEST(BertEncoder, BadInputsAreInvalidArgument) {
  BertConfig c = TinyBertConfig();
  auto e = BertEncoder::FromTensors(c, RandomWeights(c), torch::kCPU);
  ASSERT_TRUE(e.ok());
  auto r = (*e)->Forward({torch::tensor({{1, 99}}, torch::kInt64), {}, {}});
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("input_ids"), std::string::npos);
  r = (*e)->Forward({torch::ones({1, 65}, torch::kInt64), {}, {}});
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("max_position_embeddings"), std::string::npos);
  r = (*e)->Forward({torch::ones({1, 4}, torch::kInt64), {}, torch::ones({1, 3}, torch::kInt64)});
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("attention_mask"), std::string::npos);
}

TEST(ParseDevice, AutoFallsBackToCpuAndCudaWithoutGpuIsAnError) {
  auto a = ParseDevice("auto");
  ASSERT_TRUE(a.ok());
  if (!torch::cuda::is_available()) {
    EXPECT_TRUE(a->is_cpu());
    EXPECT_FALSE(ParseDevice("cuda").ok());
  }
  EXPECT_FALSE(ParseDevice("tpu").ok());
}

}  // namespace
}  // namespace metatt
