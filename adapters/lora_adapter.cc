#include "adapters/lora_adapter.h"

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <nlohmann/json.hpp>
#include <set>

#include "adapters/adapted_layers.h"
#include "adapters/named_parameters.h"
#include "adapters/peft_modules.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "base/safetensors.h"
#include "base/status_macros.h"

namespace metatt {
namespace {

absl::Status Bad(const std::string& field, const std::string& why) {
  return absl::InvalidArgumentError(absl::StrCat("lora config: field '", field, "' ", why));
}

}  // namespace

double LoraConfig::Scale() const {
  return use_rslora ? alpha / std::sqrt(static_cast<double>(rank))
                    : alpha / static_cast<double>(rank);
}

std::vector<int> LoraConfig::AdaptedLayers() const { return LayersOrAll(layers, num_layers); }

ModelGeometry LoraConfig::Geometry() const {
  if (model.has_value()) return *model;
  return ModelGeometry::Bert(num_layers, hidden_size, hidden_size, intermediate_size, 0);
}

void LoraConfig::SetModel(const ModelGeometry& g) {
  model = g;
  num_layers = g.num_layers;
  hidden_size = intermediate_size = 0;
  for (int i = 0; i < kNumProjections; ++i) {
    const ProjectionGeometry& p = g.projection[i];
    if (p.in_width <= 0) continue;
    if (p.in_port == ModelGeometry::kHiddenPort) hidden_size = p.in_width;
    if (p.out_port == ModelGeometry::kFfnPort) intermediate_size = p.out_width;
  }
}

std::pair<int64_t, int64_t> LoraConfig::Dims(Projection p) const {
  if (model.has_value()) return {model->of(p).in_width, model->of(p).out_width};
  if (p == Projection::kFfnUp) return {hidden_size, intermediate_size};
  if (p == Projection::kFfnDown) return {intermediate_size, hidden_size};
  return {hidden_size, hidden_size};
}

int64_t LoraConfig::ParameterCount() const {
  int64_t n = 0;
  for (Projection p : projections) {
    auto [din, dout] = Dims(p);
    n += (din + dout) * rank;
  }
  return n * static_cast<int64_t>(AdaptedLayers().size());
}

absl::Status LoraConfig::Validate() const {
  if (rank < 1) return Bad("rank", "must be >= 1");
  if (!(alpha > 0) || !std::isfinite(alpha)) return Bad("alpha", "must be positive");
  if (num_layers <= 0) return Bad("num_layers", "must be positive");
  if (hidden_size <= 0) return Bad("hidden_size", "must be positive");
  if (projections.empty()) return Bad("projections", "is empty");
  std::set<Projection> seen;
  for (Projection p : projections) {
    if (!seen.insert(p).second)
      return Bad("projections", absl::StrCat("repeats '", ProjectionName(p), "'"));
    if ((p == Projection::kFfnUp || p == Projection::kFfnDown) && intermediate_size <= 0)
      return Bad("intermediate_size", "must be positive when FFN projections are adapted");
    if (!model.has_value() && p == Projection::kGate)
      return Bad("projections", "'gate' needs a model geometry with a gate projection (llama)");
    if (model.has_value() && !model->Has(p))
      return Bad("projections", absl::StrCat("'", ProjectionName(p),
                                             "' is not a projection of the model (",
                                             model->family, ")"));
  }
  if (const auto [field, why] = CheckConfigModel(model, num_layers); !field.empty()) {
    return Bad(field, why);
  }
  std::set<int> seen_l;
  for (int l : layers) {
    if (l < 0 || l >= num_layers)
      return Bad("layers", absl::StrCat("index ", l, " outside [0, ", num_layers, ")"));
    if (!seen_l.insert(l).second) return Bad("layers", absl::StrCat("repeats ", l));
  }
  if (init != "peft" && init != "random") return Bad("init", "must be 'peft' or 'random'");
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<LoraAdapter>> LoraAdapter::Create(const LoraConfig& config,
                                                                 const Options& options) {
  RETURN_IF_ERROR(config.Validate());
  std::map<Key, Factors> f;
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(options.seed);
  auto cpu = torch::TensorOptions().dtype(options.dtype);
  RETURN_IF_ERROR(TorchTry("lora init", [&] {
    for (int l : config.AdaptedLayers()) {
      for (Projection p : config.projections) {
        auto [din, dout] = config.Dims(p);
        const double bound = 1.0 / std::sqrt(static_cast<double>(din));
        Factors fac;
        fac.a = (torch::rand({config.rank, din}, gen, cpu) * 2 - 1) * bound;
        fac.b = config.init == "random"
                    ? (torch::rand({dout, config.rank}, gen, cpu) * 2 - 1) * bound
                    : torch::zeros({dout, config.rank}, cpu);
        fac.a = fac.a.to(options.device);
        fac.b = fac.b.to(options.device);
        f[{l, p}] = fac;
      }
    }
  }));
  return FromFactors(config, std::move(f));
}

absl::StatusOr<std::unique_ptr<LoraAdapter>> LoraAdapter::FromFactors(
    const LoraConfig& config, std::map<Key, Factors> factors) {
  RETURN_IF_ERROR(config.Validate());
  std::unique_ptr<LoraAdapter> a(new LoraAdapter());
  a->config_ = config;
  a->geometry_ = config.Geometry();
  a->scale_ = config.Scale();
  for (int l : config.AdaptedLayers()) {
    for (Projection p : config.projections) {
      auto it = factors.find({l, p});
      const std::string name = absl::StrCat("layer.", l, ".", ProjectionName(p));
      if (it == factors.end())
        return absl::InvalidArgumentError(absl::StrCat("lora: factors for ", name, " are missing"));
      auto [din, dout] = config.Dims(p);
      const Factors& f = it->second;
      if (!f.a.defined() || f.a.sizes().vec() != std::vector<int64_t>{config.rank, din})
        return absl::InvalidArgumentError(
            absl::StrCat("lora: ", name, ".lora_A has shape ",
                         f.a.defined() ? c10::str(f.a.sizes()) : std::string("undefined"),
                         ", expected [", config.rank, ", ", din, "]"));
      if (!f.b.defined() || f.b.sizes().vec() != std::vector<int64_t>{dout, config.rank})
        return absl::InvalidArgumentError(
            absl::StrCat("lora: ", name, ".lora_B has shape ",
                         f.b.defined() ? c10::str(f.b.sizes()) : std::string("undefined"),
                         ", expected [", dout, ", ", config.rank, "]"));
      Factors g;
      g.a = f.a.detach().clone().contiguous().set_requires_grad(true);
      g.b = f.b.detach().clone().contiguous().set_requires_grad(true);
      a->factors_[{l, p}] = g;
    }
  }
  return a;
}

std::vector<torch::Tensor> LoraAdapter::Deltas(int layer, const torch::Tensor& x,
                                               const std::vector<Projection>& projections,
                                               const AdapterBatch& /*batch*/) {
  std::vector<torch::Tensor> out(projections.size());
  std::vector<size_t> idx;
  std::vector<const Factors*> fs;
  for (size_t i = 0; i < projections.size(); ++i) {
    auto it = factors_.find({layer, projections[i]});
    if (it == factors_.end()) continue;
    idx.push_back(i);
    fs.push_back(&it->second);
  }
  if (fs.empty()) return out;
  if (fs.size() == 1) {
    out[idx[0]] = x.matmul(fs[0]->a.t()).mul(scale_).matmul(fs[0]->b.t());
    return out;
  }
  // Projections reading the same input share one x . [A_1; A_2; ...]^T.
  std::vector<torch::Tensor> as;
  for (const Factors* f : fs) as.push_back(f->a);
  torch::Tensor u = x.matmul(torch::cat(as, 0).t()).mul(scale_);  // [B, S, sum r]
  auto parts = u.split(config_.rank, -1);
  for (size_t j = 0; j < fs.size(); ++j) out[idx[j]] = parts[j].matmul(fs[j]->b.t());
  return out;
}

void LoraAdapter::AddDeltas(int layer, const torch::Tensor& x,
                            const std::vector<Projection>& projections, const AdapterBatch& batch,
                            torch::Tensor& out) {
  const int g = geometry_.GroupOf(projections);
  if (torch::GradMode::is_enabled() || g < 0 || out.size(-1) != geometry_.GroupWidth(g)) {
    EncoderAdapter::AddDeltas(layer, x, projections, batch, out);
    return;
  }
  const int64_t n = static_cast<int64_t>(projections.size());
  std::vector<std::pair<int64_t, const Factors*>> fs;  // (block, factors)
  int64_t version = 0;
  for (int64_t i = 0; i < n; ++i) {
    auto it = factors_.find({layer, projections[i]});
    if (it == factors_.end()) continue;
    fs.emplace_back(i, &it->second);
    version += it->second.a._version() + it->second.b._version();
  }
  if (fs.empty()) return;
  Fused& f = fused_[{layer, g}];
  if (f.version != version || !f.b.defined() || f.b.size(1) != out.size(-1)) {
    std::vector<torch::Tensor> as;
    for (const auto& [i, fac] : fs) as.push_back(fac->a);
    f.a_t = torch::cat(as, 0).t().mul(scale_).contiguous();
    f.b = torch::zeros({f.a_t.size(1), out.size(-1)}, f.a_t.options());
    int64_t row = 0;
    for (const auto& [i, fac] : fs) {
      const int64_t r = fac->a.size(0);
      const Projection p = projections[i];
      f.b.narrow(0, row, r)
          .narrow(1, geometry_.OffsetInGroup(p), geometry_.of(p).out_width)
          .copy_(fac->b.t());
      row += r;
    }
    f.version = version;
  }
  const int64_t B = x.size(0), S = x.size(1);
  torch::Tensor u = x.reshape({B * S, x.size(2)}).matmul(f.a_t);  // [B*S, sum r]
  out.view({B * S, out.size(-1)}).addmm_(u, f.b);
}

std::vector<std::pair<std::string, torch::Tensor>> LoraAdapter::NamedParameters() const {
  std::vector<std::pair<std::string, torch::Tensor>> p;
  for (const auto& [k, f] : factors_) {
    const std::string n = absl::StrCat("layer.", k.first, ".", ProjectionName(k.second));
    p.emplace_back(n + ".lora_A", f.a);
    p.emplace_back(n + ".lora_B", f.b);
  }
  return p;
}

std::vector<torch::Tensor> LoraAdapter::TrainableParameters() const {
  return RequiringGrad(NamedParameters());
}

int64_t LoraAdapter::NumParameters() const { return TotalNumel(NamedParameters()); }

absl::StatusOr<torch::Tensor> LoraAdapter::DenseDelta(int layer, Projection projection) const {
  auto it = factors_.find({layer, projection});
  if (it == factors_.end())
    return absl::InvalidArgumentError(absl::StrCat("lora: layer ", layer, " projection ",
                                                   ProjectionName(projection), " not adapted"));
  return it->second.a.t().matmul(it->second.b.t()) * scale_;
}

namespace {

// ".../encoder.layer.<n>.<module>.lora_{A,B}.weight" -> (n, projection, is_a).
absl::Status ParsePeftKey(const std::string& key, int* layer, Projection* proj, bool* is_a) {
  auto bad = [&](const std::string& why) {
    return absl::UnimplementedError(
        absl::StrCat("peft adapter: tensor '", key, "' is not supported: ", why));
  };
  std::string rest;
  if (absl::EndsWith(key, ".lora_A.weight")) {
    *is_a = true;
    rest = key.substr(0, key.size() - std::string(".lora_A.weight").size());
  } else if (absl::EndsWith(key, ".lora_B.weight")) {
    *is_a = false;
    rest = key.substr(0, key.size() - std::string(".lora_B.weight").size());
  } else {
    return bad("only lora_A/lora_B weights are understood");
  }
  // Encoders: "...encoder.layer.<n>.<module>"; Llama decoders:
  // "...model.layers.<n>.<module>".
  std::string marker = "encoder.layer.";
  auto pos = rest.find(marker);
  if (pos == std::string::npos) {
    marker = "layers.";
    pos = rest.find(marker);
    if (pos != std::string::npos && pos > 0 && rest[pos - 1] != '.') pos = std::string::npos;
  }
  if (pos == std::string::npos) return bad("no 'encoder.layer.<n>.' or 'layers.<n>.' in the name");
  rest = rest.substr(pos + marker.size());
  auto dot = rest.find('.');
  if (dot == std::string::npos || !absl::SimpleAtoi(rest.substr(0, dot), layer) || *layer < 0)
    return bad("bad layer index");
  const std::string module = rest.substr(dot + 1);
  const std::optional<Projection> p = PeftModuleProjection(module);
  if (!p) return bad(absl::StrCat("unknown module '", module, "'"));
  *proj = *p;
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<LoraAdapter>> LoadPeftAdapter(const std::string& dir,
                                                             const LoadPeftOptions& options) {
  const std::string cfg_path = dir + "/adapter_config.json";
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(cfg_path));
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object())
    return absl::InvalidArgumentError(absl::StrCat(cfg_path, ": not a JSON object"));
  auto field_bad = [&](const std::string& f, const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat(cfg_path, ": field '", f, "' ", why));
  };
  LoraConfig c;
  if (!j.contains("r") || !j["r"].is_number_integer()) return field_bad("r", "must be an integer");
  c.rank = j["r"].get<int64_t>();
  if (!j.contains("lora_alpha") || !j["lora_alpha"].is_number())
    return field_bad("lora_alpha", "must be a number");
  c.alpha = j["lora_alpha"].get<double>();
  if (j.contains("use_rslora") && j["use_rslora"].is_boolean())
    c.use_rslora = j["use_rslora"].get<bool>();
  if (j.contains("fan_in_fan_out") && j["fan_in_fan_out"].is_boolean() &&
      j["fan_in_fan_out"].get<bool>())
    return field_bad("fan_in_fan_out", "must be false (BERT uses nn.Linear)");
  if (j.contains("bias") && j["bias"].is_string() && j["bias"].get<std::string>() != "none")
    return field_bad("bias", "must be \"none\"");
  if (j.contains("use_dora") && j["use_dora"].is_boolean() && j["use_dora"].get<bool>())
    return field_bad("use_dora", "DoRA is not supported");
  for (const char* f : {"rank_pattern", "alpha_pattern"})
    if (j.contains(f) && j[f].is_object() && !j[f].empty())
      return field_bad(f, "per-module patterns are not supported");

  const std::string st_path = dir + "/adapter_model.safetensors";
  ASSIGN_OR_RETURN(SafetensorsFile file, ReadSafetensors(st_path));
  std::map<LoraAdapter::Key, LoraAdapter::Factors> factors;
  std::set<int> layers;
  std::set<Projection> projs;
  for (const auto& [key, t] : file.tensors) {
    int l = 0;
    Projection p = Projection::kQuery;
    bool is_a = false;
    RETURN_IF_ERROR(ParsePeftKey(key, &l, &p, &is_a));
    if (!t.is_floating_point() || t.dim() != 2)
      return absl::InvalidArgumentError(
          absl::StrCat(st_path, ": tensor '", key, "' must be a 2-D floating tensor"));
    layers.insert(l);
    projs.insert(p);
    auto& f = factors[{l, p}];
    (is_a ? f.a : f.b) = t.to(options.device, options.dtype);
  }
  if (factors.empty())
    return absl::InvalidArgumentError(absl::StrCat(st_path, ": no LoRA tensors"));
  c.projections.assign(projs.begin(), projs.end());
  c.layers.assign(layers.begin(), layers.end());
  if (options.model.has_value()) {
    // The model's geometry gives every width; FromFactors checks the shapes.
    c.SetModel(*options.model);
    for (const auto& [k, f] : factors)
      if (!f.a.defined() || !f.b.defined())
        return absl::InvalidArgumentError(absl::StrCat(st_path, ": layer ", k.first, " ",
                                                       ProjectionName(k.second),
                                                       " lacks lora_A or lora_B"));
    return LoraAdapter::FromFactors(c, std::move(factors));
  }
  if (projs.count(Projection::kGate))
    return absl::InvalidArgumentError(absl::StrCat(
        st_path, ": a decoder adapter (gate_proj) needs the base model's geometry"));
  c.num_layers = options.num_layers > 0 ? options.num_layers : *layers.rbegin() + 1;
  for (const auto& [k, f] : factors) {
    if (!f.a.defined() || !f.b.defined())
      return absl::InvalidArgumentError(absl::StrCat(
          st_path, ": layer ", k.first, " ", ProjectionName(k.second), " lacks lora_A or lora_B"));
    if (k.second == Projection::kFfnUp) c.intermediate_size = f.b.size(0);
    if (k.second == Projection::kFfnDown) c.intermediate_size = f.a.size(1);
    if (k.second != Projection::kFfnDown)
      c.hidden_size = f.a.size(1);
    else
      c.hidden_size = f.b.size(0);
  }
  if (options.hidden_size > 0 && options.hidden_size != c.hidden_size)
    return absl::FailedPreconditionError(absl::StrCat(st_path, ": adapter hidden size ",
                                                      c.hidden_size, " != base model's ",
                                                      options.hidden_size));
  return LoraAdapter::FromFactors(c, std::move(factors));
}

}  // namespace metatt
