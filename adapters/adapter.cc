#include "adapters/adapter.h"

#include "adapters/model_geometry.h"

namespace metatt {

const char* ProjectionName(Projection p) {
  switch (p) {
    case Projection::kQuery: return "q";
    case Projection::kKey: return "k";
    case Projection::kValue: return "v";
    case Projection::kAttnOutput: return "o";
    case Projection::kFfnUp: return "ffn_up";
    case Projection::kFfnDown: return "ffn_down";
    case Projection::kGate: return "gate";
  }
  return "?";
}

AdapterBatch AdapterBatch::FromHost(const torch::Tensor& host_index, torch::Device device) {
  AdapterBatch b;
  b.task_index_host = host_index.to(torch::kCPU, torch::kInt64).contiguous();
  b.task_index = b.task_index_host.to(device);
  return b;
}

const std::vector<std::vector<Projection>>& ProjectionGroups() {
  static const std::vector<std::vector<Projection>> kGroups = {
      {Projection::kQuery, Projection::kKey, Projection::kValue},
      {Projection::kAttnOutput},
      {Projection::kFfnUp},
      {Projection::kFfnDown}};
  return kGroups;
}

int ProjectionGroupOf(const std::vector<Projection>& projections) {
  const auto& groups = ProjectionGroups();
  for (size_t g = 0; g < groups.size(); ++g)
    if (groups[g] == projections) return static_cast<int>(g);
  return -1;
}

void EncoderAdapter::AddDeltas(int layer, const torch::Tensor& x,
                               const std::vector<Projection>& projections,
                               const AdapterBatch& batch, torch::Tensor& out) {
  std::vector<torch::Tensor> d = Deltas(layer, x, projections, batch);
  const int64_t n = static_cast<int64_t>(projections.size());
  TORCH_CHECK(n > 0, "AddDeltas: no projections");
  // Column offset and width of each projection's block in `out`.
  std::vector<int64_t> offset(n), width(n);
  // The geometry's widths when they describe `out` (an encoder config that
  // leaves d_ffn unset does not describe the FFN groups: then the equal
  // split, which is what every encoder group is).
  const ModelGeometry* g = geometry();
  const int group = g != nullptr ? g->GroupOf(projections) : -1;
  if (group >= 0 && g->GroupWidth(group) == out.size(-1)) {
    int64_t off = 0;
    for (int64_t i = 0; i < n; ++i) {
      offset[i] = off;
      width[i] = g->of(projections[i]).out_width;
      off += width[i];
    }
  } else {
    TORCH_CHECK(out.size(-1) % n == 0, "AddDeltas: output width ", out.size(-1),
                " is not a multiple of ", n, " projections");
    for (int64_t i = 0; i < n; ++i) {
      width[i] = out.size(-1) / n;
      offset[i] = i * width[i];
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    if (!d[i].defined()) continue;
    if (n == 1)
      out.add_(d[i]);
    else
      out.narrow(-1, offset[i], width[i]).add_(d[i]);
  }
}

torch::Tensor AdapterBatch::HostTaskIndex() const {
  if (task_index_host.defined()) return task_index_host;
  return task_index.defined() ? task_index.to(torch::kCPU, torch::kInt64) : torch::Tensor();
}

}  // namespace metatt
