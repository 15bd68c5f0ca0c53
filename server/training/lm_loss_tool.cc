// metatt-lm-loss: the causal-LM objective's batch and loss on a generation
// dataset, for tests/python/test_lm_loss_parity.py (against transformers'
// LlamaForCausalLM with labels = -100 on the prompt).
//
//   metatt-lm-loss --model_dir=DIR --data=train.jsonl --max_length=64 --out=o.safetensors
//
// Writes input_ids, attention_mask, labels (int64 [B, S]), prompt_lengths
// (int64 [B]: the rendered prompt's tokens) and loss (float32 [1]): every
// example of the file in one right-padded batch, no adapter.
#include <iostream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "base/safetensors.h"
#include "base/status_macros.h"
#include "base/tool_main.h"
#include "server/model/bert_encoder.h"  // ParseDevice
#include "server/training/lm_objective.h"

ABSL_FLAG(std::string, model_dir, "", "Llama model directory (config.json, model.safetensors, tokenizer)");
ABSL_FLAG(std::string, device, "cpu", "auto | cpu | cuda[:N]");
ABSL_FLAG(std::string, data, "", "generation dataset (JSONL or JSON array)");
ABSL_FLAG(std::string, format, "auto", "auto|prompt_completion|instruction|chat");
ABSL_FLAG(int64_t, max_length, 256, "tokens per row");
ABSL_FLAG(std::string, out, "", "output safetensors");

namespace metatt {
namespace {

absl::Status Main() {
  const std::string dir = absl::GetFlag(FLAGS_model_dir);
  ASSIGN_OR_RETURN(torch::Device device, ParseDevice(absl::GetFlag(FLAGS_device)));
  GenerationSpec spec;
  ASSIGN_OR_RETURN(spec.format, ParseGenerationFormat(absl::GetFlag(FLAGS_format)));
  ASSIGN_OR_RETURN(GenerationDataset ds, ReadGenerationDataset(absl::GetFlag(FLAGS_data), spec));
  LlamaDecoder::Options o;
  o.model_dir = dir;
  o.device = device;
  ASSIGN_OR_RETURN(std::shared_ptr<LlamaDecoder> decoder, LlamaDecoder::Create(o));
  ASSIGN_OR_RETURN(BpeTokenizer bpe, BpeTokenizer::Create(dir));
  const LmTokenizer tok = MakeChatLmTokenizer(std::make_shared<const BpeTokenizer>(std::move(bpe)));
  std::vector<LmEncoded> enc;
  std::vector<int64_t> prompt_lengths;
  for (const GenerationExample& ex : ds.examples) {
    ASSIGN_OR_RETURN(LmEncoded e, tok.encode(ex));
    prompt_lengths.push_back(static_cast<int64_t>(e.prompt.size()));
    enc.push_back(std::move(e));
  }
  std::vector<const LmEncoded*> rows;
  for (const LmEncoded& e : enc) rows.push_back(&e);
  ASSIGN_OR_RETURN(LmBatch batch,
                   BuildLmBatch(rows, static_cast<int>(absl::GetFlag(FLAGS_max_length)), tok.pad_id));
  torch::NoGradGuard no_grad;
  ASSIGN_OR_RETURN(torch::Tensor loss, CompletionLoss(*decoder, batch, nullptr, {}));
  std::map<std::string, torch::Tensor> out = {
      {"input_ids", batch.input_ids},
      {"attention_mask", batch.attention_mask},
      {"labels", batch.labels},
      {"prompt_lengths", torch::tensor(prompt_lengths, torch::kLong)},
      {"loss", loss.detach().cpu().to(torch::kFloat).reshape({1})}};
  RETURN_IF_ERROR(WriteSafetensors(absl::GetFlag(FLAGS_out), out));
  std::cout << "loss " << loss.item<double>() << std::endl;
  return absl::OkStatus();
}

}  // namespace
}  // namespace metatt

int main(int argc, char** argv) {
  return metatt::ToolMain(argc, argv, "metatt-lm-loss", metatt::Main, /*failure_code=*/2);
}
