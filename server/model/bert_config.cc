#include "server/model/bert_config.h"

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "base/file_io.h"
#include "base/safetensors.h"
#include "base/status_macros.h"
#include "server/model/config_json.h"

namespace metatt {
namespace {

using json = nlohmann::json;
using config_json::Bad;

absl::Status GetPositiveInt(const json& j, const std::string& origin, const char* field,
                            bool required, int64_t* out) {
  if (!j.contains(field)) {
    if (required) return Bad(origin, field, "is missing");
    return absl::OkStatus();
  }
  if (!j[field].is_number_integer()) return Bad(origin, field, "must be an integer");
  int64_t v = j[field].get<int64_t>();
  if (v < 0 || (required && v == 0)) return Bad(origin, field, "must be positive");
  *out = v;
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<BertConfig> BertConfig::FromJson(const std::string& json_text,
                                                const std::string& origin) {
  ASSIGN_OR_RETURN(json j, config_json::ParseObject(json_text, origin));
  BertConfig c;
  if (j.contains("model_type") && j["model_type"].is_string())
    c.model_type = j["model_type"].get<std::string>();
  if (c.model_type != "bert" && c.model_type != "roberta" && c.model_type != "xlm-roberta")
    return Bad(origin, "model_type", absl::StrCat("'", c.model_type,
                                                  "' is not a BERT-family model (bert, roberta)"));
  RETURN_IF_ERROR(GetPositiveInt(j, origin, "vocab_size", true, &c.vocab_size));
  RETURN_IF_ERROR(GetPositiveInt(j, origin, "hidden_size", true, &c.hidden_size));
  RETURN_IF_ERROR(GetPositiveInt(j, origin, "num_hidden_layers", true, &c.num_hidden_layers));
  RETURN_IF_ERROR(GetPositiveInt(j, origin, "num_attention_heads", true, &c.num_attention_heads));
  RETURN_IF_ERROR(GetPositiveInt(j, origin, "intermediate_size", true, &c.intermediate_size));
  RETURN_IF_ERROR(
      GetPositiveInt(j, origin, "max_position_embeddings", false, &c.max_position_embeddings));
  RETURN_IF_ERROR(GetPositiveInt(j, origin, "type_vocab_size", false, &c.type_vocab_size));
  if (j.contains("pad_token_id") && j["pad_token_id"].is_number_integer())
    c.pad_token_id = j["pad_token_id"].get<int64_t>();
  if (c.hidden_size % c.num_attention_heads != 0)
    return Bad(origin, "num_attention_heads",
               absl::StrCat("(", c.num_attention_heads, ") must divide hidden_size (",
                            c.hidden_size, ")"));
  if (j.contains("layer_norm_eps")) {
    if (!j["layer_norm_eps"].is_number()) return Bad(origin, "layer_norm_eps", "must be a number");
    c.layer_norm_eps = j["layer_norm_eps"].get<double>();
  }
  if (j.contains("hidden_act")) {
    if (!j["hidden_act"].is_string()) return Bad(origin, "hidden_act", "must be a string");
    std::string act = j["hidden_act"].get<std::string>();
    if (act == "gelu") {
      c.hidden_act = Activation::kGelu;
    } else if (act == "gelu_new" || act == "gelu_pytorch_tanh") {
      c.hidden_act = Activation::kGeluTanh;
    } else if (act == "relu") {
      c.hidden_act = Activation::kRelu;
    } else {
      return Bad(origin, "hidden_act", absl::StrCat("'", act, "' is not supported (gelu, "
                                                    "gelu_new, gelu_pytorch_tanh, relu)"));
    }
  }
  if (j.contains("position_embedding_type") && j["position_embedding_type"].is_string() &&
      j["position_embedding_type"].get<std::string>() != "absolute")
    return Bad(origin, "position_embedding_type", "only 'absolute' is supported");
  c.roberta_positions = c.model_type != "bert";
  return c;
}

absl::StatusOr<BertConfig> BertConfig::FromFile(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  return FromJson(text, path);
}

std::string BertConfig::Fingerprint() const {
  std::string s = absl::StrCat(model_type, "|", vocab_size, "|", hidden_size, "|",
                               num_hidden_layers, "|", num_attention_heads, "|",
                               intermediate_size, "|", static_cast<int>(hidden_act), "|",
                               max_position_embeddings, "|", type_vocab_size, "|", pad_token_id);
  // FNV-1a 64: stable across platforms and runs (std::hash is not).
  return Fnv1a64Hex(s);
}

}  // namespace metatt
