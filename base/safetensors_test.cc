#include "base/safetensors.h"

#include <unistd.h>

#include <gtest/gtest.h>

namespace metatt {
namespace {

std::string TempPath(const std::string& name) {
  return ::testing::TempDir() + "/" + name + "." + std::to_string(::getpid());
}

// A safetensors file made by hand: the 8-byte header length (headers under
// 256 bytes), `header`, then `data_bytes` zero bytes of data.
std::string FileWithHeader(const std::string& header, size_t data_bytes) {
  std::string f(8, '\0');
  f[0] = static_cast<char>(header.size());
  return f + header + std::string(data_bytes, '\0');
}

TEST(Safetensors, RoundTripIsBitExactForEveryDtype) {
  std::map<std::string, torch::Tensor> t = {
      {"f32", torch::randn({3, 4})},
      {"f64", torch::randn({2}, torch::kFloat64)},
      {"bf16", torch::randn({5}).to(torch::kBFloat16)},
      {"i64", torch::arange(7)},
      {"empty", torch::zeros({0, 3})},
      {"scalar", torch::tensor(3.5)},
  };
  std::string path = TempPath("rt.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, t, {{"format", "pt"}}).ok());
  auto back = ReadSafetensors(path);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->metadata.at("format"), "pt");
  ASSERT_EQ(back->tensors.size(), t.size());
  for (const auto& [name, v] : t) {
    const auto& w = back->tensors.at(name);
    EXPECT_EQ(w.scalar_type(), v.scalar_type()) << name;
    EXPECT_EQ(w.sizes(), v.sizes()) << name;
    EXPECT_TRUE(torch::equal(w, v)) << name;
  }
  // Same tensors, same bytes.
  auto a = SerializeSafetensors(t), b = SerializeSafetensors(t);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(*a, *b);
}

TEST(Safetensors, TruncatedFileIsRefusedNamingTheTensor) {
  auto bytes = SerializeSafetensors({{"a", torch::ones({4})}, {"b", torch::ones({8})}});
  ASSERT_TRUE(bytes.ok());
  auto r = ParseSafetensors(bytes->substr(0, bytes->size() - 5), "x.safetensors");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(r.status().message().find("'b'"), std::string::npos) << r.status();
  EXPECT_NE(r.status().message().find("x.safetensors"), std::string::npos);
}

TEST(Safetensors, CorruptHeadersAreRefused) {
  auto bytes = SerializeSafetensors({{"a", torch::ones({4})}});
  ASSERT_TRUE(bytes.ok());
  // Header length pointing past the end.
  std::string huge = *bytes;
  huge[0] = '\xff';
  huge[1] = '\xff';
  EXPECT_FALSE(ParseSafetensors(huge, "h").ok());
  // Garbage JSON.
  std::string garbage = *bytes;
  garbage[8] = '#';
  auto g = ParseSafetensors(garbage, "g");
  ASSERT_FALSE(g.ok());
  EXPECT_NE(g.status().message().find("JSON"), std::string::npos);
  EXPECT_FALSE(ParseSafetensors("abc", "short").ok());
  // Shape not matching byte count.
  auto s = ParseSafetensors(
      FileWithHeader(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8), "s");
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find("'w'"), std::string::npos);
  // Unknown dtype.
  auto d = ParseSafetensors(
      FileWithHeader(R"({"w":{"dtype":"F8_E9","shape":[1],"data_offsets":[0,1]}})", 1), "d");
  ASSERT_FALSE(d.ok());
  EXPECT_NE(d.status().message().find("dtype"), std::string::npos);
}

TEST(Safetensors, MissingFileIsNotFound) {
  auto r = ReadSafetensors("/nonexistent/dir/x.safetensors");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace metatt
