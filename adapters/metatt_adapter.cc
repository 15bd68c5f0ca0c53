#include "adapters/metatt_adapter.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>

#include "adapters/named_parameters.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"

namespace metatt {
namespace {

// A small host tensor (row -> task group) to the device without stalling the
// host: a copy from pageable memory waits for the stream's queued kernels (a
// sync per adapted layer on CUDA); from pinned memory it is asynchronous.
torch::Tensor ToDeviceAsync(const torch::Tensor& host, torch::Device device) {
  if (!device.is_cuda()) return host.to(device);
  return host.pin_memory().to(device, /*non_blocking=*/true);
}


// A seeded random [rows, cols] matrix with orthonormal columns (rows >= cols)
// or rows (rows < cols): QR of a Gaussian matrix, signs fixed by R's diagonal.
torch::Tensor RandomOrthogonal(int64_t rows, int64_t cols, at::Generator& gen) {
  const bool tall = rows >= cols;
  torch::Tensor g = torch::randn({std::max(rows, cols), std::min(rows, cols)}, gen,
                                 torch::TensorOptions().dtype(torch::kFloat64));
  auto [q, r] = torch::linalg_qr(g);
  q = q * torch::sign(torch::diagonal(r)).unsqueeze(0);
  return tall ? q : q.t().contiguous();
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
    case CoreInit::Kind::kOrthogonal: {
      if (shape.size() == 2) return RandomOrthogonal(shape[0], shape[1], gen).to(opts);
      std::vector<torch::Tensor> slices;
      for (int64_t i = 0; i < shape[1]; ++i)
        slices.push_back(RandomOrthogonal(shape[0], shape[2], gen));
      return torch::stack(slices, 1).to(opts).contiguous();
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
  const bool per_block =
      init.kind == CoreInit::Kind::kIdentity || init.kind == CoreInit::Kind::kOrthogonal;
  if (!per_block || blocks.size() < 2) return InitCore(init, shape, gen, opts);
  torch::Tensor t = torch::zeros(shape, opts);
  for (const auto& [off, width] : blocks) {
    const std::vector<int64_t> block =
        axis == 0 ? std::vector<int64_t>{width, shape[1]} : std::vector<int64_t>{shape[0], width};
    t.narrow(axis, off, width).copy_(InitCore(init, block, gen, opts));
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
  geometry_ = config_.Geometry();
  // Fold-table columns: one block per projection of every model call group
  // that adapts at least one of its projections, in the model's order.
  for (int64_t& c : table_col_) c = -1;
  group_cols_.clear();
  table_cols_ = 0;
  for (const auto& group : geometry_.groups) {
    bool adapted = false;
    for (Projection p : group) adapted = adapted || proj_index_[static_cast<int>(p)] >= 0;
    int64_t width = 0;
    for (Projection p : group) {
      const int pi = static_cast<int>(p);
      if (adapted && proj_index_[pi] >= 0) table_col_[pi] = table_cols_ + width;
      if (adapted) width += layout_.out_width[pi];
    }
    group_cols_.emplace_back(table_cols_, width);
    table_cols_ += width;
  }
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
      case TTForm::k4Plus1D: {
        std::vector<torch::Tensor> slices;
        for (int64_t t = 0; t < config.num_tasks; ++t)
          slices.push_back(InitCore(inits[3], shapes[absl::StrCat("task.", t)], gen, opts));
        a->task_core_ = torch::stack(slices, 0);
        for (int64_t t = 0; t < config.num_tasks; ++t)
          a->task_leaves_[t] = a->task_core_[t].clone().set_requires_grad(true);
        a->out_ = leaf(InitBoundary(inits[4], shapes["out"], 1, lay.out_blocks, gen, opts));
        break;
      }
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
    torch::Device device, Leaves leaves) {
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
  const bool trainable = leaves == Leaves::kTrainable;
  std::map<std::string, torch::Tensor> got;
  std::vector<torch::Tensor> slices;  // 4+1D task slices by index (stacked once)
  const auto check = [&](const std::string& name,
                         const std::vector<int64_t>& shape) -> absl::StatusOr<torch::Tensor> {
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
    return t.detach();
  };
  const auto shapes = ExpectedShapes(a->config_);
  for (const auto& [name, shape] : shapes) {
    if (name.rfind("task.", 0) == 0) continue;
    ASSIGN_OR_RETURN(torch::Tensor t, check(name, shape));
    got[name] = t.to(device).clone().contiguous().set_requires_grad(trainable);
  }
  if (config.form == TTForm::k4Plus1D) {
    const auto& shape = shapes.at("task.0");
    for (int64_t t = 0; t < config.num_tasks; ++t) {
      ASSIGN_OR_RETURN(torch::Tensor slice, check(absl::StrCat("task.", t), shape));
      slices.push_back(std::move(slice));
    }
    a->task_core_ = torch::stack(slices, 0).to(device).contiguous();
    if (trainable)
      for (int64_t t = 0; t < config.num_tasks; ++t)
        a->task_leaves_[t] = a->task_core_[t].clone().set_requires_grad(true);
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
  return a;
}

absl::StatusOr<std::unique_ptr<MetaTTAdapter>> MetaTTAdapter::WithAppendedTasks(
    const torch::Tensor& slices) const {
  if (config_.form != TTForm::k4Plus1D) {
    return absl::FailedPreconditionError("metatt adapter: only a (4+1)D adapter takes tasks");
  }
  if (!task_leaves_.empty() || in_.requires_grad()) {
    return absl::FailedPreconditionError(
        "metatt adapter: WithAppendedTasks needs a frozen adapter (use AddTask to train)");
  }
  if (!slices.defined() || slices.dim() != 3 || slices.size(1) != task_core_.size(1) ||
      slices.size(2) != task_core_.size(2)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "metatt adapter: appended task slices must be [k, ", task_core_.size(1), ", ",
        task_core_.size(2), "], got ", slices.defined() ? ShapeStr(slices.sizes()) : "none"));
  }
  std::unique_ptr<MetaTTAdapter> a(new MetaTTAdapter());
  a->config_ = config_;
  a->config_.num_tasks = task_core_.size(0) + slices.size(0);
  a->scale_ = scale_;
  a->BuildIndexMaps();
  a->in_ = in_;
  a->layer_ = layer_;
  a->proj_ = proj_;
  a->out_ = out_;
  a->head_width_ = head_width_;
  a->task_core_ = torch::cat({task_core_, slices.detach().to(task_core_.options())}, 0);
  return a;
}

torch::Tensor MetaTTAdapter::TaskSlice(int64_t t) const {
  auto it = task_leaves_.find(t);
  return it != task_leaves_.end() ? it->second : task_core_[t];
}

int64_t MetaTTAdapter::TaskStorageBytes() const {
  if (!task_core_.defined()) return 0;
  int64_t n = task_core_.numel();
  for (const auto& [t, leaf] : task_leaves_) n += leaf.numel();
  return n * static_cast<int64_t>(task_core_.element_size());
}

std::vector<std::pair<std::string, torch::Tensor>> MetaTTAdapter::NamedParameters() const {
  std::vector<std::pair<std::string, torch::Tensor>> p = {
      {"in", in_}, {"layer", layer_}, {"proj", proj_}};
  for (int64_t t = 0; config_.form == TTForm::k4Plus1D && t < num_tasks(); ++t)
    p.emplace_back(absl::StrCat("task.", t), TaskSlice(t));
  if (config_.form == TTForm::k5D) {
    p.emplace_back("head", out_);
    p.emplace_back("head_width", head_width_);
  } else {
    p.emplace_back("out", out_);
  }
  return p;
}

std::vector<torch::Tensor> MetaTTAdapter::TrainableParameters() const {
  return RequiringGrad(NamedParameters());
}

std::vector<torch::Tensor> MetaTTAdapter::InnerParameters() const {
  std::vector<torch::Tensor> out;
  for (const torch::Tensor& t : {layer_, proj_})
    if (t.requires_grad()) out.push_back(t);
  if (config_.form == TTForm::k5D && out_.requires_grad()) out.push_back(out_);  // "head"
  for (const auto& [t, leaf] : task_leaves_)
    if (leaf.requires_grad()) out.push_back(leaf);
  return out;
}

int64_t MetaTTAdapter::NumParameters() const { return TotalNumel(NamedParameters()); }

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
      if (task_leaves_.empty()) {
        tt.cores.push_back(task_core_.permute({1, 0, 2}));
      } else {  // differentiable in the trainable slices
        std::vector<torch::Tensor> slices;
        for (int64_t t = 0; t < num_tasks(); ++t) slices.push_back(TaskSlice(t));
        tt.cores.push_back(torch::stack(slices, 1));
      }
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

int64_t MetaTTAdapter::LeafVersionSum() const {
  int64_t v = 0;
  for (const auto& [t, leaf] : task_leaves_) v += leaf._version();
  return v;
}

void MetaTTAdapter::RefreshCache() {
  const int64_t leaves = SharedVersionSum() + LeafVersionSum();
  const int64_t core = task_core_.defined() ? task_core_._version() : 0;
  if (cache_chain_.defined() && cache_key_version_ == version_ && cache_key_leaves_ == leaves &&
      cache_key_core_ == core && cache_key_tasks_ == num_tasks())
    return;
  torch::NoGradGuard no_grad;
  // Trainable slices are the truth for their tasks: copy them into the core.
  for (const auto& [t, leaf] : task_leaves_) task_core_[t].copy_(leaf);
  cache_chain_ = torch::einsum("alb,bmc->lmac", {layer_, proj_}).mul(scale_).contiguous();
  cache_g1t_ = in_.t().contiguous();
  // The output map of each projection, [r_last, out_cols] (5D: column block
  // h of G4[:, h, :] . G5, head-major as the unfolded path's view).
  torch::Tensor om = out_;
  if (config_.form == TTForm::k5D)
    om = torch::matmul(out_, head_width_).reshape({out_.size(0), config_.d_out});
  const int64_t M = proj_.size(1), R = om.size(0);
  torch::Tensor place = torch::zeros({M, R, table_cols_}, om.options());
  for (int pi = 0; pi < kNumProjections; ++pi) {
    cache_out_[pi] = torch::Tensor();
    const int m = proj_index_[pi];
    if (m < 0) continue;
    const torch::Tensor o = om.narrow(1, layout_.out_offset[pi], layout_.out_width[pi]);
    place[m].narrow(1, table_col_[pi], layout_.out_width[pi]).copy_(o);
    // 4+1D row chains apply each projection's block on its own.
    if (config_.form == TTForm::k4Plus1D) cache_out_[pi] = o.contiguous();
  }
  cache_place_ = place.reshape({M * R, table_cols_});
  cache_table_ = torch::Tensor();
  if (config_.form != TTForm::k4Plus1D) {
    // T[l] = sum_m C[l, m] . E[m]: [L, r1, M * r3] x [M * r3, Ctot].
    const int64_t L = cache_chain_.size(0), r1 = cache_chain_.size(2);
    cache_table_ = cache_chain_.permute({0, 2, 1, 3})
                       .reshape({L, r1, M * R})
                       .matmul(cache_place_)
                       .unsqueeze(1)
                       .contiguous();  // [L, 1, r1, Ctot]
    ++fold_stats_.tables;
  }
  cache_key_version_ = version_;
  cache_key_leaves_ = leaves;
  cache_key_core_ = task_core_.defined() ? task_core_._version() : 0;
  cache_key_tasks_ = num_tasks();
  ++fold_stats_.rebuilds;
  rows_table_ = rows_chain_ = torch::Tensor();
  rows_key_ = chain_key_ = BatchKey();
}

torch::Tensor MetaTTAdapter::FoldRows(const torch::Tensor& slices) const {
  // C[l, m] . GT[row] for every row: [L, M, 1, r1, r3] x [R, r3, r4] ->
  // [L, M, R, r1, r4]; then sum over (m, r4) against E in one matmul.
  const int64_t L = cache_chain_.size(0), M = cache_chain_.size(1), r1 = cache_chain_.size(2);
  const int64_t R = slices.size(0), r4 = slices.size(2);
  torch::Tensor cs = cache_chain_.unsqueeze(2).matmul(slices);
  return cs.permute({0, 2, 3, 1, 4})
      .reshape({L, R, r1, M * r4})
      .matmul(cache_place_);  // [L, R, r1, Ctot]
}

torch::Tensor MetaTTAdapter::TableFor(const AdapterBatch& batch, int64_t B,
                                      torch::Device device) {
  if (config_.form != TTForm::k4Plus1D) {
    ++fold_stats_.hits;
    return cache_table_;
  }
  const bool indexed = batch.task_index.defined() || batch.task_index_host.defined();
  torch::Tensor host = indexed ? batch.HostTaskIndex() : torch::Tensor();
  const bool fresh = rows_table_.defined() && rows_rebuilds_ == fold_stats_.rebuilds;
  // The other layers of the same forward: the same index tensor.
  if (fresh && rows_key_.Same(host)) {
    ++fold_stats_.hits;
    return rows_table_;
  }
  const int64_t uniform = host.defined() ? UniformTask(host, B) : 0;
  rows_key_.Hold(host);
  // A batch of one task reuses that task's table across forwards.
  if (fresh && uniform >= 0 && rows_key_task_ == uniform) {
    ++fold_stats_.hits;
    return rows_table_;
  }
  torch::NoGradGuard no_grad;
  if (uniform >= 0) {
    rows_table_ = FoldRows(task_core_.narrow(0, uniform, 1));  // [L, 1, r1, Ctot]
  } else {
    rows_table_ =
        FoldRows(task_core_.index_select(0, IndexOn(batch, host, device)));  // [L, B, r1, Ctot]
  }
  rows_key_task_ = uniform;
  rows_rebuilds_ = fold_stats_.rebuilds;
  ++fold_stats_.tables;
  return rows_table_;
}

torch::Tensor MetaTTAdapter::IndexOn(const AdapterBatch& batch, const torch::Tensor& host,
                                     torch::Device device) {
  return batch.task_index.defined() && batch.task_index.device() == device
             ? batch.task_index
             : ToDeviceAsync(host, device);
}

int64_t MetaTTAdapter::UniformTask(const torch::Tensor& host, int64_t B) const {
  TORCH_CHECK(host.dim() == 1 && host.size(0) == B, "task_index must be [", B, "]");
  auto acc = host.accessor<int64_t, 1>();
  int64_t lo = acc[0], hi = acc[0];
  for (int64_t i = 1; i < B; ++i) {
    lo = std::min(lo, acc[i]);
    hi = std::max(hi, acc[i]);
  }
  TORCH_CHECK(lo >= 0 && hi < num_tasks(), "task_index: task ", lo < 0 ? lo : hi,
              " outside [0, ", num_tasks(), ")");
  return lo == hi ? lo : -1;
}

torch::Tensor MetaTTAdapter::RowChainFor(const AdapterBatch& batch, int64_t B,
                                         torch::Device device) {
  if (config_.form != TTForm::k4Plus1D ||
      (!batch.task_index.defined() && !batch.task_index_host.defined()))
    return torch::Tensor();
  torch::Tensor host = batch.HostTaskIndex();
  // The other layers of the same forward (and decode steps of an unchanged
  // batch): the same index tensor, same version, no core change since.
  if (chain_rebuilds_ == fold_stats_.rebuilds && chain_key_.Same(host)) {
    if (rows_chain_.defined()) ++fold_stats_.hits;
    return rows_chain_;
  }
  chain_key_.Hold(host);
  chain_rebuilds_ = fold_stats_.rebuilds;
  rows_chain_ = torch::Tensor();
  if (UniformTask(host, B) >= 0) return rows_chain_;
  torch::NoGradGuard no_grad;
  const int64_t L = cache_chain_.size(0), M = cache_chain_.size(1), r1 = cache_chain_.size(2);
  const int64_t r4 = task_core_.size(2);
  // [L, M, 1, r1, r3] x [B, r3, r4] -> [L, M, B, r1, r4] -> [L, B, r1, M * r4]
  rows_chain_ = cache_chain_.unsqueeze(2)
                    .matmul(task_core_.index_select(0, IndexOn(batch, host, device)))
                    .permute({0, 2, 3, 1, 4})
                    .reshape({L, B, r1, M * r4})
                    .contiguous();
  ++fold_stats_.chains;
  return rows_chain_;
}

namespace {
// y [B, S, w] += z [B, S, k] . w2 [k, w] (w2 shared by every row). Where y's
// rows are evenly strided (the whole fused output, or a column block of it):
// one addmm on the [B * S, w] view, with no [B, k, w] expansion of w2.
void AddSharedMatmul(torch::Tensor y, const torch::Tensor& z, const torch::Tensor& w2) {
  const int64_t rows = z.size(0) * z.size(1);
  if (y.dim() == 3 && y.stride(0) == y.size(1) * y.stride(1) && z.is_contiguous()) {
    y.view({rows, y.size(2)}).addmm_(z.view({rows, z.size(2)}), w2);
  } else {
    y.add_(z.matmul(w2));
  }
}
}  // namespace

void MetaTTAdapter::AddRowChainDelta(const torch::Tensor& z, const torch::Tensor& chain, int pi,
                                     torch::Tensor y) const {
  const int64_t r4 = task_core_.size(2);
  const torch::Tensor u = torch::bmm(z, chain.narrow(-1, proj_index_[pi] * r4, r4));  // [B, S, r4]
  AddSharedMatmul(y, u, cache_out_[pi]);
}

torch::Tensor MetaTTAdapter::ProjectIn(const torch::Tensor& x, int first) const {
  const torch::Tensor g1t =
      layout_.in_rows == layout_.in_width[first]
          ? cache_g1t_
          : cache_g1t_.narrow(1, layout_.in_offset[first], layout_.in_width[first]);
  // x . G1 with G1 given transposed: the faster BLAS layout for a narrow r1.
  return x.matmul(g1t.t());  // [B, S, r1]
}

void MetaTTAdapter::AddDeltas(int layer, const torch::Tensor& x,
                              const std::vector<Projection>& projections,
                              const AdapterBatch& batch, torch::Tensor& out) {
  const int g = geometry_.GroupOf(projections);
  if (torch::GradMode::is_enabled() || !fold_enabled_ || g < 0) {
    EncoderAdapter::AddDeltas(layer, x, projections, batch, out);
    return;
  }
  if (layer < 0 || layer >= static_cast<int>(layer_index_.size())) return;
  const int l = layer_index_[layer];
  const auto [offset, width] = group_cols_[g];
  if (l < 0 || width == 0) return;
  int first = -1;
  for (Projection p : projections)
    if (first < 0 && proj_index_[static_cast<int>(p)] >= 0) first = static_cast<int>(p);
  TORCH_CHECK(out.size(-1) == width, "AddDeltas: output width ", out.size(-1), ", expected ",
              width);
  RefreshCache();
  const int64_t B = x.size(0);
  const torch::Tensor z = ProjectIn(x, first);
  if (row_chains_enabled_ && x.size(1) <= kRowChainMaxTokens) {
    const torch::Tensor chain = RowChainFor(batch, B, x.device());
    if (chain.defined()) {
      const torch::Tensor c = chain.select(0, l);  // [B, r1, M * r4]
      for (Projection p : projections) {
        const int pi = static_cast<int>(p);
        if (proj_index_[pi] < 0) continue;
        AddRowChainDelta(z, c, pi, out.narrow(-1, table_col_[pi] - offset, layout_.out_width[pi]));
      }
      return;
    }
  }
  torch::Tensor w = TableFor(batch, B, x.device()).select(0, l).narrow(-1, offset, width);
  if (w.size(0) != B) {
    AddSharedMatmul(out, z, w[0]);  // one table for every row (single task, or 4D/5D)
    return;
  }
  out.baddbmm_(z, w);  // one kernel: the matmul and the add
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
  const int64_t B = x.size(0), S = x.size(1);

  // Inference: the folded table (never with grad: no cached tensor ever
  // enters an autograd graph).
  const bool no_grad = !torch::GradMode::is_enabled();
  if (no_grad && fold_enabled_) {
    RefreshCache();
    const torch::Tensor z = ProjectIn(x, first);
    const torch::Tensor chain =
        row_chains_enabled_ && S <= kRowChainMaxTokens ? RowChainFor(batch, B, x.device())
                                                        : torch::Tensor();
    if (chain.defined()) {
      const torch::Tensor c = chain.select(0, l);  // [B, r1, M * r4]
      for (size_t i = 0; i < projections.size(); ++i) {
        const int pi = static_cast<int>(projections[i]);
        if (proj_index_[pi] < 0) continue;
        out[i] = torch::zeros({B, S, layout_.out_width[pi]}, z.options());
        AddRowChainDelta(z, c, pi, out[i]);
      }
      return out;
    }
    const torch::Tensor table = TableFor(batch, B, x.device()).select(0, l);  // [R, r1, Ctot]
    for (size_t i = 0; i < projections.size(); ++i) {
      const int pi = static_cast<int>(projections[i]);
      if (proj_index_[pi] < 0) continue;
      torch::Tensor w = table.narrow(-1, table_col_[pi], layout_.out_width[pi]);
      out[i] = w.size(0) != B ? z.matmul(w[0]) : torch::bmm(z, w);  // [B, S, D_out]
    }
    return out;
  }
  if (no_grad) RefreshCache();  // the chain cache only
  const torch::Tensor g1 = layout_.in_rows == layout_.in_width[first]
                               ? in_
                               : in_.narrow(0, layout_.in_offset[first], layout_.in_width[first]);
  const torch::Tensor z = x.matmul(g1);  // [B, S, r1]

  // Per-row task slices [B, r3, r4], or one slice [r3, r4] for the whole batch.
  torch::Tensor row_tasks, one_task;
  if (config_.form == TTForm::k4Plus1D) {
    if (!batch.task_index.defined() && !batch.task_index_host.defined()) {
      one_task = TaskSlice(0);
    } else {
      torch::Tensor ti = batch.HostTaskIndex();  // host: no device sync per layer
      TORCH_CHECK(ti.dim() == 1 && ti.size(0) == B, "task_index must be [", B, "]");
      const int64_t lo = ti.min().item<int64_t>(), hi = ti.max().item<int64_t>();
      TORCH_CHECK(lo >= 0 && hi < num_tasks(), "task_index: task ", lo < 0 ? lo : hi,
                  " outside [0, ", num_tasks(), ")");
      if (lo == hi) {
        one_task = TaskSlice(lo);
      } else {
        auto uniq_inv = at::_unique(ti, /*sorted=*/true, /*return_inverse=*/true);
        torch::Tensor uniq = std::get<0>(uniq_inv);
        std::vector<torch::Tensor> sel;
        auto acc = uniq.accessor<int64_t, 1>();
        for (int64_t i = 0; i < uniq.size(0); ++i) sel.push_back(TaskSlice(acc[i]));
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

absl::StatusOr<MetaTTAdapter::NewTaskInit> MetaTTAdapter::ParseNewTaskInit(
    const std::string& name) {
  if (name == "identity" || name == "id") return NewTaskInit::kIdentity;
  if (name == "zeros" || name == "ze") return NewTaskInit::kZeros;
  if (name == "mean") return NewTaskInit::kMean;
  return absl::InvalidArgumentError(absl::StrCat("new_task_init: '", name,
                                                 "' is not one of identity, zeros, mean"));
}

absl::StatusOr<int64_t> MetaTTAdapter::AddTask(NewTaskInit init) {
  if (config_.form != TTForm::k4Plus1D)
    return absl::FailedPreconditionError(
        absl::StrCat("AddTask: form ", TTFormName(config_.form), " has no task core (use 4+1d)"));
  const int64_t t = num_tasks();
  {
    torch::NoGradGuard no_grad;
    torch::Tensor slice;
    switch (init) {
      case NewTaskInit::kIdentity:
        slice = torch::eye(task_core_.size(1), task_core_.size(2), task_core_.options());
        break;
      case NewTaskInit::kZeros:
        slice = torch::zeros({task_core_.size(1), task_core_.size(2)}, task_core_.options());
        break;
      case NewTaskInit::kMean: {
        // Trainable leaves hold the live values of their rows.
        std::vector<torch::Tensor> rows;
        for (int64_t i = 0; i < t; ++i) rows.push_back(TaskSlice(i).detach());
        slice = rows.empty()
                    ? torch::eye(task_core_.size(1), task_core_.size(2), task_core_.options())
                    : torch::stack(rows, 0).mean(0);
        break;
      }
    }
    slice = slice.contiguous();
    task_core_ = torch::cat({task_core_, slice.unsqueeze(0)}, 0);
    task_leaves_[t] = slice.clone().set_requires_grad(true);
  }
  config_.num_tasks = num_tasks();
  MarkCoresChanged();
  return t;
}

void MetaTTAdapter::FreezeShared(bool frozen) {
  for (torch::Tensor* t : {&in_, &layer_, &proj_, &out_, &head_width_})
    if (t->defined()) t->requires_grad_(!frozen);
  for (int64_t t = 0; t < num_tasks() && config_.form == TTForm::k4Plus1D; ++t)
    (void)SetTaskTrainable(t, !frozen);
}

absl::Status MetaTTAdapter::SetTaskTrainable(int64_t task, bool trainable) {
  if (task < 0 || task >= num_tasks())
    return absl::OutOfRangeError(absl::StrCat("task ", task, " outside [0, ", num_tasks(), ")"));
  if (config_.form != TTForm::k4Plus1D) return absl::OkStatus();
  torch::NoGradGuard no_grad;
  auto it = task_leaves_.find(task);
  if (trainable && it == task_leaves_.end()) {
    task_leaves_[task] = task_core_[task].clone().set_requires_grad(true);
  } else if (!trainable && it != task_leaves_.end()) {
    task_core_[task].copy_(it->second);  // keep what it learned
    task_leaves_.erase(it);
    MarkCoresChanged();
  }
  return absl::OkStatus();
}

absl::Status MetaTTAdapter::SetFromTensorTrain(const TensorTrain& tt) {
  RETURN_IF_ERROR(ValidateTensorTrain(tt));
  auto leaf = [](const torch::Tensor& t, bool rg) {
    return t.detach().clone().contiguous().set_requires_grad(rg);
  };
  const bool shared_rg = in_.requires_grad();
  in_ = leaf(tt.cores[0].squeeze(0), shared_rg);
  layer_ = leaf(tt.cores[1], layer_.requires_grad());
  proj_ = leaf(tt.cores[2], proj_.requires_grad());
  switch (config_.form) {
    case TTForm::k4D:
      out_ = leaf(tt.cores[3].squeeze(2), out_.requires_grad());
      break;
    case TTForm::k4Plus1D: {
      task_core_ = tt.cores[3].detach().permute({1, 0, 2}).contiguous();
      for (auto& [t, slice] : task_leaves_) slice = leaf(task_core_[t], true);
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
