// The one mapping between absl::Status (inside) and grpc::Status (wire).
#pragma once

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace metatt {

grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

}  // namespace metatt
