// Who is calling: the service layer turns an RPC's metadata
// ("authorization: Bearer <token>") into a Caller through the tokens file
// (server/jobs/tenants.h) and passes it to the core classes, which own every
// ownership and quota rule. Also the server's TLS credentials.
#pragma once

#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_context.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "server/jobs/tenants.h"

namespace metatt {

class Authenticator {
 public:
  // `config` null = authentication off: every call is Caller::Local()
  // (tenant "default", sees everything) -- the plaintext local default.
  explicit Authenticator(const TenantConfig* config) : config_(config) {}
  bool enabled() const { return config_ != nullptr; }
  // UNAUTHENTICATED when the token is missing, malformed or unknown.
  absl::StatusOr<Caller> Authenticate(const grpc::ServerContext& ctx) const;

 private:
  const TenantConfig* config_;
};

// The caller of an RPC; `auth` null = authentication off.
absl::StatusOr<Caller> CallerOf(const Authenticator* auth, const grpc::ServerContext* ctx);

struct TlsFiles {
  std::string cert;       // PEM server certificate chain; "" = plaintext
  std::string key;        // PEM private key
  std::string client_ca;  // PEM CA bundle; set = mutual TLS (client certificates required)
};

// Insecure credentials when `files.cert` is empty, else SSL ones (a client
// certificate signed by `client_ca` required and verified when it is set).
// INVALID_ARGUMENT naming the flag for a missing or unreadable file.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const TlsFiles& files);

}  // namespace metatt
