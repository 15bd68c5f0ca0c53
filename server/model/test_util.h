// Test helper: random weights for a BERT config, named like Hugging Face's
// BertModel state dict, for tiny encoders built with BertEncoder::FromTensors.
#pragma once

#include <map>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "absl/strings/str_cat.h"
#include "server/model/bert_config.h"

namespace metatt {

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

}  // namespace metatt
