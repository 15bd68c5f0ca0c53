#include "adapters/metatt_config.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <map>
#include <set>

#include "adapters/adapted_layers.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "adapters/tensor_train.h"
#include "base/enum_names.h"
#include "base/status_macros.h"

namespace metatt {
namespace {

absl::Status Bad(const std::string& field, const std::string& why) {
  return absl::InvalidArgumentError(absl::StrCat("metatt config: field '", field, "' ", why));
}

absl::StatusOr<CoreInit> ParseOneInit(const std::string& code) {
  CoreInit c;
  if (code == "ze" || code == "zeros") {
    c.kind = CoreInit::Kind::kZeros;
    return c;
  }
  if (code == "id" || code == "identity") {
    c.kind = CoreInit::Kind::kIdentity;
    return c;
  }
  if (code == "or" || code == "orthogonal") {
    c.kind = CoreInit::Kind::kOrthogonal;
    return c;
  }
  if (code == "no") {
    c.kind = CoreInit::Kind::kNormal;
    c.std = 0.2;
    return c;
  }
  absl::string_view s = code;
  if (absl::ConsumePrefix(&s, "normal(") && absl::ConsumeSuffix(&s, ")")) {
    double v = 0;
    if (absl::SimpleAtod(s, &v) && v >= 0 && std::isfinite(v)) {
      c.kind = CoreInit::Kind::kNormal;
      c.std = v;
      return c;
    }
  }
  return Bad("init", absl::StrCat("has unknown core init '", code,
                                  "' (use ze|zeros, id|identity, or|orthogonal, no, normal(STD))"));
}

// The forms' names; "(4+1)d" and "4plus1d" are aliases of 4+1d.
constexpr EnumName<TTForm> kTTForms[] = {{TTForm::k4D, "4d"},
                                         {TTForm::k5D, "5d"},
                                         {TTForm::k4Plus1D, "4+1d"},
                                         {TTForm::k4Plus1D, "(4+1)d"},
                                         {TTForm::k4Plus1D, "4plus1d"}};

}  // namespace

const char* TTFormName(TTForm form) { return NameOf(kTTForms, form, "?"); }

absl::StatusOr<TTForm> ParseTTForm(const std::string& name) {
  if (auto form = ValueOfIgnoringCase(kTTForms, name)) return *form;
  return Bad("form", absl::StrCat("'", name, "' is not one of 4d, 5d, 4+1d"));
}

absl::StatusOr<Projection> ParseProjection(const std::string& name) {
  if (name == "q" || name == "query" || name == "q_proj") return Projection::kQuery;
  if (name == "k" || name == "key" || name == "k_proj") return Projection::kKey;
  if (name == "v" || name == "value" || name == "v_proj") return Projection::kValue;
  if (name == "o" || name == "attn_output" || name == "o_proj") return Projection::kAttnOutput;
  if (name == "ffn_up" || name == "up_proj") return Projection::kFfnUp;
  if (name == "ffn_down" || name == "down_proj") return Projection::kFfnDown;
  if (name == "gate" || name == "gate_proj") return Projection::kGate;
  return Bad("projections",
             absl::StrCat("'", name, "' is not one of q, k, v, o, ffn_up, ffn_down, gate"));
}

ModelGeometry MetaTTConfig::Geometry() const {
  if (model.has_value()) return *model;
  return ModelGeometry::Bert(num_layers, d_in, d_out, d_ffn, num_heads);
}

void MetaTTConfig::SetModel(const ModelGeometry& g) {
  model = g;
  num_layers = g.num_layers;
  d_in = d_out = 0;
  d_ffn = 0;
  for (int i = 0; i < kNumProjections; ++i) {
    const ProjectionGeometry& p = g.projection[i];
    if (p.in_width <= 0) continue;
    if (p.in_port == ModelGeometry::kHiddenPort) d_in = p.in_width;
    if (p.out_port == ModelGeometry::kHiddenPort) d_out = p.out_width;
    if (p.out_port == ModelGeometry::kFfnPort) d_ffn = p.out_width;
  }
}

namespace {

nlohmann::json GeometryToJson(const ModelGeometry& g) {
  nlohmann::json j;
  j["family"] = g.family;
  j["num_layers"] = g.num_layers;
  j["num_heads"] = g.num_heads;
  nlohmann::json groups = nlohmann::json::array();
  for (const auto& group : g.groups) {
    std::vector<std::string> names;
    for (Projection p : group) names.push_back(ProjectionName(p));
    groups.push_back(names);
  }
  j["groups"] = groups;
  nlohmann::json proj = nlohmann::json::object();
  for (int i = 0; i < kNumProjections; ++i) {
    const ProjectionGeometry& p = g.projection[i];
    if (p.in_width <= 0) continue;
    proj[ProjectionName(static_cast<Projection>(i))] = {
        {"in", p.in_width}, {"out", p.out_width}, {"in_port", p.in_port},
        {"out_port", p.out_port}};
  }
  j["projections"] = proj;
  return j;
}

absl::StatusOr<ModelGeometry> GeometryFromJson(const nlohmann::json& j) {
  if (!j.is_object()) return Bad("model", "must be an object");
  ModelGeometry g;
  if (!j.contains("family") || !j["family"].is_string())
    return Bad("model.family", "must be a string");
  g.family = j["family"].get<std::string>();
  for (const char* f : {"num_layers", "num_heads"}) {
    if (!j.contains(f) || !j[f].is_number_integer())
      return Bad(absl::StrCat("model.", f), "must be an integer");
  }
  g.num_layers = j["num_layers"].get<int64_t>();
  g.num_heads = j["num_heads"].get<int64_t>();
  if (!j.contains("groups") || !j["groups"].is_array())
    return Bad("model.groups", "must be a list of lists of projection names");
  for (const auto& group : j["groups"]) {
    if (!group.is_array()) return Bad("model.groups", "entries must be lists");
    std::vector<Projection> ps;
    for (const auto& n : group) {
      if (!n.is_string()) return Bad("model.groups", "names must be strings");
      ASSIGN_OR_RETURN(Projection p, ParseProjection(n.get<std::string>()));
      ps.push_back(p);
    }
    g.groups.push_back(ps);
  }
  if (!j.contains("projections") || !j["projections"].is_object())
    return Bad("model.projections", "must be an object");
  constexpr int64_t kMaxWidth = int64_t{1} << 20;
  for (const auto& [name, v] : j["projections"].items()) {
    ASSIGN_OR_RETURN(Projection p, ParseProjection(name));
    ProjectionGeometry& pg = g.projection[static_cast<int>(p)];
    for (const char* f : {"in", "out", "in_port", "out_port"})
      if (!v.is_object() || !v.contains(f) || !v[f].is_number_integer())
        return Bad(absl::StrCat("model.projections.", name, ".", f), "must be an integer");
    pg.in_width = v["in"].get<int64_t>();
    pg.out_width = v["out"].get<int64_t>();
    const int64_t ip = v["in_port"].get<int64_t>(), op = v["out_port"].get<int64_t>();
    if (pg.in_width < 1 || pg.in_width > kMaxWidth || pg.out_width < 1 ||
        pg.out_width > kMaxWidth)
      return Bad(absl::StrCat("model.projections.", name), "has a width outside [1, 2^20]");
    if (ip < 0 || ip > 64 || op < 0 || op > 64)
      return Bad(absl::StrCat("model.projections.", name), "has a port outside [0, 64]");
    pg.in_port = static_cast<int>(ip);
    pg.out_port = static_cast<int>(op);
  }
  return g;
}

}  // namespace

std::string CoreInit::ToString() const {
  switch (kind) {
    case Kind::kZeros:
      return "zeros";
    case Kind::kIdentity:
      return "identity";
    case Kind::kNormal:
      return absl::StrCat("normal(", std, ")");
    case Kind::kOrthogonal:
      return "orthogonal";
  }
  return "?";
}

absl::StatusOr<std::vector<CoreInit>> ParseInitSpec(const std::string& spec, int num_cores) {
  if (spec.empty()) return Bad("init", "is empty");
  std::vector<std::string> codes = absl::StrSplit(spec, '-');
  if (static_cast<int>(codes.size()) > num_cores)
    return Bad("init", absl::StrCat("'", spec, "' names ", codes.size(), " cores but the form has ",
                                    num_cores));
  std::vector<CoreInit> out;
  for (const auto& c : codes) {
    ASSIGN_OR_RETURN(CoreInit ci, ParseOneInit(c));
    out.push_back(ci);
  }
  while (static_cast<int>(out.size()) < num_cores) out.push_back(out.back());
  return out;
}

MetaTTConfig::Layout MetaTTConfig::BoundaryLayout() const {
  // One block per port in use on each side, in port order (for an encoder:
  // the hidden block first, then the FFN block).
  Layout lay;
  const ModelGeometry g = Geometry();
  std::map<int, int64_t> in_ports, out_ports;  // port -> width
  for (Projection p : projections) {
    const ProjectionGeometry& pg = g.of(p);
    if (pg.in_width <= 0) continue;  // Validate() refuses it
    in_ports[pg.in_port] = pg.in_width;
    out_ports[pg.out_port] = pg.out_width;
  }
  std::map<int, int64_t> in_off, out_off;
  for (const auto& [port, width] : in_ports) {
    in_off[port] = lay.in_rows;
    lay.in_blocks.push_back({lay.in_rows, width});
    lay.in_rows += width;
  }
  for (const auto& [port, width] : out_ports) {
    out_off[port] = lay.out_cols;
    lay.out_blocks.push_back({lay.out_cols, width});
    lay.out_cols += width;
  }
  for (int i = 0; i < kNumProjections; ++i) {
    const ProjectionGeometry& pg = g.projection[i];
    auto ii = in_off.find(pg.in_port);
    auto oi = out_off.find(pg.out_port);
    lay.in_offset[i] = ii == in_off.end() ? 0 : ii->second;
    lay.in_width[i] = pg.in_width;
    lay.out_offset[i] = oi == out_off.end() ? 0 : oi->second;
    lay.out_width[i] = pg.out_width;
  }
  return lay;
}

int MetaTTConfig::NumCores() const { return form == TTForm::k4D ? 4 : 5; }

std::vector<int64_t> MetaTTConfig::BondRanks() const {
  if (ranks.size() == 1) return std::vector<int64_t>(NumBonds(), ranks[0]);
  return ranks;
}

double MetaTTConfig::Alpha() const {
  auto r = BondRanks();
  return alpha.has_value() ? *alpha : static_cast<double>(r.empty() ? 1 : r[0]);
}

double MetaTTConfig::Scale() const {
  auto r = BondRanks();
  return Alpha() / static_cast<double>(r.empty() ? 1 : r[0]);
}

std::vector<int> MetaTTConfig::AdaptedLayers() const { return LayersOrAll(layers, num_layers); }

int64_t MetaTTConfig::ParameterCount() const {
  TTShape s;
  s.form = form;
  const Layout lay = BoundaryLayout();
  s.d_in = lay.in_rows;
  s.d_out = lay.out_cols;
  s.num_layers = static_cast<int64_t>(AdaptedLayers().size());
  s.num_projections = static_cast<int64_t>(projections.size());
  s.num_heads = num_heads;
  s.num_tasks = num_tasks;
  s.ranks = BondRanks();
  return MetaTTParameterCount(s);
}

absl::Status MetaTTConfig::Validate() const {
  if (ranks.empty()) return Bad("ranks", "is empty");
  if (ranks.size() != 1 && static_cast<int>(ranks.size()) != NumBonds())
    return Bad("ranks", absl::StrCat("has ", ranks.size(), " entries; form ", TTFormName(form),
                                     " has ", NumBonds(), " bonds (or give one rank)"));
  // Upper bounds keep a crafted family.json from allocating without limit or
  // overflowing the parameter count (fuzz finding metatt_config_unbounded).
  constexpr int64_t kMaxRank = 4096, kMaxWidth = int64_t{1} << 20, kMaxLayers = 4096;
  constexpr int64_t kMaxTasks = int64_t{1} << 24;
  for (int64_t r : ranks) {
    if (r < 1) return Bad("ranks", absl::StrCat("entry ", r, " must be >= 1"));
    if (r > kMaxRank) return Bad("ranks", absl::StrCat("entry ", r, " exceeds ", kMaxRank));
  }
  if (d_in <= 0 || d_in > kMaxWidth) return Bad("d_in", absl::StrCat("must be in [1, ", kMaxWidth, "]"));
  if (d_out <= 0 || d_out > kMaxWidth)
    return Bad("d_out", absl::StrCat("must be in [1, ", kMaxWidth, "]"));
  if (d_ffn < 0 || d_ffn > kMaxWidth) return Bad("d_ffn", absl::StrCat("must be in [0, ", kMaxWidth, "]"));
  if (num_layers <= 0 || num_layers > kMaxLayers)
    return Bad("num_layers", absl::StrCat("must be in [1, ", kMaxLayers, "]"));
  if (num_tasks > kMaxTasks) return Bad("num_tasks", absl::StrCat("exceeds ", kMaxTasks));
  if (num_heads < 0 || num_heads > d_out) return Bad("num_heads", "must be in [0, d_out]");
  if (projections.empty()) return Bad("projections", "is empty");
  std::set<Projection> seen;
  const ModelGeometry geo = Geometry();
  if (const auto [field, why] = CheckConfigModel(model, num_layers); !field.empty()) {
    return Bad(field, why);
  }
  for (Projection p : projections) {
    if (!model.has_value() && p == Projection::kGate)
      return Bad("projections", "'gate' needs a model geometry with a gate projection (llama)");
    if (p == Projection::kFfnUp || p == Projection::kFfnDown || p == Projection::kGate) {
      if (form == TTForm::k5D)
        return Bad("projections", "ffn projections are not supported with form 5d");
      if (!model.has_value()) {
        if (d_ffn <= 0) return Bad("d_ffn", "must be positive when ffn projections are adapted");
        if (d_in != d_out)
          return Bad("d_out", "must equal d_in when ffn projections are adapted");
      }
    }
    if (model.has_value()) {
      if (!geo.Has(p))
        return Bad("projections", absl::StrCat("'", ProjectionName(p), "' is not a projection of ",
                                               "the model (", geo.family, ")"));
      if (form == TTForm::k5D && geo.of(p).out_width != d_out)
        return Bad("projections",
                   absl::StrCat("'", ProjectionName(p), "' has output width ", geo.of(p).out_width,
                                "; form 5d needs every adapted projection at d_out (", d_out,
                                ") (grouped-query k/v are narrower)"));
    }
    if (!seen.insert(p).second)
      return Bad("projections", absl::StrCat("repeats '", ProjectionName(p), "'"));
  }
  std::set<int> seen_layers;
  for (int l : layers) {
    if (l < 0 || l >= num_layers)
      return Bad("layers", absl::StrCat("index ", l, " outside [0, ", num_layers, ")"));
    if (!seen_layers.insert(l).second) return Bad("layers", absl::StrCat("repeats ", l));
  }
  if (alpha.has_value() && !(*alpha > 0 && std::isfinite(*alpha)))
    return Bad("alpha", "must be a positive finite number");
  if (num_tasks < 1) return Bad("num_tasks", "must be >= 1");
  if (form != TTForm::k4Plus1D && num_tasks != 1)
    return Bad("num_tasks", absl::StrCat("must be 1 for form ", TTFormName(form),
                                         " (use 4+1d for several tasks)"));
  if (form == TTForm::k5D) {
    if (num_heads <= 0) return Bad("num_heads", "must be positive for form 5d");
    if (d_out % num_heads != 0)
      return Bad("num_heads", absl::StrCat("(", num_heads, ") must divide d_out (", d_out, ")"));
  }
  auto init_or = ParseInitSpec(init, NumCores());
  if (!init_or.ok()) return init_or.status();
  return absl::OkStatus();
}

nlohmann::json MetaTTConfig::ToJson() const {
  nlohmann::json j;
  j["form"] = TTFormName(form);
  j["ranks"] = BondRanks();
  std::vector<std::string> p;
  for (Projection x : projections) p.push_back(ProjectionName(x));
  j["projections"] = p;
  j["layers"] = layers;
  if (alpha.has_value())
    j["alpha"] = *alpha;
  else
    j["alpha"] = nullptr;
  j["init"] = init;
  j["num_tasks"] = num_tasks;
  j["d_in"] = d_in;
  j["d_out"] = d_out;
  j["num_layers"] = num_layers;
  j["num_heads"] = num_heads;
  j["d_ffn"] = d_ffn;
  if (model.has_value()) j["model"] = GeometryToJson(*model);
  return j;
}

absl::StatusOr<MetaTTConfig> MetaTTConfig::FromJson(const nlohmann::json& j) {
  if (!j.is_object()) return Bad("<root>", "is not a JSON object");
  MetaTTConfig c;
  auto get_int = [&](const char* f, int64_t* out, bool required) -> absl::Status {
    if (!j.contains(f)) return required ? Bad(f, "is missing") : absl::OkStatus();
    if (!j[f].is_number_integer()) return Bad(f, "must be an integer");
    *out = j[f].get<int64_t>();
    return absl::OkStatus();
  };
  if (j.contains("form")) {
    if (!j["form"].is_string()) return Bad("form", "must be a string");
    ASSIGN_OR_RETURN(c.form, ParseTTForm(j["form"].get<std::string>()));
  }
  if (j.contains("ranks")) {
    const auto& r = j["ranks"];
    c.ranks.clear();
    if (r.is_number_integer()) {
      c.ranks.push_back(r.get<int64_t>());
    } else if (r.is_array()) {
      for (const auto& v : r) {
        if (!v.is_number_integer()) return Bad("ranks", "entries must be integers");
        c.ranks.push_back(v.get<int64_t>());
      }
    } else {
      return Bad("ranks", "must be an integer or a list of integers");
    }
  }
  if (j.contains("rank")) {
    if (!j["rank"].is_number_integer()) return Bad("rank", "must be an integer");
    c.ranks = {j["rank"].get<int64_t>()};
  }
  if (j.contains("projections")) {
    if (!j["projections"].is_array()) return Bad("projections", "must be a list of names");
    c.projections.clear();
    for (const auto& v : j["projections"]) {
      if (!v.is_string()) return Bad("projections", "entries must be strings");
      ASSIGN_OR_RETURN(Projection p, ParseProjection(v.get<std::string>()));
      c.projections.push_back(p);
    }
  }
  if (j.contains("layers")) {
    if (!j["layers"].is_array()) return Bad("layers", "must be a list of integers");
    for (const auto& v : j["layers"]) {
      if (!v.is_number_integer()) return Bad("layers", "entries must be integers");
      c.layers.push_back(v.get<int>());
    }
  }
  if (j.contains("alpha") && !j["alpha"].is_null()) {
    if (!j["alpha"].is_number()) return Bad("alpha", "must be a number or null");
    c.alpha = j["alpha"].get<double>();
  }
  if (j.contains("init")) {
    if (!j["init"].is_string()) return Bad("init", "must be a string");
    c.init = j["init"].get<std::string>();
  }
  RETURN_IF_ERROR(get_int("num_tasks", &c.num_tasks, false));
  RETURN_IF_ERROR(get_int("d_in", &c.d_in, true));
  RETURN_IF_ERROR(get_int("d_out", &c.d_out, true));
  RETURN_IF_ERROR(get_int("num_layers", &c.num_layers, true));
  RETURN_IF_ERROR(get_int("num_heads", &c.num_heads, false));
  RETURN_IF_ERROR(get_int("d_ffn", &c.d_ffn, false));
  if (j.contains("model") && !j["model"].is_null()) {
    ASSIGN_OR_RETURN(ModelGeometry g, GeometryFromJson(j["model"]));
    c.model = g;
  }
  RETURN_IF_ERROR(c.Validate());
  return c;
}

absl::StatusOr<MetaTTConfig> MetaTTConfig::FromJsonString(const std::string& text) {
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Bad("<root>", "is not valid JSON");
  return FromJson(j);
}

}  // namespace metatt
