// metatt-lora-forward: runs the frozen encoder with a PEFT LoRA adapter and
// writes the last hidden states. Used by tests/python/test_lora_peft_parity.py.
//
//   metatt-lora-forward --model_dir=BASE --adapter_dir=PEFT
//       --inputs=in.safetensors --output=out.safetensors
// inputs: input_ids, attention_mask (int64 [B, S]), optional token_type_ids.
// output: "hidden" float32 [B, S, D]. --adapter_dir empty runs the base alone.
#include <iostream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "adapters/lora_adapter.h"
#include "base/safetensors.h"
#include "base/status_macros.h"
#include "base/tool_main.h"
#include "server/model/bert_encoder.h"

ABSL_FLAG(std::string, model_dir, "", "base model directory (config.json + model.safetensors)");
ABSL_FLAG(std::string, adapter_dir, "", "PEFT adapter directory (empty: base model only)");
ABSL_FLAG(std::string, inputs, "", "safetensors with input_ids / attention_mask / token_type_ids");
ABSL_FLAG(std::string, output, "", "where to write the hidden states (safetensors)");

namespace metatt {
namespace {

absl::Status Run() {
  BertEncoder::Options eo;
  eo.model_dir = absl::GetFlag(FLAGS_model_dir);
  ASSIGN_OR_RETURN(auto encoder, BertEncoder::Create(eo));
  std::unique_ptr<LoraAdapter> adapter;
  if (!absl::GetFlag(FLAGS_adapter_dir).empty()) {
    LoadPeftOptions lo;
    lo.num_layers = encoder->config().num_hidden_layers;
    lo.hidden_size = encoder->config().hidden_size;
    ASSIGN_OR_RETURN(adapter, LoadPeftAdapter(absl::GetFlag(FLAGS_adapter_dir), lo));
  }
  ASSIGN_OR_RETURN(SafetensorsFile in, ReadSafetensors(absl::GetFlag(FLAGS_inputs)));
  EncoderInput input;
  auto get = [&](const char* name) -> torch::Tensor {
    auto it = in.tensors.find(name);
    return it == in.tensors.end() ? torch::Tensor() : it->second.to(torch::kInt64);
  };
  input.input_ids = get("input_ids");
  input.attention_mask = get("attention_mask");
  input.token_type_ids = get("token_type_ids");
  if (!input.input_ids.defined())
    return absl::InvalidArgumentError("inputs: tensor 'input_ids' is missing");
  torch::NoGradGuard no_grad;
  ASSIGN_OR_RETURN(torch::Tensor hidden, encoder->Forward(input, adapter.get()));
  return WriteSafetensors(absl::GetFlag(FLAGS_output), {{"hidden", hidden.contiguous()}});
}

}  // namespace
}  // namespace metatt

int main(int argc, char** argv) {
  return metatt::ToolMain(argc, argv, "metatt-lora-forward", metatt::Run);
}
