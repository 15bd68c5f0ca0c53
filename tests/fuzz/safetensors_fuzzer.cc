// libFuzzer target: base/safetensors.h ParseSafetensors() on
// arbitrary bytes. On success the parsed tensors must be CPU + contiguous,
// and serialising them and parsing the result must give bit-identical tensors
// and the same metadata (a lossless round trip). Links LibTorch.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "tests/fuzz/fuzz_check.h"
#include "base/safetensors.h"

namespace {

bool SameBits(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
  const size_t n = static_cast<size_t>(a.numel()) * a.element_size();
  return n == 0 || std::memcmp(a.data_ptr(), b.data_ptr(), n) == 0;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  auto parsed = metatt::ParseSafetensors(bytes, "fuzz");
  if (!parsed.ok()) {
    FUZZ_CHECK(!parsed.status().message().empty());
    return 0;
  }
  for (const auto& [name, t] : parsed->tensors) {
    FUZZ_CHECK(t.defined() && t.device().is_cpu() && t.is_contiguous());
  }
  auto ser = metatt::SerializeSafetensors(parsed->tensors, parsed->metadata);
  FUZZ_CHECK(ser.ok());
  auto again = metatt::ParseSafetensors(*ser, "fuzz-roundtrip");
  FUZZ_CHECK(again.ok());
  FUZZ_CHECK(again->metadata == parsed->metadata);
  FUZZ_CHECK(again->tensors.size() == parsed->tensors.size());
  for (const auto& [name, t] : parsed->tensors) {
    auto it = again->tensors.find(name);
    FUZZ_CHECK(it != again->tensors.end());
    FUZZ_CHECK(SameBits(t, it->second));
  }
  return 0;
}
