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
  Json j = JobJson(job, JobView{"base", 2.5e-3});
  EXPECT_EQ(j["status"], "succeeded");
  EXPECT_EQ(j["fine_tuned_model"], "sent:SST-2");
  EXPECT_EQ(j["model"], "base");
  EXPECT_EQ(j["finished_at"], 9);
  EXPECT_DOUBLE_EQ(j["hyperparameters"]["learning_rate_multiplier"].get<double>(), 2.0);
  EXPECT_EQ(j["hyperparameters"]["batch_size"], "auto");

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
  v1::DatasetHeader h3;
  auto e = DatasetHeaderFor("chat.jsonl", R"({"messages": []})", "", &h3);
  ASSERT_TRUE(e);
  EXPECT_EQ(e->code, "model_kind_not_supported");
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
