#include "adapters/adapter.h"

namespace metatt {

const char* ProjectionName(Projection p) {
  switch (p) {
    case Projection::kQuery: return "q";
    case Projection::kKey: return "k";
    case Projection::kValue: return "v";
    case Projection::kAttnOutput: return "o";
    case Projection::kFfnUp: return "ffn_up";
    case Projection::kFfnDown: return "ffn_down";
  }
  return "?";
}

AdapterBatch AdapterBatch::FromHost(const torch::Tensor& host_index, torch::Device device) {
  AdapterBatch b;
  b.task_index_host = host_index.to(torch::kCPU, torch::kInt64).contiguous();
  b.task_index = b.task_index_host.to(device);
  return b;
}

torch::Tensor AdapterBatch::HostTaskIndex() const {
  if (task_index_host.defined()) return task_index_host;
  return task_index.defined() ? task_index.to(torch::kCPU, torch::kInt64) : torch::Tensor();
}

}  // namespace metatt
