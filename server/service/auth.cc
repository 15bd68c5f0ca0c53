#include "server/service/auth.h"

#include <grpcpp/security/server_credentials.h>
#include <grpcpp/support/server_interceptor.h>

#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "base/pem.h"
#include "server/service/grpc_status.h"

namespace metatt {
namespace {

// Each RPC's authenticated caller, keyed by its context, from the
// interceptor's first hook until the RPC's interceptors are destroyed.
class CallerTable {
 public:
  static CallerTable& Get() {
    static CallerTable* table = new CallerTable();
    return *table;
  }
  void Put(const grpc::ServerContextBase* ctx, const void* owner, absl::StatusOr<Caller> caller) {
    std::lock_guard<std::mutex> l(mu_);
    callers_.insert_or_assign(ctx, Entry{owner, std::move(caller)});
  }
  void Erase(const grpc::ServerContextBase* ctx, const void* owner) {
    std::lock_guard<std::mutex> l(mu_);
    auto it = callers_.find(ctx);
    if (it != callers_.end() && it->second.owner == owner) callers_.erase(it);
  }
  absl::StatusOr<Caller> Find(const grpc::ServerContextBase* ctx) {
    std::lock_guard<std::mutex> l(mu_);
    auto it = callers_.find(ctx);
    if (it == callers_.end()) {
      return absl::UnauthenticatedError("no authenticated caller for this RPC");
    }
    return it->second.caller;
  }

 private:
  struct Entry {
    const void* owner;  // the interceptor that put it
    absl::StatusOr<Caller> caller;
  };
  std::mutex mu_;
  std::unordered_map<const grpc::ServerContextBase*, Entry> callers_;
};

using grpc::experimental::InterceptionHookPoints;

class AuthInterceptor final : public grpc::experimental::Interceptor {
 public:
  AuthInterceptor(const Authenticator* auth, const grpc::ServerContextBase* ctx)
      : auth_(auth), ctx_(ctx) {}
  ~AuthInterceptor() override { CallerTable::Get().Erase(ctx_, this); }

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::POST_RECV_INITIAL_METADATA)) {
      absl::StatusOr<Caller> caller = Caller::Local();
      if (auth_ != nullptr) caller = auth_->Authenticate(*methods->GetRecvInitialMetadata());
      failure_ = caller.status();
      CallerTable::Get().Put(ctx_, this, std::move(caller));
    }
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_STATUS) &&
        !failure_.ok()) {
      methods->ModifySendStatus(ToGrpcStatus(failure_));
    }
    methods->Proceed();
  }

 private:
  const Authenticator* auth_;  // null = authentication off
  const grpc::ServerContextBase* ctx_;
  absl::Status failure_;
};

class AuthInterceptorFactory final
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit AuthInterceptorFactory(const Authenticator* auth) : auth_(auth) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    // Only the service's own methods: health checking and reflection stay open.
    if (info->method() == nullptr || !absl::StartsWith(info->method(), "/metatt.")) {
      return nullptr;
    }
    return new AuthInterceptor(auth_, info->server_context());
  }

 private:
  const Authenticator* auth_;
};

}  // namespace

void InstallAuthentication(grpc::ServerBuilder* builder, const Authenticator* auth) {
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> creators;
  creators.push_back(std::make_unique<AuthInterceptorFactory>(
      auth != nullptr && auth->enabled() ? auth : nullptr));
  builder->experimental().SetInterceptorCreators(std::move(creators));
}

absl::StatusOr<Caller> CallerOf(const grpc::ServerContextBase* ctx) {
  return CallerTable::Get().Find(ctx);
}

absl::StatusOr<Caller> Authenticator::Authenticate(
    const std::multimap<grpc::string_ref, grpc::string_ref>& md) const {
  if (config_ == nullptr) return Caller::Local();
  auto it = md.find("authorization");
  if (it == md.end()) {
    return absl::UnauthenticatedError(
        "missing 'authorization: Bearer <token>' metadata (this server requires a token)");
  }
  const std::string value(it->second.data(), it->second.size());
  constexpr absl::string_view kScheme = "bearer ";
  if (value.size() <= kScheme.size() ||
      !absl::EqualsIgnoreCase(absl::string_view(value).substr(0, kScheme.size()), kScheme)) {
    return absl::UnauthenticatedError("authorization: expected 'Bearer <token>'");
  }
  const std::string token(
      absl::StripAsciiWhitespace(absl::string_view(value).substr(kScheme.size())));
  return config_->Authenticate(token);
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const TlsFiles& files) {
  if (files.cert.empty() && files.key.empty()) {
    if (!files.client_ca.empty()) {
      return absl::InvalidArgumentError("--tls_client_ca: needs --tls_cert and --tls_key");
    }
    return grpc::InsecureServerCredentials();
  }
  if (files.cert.empty() || files.key.empty()) {
    return absl::InvalidArgumentError("--tls_cert and --tls_key: give both or neither");
  }
  grpc::SslServerCredentialsOptions opts(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
  auto server = ReadPemCertAndKey("tls_cert", files.cert, "tls_key", files.key);
  if (!server.ok()) return server.status();
  pair.cert_chain = server->cert_chain;
  pair.private_key = server->private_key;
  opts.pem_key_cert_pairs.push_back(pair);
  if (!files.client_ca.empty()) {
    auto ca = ReadPem("tls_client_ca", files.client_ca);
    if (!ca.ok()) return ca.status();
    opts.pem_root_certs = *ca;
    opts.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  return grpc::SslServerCredentials(opts);
}

}  // namespace metatt
