// The adapters through the real encoder seam (BertEncoder::Forward).
#include <gtest/gtest.h>

#include "adapters/lora_adapter.h"
#include "adapters/metatt_adapter.h"
#include "server/model/bert_encoder.h"
#include "server/model/test_util.h"

namespace metatt {
namespace {

constexpr int64_t kD = 12, kLayers = 2, kHeads = 3, kInter = 24, kVocab = 40;

std::shared_ptr<BertEncoder> TinyEncoder() {
  BertConfig c;
  c.vocab_size = kVocab;
  c.hidden_size = kD;
  c.num_hidden_layers = kLayers;
  c.num_attention_heads = kHeads;
  c.intermediate_size = kInter;
  c.max_position_embeddings = 16;
  c.type_vocab_size = 2;
  torch::manual_seed(0);
  const auto t = RandomBertWeights(c, {/*embedding_std=*/0.2, /*weight_std=*/0.2, /*bias_std=*/0.2});
  auto e = BertEncoder::FromTensors(c, t, torch::kCPU);
  EXPECT_TRUE(e.ok()) << e.status();
  return *e;
}

EncoderInput Input() {
  EncoderInput in;
  in.input_ids = torch::randint(1, kVocab, {3, 7}, torch::kInt64);
  in.attention_mask = torch::ones({3, 7}, torch::kInt64);
  in.attention_mask.index_put_({1, torch::indexing::Slice(5)}, 0);
  return in;
}

MetaTTConfig Config(TTForm form) {
  MetaTTConfig c;
  c.form = form;
  c.ranks = {4};
  c.projections = {Projection::kQuery, Projection::kKey, Projection::kValue,
                   Projection::kAttnOutput};
  c.d_in = c.d_out = kD;
  c.num_layers = kLayers;
  c.num_heads = kHeads;
  c.num_tasks = form == TTForm::k4Plus1D ? 3 : 1;
  return c;
}

TEST(AdapterEncoderTest, ZeIdIdIdAtStepZeroIsExactlyTheBaseModel) {
  auto enc = TinyEncoder();
  EncoderInput in = Input();
  auto base = enc->Forward(in);
  ASSERT_TRUE(base.ok()) << base.status();
  for (TTForm form : {TTForm::k4D, TTForm::k5D, TTForm::k4Plus1D}) {
    auto a = MetaTTAdapter::Create(Config(form));
    ASSERT_TRUE(a.ok()) << a.status();
    AdapterBatch batch;
    if (form == TTForm::k4Plus1D) batch.task_index = torch::tensor({0, 2, 1}, torch::kInt64);
    auto out = enc->Forward(in, a->get(), batch);
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_TRUE(torch::equal(*base, *out)) << TTFormName(form);
  }
  // Every projection, FFN included (own boundary blocks).
  MetaTTConfig all = Config(TTForm::k4Plus1D);
  all.projections.push_back(Projection::kFfnUp);
  all.projections.push_back(Projection::kFfnDown);
  all.d_ffn = kInter;
  auto full = MetaTTAdapter::Create(all);
  ASSERT_TRUE(full.ok()) << full.status();
  auto full_out =
      enc->Forward(in, full->get(), AdapterBatch{torch::tensor({1, 1, 0}, torch::kInt64)});
  ASSERT_TRUE(full_out.ok()) << full_out.status();
  EXPECT_TRUE(torch::equal(*base, *full_out));
  full_out->pow(2).sum().backward();
  for (auto& [name, p] : (*full)->NamedParameters())
    if (name == "in") {
      EXPECT_GT(p.grad().narrow(0, kD, kInter).abs().sum().item<double>(), 0.0);
    }

  LoraConfig lc;
  lc.num_layers = kLayers;
  lc.hidden_size = kD;
  lc.rank = 2;
  auto lora = LoraAdapter::Create(lc, {});
  ASSERT_TRUE(lora.ok());
  auto out = enc->Forward(in, lora->get());
  ASSERT_TRUE(out.ok());
  EXPECT_TRUE(torch::equal(*base, *out));
}

TEST(AdapterEncoderTest, GradientsReachTheFirstCoreAndBadTasksAreStatuses) {
  auto enc = TinyEncoder();
  EncoderInput in = Input();
  auto a = MetaTTAdapter::Create(Config(TTForm::k4Plus1D));
  ASSERT_TRUE(a.ok());
  AdapterBatch batch{torch::tensor({0, 1, 1}, torch::kInt64)};
  auto out = enc->Forward(in, a->get(), batch);
  ASSERT_TRUE(out.ok());
  out->pow(2).sum().backward();
  for (auto& [name, p] : (*a)->NamedParameters()) {
    if (name == "in") {
      ASSERT_TRUE(p.grad().defined());
      EXPECT_GT(p.grad().abs().sum().item<double>(), 0.0);
    }
  }
  AdapterBatch bad{torch::tensor({0, 1, 9}, torch::kInt64)};
  auto st = enc->Forward(in, a->get(), bad);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(std::string(st.status().message()).find("task_index"), std::string::npos)
      << st.status();
}

TEST(AdapterEncoderTest, MixedTaskBatchMatchesPerTaskForward) {
  auto enc = TinyEncoder();
  EncoderInput in = Input();
  MetaTTConfig c = Config(TTForm::k4Plus1D);
  c.init = "normal(0.3)";
  auto a = MetaTTAdapter::Create(c);
  ASSERT_TRUE(a.ok());
  torch::NoGradGuard no_grad;
  torch::Tensor tasks = torch::tensor({2, 0, 1}, torch::kInt64);
  auto mixed = enc->Forward(in, a->get(), AdapterBatch{tasks});
  ASSERT_TRUE(mixed.ok());
  for (int64_t b = 0; b < 3; ++b) {
    EncoderInput one;
    one.input_ids = in.input_ids.narrow(0, b, 1);
    one.attention_mask = in.attention_mask.narrow(0, b, 1);
    auto single = enc->Forward(one, a->get(), AdapterBatch{tasks.narrow(0, b, 1)});
    ASSERT_TRUE(single.ok());
    EXPECT_TRUE(torch::allclose(mixed->narrow(0, b, 1), *single, 1e-5, 1e-5)) << b;
  }
}

}  // namespace
}  // namespace metatt
