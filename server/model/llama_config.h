// Hugging Face Llama-architecture config.json (model_type "llama"; SmolLM2,
// TinyLlama, Llama 2/3 without rope scaling). Every field the decoder needs;
// a field it cannot honour (another activation, rope scaling, a head count
// that does not divide) is refused with INVALID_ARGUMENT naming the field.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace metatt {

struct LlamaConfig {
  std::string model_type = "llama";
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  // absent: = num_attention_heads (no GQA)
  int64_t head_dim = 0;             // absent: hidden_size / num_attention_heads
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;      // "rope_theta" or "rope_parameters.rope_theta"
  int64_t max_position_embeddings = 2048;
  bool tie_word_embeddings = false;
  bool attention_bias = false;      // q, k, v, o carry biases
  bool mlp_bias = false;            // gate, up, down carry biases
  int64_t bos_token_id = -1;        // -1: not given
  int64_t eos_token_id = -1;        // the first one when config.json lists several
  int64_t pad_token_id = -1;

  int64_t q_width() const { return num_attention_heads * head_dim; }
  int64_t kv_width() const { return num_key_value_heads * head_dim; }
  // A stable hash of the fields that define the weights' shapes and meaning.
  std::string Fingerprint() const;

  static absl::StatusOr<LlamaConfig> FromJson(const std::string& json_text,
                                              const std::string& origin);
  static absl::StatusOr<LlamaConfig> FromFile(const std::string& path);
};

}  // namespace metatt
