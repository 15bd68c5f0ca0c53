#include "server/training/adapter_config.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/status_macros.h"

namespace metatt {
namespace {

absl::Status Prefixed(const absl::Status& st, const std::string& field) {
  if (st.ok()) return st;
  return absl::Status(st.code(), absl::StrCat(field, ": ", st.message()));
}

absl::StatusOr<std::vector<Projection>> Projections(const std::vector<std::string>& names) {
  std::vector<Projection> out;
  for (size_t i = 0; i < names.size(); ++i) {
    auto p = ParseProjection(names[i]);
    if (!p.ok()) return Prefixed(p.status(), absl::StrCat("adapter.projections[", i, "]"));
    out.push_back(*p);
  }
  return out;
}

const ProjectionGeometry& Geometry(const ModelGeometry& g, Projection p) {
  return g.projection[static_cast<int>(p)];
}

}  // namespace

absl::StatusOr<MetaTTConfig> MetaTTConfigFromRecipe(const Recipe& r, const ModelGeometry& model,
                                                    int64_t num_tasks) {
  MetaTTConfig c;
  auto form = ParseTTForm(r.form);
  if (!form.ok()) return Prefixed(form.status(), "adapter.form");
  c.form = *form;
  c.ranks = r.ranks;
  ASSIGN_OR_RETURN(c.projections, Projections(r.projections));
  c.init = r.init;
  if (r.alpha > 0) c.alpha = r.alpha;
  c.num_tasks = c.form == TTForm::k4Plus1D ? num_tasks : 1;
  if (model.family == "llama") {
    // The decoder's geometry (q|k|v with grouped-query k/v, o, gate|up, down).
    c.SetModel(model);
  } else {
    // Encoders keep the plain widths (families saved before geometries
    // existed load the same way): hidden in and out, the FFN width for
    // ffn_up / ffn_down.
    c.d_in = Geometry(model, Projection::kQuery).in_width;
    c.d_out = Geometry(model, Projection::kQuery).out_width;
    c.d_ffn = Geometry(model, Projection::kFfnUp).out_width;
    c.num_layers = model.num_layers;
  }
  c.num_heads = model.num_heads;
  RETURN_IF_ERROR(Prefixed(c.Validate(), "adapter"));
  return c;
}

absl::StatusOr<LoraConfig> LoraConfigFromRecipe(const Recipe& r, const ModelGeometry& model) {
  LoraConfig c;
  c.rank = r.ranks.empty() ? 8 : r.ranks[0];
  c.alpha = r.alpha > 0 ? r.alpha : static_cast<double>(c.rank);
  c.init = r.init;
  ASSIGN_OR_RETURN(c.projections, Projections(r.projections));
  if (model.family == "llama") {
    c.SetModel(model);
  } else {
    c.num_layers = model.num_layers;
    c.hidden_size = Geometry(model, Projection::kQuery).in_width;
    c.intermediate_size = Geometry(model, Projection::kFfnUp).out_width;
  }
  RETURN_IF_ERROR(Prefixed(c.Validate(), "adapter"));
  return c;
}

absl::StatusOr<Recipe> RecipeForAddedTask(Recipe r, const RecipeOverrides& o,
                                          const MetaTTConfig& family) {
  const std::vector<int64_t> bonds = family.BondRanks();
  const bool uniform =
      std::all_of(bonds.begin(), bonds.end(), [&](int64_t b) { return b == bonds[0]; });
  std::vector<std::string> names;
  for (Projection p : family.projections) names.push_back(ProjectionName(p));
  const std::string shape =
      absl::StrCat("ranks ", absl::StrJoin(bonds, ","), " on ", absl::StrJoin(names, ","));
  auto differs = [&](absl::string_view field, const std::string& asked, const std::string& has) {
    return absl::InvalidArgumentError(
        absl::StrCat("adapter.", field, ": ", asked, " differs from the family's ", has,
                     " (an added task keeps the structure its family was trained with, ", shape,
                     "; leave adapter.", field, " unset)"));
  };
  if (o.ranks && !o.ranks->empty()) {
    const std::vector<int64_t>& u = *o.ranks;
    const bool same = u == bonds || (u.size() == 1 && uniform && u[0] == bonds[0]);
    if (!same) return differs("ranks", absl::StrJoin(u, ","), absl::StrJoin(bonds, ","));
  }
  if (o.projections && !o.projections->empty()) {
    ASSIGN_OR_RETURN(std::vector<Projection> asked, Projections(*o.projections));
    std::vector<Projection> a = asked, b = family.projections;
    std::sort(a.begin(), a.end());
    std::sort(b.begin(), b.end());
    if (a != b) {
      return differs("projections", absl::StrJoin(*o.projections, ","), absl::StrJoin(names, ","));
    }
  }
  if (o.init && !o.init->empty()) {
    auto specs = [&](const std::string& spec) -> absl::StatusOr<std::string> {
      ASSIGN_OR_RETURN(std::vector<CoreInit> cores, ParseInitSpec(spec, family.NumCores()));
      std::vector<std::string> parts;
      for (const CoreInit& c : cores) parts.push_back(c.ToString());
      return absl::StrJoin(parts, "-");
    };
    auto asked = specs(*o.init);
    if (!asked.ok()) return Prefixed(asked.status(), "adapter.init");
    ASSIGN_OR_RETURN(std::string has, specs(family.init));
    if (*asked != has) return differs("init", *o.init, family.init);
  }
  if (o.alpha && *o.alpha > 0 && std::abs(*o.alpha - family.Alpha()) > 1e-9 * family.Alpha()) {
    return differs("alpha", absl::StrCat(*o.alpha), absl::StrCat(family.Alpha()));
  }
  r.form = "4+1d";
  r.ranks = uniform ? std::vector<int64_t>{bonds[0]} : bonds;
  r.projections = names;
  r.init = family.init;
  r.alpha = family.alpha ? *family.alpha : 0;
  return r;
}

}  // namespace metatt
