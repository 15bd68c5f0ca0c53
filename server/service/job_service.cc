#include "base/status_macros.h"
#include "server/service/handler.h"
#include "server/service/proto_convert.h"
#include "server/service/services.h"

namespace metatt {

grpc::Status JobServiceImpl::CreateJob(grpc::ServerContext* ctx, const v1::CreateJobRequest* req,
                                       v1::CreateJobResponse* resp) {
  return Serve(ctx, [&](const Caller& caller) -> absl::Status {
    ASSIGN_OR_RETURN(JobSpec spec, FromProto(req->spec()));
    spec.idempotency_key = req->idempotency_key();
    return AnswerWith(jobs_->CreateJob(spec, caller), resp->mutable_job());
  });
}

grpc::Status JobServiceImpl::GetJob(grpc::ServerContext* ctx, const v1::GetJobRequest* req,
                                    v1::GetJobResponse* resp) {
  return Serve(ctx, [&](const Caller& caller) -> absl::Status {
    if (req->job_id().empty()) return absl::InvalidArgumentError("job_id: required");
    return AnswerWith(jobs_->GetJob(req->job_id(), caller), resp->mutable_job());
  });
}

grpc::Status JobServiceImpl::ListJobs(grpc::ServerContext* ctx, const v1::ListJobsRequest* req,
                                      v1::ListJobsResponse* resp) {
  return Serve(ctx, [&](const Caller& caller) -> absl::Status {
    ASSIGN_OR_RETURN(const auto state, FromProto(req->state()));
    std::string next;
    ASSIGN_OR_RETURN(const auto jobs,
                     jobs_->ListJobs(state, req->page_size(), req->page_token(), &next, caller));
    for (const auto& j : jobs) ToProto(j, resp->add_jobs());
    resp->set_next_page_token(next);
    return absl::OkStatus();
  });
}

grpc::Status JobServiceImpl::ListJobCheckpoints(grpc::ServerContext* ctx,
                                                const v1::ListJobCheckpointsRequest* req,
                                                v1::ListJobCheckpointsResponse* resp) {
  return Serve(ctx, [&](const Caller& caller) -> absl::Status {
    if (req->job_id().empty()) return absl::InvalidArgumentError("job_id: required");
    ASSIGN_OR_RETURN(const auto checkpoints, jobs_->ListJobCheckpoints(req->job_id(), caller));
    for (const JobCheckpointInfo& c : checkpoints) {
      v1::JobCheckpoint* out = resp->add_checkpoints();
      out->set_job_id(req->job_id());
      out->set_step(c.step);
      out->set_total_steps(c.total_steps);
      out->set_time_unix_ms(c.time_unix_ms);
      for (const auto& [k, v] : c.metrics) (*out->mutable_metrics())[k] = v;
    }
    return absl::OkStatus();
  });
}

grpc::Status JobServiceImpl::CancelJob(grpc::ServerContext* ctx, const v1::CancelJobRequest* req,
                                       v1::CancelJobResponse* resp) {
  return Serve(ctx, [&](const Caller& caller) -> absl::Status {
    if (req->job_id().empty()) return absl::InvalidArgumentError("job_id: required");
    return AnswerWith(jobs_->CancelJob(req->job_id(), caller), resp->mutable_job());
  });
}

grpc::Status JobServiceImpl::StreamJobEvents(grpc::ServerContext* ctx,
                                             const v1::StreamJobEventsRequest* req,
                                             grpc::ServerWriter<v1::JobEvent>* writer) {
  return Serve(ctx, [&](const Caller& caller) -> absl::Status {
    if (req->job_id().empty()) return absl::InvalidArgumentError("job_id: required");
    ASSIGN_OR_RETURN(const auto sub, jobs_->Subscribe(req->job_id(), caller));
    JobEvent e;
    while (!ctx->IsCancelled()) {
      auto r = sub->Next(&e, absl::Milliseconds(200));
      if (r == JobEventSubscription::Result::kEnd) return absl::OkStatus();
      if (r == JobEventSubscription::Result::kTimeout) continue;
      v1::JobEvent msg;
      ToProto(req->job_id(), sub->sequence(), e, &msg);
      if (msg.has_checkpoint()) {  // the family by the caller's name (tenants.h)
        msg.mutable_checkpoint()->set_family(FamilyNameFor(caller, e.family));
      }
      if (msg.has_state()) msg.mutable_state()->set_reason(WithFamilyNamesFor(caller, e.message));
      if (msg.has_log()) msg.mutable_log()->set_message(WithFamilyNamesFor(caller, e.message));
      if (!writer->Write(msg)) return absl::CancelledError("client went away");
    }
    return absl::CancelledError("client cancelled the stream");
  });
}

}  // namespace metatt
