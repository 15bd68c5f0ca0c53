// Which kind of frozen base model a server process holds (torch-free, so the
// service layer can name it in errors). A server holds ONE base model: a
// BERT-family encoder (Predict: classification / regression heads) or a
// Llama-architecture decoder (Generate: text generation).
#pragma once

#include <string>

namespace metatt {

enum class ModelKind { kEncoder, kDecoder };

// "encoder (bert)", "decoder (llama)": what errors and logs say.
inline std::string ModelKindName(ModelKind kind, const std::string& model_type) {
  return std::string(kind == ModelKind::kDecoder ? "decoder" : "encoder") + " (" + model_type +
         ")";
}

}  // namespace metatt
