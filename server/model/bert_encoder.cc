#include "server/model/bert_encoder.h"

#include <cmath>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "base/safetensors.h"
#include "base/status_macros.h"
#include "server/model/weights.h"

namespace metatt {
namespace {

namespace F = torch::nn::functional;

// Hugging Face checkpoints carry the encoder under "", "bert.", "roberta." or
// "model."; old TF-converted ones name LayerNorm parameters gamma/beta.
class WeightTable {
 public:
  WeightTable(const std::map<std::string, torch::Tensor>& t) : t_(t) {
    for (const char* p : {"", "bert.", "roberta.", "model."}) {
      if (t_.count(absl::StrCat(p, "embeddings.word_embeddings.weight"))) {
        prefix_ = p;
        break;
      }
    }
  }

  absl::StatusOr<torch::Tensor> Get(const std::string& name, std::vector<int64_t> shape,
                                    torch::Device device) const {
    const std::string key = prefix_ + name;
    std::string alt = key;
    if (absl::EndsWith(alt, "LayerNorm.weight")) alt.replace(alt.size() - 6, 6, "gamma");
    if (absl::EndsWith(alt, "LayerNorm.bias")) alt.replace(alt.size() - 4, 4, "beta");
    return LoadWeight(t_, key, shape, device, {alt});
  }

 private:
  const std::map<std::string, torch::Tensor>& t_;
  std::string prefix_;
};

torch::Tensor Activate(const torch::Tensor& x, Activation a) {
  switch (a) {
    case Activation::kGelu: return torch::gelu(x);
    case Activation::kGeluTanh: return torch::gelu(x, "tanh");
    case Activation::kRelu: return torch::relu(x);
  }
  return x;
}

}  // namespace

absl::StatusOr<torch::Device> ParseDevice(const std::string& spec) {
  if (spec == "cpu") return torch::Device(torch::kCPU);
  bool has_cuda = torch::cuda::is_available();
  if (spec == "auto") return has_cuda ? torch::Device(torch::kCUDA, 0) : torch::Device(torch::kCPU);
  if (absl::StartsWith(spec, "cuda")) {
    if (!has_cuda)
      return absl::FailedPreconditionError(
          absl::StrCat("device '", spec, "': no CUDA device is visible (use --device=cpu or auto)"));
    torch::Device d(torch::kCPU);
    auto st = TorchTry("device", [&] { d = torch::Device(spec); });
    if (!st.ok()) return absl::InvalidArgumentError(absl::StrCat("device '", spec, "' is not valid"));
    return d;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("device '", spec, "' is not one of auto, cpu, cuda, cuda:N"));
}

absl::StatusOr<Pooling> ParsePooling(const std::string& name) {
  if (name == "cls") return Pooling::kCls;
  if (name == "mean") return Pooling::kMean;
  return absl::InvalidArgumentError(absl::StrCat("pooling '", name, "' is not one of cls, mean"));
}

absl::StatusOr<std::shared_ptr<BertEncoder>> BertEncoder::Create(const Options& options) {
  ASSIGN_OR_RETURN(BertConfig config, BertConfig::FromFile(options.model_dir + "/config.json"));
  ASSIGN_OR_RETURN(SafetensorsFile file,
                   ReadSafetensors(options.model_dir + "/model.safetensors"));
  ASSIGN_OR_RETURN(auto enc, FromTensors(config, file.tensors, options.device));
  enc->model_dir_ = options.model_dir;
  return enc;
}

absl::StatusOr<std::shared_ptr<BertEncoder>> BertEncoder::FromTensors(
    const BertConfig& c, const std::map<std::string, torch::Tensor>& tensors,
    torch::Device device) {
  std::shared_ptr<BertEncoder> e(new BertEncoder());
  e->config_ = c;
  e->device_ = device;
  WeightTable w(tensors);
  const int64_t D = c.hidden_size, I = c.intermediate_size;
  ASSIGN_OR_RETURN(e->word_emb_, w.Get("embeddings.word_embeddings.weight", {c.vocab_size, D}, device));
  ASSIGN_OR_RETURN(e->pos_emb_, w.Get("embeddings.position_embeddings.weight",
                                      {c.max_position_embeddings, D}, device));
  ASSIGN_OR_RETURN(e->type_emb_, w.Get("embeddings.token_type_embeddings.weight",
                                       {c.type_vocab_size, D}, device));
  ASSIGN_OR_RETURN(e->emb_ln_w_, w.Get("embeddings.LayerNorm.weight", {D}, device));
  ASSIGN_OR_RETURN(e->emb_ln_b_, w.Get("embeddings.LayerNorm.bias", {D}, device));
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = absl::StrCat("encoder.layer.", l, ".");
    Layer L;
    torch::Tensor qw, qb, kw, kb, vw, vb;
    ASSIGN_OR_RETURN(qw, w.Get(p + "attention.self.query.weight", {D, D}, device));
    ASSIGN_OR_RETURN(qb, w.Get(p + "attention.self.query.bias", {D}, device));
    ASSIGN_OR_RETURN(kw, w.Get(p + "attention.self.key.weight", {D, D}, device));
    ASSIGN_OR_RETURN(kb, w.Get(p + "attention.self.key.bias", {D}, device));
    ASSIGN_OR_RETURN(vw, w.Get(p + "attention.self.value.weight", {D, D}, device));
    ASSIGN_OR_RETURN(vb, w.Get(p + "attention.self.value.bias", {D}, device));
    L.qkv_w = torch::cat({qw, kw, vw}, 0).contiguous();
    L.qkv_b = torch::cat({qb, kb, vb}, 0).contiguous();
    ASSIGN_OR_RETURN(L.o_w, w.Get(p + "attention.output.dense.weight", {D, D}, device));
    ASSIGN_OR_RETURN(L.o_b, w.Get(p + "attention.output.dense.bias", {D}, device));
    ASSIGN_OR_RETURN(L.ln1_w, w.Get(p + "attention.output.LayerNorm.weight", {D}, device));
    ASSIGN_OR_RETURN(L.ln1_b, w.Get(p + "attention.output.LayerNorm.bias", {D}, device));
    ASSIGN_OR_RETURN(L.up_w, w.Get(p + "intermediate.dense.weight", {I, D}, device));
    ASSIGN_OR_RETURN(L.up_b, w.Get(p + "intermediate.dense.bias", {I}, device));
    ASSIGN_OR_RETURN(L.down_w, w.Get(p + "output.dense.weight", {D, I}, device));
    ASSIGN_OR_RETURN(L.down_b, w.Get(p + "output.dense.bias", {D}, device));
    ASSIGN_OR_RETURN(L.ln2_w, w.Get(p + "output.LayerNorm.weight", {D}, device));
    ASSIGN_OR_RETURN(L.ln2_b, w.Get(p + "output.LayerNorm.bias", {D}, device));
    e->layers_.push_back(std::move(L));
  }
  return e;
}

absl::StatusOr<torch::Tensor> BertEncoder::Forward(const EncoderInput& in,
                                                   EncoderAdapter* adapter,
                                                   const AdapterBatch& batch) const {
  if (!in.input_ids.defined() || in.input_ids.dim() != 2)
    return absl::InvalidArgumentError("input_ids: must be a 2-D [batch, seq] tensor");
  if (in.input_ids.scalar_type() != torch::kInt64)
    return absl::InvalidArgumentError("input_ids: dtype must be int64");
  const int64_t B = in.input_ids.size(0), S = in.input_ids.size(1);
  const int64_t offset = config_.roberta_positions ? config_.pad_token_id + 1 : 0;
  if (S == 0 || B == 0) return absl::InvalidArgumentError("input_ids: empty batch or sequence");
  if (S + offset > config_.max_position_embeddings)
    return absl::InvalidArgumentError(absl::StrCat("input_ids: sequence length ", S,
                                                   " exceeds max_position_embeddings ",
                                                   config_.max_position_embeddings - offset));
  for (const auto& [name, t] : {std::pair<const char*, const torch::Tensor&>{"token_type_ids", in.token_type_ids},
                                {"attention_mask", in.attention_mask}}) {
    if (t.defined() && t.sizes() != in.input_ids.sizes())
      return absl::InvalidArgumentError(absl::StrCat(name, ": shape ", c10::str(t.sizes()),
                                                     " differs from input_ids ",
                                                     c10::str(in.input_ids.sizes())));
  }
  {
    auto mn = in.input_ids.min().item<int64_t>(), mx = in.input_ids.max().item<int64_t>();
    if (mn < 0 || mx >= config_.vocab_size)
      return absl::InvalidArgumentError(absl::StrCat("input_ids: id ", mn < 0 ? mn : mx,
                                                     " outside vocabulary [0, ",
                                                     config_.vocab_size, ")"));
  }
  if (in.token_type_ids.defined() && in.token_type_ids.numel() > 0) {
    auto mx = in.token_type_ids.max().item<int64_t>(), mn = in.token_type_ids.min().item<int64_t>();
    if (mn < 0 || mx >= config_.type_vocab_size)
      return absl::InvalidArgumentError(absl::StrCat("token_type_ids: value outside [0, ",
                                                     config_.type_vocab_size, ")"));
  }
  if (batch.task_index.defined() &&
      (batch.task_index.dim() != 1 || batch.task_index.size(0) != B))
    return absl::InvalidArgumentError(
        absl::StrCat("task_index: must be [", B, "], got ", c10::str(batch.task_index.sizes())));
  torch::Tensor out;
  RETURN_IF_ERROR(TorchTry("encoder forward", [&] { out = ForwardUnchecked(in, adapter, batch); }));
  return out;
}

torch::Tensor BertEncoder::ForwardUnchecked(const EncoderInput& in, EncoderAdapter* adapter,
                                            const AdapterBatch& batch) const {
  const auto& c = config_;
  const int64_t B = in.input_ids.size(0), S = in.input_ids.size(1), D = c.hidden_size;
  const int64_t H = c.num_attention_heads, Dh = c.head_dim();
  torch::Tensor ids = in.input_ids.to(device_);
  torch::Tensor mask = in.attention_mask.defined() ? in.attention_mask.to(device_)
                                                   : torch::ones_like(ids);
  torch::Tensor types = in.token_type_ids.defined() ? in.token_type_ids.to(device_)
                                                    : torch::zeros_like(ids);
  torch::Tensor pos;
  if (c.roberta_positions) {
    // HF create_position_ids_from_input_ids: cumsum over non-pad tokens.
    torch::Tensor nonpad = ids.ne(c.pad_token_id).to(torch::kInt64);
    pos = torch::cumsum(nonpad, 1) * nonpad + c.pad_token_id;
  } else {
    pos = torch::arange(S, torch::TensorOptions().dtype(torch::kInt64).device(device_))
              .unsqueeze(0)
              .expand({B, S});
  }
  torch::Tensor x = F::embedding(ids, word_emb_) + F::embedding(pos, pos_emb_) +
                    F::embedding(types, type_emb_);
  x = torch::layer_norm(x, {D}, emb_ln_w_, emb_ln_b_, c.layer_norm_eps);

  // Boolean mask broadcast over heads and queries: true = attend.
  torch::Tensor attn_mask = mask.to(torch::kBool).view({B, 1, 1, S});
  const auto& groups = ProjectionGroups();  // {Q, K, V}, {O}, {FFN up}, {FFN down}
  for (int64_t l = 0; l < static_cast<int64_t>(layers_.size()); ++l) {
    const Layer& L = layers_[l];
    const int li = static_cast<int>(l);
    torch::Tensor qkv = torch::linear(x, L.qkv_w, L.qkv_b);  // [B, S, 3D]
    if (adapter != nullptr) adapter->AddDeltas(li, x, groups[0], batch, qkv);
    auto parts = qkv.split(D, -1);
    auto heads = [&](const torch::Tensor& t) { return t.view({B, S, H, Dh}).transpose(1, 2); };
    torch::Tensor ctx =
        at::scaled_dot_product_attention(heads(parts[0]), heads(parts[1]), heads(parts[2]), attn_mask);
    ctx = ctx.transpose(1, 2).reshape({B, S, D});
    torch::Tensor o = torch::linear(ctx, L.o_w, L.o_b);
    if (adapter != nullptr) adapter->AddDeltas(li, ctx, groups[1], batch, o);
    torch::Tensor x1 = torch::layer_norm(o + x, {D}, L.ln1_w, L.ln1_b, c.layer_norm_eps);
    torch::Tensor u = torch::linear(x1, L.up_w, L.up_b);
    if (adapter != nullptr) adapter->AddDeltas(li, x1, groups[2], batch, u);
    u = Activate(u, c.hidden_act);
    torch::Tensor dn = torch::linear(u, L.down_w, L.down_b);
    if (adapter != nullptr) adapter->AddDeltas(li, u, groups[3], batch, dn);
    x = torch::layer_norm(dn + x1, {D}, L.ln2_w, L.ln2_b, c.layer_norm_eps);
  }
  return x;
}

torch::Tensor Pool(const torch::Tensor& hidden, const torch::Tensor& attention_mask,
                   Pooling pooling) {
  if (pooling == Pooling::kCls) return hidden.select(1, 0);
  torch::Tensor m = attention_mask.to(hidden.device(), hidden.scalar_type()).unsqueeze(-1);
  return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9);
}

}  // namespace metatt
