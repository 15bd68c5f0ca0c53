// The services over an in-process gRPC channel with the real SQLite store,
// job and dataset managers, a FakeExecutor and a fake Predictor.
#include <gmock/gmock.h>
#include <google/protobuf/text_format.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <thread>
#include <tuple>

#include <nlohmann/json.hpp>

#include "server/store/job_json.h"
#include "server/store/sqlite_store.h"
#include "server/store/store_test_util.h"
#include "server/jobs/test_util.h"
#include "server/monitoring/server_metrics.h"
#include "server/service/grpc_status.h"
#include "server/service/in_process.h"
#include "server/service/proto_convert.h"
#include "server/service/services.h"

namespace metatt {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

class FakePredictor : public Predictor {
 public:
  absl::StatusOr<std::vector<PredictOutput>> Predict(const std::vector<PredictInput>& inputs,
                                                     int64_t) override {
    std::vector<PredictOutput> out;
    for (size_t i = 0; i < inputs.size(); ++i) {
      if (inputs[i].task != "MRPC") {
        return absl::NotFoundError(
            absl::StrCat("inputs[", i, "].task: no task '", inputs[i].task, "' in family 'glue'"));
      }
      PredictOutput o;
      o.task = "MRPC";
      o.label = 1;
      o.label_name = "1";
      o.scores = {0.25f, 0.75f};
      out.push_back(o);
    }
    return out;
  }
};

class ServiceTest : public testing_util::SqliteStoreFixture {
 protected:
  void SetUp() override {
    SqliteStoreFixture::SetUp();
    DatasetManagerOptions dopt;
    dopt.data_dir = (dir_ / "data").string();
    dopt.parse = FakeDatasetParse;
    datasets_ = std::move(*DatasetManager::Create(dopt, store_.get()));
    jobs_ = std::move(*JobManager::Create({}, store_.get(), &executor_));
    metrics_ = MetricsRegistry::Create();
    AdapterServiceOptions aopt;
    aopt.store = store_.get();
    InferenceServiceOptions iopt;
    iopt.predictor = &predictor_;
    iopt.metrics = &metrics_->metrics();
    services_ = std::make_unique<Services>(jobs_.get(), datasets_.get(), aopt, iopt);
    rpc_ = std::make_unique<InProcessServer>(services_.get(), /*auth=*/nullptr);
  }
  void TearDown() override {
    jobs_->Shutdown();
    rpc_->server->Shutdown();
  }
  grpc::Status Upload(const std::string& bytes, v1::UploadDatasetResponse* resp) {
    grpc::ClientContext ctx;
    auto w = rpc_->datasets->UploadDataset(&ctx, resp);
    v1::UploadDatasetRequest h;
    h.mutable_header()->set_name("tiny");
    h.mutable_header()->set_text_column("0");
    h.mutable_header()->set_label_column("1");
    w->Write(h);
    for (size_t off = 0; off < bytes.size(); off += 7) {
      v1::UploadDatasetRequest c;
      c.set_chunk(bytes.substr(off, 7));
      w->Write(c);
    }
    w->WritesDone();
    return w->Finish();
  }
  // One unary RPC as the local caller, in a context of its own.
  template <typename Stub, typename Request, typename Response>
  static grpc::Status Call(Stub* stub,
                           grpc::Status (Stub::*rpc)(grpc::ClientContext*, const Request&,
                                                     Response*),
                           const Request& req, Response* resp) {
    grpc::ClientContext ctx;
    return (stub->*rpc)(&ctx, req, resp);
  }
  // The same with the request in protobuf text format and the response
  // dropped: an RPC that only its status answers.
  template <typename Stub, typename Request, typename Response>
  static grpc::Status Send(Stub* stub,
                           grpc::Status (Stub::*rpc)(grpc::ClientContext*, const Request&,
                                                     Response*),
                           const std::string& request_text) {
    Request req;
    EXPECT_TRUE(google::protobuf::TextFormat::ParseFromString(request_text, &req))
        << request_text;
    Response resp;
    return Call(stub, rpc, req, &resp);
  }
  // Publishes `f` in the store, then lists the families over gRPC.
  v1::ListFamiliesResponse PublishAndList(const FamilyVersionRecord& f) {
    EXPECT_TRUE(store_->PublishFamilyVersion(f).ok());
    v1::ListFamiliesResponse resp;
    auto st = Call(rpc_->adapters.get(), &v1::AdapterService::Stub::ListFamilies,
                   v1::ListFamiliesRequest(), &resp);
    EXPECT_TRUE(st.ok()) << st.error_message();
    return resp;
  }

  std::unique_ptr<DatasetManager> datasets_;
  FakeExecutor executor_;
  FakePredictor predictor_;
  std::unique_ptr<JobManager> jobs_;
  std::unique_ptr<MetricsRegistry> metrics_;
  std::unique_ptr<Services> services_;
  std::unique_ptr<InProcessServer> rpc_;
};

// proto3 `optional` presence: a field set to 0 is used where 0 means
// something; an unset field stays "auto" and reads back unset.
TEST(ProtoConvertTest, HyperParametersFollowPresence) {
  v1::JobSpec p;
  p.set_family("fam");
  p.add_tasks()->set_task_name("t");
  auto* h = p.mutable_hparams();
  h->set_weight_decay(0);
  h->set_eval_every(0);
  h->set_seed(0);
  h->set_max_steps(0);  // never valid: read as unset, as older clients send it
  h->set_head_lr_multiplier(3);
  h->set_head_first_ratio(0.1);
  p.mutable_adapter()->set_new_task_init("zeros");
  auto s = FromProto(p);
  ASSERT_TRUE(s.ok()) << s.status();
  // Exactly these fields are set (0 included), with these values: the spec
  // as the store keeps it (job_json.h writes the set fields only).
  const auto kept = nlohmann::json::parse(JobSpecToJson(*s));
  EXPECT_EQ(kept["hparams"], nlohmann::json::parse(R"({"weight_decay": 0, "eval_every": 0,
                                                       "seed": 0, "head_lr_multiplier": 3,
                                                       "head_first_ratio": 0.1})"))
      << kept.dump();
  EXPECT_EQ(kept["adapter"], nlohmann::json::parse(R"({"new_task_init": "zeros"})"))
      << kept.dump();
  v1::JobSpec back;
  ToProto(*s, &back);
  EXPECT_TRUE(back.hparams().has_weight_decay());
  EXPECT_FALSE(back.hparams().has_learning_rate());
  EXPECT_FALSE(back.hparams().has_max_steps());
  EXPECT_FALSE(back.adapter().has_alpha());
  EXPECT_DOUBLE_EQ(back.hparams().head_lr_multiplier(), 3);
  EXPECT_DOUBLE_EQ(back.hparams().head_first_ratio(), 0.1);
  EXPECT_EQ(back.adapter().new_task_init(), "zeros");
}

TEST(GrpcStatusTest, MapsCodesAndKeepsMessages) {
  auto s = ToGrpcStatus(absl::ResourceExhaustedError("queue full"));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(s.error_message(), "queue full");
  EXPECT_EQ(ToGrpcStatus(absl::NotFoundError("x")).error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(ToGrpcStatus(absl::FailedPreconditionError("x")).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(ToGrpcStatus(absl::UnauthenticatedError("x")).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_TRUE(ToGrpcStatus(absl::OkStatus()).ok());
  EXPECT_TRUE(absl::IsPermissionDenied(
      FromGrpcStatus(grpc::Status(grpc::StatusCode::PERMISSION_DENIED, "no"))));
}

TEST_F(ServiceTest, UploadCreateStreamToSuccess) {
  v1::UploadDatasetResponse up;
  auto st = Upload("good\t1\nbad\t0\nfine\t1\n", &up);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(up.dataset().num_rows(), 3);
  EXPECT_EQ(up.dataset().label_names_size(), 2);

  v1::CreateJobRequest req;
  req.mutable_spec()->set_family("glue");
  auto* t = req.mutable_spec()->add_tasks();
  t->set_task_name("MRPC");
  t->set_dataset_id(up.dataset().id());
  req.mutable_spec()->mutable_hparams()->set_max_steps(4);
  req.set_idempotency_key("k");
  v1::CreateJobResponse created;
  ASSERT_TRUE(Call(rpc_->jobs.get(), &v1::JobService::Stub::CreateJob, req, &created).ok());
  EXPECT_EQ(created.job().state(), v1::QUEUED);
  EXPECT_EQ(created.job().spec().adapter().form(), "4+1d");  // server default
  EXPECT_EQ(created.job().total_steps(), 4);
  v1::CreateJobResponse again;
  ASSERT_TRUE(Call(rpc_->jobs.get(), &v1::JobService::Stub::CreateJob, req, &again).ok());
  EXPECT_EQ(again.job().id(), created.job().id());
  const std::string id = created.job().id();
  ASSERT_TRUE(executor_.WaitStarted(id));
  grpc::ClientContext sctx;
  v1::StreamJobEventsRequest sreq;
  sreq.set_job_id(id);
  auto reader = rpc_->jobs->StreamJobEvents(&sctx, sreq);
  std::thread driver([&] {
    for (int s = 1; s <= 4; ++s) executor_.Progress(id, s, 4, 1.0 / s);
    executor_.Succeed(id, "glue", 1);
  });
  v1::JobEvent ev;
  int progress = 0;
  int64_t last_seq = -1;
  v1::JobState last_state = v1::JOB_STATE_UNSPECIFIED;
  while (reader->Read(&ev)) {
    EXPECT_EQ(ev.sequence(), last_seq + 1);
    last_seq = ev.sequence();
    if (ev.has_progress()) ++progress;
    if (ev.has_state()) last_state = ev.state().state();
  }
  driver.join();
  EXPECT_TRUE(reader->Finish().ok());
  EXPECT_EQ(progress, 4);
  EXPECT_EQ(last_state, v1::SUCCEEDED);

  v1::ListJobsRequest lreq;
  lreq.set_state(v1::SUCCEEDED);
  v1::ListJobsResponse list;
  grpc::ClientContext lctx;
  ASSERT_TRUE(rpc_->jobs->ListJobs(&lctx, lreq, &list).ok());
  ASSERT_EQ(list.jobs_size(), 1);
  EXPECT_EQ(list.jobs(0).result_family(), "glue");
}

TEST_F(ServiceTest, MalformedUploadNamesLinesAndStoresNothing) {
  v1::UploadDatasetResponse up;
  auto st = Upload("ok\t1\nbroken\nok\t0\nbroken too\n", &up);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(st.error_message(), HasSubstr("line 2"));
  EXPECT_THAT(st.error_message(), HasSubstr("line 4"));
  v1::ListDatasetsResponse list;
  grpc::ClientContext ctx;
  ASSERT_TRUE(rpc_->datasets->ListDatasets(&ctx, {}, &list).ok());
  EXPECT_EQ(list.datasets_size(), 0);
}

TEST_F(ServiceTest, ErrorsMapToCodes) {
  using Code = grpc::StatusCode;
  const std::tuple<grpc::Status, Code, std::string> cases[] = {
      {Send(rpc_->jobs.get(), &v1::JobService::Stub::GetJob, R"(job_id: "job-nope")"),
       Code::NOT_FOUND, "job-nope"},
      {Send(rpc_->jobs.get(), &v1::JobService::Stub::CreateJob, R"(spec { family: "glue" })"),
       Code::INVALID_ARGUMENT, "spec.tasks"},
      {Send(rpc_->adapters.get(), &v1::AdapterService::Stub::ListTasks, R"(family: "nope")"),
       Code::NOT_FOUND, "nope"},
      {Send(rpc_->inference.get(), &v1::InferenceService::Stub::Predict,
            R"(inputs { family: "glue" task: "CoLA" text: "hello" })"),
       Code::NOT_FOUND, "CoLA"},
      {Send(rpc_->inference.get(), &v1::InferenceService::Stub::Predict,
            R"(inputs { text: "no task" })"),
       Code::INVALID_ARGUMENT, "inputs[0]"},
  };
  for (const auto& [st, code, part] : cases) {
    EXPECT_EQ(st.error_code(), code) << part << ": " << st.error_message();
    EXPECT_THAT(st.error_message(), HasSubstr(part));
  }
  EXPECT_THAT(metrics_->Render(),
              HasSubstr("metatt_predict_requests_total{code=\"NOT_FOUND\"} 1"));
}

TEST_F(ServiceTest, FamiliesListAndExportFromTheStore) {
  fs::path vdir = dir_ / "families" / "glue" / "1";
  fs::create_directories(vdir);
  { std::ofstream(vdir / "family.json") << R"({"name":"glue"})"; }
  { std::ofstream(vdir / "cores.safetensors") << std::string(100000, 'x'); }
  FamilyVersionRecord f;
  f.family = "glue";
  f.version = 1;
  f.form = "4+1d";
  f.path = vdir.string();
  f.config_json = R"({"ranks":[8,8,8]})";
  f.adapter_parameters = 777;
  f.tasks.push_back({"MRPC", 0, 2, false, {"0", "1"}, {{"f1", 0.8}}});
  const v1::ListFamiliesResponse fams = PublishAndList(f);
  ASSERT_EQ(fams.families_size(), 1);
  EXPECT_EQ(fams.families(0).versions(0).adapter_parameters(), 777);
  EXPECT_EQ(fams.families(0).versions(0).ranks_size(), 3);
  EXPECT_EQ(fams.families(0).versions(0).tasks(0).eval_metrics().at("f1"), 0.8);
  EXPECT_EQ(fams.families(0).versions(0).task_count(), 1);

  v1::ExportFamilyRequest req;
  req.set_family("glue");
  grpc::ClientContext ctx;
  auto reader = rpc_->adapters->ExportFamily(&ctx, req);
  std::map<std::string, std::string> files;
  std::string current;
  v1::FamilyChunk c;
  while (reader->Read(&c)) {
    if (!c.file_name().empty()) current = c.file_name();
    files[current] += c.data();
  }
  ASSERT_TRUE(reader->Finish().ok());
  ASSERT_EQ(files.size(), 2u);
  EXPECT_EQ(files["cores.safetensors"].size(), 100000u);
  EXPECT_EQ(files["family.json"], R"({"name":"glue"})");
}

// Large families: FamilyVersion inlines the first 100 tasks and task_count;
// ListTasks pages through every task (server/jobs/task_pages.h).
TEST_F(ServiceTest, LargeFamilyInlinesFirstTasksAndListTasksPages) {
  FamilyVersionRecord f;
  f.family = "big";
  f.version = 1;
  f.form = "4+1d";
  for (int64_t i = 0; i < 250; ++i) {
    TaskRecord t;
    t.name = absl::StrCat("task", i);
    t.index = i;
    t.num_labels = 2;
    f.tasks.push_back(std::move(t));
  }
  {
    const v1::ListFamiliesResponse resp = PublishAndList(f);
    ASSERT_EQ(resp.families_size(), 1);
    EXPECT_EQ(resp.families(0).versions(0).task_count(), 250);
    ASSERT_EQ(resp.families(0).versions(0).tasks_size(), 100);
    EXPECT_EQ(resp.families(0).versions(0).tasks(99).name(), "task99");
  }
  {
    grpc::ClientContext ctx;
    v1::GetFamilyRequest req;
    req.set_family("big");
    v1::GetFamilyResponse resp;
    ASSERT_TRUE(rpc_->adapters->GetFamily(&ctx, req, &resp).ok());
    EXPECT_EQ(resp.family().versions(0).task_count(), 250);
    EXPECT_EQ(resp.family().versions(0).tasks_size(), 100);
  }
  v1::ListTasksRequest req;
  req.set_family("big");
  req.set_page_size(100);
  std::vector<int64_t> seen;
  int pages = 0;
  do {
    grpc::ClientContext ctx;
    v1::ListTasksResponse resp;
    auto st = rpc_->adapters->ListTasks(&ctx, req, &resp);
    ASSERT_TRUE(st.ok()) << st.error_message();
    EXPECT_EQ(resp.task_count(), 250);
    EXPECT_EQ(resp.version(), 1);
    for (const auto& t : resp.tasks()) seen.push_back(t.index());
    req.set_page_token(resp.next_page_token());
    ++pages;
  } while (!req.page_token().empty());
  EXPECT_EQ(pages, 3);
  ASSERT_EQ(seen.size(), 250u);
  for (int64_t i = 0; i < 250; ++i) ASSERT_EQ(seen[i], i);

  for (auto [size, token, field] :
       {std::tuple<int, const char*, const char*>{100, "bogus", "page_token"},
        {100, "1:250", "page_token"},
        {-5, "", "page_size"}}) {
    grpc::ClientContext ctx;
    v1::ListTasksResponse resp;
    req.set_page_size(size);
    req.set_page_token(token);
    auto st = rpc_->adapters->ListTasks(&ctx, req, &resp);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << token;
    EXPECT_THAT(st.error_message(), HasSubstr(field));
  }
}

}  // namespace
}  // namespace metatt
