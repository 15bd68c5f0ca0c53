// The causal-LM objective: generation tasks on a Llama-architecture decoder.
//
// Each example's prompt (chat messages) and completion become token ids
// through an LmTokenizer (MakeChatLmTokenizer: the model's chat template, as
// transformers' apply_chat_template renders it). Batches are right-padded
// (the decoder's padding contract: positions count real tokens, so padding
// side never changes a row's logits); labels are the input ids on completion
// tokens and -100 on prompt and padding tokens, and the loss is the
// next-token cross-entropy averaged over the batch's completion tokens,
// exactly transformers' LlamaForCausalLM(labels=...) loss. Rows longer than
// TrainerOptions::max_length lose prompt tokens from the left (the
// completion is kept; if it alone is longer, its end is cut).
//
// Evaluation generates greedily (KV cache, up to TrainerOptions::
// max_new_tokens, stopping at the tokenizer's eos) from each eval prompt and
// scores the text: "answer_accuracy" (eval_scores.h ExtractAnswer: the first
// answer1..5 / true|false of the text against the example's `answer`) when
// every eval example carries an answer, and "exact_match" against the
// completion; the primary metric defaults to answer_accuracy when available,
// else exact_match.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "absl/status/statusor.h"
#include "server/model/bpe_tokenizer.h"
#include "server/model/llama_decoder.h"
#include "server/training/trainer.h"

namespace metatt {

// Token ids of one example.
struct LmEncoded {
  std::vector<int64_t> prompt;      // the rendered prompt, ending with the generation prompt
  std::vector<int64_t> completion;  // the reply, ending with the end-of-turn token(s)
};

struct LmTokenizer {
  std::function<absl::StatusOr<LmEncoded>(const GenerationExample&)> encode;
  // The prompt alone (for generation).
  std::function<absl::StatusOr<std::vector<int64_t>>(const std::vector<ChatMessage>&)> encode_prompt;
  // Generated ids (eos excluded) -> text, special tokens skipped.
  std::function<std::string(const std::vector<int64_t>&)> decode;
  int64_t eos_id = -1;  // generation stops here; -1: never
  int64_t pad_id = 0;   // any id: padding is masked
};

// The model's chat template (BpeTokenizer::ApplyChatTemplate): prompt =
// template(prompt, add_generation_prompt), completion = the rest of
// template(prompt + assistant reply) (SmolLM2: "<reply><|im_end|>\n").
// Without a usable chat template: the messages' contents joined by "\n\n"
// then "\n", and the completion followed by the eos token.
LmTokenizer MakeChatLmTokenizer(std::shared_ptr<const BpeTokenizer> tokenizer);

// A padded training batch (CPU tensors).
struct LmBatch {
  torch::Tensor input_ids;       // int64 [B, S], right-padded with pad_id
  torch::Tensor attention_mask;  // int64 [B, S]
  torch::Tensor labels;          // int64 [B, S]: input id on completion tokens, else -100
  int64_t tokens = 0;            // real tokens
};
absl::StatusOr<LmBatch> BuildLmBatch(const std::vector<const LmEncoded*>& rows, int max_length,
                                     int64_t pad_id);
// Mean next-token cross-entropy over the completion tokens (labels != -100,
// shifted by one as transformers does). Differentiable w.r.t. the adapter.
absl::StatusOr<torch::Tensor> CompletionLoss(const LlamaDecoder& decoder, const LmBatch& batch,
                                             EncoderAdapter* adapter, const AdapterBatch& ab);

std::shared_ptr<TrainObjective> MakeLmObjective(std::shared_ptr<const LlamaDecoder> decoder,
                                                LmTokenizer tokenizer);

}  // namespace metatt
