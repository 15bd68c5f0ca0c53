// metatt-decode: runs the frozen Llama-architecture decoder on token ids
// stored in a safetensors file and writes what the parity tests compare
// against Hugging Face transformers (tests/python/test_llama_parity.py):
//   logits, hidden       one full forward over input_ids [B, S] (+ attention_mask)
//   logits_chunk<N>      the same sequence fed through the KV cache N columns
//                        at a time (--chunks=1,3: token by token, then by 3)
//   generated            greedy decoding of --max_new_tokens after the prompts
// With --peft_dir the PEFT LoRA adapter there is applied to every forward.
#include <algorithm>
#include <iostream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "adapters/lora_adapter.h"
#include "base/safetensors.h"
#include "base/status_macros.h"
#include "base/tool_main.h"
#include "server/model/bert_encoder.h"  // ParseDevice
#include "server/model/llama_decoder.h"

ABSL_FLAG(std::string, model_dir, "", "HF Llama model directory (config.json + model.safetensors)");
ABSL_FLAG(std::string, device, "cpu", "auto | cpu | cuda[:N]");
ABSL_FLAG(std::string, inputs, "", "safetensors with input_ids [, attention_mask]");
ABSL_FLAG(std::string, out, "", "output safetensors");
ABSL_FLAG(std::string, chunks, "", "comma-separated chunk widths for cached decoding (e.g. 1,3)");
ABSL_FLAG(int64_t, max_new_tokens, 0, "greedy tokens to generate (0: none)");
ABSL_FLAG(int64_t, eos_token_id, -1, "stop token for generation (-1: none)");
ABSL_FLAG(std::string, peft_dir, "", "optional PEFT LoRA adapter directory");

namespace metatt {
namespace {

absl::Status Run() {
  if (absl::GetFlag(FLAGS_model_dir).empty())
    return absl::InvalidArgumentError("--model_dir is required");
  ASSIGN_OR_RETURN(torch::Device device, ParseDevice(absl::GetFlag(FLAGS_device)));
  ASSIGN_OR_RETURN(auto dec, LlamaDecoder::Create({absl::GetFlag(FLAGS_model_dir), device}));
  std::unique_ptr<LoraAdapter> lora;
  if (!absl::GetFlag(FLAGS_peft_dir).empty()) {
    LoadPeftOptions po;
    po.device = device;
    po.num_layers = dec->config().num_hidden_layers;
    po.hidden_size = dec->config().hidden_size;
    po.model = dec->geometry();
    ASSIGN_OR_RETURN(lora, LoadPeftAdapter(absl::GetFlag(FLAGS_peft_dir), po));
  }
  EncoderAdapter* adapter = lora.get();
  ASSIGN_OR_RETURN(SafetensorsFile in, ReadSafetensors(absl::GetFlag(FLAGS_inputs)));
  auto get = [&](const char* name) {
    auto it = in.tensors.find(name);
    return it == in.tensors.end() ? torch::Tensor() : it->second.to(torch::kInt64);
  };
  DecoderInput input{get("input_ids"), get("attention_mask")};
  torch::NoGradGuard no_grad;
  ASSIGN_OR_RETURN(auto full, dec->Forward(input, nullptr, adapter));
  std::map<std::string, torch::Tensor> out = {{"logits", full.logits.cpu()},
                                              {"hidden", full.hidden.cpu()}};
  const int64_t S = input.input_ids.size(1);
  torch::Tensor mask =
      input.attention_mask.defined() ? input.attention_mask : torch::ones_like(input.input_ids);
  for (absl::string_view part : absl::StrSplit(absl::GetFlag(FLAGS_chunks), ',',
                                               absl::SkipEmpty())) {
    int64_t n = 0;
    if (!absl::SimpleAtoi(part, &n) || n < 1)
      return absl::InvalidArgumentError("--chunks: entries must be positive integers");
    KvCache cache;
    std::vector<torch::Tensor> pieces;
    for (int64_t s = 0; s < S; s += n) {
      const int64_t w = std::min(n, S - s);
      ASSIGN_OR_RETURN(auto o, dec->Forward({input.input_ids.narrow(1, s, w), mask.narrow(1, s, w)},
                                            &cache, adapter));
      pieces.push_back(o.logits.cpu());
    }
    out[absl::StrCat("logits_chunk", n)] = torch::cat(pieces, 1);
  }
  if (absl::GetFlag(FLAGS_max_new_tokens) > 0) {
    ASSIGN_OR_RETURN(out["generated"],
                     dec->GreedyGenerate(input, absl::GetFlag(FLAGS_max_new_tokens),
                                         absl::GetFlag(FLAGS_eos_token_id), adapter));
  }
  RETURN_IF_ERROR(WriteSafetensors(absl::GetFlag(FLAGS_out), out));
  std::cerr << "metatt-decode: " << input.input_ids.size(0) << " sequences on " << device.str()
            << "\n";
  return absl::OkStatus();
}

}  // namespace
}  // namespace metatt

int main(int argc, char** argv) {
  return metatt::ToolMain(argc, argv, "metatt-decode", metatt::Run);
}
