#include <chrono>
#include <map>

#include "absl/strings/str_cat.h"
#include "server/monitoring/server_metrics.h"
#include "server/service/grpc_status.h"
#include "server/service/proto_convert.h"
#include "server/service/services.h"

namespace metatt {
namespace {

int64_t DeadlineMs(grpc::ServerContext* ctx);

absl::Status DoPredict(const InferenceServiceOptions& o, grpc::ServerContext* ctx,
                       const v1::PredictRequest* req, v1::PredictResponse* resp) {
  if (o.predictor == nullptr) {
    return absl::UnavailableError("Predict: no inference runtime is loaded in this server");
  }
  if (req->inputs_size() == 0) return absl::InvalidArgumentError("inputs: at least one input");
  if (req->inputs_size() > o.max_inputs) {
    return absl::InvalidArgumentError(
        absl::StrCat("inputs: ", req->inputs_size(),
                     " inputs; the limit is max_predict_inputs=", o.max_inputs));
  }
  auto caller = CallerOf(ctx);
  if (!caller.ok()) return caller.status();
  std::vector<PredictInput> inputs;
  inputs.reserve(req->inputs_size());
  std::map<std::string, std::string> resolved;  // family as named -> as owned by the caller
  for (int i = 0; i < req->inputs_size(); ++i) {
    auto in = FromProto(req->inputs(i), i);
    if (!in.ok()) return in.status();
    if (o.families != nullptr) {
      auto it = resolved.find(in->family);
      if (it == resolved.end()) {
        auto f = o.families->ResolveForPredict(*caller, in->family);
        if (!f.ok()) {
          return absl::Status(f.status().code(),
                              absl::StrCat("inputs[", i, "]: ", f.status().message()));
        }
        it = resolved.emplace(in->family, *f).first;
      }
      in->family = it->second;
    }
    inputs.push_back(std::move(*in));
  }
  const int64_t deadline_ms = DeadlineMs(ctx);
  // A client that cancels or disconnects stops waiting at once; a request of
  // its still in the queue is withdrawn and never runs.
  auto out = o.predictor->Predict(inputs, deadline_ms, [ctx] { return ctx->IsCancelled(); });
  if (!out.ok()) return out.status();
  for (const auto& p : *out) ToProto(p, resp->add_predictions());
  return absl::OkStatus();
}

int64_t DeadlineMs(grpc::ServerContext* ctx) {
  auto deadline = ctx->deadline();
  if (deadline == std::chrono::system_clock::time_point::max()) return 0;
  return std::chrono::duration_cast<std::chrono::milliseconds>(deadline.time_since_epoch())
      .count();
}

}  // namespace

grpc::Status InferenceServiceImpl::RunGenerate(
    grpc::ServerContext* ctx, const v1::GenerateRequest* req,
    const std::function<bool(const GenerateChunk&)>& on_chunk) {
  ServerMetrics* m = options_.metrics;
  if (m != nullptr) m->generate_in_flight.Increment();
  std::string finish;
  absl::Status st = [&]() -> absl::Status {
    if (options_.generator == nullptr) {
      return absl::UnavailableError("Generate: no inference runtime is loaded in this server");
    }
    auto caller = CallerOf(ctx);
    if (!caller.ok()) return caller.status();
    absl::StatusOr<GenerateParams> params = FromProto(*req);
    if (!params.ok()) return params.status();
    if (options_.families != nullptr && !params->family.empty()) {
      auto f = options_.families->ResolveForPredict(*caller, params->family);
      if (!f.ok()) return f.status();
      params->family = *f;
    }
    return options_.generator->Generate(
        *params, DeadlineMs(ctx), [ctx] { return ctx->IsCancelled(); },
        [&](const GenerateChunk& c) {
          if (c.finish != FinishReason::kNone) finish = FinishReasonName(c.finish);
          return on_chunk(c);
        });
  }();
  if (m != nullptr) {
    m->generate_in_flight.Decrement();
    m->GenerateRequests(absl::StatusCodeToString(st.code()), finish).Increment();
  }
  return ToGrpcStatus(st);
}

grpc::Status InferenceServiceImpl::GenerateStream(grpc::ServerContext* ctx,
                                                  const v1::GenerateRequest* req,
                                                  grpc::ServerWriter<v1::GenerateChunk>* writer) {
  return RunGenerate(ctx, req, [writer](const GenerateChunk& c) {
    v1::GenerateChunk out;
    ToProto(c, &out);
    return writer->Write(out);  // false: the stream is gone (the sequence is cancelled)
  });
}

grpc::Status InferenceServiceImpl::Generate(grpc::ServerContext* ctx,
                                            const v1::GenerateRequest* req,
                                            v1::GenerateResponse* resp) {
  const auto start = std::chrono::steady_clock::now();
  resp->set_task_index(-1);  // the base model, until a chunk names a task
  grpc::Status st = RunGenerate(ctx, req, [resp](const GenerateChunk& c) {
    v1::GenerateChunk piece;
    ToProto(c, &piece);
    resp->mutable_text()->append(piece.text());
    resp->mutable_token_ids()->MergeFrom(piece.token_ids());
    if (!piece.family().empty() || piece.task_index() >= 0) {
      resp->set_family(piece.family());
      resp->set_version(piece.version());
      resp->set_task(piece.task());
      resp->set_task_index(piece.task_index());
    }
    if (!piece.finish_reason().empty()) {
      resp->set_finish_reason(piece.finish_reason());
      *resp->mutable_usage() = piece.usage();
      resp->set_time_to_first_token_seconds(piece.time_to_first_token_seconds());
    }
    return true;
  });
  resp->set_server_seconds(
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  return st;
}

grpc::Status InferenceServiceImpl::Predict(grpc::ServerContext* ctx, const v1::PredictRequest* req,
                                           v1::PredictResponse* resp) {
  auto start = std::chrono::steady_clock::now();
  if (options_.metrics != nullptr) options_.metrics->predict_in_flight.Increment();
  absl::Status st = DoPredict(options_, ctx, req, resp);
  if (options_.metrics != nullptr) options_.metrics->predict_in_flight.Decrement();
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  resp->set_server_seconds(seconds);
  if (options_.metrics != nullptr) {
    options_.metrics->PredictRequests(absl::StatusCodeToString(st.code())).Increment();
    options_.metrics->predict_latency_seconds.Observe(seconds);
    // Per answered task (an input with a task list answers several), under
    // a bounded task label ("family/task").
    const std::string code = absl::StatusCodeToString(st.code());
    if (st.ok()) {
      for (const v1::Prediction& p : resp->predictions()) {
        const int i = p.input_index();
        const std::string family = i < req->inputs_size() ? req->inputs(i).family() : "";
        options_.metrics->CountPredictInput(absl::StrCat(family, "/", p.task()), code);
      }
    }
    for (int i = 0; !st.ok() && i < req->inputs_size(); ++i) {
      const v1::PredictInput& in = req->inputs(i);
      std::string task;
      if (in.task_ref_case() == v1::PredictInput::kTask) {
        task = in.task();
      } else if (in.task_ref_case() == v1::PredictInput::kTasks) {
        task = "(task list)";
      } else {
        task = absl::StrCat("#", in.task_index());
      }
      options_.metrics->CountPredictInput(absl::StrCat(in.family(), "/", task), code);
    }
  }
  return ToGrpcStatus(st);
}

}  // namespace metatt
