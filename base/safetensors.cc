#include "base/safetensors.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"

namespace metatt {
namespace {

using json = nlohmann::json;

struct DtypeInfo {
  const char* name;
  torch::ScalarType type;
  size_t size;
};

constexpr DtypeInfo kDtypes[] = {
    {"F64", torch::kFloat64, 8}, {"F32", torch::kFloat32, 4}, {"F16", torch::kFloat16, 2},
    {"BF16", torch::kBFloat16, 2}, {"I64", torch::kInt64, 8},  {"I32", torch::kInt32, 4},
    {"I16", torch::kInt16, 2},    {"I8", torch::kInt8, 1},     {"U8", torch::kUInt8, 1},
    {"BOOL", torch::kBool, 1},
};

const DtypeInfo* FindDtype(const std::string& name) {
  for (const auto& d : kDtypes)
    if (name == d.name) return &d;
  return nullptr;
}
const DtypeInfo* FindDtype(torch::ScalarType t) {
  for (const auto& d : kDtypes)
    if (t == d.type) return &d;
  return nullptr;
}

absl::Status Corrupt(const std::string& origin, const std::string& what) {
  return absl::DataLossError(absl::StrCat("safetensors ", origin, ": ", what));
}

}  // namespace

absl::StatusOr<SafetensorsFile> ParseSafetensors(const std::string& bytes,
                                                 const std::string& origin) {
  if (bytes.size() < 8) return Corrupt(origin, "file shorter than the 8-byte header length");
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<uint8_t>(bytes[i]);
  if (header_len > bytes.size() - 8 || header_len > (100u << 20))
    return Corrupt(origin, absl::StrCat("header length ", header_len, " exceeds file size ",
                                        bytes.size()));
  json header = json::parse(bytes.begin() + 8, bytes.begin() + 8 + header_len, nullptr,
                            /*allow_exceptions=*/false);
  if (header.is_discarded() || !header.is_object())
    return Corrupt(origin, "header is not a JSON object");
  const size_t data_start = 8 + header_len;
  const size_t data_len = bytes.size() - data_start;
  SafetensorsFile out;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const json& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) return Corrupt(origin, "__metadata__ is not an object");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string())
          return Corrupt(origin, absl::StrCat("__metadata__.", m.key(), " is not a string"));
        out.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") ||
        !v.contains("data_offsets"))
      return Corrupt(origin, absl::StrCat("tensor '", name,
                                          "': entry needs dtype, shape and data_offsets"));
    if (!v["dtype"].is_string())
      return Corrupt(origin, absl::StrCat("tensor '", name, "': dtype is not a string"));
    const DtypeInfo* dt = FindDtype(v["dtype"].get<std::string>());
    if (dt == nullptr)
      return Corrupt(origin, absl::StrCat("tensor '", name, "': unsupported dtype '",
                                          v["dtype"].get<std::string>(), "'"));
    const json& shape_j = v["shape"];
    const json& off_j = v["data_offsets"];
    if (!shape_j.is_array() || !off_j.is_array() || off_j.size() != 2)
      return Corrupt(origin, absl::StrCat("tensor '", name, "': bad shape or data_offsets"));
    std::vector<int64_t> shape;
    uint64_t numel = 1;
    for (const auto& d : shape_j) {
      if (!d.is_number_unsigned())
        return Corrupt(origin, absl::StrCat("tensor '", name, "': negative or non-integer dim"));
      uint64_t dim = d.get<uint64_t>();
      if (dim > (1ull << 40) || (dim != 0 && numel > (1ull << 40) / dim))
        return Corrupt(origin, absl::StrCat("tensor '", name, "': shape too large"));
      numel *= dim;
      shape.push_back(static_cast<int64_t>(dim));
    }
    if (!off_j[0].is_number_unsigned() || !off_j[1].is_number_unsigned())
      return Corrupt(origin, absl::StrCat("tensor '", name, "': data_offsets not integers"));
    uint64_t begin = off_j[0].get<uint64_t>(), end = off_j[1].get<uint64_t>();
    if (begin > end || end > data_len)
      return Corrupt(origin, absl::StrCat("tensor '", name, "': data_offsets [", begin, ", ",
                                          end, ") outside the ", data_len,
                                          "-byte data section (truncated file?)"));
    if (end - begin != numel * dt->size)
      return Corrupt(origin, absl::StrCat("tensor '", name, "': ", end - begin,
                                          " bytes do not hold shape of ", numel, " x ",
                                          dt->size, "-byte ", dt->name));
    torch::Tensor t = torch::empty(shape, torch::TensorOptions().dtype(dt->type));
    if (numel > 0) std::memcpy(t.data_ptr(), bytes.data() + data_start + begin, end - begin);
    out.tensors.emplace(name, std::move(t));
  }
  return out;
}

absl::StatusOr<SafetensorsFile> ReadSafetensors(const std::string& path) {
  ASSIGN_OR_RETURN(std::string bytes, ReadFileToString(path));
  return ParseSafetensors(bytes, path);
}

absl::StatusOr<std::string> SerializeSafetensors(
    const std::map<std::string, torch::Tensor>& tensors,
    const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<torch::Tensor> cpu;
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    if (!t.defined()) return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "' undefined"));
    const DtypeInfo* dt = FindDtype(t.scalar_type());
    if (dt == nullptr)
      return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "': unsupported dtype"));
    torch::Tensor c = t.detach().to(torch::kCPU).contiguous();
    uint64_t n = static_cast<uint64_t>(c.numel()) * dt->size;
    header[name] = {{"dtype", dt->name}, {"shape", c.sizes().vec()}, {"data_offsets", {offset, offset + n}}};
    offset += n;
    cpu.push_back(c);
  }
  std::string h = header.dump();
  while ((h.size() % 8) != 0) h.push_back(' ');  // align data to 8 bytes, as HF does
  std::string out;
  out.reserve(8 + h.size() + offset);
  uint64_t len = h.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((len >> (8 * i)) & 0xff));
  out += h;
  for (const auto& c : cpu)
    out.append(static_cast<const char*>(c.data_ptr()), c.numel() * c.element_size());
  return out;
}

absl::Status WriteSafetensors(const std::string& path,
                              const std::map<std::string, torch::Tensor>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  ASSIGN_OR_RETURN(std::string bytes, SerializeSafetensors(tensors, metadata));
  return WriteFileAtomically(path, bytes);
}

}  // namespace metatt
