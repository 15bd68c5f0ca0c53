#include "server/jobs/ids.h"

#include <cstdint>
#include <cstdio>
#include <mutex>
#include <random>

namespace metatt {

std::string NewId(const std::string& prefix) {
  static std::mutex mu;
  static std::mt19937_64 rng{std::random_device{}()};
  uint64_t v;
  {
    std::lock_guard<std::mutex> lock(mu);
    v = rng();
  }
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(v));
  return prefix + "-" + buf;
}

}  // namespace metatt
