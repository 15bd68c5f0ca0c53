// Test helper: a throw-away PostgreSQL server from the machine's packages
// (Debian's postgresql: initdb/pg_ctl on PATH or under
// /usr/lib/postgresql/<N>/bin), on a free loopback port, its data and unix
// socket in a fresh directory under /tmp. PostgreSQL refuses to run as root:
// under root the directory is handed to `nobody` and the server runs through
// `runuser -u nobody`. Start() returns an error naming what failed (tests
// FAIL with it; nothing is skipped). The Python twin is
// tests/integration/pg_fixture.py.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pwd.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace metatt {

class PgTestServer {
 public:
  static absl::StatusOr<std::unique_ptr<PgTestServer>> Start() {
    std::string bin = FindBinDir();
    if (bin.empty()) {
      return absl::FailedPreconditionError(
          "PostgreSQL server binaries not found (initdb on PATH or /usr/lib/postgresql/*/bin); "
          "install Debian's postgresql package (scripts/setup.sh does)");
    }
    char tmpl[] = "/tmp/metatt-pg-XXXXXX";
    if (mkdtemp(tmpl) == nullptr) return absl::InternalError("mkdtemp failed");
    std::unique_ptr<PgTestServer> s(new PgTestServer(tmpl, bin));
    std::string run_as;
    if (geteuid() == 0) {
      struct passwd* pw = getpwnam("nobody");
      if (pw == nullptr) return absl::FailedPreconditionError("running as root but no user nobody");
      if (chown(tmpl, pw->pw_uid, pw->pw_gid) != 0) {
        return absl::InternalError(absl::StrCat("chown ", tmpl, " to nobody failed"));
      }
      run_as = "runuser -u nobody -- ";
    }
    s->run_as_ = run_as;
    const std::string log = s->dir_ + "/setup.log";
    std::string initdb = absl::StrCat(run_as, bin, "/initdb -D ", s->dir_,
                                      "/data -U postgres --auth=trust -E UTF8 --no-sync >", log,
                                      " 2>&1");
    if (std::system(initdb.c_str()) != 0) {
      return absl::InternalError(absl::StrCat("initdb failed: ", ReadFile(log)));
    }
    for (int attempt = 0; attempt < 3; ++attempt) {
      s->port_ = FreePort();
      std::string start = absl::StrCat(
          run_as, bin, "/pg_ctl -D ", s->dir_, "/data -l ", s->dir_, "/server.log -w -t 60 -o \"-p ",
          s->port_, " -k ", s->dir_, " -c listen_addresses=127.0.0.1 -c fsync=off\" start >", log,
          " 2>&1");
      if (std::system(start.c_str()) == 0) {
        s->started_ = true;
        return s;
      }
    }
    return absl::InternalError(absl::StrCat("pg_ctl start failed: ", ReadFile(log),
                                            ReadFile(s->dir_ + "/server.log")));
  }

  ~PgTestServer() {
    if (started_) {
      std::string stop = absl::StrCat(run_as_, bin_, "/pg_ctl -D ", dir_,
                                       "/data -m immediate -w stop >/dev/null 2>&1");
      if (std::system(stop.c_str()) != 0) {
        // Nothing else to do in a destructor; the directory goes anyway.
      }
    }
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  int port() const { return port_; }
  // postgresql://postgres@127.0.0.1:<port>/<db>
  std::string Uri(const std::string& db = "postgres") const {
    return absl::StrCat("postgresql://postgres@127.0.0.1:", port_, "/", db);
  }
  // A fresh, empty database (the `createdb` client next to initdb).
  absl::Status CreateDatabase(const std::string& name) const {
    std::string cmd = absl::StrCat(bin_, "/createdb -h 127.0.0.1 -p ", port_, " -U postgres ",
                                   name, " >", dir_, "/createdb.log 2>&1");
    if (std::system(cmd.c_str()) != 0) {
      return absl::InternalError(
          absl::StrCat("createdb ", name, " failed: ", ReadFile(dir_ + "/createdb.log")));
    }
    return absl::OkStatus();
  }

 private:
  PgTestServer(std::string dir, std::string bin) : dir_(std::move(dir)), bin_(std::move(bin)) {}

  static std::string FindBinDir() {
    namespace fs = std::filesystem;
    std::vector<std::string> dirs;
    if (const char* env = std::getenv("METATT_PG_BIN")) dirs.push_back(env);
    // Debian keeps the server binaries off PATH: prefer its newest version.
    std::error_code ec;
    std::vector<std::string> debian;
    for (const auto& e : fs::directory_iterator("/usr/lib/postgresql", ec)) {
      debian.push_back((e.path() / "bin").string());
    }
    std::sort(debian.rbegin(), debian.rend());
    if (const char* path = std::getenv("PATH")) {
      std::stringstream ss(path);
      std::string d;
      while (std::getline(ss, d, ':')) dirs.push_back(d);
    }
    dirs.insert(dirs.end(), debian.begin(), debian.end());
    for (const auto& d : dirs) {
      if (fs::exists(fs::path(d) / "initdb", ec) && fs::exists(fs::path(d) / "pg_ctl", ec)) {
        return fs::canonical(fs::path(d) / "initdb", ec).parent_path().string();
      }
    }
    return "";
  }

  static int FreePort() {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = 0;
    socklen_t len = sizeof(a);
    int port = 0;
    if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0 &&
        getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0) {
      port = ntohs(a.sin_port);
    }
    close(fd);
    return port;
  }

  static std::string ReadFile(const std::string& path) {
    std::ifstream in(path);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }

  std::string dir_, bin_, run_as_;
  int port_ = 0;
  bool started_ = false;
};

}  // namespace metatt
