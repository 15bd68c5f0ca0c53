// Resumable trainer checkpoints: train K steps, save, restore into a fresh
// trainer, continue: the losses and every final tensor equal an
// uninterrupted run's bit for bit (CPU), with the real MetaTT and LoRA
// adapters on the tiny encoder.
#include "server/training/checkpoint.h"

#include <filesystem>
#include <fstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "server/training/adapter_binding.h"
#include "server/training/test_util.h"

namespace metatt {
namespace {

using testing::HasSubstr;
using testing_util::SyntheticDataset;
using testing_util::TinyEncoder;
using testing_util::WhitespaceTokenizer;

MetaTTConfig TinyConfig(TTForm form, int64_t rank) {
  MetaTTConfig c = testing_util::TinyMetaTTConfig(form, rank, "normal(0.2)");
  c.num_tasks = form == TTForm::k4Plus1D ? 2 : 1;
  return c;
}

std::vector<TrainTask> Tasks(int n) {
  std::vector<TrainTask> out;
  for (int i = 0; i < n; ++i) {
    TrainTask t;
    t.name = absl::StrCat("t", i);
    t.task_index = i;
    t.train = SyntheticDataset(72, 1 + i, false, i == 0 ? "great" : "awful");
    t.eval = SyntheticDataset(24, 101 + i, false, i == 0 ? "great" : "awful");
    t.head = testing_util::TinyHead(7 + i);
    out.push_back(std::move(t));
  }
  return out;
}

TrainerOptions Opts() {
  // 72 rows / 16 = 5 steps per epoch (one task); a partial last batch.
  TrainerOptions o = testing_util::TinyTrainerOptions(/*steps=*/24, /*seed=*/11);
  o.weight_decay = 0.01;
  o.warmup_steps = 3;
  o.eval_every = 4;
  return o;
}

// A trainer with its own adapter (same seed every time: a fresh process).
struct TrainRun {
  std::unique_ptr<MetaTTAdapter> metatt;
  std::unique_ptr<LoraAdapter> lora;
  std::unique_ptr<Trainer> trainer;
};

TrainRun Make(const TrainerOptions& o, TTForm form, bool use_lora, int tasks) {
  TrainRun r;
  AdapterBinding b;
  if (use_lora) {
    LoraConfig c = testing_util::TinyLoraConfig();
    c.init = "random";
    LoraAdapter::Options lo;
    lo.seed = 5;
    auto a = LoraAdapter::Create(c, lo);
    EXPECT_TRUE(a.ok()) << a.status();
    r.lora = std::move(*a);
    b = BindLora(r.lora.get());
  } else {
    MetaTTAdapter::Options ao;
    ao.seed = 5;
    auto a = MetaTTAdapter::Create(TinyConfig(form, 6), ao);
    EXPECT_TRUE(a.ok()) << a.status();
    r.metatt = std::move(*a);
    b = BindMetaTT(r.metatt.get());
  }
  auto tr = Trainer::Create(o, TinyEncoder(), WhitespaceTokenizer(), std::move(b), Tasks(tasks));
  EXPECT_TRUE(tr.ok()) << tr.status();
  r.trainer = std::move(*tr);
  return r;
}

// Every tensor the job would publish: the live adapter, heads, best ones.
std::map<std::string, torch::Tensor> Final(const TrainRun& r) {
  std::map<std::string, torch::Tensor> out;
  if (r.metatt) {
    for (const auto& [k, v] : r.metatt->NamedParameters()) out["live." + k] = v.detach().clone();
  }
  if (r.lora) {
    for (const auto& [k, f] : r.lora->factors()) {
      out[absl::StrCat("live.", k.first, ".", ProjectionName(k.second), ".A")] = f.a.detach().clone();
      out[absl::StrCat("live.", k.first, ".", ProjectionName(k.second), ".B")] = f.b.detach().clone();
    }
  }
  for (const auto& t : r.trainer->tasks()) {
    for (const auto& [k, v] : t.head->Tensors("head." + t.name + ".")) out[k] = v;
  }
  for (const auto& [k, v] : r.trainer->best_tensors()) out["best." + k] = v.detach().clone();
  return out;
}

std::string TempDir(const std::string& name) {
  auto d = std::filesystem::temp_directory_path() /
           absl::StrCat("metatt_ckpt_", name, "_", ::getpid());
  std::filesystem::remove_all(d);
  return d.string();
}

void ExpectResumeBitIdentical(const TrainerOptions& o, TTForm form, bool lora, int tasks,
                              int64_t stop_at, const std::string& name) {
  TrainRun whole = Make(o, form, lora, tasks);
  ASSERT_TRUE(whole.trainer->Run().ok());
  ASSERT_EQ(whole.trainer->state(), Trainer::State::kFinished);

  const std::string dir = TempDir(name);
  {
    TrainRun first = Make(o, form, lora, tasks);
    for (int64_t i = 0; i < stop_at; ++i) ASSERT_TRUE(*first.trainer->Step());
    auto info = WriteTrainerCheckpoint(dir, *first.trainer);
    ASSERT_TRUE(info.ok()) << info.status();
    EXPECT_EQ(info->step, stop_at);
    EXPECT_EQ(info->total_steps, o.steps);
    EXPECT_EQ(info->metrics.at("loss"), first.trainer->losses().back());
  }  // the first process "dies" here
  auto latest = LatestTrainerCheckpoint(dir);
  ASSERT_TRUE(latest.has_value());
  TrainRun resumed = Make(o, form, lora, tasks);
  absl::Status st = resumed.trainer->RestoreState(latest->path);
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_EQ(resumed.trainer->step(), stop_at);
  ASSERT_TRUE(resumed.trainer->Run().ok());
  ASSERT_EQ(resumed.trainer->state(), Trainer::State::kFinished);

  EXPECT_EQ(resumed.trainer->losses(), whole.trainer->losses());  // exact doubles
  ASSERT_TRUE(resumed.trainer->best_eval().has_value());
  EXPECT_EQ(resumed.trainer->best_eval()->step, whole.trainer->best_eval()->step);
  EXPECT_EQ(resumed.trainer->best_eval()->score, whole.trainer->best_eval()->score);
  EXPECT_EQ(resumed.trainer->sweeps().size(), whole.trainer->sweeps().size());
  auto a = Final(whole), b = Final(resumed);
  ASSERT_EQ(a.size(), b.size());
  for (const auto& [k, v] : a) {
    ASSERT_TRUE(b.count(k)) << k;
    EXPECT_TRUE(v.sizes().equals(b[k].sizes()) && torch::equal(v, b[k])) << k << " differs";
  }
  std::filesystem::remove_all(dir);
}

TEST(TrainerCheckpointTest, MetaTTResumeMidEpochIsBitIdentical) {
  ExpectResumeBitIdentical(Opts(), TTForm::k4D, false, 1, 7, "metatt");
}

TEST(TrainerCheckpointTest, MultiTaskResumeIsBitIdentical) {
  ExpectResumeBitIdentical(Opts(), TTForm::k4Plus1D, false, 2, 13, "multitask");
}

TEST(TrainerCheckpointTest, LoraResumeIsBitIdentical) {
  ExpectResumeBitIdentical(Opts(), TTForm::k4D, true, 1, 9, "lora");
}

TEST(TrainerCheckpointTest, ResumeAfterDmrgSweepIsBitIdentical) {
  TrainerOptions o = Opts();
  o.rank_schedule = {{1, 4}, {3, 3}};  // sweeps at steps 5 and 15
  ExpectResumeBitIdentical(o, TTForm::k4D, false, 1, 11, "sweep");
}

TEST(TrainerCheckpointTest, KeepsNewestAndLists) {
  const std::string dir = TempDir("list");
  TrainRun r = Make(Opts(), TTForm::k4D, false, 1);
  // A scratch file of a process killed mid-write: removed by the next write.
  std::filesystem::create_directories(dir);
  const auto scratch = std::filesystem::path(dir) / "step-000000001.ckpt.tmp.999";
  { std::ofstream(scratch) << "half"; }
  for (int64_t i = 1; i <= 8; ++i) {
    ASSERT_TRUE(*r.trainer->Step());
    if (i % 2 == 0) {
      ASSERT_TRUE(WriteTrainerCheckpoint(dir, *r.trainer, 2).ok());
    }
  }
  auto all = ListTrainerCheckpoints(dir);
  ASSERT_TRUE(all.ok()) << all.status();
  ASSERT_EQ(all->size(), 2u);
  EXPECT_FALSE(std::filesystem::exists(scratch));
  EXPECT_EQ((*all)[0].step, 6);
  EXPECT_EQ((*all)[1].step, 8);
  // Step 8 had an evaluation (eval_every 4): its metrics are listed.
  EXPECT_TRUE((*all)[1].metrics.count("score"));
  EXPECT_TRUE((*all)[1].metrics.count("t0/accuracy")) << (*all)[1].metrics.size();
  EXPECT_FALSE((*all)[0].metrics.count("score"));
  EXPECT_GT((*all)[1].time_unix_ms, 0);
  // A missing directory lists nothing.
  auto none = ListTrainerCheckpoints(dir + "/absent");
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->empty());
  EXPECT_FALSE(LatestTrainerCheckpoint(dir + "/absent").has_value());
  std::filesystem::remove_all(dir);
}

TEST(TrainerCheckpointTest, RefusesAnotherTrainer) {
  const std::string dir = TempDir("mismatch");
  TrainRun r = Make(Opts(), TTForm::k4D, false, 1);
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(*r.trainer->Step());
  auto info = WriteTrainerCheckpoint(dir, *r.trainer);
  ASSERT_TRUE(info.ok());
  TrainerOptions other = Opts();
  other.batch_size = 8;
  TrainRun o = Make(other, TTForm::k4D, false, 1);
  absl::Status st = o.trainer->RestoreState(info->path);
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
  EXPECT_THAT(std::string(st.message()), HasSubstr("batch_size"));
  // A restored trainer cannot be restored again; a stepped one neither.
  EXPECT_EQ(r.trainer->RestoreState(info->path).code(), absl::StatusCode::kFailedPrecondition);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace metatt
