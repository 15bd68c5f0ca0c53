#include "adapters/model_geometry.h"

#include <set>
#include <utility>
#include <vector>

namespace metatt {

int ModelGeometry::GroupOf(const std::vector<Projection>& projections) const {
  for (size_t g = 0; g < groups.size(); ++g)
    if (groups[g] == projections) return static_cast<int>(g);
  return -1;
}

int64_t ModelGeometry::OffsetInGroup(Projection p) const {
  for (const auto& group : groups) {
    int64_t off = 0;
    for (Projection q : group) {
      if (q == p) return off;
      off += of(q).out_width;
    }
  }
  return -1;
}

int64_t ModelGeometry::GroupWidth(int g) const {
  if (g < 0 || g >= static_cast<int>(groups.size())) return 0;
  int64_t w = 0;
  for (Projection p : groups[g]) w += of(p).out_width;
  return w;
}

std::string ModelGeometry::Check() const {
  if (num_layers <= 0) return "num_layers must be positive";
  std::set<Projection> seen;
  for (const auto& group : groups) {
    if (group.empty()) return "a projection group is empty";
    for (Projection p : group) {
      if (!seen.insert(p).second)
        return std::string("projection '") + ProjectionName(p) + "' is in two groups";
      const ProjectionGeometry& g = of(p);
      if (g.in_width <= 0 || g.out_width <= 0 || g.in_port < 0 || g.out_port < 0)
        return std::string("projection '") + ProjectionName(p) + "' has no widths or ports";
    }
  }
  for (int i = 0; i < kNumProjections; ++i)
    if (projection[i].in_width > 0 && !seen.count(static_cast<Projection>(i)))
      return std::string("projection '") + ProjectionName(static_cast<Projection>(i)) +
             "' is in no group";
  // One width per port (on each side), so blocks can be shared.
  for (int side = 0; side < 2; ++side) {
    for (int i = 0; i < kNumProjections; ++i) {
      for (int j = 0; j < kNumProjections; ++j) {
        const ProjectionGeometry &a = projection[i], &b = projection[j];
        if (a.in_width <= 0 || b.in_width <= 0) continue;
        const bool same_port = side == 0 ? a.in_port == b.in_port : a.out_port == b.out_port;
        const bool same_width = side == 0 ? a.in_width == b.in_width : a.out_width == b.out_width;
        if (same_port && !same_width)
          return std::string("projections '") + ProjectionName(static_cast<Projection>(i)) +
                 "' and '" + ProjectionName(static_cast<Projection>(j)) + "' share an " +
                 (side == 0 ? "input" : "output") + " port but differ in width";
      }
    }
  }
  return "";
}

namespace {

// A geometry with its family, sizes and call groups; no projection widths yet.
ModelGeometry Blank(const char* family, int64_t num_layers, int64_t num_heads,
                    std::vector<std::vector<Projection>> groups) {
  ModelGeometry g;
  g.family = family;
  g.num_layers = num_layers;
  g.num_heads = num_heads;
  g.groups = std::move(groups);
  return g;
}

}  // namespace

ModelGeometry ModelGeometry::Bert(int64_t num_layers, int64_t d_in, int64_t d_out, int64_t d_ffn,
                                  int64_t num_heads) {
  ModelGeometry g = Blank("bert", num_layers, num_heads,
                          {{Projection::kQuery, Projection::kKey, Projection::kValue},
                           {Projection::kAttnOutput},
                           {Projection::kFfnUp},
                           {Projection::kFfnDown}});
  for (Projection p : {Projection::kQuery, Projection::kKey, Projection::kValue,
                       Projection::kAttnOutput})
    g.projection[static_cast<int>(p)] = {d_in, d_out, kHiddenPort, kHiddenPort};
  g.projection[static_cast<int>(Projection::kFfnUp)] = {d_in, d_ffn, kHiddenPort, kFfnPort};
  g.projection[static_cast<int>(Projection::kFfnDown)] = {d_ffn, d_out, kFfnPort, kHiddenPort};
  return g;
}

ModelGeometry ModelGeometry::Llama(int64_t num_layers, int64_t hidden, int64_t d_ffn,
                                   int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) {
  ModelGeometry g = Blank("llama", num_layers, num_heads,
                          {{Projection::kQuery, Projection::kKey, Projection::kValue},
                           {Projection::kAttnOutput},
                           {Projection::kGate, Projection::kFfnUp},
                           {Projection::kFfnDown}});
  const int64_t qw = num_heads * head_dim, kw = num_kv_heads * head_dim;
  // A width equal to the hidden size shares the residual stream's port.
  const int q_port = qw == hidden ? kHiddenPort : kQueryHeadsPort;
  const int kv_port = kw == hidden ? kHiddenPort : kKeyValuePort;
  g.projection[static_cast<int>(Projection::kQuery)] = {hidden, qw, kHiddenPort, q_port};
  g.projection[static_cast<int>(Projection::kKey)] = {hidden, kw, kHiddenPort, kv_port};
  g.projection[static_cast<int>(Projection::kValue)] = {hidden, kw, kHiddenPort, kv_port};
  g.projection[static_cast<int>(Projection::kAttnOutput)] = {qw, hidden, q_port, kHiddenPort};
  g.projection[static_cast<int>(Projection::kGate)] = {hidden, d_ffn, kHiddenPort, kFfnPort};
  g.projection[static_cast<int>(Projection::kFfnUp)] = {hidden, d_ffn, kHiddenPort, kFfnPort};
  g.projection[static_cast<int>(Projection::kFfnDown)] = {d_ffn, hidden, kFfnPort, kHiddenPort};
  return g;
}

}  // namespace metatt
