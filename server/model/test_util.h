// Test helpers: tiny BERT and Llama configs and random weights for them, named like
// Hugging Face's BertModel / LlamaForCausalLM state dicts, for models built
// with BertEncoder::FromTensors / LlamaDecoder::FromTensors.
#pragma once

#include <map>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "absl/strings/str_cat.h"
#include "adapters/metatt_config.h"
#include "server/model/bert_config.h"
#include "server/model/llama_config.h"

namespace metatt {

// The tiny BERT of the encoder, trainer, runtime and registry tests: 2
// layers, hidden 16 (2 heads), FFN 32, vocabulary 64 (testing_util's
// TinyVocab and WordId), 64 positions.
inline BertConfig TinyBertConfig() {
  BertConfig c;
  c.vocab_size = 64;
  c.hidden_size = 16;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 2;
  c.intermediate_size = 32;
  c.max_position_embeddings = 64;
  c.type_vocab_size = 2;
  return c;
}

struct RandomBertOptions {
  double embedding_std = 0.2;
  double weight_std = 0.2;
  double bias_std = 0.0;  // 0 = zero biases
};

// Draws from the current torch seed (call torch::manual_seed first).
inline std::map<std::string, torch::Tensor> RandomBertWeights(const BertConfig& c,
                                                              const RandomBertOptions& o = {}) {
  const int64_t D = c.hidden_size, I = c.intermediate_size;
  auto r = [](std::vector<int64_t> s, double std) {
    return std > 0 ? torch::randn(s) * std : torch::zeros(s);
  };
  std::map<std::string, torch::Tensor> t = {
      {"embeddings.word_embeddings.weight", r({c.vocab_size, D}, o.embedding_std)},
      {"embeddings.position_embeddings.weight", r({c.max_position_embeddings, D}, o.embedding_std)},
      {"embeddings.token_type_embeddings.weight", r({c.type_vocab_size, D}, o.embedding_std)},
      {"embeddings.LayerNorm.weight", torch::ones({D})},
      {"embeddings.LayerNorm.bias", torch::zeros({D})}};
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = absl::StrCat("encoder.layer.", l, ".");
    for (const char* n : {"attention.self.query", "attention.self.key", "attention.self.value",
                          "attention.output.dense"}) {
      t[p + n + ".weight"] = r({D, D}, o.weight_std);
      t[p + n + ".bias"] = r({D}, o.bias_std);
    }
    t[p + "intermediate.dense.weight"] = r({I, D}, o.weight_std);
    t[p + "intermediate.dense.bias"] = r({I}, o.bias_std);
    t[p + "output.dense.weight"] = r({D, I}, o.weight_std);
    t[p + "output.dense.bias"] = r({D}, o.bias_std);
    for (const char* n : {"attention.output.LayerNorm", "output.LayerNorm"}) {
      t[p + n + ".weight"] = torch::ones({D});
      t[p + n + ".bias"] = torch::zeros({D});
    }
  }
  return t;
}

// The tiny Llama of the decoder, generator and LM-trainer tests: 2 layers,
// hidden 24, 6 query heads over 2 key/value heads (grouped-query attention,
// q is 24 wide and k/v 8), vocabulary 40.
inline LlamaConfig TinyLlamaConfig(bool tied = false) {
  LlamaConfig c;
  c.vocab_size = 40;
  c.hidden_size = 24;
  c.intermediate_size = 40;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 6;
  c.num_key_value_heads = 2;
  c.head_dim = 4;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 1000.0;
  c.max_position_embeddings = 64;
  c.tie_word_embeddings = tied;
  return c;
}

// Every projection of a Llama layer: q, k, v, o, gate, up, down.
inline const std::vector<Projection> kAllLlamaProjections = {
    Projection::kQuery, Projection::kKey,   Projection::kValue,  Projection::kAttnOutput,
    Projection::kGate,  Projection::kFfnUp, Projection::kFfnDown};

// A MetaTT config on every projection of a Llama geometry `g`: `form`, bond
// rank `rank`, `num_tasks` task slices, the default initialisation.
inline MetaTTConfig LlamaMetaTTConfig(const ModelGeometry& g, TTForm form, int64_t rank,
                                      int64_t num_tasks = 1) {
  MetaTTConfig c;
  c.SetModel(g);
  c.form = form;
  c.ranks = {rank};
  c.projections = kAllLlamaProjections;
  c.num_tasks = num_tasks;
  return c;
}

struct RandomLlamaOptions {
  double weight_std = 0.2;   // every projection
  double lm_head_std = 0.2;  // untied configs only
};

// Seeds torch with `seed`, then draws embeddings, final norm, the LM head
// (untied configs) and every layer in order.
inline std::map<std::string, torch::Tensor> RandomLlamaWeights(const LlamaConfig& c,
                                                               uint64_t seed = 0,
                                                               const RandomLlamaOptions& o = {}) {
  torch::manual_seed(seed);
  const int64_t D = c.hidden_size, I = c.intermediate_size;
  auto r = [](std::vector<int64_t> s, double std) { return torch::randn(s) * std; };
  std::map<std::string, torch::Tensor> t = {{"model.embed_tokens.weight", r({c.vocab_size, D}, 1.0)},
                                            {"model.norm.weight", 1 + r({D}, 0.1)}};
  if (!c.tie_word_embeddings) t["lm_head.weight"] = r({c.vocab_size, D}, o.lm_head_std);
  const double w = o.weight_std;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    t[p + "input_layernorm.weight"] = 1 + r({D}, 0.1);
    t[p + "post_attention_layernorm.weight"] = 1 + r({D}, 0.1);
    t[p + "self_attn.q_proj.weight"] = r({c.q_width(), D}, w);
    t[p + "self_attn.k_proj.weight"] = r({c.kv_width(), D}, w);
    t[p + "self_attn.v_proj.weight"] = r({c.kv_width(), D}, w);
    t[p + "self_attn.o_proj.weight"] = r({D, c.q_width()}, w);
    t[p + "mlp.gate_proj.weight"] = r({I, D}, w);
    t[p + "mlp.up_proj.weight"] = r({I, D}, w);
    t[p + "mlp.down_proj.weight"] = r({D, I}, w);
  }
  return t;
}

}  // namespace metatt
