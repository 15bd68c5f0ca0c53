#include "adapters/metatt_adapter.h"

#include <ATen/CPUGeneratorImpl.h>

#include "absl/strings/str_cat.h"
#include "adapters/util/status_macros.h"

namespace metatt {
namespace {

// A small host tensor (row -> task group) to the device without stalling the
// host: a copy from pageable memory waits for the stream's queued kernels (a
// sync per adapted layer on CUDA); from pinned memory it is asynchronous.
torch::Tensor ToDeviceAsync(const torch::Tensor& host, torch::Device device) {
  if (!device.is_cuda()) return host.to(device);
  return host.pin_memory().to(device, /*non_blocking=*/true);
}


torch::Tensor InitCore(const CoreInit& init, const std::vector<int64_t>& shape, at::Generator& gen,
                       const torch::TensorOptions& opts) {
  switch (init.kind) {
    case CoreInit::Kind::kZeros:
      return torch::zeros(shape, opts);
    case CoreInit::Kind::kIdentity: {
      if (shape.size() == 2) return torch::eye(shape[0], shape[1], opts);
      return torch::eye(shape[0], shape[2], opts).unsqueeze(1).expand(shape).contiguous();
    }
    case CoreInit::Kind::kNormal: {
      torch::Tensor t = torch::randn(shape, gen, opts.device(torch::kCPU));
      return (t * init.std).to(opts.device());
    }
  }
  return torch::Tensor();
}

std::string ShapeStr(c10::IntArrayRef s) { return c10::str(s); }

// A boundary core with one block per segment: identity init gives each block
// its own rectangular identity (rows: axis 0 blocks of `in`, cols: axis 1).
torch::Tensor InitBoundary(const CoreInit& init, const std::vector<int64_t>& shape, int axis,
                           const std::vector<std::pair<int64_t, int64_t>>& blocks,
                           at::Generator& gen, const torch::TensorOptions& opts) {
  if (init.kind != CoreInit::Kind::kIdentity || blocks.size() < 2)
    return InitCore(init, shape, gen, opts);
  torch::Tensor t = torch::zeros(shape, opts);
  for (const auto& [off, width] : blocks) {
    if (axis == 0)
      t.narrow(0, off, width).copy_(torch::eye(width, shape[1], opts));
    else
      t.narrow(1, off, width).copy_(torch::eye(shape[0], width, opts));
  }
  return t;
}

}  // namespace

std::map<std::string, std::vector<int64_t>> MetaTTAdapter::ExpectedShapes(const MetaTTConfig& c) {
  std::map<std::string, std::vector<int64_t>> m;
  const auto r = c.BondRanks();
  const int64_t L = static_cast<int64_t>(c.AdaptedLayers().size());
  const int64_t M = static_cast<int64_t>(c.projections.size());
  const MetaTTConfig::Layout lay = c.BoundaryLayout();
  m["in"] = {lay.in_rows, r[0]};
  m["layer"] = {r[0], L, r[1]};
  m["proj"] = {r[1], M, r[2]};
  switch (c.form) {
    case TTForm::k4D:
      m["out"] = {r[2], lay.out_cols};
      break;
    case TTForm::k4Plus1D:
      for (int64_t t = 0; t < c.num_tasks; ++t) m[absl::StrCat("task.", t)] = {r[2], r[3]};
      m["out"] = {r[3], lay.out_cols};
      break;
    case TTForm::k5D:
      m["head"] = {r[2], c.num_heads, r[3]};
      m["head_width"] = {r[3], c.d_out / c.num_heads};
      break;
  }
  return m;
}

void MetaTTAdapter::BuildIndexMaps() {
  layer_index_.assign(config_.num_layers, -1);
  const auto layers = config_.AdaptedLayers();
  for (size_t i = 0; i < layers.size(); ++i) layer_index_[layers[i]] = static_cast<int>(i);
  for (int& p : proj_index_) p = -1;
  for (size_t i = 0; i < config_.projections.size(); ++i)
    proj_index_[static_cast<int>(config_.projections[i])] = static_cast<int>(i);
  layout_ = config_.BoundaryLayout();
}

absl::StatusOr<std::unique_ptr<MetaTTAdapter>> MetaTTAdapter::Create(const MetaTTConfig& config,
                                                                     const Options& options) {
  RETURN_IF_ERROR(config.Validate());
  if (options.dtype != torch::kFloat32 && options.dtype != torch::kFloat64)
    return absl::InvalidArgumentError("metatt adapter: dtype must be float32 or float64");
  ASSIGN_OR_RETURN(std::vector<CoreInit> inits, ParseInitSpec(config.init, config.NumCores()));
  std::unique_ptr<MetaTTAdapter> a(new MetaTTAdapter());
  a->config_ = config;
  a->config_.ranks = config.BondRanks();
  a->scale_ = config.Scale();
  a->fold_cache_bytes_ = options.fold_cache_bytes;
  a->BuildIndexMaps();
  auto shapes = ExpectedShapes(a->config_);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(options.seed);
  auto opts = torch::TensorOptions().dtype(options.dtype).device(options.device);
  RETURN_IF_ERROR(TorchTry("metatt init", [&] {
    auto leaf = [](torch::Tensor t) { return t.contiguous().set_requires_grad(true); };
    const MetaTTConfig::Layout lay = config.BoundaryLayout();
    a->in_ = leaf(InitBoundary(inits[0], shapes["in"], 0, lay.in_blocks, gen, opts));
    a->layer_ = leaf(InitCore(inits[1], shapes["layer"], gen, opts));
    a->proj_ = leaf(InitCore(inits[2], shapes["proj"], gen, opts));
    switch (config.form) {
      case TTForm::k4D:
        a->out_ = leaf(InitBoundary(inits[3], shapes["out"], 1, lay.out_blocks, gen, opts));
        break;
      case TTForm::k4Plus1D:
        for (int64_t t = 0; t < config.num_tasks; ++t)
          a->tasks_.push_back(
              leaf(InitCore(inits[3], shapes[absl::StrCat("task.", t)], gen, opts)));
        a->out_ = leaf(InitBoundary(inits[4], shapes["out"], 1, lay.out_blocks, gen, opts));
        break;
      case TTForm::k5D:
        a->out_ = leaf(InitCore(inits[3], shapes["head"], gen, opts));
        a->head_width_ = leaf(InitCore(inits[4], shapes["head_width"], gen, opts));
        break;
    }
  }));
  return a;
}

absl::StatusOr<std::unique_ptr<MetaTTAdapter>> MetaTTAdapter::FromTensors(
    const MetaTTConfig& config, double scale, const std::map<std::string, torch::Tensor>& tensors,
    torch::Device device) {
  RETURN_IF_ERROR(config.Validate());
  if (!(scale > 0) || !std::isfinite(scale))
    return absl::InvalidArgumentError("metatt adapter: scale must be positive and finite");
  std::unique_ptr<MetaTTAdapter> a(new MetaTTAdapter());
  a->config_ = config;
  a->config_.ranks = config.BondRanks();
  a->scale_ = scale;
  a->BuildIndexMaps();
  torch::Dtype dtype = torch::kFloat32;
  bool first = true;
  std::map<std::string, torch::Tensor> got;
  for (const auto& [name, shape] : ExpectedShapes(a->config_)) {
    auto it = tensors.find(name);
    if (it == tensors.end())
      return absl::InvalidArgumentError(
          absl::StrCat("metatt adapter: tensor '", name, "' is missing"));
    const torch::Tensor& t = it->second;
    if (t.sizes().vec() != shape)
      return absl::InvalidArgumentError(absl::StrCat("metatt adapter: tensor '", name,
                                                     "' has shape ", ShapeStr(t.sizes()),
                                                     ", metadata implies ", ShapeStr(shape)));
    if (t.scalar_type() != torch::kFloat32 && t.scalar_type() != torch::kFloat64)
      return absl::InvalidArgumentError(
          absl::StrCat("metatt adapter: tensor '", name, "' must be float32 or float64"));
    if (first) dtype = t.scalar_type();
    if (t.scalar_type() != dtype)
      return absl::InvalidArgumentError(
          absl::StrCat("metatt adapter: tensor '", name, "' has a different dtype"));
    first = false;
    got[name] = t.detach().to(device).clone().contiguous().set_requires_grad(true);
  }
  a->in_ = got["in"];
  a->layer_ = got["layer"];
  a->proj_ = got["proj"];
  if (config.form == TTForm::k5D) {
    a->out_ = got["head"];
    a->head_width_ = got["head_width"];
  } else {
    a->out_ = got["out"];
  }
  for (int64_t t = 0; config.form == TTForm::k4Plus1D && t < config.num_tasks; ++t)
    a->tasks_.push_back(got[absl::StrCat("task.", t)]);
  return a;
}

std::vector<std::pair<std::string, torch::Tensor>> MetaTTAdapter::NamedParameters() const {
  std::vector<std::pair<std::string, torch::Tensor>> p = {
      {"in", in_}, {"layer", layer_}, {"proj", proj_}};
  for (size_t t = 0; t < tasks_.size(); ++t) p.emplace_back(absl::StrCat("task.", t), tasks_[t]);
  if (config_.form == TTForm::k5D) {
    p.emplace_back("head", out_);
    p.emplace_back("head_width", head_width_);
  } else {
    p.emplace_back("out", out_);
  }
  return p;
}

std::vector<torch::Tensor> MetaTTAdapter::TrainableParameters() const {
  std::vector<torch::Tensor> out;
  for (auto& [n, t] : NamedParameters())
    if (t.requires_grad()) out.push_back(t);
  return out;
}

int64_t MetaTTAdapter::NumParameters() const {
  int64_t n = 0;
  for (auto& [name, t] : NamedParameters()) n += t.numel();
  return n;
}

int64_t MetaTTAdapter::NumTrainableParameters() const {
  int64_t n = 0;
  for (auto& t : TrainableParameters()) n += t.numel();
  return n;
}

TensorTrain MetaTTAdapter::ToTensorTrain() const {
  TensorTrain tt;
  tt.form = config_.form;
  tt.cores = {in_.unsqueeze(0), layer_, proj_};
  switch (config_.form) {
    case TTForm::k4D:
      tt.cores.push_back(out_.unsqueeze(2));
      break;
    case TTForm::k4Plus1D:
      tt.cores.push_back(torch::stack(tasks_, 1));
      tt.cores.push_back(out_.unsqueeze(2));
      break;
    case TTForm::k5D:
      tt.cores.push_back(out_);
      tt.cores.push_back(head_width_.unsqueeze(2));
      break;
  }
  return tt;
}

absl::StatusOr<torch::Tensor> MetaTTAdapter::DenseDelta(int layer, Projection projection,
                                                        int64_t task) const {
  if (layer < 0 || layer >= static_cast<int>(layer_index_.size()) || layer_index_[layer] < 0)
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " is not adapted"));
  const int m = proj_index_[static_cast<int>(projection)];
  if (m < 0)
    return absl::InvalidArgumentError(
        absl::StrCat("projection ", ProjectionName(projection), " is not adapted"));
  absl::StatusOr<torch::Tensor> r = absl::InternalError("unset");
  RETURN_IF_ERROR(TorchTry(
      "dense delta", [&] { r = DenseDeltaW(ToTensorTrain(), layer_index_[layer], m, task); }));
  if (!r.ok()) return r.status();
  const int pi = static_cast<int>(projection);
  return r->narrow(0, layout_.in_offset[pi], layout_.in_width[pi])
             .narrow(1, layout_.out_offset[pi], layout_.out_width[pi]) *
         scale_;
}

int64_t MetaTTAdapter::SharedVersionSum() const {
  int64_t v = in_._version() + layer_._version() + proj_._version() + out_._version();
  if (head_width_.defined()) v += head_width_._version();
  return v;
}

void MetaTTAdapter::RefreshCache() {
  const int64_t leaves = SharedVersionSum();
  if (cache_chain_.defined() && cache_key_version_ == version_ && cache_key_leaves_ == leaves &&
      cache_key_tasks_ == tasks_.size())
    return;
  torch::NoGradGuard no_grad;
  cache_chain_ = torch::einsum("alb,bmc->lmac", {layer_, proj_}).mul(scale_).contiguous();
  cache_g1t_ = in_.t().contiguous();
  task_folds_.clear();
  fold_stats_.cached_tasks = fold_stats_.cached_bytes = 0;
  cache_fold_ = config_.form == TTForm::k4Plus1D ? torch::Tensor() : FoldOne(torch::Tensor());
  if (cache_fold_.defined()) ++fold_stats_.folds;
  cache_key_version_ = version_;
  cache_key_leaves_ = leaves;
  cache_key_tasks_ = tasks_.size();
  ++cache_rebuilds_;
  gathered_ = gathered_key_ = torch::Tensor();
}

torch::Tensor MetaTTAdapter::FoldOne(const torch::Tensor& task_slice) const {
  torch::NoGradGuard no_grad;
  torch::Tensor c = cache_chain_;                   // [L, M, r1, r3]
  if (task_slice.defined()) c = c.matmul(task_slice);  // [L, M, r1, r4]
  if (config_.form != TTForm::k5D) return c.matmul(out_).contiguous();  // [L, M, r1, out_cols]
  // 5D: column block of head h is C . G4[:, h, :] . G5 (head-major columns,
  // as the unfolded path's view [B, S, H, r4] . G5).
  const int64_t r3 = out_.size(0), H = out_.size(1), r4 = out_.size(2);
  const int64_t L = c.size(0), M = c.size(1), r1 = c.size(2);
  torch::Tensor y = c.matmul(out_.reshape({r3, H * r4})).view({L, M, r1, H, r4});
  return y.matmul(head_width_).reshape({L, M, r1, config_.d_out}).contiguous();
}

torch::Tensor MetaTTAdapter::FoldFor(int64_t task) {
  if (config_.form != TTForm::k4Plus1D) return cache_fold_;
  const int64_t tv = tasks_[task]._version();
  auto it = task_folds_.find(task);
  if (it != task_folds_.end() && it->second.task_version == tv) {
    ++fold_stats_.hits;
    it->second.last_used = fold_clock_;
    return it->second.fold;
  }
  torch::Tensor fold = FoldOne(tasks_[task]);
  ++fold_stats_.folds;
  const int64_t bytes = fold.numel() * static_cast<int64_t>(fold.element_size());
  if (it == task_folds_.end()) {
    ++fold_stats_.cached_tasks;
    fold_stats_.cached_bytes += bytes;
  }
  task_folds_[task] = TaskFold{fold, tv, fold_clock_};
  EvictFolds();
  return fold;
}

void MetaTTAdapter::EvictFolds() {
  // Least recently used first; folds used by the current call stay (a batch
  // may need more than the bound holds: they go at the next call).
  while (fold_stats_.cached_bytes > fold_cache_bytes_) {
    auto victim = task_folds_.end();
    for (auto j = task_folds_.begin(); j != task_folds_.end(); ++j)
      if (j->second.last_used < fold_clock_ &&
          (victim == task_folds_.end() || j->second.last_used < victim->second.last_used))
        victim = j;
    if (victim == task_folds_.end()) break;
    --fold_stats_.cached_tasks;
    fold_stats_.cached_bytes -= victim->second.fold.numel() *
                                static_cast<int64_t>(victim->second.fold.element_size());
    task_folds_.erase(victim);
  }
}

std::vector<torch::Tensor> MetaTTAdapter::FoldedDeltas(int l, const torch::Tensor& x,
                                                       const std::vector<Projection>& projections,
                                                       const AdapterBatch& batch) {
  RefreshCache();
  ++fold_clock_;
  EvictFolds();
  std::vector<torch::Tensor> out(projections.size());
  int first = -1;
  for (Projection p : projections)
    if (first < 0 && proj_index_[static_cast<int>(p)] >= 0) first = static_cast<int>(p);
  const torch::Tensor g1t =
      layout_.in_rows == layout_.in_width[first]
          ? cache_g1t_
          : cache_g1t_.narrow(1, layout_.in_offset[first], layout_.in_width[first]);
  // x . G1 with G1 given transposed: the faster BLAS layout for a narrow r1.
  const torch::Tensor z = x.matmul(g1t.t());  // [B, S, r1]
  const int64_t B = x.size(0);
  // W[l, m] of one fold, restricted to the projection's output columns.
  auto cols = [&](const torch::Tensor& fold, int m, int pi) {
    torch::Tensor w = fold.select(0, l).select(0, m);  // [r1, out_cols]
    return layout_.out_cols == layout_.out_width[pi]
               ? w
               : w.narrow(1, layout_.out_offset[pi], layout_.out_width[pi]);
  };

  std::vector<torch::Tensor> folds;  // one per distinct task of the batch
  torch::Tensor inverse;             // row -> index into folds
  bool use_gathered = false;         // gathered_ holds this batch's rows
  if (config_.form == TTForm::k4Plus1D && batch.task_index.defined()) {
    torch::Tensor ti = batch.HostTaskIndex();
    TORCH_CHECK(ti.dim() == 1 && ti.size(0) == B, "task_index must be [", B, "]");
    auto [uniq, inv] = at::_unique(ti, /*sorted=*/true, /*return_inverse=*/true);
    auto acc = uniq.accessor<int64_t, 1>();
    const int64_t lo = acc[0], hi = acc[uniq.size(0) - 1];
    TORCH_CHECK(lo >= 0 && hi < num_tasks(), "task_index: task ", lo < 0 ? lo : hi,
                " outside [0, ", num_tasks(), ")");
    if (uniq.size(0) > 1 && mixed_kernel_ == MixedKernel::kBmm &&
        batch.task_index_host.defined()) {
      int64_t task_versions = 0;
      for (int64_t i = 0; i < uniq.size(0); ++i) task_versions += tasks_[acc[i]]._version();
      const torch::Tensor& key = batch.task_index_host;
      use_gathered = gathered_.defined() && gathered_key_.defined() &&
                     gathered_key_.unsafeGetTensorImpl() == key.unsafeGetTensorImpl() &&
                     gathered_key_version_ == key._version() &&
                     gathered_rebuilds_ == cache_rebuilds_ &&
                     gathered_task_versions_ == task_versions;
      if (!use_gathered) {
        std::vector<torch::Tensor> fs;
        for (int64_t i = 0; i < uniq.size(0); ++i) fs.push_back(FoldFor(acc[i]));
        torch::NoGradGuard no_grad;
        // [k, L, M, r1, C] -> rows [B, L, M, r1, C] -> [L, M, B, r1, C]
        gathered_ = torch::stack(fs, 0)
                        .index_select(0, ToDeviceAsync(inv, x.device()))
                        .permute({1, 2, 0, 3, 4})
                        .contiguous();
        gathered_key_ = key;
        gathered_key_version_ = key._version();
        gathered_rebuilds_ = cache_rebuilds_;
        gathered_task_versions_ = task_versions;
        use_gathered = true;
      } else {
        ++fold_stats_.hits;
      }
    } else {
      for (int64_t i = 0; i < uniq.size(0); ++i) folds.push_back(FoldFor(acc[i]));
      if (folds.size() > 1) inverse = ToDeviceAsync(inv, x.device());
    }
  } else {
    folds.push_back(FoldFor(0));
  }

  for (size_t i = 0; i < projections.size(); ++i) {
    const int pi = static_cast<int>(projections[i]);
    const int m = proj_index_[pi];
    if (m < 0) continue;
    if (use_gathered) {
      torch::Tensor w = gathered_.select(0, l).select(0, m);  // [B, r1, out_cols]
      if (layout_.out_cols != layout_.out_width[pi])
        w = w.narrow(2, layout_.out_offset[pi], layout_.out_width[pi]);
      out[i] = torch::bmm(z, w);  // [B, S, D_out]
    } else if (folds.size() == 1) {
      // One [S, r1] x [r1, D_out] product per sequence (bmm over a broadcast
      // W) measured faster on CPU than one [B*S, r1] x [r1, D_out] mm.
      torch::Tensor w = cols(folds[0], m, pi);
      out[i] = torch::bmm(z, w.unsqueeze(0).expand({B, w.size(0), w.size(1)}));
    } else if (mixed_kernel_ == MixedKernel::kBmm) {
      std::vector<torch::Tensor> ws;
      for (const auto& f : folds) ws.push_back(cols(f, m, pi));
      out[i] = torch::bmm(z, torch::stack(ws, 0).index_select(0, inverse));  // [B, S, D_out]
    } else {  // kGrouped: rows of one task at a time
      torch::Tensor y = torch::empty({B, x.size(1), layout_.out_width[pi]}, z.options());
      for (size_t j = 0; j < folds.size(); ++j) {
        torch::Tensor rows = inverse.eq(static_cast<int64_t>(j)).nonzero().squeeze(1);
        y.index_copy_(0, rows, z.index_select(0, rows).matmul(cols(folds[j], m, pi)));
      }
      out[i] = y;
    }
  }
  return out;
}

std::vector<torch::Tensor> MetaTTAdapter::Deltas(int layer, const torch::Tensor& x,
                                                 const std::vector<Projection>& projections,
                                                 const AdapterBatch& batch) {
  std::vector<torch::Tensor> out(projections.size());
  if (layer < 0 || layer >= static_cast<int>(layer_index_.size())) return out;
  const int l = layer_index_[layer];
  if (l < 0) return out;
  int first = -1;  // projections of one call share their input, hence its G1 block
  for (Projection p : projections)
    if (first < 0 && proj_index_[static_cast<int>(p)] >= 0) first = static_cast<int>(p);
  if (first < 0) return out;

  // Inference: the folded path (never with grad: no cached tensor ever
  // enters an autograd graph).
  const bool no_grad = !torch::GradMode::is_enabled();
  if (no_grad && fold_enabled_) return FoldedDeltas(l, x, projections, batch);
  if (no_grad) RefreshCache();  // the chain cache only
  const int64_t B = x.size(0), S = x.size(1);
  const torch::Tensor g1 = layout_.in_rows == layout_.in_width[first]
                               ? in_
                               : in_.narrow(0, layout_.in_offset[first], layout_.in_width[first]);
  const torch::Tensor z = x.matmul(g1);  // [B, S, r1]

  // Per-row task slices [B, r3, r4], or one slice [r3, r4] for the whole batch.
  torch::Tensor row_tasks, one_task;
  if (config_.form == TTForm::k4Plus1D) {
    if (!batch.task_index.defined()) {
      one_task = tasks_[0];
    } else {
      torch::Tensor ti = batch.HostTaskIndex();  // host: no device sync per layer
      TORCH_CHECK(ti.dim() == 1 && ti.size(0) == B, "task_index must be [", B, "]");
      const int64_t lo = ti.min().item<int64_t>(), hi = ti.max().item<int64_t>();
      TORCH_CHECK(lo >= 0 && hi < num_tasks(), "task_index: task ", lo < 0 ? lo : hi,
                  " outside [0, ", num_tasks(), ")");
      if (lo == hi) {
        one_task = tasks_[lo];
      } else {
        auto uniq_inv = at::_unique(ti, /*sorted=*/true, /*return_inverse=*/true);
        torch::Tensor uniq = std::get<0>(uniq_inv);
        std::vector<torch::Tensor> sel;
        auto acc = uniq.accessor<int64_t, 1>();
        for (int64_t i = 0; i < uniq.size(0); ++i) sel.push_back(tasks_[acc[i]]);
        row_tasks = torch::stack(sel, 0).index_select(
            0, ToDeviceAsync(std::get<1>(uniq_inv), in_.device()));
      }
    }
  }

  for (size_t i = 0; i < projections.size(); ++i) {
    const int m = proj_index_[static_cast<int>(projections[i])];
    if (m < 0) continue;
    torch::Tensor chain =
        no_grad ? cache_chain_[l][m] : layer_.select(1, l).matmul(proj_.select(1, m)).mul(scale_);
    torch::Tensor zc;  // [B, S, r_last_before_out]
    if (one_task.defined()) {
      zc = z.matmul(chain.matmul(one_task));
    } else if (row_tasks.defined()) {
      zc = torch::bmm(z, chain.matmul(row_tasks));  // [B, S, r1] x [B, r1, r4]
    } else {
      zc = z.matmul(chain);
    }
    if (config_.form == TTForm::k5D) {
      const int64_t r3 = out_.size(0), H = out_.size(1), r4 = out_.size(2);
      torch::Tensor y = zc.matmul(out_.reshape({r3, H * r4})).view({B, S, H, r4});
      out[i] = y.matmul(head_width_).reshape({B, S, config_.d_out});
    } else {
      const int pi = static_cast<int>(projections[i]);
      out[i] = zc.matmul(layout_.out_cols == layout_.out_width[pi]
                             ? out_
                             : out_.narrow(1, layout_.out_offset[pi], layout_.out_width[pi]));
    }
  }
  return out;
}

absl::StatusOr<int64_t> MetaTTAdapter::AddTask() {
  if (config_.form != TTForm::k4Plus1D)
    return absl::FailedPreconditionError(
        absl::StrCat("AddTask: form ", TTFormName(config_.form), " has no task core (use 4+1d)"));
  const torch::Tensor& ref = tasks_.front();
  torch::Tensor slice = torch::eye(ref.size(0), ref.size(1), ref.options().requires_grad(false))
                            .set_requires_grad(true);
  tasks_.push_back(slice);
  config_.num_tasks = num_tasks();
  MarkCoresChanged();
  return num_tasks() - 1;
}

void MetaTTAdapter::FreezeShared(bool frozen) {
  for (torch::Tensor* t : {&in_, &layer_, &proj_, &out_, &head_width_})
    if (t->defined()) t->requires_grad_(!frozen);
  for (auto& t : tasks_) t.requires_grad_(!frozen);
}

absl::Status MetaTTAdapter::SetTaskTrainable(int64_t task, bool trainable) {
  if (task < 0 || task >= num_tasks())
    return absl::OutOfRangeError(absl::StrCat("task ", task, " outside [0, ", num_tasks(), ")"));
  tasks_[task].requires_grad_(trainable);
  return absl::OkStatus();
}

absl::Status MetaTTAdapter::SetFromTensorTrain(const TensorTrain& tt) {
  RETURN_IF_ERROR(ValidateTensorTrain(tt));
  auto leaf = [](const torch::Tensor& t, bool rg) {
    return t.detach().clone().contiguous().set_requires_grad(rg);
  };
  const bool shared_rg = in_.requires_grad();
  std::vector<bool> task_rg;
  for (const auto& t : tasks_) task_rg.push_back(t.requires_grad());
  in_ = leaf(tt.cores[0].squeeze(0), shared_rg);
  layer_ = leaf(tt.cores[1], layer_.requires_grad());
  proj_ = leaf(tt.cores[2], proj_.requires_grad());
  switch (config_.form) {
    case TTForm::k4D:
      out_ = leaf(tt.cores[3].squeeze(2), out_.requires_grad());
      break;
    case TTForm::k4Plus1D: {
      auto slices = tt.cores[3].unbind(1);
      for (size_t t = 0; t < tasks_.size(); ++t) tasks_[t] = leaf(slices[t], task_rg[t]);
      out_ = leaf(tt.cores[4].squeeze(2), out_.requires_grad());
      break;
    }
    case TTForm::k5D:
      out_ = leaf(tt.cores[3], out_.requires_grad());
      head_width_ = leaf(tt.cores[4].squeeze(2), head_width_.requires_grad());
      break;
  }
  config_.ranks = tt.Ranks();
  MarkCoresChanged();
  return absl::OkStatus();
}

absl::StatusOr<MetaTTAdapter::SweepResult> MetaTTAdapter::Truncate(const TruncationParams& params) {
  TensorTrain tt;
  std::map<std::string, std::vector<int64_t>> before;
  {
    torch::NoGradGuard no_grad;
    tt = ToTensorTrain();
    for (auto& c : tt.cores) c = c.detach();
    for (auto& [n, t] : NamedParameters()) before[n] = t.sizes().vec();
  }
  SweepResult res;
  ASSIGN_OR_RETURN(res.bonds, TruncationSweep(tt, params));
  RETURN_IF_ERROR(SetFromTensorTrain(tt));
  for (auto& [n, t] : NamedParameters()) {
    res.changed.push_back(n);
    if (before[n] != t.sizes().vec()) res.shape_changed.push_back(n);
  }
  return res;
}

}  // namespace metatt
