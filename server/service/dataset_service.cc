#include "absl/strings/str_cat.h"
#include "server/service/handler.h"
#include "server/service/proto_convert.h"
#include "server/service/services.h"

namespace metatt {

grpc::Status DatasetServiceImpl::UploadDataset(grpc::ServerContext* ctx,
                                               grpc::ServerReader<v1::UploadDatasetRequest>* reader,
                                               v1::UploadDatasetResponse* resp) {
  return Serve(ctx, [&](const Caller& caller) -> absl::Status {
    v1::UploadDatasetRequest msg;
    if (!reader->Read(&msg) || !msg.has_header()) {
      return absl::InvalidArgumentError(
          "header: the first message of an upload must be the header");
    }
    auto header = FromProto(msg.header());
    if (!header.ok()) return header.status();
    std::string bytes;
    // The stream stops at the caller's allowance (the upload limit or what is
    // left of the tenant's quota), never buffering past it.
    auto allowance = datasets_->AllowanceFor(caller);
    if (!allowance.ok()) return allowance.status();
    const int64_t limit = allowance->bytes;
    int64_t index = 1;
    while (reader->Read(&msg)) {
      if (msg.has_header()) {
        return absl::InvalidArgumentError(
            absl::StrCat("message ", index, ": a second header; send chunks after the header"));
      }
      if (static_cast<int64_t>(bytes.size() + msg.chunk().size()) > limit) {
        return absl::ResourceExhaustedError(absl::StrCat("dataset '", header->name, "' exceeds ",
                                                         allowance->limit, " (",
                                                         allowance->explanation, ")"));
      }
      bytes += msg.chunk();
      ++index;
    }
    return AnswerWith(datasets_->Upload(*header, bytes, caller), resp->mutable_dataset());
  });
}

grpc::Status DatasetServiceImpl::GetDataset(grpc::ServerContext* ctx,
                                            const v1::GetDatasetRequest* req,
                                            v1::GetDatasetResponse* resp) {
  return Serve(ctx, [&](const Caller& caller) -> absl::Status {
    if (req->dataset_id().empty()) {
      return absl::InvalidArgumentError("dataset_id: required");
    }
    return AnswerWith(datasets_->Get(req->dataset_id(), caller), resp->mutable_dataset());
  });
}

grpc::Status DatasetServiceImpl::ListDatasets(grpc::ServerContext* ctx,
                                              const v1::ListDatasetsRequest*,
                                              v1::ListDatasetsResponse* resp) {
  return Serve(ctx, [&](const Caller& caller) -> absl::Status {
    auto all = datasets_->List(caller);
    if (!all.ok()) return all.status();
    for (const auto& d : *all) ToProto(d, resp->add_datasets());
    return absl::OkStatus();
  });
}

grpc::Status DatasetServiceImpl::DeleteDataset(grpc::ServerContext* ctx,
                                               const v1::DeleteDatasetRequest* req,
                                               v1::DeleteDatasetResponse*) {
  return Serve(ctx, [&](const Caller& caller) -> absl::Status {
    if (req->dataset_id().empty()) {
      return absl::InvalidArgumentError("dataset_id: required");
    }
    return datasets_->Delete(req->dataset_id(), caller);
  });
}

}  // namespace metatt
