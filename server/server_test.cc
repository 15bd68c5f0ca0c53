// A whole Server in-process (skipped when the base model is not installed):
// SQLite in a scratch directory, the real MiniLM encoder on the CPU, gRPC on
// 127.0.0.1:0 and /metrics on a free port; a health check, RPCs through the
// authentication interceptor, then a graceful Shutdown.
#include "server/server.h"

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <thread>

#include "metatt/v1/adapters.grpc.pb.h"
#include "metatt/v1/inference.grpc.pb.h"
#include "server/jobs/tenants.h"
#include "server/registry/test_util.h"

namespace metatt {
namespace {

using testing_util::ScratchDir;

std::string ModelDir() {
  const char* src = std::getenv("METATT_SOURCE_DIR");
  const std::string dir = std::string(src ? src : ".") + "/models/all-MiniLM-L6-v2";
  return std::filesystem::exists(dir + "/config.json") ? dir : "";
}

Server::Options TestOptions(const std::string& data_dir) {
  Server::Options o;
  o.listen = "127.0.0.1:0";
  o.metrics_listen = "127.0.0.1:0";
  o.data_dir = data_dir;
  o.runtime.model_dir = ModelDir();
  o.runtime.device = "cpu";
  o.shutdown_grace_ms = 1000;
  return o;
}

// grpc.health.v1.Health/Check for the whole server ("" service), without a
// token: the serialized HealthCheckResponse (status SERVING = "\x08\x01").
std::string HealthCheck(const std::shared_ptr<grpc::Channel>& channel, grpc::Status* status) {
  grpc::GenericStub stub(channel);
  grpc::CompletionQueue cq;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  grpc::Slice empty("");  // an empty HealthCheckRequest
  grpc::ByteBuffer request(&empty, 1), response;
  auto call = stub.PrepareUnaryCall(&ctx, "/grpc.health.v1.Health/Check", request, &cq);
  call->StartCall();
  call->Finish(&response, status, reinterpret_cast<void*>(1));
  void* tag = nullptr;
  bool ok = false;
  EXPECT_TRUE(cq.Next(&tag, &ok));
  std::vector<grpc::Slice> slices;
  std::string out;
  if (status->ok() && response.Dump(&slices).ok()) {
    for (const auto& s : slices) out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  }
  return out;
}

TEST(ServerTest, StartsServesAndShutsDownInProcess) {
  if (ModelDir().empty()) GTEST_SKIP() << "base model not installed";
  ScratchDir dir;
  auto server = Server::Create(TestOptions(dir.path() + "/data"));
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_TRUE((*server)->Start().ok());
  EXPECT_GT((*server)->port(), 0);
  EXPECT_GT((*server)->metrics_port(), 0);

  auto channel = grpc::CreateChannel((*server)->target(), grpc::InsecureChannelCredentials());
  grpc::Status health;
  EXPECT_EQ(HealthCheck(channel, &health), std::string("\x08\x01", 2));
  EXPECT_TRUE(health.ok()) << health.error_message();

  // Authentication off: the local default tenant sees an empty registry.
  auto adapters = v1::AdapterService::NewStub(channel);
  {
    grpc::ClientContext ctx;
    v1::ListFamiliesResponse resp;
    grpc::Status st = adapters->ListFamilies(&ctx, v1::ListFamiliesRequest(), &resp);
    EXPECT_TRUE(st.ok()) << st.error_message();
    EXPECT_EQ(resp.families_size(), 0);
  }
  // Through the runtime: a family nobody published is NOT_FOUND.
  auto inference = v1::InferenceService::NewStub(channel);
  {
    grpc::ClientContext ctx;
    v1::PredictRequest req;
    auto* in = req.add_inputs();
    in->set_family("nope");
    in->set_task("t");
    in->set_text("a fine film");
    v1::PredictResponse resp;
    EXPECT_EQ(inference->Predict(&ctx, req, &resp).error_code(), grpc::StatusCode::NOT_FOUND);
  }

  std::thread waiter([&] { (*server)->Wait(); });
  (*server)->Shutdown("test");
  waiter.join();
  (*server)->Shutdown("again");  // idempotent
}

TEST(ServerTest, TokensAreCheckedOnceByTheInterceptorAndHealthStaysOpen) {
  if (ModelDir().empty()) GTEST_SKIP() << "base model not installed";
  ScratchDir dir;
  const std::string token = "a-token-of-at-least-sixteen-chars";
  const std::string tokens_file = dir.path() + "/tokens.json";
  {
    std::ofstream f(tokens_file);
    f << R"({"tokens": [{"tenant": "acme", "role": "user", "token_sha256": ")"
      << HashToken(token) << R"("}]})";
  }
  Server::Options o = TestOptions(dir.path() + "/data");
  o.metrics_listen = "";
  o.auth_tokens = tokens_file;
  auto server = Server::Create(o);
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_TRUE((*server)->Start().ok());
  EXPECT_EQ((*server)->metrics_port(), 0);
  auto channel = grpc::CreateChannel((*server)->target(), grpc::InsecureChannelCredentials());
  grpc::Status health;
  EXPECT_EQ(HealthCheck(channel, &health), std::string("\x08\x01", 2));

  auto adapters = v1::AdapterService::NewStub(channel);
  for (const std::string& header : {std::string(), std::string("Bearer wrong-token-xxxxxxxxxx"),
                                    std::string("Basic abc")}) {
    grpc::ClientContext ctx;
    if (!header.empty()) ctx.AddMetadata("authorization", header);
    v1::ListFamiliesResponse resp;
    grpc::Status st = adapters->ListFamilies(&ctx, v1::ListFamiliesRequest(), &resp);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAUTHENTICATED) << header;
  }
  // Unauthenticated Predict: UNAUTHENTICATED even though its input is invalid.
  {
    grpc::ClientContext ctx;
    v1::PredictResponse resp;
    auto inference = v1::InferenceService::NewStub(channel);
    EXPECT_EQ(inference->Predict(&ctx, v1::PredictRequest(), &resp).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
  }
  {
    grpc::ClientContext ctx;
    ctx.AddMetadata("authorization", "Bearer " + token);
    v1::ListFamiliesResponse resp;
    grpc::Status st = adapters->ListFamilies(&ctx, v1::ListFamiliesRequest(), &resp);
    EXPECT_TRUE(st.ok()) << st.error_message();
  }
  (*server)->Shutdown("test");
}

}  // namespace
}  // namespace metatt
