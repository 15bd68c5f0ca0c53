// A PEM file (TLS certificate, key or CA) named by a flag: the server's TLS
// (server/service/auth.cc) and the HTTP gateway's (server/http/gateway.cc).
// Header-only and torch-free.
#pragma once

#include <fstream>
#include <sstream>
#include <string>
#include <utility>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace metatt {

// The text of `path`; INVALID_ARGUMENT naming --`flag` when the file cannot
// be read or holds no "-----BEGIN" line.
inline absl::StatusOr<std::string> ReadPem(const std::string& flag, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(absl::StrCat("--", flag, ": cannot read ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  if (ss.str().find("-----BEGIN") == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat("--", flag, ": ", path, " is not PEM"));
  }
  return ss.str();
}

// A certificate chain and its private key, read as ReadPem reads each.
struct PemCertAndKey {
  std::string cert_chain;
  std::string private_key;
};
inline absl::StatusOr<PemCertAndKey> ReadPemCertAndKey(const std::string& cert_flag,
                                                       const std::string& cert_path,
                                                       const std::string& key_flag,
                                                       const std::string& key_path) {
  auto cert = ReadPem(cert_flag, cert_path);
  if (!cert.ok()) return cert.status();
  auto key = ReadPem(key_flag, key_path);
  if (!key.ok()) return key.status();
  return PemCertAndKey{*std::move(cert), *std::move(key)};
}

}  // namespace metatt
