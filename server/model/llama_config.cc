#include "server/model/llama_config.h"

#include <cstdio>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "base/file_io.h"
#include "base/status_macros.h"
#include "server/model/config_json.h"

namespace metatt {
namespace {

using json = nlohmann::json;
using config_json::Bad;

absl::Status GetInt(const json& j, const std::string& origin, const char* field, bool required,
                    int64_t* out) {
  if (!j.contains(field) || j[field].is_null()) {
    if (required) return Bad(origin, field, "is missing");
    return absl::OkStatus();
  }
  if (!j[field].is_number_integer()) return Bad(origin, field, "must be an integer");
  int64_t v = j[field].get<int64_t>();
  if (v <= 0) return Bad(origin, field, "must be positive");
  *out = v;
  return absl::OkStatus();
}

absl::Status GetNumber(const json& j, const std::string& origin, const char* field, double* out) {
  if (!j.contains(field) || j[field].is_null()) return absl::OkStatus();
  if (!j[field].is_number()) return Bad(origin, field, "must be a number");
  *out = j[field].get<double>();
  if (!(*out > 0)) return Bad(origin, field, "must be positive");
  return absl::OkStatus();
}

absl::Status GetBool(const json& j, const std::string& origin, const char* field, bool* out) {
  if (!j.contains(field) || j[field].is_null()) return absl::OkStatus();
  if (!j[field].is_boolean()) return Bad(origin, field, "must be true or false");
  *out = j[field].get<bool>();
  return absl::OkStatus();
}

// Token ids may be an integer, null, or (eos) a list; the first entry wins.
absl::Status GetTokenId(const json& j, const std::string& origin, const char* field,
                        int64_t* out) {
  if (!j.contains(field) || j[field].is_null()) return absl::OkStatus();
  const json& v = j[field].is_array() && !j[field].empty() ? j[field][0] : j[field];
  if (!v.is_number_integer() || v.get<int64_t>() < 0)
    return Bad(origin, field, "must be a non-negative integer (or a list of them)");
  *out = v.get<int64_t>();
  return absl::OkStatus();
}

// Only the unscaled ("default") rotary embedding is implemented.
absl::Status CheckRopeType(const json& r, const std::string& origin, const char* field) {
  if (r.is_null()) return absl::OkStatus();
  if (!r.is_object()) return Bad(origin, field, "must be an object");
  for (const char* key : {"rope_type", "type"}) {
    if (r.contains(key) && !(r[key].is_string() && r[key].get<std::string>() == "default"))
      return Bad(origin, absl::StrCat(field, ".", key),
                 absl::StrCat("is ", r[key].dump(), "; only \"default\" rotary embeddings "
                              "are supported"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<LlamaConfig> LlamaConfig::FromJson(const std::string& json_text,
                                                  const std::string& origin) {
  ASSIGN_OR_RETURN(json j, config_json::ParseObject(json_text, origin));
  LlamaConfig c;
  if (j.contains("model_type")) {
    if (!j["model_type"].is_string()) return Bad(origin, "model_type", "must be a string");
    c.model_type = j["model_type"].get<std::string>();
  }
  if (c.model_type != "llama")
    return Bad(origin, "model_type",
               absl::StrCat("'", c.model_type, "' is not a Llama-architecture model (llama)"));
  RETURN_IF_ERROR(GetInt(j, origin, "vocab_size", true, &c.vocab_size));
  RETURN_IF_ERROR(GetInt(j, origin, "hidden_size", true, &c.hidden_size));
  RETURN_IF_ERROR(GetInt(j, origin, "intermediate_size", true, &c.intermediate_size));
  RETURN_IF_ERROR(GetInt(j, origin, "num_hidden_layers", true, &c.num_hidden_layers));
  RETURN_IF_ERROR(GetInt(j, origin, "num_attention_heads", true, &c.num_attention_heads));
  c.num_key_value_heads = c.num_attention_heads;
  RETURN_IF_ERROR(GetInt(j, origin, "num_key_value_heads", false, &c.num_key_value_heads));
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    return Bad(origin, "num_key_value_heads",
               absl::StrCat("(", c.num_key_value_heads, ") must divide num_attention_heads (",
                            c.num_attention_heads, ")"));
  if (!j.contains("head_dim") || j["head_dim"].is_null()) {
    if (c.hidden_size % c.num_attention_heads != 0)
      return Bad(origin, "num_attention_heads",
                 absl::StrCat("(", c.num_attention_heads, ") must divide hidden_size (",
                              c.hidden_size, ") when head_dim is not given"));
    c.head_dim = c.hidden_size / c.num_attention_heads;
  } else {
    RETURN_IF_ERROR(GetInt(j, origin, "head_dim", true, &c.head_dim));
  }
  if (c.head_dim % 2 != 0) return Bad(origin, "head_dim", "must be even (rotary embeddings)");
  RETURN_IF_ERROR(
      GetInt(j, origin, "max_position_embeddings", false, &c.max_position_embeddings));
  RETURN_IF_ERROR(GetNumber(j, origin, "rms_norm_eps", &c.rms_norm_eps));
  RETURN_IF_ERROR(GetNumber(j, origin, "rope_theta", &c.rope_theta));
  if (j.contains("rope_parameters")) {
    const json& r = j["rope_parameters"];
    RETURN_IF_ERROR(CheckRopeType(r, origin, "rope_parameters"));
    if (r.is_object()) RETURN_IF_ERROR(GetNumber(r, origin + " rope_parameters", "rope_theta",
                                                 &c.rope_theta));
  }
  if (j.contains("rope_scaling")) RETURN_IF_ERROR(CheckRopeType(j["rope_scaling"], origin,
                                                                "rope_scaling"));
  if (j.contains("hidden_act")) {
    if (!j["hidden_act"].is_string() || j["hidden_act"].get<std::string>() != "silu")
      return Bad(origin, "hidden_act",
                 absl::StrCat("is ", j["hidden_act"].dump(), "; only \"silu\" is supported"));
  }
  if (j.contains("pretraining_tp") && j["pretraining_tp"].is_number_integer() &&
      j["pretraining_tp"].get<int64_t>() != 1)
    return Bad(origin, "pretraining_tp", "must be 1");
  RETURN_IF_ERROR(GetBool(j, origin, "tie_word_embeddings", &c.tie_word_embeddings));
  RETURN_IF_ERROR(GetBool(j, origin, "attention_bias", &c.attention_bias));
  RETURN_IF_ERROR(GetBool(j, origin, "mlp_bias", &c.mlp_bias));
  RETURN_IF_ERROR(GetTokenId(j, origin, "bos_token_id", &c.bos_token_id));
  RETURN_IF_ERROR(GetTokenId(j, origin, "eos_token_id", &c.eos_token_id));
  RETURN_IF_ERROR(GetTokenId(j, origin, "pad_token_id", &c.pad_token_id));
  return c;
}

absl::StatusOr<LlamaConfig> LlamaConfig::FromFile(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  return FromJson(text, path);
}

std::string LlamaConfig::Fingerprint() const {
  std::string s = absl::StrCat(model_type, "|", vocab_size, "|", hidden_size, "|",
                               intermediate_size, "|", num_hidden_layers, "|",
                               num_attention_heads, "|", num_key_value_heads, "|", head_dim, "|",
                               rms_norm_eps, "|", rope_theta, "|", tie_word_embeddings, "|",
                               attention_bias, "|", mlp_bias);
  // FNV-1a 64: stable across platforms and runs (std::hash is not).
  return Fnv1a64Hex(s);
}

}  // namespace metatt
