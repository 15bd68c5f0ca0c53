#include "adapters/metatt_adapter.h"

#include <gtest/gtest.h>

#include <tuple>

namespace metatt {
namespace {

constexpr int64_t kD = 12;
constexpr int64_t kFfn = 20;  // d_ffn where FFN projections are adapted

MetaTTConfig SmallConfig(TTForm form, std::vector<int64_t> ranks, int64_t tasks = 1) {
  MetaTTConfig c;
  c.form = form;
  c.ranks = std::move(ranks);
  c.projections = {Projection::kQuery, Projection::kValue, Projection::kAttnOutput};
  c.layers = {0, 2};  // layer 1 of 3 is not adapted
  c.d_in = kD;
  c.d_out = kD;
  c.num_layers = 3;
  c.num_heads = 3;
  c.num_tasks = form == TTForm::k4Plus1D ? tasks : 1;
  c.init = "normal(0.5)";
  c.alpha = 3.0;
  return c;
}

// SmallConfig adapting `projections`, FFN ones among them (d_ffn = kFfn).
MetaTTConfig FfnConfig(TTForm form, std::vector<int64_t> ranks, int64_t tasks,
                       std::vector<Projection> projections) {
  MetaTTConfig c = SmallConfig(form, std::move(ranks), tasks);
  c.projections = std::move(projections);
  c.d_ffn = kFfn;
  return c;
}

MetaTTAdapter::Options F64(uint64_t seed = 1) {
  MetaTTAdapter::Options o;
  o.dtype = torch::kFloat64;
  o.seed = seed;
  return o;
}

std::unique_ptr<MetaTTAdapter> Make(const MetaTTConfig& c, uint64_t seed = 1) {
  auto a = MetaTTAdapter::Create(c, F64(seed));
  EXPECT_TRUE(a.ok()) << a.status();
  return std::move(*a);
}

torch::Tensor Dense(const MetaTTAdapter& a, int layer, Projection p, int64_t t) {
  auto d = a.DenseDelta(layer, p, t);
  EXPECT_TRUE(d.ok()) << d.status();
  return *d;
}

// Reference: row b of x times the dense update of its task.
torch::Tensor DenseDeltas(const MetaTTAdapter& a, int layer, Projection p, const torch::Tensor& x,
                          const torch::Tensor& tasks) {
  std::vector<torch::Tensor> rows;
  for (int64_t b = 0; b < x.size(0); ++b) {
    const int64_t t = tasks.defined() ? tasks[b].item<int64_t>() : 0;
    rows.push_back(x[b].matmul(Dense(a, layer, p, t)));
  }
  return torch::stack(rows, 0);
}

const std::vector<Projection> kAsk = {Projection::kQuery, Projection::kKey, Projection::kValue};

using FormRanks = std::tuple<TTForm, std::vector<int64_t>>;
class FastPathTest : public ::testing::TestWithParam<FormRanks> {};

TEST_P(FastPathTest, MatchesDenseUpdateWithAndWithoutGrad) {
  auto [form, ranks] = GetParam();
  auto a = Make(SmallConfig(form, ranks, /*tasks=*/3));
  torch::manual_seed(7);
  torch::Tensor x = torch::randn({4, 5, kD}, torch::kFloat64);
  torch::Tensor tasks;
  if (form == TTForm::k4Plus1D) tasks = torch::tensor({2, 0, 1, 2}, torch::kInt64);
  for (bool grad : {true, false}) {
    torch::AutoGradMode mode(grad);
    for (int layer : {0, 1, 2}) {
      AdapterBatch batch{tasks};
      auto d = a->Deltas(layer, x, kAsk, batch);
      ASSERT_EQ(d.size(), 3u);
      EXPECT_FALSE(d[1].defined());  // K is not adapted
      if (layer == 1) {
        EXPECT_FALSE(d[0].defined());
        EXPECT_FALSE(d[2].defined());
        continue;
      }
      ASSERT_TRUE(d[0].defined());
      ASSERT_TRUE(d[2].defined());
      EXPECT_TRUE(torch::allclose(d[0], DenseDeltas(*a, layer, Projection::kQuery, x, tasks), 1e-10,
                                  1e-12));
      EXPECT_TRUE(torch::allclose(d[2], DenseDeltas(*a, layer, Projection::kValue, x, tasks), 1e-10,
                                  1e-12));
      auto o = a->Deltas(layer, x, {Projection::kAttnOutput}, batch);
      EXPECT_TRUE(torch::allclose(o[0], DenseDeltas(*a, layer, Projection::kAttnOutput, x, tasks),
                                  1e-10, 1e-12));
    }
  }
}

TEST_P(FastPathTest, GradientsMatchDensePath) {
  auto [form, ranks] = GetParam();
  auto a = Make(SmallConfig(form, ranks, /*tasks=*/3), 3);
  torch::manual_seed(11);
  torch::Tensor x = torch::randn({3, 4, kD}, torch::kFloat64);
  torch::Tensor w = torch::randn({3, 4, kD}, torch::kFloat64);
  torch::Tensor tasks;
  if (form == TTForm::k4Plus1D) tasks = torch::tensor({1, 1, 2}, torch::kInt64);
  auto params = a->TrainableParameters();
  ASSERT_FALSE(params.empty());

  auto d = a->Deltas(2, x, {Projection::kQuery, Projection::kValue}, AdapterBatch{tasks});
  torch::Tensor fast = ((d[0] + 2 * d[1]) * w).sum();
  torch::Tensor dense = ((DenseDeltas(*a, 2, Projection::kQuery, x, tasks) +
                          2 * DenseDeltas(*a, 2, Projection::kValue, x, tasks)) *
                         w)
                            .sum();
  EXPECT_NEAR(fast.item<double>(), dense.item<double>(), 1e-10);
  auto gf = torch::autograd::grad({fast}, params, {}, false, false, /*allow_unused=*/true);
  auto gd = torch::autograd::grad({dense}, params, {}, false, false, /*allow_unused=*/true);
  ASSERT_EQ(gf.size(), gd.size());
  for (size_t i = 0; i < gf.size(); ++i) {
    torch::Tensor f = gf[i].defined() ? gf[i] : torch::zeros_like(params[i]);
    torch::Tensor g = gd[i].defined() ? gd[i] : torch::zeros_like(params[i]);
    EXPECT_TRUE(torch::allclose(f, g, 1e-9, 1e-11)) << "parameter " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Forms, FastPathTest,
    ::testing::Values(FormRanks{TTForm::k4D, {4}}, FormRanks{TTForm::k4D, {2, 5, 3}},
                      FormRanks{TTForm::k5D, {4}}, FormRanks{TTForm::k5D, {3, 2, 4, 5}},
                      FormRanks{TTForm::k4Plus1D, {4}}, FormRanks{TTForm::k4Plus1D, {2, 3, 5, 4}}));

TEST(MetaTTAdapterTest, FfnProjectionsUseTheirOwnBoundaryBlocks) {
  for (TTForm form : {TTForm::k4D, TTForm::k4Plus1D}) {
    MetaTTConfig c = FfnConfig(
        form,
        form == TTForm::k4D ? std::vector<int64_t>{2, 3, 4} : std::vector<int64_t>{2, 3, 4, 5}, 3,
        {Projection::kQuery, Projection::kFfnUp, Projection::kFfnDown});
    auto a = Make(c);
    EXPECT_EQ(a->NumParameters(), c.ParameterCount());
    auto shapes = MetaTTAdapter::ExpectedShapes(c);
    EXPECT_EQ(shapes["in"][0], kD + kFfn);
    EXPECT_EQ(shapes["out"][1], kD + kFfn);
    torch::Tensor tasks;
    if (form == TTForm::k4Plus1D) tasks = torch::tensor({1, 2, 0}, torch::kInt64);
    torch::Tensor x = torch::randn({3, 4, kD}, torch::kFloat64);
    torch::Tensor u = torch::randn({3, 4, kFfn}, torch::kFloat64);
    for (bool grad : {true, false}) {
      torch::AutoGradMode mode(grad);
      auto q = a->Deltas(2, x, {Projection::kQuery}, AdapterBatch{tasks});
      auto up = a->Deltas(2, x, {Projection::kFfnUp}, AdapterBatch{tasks});
      auto down = a->Deltas(2, u, {Projection::kFfnDown}, AdapterBatch{tasks});
      EXPECT_EQ(up[0].size(2), kFfn);
      EXPECT_EQ(down[0].size(2), kD);
      EXPECT_TRUE(
          torch::allclose(q[0], DenseDeltas(*a, 2, Projection::kQuery, x, tasks), 1e-10, 1e-12));
      EXPECT_TRUE(
          torch::allclose(up[0], DenseDeltas(*a, 2, Projection::kFfnUp, x, tasks), 1e-10, 1e-12));
      EXPECT_TRUE(torch::allclose(down[0], DenseDeltas(*a, 2, Projection::kFfnDown, u, tasks),
                                  1e-10, 1e-12));
    }
  }
  MetaTTConfig bad = SmallConfig(TTForm::k5D, {2});
  bad.projections = {Projection::kFfnUp};
  bad.d_ffn = kFfn;
  EXPECT_EQ(bad.Validate().code(), absl::StatusCode::kInvalidArgument);
  MetaTTConfig no_ffn_dim = SmallConfig(TTForm::k4D, {2});
  no_ffn_dim.projections = {Projection::kFfnDown};
  EXPECT_EQ(no_ffn_dim.Validate().code(), absl::StatusCode::kInvalidArgument);
}

TEST(MetaTTAdapterTest, MixedTaskBatchEqualsPerTaskRuns) {
  auto a = Make(SmallConfig(TTForm::k4Plus1D, {3, 4, 2, 5}, /*tasks=*/4));
  torch::manual_seed(5);
  torch::Tensor x = torch::randn({5, 6, kD}, torch::kFloat64);
  torch::Tensor tasks = torch::tensor({3, 0, 3, 1, 2}, torch::kInt64);
  for (bool grad : {true, false}) {
    torch::AutoGradMode mode(grad);
    auto mixed = a->Deltas(0, x, kAsk, AdapterBatch{tasks});
    for (int64_t b = 0; b < 5; ++b) {
      auto single = a->Deltas(0, x.narrow(0, b, 1), kAsk, AdapterBatch{tasks.narrow(0, b, 1)});
      EXPECT_TRUE(torch::allclose(mixed[0].narrow(0, b, 1), single[0], 1e-12, 1e-13));
      EXPECT_TRUE(torch::allclose(mixed[2].narrow(0, b, 1), single[2], 1e-12, 1e-13));
    }
  }
}

TEST(MetaTTAdapterTest, BadTaskIndexThrowsForTheEncoderToCatch) {
  auto a = Make(SmallConfig(TTForm::k4Plus1D, {2}, /*tasks=*/2));
  torch::Tensor x = torch::randn({2, 3, kD}, torch::kFloat64);
  EXPECT_THROW(a->Deltas(0, x, kAsk, AdapterBatch{torch::tensor({0, 5}, torch::kInt64)}),
               c10::Error);
}

TEST(MetaTTAdapterTest, ZeIdInitGivesExactlyZeroDelta) {
  for (TTForm form : {TTForm::k4D, TTForm::k5D, TTForm::k4Plus1D}) {
    MetaTTConfig c = SmallConfig(form, {4}, 2);
    c.init = "ze-id-id-id";
    auto a = Make(c);
    torch::Tensor x = torch::randn({2, 3, kD}, torch::kFloat64);
    auto d = a->Deltas(0, x, kAsk, AdapterBatch{});
    EXPECT_TRUE(torch::equal(d[0], torch::zeros_like(d[0])));
  }
}

TEST(MetaTTAdapterTest, InferenceCacheFollowsInPlaceUpdates) {
  auto a = Make(SmallConfig(TTForm::k4Plus1D, {3}, 2));
  torch::NoGradGuard no_grad;
  torch::Tensor x = torch::randn({2, 3, kD}, torch::kFloat64);
  torch::Tensor tasks = torch::tensor({1, 0}, torch::kInt64);
  auto before = a->Deltas(0, x, kAsk, AdapterBatch{tasks});
  for (auto& [name, t] : a->NamedParameters())
    if (name == "proj" || name == "task.1") t.add_(0.25);
  auto after = a->Deltas(0, x, kAsk, AdapterBatch{tasks});
  EXPECT_FALSE(torch::allclose(before[0], after[0]));
  EXPECT_TRUE(
      torch::allclose(after[0], DenseDeltas(*a, 0, Projection::kQuery, x, tasks), 1e-10, 1e-12));
}

TEST(MetaTTAdapterTest, ParameterCountFormulasMatchLiveParameters) {
  for (auto [form, ranks] : std::vector<FormRanks>{{TTForm::k4D, {4}},
                                                   {TTForm::k4D, {2, 5, 3}},
                                                   {TTForm::k5D, {3, 2, 4, 5}},
                                                   {TTForm::k4Plus1D, {2, 3, 5, 4}}}) {
    MetaTTConfig c = SmallConfig(form, ranks, 3);
    auto a = Make(c);
    EXPECT_EQ(c.ParameterCount(), a->NumParameters()) << TTFormName(form);
    EXPECT_EQ(a->NumTrainableParameters(), a->NumParameters());
  }
  // METATT.md's worked example: RoBERTa-base, Q and V, r = 8.
  MetaTTConfig c;
  c.d_in = c.d_out = 768;
  c.num_layers = 12;
  c.num_heads = 12;
  c.ranks = {8};
  auto a = MetaTTAdapter::Create(c);
  ASSERT_TRUE(a.ok()) << a.status();
  const int64_t r = 8, D = 768, L = 12, M = 2, H = 12, T = 5;
  EXPECT_EQ((*a)->NumParameters(), D * r + L * r * r + M * r * r + r * D);
  EXPECT_EQ((*a)->NumParameters(), 13184);
  const int64_t lora = LoraParameterCount(L, M, D, D, r);
  EXPECT_EQ(lora, 294912);
  EXPECT_EQ(lora / (*a)->NumParameters(), 22);
  c.form = TTForm::k5D;
  auto a5 = MetaTTAdapter::Create(c);
  ASSERT_TRUE(a5.ok());
  EXPECT_EQ((*a5)->NumParameters(), D * r + (L + M + H) * r * r + r * D / H);
  c.form = TTForm::k4Plus1D;
  c.num_tasks = T;
  auto a41 = MetaTTAdapter::Create(c);
  ASSERT_TRUE(a41.ok());
  EXPECT_EQ((*a41)->NumParameters(), 13184 + T * r * r);
  EXPECT_EQ(c.ParameterCount(), (*a41)->NumParameters());
}

TEST(MetaTTAdapterTest, AddTaskWithFrozenSharedTrainsOnlyTheNewSlice) {
  auto a = Make(SmallConfig(TTForm::k4Plus1D, {3}, 2));
  a->FreezeShared(true);
  EXPECT_TRUE(a->TrainableParameters().empty());
  auto t = a->AddTask();
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(*t, 2);
  EXPECT_EQ(a->num_tasks(), 3);
  auto params = a->TrainableParameters();
  ASSERT_EQ(params.size(), 1u);
  EXPECT_EQ(params[0].numel(), 9);
  EXPECT_TRUE(torch::equal(params[0], torch::eye(3, torch::kFloat64)));

  torch::Tensor x = torch::randn({2, 3, kD}, torch::kFloat64);
  torch::Tensor task0 = torch::zeros({2}, torch::kInt64);
  torch::Tensor before0 = a->Deltas(0, x, kAsk, AdapterBatch{task0})[0].detach();
  auto d = a->Deltas(0, x, kAsk, AdapterBatch{torch::full({2}, 2, torch::kInt64)});
  torch::Tensor loss = (d[0] * d[0]).sum() + d[2].sum();
  loss.backward();
  for (auto& [name, p] : a->NamedParameters()) {
    if (name == "task.2") {
      ASSERT_TRUE(p.grad().defined());
      EXPECT_GT(p.grad().abs().sum().item<double>(), 0.0);
    } else {
      EXPECT_TRUE(!p.grad().defined() || p.grad().abs().sum().item<double>() == 0.0) << name;
    }
  }
  torch::optim::SGD opt(params, torch::optim::SGDOptions(0.1));
  opt.step();
  // Shared cores and the other tasks did not move.
  torch::Tensor after0 = a->Deltas(0, x, kAsk, AdapterBatch{task0})[0].detach();
  EXPECT_TRUE(torch::equal(before0, after0));
  EXPECT_EQ(a->config().num_tasks, 3);

  MetaTTConfig four = SmallConfig(TTForm::k4D, {3});
  EXPECT_EQ(Make(four)->AddTask().status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(MetaTTAdapterTest, TruncateReplacesLeavesAndKeepsFastPathConsistent) {
  auto a = Make(SmallConfig(TTForm::k4Plus1D, {6}, 3));
  a->FreezeShared(true);
  ASSERT_TRUE(a->SetTaskTrainable(1, true).ok());
  TruncationParams p;
  p.max_rank = 3;
  auto res = a->Truncate(p);
  ASSERT_TRUE(res.ok()) << res.status();
  EXPECT_EQ(res->bonds.size(), 4u);
  for (int64_t r : a->config().ranks) EXPECT_LE(r, 3);
  EXPECT_FALSE(res->shape_changed.empty());
  EXPECT_EQ(res->changed.size(), a->NamedParameters().size());
  // requires_grad flags survive the swap.
  auto params = a->TrainableParameters();
  ASSERT_EQ(params.size(), 1u);
  for (auto& [name, t] : a->NamedParameters()) EXPECT_EQ(t.requires_grad(), name == "task.1");
  EXPECT_EQ(a->NumParameters(), a->config().ParameterCount());
  torch::Tensor x = torch::randn({3, 2, kD}, torch::kFloat64);
  torch::Tensor tasks = torch::tensor({0, 1, 2}, torch::kInt64);
  torch::NoGradGuard no_grad;
  auto d = a->Deltas(2, x, kAsk, AdapterBatch{tasks});
  EXPECT_TRUE(
      torch::allclose(d[0], DenseDeltas(*a, 2, Projection::kQuery, x, tasks), 1e-10, 1e-12));
}

// --- Inference fold: table T[l] = sum_m C[l, m] (. GT[t]) . E[m] ----------

torch::Tensor Unfolded(MetaTTAdapter& a, int layer, const std::vector<Projection>& ps,
                       const torch::Tensor& x, const torch::Tensor& tasks, size_t i) {
  a.SetInferenceFold(false);
  auto d = a.Deltas(layer, x, ps, AdapterBatch{tasks});
  a.SetInferenceFold(true);
  return d[i];
}

TEST_P(FastPathTest, FoldedEqualsUnfolded) {
  auto [form, ranks] = GetParam();
  auto a = Make(SmallConfig(form, ranks, /*tasks=*/3), 5);
  torch::NoGradGuard no_grad;
  torch::Tensor x = torch::randn({4, 5, kD}, torch::kFloat64);
  std::vector<torch::Tensor> task_sets = {torch::Tensor()};
  if (form == TTForm::k4Plus1D) {
    task_sets.push_back(torch::tensor({2, 0, 1, 2}, torch::kInt64));
    task_sets.push_back(torch::tensor({1, 1, 1, 1}, torch::kInt64));
  }
  for (const auto& tasks : task_sets) {
    for (int layer : {0, 2}) {
      auto d = a->Deltas(layer, x, kAsk, AdapterBatch{tasks});
      for (size_t i : {0u, 2u})
        EXPECT_TRUE(torch::allclose(d[i], Unfolded(*a, layer, kAsk, x, tasks, i), 1e-12, 1e-13))
            << "layer " << layer << " projection " << i;
    }
  }
  EXPECT_GT(a->fold_stats().tables, 0);
}

// The encoder's call: AddDeltas into the fused output of a projection group
// (Q|K|V side by side; K not adapted) equals base + the unfolded deltas, in
// inference (one fused baddbmm_) and in training (the default, autograd).
TEST_P(FastPathTest, AddDeltasIntoFusedOutputEqualsBasePlusDeltas) {
  auto [form, ranks] = GetParam();
  auto a = Make(SmallConfig(form, ranks, /*tasks=*/3), 9);
  torch::Tensor x = torch::randn({4, 5, kD}, torch::kFloat64);
  torch::Tensor base = torch::randn({4, 5, 3 * kD}, torch::kFloat64);
  std::vector<AdapterBatch> batches = {AdapterBatch()};
  if (form == TTForm::k4Plus1D) {
    batches.push_back(AdapterBatch::FromHost(torch::tensor({2, 0, 1, 2}, torch::kInt64),
                                             torch::kCPU));
    batches.push_back(AdapterBatch::FromHost(torch::tensor({1, 1, 1, 1}, torch::kInt64),
                                             torch::kCPU));
  }
  const std::vector<Projection> qo = {Projection::kAttnOutput};
  for (const auto& batch : batches) {
    for (int layer : {0, 1, 2}) {
      torch::Tensor want, want_o;
      {
        torch::NoGradGuard no_grad;
        want = base.clone();
        if (layer != 1) {
          want.narrow(-1, 0, kD).add_(Unfolded(*a, layer, kAsk, x, batch.task_index, 0));
          want.narrow(-1, 2 * kD, kD).add_(Unfolded(*a, layer, kAsk, x, batch.task_index, 2));
        }
        want_o = base.narrow(-1, 0, kD).clone();
        if (layer != 1) want_o.add_(Unfolded(*a, layer, qo, x, batch.task_index, 0));
      }
      for (bool grad : {false, true}) {
        torch::AutoGradMode mode(grad);
        torch::Tensor out = base.clone();
        a->AddDeltas(layer, x, kAsk, batch, out);
        EXPECT_TRUE(torch::allclose(out, want, 1e-12, 1e-12)) << "layer " << layer << " grad "
                                                              << grad;
        EXPECT_EQ(out.requires_grad(), grad && layer != 1);
        torch::Tensor o = base.narrow(-1, 0, kD).clone();
        a->AddDeltas(layer, x, qo, batch, o);
        EXPECT_TRUE(torch::allclose(o, want_o, 1e-12, 1e-12)) << "layer " << layer;
      }
    }
  }
}

TEST(MetaTTAdapterTest, MixedBatchTableIsBuiltOncePerForwardAndFollowsUpdates) {
  // A batch built from host indices gets one fold table for the whole
  // forward, reused by every layer; updates must still show.
  MetaTTConfig c = FfnConfig(TTForm::k4Plus1D, {2, 3, 4, 5}, 4,
                             {Projection::kQuery, Projection::kValue, Projection::kFfnUp});
  auto a = Make(c);
  torch::NoGradGuard no_grad;
  torch::Tensor x = torch::randn({4, 5, kD}, torch::kFloat64);
  const std::vector<Projection> ps = {Projection::kQuery, Projection::kValue};
  AdapterBatch batch = AdapterBatch::FromHost(torch::tensor({3, 0, 3, 1}, torch::kInt64),
                                              torch::kCPU);
  auto check_all_layers = [&](const AdapterBatch& b) {
    for (int layer : {0, 2}) {  // the adapted layers of SmallConfig
      auto d = a->Deltas(layer, x, ps, b);
      for (size_t i = 0; i < ps.size(); ++i)
        EXPECT_TRUE(torch::allclose(d[i], Unfolded(*a, layer, ps, x, b.task_index, i), 1e-12,
                                    1e-13))
            << "layer " << layer << " projection " << i;
      auto f = a->Deltas(layer, x, {Projection::kFfnUp}, b);  // column block of the table
      EXPECT_TRUE(torch::allclose(f[0], Unfolded(*a, layer, {Projection::kFfnUp}, x,
                                                 b.task_index, 0),
                                  1e-12, 1e-13));
    }
  };
  check_all_layers(batch);
  const int64_t tables = a->fold_stats().tables;
  const int64_t hits = a->fold_stats().hits;
  EXPECT_EQ(tables, 1);  // one table for the whole forward (4 calls)
  EXPECT_EQ(hits, 3);
  check_all_layers(batch);
  EXPECT_EQ(a->fold_stats().tables, tables);
  EXPECT_EQ(a->fold_stats().hits, hits + 4);
  // An in-place update of one of the batch's task slices is seen.
  for (auto& [name, t] : a->NamedParameters())
    if (name == "task.3") t.mul_(-2.0);
  check_all_layers(batch);
  EXPECT_EQ(a->fold_stats().tables, tables + 1);
  // So is a shared core update, and a new batch with other tasks.
  for (auto& [name, t] : a->NamedParameters())
    if (name == "out") t.add_(0.05);
  check_all_layers(batch);
  check_all_layers(AdapterBatch::FromHost(torch::tensor({2, 2, 0, 1}, torch::kInt64),
                                          torch::kCPU));
  // Same indices, different task list (AddTask) are seen too.
  ASSERT_TRUE(a->AddTask().ok());
  check_all_layers(AdapterBatch::FromHost(torch::tensor({4, 2, 4, 0}, torch::kInt64),
                                          torch::kCPU));
  // Batches of one task reuse that task's table across forwards.
  const int64_t before = a->fold_stats().tables;
  check_all_layers(AdapterBatch::FromHost(torch::tensor({1, 1, 1, 1}, torch::kInt64),
                                          torch::kCPU));
  check_all_layers(AdapterBatch::FromHost(torch::tensor({1, 1, 1, 1}, torch::kInt64),
                                          torch::kCPU));
  EXPECT_EQ(a->fold_stats().tables, before + 1);
  // An index edited in place (same tensor, new version) is not served stale.
  torch::Tensor host = torch::tensor({0, 1, 2, 3}, torch::kInt64);
  AdapterBatch edited = AdapterBatch::FromHost(host, torch::kCPU);
  check_all_layers(edited);
  edited.task_index_host.fill_(4);
  edited.task_index.fill_(4);
  check_all_layers(edited);
}

TEST(MetaTTAdapterTest, FoldedFfnBlocksEqualUnfolded) {
  MetaTTConfig c = FfnConfig(TTForm::k4Plus1D, {2, 3, 4, 5}, 3,
                             {Projection::kQuery, Projection::kFfnUp, Projection::kFfnDown});
  auto a = Make(c);
  torch::NoGradGuard no_grad;
  torch::Tensor tasks = torch::tensor({1, 2, 0}, torch::kInt64);
  torch::Tensor x = torch::randn({3, 4, kD}, torch::kFloat64);
  torch::Tensor u = torch::randn({3, 4, kFfn}, torch::kFloat64);
  EXPECT_TRUE(torch::allclose(a->Deltas(2, x, {Projection::kFfnUp}, AdapterBatch{tasks})[0],
                              Unfolded(*a, 2, {Projection::kFfnUp}, x, tasks, 0), 1e-12, 1e-13));
  EXPECT_TRUE(torch::allclose(a->Deltas(2, u, {Projection::kFfnDown}, AdapterBatch{tasks})[0],
                              Unfolded(*a, 2, {Projection::kFfnDown}, u, tasks, 0), 1e-12,
                              1e-13));
  // The encoder's fused calls for the FFN groups.
  torch::Tensor up = torch::randn({3, 4, kFfn}, torch::kFloat64), down = torch::randn({3, 4, kD},
                                                                                  torch::kFloat64);
  torch::Tensor up_want = up + Unfolded(*a, 2, {Projection::kFfnUp}, x, tasks, 0);
  torch::Tensor down_want = down + Unfolded(*a, 2, {Projection::kFfnDown}, u, tasks, 0);
  a->AddDeltas(2, x, {Projection::kFfnUp}, AdapterBatch{tasks}, up);
  a->AddDeltas(2, u, {Projection::kFfnDown}, AdapterBatch{tasks}, down);
  EXPECT_TRUE(torch::allclose(up, up_want, 1e-12, 1e-12));
  EXPECT_TRUE(torch::allclose(down, down_want, 1e-12, 1e-12));
}

// A decode step (one token per row) of a batch whose rows name different
// tasks: per-row chains instead of the per-row fold table, one build per
// forward, the same numbers as the unfolded chain (and as the table path a
// longer row takes), through Deltas and the fused AddDeltas, following slice
// and core updates.
TEST(MetaTTAdapterTest, FewTokenMixedBatchUsesRowChainsAndEqualsUnfolded) {
  MetaTTConfig c = FfnConfig(TTForm::k4Plus1D, {2, 3, 4, 5}, 4,
                             {Projection::kQuery, Projection::kValue, Projection::kFfnUp,
                              Projection::kFfnDown});
  auto a = Make(c, 3);
  torch::NoGradGuard no_grad;
  const std::vector<Projection> up = {Projection::kFfnUp}, down = {Projection::kFfnDown};
  AdapterBatch batch = AdapterBatch::FromHost(torch::tensor({3, 0, 3, 1, 2}, torch::kInt64),
                                              torch::kCPU);
  auto forward = [&](int64_t S, const AdapterBatch& b) {
    torch::Tensor x = torch::randn({5, S, kD}, torch::kFloat64);
    torch::Tensor u = torch::randn({5, S, kFfn}, torch::kFloat64);
    for (int layer : {0, 1, 2}) {
      auto d = a->Deltas(layer, x, kAsk, b);
      for (size_t i : {0u, 2u}) {
        if (layer == 1) {
          EXPECT_FALSE(d[i].defined());
          continue;
        }
        EXPECT_TRUE(torch::allclose(d[i], Unfolded(*a, layer, kAsk, x, b.task_index, i), 1e-12,
                                    1e-13))
            << "S " << S << " layer " << layer << " projection " << i;
      }
      // Fused outputs: Q|K|V (K not adapted: its block stays as it was), up, down.
      torch::Tensor qkv = torch::randn({5, S, 3 * kD}, torch::kFloat64);
      torch::Tensor want = qkv.clone();
      torch::Tensor gu = torch::randn({5, S, kFfn}, torch::kFloat64), gu_want = gu.clone();
      torch::Tensor dn = torch::randn({5, S, kD}, torch::kFloat64), dn_want = dn.clone();
      if (layer != 1) {
        want.narrow(-1, 0, kD).add_(Unfolded(*a, layer, kAsk, x, b.task_index, 0));
        want.narrow(-1, 2 * kD, kD).add_(Unfolded(*a, layer, kAsk, x, b.task_index, 2));
        gu_want.add_(Unfolded(*a, layer, up, x, b.task_index, 0));
        dn_want.add_(Unfolded(*a, layer, down, u, b.task_index, 0));
      }
      a->AddDeltas(layer, x, kAsk, b, qkv);
      a->AddDeltas(layer, x, up, b, gu);
      a->AddDeltas(layer, u, down, b, dn);
      EXPECT_TRUE(torch::allclose(qkv, want, 1e-12, 1e-12)) << "S " << S << " layer " << layer;
      EXPECT_TRUE(torch::allclose(gu, gu_want, 1e-12, 1e-12)) << "S " << S << " layer " << layer;
      EXPECT_TRUE(torch::allclose(dn, dn_want, 1e-12, 1e-12)) << "S " << S << " layer " << layer;
    }
  };
  forward(1, batch);
  EXPECT_EQ(a->fold_stats().chains, 1);  // one build for every call of the forward
  EXPECT_EQ(a->fold_stats().tables, 0);  // and no per-row table
  forward(MetaTTAdapter::kRowChainMaxTokens, batch);  // same batch: reused
  EXPECT_EQ(a->fold_stats().chains, 1);
  EXPECT_EQ(a->fold_stats().tables, 0);
  forward(MetaTTAdapter::kRowChainMaxTokens + 1, batch);  // a longer row: the table
  EXPECT_EQ(a->fold_stats().chains, 1);
  EXPECT_EQ(a->fold_stats().tables, 1);
  // An in-place update of one of the batch's slices, then of a shared core.
  for (auto& [name, t] : a->NamedParameters())
    if (name == "task.3") t.mul_(-2.0);
  forward(1, batch);
  EXPECT_EQ(a->fold_stats().chains, 2);
  for (auto& [name, t] : a->NamedParameters())
    if (name == "out") t.add_(0.05);
  forward(1, batch);
  EXPECT_EQ(a->fold_stats().chains, 3);
  // One task on every row: the task's table (R = 1), no chain.
  forward(1, AdapterBatch::FromHost(torch::tensor({2, 2, 2, 2, 2}, torch::kInt64), torch::kCPU));
  EXPECT_EQ(a->fold_stats().chains, 3);
  // A new task appended between steps, and an index edited in place.
  ASSERT_TRUE(a->AddTask().ok());
  torch::Tensor host = torch::tensor({4, 0, 4, 1, 2}, torch::kInt64);
  AdapterBatch edited = AdapterBatch::FromHost(host, torch::kCPU);
  forward(1, edited);
  edited.task_index_host.copy_(torch::tensor({1, 4, 0, 2, 3}, torch::kInt64));
  edited.task_index.copy_(edited.task_index_host);
  forward(1, edited);
  EXPECT_EQ(a->fold_stats().chains, 5);
  // Row chains off (the bench's comparison): the same numbers from the table.
  a->SetRowChains(false);
  const int64_t tables = a->fold_stats().tables;
  forward(1, batch);
  EXPECT_EQ(a->fold_stats().chains, 5);
  EXPECT_EQ(a->fold_stats().tables, tables + 1);
}

TEST(MetaTTAdapterTest, FoldFollowsCoreUpdatesAddTaskAndTruncation) {
  auto a = Make(SmallConfig(TTForm::k4Plus1D, {5}, 3));
  torch::NoGradGuard no_grad;
  torch::Tensor x = torch::randn({2, 3, kD}, torch::kFloat64);
  auto check = [&](const torch::Tensor& t) {
    AdapterBatch batch = AdapterBatch::FromHost(t, torch::kCPU);
    auto d = a->Deltas(0, x, kAsk, batch);
    EXPECT_TRUE(torch::allclose(d[0], DenseDeltas(*a, 0, Projection::kQuery, x, t), 1e-10, 1e-12));
  };
  torch::Tensor tasks = torch::tensor({1, 0}, torch::kInt64);
  check(tasks);
  const int64_t rebuilds = a->fold_stats().rebuilds;
  check(tasks);
  EXPECT_EQ(a->fold_stats().rebuilds, rebuilds);  // nothing changed
  // In-place update of one task slice.
  for (auto& [name, t] : a->NamedParameters())
    if (name == "task.1") t.mul_(1.5);
  check(tasks);
  EXPECT_EQ(a->fold_stats().rebuilds, rebuilds + 1);
  // In-place update of a shared core.
  for (auto& [name, t] : a->NamedParameters())
    if (name == "out") t.add_(0.1);
  check(tasks);
  // AddTask invalidates; the new (identity) slice is served right away.
  ASSERT_TRUE(a->AddTask().ok());
  check(torch::tensor({3, 1}, torch::kInt64));
  // Truncation swaps every leaf (new shapes): the table is rebuilt at the new rank.
  TruncationParams p;
  p.max_rank = 2;
  ASSERT_TRUE(a->Truncate(p).ok());
  check(tasks);
  check(torch::tensor({3, 3}, torch::kInt64));
}

TEST(MetaTTAdapterTest, ServedFamilyStoresTaskSlicesAsOneTensor) {
  // A frozen adapter of many tasks holds one [T, r3, r4] tensor and no
  // per-task leaf; a task made trainable gets a leaf whose training shows
  // in inference and is kept when it is frozen again.
  const int64_t T = 2000;
  MetaTTConfig c = SmallConfig(TTForm::k4Plus1D, {3}, T);
  auto src = Make(c, 3);
  std::map<std::string, torch::Tensor> tensors;
  for (auto& [n, t] : src->NamedParameters()) tensors[n] = t.detach();
  auto made = MetaTTAdapter::FromTensors(src->config(), src->scale(), tensors, torch::kCPU,
                                         MetaTTAdapter::Leaves::kFrozen);
  ASSERT_TRUE(made.ok()) << made.status();
  MetaTTAdapter& a = **made;
  EXPECT_EQ(a.num_tasks(), T);
  EXPECT_EQ(a.TaskStorageBytes(), T * 3 * 3 * 8);
  EXPECT_TRUE(a.TrainableParameters().empty());
  torch::Tensor x = torch::randn({4, 3, kD}, torch::kFloat64);
  torch::Tensor tasks = torch::tensor({1999, 7, 0, 1234}, torch::kInt64);
  {
    torch::NoGradGuard no_grad;
    auto d = a.Deltas(0, x, kAsk, AdapterBatch::FromHost(tasks, torch::kCPU));
    EXPECT_TRUE(
        torch::allclose(d[0], DenseDeltas(*src, 0, Projection::kQuery, x, tasks), 1e-10, 1e-12));
  }
  ASSERT_TRUE(a.SetTaskTrainable(7, true).ok());
  ASSERT_EQ(a.TrainableParameters().size(), 1u);
  EXPECT_EQ(a.TaskStorageBytes(), (T + 1) * 3 * 3 * 8);
  auto d = a.Deltas(0, x, kAsk, AdapterBatch{tasks});
  d[0].pow(2).sum().backward();
  torch::optim::SGD opt(a.TrainableParameters(), torch::optim::SGDOptions(0.1));
  opt.step();
  a.MarkCoresChanged();
  torch::NoGradGuard no_grad;
  auto after = a.Deltas(0, x, kAsk, AdapterBatch::FromHost(tasks, torch::kCPU));
  EXPECT_TRUE(torch::allclose(after[0], DenseDeltas(a, 0, Projection::kQuery, x, tasks), 1e-10,
                              1e-12));
  EXPECT_FALSE(torch::allclose(after[0].select(0, 1), d[0].select(0, 1).detach()));  // task 7 moved
  EXPECT_TRUE(torch::allclose(after[0].select(0, 0), d[0].select(0, 0).detach()));   // 1999 did not
  ASSERT_TRUE(a.SetTaskTrainable(7, false).ok());
  EXPECT_TRUE(a.TrainableParameters().empty());
  auto frozen = a.Deltas(0, x, kAsk, AdapterBatch::FromHost(tasks, torch::kCPU));
  EXPECT_TRUE(torch::allclose(frozen[0], after[0], 1e-12, 1e-12));
}

TEST(MetaTTAdapterTest, FoldIsNeverUsedWhenGradIsNeeded) {
  auto a = Make(SmallConfig(TTForm::k4Plus1D, {3}, 2));
  // Rows longer than kRowChainMaxTokens (a table), and one token (a row chain).
  torch::Tensor x = torch::randn({2, MetaTTAdapter::kRowChainMaxTokens + 1, kD}, torch::kFloat64);
  torch::Tensor x1 = torch::randn({2, 1, kD}, torch::kFloat64);
  torch::Tensor tasks = torch::tensor({1, 0}, torch::kInt64);
  {
    torch::NoGradGuard no_grad;
    a->Deltas(0, x, kAsk, AdapterBatch{tasks});   // builds a table
    a->Deltas(0, x1, kAsk, AdapterBatch{tasks});  // builds row chains
  }
  const int64_t tables = a->fold_stats().tables, hits = a->fold_stats().hits;
  const int64_t chains = a->fold_stats().chains;
  ASSERT_GT(tables, 0);
  ASSERT_GT(chains, 0);
  for (const torch::Tensor& in : {x1, x}) {
    auto d1 = a->Deltas(0, in, kAsk, AdapterBatch{tasks});  // grad mode (default)
    EXPECT_TRUE(d1[0].requires_grad());
  }
  auto d = a->Deltas(0, x, kAsk, AdapterBatch{tasks});
  EXPECT_EQ(a->fold_stats().tables, tables);
  EXPECT_EQ(a->fold_stats().chains, chains);
  EXPECT_EQ(a->fold_stats().hits, hits);
  d[0].sum().backward();
  torch::optim::SGD opt(a->TrainableParameters(), torch::optim::SGDOptions(0.5));
  opt.step();
  // libtorch optimizers write through .data() (no version bump): the trainer
  // calls MarkCoresChanged() after each step (AdapterBinding::after_step).
  a->MarkCoresChanged();
  torch::NoGradGuard no_grad;
  auto after = a->Deltas(0, x, kAsk, AdapterBatch{tasks});
  EXPECT_TRUE(
      torch::allclose(after[0], DenseDeltas(*a, 0, Projection::kQuery, x, tasks), 1e-10, 1e-12));
  EXPECT_GT(a->fold_stats().tables, tables);
}

}  // namespace
}  // namespace metatt
