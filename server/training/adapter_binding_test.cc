// The trainer driving the real MetaTT / LoRA adapters on a tiny encoder.
#include "server/training/adapter_binding.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "server/training/test_util.h"

namespace metatt {
namespace {

using testing_util::SyntheticDataset;
using testing_util::TinyEncoder;
using testing_util::WhitespaceTokenizer;

MetaTTConfig TinyConfig(TTForm form, int64_t rank, const std::string& init) {
  return testing_util::TinyMetaTTConfig(form, rank, init);
}

TrainTask Task(const std::string& name, int64_t index, uint64_t seed, const std::string& cue) {
  TrainTask t;
  t.name = name;
  t.task_index = index;
  t.train = SyntheticDataset(96, seed, false, cue);
  t.eval = SyntheticDataset(32, seed + 100, false, cue);
  t.head = testing_util::TinyHead(seed);
  return t;
}

TrainerOptions Opts(int64_t steps) { return testing_util::TinyTrainerOptions(steps, /*seed=*/3); }

TEST(AdapterBindingTest, MetaTTDmrgScheduleShrinksRanks) {
  auto enc = TinyEncoder();
  auto ad = MetaTTAdapter::Create(TinyConfig(TTForm::k4D, 6, "ze-id-id-id"));
  ASSERT_TRUE(ad.ok()) << ad.status();
  TrainerOptions o = Opts(0);
  o.epochs = 3;  // 6 steps per epoch
  o.rank_schedule = {{1, 4}, {2, 2}};
  std::vector<SweepEvent> sweeps;
  TrainerCallbacks cb;
  cb.on_sweep = [&](const SweepEvent& e) { sweeps.push_back(e); };
  auto tr = Trainer::Create(o, enc, WhitespaceTokenizer(), BindMetaTT(ad->get()),
                            {Task("t", 0, 1, "great")}, cb);
  ASSERT_TRUE(tr.ok()) << tr.status();
  ASSERT_TRUE((*tr)->Run().ok());
  ASSERT_EQ(sweeps.size(), 2u);
  EXPECT_EQ(sweeps[0].step, 6);
  EXPECT_EQ(sweeps[1].step, 12);
  for (const auto& b : sweeps[0].bonds) EXPECT_LE(b.new_rank, 4);
  for (const auto& b : sweeps[1].bonds) EXPECT_LE(b.new_rank, 2);
  bool shrank = false;
  for (const auto& b : sweeps[0].bonds) shrank |= b.new_rank < b.old_rank;
  EXPECT_TRUE(shrank);
  for (int64_t r : (*ad)->config().BondRanks()) EXPECT_LE(r, 2);
  // Training went on after the sweeps on the new leaves.
  EXPECT_EQ((*tr)->losses().size(), 18u);
  // The best checkpoint is from after the last sweep and restorable.
  ASSERT_FALSE((*tr)->best_tensors().empty());
  EXPECT_TRUE((*tr)->RestoreBest().ok());
}

TEST(AdapterBindingTest, AddTaskModeLeavesSharedCoresBitIdentical) {
  auto enc = TinyEncoder();
  auto ad = MetaTTAdapter::Create(TinyConfig(TTForm::k4Plus1D, 4, "normal(0.2)"));
  ASSERT_TRUE(ad.ok()) << ad.status();
  MetaTTAdapter* a = ad->get();
  auto idx = a->AddTask();
  ASSERT_TRUE(idx.ok()) << idx.status();
  ASSERT_EQ(*idx, 1);
  a->FreezeShared(true);
  a->SetTaskTrainable(1, true).IgnoreError();
  std::map<std::string, torch::Tensor> before;
  for (const auto& [n, t] : a->NamedParameters()) before[n] = t.detach().clone();
  auto tr = Trainer::Create(Opts(8), enc, WhitespaceTokenizer(), BindMetaTT(a),
                            {Task("new", 1, 5, "awful")});
  ASSERT_TRUE(tr.ok()) << tr.status();
  ASSERT_TRUE((*tr)->Run().ok());
  int changed = 0;
  for (const auto& [n, t] : a->NamedParameters()) {
    if (n == "task.1") {
      EXPECT_FALSE(torch::equal(before[n], t.detach())) << n;
      ++changed;
    } else {
      EXPECT_TRUE(torch::equal(before[n], t.detach())) << n << " changed";
    }
  }
  EXPECT_EQ(changed, 1);
}

TEST(AdapterBindingTest, LoraTrains) {
  auto enc = TinyEncoder();
  auto ad = LoraAdapter::Create(testing_util::TinyLoraConfig(), {});
  ASSERT_TRUE(ad.ok()) << ad.status();
  auto tr = Trainer::Create(Opts(20), enc, WhitespaceTokenizer(), BindLora(ad->get()),
                            {Task("t", 0, 1, "great")});
  ASSERT_TRUE(tr.ok()) << tr.status();
  ASSERT_TRUE((*tr)->Run().ok());
  const auto& l = (*tr)->losses();
  EXPECT_LT((l[17] + l[18] + l[19]) / 3, (l[0] + l[1] + l[2]) / 3);
  EXPECT_TRUE((*tr)->RestoreBest().ok());
}

}  // namespace
}  // namespace metatt
