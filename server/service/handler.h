// The shape every metatt.v1 handler shares: the caller that the
// authentication interceptor identified (auth.h), then a body that returns
// one absl::Status, mapped to gRPC once (grpc_status.h).
#pragma once

#include <grpcpp/server_context.h>
#include <grpcpp/support/status.h>

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "server/service/auth.h"
#include "server/service/grpc_status.h"

namespace metatt {

// body(caller) -> absl::Status, for the caller of `ctx`; a call that was not
// authenticated fails with CallerOf's status and never reaches the body.
template <typename Body>
grpc::Status Serve(const grpc::ServerContextBase* ctx, Body&& body) {
  absl::StatusOr<Caller> caller = CallerOf(ctx);
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  return ToGrpcStatus(std::forward<Body>(body)(*caller));
}

// ToProto(*value, out) (proto_convert.h) when `value` holds one, else its error.
template <typename T, typename Proto>
absl::Status AnswerWith(const absl::StatusOr<T>& value, Proto* out) {
  if (!value.ok()) return value.status();
  ToProto(*value, out);
  return absl::OkStatus();
}

}  // namespace metatt
