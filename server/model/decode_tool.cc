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

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  auto fail = [](const absl::Status& s) {
    std::cerr << "metatt-decode: " << s << "\n";
    return 1;
  };
  if (absl::GetFlag(FLAGS_model_dir).empty())
    return fail(absl::InvalidArgumentError("--model_dir is required"));
  auto device = metatt::ParseDevice(absl::GetFlag(FLAGS_device));
  if (!device.ok()) return fail(device.status());
  auto dec = metatt::LlamaDecoder::Create({absl::GetFlag(FLAGS_model_dir), *device});
  if (!dec.ok()) return fail(dec.status());
  std::unique_ptr<metatt::LoraAdapter> lora;
  if (!absl::GetFlag(FLAGS_peft_dir).empty()) {
    metatt::LoadPeftOptions po;
    po.device = *device;
    po.num_layers = (*dec)->config().num_hidden_layers;
    po.hidden_size = (*dec)->config().hidden_size;
    po.model = (*dec)->geometry();
    auto a = metatt::LoadPeftAdapter(absl::GetFlag(FLAGS_peft_dir), po);
    if (!a.ok()) return fail(a.status());
    lora = std::move(*a);
  }
  metatt::EncoderAdapter* adapter = lora.get();
  auto in = metatt::ReadSafetensors(absl::GetFlag(FLAGS_inputs));
  if (!in.ok()) return fail(in.status());
  auto get = [&](const char* name) {
    auto it = in->tensors.find(name);
    return it == in->tensors.end() ? torch::Tensor() : it->second.to(torch::kInt64);
  };
  metatt::DecoderInput input{get("input_ids"), get("attention_mask")};
  torch::NoGradGuard no_grad;
  auto full = (*dec)->Forward(input, nullptr, adapter);
  if (!full.ok()) return fail(full.status());
  std::map<std::string, torch::Tensor> out = {{"logits", full->logits.cpu()},
                                              {"hidden", full->hidden.cpu()}};
  const int64_t S = input.input_ids.size(1);
  torch::Tensor mask =
      input.attention_mask.defined() ? input.attention_mask : torch::ones_like(input.input_ids);
  for (absl::string_view part : absl::StrSplit(absl::GetFlag(FLAGS_chunks), ',',
                                               absl::SkipEmpty())) {
    int64_t n = 0;
    if (!absl::SimpleAtoi(part, &n) || n < 1)
      return fail(absl::InvalidArgumentError("--chunks: entries must be positive integers"));
    metatt::KvCache cache;
    std::vector<torch::Tensor> pieces;
    for (int64_t s = 0; s < S; s += n) {
      const int64_t w = std::min(n, S - s);
      auto o = (*dec)->Forward({input.input_ids.narrow(1, s, w), mask.narrow(1, s, w)}, &cache,
                               adapter);
      if (!o.ok()) return fail(o.status());
      pieces.push_back(o->logits.cpu());
    }
    out[absl::StrCat("logits_chunk", n)] = torch::cat(pieces, 1);
  }
  if (absl::GetFlag(FLAGS_max_new_tokens) > 0) {
    auto g = (*dec)->GreedyGenerate(input, absl::GetFlag(FLAGS_max_new_tokens),
                                    absl::GetFlag(FLAGS_eos_token_id), adapter);
    if (!g.ok()) return fail(g.status());
    out["generated"] = *g;
  }
  auto st = metatt::WriteSafetensors(absl::GetFlag(FLAGS_out), out);
  if (!st.ok()) return fail(st);
  std::cerr << "metatt-decode: " << input.input_ids.size(0) << " sequences on " << device->str()
            << "\n";
  return 0;
}
