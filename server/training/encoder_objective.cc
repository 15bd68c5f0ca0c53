#include "server/training/encoder_objective.h"

#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "server/training/eval_scores.h"

namespace metatt {
namespace {

class EncoderObjective : public TrainObjective {
 public:
  EncoderObjective(std::shared_ptr<const BertEncoder> encoder, BatchTokenizer tokenizer)
      : encoder_(std::move(encoder)), tokenizer_(std::move(tokenizer)) {}

  torch::Device device() const override { return encoder_->device(); }

  absl::Status Prepare(std::vector<TrainTask>* tasks, const TrainerOptions& options) override {
    (void)options;
    if (encoder_ == nullptr) return absl::InvalidArgumentError("trainer: no encoder");
    if (!tokenizer_) return absl::InvalidArgumentError("trainer: no tokenizer");
    const int64_t hidden = encoder_->config().hidden_size;
    for (TrainTask& task : *tasks) {
      const std::string who = absl::StrCat("task '", task.name, "'");
      if (task.head == nullptr) return absl::InvalidArgumentError(who + ": no head");
      if (task.train.examples.empty()) return absl::InvalidArgumentError(who + ": empty train set");
      if (task.head->kind != task.train.label_kind) {
        return absl::InvalidArgumentError(who + ": head kind differs from the data's label kind");
      }
      if (task.head->weight.dim() != 2 || task.head->weight.size(1) != hidden) {
        return absl::InvalidArgumentError(
            absl::StrCat(who, ": head input width must be the encoder's hidden size ", hidden));
      }
      const bool reg = task.head->kind == LabelKind::kRegression;
      if (!reg && task.head->num_labels < task.train.num_labels()) {
        return absl::InvalidArgumentError(absl::StrCat(who, ": head has ", task.head->num_labels,
                                                       " labels, data has ",
                                                       task.train.num_labels()));
      }
      if (!task.eval.examples.empty() && task.eval.label_kind != task.train.label_kind) {
        return absl::InvalidArgumentError(who + ": eval and train label kinds differ");
      }
      if (task.primary_metric.empty()) task.primary_metric = DefaultPrimaryMetric(reg);
      RETURN_IF_ERROR(ValidateMetricName(task.primary_metric, reg, task.head->num_labels));
    }
    return absl::OkStatus();
  }

  int64_t NumTrainExamples(const TrainTask& task) const override {
    return static_cast<int64_t>(task.train.examples.size());
  }
  bool HasEval(const TrainTask& task) const override { return !task.eval.examples.empty(); }

  absl::StatusOr<BatchLoss> Loss(const std::vector<TrainTask>& tasks,
                                 const std::vector<BatchRow>& batch_rows, EncoderAdapter* adapter,
                                 const AdapterBatch& ab, const TrainerOptions& options) override {
    std::vector<TextPair> rows;
    std::vector<const Example*> row_ex;
    for (const auto& [t, e] : batch_rows) {
      const Example& ex = tasks[t].train.examples[e];
      rows.emplace_back(ex.text, ex.text_pair);
      row_ex.push_back(&ex);
    }
    const int64_t B = static_cast<int64_t>(rows.size());
    ASSIGN_OR_RETURN(EncoderInput in, Tokenize(rows, options));
    const torch::Device dev = device();
    ASSIGN_OR_RETURN(torch::Tensor hidden, encoder_->Forward(in, adapter, ab));
    BatchLoss out;
    RETURN_IF_ERROR(TorchTry("train loss", [&] {
      torch::Tensor mask = in.attention_mask.defined() ? in.attention_mask
                                                       : torch::ones_like(in.input_ids);
      out.tokens = mask.sum().item<int64_t>();
      torch::Tensor pooled = Pool(hidden, mask, options.pooling);
      torch::Tensor total;
      for (size_t t = 0; t < tasks.size(); ++t) {
        std::vector<int64_t> idx;
        std::vector<int64_t> lab_i;
        std::vector<float> lab_f;
        for (int64_t i = 0; i < B; ++i) {
          if (batch_rows[i].first != static_cast<int>(t)) continue;
          idx.push_back(i);
          lab_i.push_back(row_ex[i]->label_id);
          lab_f.push_back(row_ex[i]->label_value);
        }
        if (idx.empty()) continue;
        const TaskHead& head = *tasks[t].head;
        torch::Tensor sel = pooled.index_select(0, torch::tensor(idx, torch::kLong).to(dev));
        torch::Tensor labels = head.kind == LabelKind::kRegression
                                   ? torch::tensor(lab_f, torch::kFloat).to(dev)
                                   : torch::tensor(lab_i, torch::kLong).to(dev);
        torch::Tensor l = head.LossSum(head.Forward(sel), labels);
        total = total.defined() ? total + l : l;
      }
      out.loss = total / static_cast<double>(B);
    }));
    return out;
  }

  absl::StatusOr<std::map<std::string, double>> Evaluate(const TrainTask& task,
                                                         EncoderAdapter* adapter,
                                                         const TrainerOptions& options) override {
    const torch::Device dev = device();
    const int64_t eb = std::max<int64_t>(options.batch_size, 32);
    int64_t n = static_cast<int64_t>(task.eval.examples.size());
    if (options.max_eval_examples > 0) n = std::min(n, options.max_eval_examples);
    std::vector<int64_t> pred_i, lab_i;
    std::vector<double> pred_f, lab_f;
    for (int64_t s = 0; s < n; s += eb) {
      const int64_t e = std::min(n, s + eb);
      std::vector<TextPair> rows;
      for (int64_t k = s; k < e; ++k) {
        const Example& ex = task.eval.examples[k];
        rows.emplace_back(ex.text, ex.text_pair);
        lab_i.push_back(ex.label_id);
        lab_f.push_back(ex.label_value);
      }
      ASSIGN_OR_RETURN(EncoderInput in, Tokenize(rows, options));
      AdapterBatch ab;
      RETURN_IF_ERROR(TorchTry("eval task index", [&] {
        ab = AdapterBatch::FromHost(torch::full({e - s}, task.task_index, torch::kLong), dev);
      }));
      ASSIGN_OR_RETURN(torch::Tensor hidden, encoder_->Forward(in, adapter, ab));
      RETURN_IF_ERROR(TorchTry("eval", [&] {
        torch::Tensor mask = in.attention_mask.defined() ? in.attention_mask
                                                         : torch::ones_like(in.input_ids);
        torch::Tensor p =
            task.head->Predict(task.head->Forward(Pool(hidden, mask, options.pooling)));
        if (task.head->kind == LabelKind::kRegression) {
          auto a = p.accessor<double, 1>();
          for (int64_t k = 0; k < a.size(0); ++k) pred_f.push_back(a[k]);
        } else {
          auto a = p.accessor<int64_t, 1>();
          for (int64_t k = 0; k < a.size(0); ++k) pred_i.push_back(a[k]);
        }
      }));
    }
    if (task.head->kind == LabelKind::kRegression) return RegressionMetrics(pred_f, lab_f);
    return ClassificationMetrics(pred_i, lab_i, task.head->num_labels);
  }

 private:
  absl::StatusOr<EncoderInput> Tokenize(const std::vector<TextPair>& rows,
                                        const TrainerOptions& options) const {
    ASSIGN_OR_RETURN(EncoderInput in, tokenizer_(rows, options.max_length));
    const torch::Device dev = encoder_->device();
    RETURN_IF_ERROR(TorchTry("batch to device", [&] {
      in.input_ids = in.input_ids.to(dev);
      if (in.token_type_ids.defined()) in.token_type_ids = in.token_type_ids.to(dev);
      if (in.attention_mask.defined()) in.attention_mask = in.attention_mask.to(dev);
    }));
    return in;
  }

  std::shared_ptr<const BertEncoder> encoder_;
  BatchTokenizer tokenizer_;
};

}  // namespace

std::shared_ptr<TrainObjective> MakeEncoderObjective(std::shared_ptr<const BertEncoder> encoder,
                                                     BatchTokenizer tokenizer) {
  return std::make_shared<EncoderObjective>(std::move(encoder), std::move(tokenizer));
}

}  // namespace metatt
