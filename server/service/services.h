// Thin gRPC services: parse/validate the request, call the core
// (JobManager, DatasetManager, Store, AdapterCatalog, Predictor), map the
// status with ToGrpcStatus. No rule lives here that a core class could own.
// Every RPC first reads its Caller, authenticated once by the server's
// interceptor (auth.h: InstallAuthentication, CallerOf), and hands it to the
// core, which filters by tenant.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <utility>

#include "metatt/v1/adapters.grpc.pb.h"
#include "metatt/v1/datasets.grpc.pb.h"
#include "metatt/v1/inference.grpc.pb.h"
#include "metatt/v1/jobs.grpc.pb.h"
#include "server/runtime/generator_api.h"
#include "server/runtime/predictor_api.h"
#include "server/jobs/adapter_catalog.h"
#include "server/jobs/dataset_manager.h"
#include "server/jobs/job_manager.h"
#include "server/store/store.h"
#include "server/jobs/tenants.h"
#include "server/service/auth.h"

namespace metatt {

struct ServerMetrics;

class JobServiceImpl final : public v1::JobService::Service {
 public:
  explicit JobServiceImpl(JobManager* jobs) : jobs_(jobs) {}
  grpc::Status CreateJob(grpc::ServerContext* ctx, const v1::CreateJobRequest* req,
                         v1::CreateJobResponse* resp) override;
  grpc::Status GetJob(grpc::ServerContext* ctx, const v1::GetJobRequest* req,
                      v1::GetJobResponse* resp) override;
  grpc::Status ListJobs(grpc::ServerContext* ctx, const v1::ListJobsRequest* req,
                        v1::ListJobsResponse* resp) override;
  grpc::Status CancelJob(grpc::ServerContext* ctx, const v1::CancelJobRequest* req,
                         v1::CancelJobResponse* resp) override;
  grpc::Status ListJobCheckpoints(grpc::ServerContext* ctx,
                                  const v1::ListJobCheckpointsRequest* req,
                                  v1::ListJobCheckpointsResponse* resp) override;
  grpc::Status StreamJobEvents(grpc::ServerContext* ctx, const v1::StreamJobEventsRequest* req,
                               grpc::ServerWriter<v1::JobEvent>* writer) override;

 private:
  JobManager* jobs_;
};

class DatasetServiceImpl final : public v1::DatasetService::Service {
 public:
  explicit DatasetServiceImpl(DatasetManager* datasets) : datasets_(datasets) {}
  grpc::Status UploadDataset(grpc::ServerContext* ctx,
                             grpc::ServerReader<v1::UploadDatasetRequest>* reader,
                             v1::UploadDatasetResponse* resp) override;
  grpc::Status GetDataset(grpc::ServerContext* ctx, const v1::GetDatasetRequest* req,
                          v1::GetDatasetResponse* resp) override;
  grpc::Status ListDatasets(grpc::ServerContext* ctx, const v1::ListDatasetsRequest* req,
                            v1::ListDatasetsResponse* resp) override;
  grpc::Status DeleteDataset(grpc::ServerContext* ctx, const v1::DeleteDatasetRequest* req,
                             v1::DeleteDatasetResponse* resp) override;

 private:
  DatasetManager* datasets_;
};

struct AdapterServiceOptions {
  Store* store = nullptr;             // listing (required)
  AdapterCatalog* catalog = nullptr;  // delete task / import; null = UNIMPLEMENTED
  int64_t max_import_bytes = 1ll << 30;
  // Called after a family changed (import, task deleted), e.g. to reload it.
  std::function<void(const std::string& family)> on_family_changed;
  FamilyAccess* families = nullptr;  // ownership rules; null = one over `store`
};

class AdapterServiceImpl final : public v1::AdapterService::Service {
 public:
  explicit AdapterServiceImpl(AdapterServiceOptions options) : options_(std::move(options)) {
    if (options_.families == nullptr) {
      own_families_ = std::make_unique<FamilyAccess>(options_.store);
      options_.families = own_families_.get();
    }
  }
  grpc::Status ListFamilies(grpc::ServerContext* ctx, const v1::ListFamiliesRequest* req,
                            v1::ListFamiliesResponse* resp) override;
  grpc::Status GetFamily(grpc::ServerContext* ctx, const v1::GetFamilyRequest* req,
                         v1::GetFamilyResponse* resp) override;
  grpc::Status ListTasks(grpc::ServerContext* ctx, const v1::ListTasksRequest* req,
                         v1::ListTasksResponse* resp) override;
  grpc::Status DeleteTask(grpc::ServerContext* ctx, const v1::DeleteTaskRequest* req,
                          v1::DeleteTaskResponse* resp) override;
  grpc::Status ExportFamily(grpc::ServerContext* ctx, const v1::ExportFamilyRequest* req,
                            grpc::ServerWriter<v1::FamilyChunk>* writer) override;
  grpc::Status ImportFamily(grpc::ServerContext* ctx,
                            grpc::ServerReader<v1::ImportFamilyRequest>* reader,
                            v1::ImportFamilyResponse* resp) override;

 private:
  AdapterServiceOptions options_;
  std::unique_ptr<FamilyAccess> own_families_;
};

struct InferenceServiceOptions {
  Predictor* predictor = nullptr;  // null = UNAVAILABLE (no runtime)
  Generator* generator = nullptr;  // null = UNAVAILABLE (no runtime)
  ServerMetrics* metrics = nullptr;
  int64_t max_inputs = 1024;
  FamilyAccess* families = nullptr;  // ownership of the families inputs name; null = no check
};

class InferenceServiceImpl final : public v1::InferenceService::Service {
 public:
  explicit InferenceServiceImpl(InferenceServiceOptions options) : options_(options) {}
  grpc::Status Predict(grpc::ServerContext* ctx, const v1::PredictRequest* req,
                       v1::PredictResponse* resp) override;
  grpc::Status GenerateStream(grpc::ServerContext* ctx, const v1::GenerateRequest* req,
                              grpc::ServerWriter<v1::GenerateChunk>* writer) override;
  grpc::Status Generate(grpc::ServerContext* ctx, const v1::GenerateRequest* req,
                        v1::GenerateResponse* resp) override;

 private:
  // Both Generate forms: every chunk goes to `on_chunk`.
  grpc::Status RunGenerate(grpc::ServerContext* ctx, const v1::GenerateRequest* req,
                           const std::function<bool(const GenerateChunk&)>& on_chunk);
  InferenceServiceOptions options_;
};

// The four services over their cores, built and mounted together: the
// server, the service test and the service fuzzer each hold one.
struct Services {
  Services(JobManager* jobs, DatasetManager* datasets, AdapterServiceOptions adapter_options,
           InferenceServiceOptions inference_options)
      : job(jobs),
        dataset(datasets),
        adapter(std::move(adapter_options)),
        inference(inference_options) {}

  // The four on `builder`, behind the authentication interceptor (`auth`
  // null: authentication off, every caller is Caller::Local()).
  void Register(grpc::ServerBuilder* builder, const Authenticator* auth) {
    InstallAuthentication(builder, auth);
    builder->RegisterService(&job);
    builder->RegisterService(&dataset);
    builder->RegisterService(&adapter);
    builder->RegisterService(&inference);
  }

  JobServiceImpl job;
  DatasetServiceImpl dataset;
  AdapterServiceImpl adapter;
  InferenceServiceImpl inference;
};

}  // namespace metatt
