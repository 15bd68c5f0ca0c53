// libFuzzer target: the torch-free request parsers/validators of server/jobs/
// (what the gRPC layer feeds with client-supplied JSON):
//   JobSpecFromJson        (job specs stored with every job)
//   DatasetSpecFromJson    (dataset specs sent with every upload)
//   ParseUploadedDataset   (spec JSON + uploaded bytes -> ParseDataset)
// Byte 0 picks the function; for ParseUploadedDataset the spec JSON is the
// text up to the first NUL byte and the dataset bytes follow it.
// Invariants: a spec that parses serialises to JSON that parses back to the
// same serialisation.
// ValidateJobSpec (server/jobs/job_validation.h) runs on every parsed job spec
// (the store-dependent half of JobManager::ValidateSpec is not covered).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <utility>

#include "tests/fuzz/fuzz_check.h"
#include <nlohmann/json.hpp>

#include "server/jobs/dataset_spec_json.h"
#include "server/jobs/job_validation.h"
#include "server/store/job_json.h"

namespace {

// A float too large for int64 anywhere in the JSON (finding
// "jobspec_float_to_int": JobSpecFromJson converts it to int64 -> UB).
bool HasHugeFloat(const nlohmann::json& j) {
  if (j.is_number_float()) {
    const double v = j.get<double>();
    return !(v > -9.2e18 && v < 9.2e18);
  }
  if (j.is_structured())
    for (const auto& e : j)
      if (HasHugeFloat(e)) return true;
  return false;
}

// The invariant: a spec that parses serialises to JSON that parses back to
// the same serialisation. The parsed spec, or nullopt when `text` does not parse.
template <typename T>
std::optional<T> RoundTrip(absl::StatusOr<T> (*parse)(const std::string&),
                           std::string (*write)(const T&), const std::string& text) {
  absl::StatusOr<T> value = parse(text);
  if (!value.ok()) return std::nullopt;
  const std::string json = write(*value);
  absl::StatusOr<T> again = parse(json);
  FUZZ_CHECK(again.ok());
  FUZZ_CHECK(write(*again) == json);
  return *std::move(value);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const std::string rest(reinterpret_cast<const char*>(data + 1), size - 1);
  switch (data[0] % 3) {
    case 0: {
      if (metatt_fuzz::KnownFinding("jobspec_float_to_int")) {
        const auto j = nlohmann::json::parse(rest, nullptr, /*allow_exceptions=*/false);
        if (HasHugeFloat(j)) return 0;
      }
      auto spec = RoundTrip(metatt::JobSpecFromJson, metatt::JobSpecToJson, rest);
      if (!spec) return 0;
      // The one validator runs on whatever parses (no crash, no UB).
      (void)metatt::ValidateJobSpec(*spec);
      break;
    }
    case 1: {
      (void)RoundTrip(metatt::DatasetSpecFromJson, metatt::DatasetSpecToJson, rest);
      break;
    }
    default: {
      const size_t nul = rest.find('\0');
      if (nul == std::string::npos) return 0;
      auto info = metatt::ParseUploadedDataset(rest.substr(nul + 1), rest.substr(0, nul));
      if (info.ok()) FUZZ_CHECK(info->num_rows > 0);
      break;
    }
  }
  return 0;
}
