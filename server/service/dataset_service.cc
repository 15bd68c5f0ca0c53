#include "absl/strings/str_cat.h"
#include "server/service/grpc_status.h"
#include "server/service/proto_convert.h"
#include "server/service/services.h"

namespace metatt {

grpc::Status DatasetServiceImpl::UploadDataset(grpc::ServerContext* ctx,
                                               grpc::ServerReader<v1::UploadDatasetRequest>* reader,
                                               v1::UploadDatasetResponse* resp) {
  auto caller = CallerOf(ctx);
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  v1::UploadDatasetRequest msg;
  if (!reader->Read(&msg) || !msg.has_header()) {
    return ToGrpcStatus(
        absl::InvalidArgumentError("header: the first message of an upload must be the header"));
  }
  auto header = FromProto(msg.header());
  if (!header.ok()) return ToGrpcStatus(header.status());
  std::string bytes;
  // The stream stops at the caller's allowance (the upload limit or what is
  // left of the tenant's quota), never buffering past it.
  auto allowance = datasets_->AllowanceFor(*caller);
  if (!allowance.ok()) return ToGrpcStatus(allowance.status());
  const int64_t limit = allowance->bytes;
  int64_t index = 1;
  while (reader->Read(&msg)) {
    if (msg.has_header()) {
      return ToGrpcStatus(absl::InvalidArgumentError(
          absl::StrCat("message ", index, ": a second header; send chunks after the header")));
    }
    if (static_cast<int64_t>(bytes.size() + msg.chunk().size()) > limit) {
      return ToGrpcStatus(absl::ResourceExhaustedError(
          absl::StrCat("dataset '", header->name, "' exceeds ", allowance->limit, " (",
                       allowance->explanation, ")")));
    }
    bytes += msg.chunk();
    ++index;
  }
  auto d = datasets_->Upload(*header, bytes, *caller);
  if (!d.ok()) return ToGrpcStatus(d.status());
  ToProto(*d, resp->mutable_dataset());
  return grpc::Status::OK;
}

grpc::Status DatasetServiceImpl::GetDataset(grpc::ServerContext* ctx,
                                            const v1::GetDatasetRequest* req,
                                            v1::GetDatasetResponse* resp) {
  auto caller = CallerOf(ctx);
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  if (req->dataset_id().empty()) {
    return ToGrpcStatus(absl::InvalidArgumentError("dataset_id: required"));
  }
  auto d = datasets_->Get(req->dataset_id(), *caller);
  if (!d.ok()) return ToGrpcStatus(d.status());
  ToProto(*d, resp->mutable_dataset());
  return grpc::Status::OK;
}

grpc::Status DatasetServiceImpl::ListDatasets(grpc::ServerContext* ctx,
                                              const v1::ListDatasetsRequest*,
                                              v1::ListDatasetsResponse* resp) {
  auto caller = CallerOf(ctx);
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  auto all = datasets_->List(*caller);
  if (!all.ok()) return ToGrpcStatus(all.status());
  for (const auto& d : *all) ToProto(d, resp->add_datasets());
  return grpc::Status::OK;
}

grpc::Status DatasetServiceImpl::DeleteDataset(grpc::ServerContext* ctx,
                                               const v1::DeleteDatasetRequest* req,
                                               v1::DeleteDatasetResponse*) {
  auto caller = CallerOf(ctx);
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  if (req->dataset_id().empty()) {
    return ToGrpcStatus(absl::InvalidArgumentError("dataset_id: required"));
  }
  return ToGrpcStatus(datasets_->Delete(req->dataset_id(), *caller));
}

}  // namespace metatt
