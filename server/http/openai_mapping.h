// JSON <-> proto for the OpenAI-compatible HTTP gateway (metatt-http). Pure
// functions, no network: the gateway (gateway.cc) calls the gRPC API and uses
// these to read requests and write responses; openai_mapping_test.cc checks
// them. The gRPC API stays the source of truth: nothing here validates what
// the server validates (names, ranges, ownership); it only maps shapes, and
// gRPC statuses onto OpenAI's error object naming the HTTP field.
#pragma once

#include <grpcpp/support/status.h>

#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "metatt/v1/adapters.pb.h"
#include "metatt/v1/datasets.pb.h"
#include "metatt/v1/inference.pb.h"
#include "metatt/v1/jobs.pb.h"

namespace metatt::http {

using Json = nlohmann::json;
namespace v1 = metatt::v1;

// OpenAI's error object: {"error": {"message", "type", "param", "code"}}.
struct ApiError {
  int status = 400;
  std::string message;
  std::string param;  // "" = null
  std::string code;   // "" = null
};
Json ErrorBody(const ApiError& e);
ApiError BadRequest(const std::string& param, const std::string& message);

// The HTTP status of a gRPC code (google.rpc.Code's HTTP mapping).
int HttpStatusOf(grpc::StatusCode code);
// A failed RPC as an OpenAI error. The server's messages start with the
// field they are about ("spec.tasks[0].dataset_id: ..."); that field becomes
// `param`, renamed to the HTTP request's field (HttpParamOf).
ApiError FromGrpc(const grpc::Status& st);
std::string HttpParamOf(const std::string& grpc_field);

// ---- files (datasets) -----------------------------------------------------------
// The upload header for a file whose first line is `first_line`, by its name:
// *.tsv / *.csv have a header row naming columns text, label and optionally
// text_pair; anything else is JSONL, one {"text": ..., "label": ...
// [, "text_pair": ...]} object a line (text_pair taken when the first line
// has it). label_kind: "" | classification | regression.
std::optional<ApiError> DatasetHeaderFor(const std::string& filename, const std::string& first_line,
                                         const std::string& label_kind, v1::DatasetHeader* out);
Json FileJson(const v1::Dataset& d);

// ---- fine-tuning jobs -------------------------------------------------------------
// A POST /v1/fine_tuning/jobs body, read without the server. Relative
// hyper-parameters (n_epochs, learning_rate_multiplier) and the model are
// resolved by the gateway with the server's answers (the dataset's rows, the
// family's form).
struct JobRequest {
  std::string model;
  std::string family, task;  // from `suffix` (family[:task]) or `model` (family:task)
  std::string training_file, validation_file;
  std::optional<double> n_epochs;
  std::optional<int64_t> batch_size;
  std::optional<double> learning_rate_multiplier;
  v1::CreateJobRequest req;  // everything that maps one to one (metatt extension, seed)
};
std::optional<ApiError> ParseJobRequest(const Json& body, JobRequest* out);

struct JobView {
  std::string base_model;  // `model` of a job that trains a new family
  // The learning rate a job with this spec gets when it sets none (its form's,
  // and an added task's is higher): learning_rate_multiplier = learning_rate /
  // this. 0: the multiplier shows as "auto".
  std::function<double(const v1::JobSpec&)> default_learning_rate;
};
std::string JobStatus(v1::JobState s);
Json JobJson(const v1::Job& job, const JobView& view);

// Event ids: ftevent-<job id>-<sequence>.
std::string EventId(const std::string& job_id, int64_t sequence);
std::optional<int64_t> EventSequence(const std::string& event_id);
Json EventJson(const v1::JobEvent& e);
// A resumable checkpoint as OpenAI's fine_tuning.job.checkpoint (id
// ftckpt-<job id>-<step>; metrics.step, metrics.train_loss, and an
// evaluation's metrics under our names). fine_tuned_model_checkpoint is null:
// a checkpoint is for resuming, not a servable model.
Json CheckpointJson(const v1::JobCheckpoint& c);

// ---- models and classification ------------------------------------------------
Json ModelJson(const std::string& id, int64_t created_unix_ms, const Json& metatt);
Json TaskModelJson(const v1::FamilyVersion& v, const v1::Task& t);
// `family:task` -> (family, task); false when it is not of that shape.
bool SplitModelId(const std::string& id, std::string* family, std::string* task);

// POST /v1/classifications: model = "family:task" or a list of them; input =
// a string, {"text", "text_pair"} or a list of those. One PredictInput per
// (input, model) pair, inputs outer; `rows` receives (input index, model id).
std::optional<ApiError> ParseClassification(const Json& body, v1::PredictRequest* req,
                                            std::vector<std::pair<int, std::string>>* rows);
Json ClassificationJson(const v1::PredictResponse& resp,
                        const std::vector<std::pair<int, std::string>>& rows);

// ---- chat and text completions (decoder families) ----------------------------------
// POST /v1/chat/completions (chat = true: `messages`) and POST /v1/completions
// (`prompt`) onto GenerateRequest. `model` is `family:task`, or `base_model`
// for the base model without an adapter; anything else is 404
// model_not_found. OpenAI's defaults where the proto's zero means something
// else: temperature left out = 1 (OpenAI's default; 0 = greedy). MetaTT's own
// fields go in the extension object `metatt`: {"top_k", "version"}. Fields
// with no gRPC equivalent (n > 1, logprobs, tools, echo, ...) are refused
// naming them; ranges are the server's to check.
struct CompletionRequest {
  bool chat = false;
  std::string model;  // as the client gave it (echoed in every response object)
  bool stream = false;
  bool include_usage = false;                    // stream_options.include_usage
  std::string max_tokens_param = "max_tokens";   // or max_completion_tokens
  v1::GenerateRequest req;
};
std::optional<ApiError> ParseCompletionRequest(const Json& body, bool chat,
                                               const std::string& base_model,
                                               CompletionRequest* out);
// A failed Generate/GenerateStream as an OpenAI error naming the request's
// field (GenerateParamOf): NOT_FOUND is 404 model_not_found, a model of the
// other kind (FAILED_PRECONDITION) names `model`.
ApiError GenerateError(const grpc::Status& st, const CompletionRequest& r);
std::string GenerateParamOf(const std::string& grpc_field, const CompletionRequest& r);

Json UsageJson(const v1::GenerateUsage& u);
// The non-streamed answer: chat.completion or text_completion.
Json CompletionJson(const v1::GenerateResponse& resp, const CompletionRequest& r,
                    const std::string& id, int64_t created_s);
// One streamed GenerateChunk as chat.completion.chunk (first: delta.role too)
// or a text_completion chunk.
Json CompletionChunkJson(const v1::GenerateChunk& c, const CompletionRequest& r,
                         const std::string& id, int64_t created_s, bool first);
// The last chunk of a stream with stream_options.include_usage: no choices.
Json UsageChunkJson(const v1::GenerateUsage& u, const CompletionRequest& r,
                    const std::string& id, int64_t created_s);
// A server-sent event carrying `data` ("data: <data>\n\n").
std::string SseEvent(const std::string& data);

}  // namespace metatt::http
