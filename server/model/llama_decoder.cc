#include "server/model/llama_decoder.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "base/safetensors.h"
#include "base/status_macros.h"
#include "server/model/weights.h"

namespace metatt {
namespace {

namespace F = torch::nn::functional;

// LlamaForCausalLM keeps the transformer under "model." and the head at
// "lm_head.weight"; a bare LlamaModel has no prefix.
class WeightTable {
 public:
  explicit WeightTable(const std::map<std::string, torch::Tensor>& t) : t_(t) {
    prefix_ = t_.count("model.embed_tokens.weight") ? "model." : "";
  }

  bool Has(const std::string& full_name) const { return t_.count(full_name) > 0; }
  const std::string& prefix() const { return prefix_; }

  // `name` is relative to the prefix unless `absolute`.
  absl::StatusOr<torch::Tensor> Get(const std::string& name, std::vector<int64_t> shape,
                                    torch::Device device, bool absolute = false) const {
    return LoadWeight(t_, absolute ? name : prefix_ + name, shape, device);
  }

 private:
  const std::map<std::string, torch::Tensor>& t_;
  std::string prefix_;
};

// HF LlamaRMSNorm: normalise in float32, then scale.
torch::Tensor RmsNorm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  torch::Tensor var = x.pow(2).mean(-1, /*keepdim=*/true);
  return w * (x * torch::rsqrt(var + eps));
}

// Rotates the halves of the last dimension: (x1, x2) -> (-x2, x1).
torch::Tensor RotateHalf(const torch::Tensor& x) {
  const int64_t h = x.size(-1) / 2;
  return torch::cat({-x.narrow(-1, h, h), x.narrow(-1, 0, h)}, -1);
}

torch::Tensor Linear(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b) {
  return b.defined() ? torch::linear(x, w, b) : torch::linear(x, w);
}

}  // namespace

KvCache KvCache::SelectRows(const torch::Tensor& index) const {
  KvCache out;
  if (empty()) return out;
  torch::Tensor idx = index.to(valid.device(), torch::kInt64);
  for (const auto& k : keys) out.keys.push_back(k.index_select(0, idx));
  for (const auto& v : values) out.values.push_back(v.index_select(0, idx));
  out.valid = valid.index_select(0, idx);
  out.next_position = next_position.index_select(0, idx);
  return out;
}

absl::StatusOr<std::shared_ptr<LlamaDecoder>> LlamaDecoder::Create(const Options& options) {
  ASSIGN_OR_RETURN(LlamaConfig config, LlamaConfig::FromFile(options.model_dir + "/config.json"));
  ASSIGN_OR_RETURN(SafetensorsFile file,
                   ReadSafetensors(options.model_dir + "/model.safetensors"));
  ASSIGN_OR_RETURN(auto dec, FromTensors(config, file.tensors, options.device));
  dec->model_dir_ = options.model_dir;
  return dec;
}

absl::StatusOr<std::shared_ptr<LlamaDecoder>> LlamaDecoder::FromTensors(
    const LlamaConfig& c, const std::map<std::string, torch::Tensor>& tensors,
    torch::Device device) {
  std::shared_ptr<LlamaDecoder> d(new LlamaDecoder());
  d->config_ = c;
  d->device_ = device;
  d->geometry_ = ModelGeometry::Llama(c.num_hidden_layers, c.hidden_size, c.intermediate_size,
                                      c.num_attention_heads, c.num_key_value_heads, c.head_dim);
  WeightTable w(tensors);
  const int64_t D = c.hidden_size, I = c.intermediate_size, QW = c.q_width(), KW = c.kv_width();
  ASSIGN_OR_RETURN(d->embed_, w.Get("embed_tokens.weight", {c.vocab_size, D}, device));
  ASSIGN_OR_RETURN(d->final_norm_, w.Get("norm.weight", {D}, device));
  if (c.tie_word_embeddings) {
    d->lm_head_ = d->embed_;
  } else {
    ASSIGN_OR_RETURN(d->lm_head_, w.Get("lm_head.weight", {c.vocab_size, D}, device, true));
  }
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = absl::StrCat("layers.", l, ".");
    Layer L;
    ASSIGN_OR_RETURN(L.attn_norm, w.Get(p + "input_layernorm.weight", {D}, device));
    ASSIGN_OR_RETURN(L.mlp_norm, w.Get(p + "post_attention_layernorm.weight", {D}, device));
    torch::Tensor qw, kw, vw, gw, uw;
    ASSIGN_OR_RETURN(qw, w.Get(p + "self_attn.q_proj.weight", {QW, D}, device));
    ASSIGN_OR_RETURN(kw, w.Get(p + "self_attn.k_proj.weight", {KW, D}, device));
    ASSIGN_OR_RETURN(vw, w.Get(p + "self_attn.v_proj.weight", {KW, D}, device));
    ASSIGN_OR_RETURN(L.o_w, w.Get(p + "self_attn.o_proj.weight", {D, QW}, device));
    L.qkv_w = torch::cat({qw, kw, vw}, 0).contiguous();
    if (c.attention_bias) {
      torch::Tensor qb, kb, vb;
      ASSIGN_OR_RETURN(qb, w.Get(p + "self_attn.q_proj.bias", {QW}, device));
      ASSIGN_OR_RETURN(kb, w.Get(p + "self_attn.k_proj.bias", {KW}, device));
      ASSIGN_OR_RETURN(vb, w.Get(p + "self_attn.v_proj.bias", {KW}, device));
      ASSIGN_OR_RETURN(L.o_b, w.Get(p + "self_attn.o_proj.bias", {D}, device));
      L.qkv_b = torch::cat({qb, kb, vb}, 0).contiguous();
    }
    ASSIGN_OR_RETURN(gw, w.Get(p + "mlp.gate_proj.weight", {I, D}, device));
    ASSIGN_OR_RETURN(uw, w.Get(p + "mlp.up_proj.weight", {I, D}, device));
    ASSIGN_OR_RETURN(L.down_w, w.Get(p + "mlp.down_proj.weight", {D, I}, device));
    L.gate_up_w = torch::cat({gw, uw}, 0).contiguous();
    if (c.mlp_bias) {
      torch::Tensor gb, ub;
      ASSIGN_OR_RETURN(gb, w.Get(p + "mlp.gate_proj.bias", {I}, device));
      ASSIGN_OR_RETURN(ub, w.Get(p + "mlp.up_proj.bias", {I}, device));
      ASSIGN_OR_RETURN(L.down_b, w.Get(p + "mlp.down_proj.bias", {D}, device));
      L.gate_up_b = torch::cat({gb, ub}, 0).contiguous();
    }
    d->layers_.push_back(std::move(L));
  }
  // HF's default rotary frequencies: 1 / theta^(2i / head_dim), in float32.
  RETURN_IF_ERROR(TorchTry("rotary frequencies", [&] {
    torch::Tensor e = torch::arange(0, c.head_dim, 2, torch::kInt64).to(torch::kFloat32) /
                      static_cast<double>(c.head_dim);
    d->inv_freq_ = torch::pow(c.rope_theta, e).reciprocal().to(device);
  }));
  return d;
}

absl::StatusOr<DecoderOutput> LlamaDecoder::Forward(const DecoderInput& in, KvCache* cache,
                                                    EncoderAdapter* adapter,
                                                    const AdapterBatch& batch,
                                                    const DecoderForwardOptions& options) const {
  if (!in.input_ids.defined() || in.input_ids.dim() != 2)
    return absl::InvalidArgumentError("input_ids: must be a 2-D [batch, seq] tensor");
  if (in.input_ids.scalar_type() != torch::kInt64)
    return absl::InvalidArgumentError("input_ids: dtype must be int64");
  const int64_t B = in.input_ids.size(0), S = in.input_ids.size(1);
  if (S == 0 || B == 0) return absl::InvalidArgumentError("input_ids: empty batch or sequence");
  {
    auto mn = in.input_ids.min().item<int64_t>(), mx = in.input_ids.max().item<int64_t>();
    if (mn < 0 || mx >= config_.vocab_size)
      return absl::InvalidArgumentError(absl::StrCat("input_ids: id ", mn < 0 ? mn : mx,
                                                     " outside vocabulary [0, ",
                                                     config_.vocab_size, ")"));
  }
  if (in.attention_mask.defined()) {
    if (in.attention_mask.sizes() != in.input_ids.sizes())
      return absl::InvalidArgumentError(absl::StrCat(
          "attention_mask: shape ", c10::str(in.attention_mask.sizes()), " differs from input_ids ",
          c10::str(in.input_ids.sizes())));
    if (in.attention_mask.is_floating_point() || in.attention_mask.is_complex())
      return absl::InvalidArgumentError("attention_mask: dtype must be integer or bool");
    torch::Tensor m = in.attention_mask.to(torch::kInt64);
    if (m.min().item<int64_t>() < 0 || m.max().item<int64_t>() > 1)
      return absl::InvalidArgumentError("attention_mask: values must be 0 or 1");
  }
  int64_t longest = S;  // the largest position any row reaches, plus one
  if (cache != nullptr && !cache->empty()) {
    if (cache->batch_size() != B)
      return absl::InvalidArgumentError(absl::StrCat("cache: holds ", cache->batch_size(),
                                                     " rows, input_ids has ", B));
    if (static_cast<int64_t>(cache->keys.size()) != config_.num_hidden_layers ||
        cache->values.size() != cache->keys.size() || !cache->next_position.defined() ||
        cache->next_position.numel() != B)
      return absl::InvalidArgumentError(
          absl::StrCat("cache: not made by this model (expected ", config_.num_hidden_layers,
                       " layers and next_position [", B, "])"));
    longest += cache->next_position.max().item<int64_t>();
  }
  if (longest > config_.max_position_embeddings)
    return absl::InvalidArgumentError(absl::StrCat(
        "input_ids: positions up to ", longest, " exceed max_position_embeddings ",
        config_.max_position_embeddings));
  if (batch.task_index.defined() &&
      (batch.task_index.dim() != 1 || batch.task_index.size(0) != B))
    return absl::InvalidArgumentError(
        absl::StrCat("task_index: must be [", B, "], got ", c10::str(batch.task_index.sizes())));
  DecoderOutput out;
  RETURN_IF_ERROR(TorchTry("decoder forward",
                           [&] { out = ForwardUnchecked(in, cache, adapter, batch, options); }));
  return out;
}

DecoderOutput LlamaDecoder::ForwardUnchecked(const DecoderInput& in, KvCache* cache,
                                             EncoderAdapter* adapter, const AdapterBatch& batch,
                                             const DecoderForwardOptions& options) const {
  const auto& c = config_;
  const int64_t B = in.input_ids.size(0), S = in.input_ids.size(1);
  const int64_t H = c.num_attention_heads, KH = c.num_key_value_heads, Dh = c.head_dim;
  const int64_t QW = c.q_width(), KW = c.kv_width(), I = c.intermediate_size;
  const auto i64 = torch::TensorOptions().dtype(torch::kInt64).device(device_);
  torch::Tensor ids = in.input_ids.to(device_);
  torch::Tensor mask = in.attention_mask.defined() ? in.attention_mask.to(device_, torch::kInt64)
                                                   : torch::ones({B, S}, i64);
  const bool cached = cache != nullptr && !cache->empty();
  const int64_t T = cached ? cache->length() : 0;  // cached slots before these tokens

  // Positions count real tokens: the row's next position plus the real tokens
  // before this one. Padding slots get a harmless in-range position.
  torch::Tensor start = cached ? cache->next_position.to(device_) : torch::zeros({B}, i64);
  torch::Tensor pos = (start.unsqueeze(1) + torch::cumsum(mask, 1) - 1).clamp_min(0);  // [B, S]
  torch::Tensor freqs = pos.to(torch::kFloat32).unsqueeze(-1) * inv_freq_;  // [B, S, Dh/2]
  torch::Tensor emb = torch::cat({freqs, freqs}, -1).unsqueeze(1);          // [B, 1, S, Dh]
  torch::Tensor cos = emb.cos(), sin = emb.sin();
  auto rope = [&](const torch::Tensor& t) { return t * cos + RotateHalf(t) * sin; };

  // Query i (slot T + i) sees key slot j when j <= T + i and slot j is a
  // real token; every query also sees itself, so a padding query never has
  // an empty row (its output is unused, and finite).
  torch::Tensor valid_new = mask.to(torch::kBool);
  torch::Tensor valid = cached ? torch::cat({cache->valid.to(device_), valid_new}, 1) : valid_new;
  torch::Tensor key_slot = torch::arange(T + S, i64).unsqueeze(0);  // [1, T+S]
  torch::Tensor query_slot = (torch::arange(S, i64) + T).unsqueeze(1);  // [S, 1]
  torch::Tensor allowed = (key_slot <= query_slot).unsqueeze(0) & valid.unsqueeze(1);
  allowed = allowed | (key_slot == query_slot).unsqueeze(0);
  torch::Tensor attn_mask = allowed.unsqueeze(1);  // [B, 1, S, T+S]

  if (cache != nullptr && !cached) {
    cache->keys.assign(c.num_hidden_layers, torch::Tensor());
    cache->values.assign(c.num_hidden_layers, torch::Tensor());
  }
  torch::Tensor x = F::embedding(ids, embed_);
  // {q, k, v}, {o}, {gate, up}, {down}: the fused outputs below match them.
  const auto& groups = geometry_.groups;
  const int64_t rep = H / KH;
  for (int64_t l = 0; l < static_cast<int64_t>(layers_.size()); ++l) {
    const Layer& L = layers_[l];
    const int li = static_cast<int>(l);
    torch::Tensor h = RmsNorm(x, L.attn_norm, c.rms_norm_eps);
    torch::Tensor qkv = Linear(h, L.qkv_w, L.qkv_b);  // [B, S, QW + 2 KW]
    if (adapter != nullptr) adapter->AddDeltas(li, h, groups[0], batch, qkv);
    auto parts = qkv.split_with_sizes({QW, KW, KW}, -1);
    torch::Tensor q = rope(parts[0].view({B, S, H, Dh}).transpose(1, 2));
    torch::Tensor k = rope(parts[1].view({B, S, KH, Dh}).transpose(1, 2));
    torch::Tensor v = parts[2].view({B, S, KH, Dh}).transpose(1, 2);
    if (cache != nullptr) {
      if (cached) {
        k = torch::cat({cache->keys[l], k}, 2);
        v = torch::cat({cache->values[l], v}, 2);
      }
      cache->keys[l] = k;
      cache->values[l] = v;
    }
    if (rep > 1) {
      k = k.repeat_interleave(rep, 1);
      v = v.repeat_interleave(rep, 1);
    }
    torch::Tensor ctx = at::scaled_dot_product_attention(q, k, v, attn_mask);  // [B, H, S, Dh]
    ctx = ctx.transpose(1, 2).reshape({B, S, QW});
    torch::Tensor o = Linear(ctx, L.o_w, L.o_b);
    if (adapter != nullptr) adapter->AddDeltas(li, ctx, groups[1], batch, o);
    x = x + o;
    torch::Tensor h2 = RmsNorm(x, L.mlp_norm, c.rms_norm_eps);
    torch::Tensor gu = Linear(h2, L.gate_up_w, L.gate_up_b);  // [B, S, 2I]
    if (adapter != nullptr) adapter->AddDeltas(li, h2, groups[2], batch, gu);
    torch::Tensor a = torch::silu(gu.narrow(-1, 0, I)) * gu.narrow(-1, I, I);
    torch::Tensor dn = Linear(a, L.down_w, L.down_b);
    if (adapter != nullptr) adapter->AddDeltas(li, a, groups[3], batch, dn);
    x = x + dn;
  }
  if (cache != nullptr) {
    cache->valid = valid;
    cache->next_position = start + mask.sum(1);
  }
  DecoderOutput out;
  out.hidden = RmsNorm(x, final_norm_, c.rms_norm_eps);
  if (options.skip_logits) return out;
  if (options.last_logits_only) {
    // The last real slot of each row (the last slot when a row has none).
    torch::Tensor last = (mask * torch::arange(1, S + 1, i64)).amax(1) - 1;
    last = torch::where(last < 0, torch::full_like(last, S - 1), last);
    torch::Tensor hl = out.hidden.gather(
        1, last.view({B, 1, 1}).expand({B, 1, out.hidden.size(2)}));  // [B, 1, D]
    out.logits = torch::linear(hl, lm_head_);
  } else {
    out.logits = torch::linear(out.hidden, lm_head_);
  }
  return out;
}

torch::Tensor LlamaDecoder::Logits(const torch::Tensor& hidden) const {
  return torch::linear(hidden, lm_head_);
}

absl::StatusOr<torch::Tensor> LlamaDecoder::GreedyGenerate(const DecoderInput& prompt,
                                                           int64_t max_new_tokens,
                                                           int64_t eos_token_id,
                                                           EncoderAdapter* adapter,
                                                           const AdapterBatch& batch) const {
  if (max_new_tokens < 1)
    return absl::InvalidArgumentError("max_new_tokens: must be at least 1");
  if (eos_token_id >= config_.vocab_size)
    return absl::InvalidArgumentError(absl::StrCat("eos_token_id: ", eos_token_id,
                                                   " outside vocabulary"));
  torch::NoGradGuard no_grad;
  KvCache cache;
  DecoderForwardOptions last;
  last.last_logits_only = true;
  ASSIGN_OR_RETURN(DecoderOutput out, Forward(prompt, &cache, adapter, batch, last));
  const int64_t B = prompt.input_ids.size(0);
  torch::Tensor done = torch::zeros({B}, torch::TensorOptions().dtype(torch::kBool).device(device_));
  std::vector<torch::Tensor> steps;
  for (int64_t t = 0; t < max_new_tokens; ++t) {
    torch::Tensor next = out.logits.select(1, out.logits.size(1) - 1).argmax(-1);  // [B]
    if (eos_token_id >= 0) {
      next = torch::where(done, torch::full_like(next, eos_token_id), next);
      done = done | next.eq(eos_token_id);
    }
    steps.push_back(next);
    if (t + 1 == max_new_tokens) break;
    if (eos_token_id >= 0 && done.all().item<bool>()) {
      for (int64_t r = t + 1; r < max_new_tokens; ++r)
        steps.push_back(torch::full_like(next, eos_token_id));
      break;
    }
    ASSIGN_OR_RETURN(out, Forward({next.unsqueeze(1).cpu(), {}}, &cache, adapter, batch, last));
  }
  return torch::stack(steps, 1).cpu();
}

}  // namespace metatt
