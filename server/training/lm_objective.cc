#include "server/training/lm_objective.h"

#include <algorithm>
#include <map>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "server/training/eval_scores.h"

namespace metatt {
namespace {

constexpr int64_t kIgnore = -100;

class LmObjective : public TrainObjective {
 public:
  LmObjective(std::shared_ptr<const LlamaDecoder> decoder, LmTokenizer tokenizer)
      : decoder_(std::move(decoder)), tok_(std::move(tokenizer)) {}

  torch::Device device() const override { return decoder_->device(); }

  absl::Status Prepare(std::vector<TrainTask>* tasks, const TrainerOptions& options) override {
    if (decoder_ == nullptr) return absl::InvalidArgumentError("trainer: no decoder");
    if (!tok_.encode || !tok_.encode_prompt || !tok_.decode) {
      return absl::InvalidArgumentError("trainer: no LM tokenizer");
    }
    if (options.max_new_tokens < 1) {
      return absl::InvalidArgumentError("trainer: max_new_tokens must be >= 1");
    }
    train_.clear();
    eval_.clear();
    for (size_t i = 0; i < tasks->size(); ++i) {
      TrainTask& task = (*tasks)[i];
      const std::string who = absl::StrCat("task '", task.name, "'");
      if (task.head != nullptr) {
        return absl::InvalidArgumentError(
            who + ": a generation task has no head (the decoder's LM head scores tokens)");
      }
      if (task.gen_train.examples.empty()) {
        return absl::InvalidArgumentError(who + ": empty train set (generation examples)");
      }
      std::vector<LmEncoded> enc;
      enc.reserve(task.gen_train.size());
      for (const GenerationExample& ex : task.gen_train.examples) {
        auto e = tok_.encode(ex);
        if (!e.ok()) {
          return absl::InvalidArgumentError(absl::StrCat(who, ": train line ", ex.line, ": ",
                                                         e.status().message()));
        }
        if (e->completion.empty()) {
          return absl::InvalidArgumentError(
              absl::StrCat(who, ": train line ", ex.line, ": the completion has no tokens"));
        }
        enc.push_back(std::move(*e));
      }
      train_.push_back(std::move(enc));
      std::vector<std::vector<int64_t>> prompts;
      for (const GenerationExample& ex : task.gen_eval.examples) {
        auto p = tok_.encode_prompt(ex.prompt);
        if (!p.ok()) {
          return absl::InvalidArgumentError(absl::StrCat(who, ": eval line ", ex.line, ": ",
                                                         p.status().message()));
        }
        if (static_cast<int64_t>(p->size()) > options.max_length) {
          p->erase(p->begin(), p->end() - options.max_length);  // keep the prompt's end
        }
        prompts.push_back(std::move(*p));
      }
      eval_[task.name] = std::move(prompts);
      const bool answered = task.gen_eval.all_answered();
      if (task.primary_metric.empty()) {
        task.primary_metric = answered ? "answer_accuracy" : "exact_match";
      }
      if (task.primary_metric == "answer_accuracy" && !task.gen_eval.examples.empty() &&
          !answered) {
        return absl::InvalidArgumentError(
            who + ": metric 'answer_accuracy' needs an 'answer' on every eval example");
      }
      if (task.primary_metric != "answer_accuracy" && task.primary_metric != "exact_match") {
        return absl::InvalidArgumentError(absl::StrCat(
            who, ": metric '", task.primary_metric,
            "' is not available for a generation task (answer_accuracy, exact_match)"));
      }
    }
    return absl::OkStatus();
  }

  int64_t NumTrainExamples(const TrainTask& task) const override {
    return static_cast<int64_t>(task.gen_train.size());
  }
  bool HasEval(const TrainTask& task) const override { return !task.gen_eval.examples.empty(); }

  absl::StatusOr<BatchLoss> Loss(const std::vector<TrainTask>& tasks,
                                 const std::vector<BatchRow>& rows, EncoderAdapter* adapter,
                                 const AdapterBatch& ab, const TrainerOptions& options) override {
    (void)tasks;
    std::vector<const LmEncoded*> enc;
    for (const auto& [t, e] : rows) enc.push_back(&train_.at(t).at(e));
    ASSIGN_OR_RETURN(LmBatch batch, BuildLmBatch(enc, options.max_length, tok_.pad_id));
    BatchLoss out;
    out.tokens = batch.tokens;
    ASSIGN_OR_RETURN(out.loss, CompletionLoss(*decoder_, batch, adapter, ab));
    return out;
  }

  absl::StatusOr<std::map<std::string, double>> Evaluate(const TrainTask& task,
                                                         EncoderAdapter* adapter,
                                                         const TrainerOptions& options) override {
    const auto& prompts = eval_.at(task.name);
    int64_t n = static_cast<int64_t>(prompts.size());
    if (options.max_eval_examples > 0) n = std::min(n, options.max_eval_examples);
    const int64_t eb = std::max<int64_t>(options.batch_size, 16);
    std::vector<std::string> generated, gold, reference;
    for (int64_t s = 0; s < n; s += eb) {
      const int64_t e = std::min(n, s + eb);
      int64_t S = 0;
      for (int64_t k = s; k < e; ++k) S = std::max<int64_t>(S, prompts[k].size());
      std::vector<int64_t> ids, mask;
      for (int64_t k = s; k < e; ++k) {  // left-padded
        const auto& p = prompts[k];
        const int64_t pad = S - static_cast<int64_t>(p.size());
        for (int64_t j = 0; j < pad; ++j) {
          ids.push_back(tok_.pad_id);
          mask.push_back(0);
        }
        ids.insert(ids.end(), p.begin(), p.end());
        mask.insert(mask.end(), p.size(), 1);
      }
      DecoderInput in;
      AdapterBatch ab;
      const int64_t B = e - s;
      RETURN_IF_ERROR(TorchTry("eval batch", [&] {
        in.input_ids = torch::tensor(ids, torch::kLong).view({B, S}).to(device());
        in.attention_mask = torch::tensor(mask, torch::kLong).view({B, S}).to(device());
        ab = AdapterBatch::FromHost(torch::full({B}, task.task_index, torch::kLong), device());
      }));
      ASSIGN_OR_RETURN(torch::Tensor out, decoder_->GreedyGenerate(in, options.max_new_tokens,
                                                                   tok_.eos_id, adapter, ab));
      auto a = out.accessor<int64_t, 2>();
      for (int64_t r = 0; r < B; ++r) {
        std::vector<int64_t> row;
        for (int64_t j = 0; j < a.size(1); ++j) {
          if (a[r][j] == tok_.eos_id) break;
          row.push_back(a[r][j]);
        }
        generated.push_back(tok_.decode(row));
        const GenerationExample& ex = task.gen_eval.examples[s + r];
        gold.push_back(ex.answer);
        reference.push_back(ex.completion);
      }
    }
    std::map<std::string, double> m;
    m["exact_match"] = ExactMatch(generated, reference);
    if (task.gen_eval.all_answered()) m["answer_accuracy"] = AnswerAccuracy(generated, gold);
    m["examples"] = static_cast<double>(n);
    return m;
  }

 private:
  std::shared_ptr<const LlamaDecoder> decoder_;
  LmTokenizer tok_;
  std::vector<std::vector<LmEncoded>> train_;                  // per task (trainer order)
  std::map<std::string, std::vector<std::vector<int64_t>>> eval_;  // task name -> prompts
};

}  // namespace

LmTokenizer MakeChatLmTokenizer(std::shared_ptr<const BpeTokenizer> tokenizer) {
  LmTokenizer t;
  const bool chat = tokenizer->chat_template_status().ok();
  t.eos_id = tokenizer->eos_id();
  t.pad_id = tokenizer->pad_id() >= 0 ? tokenizer->pad_id() : std::max<int64_t>(0, t.eos_id);
  auto prompt_text = [tokenizer, chat](const std::vector<ChatMessage>& msgs)
      -> absl::StatusOr<std::string> {
    if (msgs.empty()) return absl::InvalidArgumentError("prompt: no messages");
    if (chat) return tokenizer->ApplyChatTemplate(msgs, /*add_generation_prompt=*/true);
    std::string s;
    for (size_t i = 0; i < msgs.size(); ++i) absl::StrAppend(&s, i ? "\n\n" : "", msgs[i].content);
    return s + "\n";
  };
  t.encode_prompt = [tokenizer, prompt_text](const std::vector<ChatMessage>& msgs)
      -> absl::StatusOr<std::vector<int64_t>> {
    ASSIGN_OR_RETURN(std::string p, prompt_text(msgs));
    return tokenizer->Encode(p, /*add_special_tokens=*/false);
  };
  t.encode = [tokenizer, chat, prompt_text](const GenerationExample& ex)
      -> absl::StatusOr<LmEncoded> {
    ASSIGN_OR_RETURN(std::string p, prompt_text(ex.prompt));
    LmEncoded e;
    e.prompt = tokenizer->Encode(p, /*add_special_tokens=*/false);
    if (chat) {
      std::vector<ChatMessage> all = ex.prompt;
      all.push_back({"assistant", ex.completion});
      ASSIGN_OR_RETURN(std::string full, tokenizer->ApplyChatTemplate(all, false));
      if (full.compare(0, p.size(), p) != 0) {
        return absl::FailedPreconditionError(
            "the chat template does not render the conversation as the prompt followed by the "
            "reply");
      }
      e.completion = tokenizer->Encode(full.substr(p.size()), /*add_special_tokens=*/false);
    } else {
      e.completion = tokenizer->Encode(ex.completion, /*add_special_tokens=*/false);
      if (tokenizer->eos_id() >= 0) e.completion.push_back(tokenizer->eos_id());
    }
    return e;
  };
  t.decode = [tokenizer](const std::vector<int64_t>& ids) {
    return tokenizer->Decode(ids, /*skip_special_tokens=*/true);
  };
  return t;
}

absl::StatusOr<LmBatch> BuildLmBatch(const std::vector<const LmEncoded*>& rows, int max_length,
                                     int64_t pad_id) {
  if (rows.empty()) return absl::InvalidArgumentError("empty batch");
  if (max_length < 2) return absl::InvalidArgumentError("max_length must be >= 2");
  std::vector<std::vector<int64_t>> ids(rows.size()), labels(rows.size());
  int64_t S = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    const LmEncoded& r = *rows[i];
    if (r.completion.empty()) return absl::InvalidArgumentError("a row has no completion tokens");
    // Completion first (at most max_length - 1 tokens: one prompt token at
    // least), then the prompt's last tokens in what is left.
    const size_t c = std::min<size_t>(r.completion.size(), max_length - 1);
    const size_t p = std::min<size_t>(r.prompt.size(), max_length - c);
    ids[i].assign(r.prompt.end() - p, r.prompt.end());
    labels[i].assign(p, kIgnore);
    ids[i].insert(ids[i].end(), r.completion.begin(), r.completion.begin() + c);
    labels[i].insert(labels[i].end(), r.completion.begin(), r.completion.begin() + c);
    S = std::max<int64_t>(S, ids[i].size());
  }
  const int64_t B = static_cast<int64_t>(rows.size());
  std::vector<int64_t> flat_ids, flat_mask, flat_labels;
  flat_ids.reserve(B * S);
  LmBatch b;
  for (size_t i = 0; i < rows.size(); ++i) {
    const int64_t n = static_cast<int64_t>(ids[i].size());
    b.tokens += n;
    flat_ids.insert(flat_ids.end(), ids[i].begin(), ids[i].end());
    flat_labels.insert(flat_labels.end(), labels[i].begin(), labels[i].end());
    flat_mask.insert(flat_mask.end(), n, 1);
    flat_ids.insert(flat_ids.end(), S - n, pad_id);
    flat_labels.insert(flat_labels.end(), S - n, kIgnore);
    flat_mask.insert(flat_mask.end(), S - n, 0);
  }
  RETURN_IF_ERROR(TorchTry("LM batch", [&] {
    b.input_ids = torch::tensor(flat_ids, torch::kLong).view({B, S});
    b.attention_mask = torch::tensor(flat_mask, torch::kLong).view({B, S});
    b.labels = torch::tensor(flat_labels, torch::kLong).view({B, S});
  }));
  return b;
}

absl::StatusOr<torch::Tensor> CompletionLoss(const LlamaDecoder& decoder, const LmBatch& batch,
                                             EncoderAdapter* adapter, const AdapterBatch& ab) {
  const torch::Device dev = decoder.device();
  DecoderInput in;
  torch::Tensor labels;
  RETURN_IF_ERROR(TorchTry("LM batch to device", [&] {
    in.input_ids = batch.input_ids.to(dev);
    in.attention_mask = batch.attention_mask.to(dev);
    labels = batch.labels.to(dev);
  }));
  // Hidden states only: the LM head ([D] -> vocab, the largest single product
  // of a step) runs below on the completion positions, a few of each row.
  DecoderForwardOptions hidden_only;
  hidden_only.skip_logits = true;
  ASSIGN_OR_RETURN(DecoderOutput out, decoder.Forward(in, nullptr, adapter, ab, hidden_only));
  torch::Tensor loss;
  RETURN_IF_ERROR(TorchTry("LM loss", [&] {
    const int64_t S = labels.size(1);
    const int64_t D = out.hidden.size(-1);
    // Position s predicts token s + 1; keep the positions whose next token
    // is a completion token, so only those rows reach the LM head and the loss.
    torch::Tensor next = labels.slice(1, 1, S).reshape({-1});
    torch::Tensor keep = next.ne(kIgnore).nonzero().squeeze(1);
    if (keep.numel() == 0) {
      throw std::runtime_error("no completion token in the batch (all truncated?)");
    }
    torch::Tensor logits =
        decoder.Logits(out.hidden.slice(1, 0, S - 1).reshape({-1, D}).index_select(0, keep))
            .to(torch::kFloat);
    loss = torch::nn::functional::cross_entropy(logits, next.index_select(0, keep));
  }));
  return loss;
}

std::shared_ptr<TrainObjective> MakeLmObjective(std::shared_ptr<const LlamaDecoder> decoder,
                                                LmTokenizer tokenizer) {
  return std::make_shared<LmObjective>(std::move(decoder), std::move(tokenizer));
}

}  // namespace metatt
