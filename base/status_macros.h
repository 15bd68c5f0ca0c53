// Status helpers shared by every layer. No exceptions cross our interfaces:
// LibTorch's c10::Error is caught at the call site (METATT_TORCH_TRY) and
// turned into an absl::Status.
#pragma once

#include <exception>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

#define METATT_CONCAT_INNER(a, b) a##b
#define METATT_CONCAT(a, b) METATT_CONCAT_INNER(a, b)

#define RETURN_IF_ERROR(expr)                      \
  do {                                             \
    ::absl::Status _metatt_st = (expr);            \
    if (!_metatt_st.ok()) return _metatt_st;       \
  } while (0)

#define ASSIGN_OR_RETURN_IMPL(tmp, lhs, rexpr) \
  auto tmp = (rexpr);                          \
  if (!tmp.ok()) return tmp.status();          \
  lhs = std::move(tmp).value()

#define ASSIGN_OR_RETURN(lhs, rexpr) \
  ASSIGN_OR_RETURN_IMPL(METATT_CONCAT(_metatt_sor_, __LINE__), lhs, rexpr)

namespace metatt {

// Runs `fn` and converts any exception (c10::Error, std::exception) into an
// INTERNAL status prefixed with `what`. Use around LibTorch calls whose
// failure depends on data (shapes, dtypes, devices).
template <typename Fn>
absl::Status TorchTry(const std::string& what, Fn&& fn) {
  try {
    fn();
    return absl::OkStatus();
  } catch (const std::exception& e) {
    std::string msg = e.what();
    // c10::Error messages carry a long backtrace after the first line.
    auto nl = msg.find('\n');
    if (nl != std::string::npos) msg.resize(nl);
    return absl::InternalError(absl::StrCat(what, ": ", msg));
  }
}

}  // namespace metatt
