#include "server/training/trainer.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <set>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "base/enum_names.h"
#include "base/status_macros.h"
#include "server/training/encoder_objective.h"
#include "server/training/eval_scores.h"

namespace metatt {

absl::StatusOr<TrainableSet> ParseTrainableSet(const std::string& name) {
  static constexpr EnumName<TrainableSet> kSets[] = {{TrainableSet::kAll, "all"},
                                                     {TrainableSet::kAdapterOnly, "adapter"},
                                                     {TrainableSet::kHeadsOnly, "heads"},
                                                     {TrainableSet::kHeadsOnly, "head"}};
  if (auto t = ValueOfIgnoringCase(kSets, name)) return *t;
  return absl::InvalidArgumentError(absl::StrCat("unknown trainable set '", name,
                                                 "' (all, adapter or heads)"));
}

absl::StatusOr<TrainerOptions> TrainerOptionsFromRecipe(const Recipe& r) {
  TrainerOptions o;
  o.steps = r.max_steps;
  o.epochs = r.epochs;
  o.batch_size = r.batch_size;
  o.lr = r.learning_rate;
  o.inner_lr_multiplier = r.inner_lr_multiplier;
  o.head_lr_multiplier = r.head_lr_multiplier;
  o.weight_decay = r.weight_decay;
  o.warmup_ratio = r.warmup_ratio;
  o.warmup_steps = -1;
  o.head_first_ratio = r.head_first_ratio;
  o.grad_clip_norm = r.grad_clip;
  o.seed = r.seed;
  o.eval_every = r.eval_every;
  o.max_length = static_cast<int>(r.max_length);
  auto pooling = ParsePooling(r.pooling);
  if (!pooling.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("pooling: ", pooling.status().message()));
  }
  o.pooling = *pooling;
  o.early_stop_patience = r.early_stop_patience;
  for (const auto& [epoch, rank] : r.rank_schedule) o.rank_schedule.push_back({epoch, rank});
  return o;
}

absl::StatusOr<std::unique_ptr<Trainer>> Trainer::Create(
    const TrainerOptions& options, std::shared_ptr<const BertEncoder> encoder,
    BatchTokenizer tokenizer, AdapterBinding adapter, std::vector<TrainTask> tasks,
    TrainerCallbacks callbacks) {
  if (encoder == nullptr) return absl::InvalidArgumentError("trainer: no encoder");
  return Create(options, MakeEncoderObjective(std::move(encoder), std::move(tokenizer)),
                std::move(adapter), std::move(tasks), std::move(callbacks));
}

absl::StatusOr<std::unique_ptr<Trainer>> Trainer::Create(
    const TrainerOptions& options, std::shared_ptr<TrainObjective> objective,
    AdapterBinding adapter, std::vector<TrainTask> tasks, TrainerCallbacks callbacks) {
  std::unique_ptr<Trainer> t(new Trainer());
  t->options_ = options;
  t->objective_ = std::move(objective);
  t->adapter_ = std::move(adapter);
  t->tasks_ = std::move(tasks);
  t->callbacks_ = std::move(callbacks);
  RETURN_IF_ERROR(t->Init());
  return t;
}

absl::Status Trainer::Init() {
  const TrainerOptions& o = options_;
  if (objective_ == nullptr) return absl::InvalidArgumentError("trainer: no objective");
  if (tasks_.empty()) return absl::InvalidArgumentError("trainer: no tasks");
  if (o.batch_size <= 0) return absl::InvalidArgumentError("trainer: batch_size must be > 0");
  if (o.steps <= 0 && !(o.epochs > 0)) {
    return absl::InvalidArgumentError("trainer: set steps > 0 or epochs > 0");
  }
  if (!(o.lr > 0)) return absl::InvalidArgumentError("trainer: lr must be > 0");
  if (o.weight_decay < 0) return absl::InvalidArgumentError("trainer: weight_decay must be >= 0");
  if (o.max_length < 2) return absl::InvalidArgumentError("trainer: max_length must be >= 2");
  if (o.trainable != TrainableSet::kHeadsOnly && !adapter_.trainable_parameters) {
    return absl::InvalidArgumentError("trainer: adapter training needs trainable_parameters");
  }
  if (!o.rank_schedule.empty() && !adapter_.sweep) {
    return absl::InvalidArgumentError("trainer: a rank schedule needs an adapter that sweeps");
  }
  std::set<std::string> names;
  for (size_t i = 0; i < tasks_.size(); ++i) {
    TrainTask& task = tasks_[i];
    const std::string who = absl::StrCat("task '", task.name, "'");
    if (task.name.empty()) return absl::InvalidArgumentError(absl::StrCat("task ", i, ": no name"));
    if (!names.insert(task.name).second) {
      return absl::InvalidArgumentError(absl::StrCat(who, " given twice"));
    }
    if (task.task_index < 0) return absl::InvalidArgumentError(who + ": negative task index");
  }
  RETURN_IF_ERROR(objective_->Prepare(&tasks_, o));
  for (size_t i = 0; i < tasks_.size(); ++i) {
    const int64_t n_train = objective_->NumTrainExamples(tasks_[i]);
    if (n_train <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("task '", tasks_[i].name, "': empty train set"));
    }
    for (int64_t e = 0; e < n_train; ++e) pool_.emplace_back(static_cast<int>(i), e);
  }
  const int64_t n = static_cast<int64_t>(pool_.size());
  steps_per_epoch_ = (n + o.batch_size - 1) / o.batch_size;
  total_steps_ = o.steps > 0 ? o.steps
                             : std::max<int64_t>(1, static_cast<int64_t>(std::ceil(
                                                        o.epochs * steps_per_epoch_ - 1e-9)));
  warmup_ = o.warmup_steps >= 0 ? o.warmup_steps
                                : static_cast<int64_t>(std::llround(o.warmup_ratio * total_steps_));
  warmup_ = std::min(warmup_, total_steps_);
  head_first_ = std::min<int64_t>(total_steps_, std::llround(o.head_first_ratio * total_steps_));
  std::stable_sort(options_.rank_schedule.begin(), options_.rank_schedule.end(),
                   [](const RankScheduleEntry& a, const RankScheduleEntry& b) {
                     return a.epoch < b.epoch;
                   });
  for (const auto& e : options_.rank_schedule) {
    if (e.epoch < 0 || e.max_rank < 1) {
      return absl::InvalidArgumentError("trainer: rank schedule entries need epoch >= 0, rank >= 1");
    }
  }
  rng_.seed(o.seed);
  order_.resize(pool_.size());
  Reshuffle();
  start_time_ = absl::Now();
  return RebuildOptimizer(/*keep_state=*/false);
}

void Trainer::Reshuffle() {
  std::iota(order_.begin(), order_.end(), 0);
  // Fisher-Yates with our own draws: std::shuffle's algorithm is unspecified.
  for (size_t i = order_.size(); i > 1; --i) {
    size_t j = static_cast<size_t>(rng_() % i);
    std::swap(order_[i - 1], order_[j]);
  }
  cursor_ = 0;
}

std::vector<torch::Tensor> Trainer::CollectParameters() const {
  std::vector<torch::Tensor> out;
  for (int g = 0; g < kNumGroups; ++g) {
    const auto group = CollectGroup(g);
    out.insert(out.end(), group.begin(), group.end());
  }
  return out;
}

// Group 0: the adapter's trainable tensors except its inner cores; 1: the
// inner cores; 2: the task heads.
std::vector<torch::Tensor> Trainer::CollectGroup(int group) const {
  std::vector<torch::Tensor> out;
  auto add = [&](const torch::Tensor& p) {
    if (p.defined() && p.requires_grad()) out.push_back(p);
  };
  if (group != kHeadGroup && options_.trainable != TrainableSet::kHeadsOnly) {
    std::set<void*> inner;
    if (adapter_.inner_parameters)
      for (const auto& p : adapter_.inner_parameters()) inner.insert(p.unsafeGetTensorImpl());
    std::set<void*> seen;
    for (const auto& p : adapter_.trainable_parameters()) {
      void* key = p.unsafeGetTensorImpl();
      if (!seen.insert(key).second) continue;
      if ((inner.count(key) > 0) == (group == 1)) add(p);
    }
  }
  if (group == kHeadGroup && options_.trainable != TrainableSet::kAdapterOnly) {
    for (const auto& t : tasks_) {
      if (t.head == nullptr) continue;  // generation tasks: the LM head is the model's
      add(t.head->weight);
      add(t.head->bias);
    }
  }
  return out;
}

absl::Status Trainer::RebuildOptimizer(bool keep_state) {
  std::vector<torch::Tensor> params = CollectParameters();
  if (params.empty()) return absl::InvalidArgumentError("trainer: nothing to train");
  return TorchTry("optimizer", [&] {
    // Parameter groups (adapter, its inner cores, heads), each with its own
    // learning-rate multiplier; an empty group is skipped.
    const double multiplier[kNumGroups] = {1.0, options_.inner_lr_multiplier,
                                           options_.head_lr_multiplier};
    std::vector<torch::optim::OptimizerParamGroup> groups;
    std::vector<int> ids;
    for (int g = 0; g < kNumGroups; ++g) {
      auto group = CollectGroup(g);
      if (group.empty()) continue;
      groups.emplace_back(group, std::make_unique<torch::optim::AdamWOptions>(
                                     torch::optim::AdamWOptions(options_.lr)
                                         .weight_decay(options_.weight_decay)));
      ids.push_back(g);
    }
    if (optimizer_ && keep_state && ids != group_ids_) keep_state = false;
    group_ids_ = ids;
    group_multiplier_.clear();
    for (int g : ids) group_multiplier_.push_back(multiplier[g]);
    if (!optimizer_ || !keep_state) {
      optimizer_ = std::make_unique<torch::optim::AdamW>(
          std::move(groups), torch::optim::AdamWOptions(options_.lr).weight_decay(options_.weight_decay));
    } else {
      std::set<void*> keep;
      for (const auto& p : params) keep.insert(p.unsafeGetTensorImpl());
      auto& state = optimizer_->state();
      for (auto it = state.begin(); it != state.end();) {
        if (!keep.count(it->first)) {
          it = state.erase(it);
        } else {
          ++it;
        }
      }
      auto& have = optimizer_->param_groups();
      // Same groups as before (checked above): a sweep changes tensors only.
      for (size_t i = 0; i < groups.size(); ++i) have[i].params() = groups[i].params();
    }
    params_ = params;
  });
}

double Trainer::LearningRate(int64_t step) const {
  const double lr = options_.lr;
  if (step < warmup_) return lr * static_cast<double>(step + 1) / static_cast<double>(warmup_);
  if (!options_.linear_decay) return lr;
  const double span = static_cast<double>(std::max<int64_t>(1, total_steps_ - warmup_));
  return lr * std::max(0.0, static_cast<double>(total_steps_ - step) / span);
}

double Trainer::AdapterRateScale(int64_t step) const {
  if (head_first_ == 0) return 1.0;
  if (step < head_first_) return 0.0;
  return std::min(1.0, static_cast<double>(step - head_first_ + 1) /
                           static_cast<double>(std::max<int64_t>(1, warmup_)));
}

absl::Status Trainer::MaybeSweep() {
  const auto& schedule = options_.rank_schedule;
  while (next_schedule_ < schedule.size()) {
    const RankScheduleEntry& e = schedule[next_schedule_];
    const int64_t at = static_cast<int64_t>(std::llround(e.epoch * steps_per_epoch_));
    if (step_ < at) break;
    ++next_schedule_;
    // Remember the parameters' values: state is kept only for unchanged ones.
    std::vector<torch::Tensor> before;
    std::vector<void*> before_keys;
    for (const auto& p : params_) {
      before.push_back(p.detach().clone());
      before_keys.push_back(p.unsafeGetTensorImpl());
    }
    ASSIGN_OR_RETURN(std::vector<BondTruncation> bonds, adapter_.sweep(e.max_rank, options_.truncation));
    RETURN_IF_ERROR(RebuildOptimizer(/*keep_state=*/true));
    RETURN_IF_ERROR(TorchTry("sweep optimizer reset", [&] {
      auto& state = optimizer_->state();
      for (size_t i = 0; i < before.size(); ++i) {
        auto it = state.find(before_keys[i]);
        if (it == state.end()) continue;
        bool same = false;
        for (const auto& p : params_) {
          if (p.unsafeGetTensorImpl() == before_keys[i]) {
            same = p.sizes().equals(before[i].sizes()) && torch::equal(p.detach(), before[i]);
            break;
          }
        }
        if (!same) state.erase(it);
      }
    }));
    // Earlier checkpoints have the old ranks: the best is chosen among
    // evaluations after the latest sweep.
    best_eval_.reset();
    best_tensors_.clear();
    evals_without_improvement_ = 0;
    SweepEvent ev;
    ev.step = step_;
    ev.epoch = e.epoch;
    ev.max_rank = e.max_rank;
    ev.bonds = std::move(bonds);
    sweeps_.push_back(ev);
    if (callbacks_.on_sweep) callbacks_.on_sweep(ev);
  }
  return absl::OkStatus();
}

absl::StatusOr<double> Trainer::TrainStep() {
  if (cursor_ >= order_.size()) Reshuffle();
  const size_t end = std::min(order_.size(), cursor_ + static_cast<size_t>(options_.batch_size));
  std::vector<BatchRow> rows;
  for (size_t k = cursor_; k < end; ++k) rows.push_back(pool_[order_[k]]);
  cursor_ = end;
  const int64_t B = static_cast<int64_t>(rows.size());
  const torch::Device dev = objective_->device();

  AdapterBatch ab;
  RETURN_IF_ERROR(TorchTry("task index", [&] {
    std::vector<int64_t> ti(B);
    for (int64_t i = 0; i < B; ++i) ti[i] = tasks_[rows[i].first].task_index;
    ab = AdapterBatch::FromHost(torch::tensor(ti, torch::kLong), dev);
  }));
  ASSIGN_OR_RETURN(BatchLoss batch_loss,
                   objective_->Loss(tasks_, rows, adapter_.adapter, ab, options_));
  torch::Tensor loss = batch_loss.loss;
  double grad_norm = 0;
  const double lr = LearningRate(step_);
  RETURN_IF_ERROR(TorchTry("train step", [&] {
    optimizer_->zero_grad();
    loss.backward();
    if (options_.grad_clip_norm > 0) {
      grad_norm = torch::nn::utils::clip_grad_norm_(params_, options_.grad_clip_norm);
    } else {
      double sq = 0;
      for (const auto& p : params_) {
        if (p.grad().defined()) sq += p.grad().pow(2).sum().item<double>();
      }
      grad_norm = std::sqrt(sq);
    }
    auto& groups = optimizer_->param_groups();
    const double adapter_scale = AdapterRateScale(step_);
    for (size_t i = 0; i < groups.size(); ++i) {
      double mult = i < group_multiplier_.size() ? group_multiplier_[i] : 1.0;
      if (i < group_ids_.size() && group_ids_[i] != kHeadGroup) mult *= adapter_scale;
      static_cast<torch::optim::AdamWOptions&>(groups[i].options()).lr(lr * mult);
    }
    optimizer_->step();
    // Tensors not being optimised (frozen heads) must not accumulate grads.
    for (const auto& task : tasks_) {
      if (task.head == nullptr) continue;
      if (task.head->weight.grad().defined()) task.head->weight.mutable_grad().reset();
      if (task.head->bias.grad().defined()) task.head->bias.mutable_grad().reset();
    }
  }));
  if (adapter_.after_step) adapter_.after_step();
  examples_seen_ += B;
  tokens_seen_ += batch_loss.tokens;
  last_grad_norm_ = grad_norm;
  last_lr_ = lr;
  return loss.item<double>();
}

absl::StatusOr<EvalEvent> Trainer::Evaluate() {
  EvalEvent ev;
  ev.step = step_;
  torch::NoGradGuard no_grad;
  double score_sum = 0;
  int scored = 0;
  for (const TrainTask& task : tasks_) {
    if (!objective_->HasEval(task)) continue;
    ASSIGN_OR_RETURN(auto m, objective_->Evaluate(task, adapter_.adapter, options_));
    auto it = m.find(task.primary_metric);
    if (it == m.end()) {
      return absl::InternalError(absl::StrCat("task '", task.name, "': evaluation gave no '",
                                              task.primary_metric, "'"));
    }
    score_sum += it->second;
    ++scored;
    ev.metrics[task.name] = std::move(m);
  }
  ev.score = scored ? score_sum / scored : 0.0;
  return ev;
}

absl::Status Trainer::EvaluateAndTrack() {
  bool any_eval = false;
  for (const auto& t : tasks_) any_eval |= objective_->HasEval(t);
  if (!any_eval) return absl::OkStatus();
  ASSIGN_OR_RETURN(EvalEvent ev, Evaluate());
  if (!best_eval_ || ev.score > best_eval_->score) {
    ev.is_best = true;
    evals_without_improvement_ = 0;
    best_tensors_.clear();
    if (adapter_.snapshot) {
      for (auto& [k, v] : adapter_.snapshot()) best_tensors_["adapter." + k] = v;
    }
    for (const auto& t : tasks_) {
      if (t.head == nullptr) continue;
      for (auto& [k, v] : t.head->Tensors("heads." + t.name + ".")) best_tensors_[k] = v;
    }
    best_eval_ = ev;
  } else {
    ++evals_without_improvement_;
    if (options_.early_stop_patience > 0 &&
        evals_without_improvement_ >= options_.early_stop_patience) {
      state_ = State::kEarlyStopped;
    }
  }
  last_eval_ = ev;
  if (callbacks_.on_eval) callbacks_.on_eval(ev);
  return absl::OkStatus();
}

absl::StatusOr<bool> Trainer::Step() {
  if (failed_) return absl::FailedPreconditionError("trainer failed earlier");
  if (state_ != State::kRunning) return false;
  if (cancel_requested_.load()) {
    state_ = State::kCancelled;
    return false;
  }
  auto run = [&]() -> absl::StatusOr<double> {
    RETURN_IF_ERROR(MaybeSweep());
    return TrainStep();
  };
  const absl::Time t0 = absl::Now();
  absl::StatusOr<double> loss = run();
  if (!loss.ok()) {
    failed_ = true;
    return loss.status();
  }
  train_time_ += absl::Now() - t0;
  ++step_;
  losses_.push_back(*loss);
  if (callbacks_.on_progress) {
    ProgressEvent p;
    p.step = step_;
    p.total_steps = total_steps_;
    p.epoch = static_cast<double>(step_) / static_cast<double>(steps_per_epoch_);
    p.loss = *loss;
    p.lr = last_lr_;
    p.grad_norm = last_grad_norm_;
    const double secs = absl::ToDoubleSeconds(train_time_);
    p.examples_per_second = secs > 0 ? static_cast<double>(examples_seen_) / secs : 0.0;
    p.tokens_per_second = secs > 0 ? static_cast<double>(tokens_seen_) / secs : 0.0;
    p.eta_seconds = secs / static_cast<double>(step_) * static_cast<double>(total_steps_ - step_);
    callbacks_.on_progress(p);
  }
  const bool last = step_ >= total_steps_;
  if (last || (options_.eval_every > 0 && step_ % options_.eval_every == 0)) {
    absl::Status st = EvaluateAndTrack();
    if (!st.ok()) {
      failed_ = true;
      return st;
    }
  }
  if (last && state_ == State::kRunning) state_ = State::kFinished;
  return state_ == State::kRunning;
}

absl::Status Trainer::Run() {
  while (true) {
    ASSIGN_OR_RETURN(bool more, Step());
    if (!more) return absl::OkStatus();
  }
}

absl::Status Trainer::RestoreBest() {
  if (best_tensors_.empty()) return absl::FailedPreconditionError("no best checkpoint yet");
  if (adapter_.snapshot) {
    if (!adapter_.restore) {
      return absl::FailedPreconditionError("adapter binding cannot restore a snapshot");
    }
    std::map<std::string, torch::Tensor> a;
    for (const auto& [k, v] : best_tensors_) {
      if (k.rfind("adapter.", 0) == 0) a[k.substr(8)] = v;
    }
    RETURN_IF_ERROR(adapter_.restore(a));
  }
  for (auto& t : tasks_) {
    if (t.head != nullptr) RETURN_IF_ERROR(t.head->Load(best_tensors_, "heads." + t.name + "."));
  }
  return absl::OkStatus();
}

}  // namespace metatt
