// metatt-http: an OpenAI-compatible HTTP/JSON gateway in front of
// metatt-server's gRPC API (README "From the OpenAI SDK"). It holds no
// business rules: every request becomes gRPC calls on --server with the
// caller's bearer token forwarded as the `authorization` metadata (same
// tenants, same rules), and every gRPC status becomes an HTTP status with
// OpenAI's error object naming the field. cpp-httplib (Debian) serves HTTP,
// or HTTPS with --tls_cert/--tls_key through its SSLServer.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace metatt::http {

struct GatewayOptions {
  std::string listen = "127.0.0.1:8080";  // host:port; port 0 picks a free one
  std::string server = "127.0.0.1:50051";  // metatt-server's gRPC address
  // The id of the server's base model: GET /v1/models lists it, and a
  // fine-tuning job whose `model` is it trains a new family.
  std::string base_model = "all-MiniLM-L6-v2";
  // HTTPS on the HTTP port (PEM); tls_client_ca additionally requires client
  // certificates signed by it (mutual TLS).
  std::string tls_cert, tls_key, tls_client_ca;
  // TLS towards metatt-server (PEM CA of its certificate; client certificate
  // for a mutual-TLS server).
  std::string server_tls_ca, server_tls_cert, server_tls_key;
  // A non-loopback --listen without TLS, or a non-loopback --server without
  // --server_tls_ca, is refused unless this is set.
  bool insecure_allow_open_network = false;
  double rpc_timeout_s = 60;      // deadline of unary gRPC calls (0 = none)
  // Deadline of a chat/text completion (Generate, GenerateStream; 0 = none):
  // generation on a CPU can outlast rpc_timeout_s.
  double generate_timeout_s = 600;
  int64_t events_quiet_ms = 250;  // a running job's event list ends after this much quiet
  int64_t max_body_bytes = 256ll << 20;
};

class Gateway {
 public:
  // Checks the exposure rules and the TLS files; nothing listens yet.
  static absl::StatusOr<std::unique_ptr<Gateway>> Create(const GatewayOptions& options);
  ~Gateway();

  // Binds --listen; returns the port (the chosen one for port 0).
  absl::StatusOr<int> Bind();
  // Serves until Stop(); returns when stopped.
  void Serve();
  void Stop();

 private:
  Gateway() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// True when `listen` (host:port) is reachable only from this machine.
bool IsLoopbackAddress(const std::string& listen);

}  // namespace metatt::http
