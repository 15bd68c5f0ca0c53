#include "server/model/llama_decoder.h"

#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "adapters/family_io.h"
#include "adapters/lora_adapter.h"
#include "adapters/metatt_adapter.h"
#include "server/model/test_util.h"

namespace metatt {
namespace {

LlamaConfig TinyConfig(bool tied = false) { return TinyLlamaConfig(tied); }

std::map<std::string, torch::Tensor> RandomWeights(const LlamaConfig& c, uint64_t seed = 0) {
  return RandomLlamaWeights(c, seed);
}

std::shared_ptr<LlamaDecoder> Tiny(bool tied = false) {
  LlamaConfig c = TinyConfig(tied);
  auto d = LlamaDecoder::FromTensors(c, RandomWeights(c), torch::kCPU);
  EXPECT_TRUE(d.ok()) << d.status();
  return d.ok() ? *d : nullptr;
}

void ExpectMentions(const absl::Status& s, const std::string& what) {
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find(what), std::string::npos) << s;
}

TEST(LlamaConfig, ParsesSmolLM2StyleConfig) {
  auto c = LlamaConfig::FromJson(R"({"model_type":"llama","vocab_size":49152,"hidden_size":576,
      "intermediate_size":1536,"num_hidden_layers":30,"num_attention_heads":9,
      "num_key_value_heads":3,"head_dim":64,"rms_norm_eps":1e-5,"hidden_act":"silu",
      "rope_parameters":{"rope_theta":100000.0,"rope_type":"default"},"tie_word_embeddings":true,
      "eos_token_id":[2,5],"bos_token_id":1,"pad_token_id":null,"max_position_embeddings":8192})",
                                 "c.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_key_value_heads, 3);
  EXPECT_EQ(c->kv_width(), 192);
  EXPECT_DOUBLE_EQ(c->rope_theta, 100000.0);
  EXPECT_TRUE(c->tie_word_embeddings);
  EXPECT_EQ(c->eos_token_id, 2);
  EXPECT_EQ(c->pad_token_id, -1);
  // Older configs: rope_theta at the top level, head_dim and kv heads implied.
  auto old = LlamaConfig::FromJson(R"({"model_type":"llama","vocab_size":10,"hidden_size":8,
      "intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,"rope_theta":500.0})",
                                   "c.json");
  ASSERT_TRUE(old.ok()) << old.status();
  EXPECT_EQ(old->head_dim, 4);
  EXPECT_EQ(old->num_key_value_heads, 2);
  EXPECT_DOUBLE_EQ(old->rope_theta, 500.0);
  EXPECT_NE(old->Fingerprint(), c->Fingerprint());
}

TEST(LlamaConfig, NamesTheBadField) {
  const std::string base = R"("model_type":"llama","vocab_size":10,"hidden_size":8,
      "intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":4)";
  auto parse = [&](const std::string& extra) {
    return LlamaConfig::FromJson("{" + base + extra + "}", "c.json").status();
  };
  EXPECT_TRUE(parse("").ok());
  ExpectMentions(parse(R"(,"num_key_value_heads":3)"), "num_key_value_heads");
  ExpectMentions(parse(R"(,"hidden_act":"gelu")"), "hidden_act");
  ExpectMentions(parse(R"(,"rope_scaling":{"rope_type":"linear","factor":2.0})"),
                 "rope_scaling.rope_type");
  ExpectMentions(parse(R"(,"rope_parameters":{"rope_type":"yarn"})"), "rope_parameters");
  ExpectMentions(parse(R"(,"head_dim":3)"), "head_dim");
  ExpectMentions(parse(R"(,"tie_word_embeddings":"yes")"), "tie_word_embeddings");
  ExpectMentions(LlamaConfig::FromJson(R"({"model_type":"bert"})", "c.json").status(),
                 "model_type");
  ExpectMentions(LlamaConfig::FromJson(R"({"model_type":"llama","vocab_size":10})", "c.json")
                     .status(),
                 "hidden_size");
}

TEST(LlamaDecoder, WeightsAreCheckedByName) {
  LlamaConfig c = TinyConfig();
  auto w = RandomWeights(c);
  w["model.layers.1.self_attn.k_proj.weight"] = torch::randn({24, 24});  // not [8, 24]
  auto d = LlamaDecoder::FromTensors(c, w, torch::kCPU);
  ExpectMentions(d.status(), "model.layers.1.self_attn.k_proj.weight");
  w = RandomWeights(c);
  w.erase("lm_head.weight");  // untied: the head must be there
  d = LlamaDecoder::FromTensors(c, w, torch::kCPU);
  EXPECT_EQ(d.status().code(), absl::StatusCode::kNotFound);
  ExpectMentions(d.status(), "lm_head.weight");
  // Tied: no lm_head needed, logits use the embeddings.
  LlamaConfig tied = TinyConfig(true);
  auto t = LlamaDecoder::FromTensors(tied, RandomWeights(tied), torch::kCPU);
  ASSERT_TRUE(t.ok()) << t.status();
  torch::NoGradGuard ng;
  auto out = (*t)->Forward({torch::tensor({{1, 2, 3}}, torch::kInt64), {}});
  ASSERT_TRUE(out.ok()) << out.status();
  auto w2 = RandomWeights(tied);
  EXPECT_TRUE(torch::allclose(out->logits, torch::linear(out->hidden,
                                                         w2["model.embed_tokens.weight"]),
                              1e-5, 1e-5));
}

TEST(LlamaDecoder, BadInputsNameTheField) {
  auto d = Tiny();
  ASSERT_NE(d, nullptr);
  torch::Tensor ids = torch::tensor({{1, 2, 3}, {4, 5, 6}}, torch::kInt64);
  ExpectMentions(d->Forward({ids.flatten(), {}}).status(), "input_ids");
  ExpectMentions(d->Forward({ids.to(torch::kInt32), {}}).status(), "input_ids");
  ExpectMentions(d->Forward({ids + 40, {}}).status(), "input_ids");
  ExpectMentions(d->Forward({ids, torch::ones({2, 4}, torch::kInt64)}).status(), "attention_mask");
  ExpectMentions(d->Forward({ids, torch::full({2, 3}, 2, torch::kInt64)}).status(),
                 "attention_mask");
  ExpectMentions(d->Forward({torch::ones({1, 65}, torch::kInt64), {}}).status(),
                 "max_position_embeddings");
  ExpectMentions(d->Forward({ids, {}}, nullptr, nullptr, AdapterBatch(torch::zeros({3}, torch::kInt64)))
                     .status(),
                 "task_index");
  KvCache cache;
  ASSERT_TRUE(d->Forward({ids, {}}, &cache).ok());
  EXPECT_EQ(cache.length(), 3);
  ExpectMentions(d->Forward({ids.narrow(0, 0, 1), {}}, &cache).status(), "cache");
  ExpectMentions(d->GreedyGenerate({ids, {}}, 0).status(), "max_new_tokens");
}

// Real tokens' logits do not depend on padding (left or right) or batching.
TEST(LlamaDecoder, PaddingLeftOrRightLeavesRealTokensAlone) {
  auto d = Tiny();
  ASSERT_NE(d, nullptr);
  torch::NoGradGuard ng;
  torch::Tensor a = torch::tensor({{3, 7, 1, 9, 12}}, torch::kInt64);
  torch::Tensor b = torch::tensor({{5, 8, 2}}, torch::kInt64);
  auto la = d->Forward({a, {}});
  auto lb = d->Forward({b, {}});
  ASSERT_TRUE(la.ok() && lb.ok());
  // b padded on the right, then on the left, batched with a.
  torch::Tensor right = torch::tensor({{3, 7, 1, 9, 12}, {5, 8, 2, 0, 0}}, torch::kInt64);
  torch::Tensor right_mask = torch::tensor({{1, 1, 1, 1, 1}, {1, 1, 1, 0, 0}}, torch::kInt64);
  torch::Tensor left = torch::tensor({{3, 7, 1, 9, 12}, {0, 0, 5, 8, 2}}, torch::kInt64);
  torch::Tensor left_mask = torch::tensor({{1, 1, 1, 1, 1}, {0, 0, 1, 1, 1}}, torch::kInt64);
  auto r = d->Forward({right, right_mask});
  auto l = d->Forward({left, left_mask});
  ASSERT_TRUE(r.ok() && l.ok());
  EXPECT_TRUE(torch::allclose(r->logits[0], la->logits[0], 1e-5, 1e-5));
  EXPECT_TRUE(torch::allclose(r->logits[1].narrow(0, 0, 3), lb->logits[0], 1e-5, 1e-5));
  EXPECT_TRUE(torch::allclose(l->logits[1].narrow(0, 2, 3), lb->logits[0], 1e-5, 1e-5));
  EXPECT_TRUE(torch::isfinite(l->logits).all().item<bool>());
  // Shifting every position changes the logits (the rotary embedding is used).
  torch::Tensor shifted = torch::tensor({{0, 5, 8, 2}}, torch::kInt64);
  auto s = d->Forward({shifted, {}});
  ASSERT_TRUE(s.ok());
  EXPECT_FALSE(torch::allclose(s->logits[0].narrow(0, 1, 3), lb->logits[0], 1e-3, 1e-3));
}

// skip_logits: no [B, S, vocab] product; Logits() on the hidden states gives
// the same numbers as the full forward (tied and untied heads).
TEST(LlamaDecoder, SkipLogitsThenLogitsOfChosenRowsEqualsFullForward) {
  for (bool tied : {false, true}) {
    auto d = Tiny(tied);
    ASSERT_NE(d, nullptr);
    torch::NoGradGuard ng;
    torch::Tensor ids = torch::tensor({{3, 7, 1, 9, 12}, {0, 0, 5, 8, 2}}, torch::kInt64);
    torch::Tensor mask = torch::tensor({{1, 1, 1, 1, 1}, {0, 0, 1, 1, 1}}, torch::kInt64);
    auto full = d->Forward({ids, mask});
    DecoderForwardOptions o;
    o.skip_logits = true;
    auto hid = d->Forward({ids, mask}, nullptr, nullptr, {}, o);
    ASSERT_TRUE(full.ok() && hid.ok());
    EXPECT_FALSE(hid->logits.defined());
    EXPECT_TRUE(torch::equal(hid->hidden, full->hidden));
    torch::Tensor rows = torch::tensor({1, 4, 7, 9}, torch::kInt64);  // of the 10 positions
    const int64_t D = hid->hidden.size(-1);
    torch::Tensor got = d->Logits(hid->hidden.reshape({-1, D}).index_select(0, rows));
    torch::Tensor want = full->logits.reshape({10, -1}).index_select(0, rows);
    EXPECT_TRUE(torch::allclose(got, want, 1e-6, 1e-6)) << "tied " << tied;
  }
}

// Decoding through the KV cache (token by token, or in chunks) equals one
// full forward, with left padding in the batch.
TEST(LlamaDecoder, KvCacheEqualsFullForward) {
  for (bool tied : {false, true}) {
    auto d = Tiny(tied);
    ASSERT_NE(d, nullptr);
    torch::NoGradGuard ng;
    torch::Tensor ids = torch::tensor({{3, 7, 1, 9, 12, 4, 30}, {0, 0, 5, 8, 2, 11, 6}},
                                      torch::kInt64);
    torch::Tensor mask = torch::tensor({{1, 1, 1, 1, 1, 1, 1}, {0, 0, 1, 1, 1, 1, 1}},
                                       torch::kInt64);
    auto full = d->Forward({ids, mask});
    ASSERT_TRUE(full.ok()) << full.status();
    for (int64_t chunk : {1, 2, 3, 7}) {
      KvCache cache;
      std::vector<torch::Tensor> parts;
      for (int64_t s = 0; s < 7; s += chunk) {
        const int64_t w = std::min<int64_t>(chunk, 7 - s);
        auto o = d->Forward({ids.narrow(1, s, w), mask.narrow(1, s, w)}, &cache);
        ASSERT_TRUE(o.ok()) << o.status();
        parts.push_back(o->logits);
      }
      torch::Tensor stepped = torch::cat(parts, 1);
      EXPECT_EQ(cache.length(), 7);
      EXPECT_EQ(cache.next_position[0].item<int64_t>(), 7);
      EXPECT_EQ(cache.next_position[1].item<int64_t>(), 5);
      // Real slots only (padding slots' outputs are unused).
      EXPECT_TRUE(torch::allclose(stepped[0], full->logits[0], 1e-5, 1e-5)) << "chunk " << chunk;
      EXPECT_TRUE(torch::allclose(stepped[1].narrow(0, 2, 5), full->logits[1].narrow(0, 2, 5),
                                  1e-5, 1e-5))
          << "chunk " << chunk;
    }
    // Greedy generation in a padded batch equals generating each row alone.
    auto both = d->GreedyGenerate({ids, mask}, 5);
    auto second = d->GreedyGenerate({ids.narrow(0, 1, 1).narrow(1, 2, 5), {}}, 5);
    ASSERT_TRUE(both.ok() && second.ok());
    EXPECT_TRUE(torch::equal((*both)[1], (*second)[0]));
    // Row selection keeps a row's cache usable.
    KvCache cache;
    ASSERT_TRUE(d->Forward({ids, mask}, &cache).ok());
    KvCache one = cache.SelectRows(torch::tensor({1}, torch::kInt64));
    auto next = d->Forward({torch::tensor({{13}}, torch::kInt64), {}}, &one);
    torch::Tensor ext = torch::cat({ids.narrow(0, 1, 1).narrow(1, 2, 5),
                                    torch::tensor({{13}}, torch::kInt64)}, 1);
    auto ref = d->Forward({ext, {}});
    ASSERT_TRUE(next.ok() && ref.ok());
    EXPECT_TRUE(torch::allclose(next->logits[0][0], ref->logits[0][5], 1e-5, 1e-5));
  }
}

// The weights are constants: no parameter of the decoder needs grad, yet a
// loss is differentiable w.r.t. an input that needs grad (the adapter path).
TEST(LlamaDecoder, FrozenWeights) {
  auto d = Tiny();
  ASSERT_NE(d, nullptr);
  auto out = d->Forward({torch::tensor({{1, 2, 3}}, torch::kInt64), {}});
  ASSERT_TRUE(out.ok());
  EXPECT_FALSE(out->logits.requires_grad());
}

const std::vector<Projection> kAllLlama = {
    Projection::kQuery, Projection::kKey,  Projection::kValue, Projection::kAttnOutput,
    Projection::kGate,  Projection::kFfnUp, Projection::kFfnDown};

TEST(LlamaDecoder, GeometryDescribesTheProjections) {
  auto d = Tiny();
  ASSERT_NE(d, nullptr);
  const ModelGeometry& g = d->geometry();
  EXPECT_EQ(g.Check(), "");
  EXPECT_EQ(g.num_layers, 2);
  EXPECT_EQ(g.of(Projection::kQuery).out_width, 24);
  EXPECT_EQ(g.of(Projection::kKey).out_width, 8);  // 2 kv heads x 4
  EXPECT_EQ(g.of(Projection::kGate).out_width, 40);
  EXPECT_EQ(g.of(Projection::kFfnDown).in_width, 40);
  EXPECT_EQ(g.OffsetInGroup(Projection::kValue), 32);
  EXPECT_EQ(g.OffsetInGroup(Projection::kFfnUp), 40);
  EXPECT_EQ(g.GroupWidth(0), 40);
  // k and v get their own output block (narrower than q), shared by both.
  MetaTTConfig c;
  c.SetModel(g);
  c.projections = kAllLlama;
  ASSERT_TRUE(c.Validate().ok()) << c.Validate();
  auto lay = c.BoundaryLayout();
  EXPECT_EQ(lay.in_rows, 24 + 40);             // hidden, ffn
  EXPECT_EQ(lay.out_cols, 24 + 40 + 8);        // hidden, ffn, kv
  EXPECT_EQ(lay.out_offset[static_cast<int>(Projection::kKey)],
            lay.out_offset[static_cast<int>(Projection::kValue)]);
  // An encoder config knows no gate; 5D refuses the narrower k.
  MetaTTConfig enc;
  enc.d_in = enc.d_out = 24;
  enc.num_layers = 2;
  enc.projections = {Projection::kGate};
  ExpectMentions(enc.Validate(), "gate");
  MetaTTConfig five = c;
  five.form = TTForm::k5D;
  five.num_heads = 6;
  five.projections = {Projection::kQuery, Projection::kKey};
  ExpectMentions(five.Validate(), "'k'");
  // The geometry survives family.json.
  auto back = MetaTTConfig::FromJsonString(c.ToJson().dump());
  ASSERT_TRUE(back.ok()) << back.status();
  ASSERT_TRUE(back->model.has_value());
  EXPECT_EQ(back->BoundaryLayout().out_cols, lay.out_cols);
  EXPECT_EQ(back->Geometry().groups, g.groups);
}

// MetaTT over q, k, v, o, gate, up, down on the decoder: the default init
// (zero first core) leaves the logits as they were, gradients reach the
// cores, and the folded inference path equals the training path.
TEST(LlamaDecoder, MetaTTThroughTheSeam) {
  auto d = Tiny();
  ASSERT_NE(d, nullptr);
  torch::Tensor ids = torch::tensor({{3, 7, 1, 9, 12}, {0, 0, 5, 8, 2}}, torch::kInt64);
  torch::Tensor mask = torch::tensor({{1, 1, 1, 1, 1}, {0, 0, 1, 1, 1}}, torch::kInt64);
  torch::Tensor base;
  {
    torch::NoGradGuard ng;
    base = d->Forward({ids, mask})->logits;
  }
  for (TTForm form : {TTForm::k4D, TTForm::k4Plus1D}) {
    MetaTTConfig c;
    c.SetModel(d->geometry());
    c.form = form;
    c.ranks = {4};
    c.projections = kAllLlama;
    c.num_tasks = form == TTForm::k4Plus1D ? 2 : 1;
    auto a = MetaTTAdapter::Create(c);
    ASSERT_TRUE(a.ok()) << a.status();
    AdapterBatch rows(torch::tensor({0, 1}, torch::kInt64));
    auto out = d->Forward({ids, mask}, nullptr, a->get(), rows);
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_TRUE(torch::equal(out->logits.detach(), base)) << TTFormName(form);
    ASSERT_TRUE(out->logits.requires_grad());
    out->logits.pow(2).mean().backward();
    for (const auto& [name, t] : (*a)->NamedParameters()) {
      if (name != "in") continue;  // with G1 = 0 only G1 has a non-zero gradient
      ASSERT_TRUE(t.grad().defined()) << name;
      EXPECT_GT(t.grad().abs().max().item<double>(), 0) << name;
    }
    // Random cores: every core learns, and inference (folded) = training path.
    c.init = "normal(0.3)";
    auto r = MetaTTAdapter::Create(c, {torch::kFloat32, torch::kCPU, 7});
    ASSERT_TRUE(r.ok()) << r.status();
    auto train = d->Forward({ids, mask}, nullptr, r->get(), rows);
    ASSERT_TRUE(train.ok()) << train.status();
    torch::Tensor real = mask.to(torch::kBool);
    EXPECT_GT((train->logits.detach() - base).abs().max().item<double>(), 1e-3);
    train->logits.pow(2).mean().backward();
    for (const auto& [name, t] : (*r)->NamedParameters()) {
      ASSERT_TRUE(t.grad().defined()) << name;
      EXPECT_GT(t.grad().abs().max().item<double>(), 0) << name;
    }
    torch::NoGradGuard ng;
    auto infer = d->Forward({ids, mask}, nullptr, r->get(), rows);
    ASSERT_TRUE(infer.ok()) << infer.status();
    EXPECT_TRUE(torch::allclose(infer->logits.index({real}), train->logits.detach().index({real}),
                                1e-4, 1e-5))
        << TTFormName(form);
  }
}

// A decoder family (4+1D over every Llama projection) survives family.json
// and cores.safetensors: same geometry, same logits.
TEST(LlamaDecoder, MetaTTFamilyRoundTrip) {
  auto d = Tiny();
  ASSERT_NE(d, nullptr);
  MetaTTConfig c;
  c.SetModel(d->geometry());
  c.form = TTForm::k4Plus1D;
  c.ranks = {3};
  c.projections = kAllLlama;
  c.num_tasks = 2;
  c.init = "normal(0.3)";
  auto a = MetaTTAdapter::Create(c, {torch::kFloat32, torch::kCPU, 11});
  ASSERT_TRUE(a.ok()) << a.status();
  const std::string dir =
      (std::filesystem::temp_directory_path() / absl::StrCat("llama_family_", getpid())).string();
  std::filesystem::remove_all(dir);
  const std::string fp = d->config().Fingerprint();
  ASSERT_TRUE(SaveFamily(dir, **a, {"t0", "t1"}, {}, "tiny-llama", fp).ok());
  auto back = LoadFamily(dir, fp, torch::kCPU, MetaTTAdapter::Leaves::kFrozen);
  ASSERT_TRUE(back.ok()) << back.status();
  ASSERT_TRUE(back->adapter->config().model.has_value());
  EXPECT_EQ(back->adapter->config().model->family, "llama");
  torch::NoGradGuard ng;
  torch::Tensor ids = torch::tensor({{3, 7, 1, 9}, {5, 8, 2, 11}}, torch::kInt64);
  AdapterBatch rows(torch::tensor({1, 0}, torch::kInt64));
  auto before = d->Forward({ids, {}}, nullptr, a->get(), rows);
  auto after = d->Forward({ids, {}}, nullptr, back->adapter.get(), rows);
  ASSERT_TRUE(before.ok() && after.ok());
  EXPECT_TRUE(torch::allclose(before->logits, after->logits, 1e-5, 1e-6));
  std::filesystem::remove_all(dir);
}

// LoRA's fused inference path places k/v blocks by the geometry's widths.
TEST(LlamaDecoder, LoraFusedEqualsUnfused) {
  auto d = Tiny();
  ASSERT_NE(d, nullptr);
  LoraConfig c;
  c.SetModel(d->geometry());
  c.rank = 3;
  c.projections = kAllLlama;
  c.init = "random";
  auto a = LoraAdapter::Create(c, {});
  ASSERT_TRUE(a.ok()) << a.status();
  torch::Tensor ids = torch::tensor({{3, 7, 1, 9, 12}}, torch::kInt64);
  auto train = d->Forward({ids, {}}, nullptr, a->get());
  ASSERT_TRUE(train.ok()) << train.status();
  torch::NoGradGuard ng;
  auto base = d->Forward({ids, {}});
  auto infer = d->Forward({ids, {}}, nullptr, a->get());
  ASSERT_TRUE(infer.ok() && base.ok());
  EXPECT_GT((infer->logits - base->logits).abs().max().item<double>(), 1e-3);
  EXPECT_TRUE(torch::allclose(infer->logits, train->logits.detach(), 1e-4, 1e-5));
  LoraConfig enc = c;
  enc.model.reset();
  ExpectMentions(enc.Validate(), "gate");
}

}  // namespace
}  // namespace metatt
