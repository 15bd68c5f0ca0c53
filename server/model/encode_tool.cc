// metatt-encode: runs the frozen encoder on token ids stored in a safetensors
// file and writes the hidden states and poolings. Used by the parity tests
// against Hugging Face transformers (tests/python/test_encoder_parity.py).
#include <iostream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "base/safetensors.h"
#include "server/model/bert_encoder.h"
#include "server/model/model_dir.h"

ABSL_FLAG(std::string, model_dir, "", "HF model directory (default: see README)");
ABSL_FLAG(std::string, device, "auto", "auto | cpu | cuda[:N]");
ABSL_FLAG(std::string, inputs, "", "safetensors with input_ids [, token_type_ids, attention_mask]");
ABSL_FLAG(std::string, out, "", "output safetensors: last_hidden_state, cls_pooled, mean_pooled");

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  auto fail = [](const absl::Status& s) {
    std::cerr << "metatt-encode: " << s << "\n";
    return 1;
  };
  auto dir = metatt::ResolveModelDir(absl::GetFlag(FLAGS_model_dir));
  if (!dir.ok()) return fail(dir.status());
  auto device = metatt::ParseDevice(absl::GetFlag(FLAGS_device));
  if (!device.ok()) return fail(device.status());
  auto enc = metatt::BertEncoder::Create({*dir, *device});
  if (!enc.ok()) return fail(enc.status());
  auto in = metatt::ReadSafetensors(absl::GetFlag(FLAGS_inputs));
  if (!in.ok()) return fail(in.status());
  metatt::EncoderInput input;
  auto get = [&](const char* name) {
    auto it = in->tensors.find(name);
    return it == in->tensors.end() ? torch::Tensor() : it->second.to(torch::kInt64);
  };
  input.input_ids = get("input_ids");
  input.token_type_ids = get("token_type_ids");
  input.attention_mask = get("attention_mask");
  torch::NoGradGuard no_grad;
  auto hidden = (*enc)->Forward(input);
  if (!hidden.ok()) return fail(hidden.status());
  torch::Tensor mask = input.attention_mask.defined() ? input.attention_mask
                                                      : torch::ones_like(input.input_ids);
  std::map<std::string, torch::Tensor> out = {
      {"last_hidden_state", hidden->cpu()},
      {"cls_pooled", metatt::Pool(*hidden, mask, metatt::Pooling::kCls).cpu()},
      {"mean_pooled", metatt::Pool(*hidden, mask, metatt::Pooling::kMean).cpu()},
  };
  auto st = metatt::WriteSafetensors(absl::GetFlag(FLAGS_out), out);
  if (!st.ok()) return fail(st);
  std::cerr << "metatt-encode: " << input.input_ids.size(0) << " sequences on "
            << device->str() << "\n";
  return 0;
}
