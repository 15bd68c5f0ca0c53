#include "server/training/adapter_config.h"

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
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

}  // namespace metatt
