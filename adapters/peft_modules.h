// PEFT's module paths of the adapted projections inside one transformer layer,
// in BERT/RoBERTa and in Llama naming: LoRA families are written with them
// (family_io.cc) and PEFT folders are read by them (lora_adapter.cc).
#pragma once

#include <optional>
#include <string>

#include "adapters/adapter.h"

namespace metatt {

inline const char* PeftModule(Projection p, bool llama) {
  switch (p) {
    case Projection::kQuery: return llama ? "self_attn.q_proj" : "attention.self.query";
    case Projection::kKey: return llama ? "self_attn.k_proj" : "attention.self.key";
    case Projection::kValue: return llama ? "self_attn.v_proj" : "attention.self.value";
    case Projection::kAttnOutput: return llama ? "self_attn.o_proj" : "attention.output.dense";
    case Projection::kFfnUp: return llama ? "mlp.up_proj" : "intermediate.dense";
    case Projection::kFfnDown: return llama ? "mlp.down_proj" : "output.dense";
    case Projection::kGate: return "mlp.gate_proj";
  }
  return "";
}

// The projection whose module path (either naming) is `module`; none when
// no projection has it.
inline std::optional<Projection> PeftModuleProjection(const std::string& module) {
  for (int i = 0; i < kNumProjections; ++i) {
    const auto p = static_cast<Projection>(i);
    for (bool llama : {false, true}) {
      if (module == PeftModule(p, llama)) return p;
    }
  }
  return std::nullopt;
}

}  // namespace metatt
