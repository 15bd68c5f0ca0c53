#include "server/runtime/base_model.h"

#include <fstream>
#include <sstream>
#include <utility>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"

namespace metatt {

absl::StatusOr<std::string> ReadModelType(const std::string& model_dir) {
  const std::string path = model_dir + "/config.json";
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot be read"));
  std::stringstream ss;
  ss << in.rdbuf();
  nlohmann::json j = nlohmann::json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object())
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a JSON object"));
  if (!j.contains("model_type")) return std::string();
  if (!j["model_type"].is_string())
    return absl::InvalidArgumentError(absl::StrCat(path, ": model_type: must be a string"));
  return j["model_type"].get<std::string>();
}

namespace {

// What either model tells about itself (both expose the same accessors).
template <typename Model>
std::shared_ptr<BaseModel> Describe(ModelKind kind, const Model& model) {
  auto m = std::make_shared<BaseModel>();
  m->kind = kind;
  m->model_type = model.config().model_type;
  m->model_dir = model.model_dir();
  m->device = model.device();
  m->geometry = model.geometry();
  m->fingerprint = model.config().Fingerprint();
  return m;
}

}  // namespace

std::shared_ptr<const BaseModel> BaseModel::Encoder(
    std::shared_ptr<const BertEncoder> encoder, std::shared_ptr<const WordPieceTokenizer> tok) {
  auto m = Describe(ModelKind::kEncoder, *encoder);
  m->encoder = std::move(encoder);
  m->wordpiece = std::move(tok);
  return m;
}

std::shared_ptr<const BaseModel> BaseModel::Decoder(std::shared_ptr<const LlamaDecoder> decoder,
                                                    std::shared_ptr<const BpeTokenizer> tok) {
  auto m = Describe(ModelKind::kDecoder, *decoder);
  m->decoder = std::move(decoder);
  m->bpe = std::move(tok);
  return m;
}

absl::StatusOr<std::shared_ptr<const BaseModel>> BaseModel::Load(const std::string& model_dir,
                                                                 torch::Device device) {
  ASSIGN_OR_RETURN(const std::string model_type, ReadModelType(model_dir));
  if (model_type == "llama") {
    LlamaDecoder::Options o;
    o.model_dir = model_dir;
    o.device = device;
    ASSIGN_OR_RETURN(std::shared_ptr<LlamaDecoder> decoder, LlamaDecoder::Create(o));
    absl::StatusOr<BpeTokenizer> tok = BpeTokenizer::Create(model_dir);
    if (!tok.ok()) {
      return absl::Status(tok.status().code(),
                          absl::StrCat(model_dir, ": tokenizer: ", tok.status().message()));
    }
    return Decoder(std::move(decoder), std::make_shared<const BpeTokenizer>(std::move(*tok)));
  }
  BertEncoder::Options eo;
  eo.model_dir = model_dir;
  eo.device = device;
  ASSIGN_OR_RETURN(std::shared_ptr<BertEncoder> encoder, BertEncoder::Create(eo));
  ASSIGN_OR_RETURN(WordPieceTokenizer tok, WordPieceTokenizer::Create(model_dir));
  return Encoder(std::move(encoder), std::make_shared<const WordPieceTokenizer>(std::move(tok)));
}

}  // namespace metatt
