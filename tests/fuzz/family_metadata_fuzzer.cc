// libFuzzer target: the adapter family metadata readers in adapters/.
//
// Byte 0 picks the mode:
//   even: MetaTTConfig::FromJsonString(rest). On success the config must
//         re-validate, survive ToJson -> FromJson unchanged, and give sane
//         bond ranks / cores / expected core shapes.
//   odd:  LoadFamily() on a scratch directory holding family.json = rest up
//         to the first NUL byte and cores.safetensors = the bytes after it.
//         With bit 1 set, the fuzzer rewrites cores_bytes / cores_fnv1a64 in
//         family.json to match the cores bytes (when family.json is a JSON
//         object), so the fuzzer gets past the integrity check into the
//         tensor/shape validation.
// Links LibTorch.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

#include "tests/fuzz/fuzz_check.h"
#include "absl/strings/str_format.h"
#include "adapters/family_io.h"
#include "adapters/metatt_adapter.h"
#include "adapters/metatt_config.h"

namespace {

std::string Fnv1a64(const std::string& bytes) {  // as in adapters/family_io.cc
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : bytes) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return absl::StrFormat("%016x", h);
}

const std::string& ScratchDir() {
  static const std::string dir = [] {
    const char* tmp = std::getenv("TMPDIR");
    std::string tmpl = std::string(tmp && *tmp ? tmp : "/tmp") + "/metatt_family_fuzz.XXXXXX";
    if (::mkdtemp(tmpl.data()) == nullptr) {
      std::perror("mkdtemp");
      std::abort();
    }
    return tmpl;
  }();
  return dir;
}

void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << bytes;
  FUZZ_CHECK(out.good());
}

// Finding "metatt_config_unbounded": MetaTTConfig::Validate() accepts any
// positive d_in / d_out / num_layers / ranks / num_tasks / num_heads, so
// AdaptedLayers() allocates num_layers ints and ParameterCount() overflows.
// While that is open, METATT_FUZZ_KNOWN=metatt_config_unbounded skips configs
// with a field above 2^20.
bool HugeConfig(const nlohmann::json& c) {
  if (!c.is_object()) return false;
  for (const char* f : {"d_in", "d_out", "num_layers", "num_tasks", "num_heads", "rank"}) {
    auto it = c.find(f);
    if (it != c.end() && it->is_number() && it->get<double>() > (1 << 20)) return true;
  }
  auto r = c.find("ranks");
  if (r != c.end() && r->is_array())
    for (const auto& v : *r)
      if (v.is_number() && v.get<double>() > (1 << 20)) return true;
  return false;
}

bool SkipKnown(const nlohmann::json& config) {
  return metatt_fuzz::KnownFinding("metatt_config_unbounded") && HugeConfig(config);
}

void FuzzConfig(const std::string& text) {
  if (SkipKnown(nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false))) return;
  auto cfg = metatt::MetaTTConfig::FromJsonString(text);
  if (!cfg.ok()) {
    FUZZ_CHECK(!cfg.status().message().empty());
    return;
  }
  FUZZ_CHECK(cfg->Validate().ok());
  const int cores = cfg->NumCores();
  FUZZ_CHECK(cores == 4 || cores == 5);
  FUZZ_CHECK(static_cast<int>(cfg->BondRanks().size()) == cfg->NumBonds());
  (void)cfg->Scale();
  (void)cfg->AdaptedLayers();
  (void)cfg->ParameterCount();
  FUZZ_CHECK(metatt::ParseInitSpec(cfg->init, cores).ok());
  const nlohmann::json j = cfg->ToJson();
  auto again = metatt::MetaTTConfig::FromJson(j);
  FUZZ_CHECK(again.ok());
  FUZZ_CHECK(again->ToJson() == j);
  // One map entry per task: only call it for task counts a family.json can
  // really list (LoadFamily checks num_tasks against its task list first).
  if (cfg->num_tasks <= 64) {
    const auto shapes = metatt::MetaTTAdapter::ExpectedShapes(*cfg);
    for (const auto& [name, shape] : shapes)
      for (int64_t d : shape) FUZZ_CHECK(d >= 0);
  }
}

void FuzzLoadFamily(const std::string& rest, bool fix_integrity) {
  const size_t nul = rest.find('\0');
  std::string meta = rest.substr(0, nul);
  const std::string cores = nul == std::string::npos ? std::string() : rest.substr(nul + 1);
  {
    nlohmann::json j = nlohmann::json::parse(meta, nullptr, /*allow_exceptions=*/false);
    if (!j.is_discarded() && j.is_object() && j.contains("config") && SkipKnown(j["config"]))
      return;
    if (fix_integrity && !j.is_discarded() && j.is_object()) {
      j["cores_bytes"] = cores.size();
      j["cores_fnv1a64"] = Fnv1a64(cores);
      meta = j.dump();
    }
  }
  const std::string& dir = ScratchDir();
  WriteFile(dir + "/family.json", meta);
  WriteFile(dir + "/cores.safetensors", cores);
  auto fam = metatt::LoadFamily(dir, /*expected_fingerprint=*/"");
  if (!fam.ok()) {
    FUZZ_CHECK(!fam.status().message().empty());
    return;
  }
  FUZZ_CHECK(fam->adapter != nullptr);
  FUZZ_CHECK(static_cast<int64_t>(fam->task_names.size()) == fam->adapter->num_tasks() ||
             fam->adapter->config().form != metatt::TTForm::k4Plus1D);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const std::string rest(reinterpret_cast<const char*>(data + 1), size - 1);
  if ((data[0] & 1) == 0) {
    FuzzConfig(rest);
  } else {
    FuzzLoadFamily(rest, data[0] & 2);
  }
  return 0;
}
