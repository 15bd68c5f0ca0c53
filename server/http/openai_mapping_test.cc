#include "server/http/openai_mapping.h"

#include <gtest/gtest.h>

namespace metatt::http {
namespace {

TEST(OpenAiMapping, GrpcErrorsNameTheHttpField) {
  ApiError e = FromGrpc(grpc::Status(grpc::StatusCode::NOT_FOUND,
                                     "spec.tasks[0].dataset_id: dataset 'ds-x' not found"));
  EXPECT_EQ(e.status, 404);
  EXPECT_EQ(e.param, "training_file");
  EXPECT_EQ(e.code, "not_found");
  e = FromGrpc(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                            "spec.hparams.max_length: 0 must be >= 8"));
  EXPECT_EQ(e.status, 400);
  EXPECT_EQ(e.param, "metatt.hparams.max_length");
  e = FromGrpc(grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "unknown token"));
  EXPECT_EQ(e.status, 401);
  EXPECT_EQ(e.param, "");
  EXPECT_EQ(e.code, "invalid_api_key");
  Json body = ErrorBody(e);
  EXPECT_EQ(body["error"]["type"], "authentication_error");
  EXPECT_TRUE(body["error"]["param"].is_null());
  EXPECT_EQ(FromGrpc(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "x")).status, 429);
  EXPECT_EQ(FromGrpc(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                  "dataset: line 2: not a JSON object"))
                .param,
            "file");
  // A message that does not start with a field has no param.
  EXPECT_EQ(FromGrpc(grpc::Status(grpc::StatusCode::NOT_FOUND, "job 'j' not found")).param, "");
}

TEST(OpenAiMapping, JobRequestMapsOpenAiAndExtensionFields) {
  Json body = Json::parse(R"({
    "model": "all-MiniLM-L6-v2", "training_file": "ds-1", "validation_file": "ds-2",
    "suffix": "sent:SST-2", "seed": 7,
    "method": {"type": "supervised", "supervised": {"hyperparameters":
        {"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": 0.5}}},
    "metatt": {"adapter": {"form": "4+1d", "ranks": [4]}, "hparams": {"max_length": 32},
               "eval_fraction": 0.2}})");
  JobRequest jr;
  ASSERT_FALSE(ParseJobRequest(body, &jr));
  EXPECT_EQ(jr.family, "sent");
  EXPECT_EQ(jr.task, "SST-2");
  EXPECT_EQ(*jr.n_epochs, 2);
  EXPECT_FALSE(jr.batch_size);
  EXPECT_EQ(*jr.learning_rate_multiplier, 0.5);
  const auto& spec = jr.req.spec();
  EXPECT_EQ(spec.adapter().form(), "4+1d");
  EXPECT_EQ(spec.adapter().ranks(0), 4);
  EXPECT_EQ(spec.hparams().max_length(), 32);
  EXPECT_EQ(spec.hparams().seed(), 7u);
  EXPECT_FALSE(spec.hparams().has_batch_size());
  EXPECT_EQ(spec.tasks(0).dataset_id(), "ds-1");
  EXPECT_EQ(spec.tasks(0).eval_dataset_id(), "ds-2");
  EXPECT_DOUBLE_EQ(spec.tasks(0).eval_fraction(), 0.2);
}

TEST(OpenAiMapping, JobRequestErrorsNameTheField) {
  JobRequest jr;
  auto e = ParseJobRequest(Json::parse(R"({"training_file": "x"})"), &jr);
  ASSERT_TRUE(e);
  EXPECT_EQ(e->param, "model");
  JobRequest jr2;
  e = ParseJobRequest(Json::parse(R"({"model": "m", "training_file": "x",
      "hyperparameters": {"n_epochs": "many"}})"), &jr2);
  ASSERT_TRUE(e);
  EXPECT_EQ(e->param, "hyperparameters.n_epochs");
  JobRequest jr3;
  e = ParseJobRequest(Json::parse(R"({"model": "m", "training_file": "x",
      "metatt": {"hparams": {"no_such": 1}}})"), &jr3);
  ASSERT_TRUE(e);
  EXPECT_EQ(e->param, "metatt.hparams");
  JobRequest jr4;
  e = ParseJobRequest(Json::parse(R"({"model": "m", "training_file": "x",
      "hyperparameters": {"n_epochs": 1}, "metatt": {"hparams": {"max_steps": 5}}})"), &jr4);
  ASSERT_TRUE(e);
  EXPECT_EQ(e->param, "hyperparameters.n_epochs");
}

TEST(OpenAiMapping, JobAndEventObjects) {
  v1::Job job;
  job.set_id("job-1");
  job.set_state(v1::SUCCEEDED);
  job.set_created_unix_ms(5000);
  job.set_updated_unix_ms(9000);
  job.set_result_family("sent");
  job.mutable_spec()->set_family("sent");
  job.mutable_spec()->add_tasks()->set_task_name("SST-2");
  job.mutable_spec()->mutable_hparams()->set_learning_rate(5e-3);
  // Default rates per kind, as the gateway's ResolveRecipe gives them.
  const JobView view{"base", [](const v1::JobSpec& s) {
                       return s.kind() == v1::ADD_TASK ? 1e-2 : 2.5e-3;
                     }};
  Json j = JobJson(job, view);
  EXPECT_EQ(j["status"], "succeeded");
  EXPECT_EQ(j["fine_tuned_model"], "sent:SST-2");
  EXPECT_EQ(j["model"], "base");
  EXPECT_EQ(j["finished_at"], 9);
  EXPECT_DOUBLE_EQ(j["hyperparameters"]["learning_rate_multiplier"].get<double>(), 2.0);
  EXPECT_EQ(j["hyperparameters"]["batch_size"], "auto");
  {  // The multiplier is relative to the default of the job's own kind.
    v1::Job add = job;
    add.mutable_spec()->set_kind(v1::ADD_TASK);
    add.mutable_spec()->mutable_hparams()->set_learning_rate(1e-2);
    EXPECT_DOUBLE_EQ(
        JobJson(add, view)["hyperparameters"]["learning_rate_multiplier"].get<double>(), 1.0);
    EXPECT_EQ(JobJson(add, JobView{"base", {}})["hyperparameters"]["learning_rate_multiplier"],
              "auto");
  }

  v1::JobEvent e;
  e.set_job_id("job-1");
  e.set_sequence(3);
  e.mutable_state()->set_state(v1::FAILED);
  e.mutable_state()->set_reason("boom");
  Json ej = EventJson(e);
  EXPECT_EQ(ej["id"], "ftevent-job-1-3");
  EXPECT_EQ(ej["level"], "error");
  EXPECT_EQ(ej["message"], "Job failed: boom");
  EXPECT_EQ(*EventSequence("ftevent-job-1-3"), 3);
  EXPECT_FALSE(EventSequence("job-1"));
}

TEST(OpenAiMapping, UploadHeaderFromTheFirstLine) {
  v1::DatasetHeader h;
  ASSERT_FALSE(DatasetHeaderFor("train.jsonl", R"({"text": "a", "text_pair": "b", "label": 1})",
                                "", &h));
  EXPECT_EQ(h.format(), v1::JSONL);
  EXPECT_EQ(h.text_pair_column(), "text_pair");
  v1::DatasetHeader h2;
  ASSERT_FALSE(DatasetHeaderFor("t.tsv", "text\tlabel", "regression", &h2));
  EXPECT_EQ(h2.format(), v1::TSV);
  EXPECT_EQ(h2.label_kind(), v1::REGRESSION);
  EXPECT_EQ(h2.text_pair_column(), "");
  // Chat, prompt/completion and instruction lines: a generation dataset.
  for (const char* line : {R"({"messages": [{"role": "user", "content": "hi"}]})",
                           R"({"prompt": "a", "completion": "b"})",
                           R"({"instruction": "a", "input": "", "output": "b"})"}) {
    v1::DatasetHeader h3;
    ASSERT_FALSE(DatasetHeaderFor("chat.jsonl", line, "", &h3));
    EXPECT_EQ(h3.label_kind(), v1::GENERATION) << line;
    EXPECT_EQ(h3.format(), v1::JSONL);
  }
  v1::DatasetHeader h4;
  ASSERT_FALSE(DatasetHeaderFor("chat.json", "[", "generation", &h4));
  EXPECT_EQ(h4.label_kind(), v1::GENERATION);
  v1::DatasetHeader h5;
  auto e = DatasetHeaderFor("x.jsonl", "{}", "poetry", &h5);
  ASSERT_TRUE(e);
  EXPECT_EQ(e->param, "label_kind");
}

TEST(OpenAiMapping, ChatRequestMapsOntoGenerate) {
  CompletionRequest cr;
  ASSERT_FALSE(ParseCompletionRequest(Json::parse(R"({
      "model": "fam:qa", "stream": true, "stream_options": {"include_usage": true},
      "messages": [{"role": "developer", "content": "Be brief."},
                   {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                {"type": "text", "text": "there"}]}],
      "max_completion_tokens": 7, "temperature": 0, "top_p": 0.9, "seed": 11,
      "stop": ["\n", "END"], "n": 1, "metatt": {"top_k": 40, "version": 2}})"),
                                      /*chat=*/true, "base", &cr));
  const v1::GenerateRequest& g = cr.req;
  EXPECT_TRUE(cr.chat && cr.stream && cr.include_usage);
  EXPECT_EQ(cr.model, "fam:qa");
  EXPECT_EQ(g.family(), "fam");
  EXPECT_EQ(g.task(), "qa");
  EXPECT_EQ(g.version(), 2);
  ASSERT_EQ(g.messages().messages_size(), 2);
  EXPECT_EQ(g.messages().messages(0).role(), "system");
  EXPECT_EQ(g.messages().messages(1).content(), "Hi there");
  EXPECT_EQ(g.max_tokens(), 7);
  EXPECT_EQ(cr.max_tokens_param, "max_completion_tokens");
  EXPECT_EQ(g.temperature(), 0.0f);
  EXPECT_FLOAT_EQ(g.top_p(), 0.9f);
  EXPECT_EQ(g.top_k(), 40);
  ASSERT_TRUE(g.has_seed());
  EXPECT_EQ(g.seed(), 11u);
  ASSERT_EQ(g.stop_size(), 2);
  EXPECT_EQ(g.stop(1), "END");
}

TEST(OpenAiMapping, CompletionRequestDefaultsAndBaseModel) {
  CompletionRequest cr;
  ASSERT_FALSE(ParseCompletionRequest(
      Json::parse(R"({"model": "base", "prompt": ["Once"], "stop": "."})"), false, "base", &cr));
  EXPECT_FALSE(cr.chat || cr.stream);
  EXPECT_EQ(cr.req.family(), "");
  EXPECT_EQ(cr.req.task(), "");
  EXPECT_EQ(cr.req.prompt(), "Once");
  EXPECT_EQ(cr.req.temperature(), 1.0f);  // OpenAI's default
  EXPECT_EQ(cr.req.max_tokens(), 0);      // the server's default
  EXPECT_FALSE(cr.req.has_seed());
  EXPECT_EQ(cr.req.stop(0), ".");
  CompletionRequest zero;
  ASSERT_FALSE(ParseCompletionRequest(
      Json::parse(R"({"model": "f:t", "prompt": "x", "max_tokens": 0})"), false, "base", &zero));
  EXPECT_EQ(zero.req.max_tokens(), -1);  // refused by the server, not its default
}

TEST(OpenAiMapping, CompletionRequestErrorsNameTheField) {
  struct Case {
    const char* body;
    bool chat;
    int status;
    const char* param;
  } cases[] = {
      {R"({"messages": [{"role": "user", "content": "x"}]})", true, 400, "model"},
      {R"({"model": "nocolon", "messages": [{"role": "user", "content": "x"}]})", true, 404,
       "model"},
      {R"({"model": "f:t"})", true, 400, "messages"},
      {R"({"model": "f:t", "messages": []})", true, 400, "messages"},
      {R"({"model": "f:t", "messages": [{"content": "x"}]})", true, 400, "messages[0].role"},
      {R"({"model": "f:t", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]})",
       true, 400, "messages[0].content[0]"},
      {R"({"model": "f:t"})", false, 400, "prompt"},
      {R"({"model": "f:t", "prompt": [1, 2]})", false, 400, "prompt"},
      {R"({"model": "f:t", "prompt": "x", "temperature": "hot"})", false, 400, "temperature"},
      {R"({"model": "f:t", "prompt": "x", "n": 2})", false, 400, "n"},
      {R"({"model": "f:t", "prompt": "x", "seed": -1})", false, 400, "seed"},
      {R"({"model": "f:t", "prompt": "x", "stop": [1]})", false, 400, "stop[0]"},
      {R"({"model": "f:t", "prompt": "x", "stream": "yes"})", false, 400, "stream"},
      {R"({"model": "f:t", "prompt": "x", "stream_options": {"include_usage": true}})", false,
       400, "stream_options"},
      {R"({"model": "f:t", "prompt": "x", "metatt": {"top_q": 1}})", false, 400, "metatt.top_q"},
      {R"({"model": "f:t", "prompt": "x", "metatt": {"top_k": 1.5}})", false, 400,
       "metatt.top_k"},
      {R"({"model": "f:t", "messages": [{"role": "user", "content": "x"}], "tools": [{}]})", true,
       400, "tools"},
      {R"({"model": "f:t", "messages": [{"role": "user", "content": "x"}], "logprobs": true})",
       true, 400, "logprobs"},
      {R"({"model": "f:t", "prompt": "x", "max_tokens": 3, "max_completion_tokens": 4})", false,
       400, "max_completion_tokens"},
  };
  for (const auto& c : cases) {
    CompletionRequest cr;
    auto e = ParseCompletionRequest(Json::parse(c.body), c.chat, "base", &cr);
    ASSERT_TRUE(e) << c.body;
    EXPECT_EQ(e->status, c.status) << c.body;
    EXPECT_EQ(e->param, c.param) << c.body;
  }
}

TEST(OpenAiMapping, GenerateErrorsNameTheRequestField) {
  CompletionRequest chat;
  chat.chat = true;
  chat.max_tokens_param = "max_completion_tokens";
  CompletionRequest text;
  auto err = [](grpc::StatusCode code, const char* msg, const CompletionRequest& r) {
    return GenerateError(grpc::Status(code, msg), r);
  };
  // INVALID_ARGUMENT: the server's message, the request it answers, the param.
  const struct {
    const char* message;
    const CompletionRequest& request;
    const char* param;
  } kInvalid[] = {
      {"temperature: must be in [0, 100]", text, "temperature"},
      {"top_k: negative", text, "metatt.top_k"},
      {"max_tokens: negative", chat, "max_completion_tokens"},
      {"prompt: 9000 tokens; ...", chat, "messages"},
      {"prompt: 9000 tokens; ...", text, "prompt"},
      {"messages[1].role: empty", chat, "messages[1].role"},
  };
  for (const auto& c : kInvalid) {
    EXPECT_EQ(err(grpc::StatusCode::INVALID_ARGUMENT, c.message, c.request).param, c.param)
        << c.message;
  }
  ApiError nf = err(grpc::StatusCode::NOT_FOUND, "family 'x' not found", chat);
  EXPECT_EQ(nf.status, 404);
  EXPECT_EQ(nf.param, "model");
  EXPECT_EQ(nf.code, "model_not_found");
  ApiError kind = err(grpc::StatusCode::FAILED_PRECONDITION,
                      "Generate: this server holds an encoder base model", chat);
  EXPECT_EQ(kind.status, 400);
  EXPECT_EQ(kind.param, "model");
  EXPECT_EQ(err(grpc::StatusCode::RESOURCE_EXHAUSTED, "queue full", text).status, 429);
  EXPECT_EQ(err(grpc::StatusCode::UNAUTHENTICATED, "unknown token", text).status, 401);
}

TEST(OpenAiMapping, CompletionObjects) {
  CompletionRequest chat;
  chat.chat = true;
  chat.model = "fam:qa";
  v1::GenerateResponse resp;
  resp.set_text("Paris.");
  resp.set_finish_reason("stop");
  resp.mutable_usage()->set_prompt_tokens(20);
  resp.mutable_usage()->set_completion_tokens(3);
  Json j = CompletionJson(resp, chat, "chatcmpl-1", 1700000000);
  EXPECT_EQ(j["object"], "chat.completion");
  EXPECT_EQ(j["model"], "fam:qa");
  EXPECT_EQ(j["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(j["choices"][0]["message"]["content"], "Paris.");
  EXPECT_EQ(j["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(j["usage"]["total_tokens"], 23);

  CompletionRequest text;
  text.model = "base";
  Json t = CompletionJson(resp, text, "cmpl-1", 1);
  EXPECT_EQ(t["object"], "text_completion");
  EXPECT_EQ(t["choices"][0]["text"], "Paris.");
  EXPECT_FALSE(t["choices"][0].contains("message"));

  v1::GenerateChunk c;
  c.set_text("Par");
  chat.include_usage = true;
  Json first = CompletionChunkJson(c, chat, "chatcmpl-1", 1, /*first=*/true);
  EXPECT_EQ(first["object"], "chat.completion.chunk");
  EXPECT_EQ(first["choices"][0]["delta"]["role"], "assistant");
  EXPECT_EQ(first["choices"][0]["delta"]["content"], "Par");
  EXPECT_TRUE(first["choices"][0]["finish_reason"].is_null());
  EXPECT_TRUE(first.contains("usage") && first["usage"].is_null());
  c.set_text("is.");
  c.set_finish_reason("length");
  Json last = CompletionChunkJson(c, chat, "chatcmpl-1", 1, /*first=*/false);
  EXPECT_FALSE(last["choices"][0]["delta"].contains("role"));
  EXPECT_EQ(last["choices"][0]["finish_reason"], "length");
  Json usage = UsageChunkJson(resp.usage(), chat, "chatcmpl-1", 1);
  EXPECT_TRUE(usage["choices"].empty());
  EXPECT_EQ(usage["usage"]["completion_tokens"], 3);
  Json tc = CompletionChunkJson(c, text, "cmpl-1", 1, true);
  EXPECT_EQ(tc["object"], "text_completion");
  EXPECT_EQ(tc["choices"][0]["text"], "is.");
  EXPECT_EQ(SseEvent("[DONE]"), "data: [DONE]\n\n");
}

TEST(OpenAiMapping, ClassificationRequestCrossesInputsAndModels) {
  v1::PredictRequest req;
  std::vector<std::pair<int, std::string>> rows;
  ASSERT_FALSE(ParseClassification(
      Json::parse(R"({"model": ["f:a", "f:b"], "input": ["x", {"text": "y", "text_pair": "z"}]})"),
      &req, &rows));
  ASSERT_EQ(req.inputs_size(), 4);
  EXPECT_EQ(req.inputs(1).task(), "b");
  EXPECT_EQ(req.inputs(2).text_pair(), "z");
  EXPECT_EQ(rows[3], (std::pair<int, std::string>{1, "f:b"}));
  v1::PredictRequest bad;
  rows.clear();
  auto e = ParseClassification(Json::parse(R"({"model": "nocolon", "input": "x"})"), &bad, &rows);
  ASSERT_TRUE(e);
  EXPECT_EQ(e->param, "model");
}

TEST(OpenAiMapping, CheckpointObject) {
  v1::JobCheckpoint c;
  c.set_job_id("job-1");
  c.set_step(50);
  c.set_total_steps(200);
  c.set_time_unix_ms(1712211699000);
  (*c.mutable_metrics())["loss"] = 0.25;
  (*c.mutable_metrics())["sst2/accuracy"] = 0.875;
  Json j = CheckpointJson(c);
  EXPECT_EQ(j["object"], "fine_tuning.job.checkpoint");
  EXPECT_EQ(j["id"], "ftckpt-job-1-50");
  EXPECT_EQ(j["created_at"], 1712211699);
  EXPECT_EQ(j["fine_tuning_job_id"], "job-1");
  EXPECT_EQ(j["step_number"], 50);
  EXPECT_TRUE(j["fine_tuned_model_checkpoint"].is_null());
  EXPECT_EQ(j["metrics"]["step"], 50);
  EXPECT_EQ(j["metrics"]["train_loss"], 0.25);
  EXPECT_EQ(j["metrics"]["sst2/accuracy"], 0.875);
  EXPECT_FALSE(j["metrics"].contains("loss"));
}

}  // namespace
}  // namespace metatt::http
