#include "adapters/lora_adapter.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>

#include "adapters/metatt_config.h"
#include "adapters/tensor_train.h"
#include "base/safetensors.h"

namespace metatt {
namespace {

LoraConfig Small() {
  LoraConfig c;
  c.rank = 3;
  c.alpha = 6;
  c.num_layers = 2;
  c.hidden_size = 8;
  c.intermediate_size = 16;
  c.projections = {Projection::kQuery, Projection::kValue, Projection::kFfnUp};
  c.init = "random";
  return c;
}

TEST(LoraAdapterTest, DeltasMatchDenseUpdate) {
  LoraAdapter::Options o;
  o.dtype = torch::kFloat64;
  auto a = LoraAdapter::Create(Small(), o);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_DOUBLE_EQ((*a)->scale(), 2.0);
  torch::Tensor x = torch::randn({2, 4, 8}, torch::kFloat64);
  auto d = (*a)->Deltas(1, x, {Projection::kQuery, Projection::kKey, Projection::kValue}, {});
  EXPECT_FALSE(d[1].defined());
  EXPECT_TRUE(torch::allclose(d[0], x.matmul(*(*a)->DenseDelta(1, Projection::kQuery)), 1e-12));
  EXPECT_TRUE(torch::allclose(d[2], x.matmul(*(*a)->DenseDelta(1, Projection::kValue)), 1e-12));
  auto up = (*a)->Deltas(0, x, {Projection::kFfnUp}, {});
  EXPECT_EQ(up[0].size(2), 16);
  EXPECT_TRUE(torch::allclose(up[0], x.matmul(*(*a)->DenseDelta(0, Projection::kFfnUp)), 1e-12));
  EXPECT_EQ((*a)->NumParameters(), Small().ParameterCount());
}

TEST(LoraAdapterTest, FusedAddDeltasEqualsBasePlusDeltasAndFollowsUpdates) {
  LoraAdapter::Options o;
  o.dtype = torch::kFloat64;
  auto made = LoraAdapter::Create(Small(), o);
  ASSERT_TRUE(made.ok()) << made.status();
  LoraAdapter& a = **made;
  torch::Tensor x = torch::randn({2, 4, 8}, torch::kFloat64);
  const std::vector<Projection> qkv = {Projection::kQuery, Projection::kKey, Projection::kValue};
  auto check = [&] {
    torch::Tensor base = torch::randn({2, 4, 24}, torch::kFloat64);
    torch::Tensor want = base.clone();
    want.narrow(-1, 0, 8).add_(x.matmul(*a.DenseDelta(1, Projection::kQuery)));
    want.narrow(-1, 16, 8).add_(x.matmul(*a.DenseDelta(1, Projection::kValue)));
    for (bool grad : {false, true}) {
      torch::AutoGradMode mode(grad);
      torch::Tensor out = base.clone();
      a.AddDeltas(1, x, qkv, {}, out);  // inference: fused addmm_; training: default
      EXPECT_TRUE(torch::allclose(out, want, 1e-12, 1e-12)) << "grad " << grad;
    }
    torch::NoGradGuard no_grad;
    torch::Tensor up = torch::randn({2, 4, 16}, torch::kFloat64);
    torch::Tensor up_want = up + x.matmul(*a.DenseDelta(0, Projection::kFfnUp));
    a.AddDeltas(0, x, {Projection::kFfnUp}, {}, up);
    EXPECT_TRUE(torch::allclose(up, up_want, 1e-12, 1e-12));
  };
  check();
  // An in-place factor update reaches the cached fused factors.
  {
    torch::NoGradGuard no_grad;
    for (auto& [name, t] : a.NamedParameters())
      if (name == "layer.1.v.lora_B") t.mul_(-3.0);
  }
  check();
}

TEST(LoraAdapterTest, PeftInitIsZeroDelta) {
  LoraConfig c = Small();
  c.init = "peft";
  auto a = LoraAdapter::Create(c, {});
  ASSERT_TRUE(a.ok());
  torch::Tensor x = torch::randn({2, 4, 8});
  auto d = (*a)->Deltas(0, x, {Projection::kQuery}, {});
  EXPECT_TRUE(torch::equal(d[0], torch::zeros_like(d[0])));
}

TEST(LoraAdapterTest, RobertaExampleParameterCounts) {
  LoraConfig c;
  c.rank = 8;
  c.num_layers = 12;
  c.hidden_size = 768;
  auto a = LoraAdapter::Create(c, {});
  ASSERT_TRUE(a.ok());
  EXPECT_EQ((*a)->NumParameters(), 294912);
  EXPECT_EQ(c.ParameterCount(), LoraParameterCount(12, 2, 768, 768, 8));
  MetaTTConfig m;
  m.d_in = m.d_out = 768;
  m.num_layers = 12;
  EXPECT_EQ(m.ParameterCount(), 13184);
}

std::string WritePeftDir(const std::string& name, const std::string& config_json,
                         const std::map<std::string, torch::Tensor>& tensors) {
  std::string d = ::testing::TempDir() + "/peft_" + std::to_string(::getpid()) + "_" + name;
  std::string cmd = "mkdir -p '" + d + "'";
  EXPECT_EQ(std::system(cmd.c_str()), 0);
  EXPECT_TRUE(WriteFileAtomically(d + "/adapter_config.json", config_json).ok());
  EXPECT_TRUE(WriteSafetensors(d + "/adapter_model.safetensors", tensors).ok());
  return d;
}

TEST(LoraAdapterTest, LoadsPeftAdapterDirectory) {
  std::map<std::string, torch::Tensor> t;
  torch::manual_seed(3);
  for (int l = 0; l < 2; ++l) {
    for (const char* m : {"attention.self.query", "attention.output.dense", "output.dense"}) {
      const std::string p = "base_model.model.encoder.layer." + std::to_string(l) + "." + m;
      const bool down = std::string(m) == "output.dense";
      t[p + ".lora_A.weight"] = torch::randn({4, down ? 16 : 8});
      t[p + ".lora_B.weight"] = torch::randn({8, 4});
    }
  }
  const std::string dir = WritePeftDir(
      "ok",
      R"({"r": 4, "lora_alpha": 8, "use_rslora": true, "target_modules": ["query", "dense"],
          "fan_in_fan_out": false, "bias": "none", "peft_type": "LORA"})",
      t);
  LoadPeftOptions opts;
  opts.num_layers = 2;
  opts.hidden_size = 8;
  auto a = LoadPeftAdapter(dir, opts);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_DOUBLE_EQ((*a)->scale(), 8.0 / 2.0);  // rsLoRA: alpha / sqrt(r)
  EXPECT_EQ((*a)->config().intermediate_size, 16);
  torch::Tensor x = torch::randn({2, 3, 16});
  auto d = (*a)->Deltas(1, x, {Projection::kFfnDown}, {});
  const std::string p = "base_model.model.encoder.layer.1.output.dense";
  torch::Tensor want =
      x.matmul(t[p + ".lora_A.weight"].t()).matmul(t[p + ".lora_B.weight"].t()) * 4.0;
  EXPECT_TRUE(torch::allclose(d[0], want, 1e-5, 1e-5));

  auto bad = WritePeftDir("fanin", R"({"r": 4, "lora_alpha": 8, "fan_in_fan_out": true})", t);
  EXPECT_EQ(LoadPeftAdapter(bad).status().code(), absl::StatusCode::kInvalidArgument);
  auto t2 = t;
  t2["base_model.model.encoder.layer.0.attention.self.query.lora_magnitude_vector"] =
      torch::ones({8});
  auto dora = WritePeftDir("dora", R"({"r": 4, "lora_alpha": 8})", t2);
  EXPECT_EQ(LoadPeftAdapter(dora).status().code(), absl::StatusCode::kUnimplemented);
  LoadPeftOptions wrong = opts;
  wrong.hidden_size = 12;
  EXPECT_EQ(LoadPeftAdapter(dir, wrong).status().code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace metatt
