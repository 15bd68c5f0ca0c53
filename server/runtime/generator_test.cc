// The continuous batcher on a tiny random Llama (the decoder tests' recipe):
// every request gets exactly the tokens it gets alone (greedy), rows of two
// task slices decoded in one step equal each decoded alone, cancelling
// frees the slot, the KV budget queues and refuses, the queue is bounded.
#include "server/runtime/generator.h"

#include <gtest/gtest.h>

#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "adapters/metatt_adapter.h"
#include "server/model/test_util.h"

namespace metatt {
namespace {

LlamaConfig TinyConfig() { return TinyLlamaConfig(); }

std::map<std::string, torch::Tensor> RandomWeights(const LlamaConfig& c, uint64_t seed) {
  return RandomLlamaWeights(c, seed, {.weight_std = 0.3, .lm_head_std = 0.5});
}

// A two-task (4+1)D family over every projection, random cores.
std::shared_ptr<const PublishedFamily> TwoTaskFamily(const LlamaDecoder& dec) {
  MetaTTConfig c = LlamaMetaTTConfig(dec.geometry(), TTForm::k4Plus1D, /*rank=*/4, 2);
  c.init = "normal(0.4)";
  auto a = MetaTTAdapter::Create(c, {torch::kFloat32, torch::kCPU, 13});
  EXPECT_TRUE(a.ok()) << a.status();
  auto f = std::make_shared<PublishedFamily>();
  f->record.family = "fam";
  f->record.version = 1;
  for (int i = 0; i < 2; ++i) {
    TaskRecord t;
    t.name = absl::StrCat("t", i);
    t.index = i;
    f->record.tasks.push_back(t);
  }
  f->adapter = std::move(*a);
  EXPECT_TRUE(f->task_by_name.Build(&f->record.tasks).ok());
  return f;
}

std::vector<int64_t> Prompt(int64_t len, int64_t seed) {
  std::vector<int64_t> p;
  for (int64_t i = 0; i < len; ++i) p.push_back((seed * 7 + i * 13 + 3) % 40);
  return p;
}

// What GreedyGenerate gives the prompt alone.
std::vector<int64_t> Alone(const LlamaDecoder& dec, const std::vector<int64_t>& prompt, int64_t n,
                           const PublishedFamily* fam = nullptr, int64_t task = 0) {
  torch::Tensor ids = torch::tensor(prompt, torch::kLong).unsqueeze(0);
  AdapterBatch ab;
  if (fam != nullptr) ab = AdapterBatch(torch::tensor({task}, torch::kLong));
  auto out = dec.GreedyGenerate({ids, {}}, n, -1, fam ? fam->adapter.get() : nullptr, ab);
  EXPECT_TRUE(out.ok()) << out.status();
  torch::Tensor t = out->squeeze(0).contiguous();
  return std::vector<int64_t>(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + t.numel());
}

class Batcher : public ::testing::Test {
 protected:
  void Start(ContinuousBatcher::Options o = {}) {
    const LlamaConfig c = TinyConfig();
    auto d = LlamaDecoder::FromTensors(c, RandomWeights(c, 3), torch::kCPU);
    ASSERT_TRUE(d.ok()) << d.status();
    dec_ = *d;
    model_ = BaseModel::Decoder(dec_, nullptr);
    auto s = DeviceScheduler::Create({}, model_);
    ASSERT_TRUE(s.ok()) << s.status();
    scheduler_ = std::move(*s);
    auto b = ContinuousBatcher::Create(o, model_, scheduler_.get(), nullptr);
    ASSERT_TRUE(b.ok()) << b.status();
    batcher_ = std::move(*b);
  }
  void TearDown() override {
    if (scheduler_) scheduler_->Shutdown();  // before the batcher goes
    batcher_.reset();
    scheduler_.reset();
  }
  // Holds the device thread until the returned notification is notified.
  std::unique_ptr<std::thread> Pause(absl::Notification* release) {
    auto entered = std::make_shared<absl::Notification>();
    auto t = std::make_unique<std::thread>([this, release, entered] {
      (void)scheduler_->RunOnDevice([release, entered] {
        entered->Notify();
        release->WaitForNotification();
      });
    });
    entered->WaitForNotification();
    return t;
  }
  std::shared_ptr<GenSequence> Seq(std::vector<int64_t> prompt, int64_t n,
                                   std::shared_ptr<const PublishedFamily> fam = nullptr,
                                   int64_t task = 0) {
    auto s = std::make_shared<GenSequence>();
    s->prompt = std::move(prompt);
    s->max_new_tokens = n;
    s->family = std::move(fam);
    s->task = task;
    return s;
  }
  static std::vector<int64_t> All(GenSequence* s) {
    std::vector<int64_t> got;
    while (!s->Wait(got.size(), absl::Now() + absl::Seconds(30), &got)) {
    }
    return got;
  }
  static void WaitTokens(GenSequence* s, size_t n) {
    std::vector<int64_t> got;
    const absl::Time until = absl::Now() + absl::Seconds(30);
    while (got.size() < n && !s->Wait(got.size(), until, &got) && absl::Now() < until) {
    }
  }

  std::shared_ptr<LlamaDecoder> dec_;
  std::shared_ptr<const BaseModel> model_;
  std::unique_ptr<DeviceScheduler> scheduler_;
  std::unique_ptr<ContinuousBatcher> batcher_;
};

TEST_F(Batcher, JoiningRequestsGetTheTokensTheyGetAlone) {
  Start();
  constexpr int64_t N = 30;
  std::vector<std::shared_ptr<GenSequence>> seqs;
  for (int64_t i = 0; i < 5; ++i) seqs.push_back(Seq(Prompt(4 + 2 * i, i), N));
  // One sequence runs alone for a few tokens; two join while it runs, two
  // more join later (each admission prefills the newcomers together and
  // merges their caches into the running batch).
  ASSERT_TRUE(batcher_->Submit(seqs[0]).ok());
  WaitTokens(seqs[0].get(), 3);
  {
    absl::Notification go;
    auto t = Pause(&go);
    ASSERT_TRUE(batcher_->Submit(seqs[1]).ok());
    ASSERT_TRUE(batcher_->Submit(seqs[2]).ok());
    go.Notify();
    t->join();
  }
  WaitTokens(seqs[2].get(), 5);
  {
    absl::Notification go;
    auto t = Pause(&go);
    ASSERT_TRUE(batcher_->Submit(seqs[3]).ok());
    ASSERT_TRUE(batcher_->Submit(seqs[4]).ok());
    EXPECT_EQ(batcher_->queued(), 2);
    go.Notify();
    t->join();
  }
  for (size_t i = 0; i < seqs.size(); ++i) {
    std::vector<int64_t> got = All(seqs[i].get());
    EXPECT_EQ(got, Alone(*dec_, seqs[i]->prompt, N)) << "request " << i;
    EXPECT_EQ(seqs[i]->finish_reason(), FinishReason::kLength);
  }
  // Decoded together: far fewer steps than one sequence at a time.
  EXPECT_LT(batcher_->decode_steps(), 5 * (N - 1));
  EXPECT_EQ(batcher_->running(), 0);
  EXPECT_EQ(batcher_->reserved_bytes(), 0);
}

TEST_F(Batcher, RowsOfTwoTaskSlicesInOneStepEqualEachAlone) {
  Start();
  auto fam = TwoTaskFamily(*dec_);
  constexpr int64_t N = 20;
  std::vector<std::shared_ptr<GenSequence>> seqs = {
      Seq(Prompt(5, 1), N, fam, 0), Seq(Prompt(7, 2), N, fam, 1), Seq(Prompt(6, 3), N, fam, 1),
      Seq(Prompt(5, 1), N, fam, 1),  // same prompt as row 0, other task
      Seq(Prompt(6, 4), N)};         // the base model: its own group
  {
    absl::Notification go;
    auto t = Pause(&go);
    for (auto& s : seqs) ASSERT_TRUE(batcher_->Submit(s).ok());
    go.Notify();
    t->join();
  }
  std::vector<std::vector<int64_t>> got;
  for (auto& s : seqs) got.push_back(All(s.get()));
  for (size_t i = 0; i < seqs.size(); ++i) {
    const PublishedFamily* f = seqs[i]->family.get();
    EXPECT_EQ(got[i], Alone(*dec_, seqs[i]->prompt, N, f, seqs[i]->task)) << "row " << i;
  }
  EXPECT_NE(got[0], got[3]) << "the task slice must change the generation";
  EXPECT_NE(got[4], got[0]);
  // All admitted in one step and decoded together: N - 1 decode steps
  // (the first token comes from the prefill), plus at most one idle turn.
  EXPECT_LE(batcher_->decode_steps(), N + 1);
}

TEST_F(Batcher, CancelFreesTheSlotAtOnce) {
  ContinuousBatcher::Options o;
  o.max_running = 1;
  Start(o);
  auto a = Seq(Prompt(6, 1), 50), b = Seq(Prompt(5, 2), 8);
  ASSERT_TRUE(batcher_->Submit(a).ok());
  ASSERT_TRUE(batcher_->Submit(b).ok());
  WaitTokens(a.get(), 2);
  EXPECT_EQ(batcher_->running(), 1);
  EXPECT_EQ(batcher_->queued(), 1);  // one slot: b waits
  a->Cancel();
  std::vector<int64_t> got_a = All(a.get());
  EXPECT_EQ(a->finish_reason(), FinishReason::kCancelled);
  EXPECT_LT(got_a.size(), 50u);
  std::vector<int64_t> got_b = All(b.get());
  EXPECT_EQ(got_b, Alone(*dec_, b->prompt, 8));
  EXPECT_GE(b->first_token_time(), a->finish_time());
  EXPECT_EQ(batcher_->running(), 0);
  EXPECT_EQ(batcher_->reserved_bytes(), 0);
  // A sequence cancelled while queued never runs.
  absl::Notification go;
  auto t = Pause(&go);
  auto c = Seq(Prompt(5, 3), 8);
  ASSERT_TRUE(batcher_->Submit(c).ok());
  c->Cancel();
  go.Notify();
  t->join();
  EXPECT_TRUE(All(c.get()).empty());
  EXPECT_EQ(c->finish_reason(), FinishReason::kCancelled);
}

TEST_F(Batcher, BudgetQueuesRefusesAndTheQueueIsBounded) {
  const LlamaConfig c = TinyConfig();
  const int64_t per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4;
  ContinuousBatcher::Options o;
  o.kv_cache_bytes = 60 * per_token;  // 60 token slots
  o.max_queue = 2;
  Start(o);
  EXPECT_EQ(batcher_->BytesPerToken(), per_token);
  // 8 + 40 = 48 slots each: the second waits for the first to finish.
  auto a = Seq(Prompt(8, 1), 40), b = Seq(Prompt(8, 2), 40);
  ASSERT_TRUE(batcher_->Submit(a).ok());
  ASSERT_TRUE(batcher_->Submit(b).ok());
  EXPECT_EQ(All(a.get()), Alone(*dec_, a->prompt, 40));
  EXPECT_EQ(All(b.get()), Alone(*dec_, b->prompt, 40));
  EXPECT_GE(b->first_token_time(), a->finish_time());
  // More than the whole budget: refused, naming the limit.
  absl::Status st = batcher_->Submit(Seq(Prompt(8, 3), 55));
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("kv_cache_mb"), std::string::npos) << st;
  // Past the model's context: refused, naming it.
  st = batcher_->Submit(Seq(Prompt(8, 3), 60));
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("max_position_embeddings"), std::string::npos) << st;
  // Bounded queue.
  absl::Notification go;
  auto t = Pause(&go);
  auto x = Seq(Prompt(4, 4), 4), y = Seq(Prompt(4, 5), 4);
  ASSERT_TRUE(batcher_->Submit(x).ok());
  ASSERT_TRUE(batcher_->Submit(y).ok());
  st = batcher_->Submit(Seq(Prompt(4, 6), 4));
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted) << st;
  go.Notify();
  t->join();
  EXPECT_EQ(All(x.get()).size(), 4u);
  EXPECT_EQ(All(y.get()).size(), 4u);
}

TEST_F(Batcher, SeededSamplingDoesNotDependOnTheBatch) {
  Start();
  auto make = [&](int64_t seed_prompt) {
    auto s = Seq(Prompt(6, seed_prompt), 24);
    s->sampling.temperature = 1.5;
    s->sampling.top_k = 20;
    s->sampling.top_p = 0.95;
    s->sampling.seed = 77;
    return s;
  };
  auto alone = make(1);
  ASSERT_TRUE(batcher_->Submit(alone).ok());
  std::vector<int64_t> want = All(alone.get());
  auto again = make(1);
  std::vector<std::shared_ptr<GenSequence>> others = {Seq(Prompt(9, 2), 24), make(3)};
  {
    absl::Notification go;
    auto t = Pause(&go);
    ASSERT_TRUE(batcher_->Submit(others[0]).ok());
    ASSERT_TRUE(batcher_->Submit(again).ok());
    ASSERT_TRUE(batcher_->Submit(others[1]).ok());
    go.Notify();
    t->join();
  }
  EXPECT_EQ(All(again.get()), want);
  for (auto& s : others) All(s.get());
  // Sampling at this temperature differs from greedy.
  EXPECT_NE(want, Alone(*dec_, alone->prompt, 24));
}

TEST(SampleNext, GreedyTopKTopPAndSeeds) {
  std::vector<float> logits = {0.1f, 2.0f, 1.9f, -1.0f, 2.0f};
  std::mt19937_64 rng(1);
  SamplingParams greedy;
  EXPECT_EQ(SampleNext(logits.data(), 5, greedy, &rng), 1);  // the first maximum
  SamplingParams k1;
  k1.temperature = 1.0;
  k1.top_k = 1;
  for (int i = 0; i < 20; ++i) EXPECT_EQ(SampleNext(logits.data(), 5, k1, &rng), 1);
  SamplingParams p;
  p.temperature = 1.0;
  p.top_p = 0.5;  // 1 and 4 hold ~0.36 each: two candidates
  std::set<int64_t> seen;
  for (int i = 0; i < 200; ++i) seen.insert(SampleNext(logits.data(), 5, p, &rng));
  EXPECT_EQ(seen, (std::set<int64_t>{1, 4}));
  SamplingParams all;
  all.temperature = 5.0;
  std::mt19937_64 r1(9), r2(9);
  std::vector<int64_t> s1, s2;
  for (int i = 0; i < 50; ++i) {
    s1.push_back(SampleNext(logits.data(), 5, all, &r1));
    s2.push_back(SampleNext(logits.data(), 5, all, &r2));
  }
  EXPECT_EQ(s1, s2);
  EXPECT_GE(std::set<int64_t>(s1.begin(), s1.end()).size(), 4u);
}

}  // namespace
}  // namespace metatt
