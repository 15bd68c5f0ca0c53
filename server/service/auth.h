// Who is calling, decided in one place: a gRPC server interceptor
// (InstallAuthentication) turns every metatt.v1 RPC's metadata
// ("authorization: Bearer <token>") into a Caller through the tokens file
// (server/jobs/tenants.h) once, before the handler runs; handlers read it with
// CallerOf(ctx) and pass it to the core classes, which own every ownership
// and quota rule. An interceptor, not gRPC's AuthMetadataProcessor: that one
// refuses insecure credentials, which the local default and loopback tests
// use. Health checking and reflection are not intercepted (no token needed).
// Also the server's TLS credentials.
#pragma once

#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_builder.h>
#include <grpcpp/server_context.h>

#include <map>
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
  absl::StatusOr<Caller> Authenticate(
      const std::multimap<grpc::string_ref, grpc::string_ref>& client_metadata) const;

 private:
  const TenantConfig* config_;
};

// Registers the authentication interceptor on `builder` for every metatt.v1
// method; `auth` null (or disabled) = authentication off, every caller is
// Caller::Local(). `auth` must outlive the server. An RPC whose token fails
// ends UNAUTHENTICATED with the authenticator's message whatever its handler
// returns (the interceptor rewrites the status it sends).
void InstallAuthentication(grpc::ServerBuilder* builder, const Authenticator* auth);

// The caller the interceptor authenticated for the RPC `ctx` serves:
// UNAUTHENTICATED with its reason when the token failed, and (fail closed)
// when no interceptor ran for `ctx`. Every metatt.v1 handler starts with it.
absl::StatusOr<Caller> CallerOf(const grpc::ServerContextBase* ctx);

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
