// Tests (the service test, the service fuzzer): the four services served
// in-process, with no port, and one client stub per service on its channel.
#pragma once

#include <grpcpp/grpcpp.h>

#include <memory>

#include "server/service/services.h"

namespace metatt {

struct InProcessServer {
  // Serves `services` behind `auth` (null: authentication off). `server` is
  // null, and so are the stubs, when gRPC could not start it.
  InProcessServer(Services* services, const Authenticator* auth) {
    grpc::ServerBuilder builder;
    services->Register(&builder, auth);
    server = builder.BuildAndStart();
    if (server == nullptr) return;
    auto channel = server->InProcessChannel(grpc::ChannelArguments());
    jobs = v1::JobService::NewStub(channel);
    datasets = v1::DatasetService::NewStub(channel);
    adapters = v1::AdapterService::NewStub(channel);
    inference = v1::InferenceService::NewStub(channel);
  }

  std::unique_ptr<grpc::Server> server;
  std::unique_ptr<v1::JobService::Stub> jobs;
  std::unique_ptr<v1::DatasetService::Stub> datasets;
  std::unique_ptr<v1::AdapterService::Stub> adapters;
  std::unique_ptr<v1::InferenceService::Stub> inference;
};

}  // namespace metatt
