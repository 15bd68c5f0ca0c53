// Hugging Face BERT-family config.json (BERT, RoBERTa, MiniLM).
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace metatt {

enum class Activation { kGelu, kGeluTanh, kRelu };

struct BertConfig {
  std::string model_type = "bert";  // "bert" or "roberta"
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t intermediate_size = 0;
  Activation hidden_act = Activation::kGelu;
  double layer_norm_eps = 1e-12;
  int64_t max_position_embeddings = 512;
  int64_t type_vocab_size = 2;
  int64_t pad_token_id = 0;
  // RoBERTa numbers positions from pad_token_id + 1 and skips padding.
  bool roberta_positions = false;

  int64_t head_dim() const { return hidden_size / num_attention_heads; }
  // A stable hash of the fields that define the weights' shapes and meaning;
  // adapter families record it and refuse to load against another base.
  std::string Fingerprint() const;

  static absl::StatusOr<BertConfig> FromJson(const std::string& json_text,
                                             const std::string& origin);
  static absl::StatusOr<BertConfig> FromFile(const std::string& path);
};

}  // namespace metatt
