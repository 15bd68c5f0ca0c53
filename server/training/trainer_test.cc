#include "server/training/trainer.h"

#include <numeric>
#include <set>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "server/training/test_util.h"

namespace metatt {
namespace {

using testing_util::SyntheticDataset;
using testing_util::TestAdapter;
using testing_util::TinyEncoder;
using testing_util::WhitespaceTokenizer;

std::shared_ptr<TaskHead> Head(LabelKind kind, uint64_t seed) {
  return testing_util::TinyHead(seed, kind);
}

TrainerOptions BaseOptions() {
  TrainerOptions o = testing_util::TinyTrainerOptions(/*steps=*/40, /*seed=*/7);
  o.warmup_steps = 2;
  return o;
}

struct Fixture {
  std::shared_ptr<BertEncoder> encoder;
  std::unique_ptr<TestAdapter> adapter;
  std::unique_ptr<Trainer> trainer;
};

Fixture Make(const TrainerOptions& o, TrainerCallbacks cb = {}, int tasks = 1) {
  Fixture s;
  s.encoder = TinyEncoder();
  s.adapter = std::make_unique<TestAdapter>(2, 16, 4, tasks, 3);
  std::vector<TrainTask> ts;
  for (int t = 0; t < tasks; ++t) {
    TrainTask task;
    task.name = absl::StrCat("task", t);
    task.task_index = t;
    task.train = SyntheticDataset(128, 11 + t, false, t == 0 ? "great" : "awful");
    task.eval = SyntheticDataset(64, 99 + t, false, t == 0 ? "great" : "awful");
    task.head = Head(LabelKind::kClassification, 5 + t);
    ts.push_back(std::move(task));
  }
  auto tr = Trainer::Create(o, s.encoder, WhitespaceTokenizer(), s.adapter->Binding(),
                            std::move(ts), std::move(cb));
  EXPECT_TRUE(tr.ok()) << tr.status();
  if (tr.ok()) s.trainer = std::move(*tr);
  return s;
}

double Mean(const std::vector<double>& v, size_t from, size_t to) {
  return std::accumulate(v.begin() + from, v.begin() + to, 0.0) / (to - from);
}

TEST(TrainerTest, LossDecreasesOnLearnableTask) {
  std::vector<ProgressEvent> progress;
  std::vector<EvalEvent> evals;
  TrainerCallbacks cb;
  cb.on_progress = [&](const ProgressEvent& p) { progress.push_back(p); };
  cb.on_eval = [&](const EvalEvent& e) { evals.push_back(e); };
  TrainerOptions o = BaseOptions();
  o.eval_every = 20;
  Fixture s = Make(o, cb);
  ASSERT_NE(s.trainer, nullptr);
  ASSERT_TRUE(s.trainer->Run().ok());
  EXPECT_EQ(s.trainer->state(), Trainer::State::kFinished);
  const auto& l = s.trainer->losses();
  ASSERT_EQ(l.size(), 40u);
  EXPECT_LT(Mean(l, 30, 40), 0.7 * Mean(l, 0, 5)) << "first " << Mean(l, 0, 5) << " last "
                                                  << Mean(l, 30, 40);
  ASSERT_EQ(progress.size(), 40u);
  EXPECT_EQ(progress.back().step, 40);
  EXPECT_EQ(progress.back().total_steps, 40);
  EXPECT_GT(progress.back().examples_per_second, 0);
  EXPECT_DOUBLE_EQ(progress.back().eta_seconds, 0.0);
  EXPECT_NEAR(progress[0].lr, 0.5e-2, 1e-12);  // warm-up 1/2
  EXPECT_NEAR(progress[1].lr, 1e-2, 1e-12);
  EXPECT_LT(progress.back().lr, 1e-3);  // linear decay
  EXPECT_NEAR(progress[7].epoch, 1.0, 1e-12);  // 128 rows / 16 = 8 steps per epoch
  ASSERT_EQ(evals.size(), 2u);
  EXPECT_GT(evals.back().metrics.at("task0").at("accuracy"), 0.8);
  EXPECT_TRUE(evals.back().metrics.at("task0").count("mcc"));
  ASSERT_TRUE(s.trainer->best_eval().has_value());
  const auto& best = s.trainer->best_tensors();
  EXPECT_TRUE(best.count("heads.task0.weight"));
  EXPECT_TRUE(best.count("adapter.p0"));
}

TEST(TrainerTest, SameSeedSameLossesBitIdentical) {
  TrainerOptions o = BaseOptions();
  o.steps = 5;
  Fixture a = Make(o), b = Make(o);
  ASSERT_TRUE(a.trainer->Run().ok());
  ASSERT_TRUE(b.trainer->Run().ok());
  ASSERT_EQ(a.trainer->losses().size(), 5u);
  for (size_t i = 0; i < 5; ++i) {
    EXPECT_EQ(a.trainer->losses()[i], b.trainer->losses()[i]) << "step " << i;
  }
  for (size_t i = 0; i < a.adapter->b.size(); ++i) {
    EXPECT_TRUE(torch::equal(a.adapter->b[i], b.adapter->b[i]));
  }
  o.seed = 8;
  Fixture c = Make(o);
  ASSERT_TRUE(c.trainer->Run().ok());
  EXPECT_NE(a.trainer->losses(), c.trainer->losses());
}

TEST(TrainerTest, CancelStopsAtNextStep) {
  TrainerOptions o = BaseOptions();
  Trainer* tp = nullptr;
  TrainerCallbacks cb;
  cb.on_progress = [&](const ProgressEvent& p) {
    if (p.step == 3) tp->Cancel();
  };
  Fixture s = Make(o, cb);
  tp = s.trainer.get();
  ASSERT_TRUE(s.trainer->Run().ok());
  EXPECT_EQ(s.trainer->state(), Trainer::State::kCancelled);
  EXPECT_EQ(s.trainer->step(), 3);
  auto more = s.trainer->Step();
  ASSERT_TRUE(more.ok());
  EXPECT_FALSE(*more);
}

TEST(TrainerTest, RankScheduleSweepsAtEpochBoundaries) {
  TrainerOptions o = BaseOptions();
  o.steps = 0;
  o.epochs = 3;  // 8 steps per epoch -> 24 steps
  o.rank_schedule = {{1, 3}, {2, 2}};
  std::vector<SweepEvent> sweeps;
  TrainerCallbacks cb;
  cb.on_sweep = [&](const SweepEvent& e) { sweeps.push_back(e); };
  Fixture s = Make(o, cb);
  ASSERT_EQ(s.trainer->total_steps(), 24);
  ASSERT_TRUE(s.trainer->Run().ok()) << "sweeps ok";
  ASSERT_EQ(sweeps.size(), 2u);
  EXPECT_EQ(sweeps[0].step, 8);
  EXPECT_EQ(sweeps[1].step, 16);
  ASSERT_EQ(sweeps[0].bonds.size(), 4u);
  for (const auto& b : sweeps[0].bonds) {
    EXPECT_EQ(b.old_rank, 4);
    EXPECT_EQ(b.new_rank, 3);
    EXPECT_GE(b.discarded_weight, 0.0);
  }
  for (const auto& b : sweeps[1].bonds) {
    EXPECT_EQ(b.old_rank, 3);
    EXPECT_EQ(b.new_rank, 2);
  }
  for (const auto& a : s.adapter->a) EXPECT_EQ(a.size(1), 2);
  // Training continued on the new tensors after the sweeps.
  EXPECT_GT(s.adapter->b[0].abs().sum().item<double>(), 0.0);
  EXPECT_EQ(s.trainer->losses().size(), 24u);
}

TEST(TrainerTest, HeadsOnlyLeavesAdapterBitIdentical) {
  TrainerOptions o = BaseOptions();
  o.steps = 6;
  o.trainable = TrainableSet::kHeadsOnly;
  Fixture s = Make(o);
  std::vector<torch::Tensor> before;
  for (const auto& p : s.adapter->Params()) before.push_back(p.detach().clone());
  auto head_before = s.trainer->tasks()[0].head->weight.detach().clone();
  ASSERT_TRUE(s.trainer->Run().ok());
  auto after = s.adapter->Params();
  for (size_t i = 0; i < before.size(); ++i) EXPECT_TRUE(torch::equal(before[i], after[i]));
  EXPECT_FALSE(torch::equal(head_before, s.trainer->tasks()[0].head->weight));
}

TEST(TrainerTest, HeadFirstHoldsTheAdapterThenWarmsItUp) {
  TrainerOptions o = BaseOptions();
  o.steps = 10;
  o.warmup_steps = 2;
  o.head_first_ratio = 0.3;  // steps 1-3 (of 10) train the heads only
  Fixture* fs = nullptr;
  std::vector<torch::Tensor> start;
  std::vector<bool> adapter_still;  // per step: adapter equal to its start
  TrainerCallbacks cb;
  cb.on_progress = [&](const ProgressEvent&) {
    auto now = fs->adapter->Params();
    bool same = true;
    for (size_t i = 0; i < start.size(); ++i) same = same && torch::equal(start[i], now[i]);
    adapter_still.push_back(same);
  };
  Fixture s = Make(o, cb);
  fs = &s;
  for (const auto& p : s.adapter->Params()) start.push_back(p.detach().clone());
  auto head_start = s.trainer->tasks()[0].head->weight.detach().clone();
  ASSERT_TRUE(s.trainer->Run().ok());
  ASSERT_EQ(adapter_still.size(), 10u);
  EXPECT_TRUE(adapter_still[0] && adapter_still[1] && adapter_still[2]);
  EXPECT_FALSE(adapter_still[3]);  // the adapter's first step (half its rate)
  EXPECT_FALSE(torch::equal(head_start, s.trainer->tasks()[0].head->weight));
}

TEST(TrainerTest, MultiTaskBatchesMixTasksAndEvaluateEach) {
  TrainerOptions o = BaseOptions();
  o.steps = 10;
  Fixture s = Make(o, {}, /*tasks=*/2);
  ASSERT_TRUE(s.trainer->Run().ok());
  bool mixed = false;
  for (const auto& t : s.adapter->seen_tasks) {
    if (t.numel() == 16 && t.min().item<int64_t>() == 0 && t.max().item<int64_t>() == 1) {
      mixed = true;
    }
  }
  EXPECT_TRUE(mixed);
  ASSERT_TRUE(s.trainer->last_eval().has_value());
  EXPECT_EQ(s.trainer->last_eval()->metrics.size(), 2u);
  // Both task heads were trained.
  EXPECT_TRUE(s.trainer->best_tensors().count("heads.task1.bias"));
  EXPECT_GT(s.trainer->tasks()[1].head->bias.abs().sum().item<double>(), 0.0);
  EXPECT_FALSE(torch::equal(s.adapter->task_scale.detach(), torch::ones({2, 1})));
}

TEST(TrainerTest, RegressionTaskTrains) {
  auto enc = TinyEncoder();
  TestAdapter ad(2, 16, 4, 1, 3);
  TrainTask t;
  t.name = "reg";
  t.train = SyntheticDataset(128, 1, true);
  t.eval = SyntheticDataset(64, 2, true);
  t.head = Head(LabelKind::kRegression, 1);
  TrainerOptions o = BaseOptions();
  o.steps = 30;
  auto tr = Trainer::Create(o, enc, WhitespaceTokenizer(), ad.Binding(), {t});
  ASSERT_TRUE(tr.ok()) << tr.status();
  ASSERT_TRUE((*tr)->Run().ok());
  const auto& l = (*tr)->losses();
  EXPECT_LT(Mean(l, 25, 30), Mean(l, 0, 5));
  EXPECT_GT((*tr)->last_eval()->metrics.at("reg").at("pearson"), 0.3);
  EXPECT_EQ(t.primary_metric, "");  // the copy inside the trainer got the default
  EXPECT_EQ((*tr)->tasks()[0].primary_metric, "pearson_spearman");
}

TEST(TrainerTest, RegressionHeadStartsAtLabelMeanWithUnitScaleLoss) {
  Dataset train = SyntheticDataset(128, 1, true);
  for (size_t i = 0; i < train.examples.size(); ++i) {
    train.examples[i].label_value = 3.0f + (i % 2 ? 2.0f : -2.0f);  // mean 3, std ~2
  }
  TaskHead::Options o = TaskHead::Options::ForData(train, 16, 1, torch::kCPU);
  EXPECT_EQ(o.kind, LabelKind::kRegression);
  EXPECT_NEAR(o.label_mean, 3.0, 1e-9);
  EXPECT_NEAR(o.label_std, 2.0 * std::sqrt(128.0 / 127.0), 1e-6);
  auto h = TaskHead::Create(o);
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_FLOAT_EQ((*h)->bias.item<float>(), 3.0f);
  // Predicting the mean for every row gives a loss of ~1 per row (the label
  // variance divided by itself), not ~4.
  torch::Tensor out = torch::full({128, 1}, 3.0f);
  std::vector<float> labels;
  for (const Example& e : train.examples) labels.push_back(e.label_value);
  const double per_row = (*h)->LossSum(out, torch::tensor(labels)).item<double>() / 128.0;
  EXPECT_NEAR(per_row, 127.0 / 128.0, 1e-4);
  // Classification heads are unchanged: zero bias, unit loss weight.
  TaskHead::Options c = TaskHead::Options::ForData(SyntheticDataset(32, 2, false), 16, 1, torch::kCPU);
  auto hc = TaskHead::Create(c);
  ASSERT_TRUE(hc.ok());
  EXPECT_EQ((*hc)->loss_weight, 1.0);
  EXPECT_EQ((*hc)->bias.abs().sum().item<float>(), 0.0f);
}

TEST(TrainerTest, EarlyStopsWithoutImprovement) {
  TrainerOptions o = BaseOptions();
  o.lr = 1e-12;  // predictions cannot change: the score never improves
  o.warmup_steps = 0;
  o.eval_every = 1;
  o.early_stop_patience = 2;
  std::vector<EvalEvent> evals;
  TrainerCallbacks cb;
  cb.on_eval = [&](const EvalEvent& e) { evals.push_back(e); };
  Fixture s = Make(o, cb);
  ASSERT_TRUE(s.trainer->Run().ok());
  EXPECT_EQ(s.trainer->state(), Trainer::State::kEarlyStopped);
  EXPECT_EQ(s.trainer->step(), 3);
  ASSERT_EQ(evals.size(), 3u);
  EXPECT_TRUE(evals[0].is_best);
  EXPECT_FALSE(evals[2].is_best);
  // The test binding has no restore: RestoreBest says so instead of lying.
  EXPECT_EQ(s.trainer->RestoreBest().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(TrainerTest, BadOptionsRefused) {
  auto enc = TinyEncoder();
  TestAdapter ad(2, 16, 4, 1, 3);
  TrainTask t;
  t.name = "x";
  t.train = SyntheticDataset(8, 1);
  t.head = Head(LabelKind::kRegression, 1);  // kind mismatch
  auto tr = Trainer::Create(BaseOptions(), enc, WhitespaceTokenizer(), ad.Binding(), {t});
  EXPECT_EQ(tr.status().code(), absl::StatusCode::kInvalidArgument);
  t.head = Head(LabelKind::kClassification, 1);
  TrainerOptions o = BaseOptions();
  o.batch_size = 0;
  EXPECT_FALSE(Trainer::Create(o, enc, WhitespaceTokenizer(), ad.Binding(), {t}).ok());
  o = BaseOptions();
  AdapterBinding no_sweep = ad.Binding();
  no_sweep.sweep = nullptr;
  o.rank_schedule = {{1, 2}};
  EXPECT_FALSE(Trainer::Create(o, enc, WhitespaceTokenizer(), no_sweep, {t}).ok());
  o = BaseOptions();
  t.primary_metric = "pearson";
  EXPECT_FALSE(Trainer::Create(o, enc, WhitespaceTokenizer(), ad.Binding(), {t}).ok());
}

}  // namespace
}  // namespace metatt
