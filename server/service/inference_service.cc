#include <chrono>

#include "absl/strings/str_cat.h"
#include "server/metrics/server_metrics.h"
#include "server/service/grpc_status.h"
#include "server/service/proto_convert.h"
#include "server/service/services.h"

namespace metatt {
namespace {

absl::Status DoPredict(const InferenceServiceOptions& o, grpc::ServerContext* ctx,
                       const v1::PredictRequest* req, v1::PredictResponse* resp) {
  if (o.predictor == nullptr) {
    return absl::UnavailableError("Predict: no inference runtime is loaded in this server");
  }
  if (req->inputs_size() == 0) return absl::InvalidArgumentError("inputs: at least one input");
  if (req->inputs_size() > o.max_inputs) {
    return absl::InvalidArgumentError(
        absl::StrCat("inputs: ", req->inputs_size(), " inputs; the limit is ", o.max_inputs));
  }
  std::vector<PredictInput> inputs;
  inputs.reserve(req->inputs_size());
  for (int i = 0; i < req->inputs_size(); ++i) {
    auto in = FromProto(req->inputs(i), i);
    if (!in.ok()) return in.status();
    inputs.push_back(std::move(*in));
  }
  int64_t deadline_ms = 0;
  auto deadline = ctx->deadline();
  if (deadline != std::chrono::system_clock::time_point::max()) {
    deadline_ms =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline.time_since_epoch()).count();
  }
  auto out = o.predictor->Predict(inputs, deadline_ms);
  if (!out.ok()) return out.status();
  for (const auto& p : *out) ToProto(p, resp->add_predictions());
  return absl::OkStatus();
}

}  // namespace

grpc::Status InferenceServiceImpl::Predict(grpc::ServerContext* ctx, const v1::PredictRequest* req,
                                           v1::PredictResponse* resp) {
  auto start = std::chrono::steady_clock::now();
  absl::Status st = DoPredict(options_, ctx, req, resp);
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  resp->set_server_seconds(seconds);
  if (options_.metrics != nullptr) {
    options_.metrics->PredictRequests(absl::StatusCodeToString(st.code())).Increment();
    options_.metrics->predict_latency_seconds.Observe(seconds);
  }
  return ToGrpcStatus(st);
}

}  // namespace metatt
