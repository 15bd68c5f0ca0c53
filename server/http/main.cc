// metatt-http: the OpenAI-compatible HTTP/JSON gateway beside metatt-server
// (server/http/gateway.h). Flags -> GatewayOptions, SIGINT/SIGTERM stop it.
//
//   metatt-http --listen 127.0.0.1:8080 --server 127.0.0.1:50051
//
// Prints "LISTENING <port>" on stdout (flushed) once bound, so scripts and
// tests can pass port 0 and read the chosen port.
#include <signal.h>

#include <cstdio>
#include <string>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "server/http/gateway.h"

ABSL_FLAG(std::string, listen, "127.0.0.1:8080",
          "HTTP address host:port (port 0 picks a free port). An address that is not loopback "
          "needs --tls_cert/--tls_key (else refused; see --insecure_allow_open_network)");
ABSL_FLAG(std::string, server, "127.0.0.1:50051", "metatt-server's gRPC address");
ABSL_FLAG(std::string, base_model, "all-MiniLM-L6-v2",
          "id of the server's base model: GET /v1/models lists it; a fine-tuning job with this "
          "model trains a new family");
ABSL_FLAG(std::string, tls_cert, "", "PEM certificate chain: serve HTTPS");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert");
ABSL_FLAG(std::string, tls_client_ca, "",
          "PEM CA: require client certificates signed by it (mutual TLS)");
ABSL_FLAG(std::string, server_tls_ca, "",
          "PEM CA of metatt-server's certificate: call it over TLS (empty = plaintext)");
ABSL_FLAG(std::string, server_tls_cert, "", "PEM client certificate for a mutual-TLS server");
ABSL_FLAG(std::string, server_tls_key, "", "PEM private key of --server_tls_cert");
ABSL_FLAG(bool, insecure_allow_open_network, false,
          "DANGEROUS: serve a non-loopback --listen without TLS, or call a non-loopback --server "
          "without TLS (bearer tokens in plaintext)");
ABSL_FLAG(double, rpc_timeout, 60, "deadline of the gateway's unary gRPC calls, seconds (0 = none)");
ABSL_FLAG(double, generate_timeout, 600,
          "deadline of a chat or text completion (Generate / GenerateStream), seconds (0 = none)");
ABSL_FLAG(int64_t, events_quiet_ms, 250,
          "a running job's event list holds what the server sent before this much quiet");
ABSL_FLAG(int64_t, max_body_bytes, 256ll << 20, "largest HTTP request body (uploads included)");

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "metatt-http --listen 127.0.0.1:8080 --server 127.0.0.1:50051: OpenAI-compatible HTTP "
      "gateway of metatt-server");
  absl::ParseCommandLine(argc, argv);
  metatt::http::GatewayOptions o;
  o.listen = absl::GetFlag(FLAGS_listen);
  o.server = absl::GetFlag(FLAGS_server);
  o.base_model = absl::GetFlag(FLAGS_base_model);
  o.tls_cert = absl::GetFlag(FLAGS_tls_cert);
  o.tls_key = absl::GetFlag(FLAGS_tls_key);
  o.tls_client_ca = absl::GetFlag(FLAGS_tls_client_ca);
  o.server_tls_ca = absl::GetFlag(FLAGS_server_tls_ca);
  o.server_tls_cert = absl::GetFlag(FLAGS_server_tls_cert);
  o.server_tls_key = absl::GetFlag(FLAGS_server_tls_key);
  o.insecure_allow_open_network = absl::GetFlag(FLAGS_insecure_allow_open_network);
  o.rpc_timeout_s = absl::GetFlag(FLAGS_rpc_timeout);
  o.generate_timeout_s = absl::GetFlag(FLAGS_generate_timeout);
  o.events_quiet_ms = absl::GetFlag(FLAGS_events_quiet_ms);
  o.max_body_bytes = absl::GetFlag(FLAGS_max_body_bytes);

  // Signals go to the waiting thread only (blocked before any thread starts).
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);

  auto gateway = metatt::http::Gateway::Create(o);
  if (!gateway.ok()) {
    std::fprintf(stderr, "metatt-http: %s\n", gateway.status().ToString().c_str());
    return 2;
  }
  auto port = (*gateway)->Bind();
  if (!port.ok()) {
    std::fprintf(stderr, "metatt-http: %s\n", port.status().ToString().c_str());
    return 2;
  }
  std::fprintf(stderr, "metatt-http: %s on %s, gRPC server %s\n",
               o.tls_cert.empty() ? "HTTP" : "HTTPS", o.listen.c_str(), o.server.c_str());
  std::printf("LISTENING %d\n", *port);
  std::fflush(stdout);
  std::thread waiter([&] {
    int sig = 0;
    sigwait(&set, &sig);
    std::fprintf(stderr, "metatt-http: signal %d, stopping\n", sig);
    (*gateway)->Stop();
  });
  (*gateway)->Serve();
  // Serve() also returns when the listener fails; let the waiter go.
  pthread_kill(waiter.native_handle(), SIGTERM);
  waiter.join();
  return 0;
}
