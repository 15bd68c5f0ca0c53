// The ONE frozen base model a server process holds, loaded from a Hugging
// Face model directory: config.json's model_type "llama" makes a decoder
// server (LlamaDecoder + byte-level BPE tokenizer with the chat template),
// anything else an encoder server (BertEncoder + WordPiece; bert, roberta,
// xlm-roberta). Everything downstream (registry, scheduler, predictor,
// generator, job executor) reads the model from here: its kind, geometry
// (what adapters are built against) and fingerprint (what families are
// checked against).
#pragma once

#include <memory>
#include <string>

#include <torch/torch.h>

#include "absl/status/statusor.h"
#include "adapters/model_geometry.h"
#include "server/model/bert_encoder.h"
#include "server/model/bpe_tokenizer.h"
#include "server/model/llama_decoder.h"
#include "server/model/tokenizer.h"
#include "server/runtime/model_kind.h"

namespace metatt {

struct BaseModel {
  ModelKind kind = ModelKind::kEncoder;
  std::string model_type;  // config.json model_type ("bert", "llama", ...)
  std::string model_dir;
  torch::Device device = torch::kCPU;
  ModelGeometry geometry;
  std::string fingerprint;  // BertConfig / LlamaConfig::Fingerprint()

  // kEncoder
  std::shared_ptr<const BertEncoder> encoder;
  std::shared_ptr<const WordPieceTokenizer> wordpiece;
  // kDecoder
  std::shared_ptr<const LlamaDecoder> decoder;
  std::shared_ptr<const BpeTokenizer> bpe;

  bool is_decoder() const { return kind == ModelKind::kDecoder; }
  std::string kind_name() const { return ModelKindName(kind, model_type); }

  // Reads <model_dir>/config.json's model_type and loads the matching model
  // and tokenizer on `device`.
  static absl::StatusOr<std::shared_ptr<const BaseModel>> Load(const std::string& model_dir,
                                                               torch::Device device);
  // Wraps models already in memory (tests).
  static std::shared_ptr<const BaseModel> Encoder(std::shared_ptr<const BertEncoder> encoder,
                                                  std::shared_ptr<const WordPieceTokenizer> tok);
  static std::shared_ptr<const BaseModel> Decoder(std::shared_ptr<const LlamaDecoder> decoder,
                                                  std::shared_ptr<const BpeTokenizer> tok);
};

// model_type of <model_dir>/config.json ("" when the field is absent).
absl::StatusOr<std::string> ReadModelType(const std::string& model_dir);

}  // namespace metatt
