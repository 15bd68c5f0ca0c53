// A frozen Llama-architecture decoder in plain LibTorch (SmolLM2, TinyLlama,
// Llama 2/3 without rope scaling), loaded from a Hugging Face model directory
// (config.json + model.safetensors): RMSNorm, rotary position embeddings
// (rope_theta from the config), grouped-query attention, SwiGLU MLP, tied or
// untied lm_head. Weights never require grad; an optional adapter adds deltas
// at the projections (q|k|v, o, gate|up, down), so the forward is
// differentiable with respect to the adapter's parameters only.
//
// Padding: rows may be left- or right-padded (attention_mask 0 = padding).
// Positions count real tokens only (position of a token = number of real
// tokens before it in its row, plus the row's cached length), so a row's
// logits at its real tokens do not depend on how it was padded or batched.
//
// KV cache: Forward(input, &cache) appends the new tokens' keys and values
// (after rotary embedding) and advances each row's next position by its
// number of real new tokens. Decoding token by token through the cache
// equals one full forward over the whole sequence.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "absl/status/statusor.h"
#include "adapters/adapter.h"
#include "adapters/model_geometry.h"
#include "server/model/llama_config.h"

namespace metatt {

struct DecoderInput {
  torch::Tensor input_ids;       // int64 [B, S]
  torch::Tensor attention_mask;  // int64 [B, S], 1 = real token (undefined: all ones)
};

// Keys and values of every layer for the tokens seen so far, one row per
// sequence. Slots of padding tokens stay in the cache, masked out.
struct KvCache {
  std::vector<torch::Tensor> keys, values;  // per layer [B, kv_heads, T, head_dim]
  torch::Tensor valid;                      // bool [B, T]: slot holds a real token
  torch::Tensor next_position;              // int64 [B]: position of each row's next token

  bool empty() const { return !valid.defined(); }
  int64_t batch_size() const { return empty() ? 0 : valid.size(0); }
  int64_t length() const { return empty() ? 0 : valid.size(1); }
  // Keeps the rows `index` (int64 [B'] on any device), in that order.
  KvCache SelectRows(const torch::Tensor& index) const;
};

struct DecoderForwardOptions {
  // Logits only for the last real slot of every row (generation): [B, 1, V].
  bool last_logits_only = false;
  // No logits at all (out.logits undefined): the caller projects the hidden
  // states it needs with Logits(), e.g. a loss over completion tokens only,
  // so the [B, S, vocab] product is not paid for the prompt positions.
  bool skip_logits = false;
};

struct DecoderOutput {
  torch::Tensor logits;  // [B, S, vocab] (or [B, 1, vocab] with last_logits_only)
  torch::Tensor hidden;  // [B, S, hidden]: after the final norm
};

class LlamaDecoder {
 public:
  struct Options {
    std::string model_dir;  // holds config.json and model.safetensors
    torch::Device device = torch::kCPU;
  };
  static absl::StatusOr<std::shared_ptr<LlamaDecoder>> Create(const Options& options);
  // From tensors already in memory (tests); names as in HF's LlamaForCausalLM
  // ("model.layers.0.self_attn.q_proj.weight", ...; the "model." prefix may
  // be absent, "lm_head.weight" only when the embeddings are untied).
  static absl::StatusOr<std::shared_ptr<LlamaDecoder>> FromTensors(
      const LlamaConfig& config, const std::map<std::string, torch::Tensor>& tensors,
      torch::Device device);

  // Shapes, ids and the cache are validated; a bad input is INVALID_ARGUMENT
  // naming the field. With `cache` (empty or from earlier calls on the same
  // rows) the new tokens attend to the cached ones and are appended to it.
  absl::StatusOr<DecoderOutput> Forward(const DecoderInput& input, KvCache* cache = nullptr,
                                        EncoderAdapter* adapter = nullptr,
                                        const AdapterBatch& batch = {},
                                        const DecoderForwardOptions& options = {}) const;

  // Greedy decoding of up to `max_new_tokens` per row after the (padded)
  // prompts; a row that emits `eos_token_id` (>= 0) stops and is filled with
  // it. Returns int64 [B, max_new_tokens].
  absl::StatusOr<torch::Tensor> GreedyGenerate(const DecoderInput& prompt, int64_t max_new_tokens,
                                               int64_t eos_token_id = -1,
                                               EncoderAdapter* adapter = nullptr,
                                               const AdapterBatch& batch = {}) const;

  // The LM head on hidden states after the final norm: [..., D] -> [..., vocab].
  torch::Tensor Logits(const torch::Tensor& hidden) const;

  const LlamaConfig& config() const { return config_; }
  // What adapters need to know (adapters/model_geometry.h): the groups are
  // {q, k, v}, {o}, {gate, ffn_up}, {ffn_down}, asked in that order.
  const ModelGeometry& geometry() const { return geometry_; }
  torch::Device device() const { return device_; }
  const std::string& model_dir() const { return model_dir_; }

 private:
  struct Layer {
    torch::Tensor attn_norm, mlp_norm;  // RMSNorm weights [D]
    torch::Tensor qkv_w, qkv_b;         // fused [q + 2 kv widths, D] (bias: attention_bias)
    torch::Tensor o_w, o_b;             // [D, q width]
    torch::Tensor gate_up_w, gate_up_b; // fused [2I, D] (bias: mlp_bias)
    torch::Tensor down_w, down_b;       // [D, I]
  };
  LlamaDecoder() = default;
  DecoderOutput ForwardUnchecked(const DecoderInput& in, KvCache* cache, EncoderAdapter* adapter,
                                 const AdapterBatch& batch,
                                 const DecoderForwardOptions& options) const;

  LlamaConfig config_;
  ModelGeometry geometry_;
  torch::Device device_ = torch::kCPU;
  std::string model_dir_;
  torch::Tensor embed_, final_norm_, lm_head_, inv_freq_;
  std::vector<Layer> layers_;
};

}  // namespace metatt
