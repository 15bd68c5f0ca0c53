// Generation tasks on a tiny random Llama decoder: completion-only loss,
// training through the shared Trainer loop (MetaTT 4D / (4+1)D / 5D, LoRA),
// add-task with frozen shared cores, generation-based evaluation.
#include <gtest/gtest.h>

#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "adapters/lora_adapter.h"
#include "adapters/metatt_adapter.h"
#include "base/status_macros.h"
#include "server/model/test_util.h"
#include "server/training/adapter_binding.h"
#include "server/training/lm_objective.h"

namespace metatt {
namespace {

constexpr int64_t kBos = 1, kEos = 2, kPad = 0;

LlamaConfig TinyConfig() { return TinyLlamaConfig(); }

std::shared_ptr<LlamaDecoder> TinyDecoder(uint64_t seed = 0) {
  const LlamaConfig c = TinyConfig();
  auto d = LlamaDecoder::FromTensors(c, RandomLlamaWeights(c, seed), torch::kCPU);
  EXPECT_TRUE(d.ok()) << d.status();
  return d.ok() ? *d : nullptr;
}

// Letters a..z are ids 3..28; the prompt is BOS + the user message's
// letters, the completion its letters + EOS.
int64_t Id(char c) { return 3 + (c - 'a'); }
std::vector<int64_t> Ids(const std::string& s) {
  std::vector<int64_t> out;
  for (char c : s) out.push_back(Id(c));
  return out;
}
LmTokenizer LetterTokenizer() {
  LmTokenizer t;
  t.eos_id = kEos;
  t.pad_id = kPad;
  t.encode_prompt = [](const std::vector<ChatMessage>& m) -> absl::StatusOr<std::vector<int64_t>> {
    std::vector<int64_t> ids = {kBos};
    for (const auto& msg : m) {
      auto x = Ids(msg.content);
      ids.insert(ids.end(), x.begin(), x.end());
    }
    return ids;
  };
  t.encode = [p = t.encode_prompt](const GenerationExample& ex) -> absl::StatusOr<LmEncoded> {
    LmEncoded e;
    ASSIGN_OR_RETURN(e.prompt, p(ex.prompt));
    e.completion = Ids(ex.completion);
    e.completion.push_back(kEos);
    return e;
  };
  t.decode = [](const std::vector<int64_t>& ids) {
    std::string s;
    for (int64_t i : ids)
      if (i >= 3 && i < 29) s.push_back(static_cast<char>('a' + (i - 3)));
    return s;
  };
  return t;
}

GenerationExample Ex(const std::string& prompt, const std::string& completion,
                     const std::string& answer = "") {
  GenerationExample e;
  e.prompt = {{"user", prompt}};
  e.completion = completion;
  e.answer = answer;
  return e;
}

// Task "rev": the completion reverses the prompt's first three letters.
GenerationDataset ReverseTask() {
  GenerationDataset ds;
  const std::vector<std::string> words = {"abc", "bcd", "cde", "def", "efg", "fgh",
                                          "ghi", "hij", "ijk", "jkl", "klm", "lmn"};
  for (const auto& w : words) ds.examples.push_back(Ex(w + "xy", std::string(w.rbegin(), w.rend())));
  return ds;
}

// The training task "rev" over ReverseTask().
TrainTask RevTask() {
  TrainTask t;
  t.name = "rev";
  t.gen_train = ReverseTask();
  return t;
}

// A task whose completion is always the same word (learnable in a few steps).
GenerationDataset ConstantTask(const std::string& word) {
  GenerationDataset ds;
  for (const std::string p : {"abc", "zzz", "qrs", "mno", "tuv", "hij", "cab", "bac"})
    ds.examples.push_back(Ex(p, word, word));
  return ds;
}

MetaTTConfig AllProjections(const LlamaDecoder& d, TTForm form, int64_t tasks = 1) {
  return LlamaMetaTTConfig(d.geometry(), form, /*rank=*/4, tasks);
}

TrainerOptions Options(int64_t steps) {
  TrainerOptions o;
  o.steps = steps;
  o.batch_size = 4;
  o.lr = 1e-2;
  o.warmup_steps = 0;
  o.linear_decay = false;
  o.max_length = 32;
  o.max_new_tokens = 6;
  o.grad_clip_norm = 0;
  return o;
}

// The mean completion loss over a whole task (no grad).
double TaskLoss(const LlamaDecoder& d, const LmTokenizer& tok, const GenerationDataset& ds,
                EncoderAdapter* adapter, int64_t task_index = 0) {
  torch::NoGradGuard ng;
  std::vector<LmEncoded> enc;
  for (const auto& e : ds.examples) enc.push_back(*tok.encode(e));
  std::vector<const LmEncoded*> rows;
  for (const auto& e : enc) rows.push_back(&e);
  auto b = BuildLmBatch(rows, 32, kPad);
  EXPECT_TRUE(b.ok()) << b.status();
  auto ab = AdapterBatch::FromHost(torch::full({b->input_ids.size(0)}, task_index, torch::kLong),
                                   torch::kCPU);
  auto l = CompletionLoss(d, *b, adapter, ab);
  EXPECT_TRUE(l.ok()) << l.status();
  return l->template item<double>();
}

TEST(LmBatch, PromptAndPaddingCarryNoLabel) {
  LmEncoded a{{1, 5, 6, 7}, {8, 9, 2}}, b{{1, 5}, {10, 2}};
  auto batch = BuildLmBatch({&a, &b}, 32, kPad);
  ASSERT_TRUE(batch.ok()) << batch.status();
  EXPECT_TRUE(torch::equal(batch->input_ids,
                           torch::tensor({1, 5, 6, 7, 8, 9, 2, 1, 5, 10, 2, 0, 0, 0}).view({2, 7})));
  EXPECT_TRUE(torch::equal(batch->labels, torch::tensor({-100, -100, -100, -100, 8, 9, 2, -100, -100,
                                                         10, 2, -100, -100, -100})
                                              .view({2, 7})));
  EXPECT_TRUE(torch::equal(batch->attention_mask,
                           torch::tensor({1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0}).view({2, 7})));
  EXPECT_EQ(batch->tokens, 11);
  // Too long: the prompt loses its first tokens, the completion stays.
  auto cut = BuildLmBatch({&a}, 5, kPad);
  ASSERT_TRUE(cut.ok());
  EXPECT_TRUE(torch::equal(cut->input_ids, torch::tensor({6, 7, 8, 9, 2}).view({1, 5})));
  EXPECT_TRUE(torch::equal(cut->labels, torch::tensor({-100, -100, 8, 9, 2}).view({1, 5})));
}

TEST(LmLoss, IsTheMeanCrossEntropyOfCompletionTokensOnly) {
  auto d = TinyDecoder();
  LmEncoded a{{1, 5, 6, 7}, {8, 9, 2}}, b{{1, 5}, {10, 2}};
  auto batch = BuildLmBatch({&a, &b}, 32, kPad);
  ASSERT_TRUE(batch.ok());
  auto loss = CompletionLoss(*d, *batch, nullptr, {});
  ASSERT_TRUE(loss.ok()) << loss.status();
  // Reference: each sequence alone, -log p(completion token | everything before).
  double sum = 0;
  int n = 0;
  for (const LmEncoded* r : {&a, &b}) {
    std::vector<int64_t> ids = r->prompt;
    ids.insert(ids.end(), r->completion.begin(), r->completion.end());
    const int64_t S = static_cast<int64_t>(ids.size());
    auto out = d->Forward({torch::tensor(ids).view({1, S}), {}});
    ASSERT_TRUE(out.ok());
    auto logp = torch::log_softmax(out->logits[0], -1);
    for (size_t k = 0; k < r->completion.size(); ++k) {
      const int64_t pos = static_cast<int64_t>(r->prompt.size() + k);  // predicted from pos - 1
      sum -= logp[pos - 1][ids[pos]].item<double>();
      ++n;
    }
  }
  EXPECT_NEAR(loss->item<double>(), sum / n, 1e-5);
  // Changing what the prompt tokens would predict changes nothing: a prompt
  // token's own label never enters (rows with a different last-but-one
  // prompt label give the same loss as long as the inputs are equal).
  LmBatch relabelled = *batch;
  relabelled.labels = batch->labels.clone();
  relabelled.labels.index_put_({0, 2}, -100);  // already -100: prompt
  auto same = CompletionLoss(*d, relabelled, nullptr, {});
  EXPECT_DOUBLE_EQ(same->item<double>(), loss->item<double>());
  // Labelling a prompt token instead would change it.
  relabelled.labels.index_put_({0, 2}, 6);
  auto other = CompletionLoss(*d, relabelled, nullptr, {});
  EXPECT_NE(other->item<double>(), loss->item<double>());
}

TEST(LmTrainer, MetaTT4DOnEveryProjectionReducesTheCompletionLoss) {
  auto d = TinyDecoder();
  const LmTokenizer tok = LetterTokenizer();
  auto a = MetaTTAdapter::Create(AllProjections(*d, TTForm::k4D));
  ASSERT_TRUE(a.ok()) << a.status();
  const TrainTask t = RevTask();
  const double before = TaskLoss(*d, tok, t.gen_train, a->get());
  std::vector<double> tokens_per_second;
  TrainerCallbacks cb;
  cb.on_progress = [&](const ProgressEvent& p) {
    tokens_per_second.push_back(p.tokens_per_second);
  };
  auto tr = Trainer::Create(Options(60), MakeLmObjective(d, tok), BindMetaTT(a->get()), {t}, cb);
  ASSERT_TRUE(tr.ok()) << tr.status();
  ASSERT_TRUE((*tr)->Run().ok());
  const double after = TaskLoss(*d, tok, t.gen_train, a->get());
  EXPECT_LT(after, 0.5 * before) << before << " -> " << after;
  EXPECT_LT((*tr)->losses().back(), (*tr)->losses().front());
  ASSERT_FALSE(tokens_per_second.empty());
  EXPECT_GT(tokens_per_second.back(), 0);
}

TEST(LmTrainer, LoraOnLlamaGeometryTrains) {
  auto d = TinyDecoder();
  const LmTokenizer tok = LetterTokenizer();
  LoraConfig c;
  c.SetModel(d->geometry());
  c.rank = 4;
  c.alpha = 8;
  c.projections = {Projection::kQuery, Projection::kValue};
  auto a = LoraAdapter::Create(c, LoraAdapter::Options());
  ASSERT_TRUE(a.ok()) << a.status();
  const TrainTask t = RevTask();
  const double before = TaskLoss(*d, tok, t.gen_train, a->get());
  auto tr = Trainer::Create(Options(40), MakeLmObjective(d, tok), BindLora(a->get()), {t});
  ASSERT_TRUE(tr.ok()) << tr.status();
  ASSERT_TRUE((*tr)->Run().ok());
  EXPECT_LT(TaskLoss(*d, tok, t.gen_train, a->get()), 0.7 * before);
}

TEST(LmTrainer, FiveDimensionalFormRefusesGroupedQueryKV) {
  auto d = TinyDecoder();
  MetaTTConfig c = AllProjections(*d, TTForm::k5D);
  c.projections = {Projection::kQuery, Projection::kValue};
  c.num_heads = d->config().num_attention_heads;
  auto bad = MetaTTAdapter::Create(c);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("grouped-query"), std::string::npos) << bad.status();
  // Projections at the hidden width (q, o) work in 5D, one head block per query head.
  c.projections = {Projection::kQuery, Projection::kAttnOutput};
  auto a = MetaTTAdapter::Create(c);
  ASSERT_TRUE(a.ok()) << a.status();
  const TrainTask t = RevTask();
  const double before = TaskLoss(*d, LetterTokenizer(), t.gen_train, a->get());
  auto tr = Trainer::Create(Options(30), MakeLmObjective(d, LetterTokenizer()),
                            BindMetaTT(a->get()), {t});
  ASSERT_TRUE(tr.ok()) << tr.status();
  ASSERT_TRUE((*tr)->Run().ok());
  EXPECT_LT(TaskLoss(*d, LetterTokenizer(), t.gen_train, a->get()), before);
}

TEST(LmTrainer, MultiTaskThenAddTaskWithFrozenSharedCores) {
  auto d = TinyDecoder();
  const LmTokenizer tok = LetterTokenizer();
  auto a = MetaTTAdapter::Create(AllProjections(*d, TTForm::k4Plus1D, 2));
  ASSERT_TRUE(a.ok()) << a.status();
  std::vector<TrainTask> tasks(2);
  tasks[0].name = "rev";
  tasks[0].task_index = 0;
  tasks[0].gen_train = ReverseTask();
  tasks[1].name = "const";
  tasks[1].task_index = 1;
  tasks[1].gen_train = ConstantTask("bed");
  tasks[1].gen_eval = ConstantTask("bed");
  const double rev0 = TaskLoss(*d, tok, tasks[0].gen_train, a->get(), 0);
  const double const0 = TaskLoss(*d, tok, tasks[1].gen_train, a->get(), 1);
  auto tr = Trainer::Create(Options(100), MakeLmObjective(d, tok), BindMetaTT(a->get()), tasks);
  ASSERT_TRUE(tr.ok()) << tr.status();
  auto untrained = (*tr)->Evaluate();
  ASSERT_TRUE(untrained.ok()) << untrained.status();
  const double accuracy0 = untrained->metrics.at("const").at("answer_accuracy");
  ASSERT_TRUE((*tr)->Run().ok());
  EXPECT_LT(TaskLoss(*d, tok, tasks[0].gen_train, a->get(), 0), 0.7 * rev0);
  EXPECT_LT(TaskLoss(*d, tok, tasks[1].gen_train, a->get(), 1), 0.5 * const0);
  // Evaluated by generation (greedy, KV cache): the constant task now
  // answers "bed" (almost) every time; the random base never does.
  ASSERT_TRUE((*tr)->last_eval().has_value());
  const auto& m = (*tr)->last_eval()->metrics.at("const");
  EXPECT_EQ(accuracy0, 0.0);
  EXPECT_GE(m.at("answer_accuracy"), 0.75);
  EXPECT_GE(m.at("exact_match"), 0.75);
  EXPECT_EQ(m.at("examples"), 8);

  // Add a third task: shared cores and the two slices frozen.
  std::map<std::string, torch::Tensor> shared_before;
  for (const auto& [n, t] : (*a)->NamedParameters()) shared_before[n] = t.detach().clone();
  (*a)->FreezeShared(true);
  auto idx = (*a)->AddTask();
  ASSERT_TRUE(idx.ok());
  TrainTask added;
  added.name = "const2";
  added.task_index = *idx;
  added.gen_train = ConstantTask("fad");
  const double added0 = TaskLoss(*d, tok, added.gen_train, a->get(), *idx);
  TrainerOptions o2 = Options(60);
  o2.lr = 3e-2;  // 16 parameters train: the new task's r x r slice
  auto tr2 = Trainer::Create(o2, MakeLmObjective(d, tok), BindMetaTT(a->get()), {added});
  ASSERT_TRUE(tr2.ok()) << tr2.status();
  ASSERT_TRUE((*tr2)->Run().ok());
  EXPECT_LT(TaskLoss(*d, tok, added.gen_train, a->get(), *idx), 0.9 * added0);
  for (const auto& [n, t] : (*a)->NamedParameters()) {
    if (shared_before.count(n)) {
      EXPECT_TRUE(torch::equal(t.detach(), shared_before.at(n))) << n << " moved";
    }
  }
}

TEST(LmTrainer, RefusesHeadsAndBadMetrics) {
  auto d = TinyDecoder();
  auto a = MetaTTAdapter::Create(AllProjections(*d, TTForm::k4D));
  ASSERT_TRUE(a.ok());
  TrainTask t = RevTask();
  t.gen_eval = ReverseTask();  // no answers
  t.primary_metric = "answer_accuracy";
  auto tr = Trainer::Create(Options(1), MakeLmObjective(d, LetterTokenizer()), BindMetaTT(a->get()),
                            {t});
  ASSERT_FALSE(tr.ok());
  EXPECT_NE(tr.status().message().find("needs an 'answer'"), std::string::npos) << tr.status();
  t.primary_metric = "mcc";
  tr = Trainer::Create(Options(1), MakeLmObjective(d, LetterTokenizer()), BindMetaTT(a->get()), {t});
  ASSERT_FALSE(tr.ok());
  EXPECT_NE(tr.status().message().find("'mcc' is not available"), std::string::npos);
  t.primary_metric = "";
  t.gen_train = {};
  tr = Trainer::Create(Options(1), MakeLmObjective(d, LetterTokenizer()), BindMetaTT(a->get()), {t});
  ASSERT_FALSE(tr.ok());
  EXPECT_NE(tr.status().message().find("empty train set"), std::string::npos);
}

}  // namespace
}  // namespace metatt
