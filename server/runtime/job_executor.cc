#include "server/runtime/job_executor.h"

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <atomic>
#include <numeric>
#include <optional>
#include <random>
#include <set>
#include <initializer_list>
#include <utility>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "adapters/lora_adapter.h"
#include "adapters/metatt_adapter.h"
#include "adapters/metatt_config.h"
#include "base/safetensors.h"
#include "base/status_macros.h"
#include "server/jobs/dataset_manager.h"
#include "server/jobs/dataset_spec_json.h"
#include "server/jobs/job_recipe.h"
#include "server/jobs/job_validation.h"
#include "server/runtime/base_model.h"
#include "server/training/adapter_binding.h"
#include "server/training/adapter_config.h"
#include "server/training/checkpoint.h"
#include "server/training/encoder_objective.h"
#include "server/training/heads.h"
#include "server/training/eval_scores.h"
#include "server/training/generation_dataset.h"
#include "server/training/lm_objective.h"

namespace metatt {
namespace {

using json = nlohmann::json;

// The deterministic train/eval split of a task with no eval set: `all`'s
// examples in an order shuffled by `seed`, the first fraction * n (at least
// one, at most n - 1) held out. Both halves keep what else `all` carries
// (a Dataset's label kind and vocabulary).
template <typename D>
void SeededSplit(double fraction, uint64_t seed, D* all, D* eval) {
  std::vector<size_t> order(all->size());
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 rng(seed);
  std::shuffle(order.begin(), order.end(), rng);
  size_t n_eval = static_cast<size_t>(fraction * all->size());
  n_eval = std::max<size_t>(1, std::min(n_eval, all->size() - 1));
  auto examples = std::move(all->examples);
  all->examples.clear();
  *eval = *all;
  for (size_t k = 0; k < order.size(); ++k) {
    (k < n_eval ? eval : all)->examples.push_back(std::move(examples[order[k]]));
  }
}

// `fn()`'s result, or INTERNAL "<what>: <first line of the exception>" when it
// throws (TorchTry): the job's stages run LibTorch on the user's data.
template <typename Fn>
auto Caught(const char* what, Fn&& fn) -> decltype(fn()) {
  using T = decltype(fn());
  std::optional<T> result;
  const absl::Status thrown = TorchTry(what, [&] { result.emplace(fn()); });
  if (!thrown.ok()) return T(thrown);
  return *std::move(result);
}

absl::Status Prefixed(const absl::Status& st, const std::string& field) {
  if (st.ok()) return st;
  return absl::Status(st.code(), absl::StrCat(field, ": ", st.message()));
}

int64_t NowMs() { return absl::ToUnixMillis(absl::Now()); }

struct PreparedTask {
  JobTaskSpec spec;
  Dataset train, eval;                   // encoder tasks
  GenerationDataset gen_train, gen_eval;  // decoder (generation) tasks
};

// Everything validated on the caller's thread.
struct PreparedJob {
  JobRecord job;
  // The spec's hyper-parameters with every unset field resolved from
  // DefaultRecipe(form) (server/jobs/job_recipe.h); `overrides` says which
  // ones the user set (for the resolved-hyper-parameters event).
  Recipe recipe;
  RecipeOverrides overrides;
  MetaTTConfig config;  // new families
  std::optional<LoraConfig> lora;  // a new family of form lora (instead of `config`)
  std::vector<PreparedTask> tasks;
};

absl::StatusOr<Dataset> LoadDataset(Store* store, const std::string& id,
                                    const std::vector<std::string>& vocab,
                                    const std::string& field,
                                    const RuntimeJobExecutor::Options& o) {
  auto rec = store->GetDataset(id);
  if (!rec.ok()) return Prefixed(rec.status(), field);
  auto spec = DatasetSpecFromRecord(*rec);
  if (!spec.ok()) return Prefixed(spec.status(), field);
  if (!vocab.empty()) spec->label_vocab = vocab;
  spec->origin = absl::StrCat("dataset ", id);
  auto bytes = ReadDatasetBytes(*rec, o.blobs, o.dataset_cache_dir, field);
  if (!bytes.ok()) return bytes.status();
  auto data = ParseDataset(*bytes, *spec);
  if (!data.ok()) return Prefixed(data.status(), field);
  if (data->examples.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(field, ": dataset ", id, " is empty"));
  }
  return data;
}

// A generation dataset (decoder servers): nullopt when the record is not one.
absl::StatusOr<std::optional<GenerationDataset>> LoadGenerationDataset(
    Store* store, const std::string& id, const std::string& field,
    const RuntimeJobExecutor::Options& o) {
  auto rec = store->GetDataset(id);
  if (!rec.ok()) return Prefixed(rec.status(), field);
  auto spec = GenerationSpecFromJson(rec->spec_json);
  if (!spec.ok()) return Prefixed(spec.status(), absl::StrCat(field, ": dataset ", id));
  if (!spec->has_value()) return std::optional<GenerationDataset>();
  (*spec)->origin = absl::StrCat("dataset ", id);
  auto bytes = ReadDatasetBytes(*rec, o.blobs, o.dataset_cache_dir, field);
  if (!bytes.ok()) return bytes.status();
  auto data = ParseGenerationDataset(*bytes, **spec);
  if (!data.ok()) return Prefixed(data.status(), field);
  return std::optional<GenerationDataset>(std::move(*data));
}

// Where a job's resumable checkpoints live ("" when they are off).
std::string JobCheckpointDir(const RuntimeJobExecutor::Options& o, const std::string& job_id) {
  if (o.checkpoint_dir.empty() || o.checkpoint_every_steps <= 0 || job_id.empty()) return "";
  return (std::filesystem::path(o.checkpoint_dir) / job_id).string();
}

// With a blob store (Options::blobs) a job's checkpoints are the objects
// checkpoints/<job id>/step-<K>.ckpt, so any replica can resume the job; its
// local checkpoint directory is this replica's copy of them.
std::string CheckpointKeyPrefix(const std::string& job_id) {
  return absl::StrCat("checkpoints/", job_id, "/");
}

// Uploads the checkpoint just written to `file` (fenced: refused once another
// replica took the job over), then drops the objects the local directory
// pruned.
absl::Status UploadCheckpoint(BlobStore* blobs, const std::string& job_id, const std::string& dir,
                              const std::string& file) {
  namespace fs = std::filesystem;
  const std::string prefix = CheckpointKeyPrefix(job_id);
  ASSIGN_OR_RETURN(std::string bytes, ReadFileToString(file));
  RETURN_IF_ERROR(blobs->Put(prefix + fs::path(file).filename().string(), bytes, job_id));
  ASSIGN_OR_RETURN(std::vector<std::string> keys, blobs->List(prefix));
  std::error_code ec;
  for (const std::string& key : keys) {
    if (!fs::exists(fs::path(dir) / key.substr(prefix.size()), ec)) {
      RETURN_IF_ERROR(blobs->Delete(key));
    }
  }
  return absl::OkStatus();
}

// Brings the job's checkpoints from the blob store into `dir` (downloading
// the ones it lacks); `mirror`: also removes local ones the store does not
// hold (a copy left from an earlier run here). Returns the stored names.
absl::StatusOr<std::vector<std::string>> FetchCheckpoints(BlobStore* blobs,
                                                          const std::string& job_id,
                                                          const std::string& dir, bool mirror) {
  namespace fs = std::filesystem;
  const std::string prefix = CheckpointKeyPrefix(job_id);
  ASSIGN_OR_RETURN(std::vector<std::string> keys, blobs->List(prefix));
  std::vector<std::string> names;
  for (const std::string& key : keys) {
    names.push_back(key.substr(prefix.size()));
    RETURN_IF_ERROR(FetchBlobToFile(blobs, key, (fs::path(dir) / names.back()).string()));
  }
  std::error_code ec;
  if (mirror && fs::is_directory(dir, ec)) {
    for (const auto& e : fs::directory_iterator(dir, ec)) {
      const std::string name = e.path().filename().string();
      if (std::find(names.begin(), names.end(), name) == names.end()) fs::remove(e.path(), ec);
    }
  }
  return names;
}

class TrainingJob : public TrainingTask {
 public:
  TrainingJob(PreparedJob prepared, JobExecutor::EmitFn emit,
              std::shared_ptr<std::atomic<bool>> cancel, AdapterRegistry* registry,
              std::shared_ptr<const BaseModel> model, BatchTokenizer tokenizer,
              RuntimeJobExecutor::Options options)
      : p_(std::move(prepared)), emit_(std::move(emit)), cancel_(std::move(cancel)),
        registry_(registry), model_(std::move(model)), tokenizer_(std::move(tokenizer)),
        options_(options) {}

  const std::string& id() const override { return p_.job.id; }

  bool Step() override {
    if (!started_) {
      started_ = true;
      if (cancel_->load()) return Cancelled();
      EmitState(JobState::kRunning, "");
      absl::Status st = Caught("job setup", [&] { return Setup(); });
      if (st.ok()) st = Caught("resume", [&] { return MaybeResume(); });
      if (!st.ok()) return Fail(st);
      return true;
    }
    if (cancel_->load()) trainer_->Cancel();
    const absl::StatusOr<bool> more = Caught("training step", [&] { return trainer_->Step(); });
    if (!more.ok()) return Fail(more.status());
    if (*more) {
      MaybeCheckpoint();
      return true;
    }
    if (trainer_->state() == Trainer::State::kCancelled) return Cancelled();
    const absl::Status st = Caught("publish", [&] { return Publish(); });
    if (!st.ok()) return Fail(st);
    return false;
  }

 private:
  void Emit(JobEvent e) {
    e.time_unix_ms = NowMs();
    if (emit_) emit_(e);
  }
  void EmitLog(const std::string& message) {
    JobEvent e;
    e.type = JobEvent::Type::kLog;
    e.message = message;
    if (trainer_) {
      e.step = trainer_->step();
      e.total_steps = trainer_->total_steps();
    }
    Emit(std::move(e));
  }
  std::string CheckpointDir() const { return JobCheckpointDir(options_, p_.job.id); }
  // A job started again with a checkpoint continues from the newest one
  // (server/training/checkpoint.h; a restore that fails fails the job).
  absl::Status MaybeResume() {
    const std::string dir = CheckpointDir();
    if (dir.empty()) return absl::OkStatus();
    if (options_.blobs != nullptr) {
      // Another replica's checkpoints too (it died, or this job moved here).
      auto fetched = FetchCheckpoints(options_.blobs, p_.job.id, dir, /*mirror=*/true);
      if (!fetched.ok()) return Prefixed(fetched.status(), "reading the job's checkpoints");
    }
    std::optional<TrainerCheckpointInfo> latest = LatestTrainerCheckpoint(dir);
    if (!latest.has_value()) return absl::OkStatus();
    RETURN_IF_ERROR(trainer_->RestoreState(latest->path));
    EmitLog(absl::StrCat("resumed from step ", trainer_->step(), " of ", trainer_->total_steps(),
                         " (checkpoint ", latest->path, ")"));
    return absl::OkStatus();
  }
  // Every checkpoint_every_steps steps and after each evaluation. A failed
  // write is reported and training goes on (the previous one stays).
  void MaybeCheckpoint() {
    const std::string dir = CheckpointDir();
    if (dir.empty()) return;
    const int64_t step = trainer_->step();
    const bool evaluated = trainer_->last_eval().has_value() && trainer_->last_eval()->step == step;
    if (step % options_.checkpoint_every_steps != 0 && !evaluated) return;
    const absl::StatusOr<TrainerCheckpointInfo> info =
        Caught("write", [&] { return WriteTrainerCheckpoint(dir, *trainer_); });
    if (!info.ok()) {
      EmitLog(absl::StrCat("checkpoint at step ", step, " not saved: ", info.status().ToString()));
      return;
    }
    if (options_.blobs != nullptr) {
      absl::Status up = UploadCheckpoint(options_.blobs, p_.job.id, dir, info->path);
      if (!up.ok()) {
        EmitLog(absl::StrCat("checkpoint at step ", step, " not saved to the blob store (",
                             options_.blobs->Describe(), "): ", up.ToString()));
        return;
      }
    }
    EmitLog(absl::StrCat("checkpoint saved at step ", step));
  }
  void EmitState(JobState s, const std::string& message) {
    JobEvent e;
    e.type = JobEvent::Type::kState;
    e.state = s;
    e.message = message;
    if (trainer_) {
      e.step = trainer_->step();
      e.total_steps = trainer_->total_steps();
    }
    Emit(std::move(e));
  }
  bool Fail(const absl::Status& st) {
    EmitState(JobState::kFailed, st.ToString());
    Release();
    return false;
  }
  bool Cancelled() {
    EmitState(JobState::kCancelled, "cancelled on request");
    Release();
    return false;
  }
  void Release() {
    trainer_.reset();
    adapter_.reset();
    lora_.reset();
    base_.reset();
  }

  absl::Status Setup() {
    const JobSpec& spec = p_.job.spec;
    const Recipe& recipe = p_.recipe;
    const torch::Device dev = model_->device;
    {
      JobEvent log;  // what runs, defaults included
      log.type = JobEvent::Type::kLog;
      log.message = DescribeRecipe(recipe, p_.overrides,
                                   /*structure_from_family=*/spec.kind == JobKind::kAddTask);
      Emit(std::move(log));
    }
    std::vector<int64_t> task_index;
    if (spec.kind == JobKind::kAddTask) {
      ASSIGN_OR_RETURN(base_, registry_->Get(spec.family, 0));
      // FromTensors copies (the task core in one stack); frozen: no leaf per
      // existing task (a family may hold 10^6), only the new tasks train.
      std::map<std::string, torch::Tensor> tensors;
      for (const auto& [k, v] : base_->adapter->NamedParameters()) tensors[k] = v.detach();
      ASSIGN_OR_RETURN(adapter_, MetaTTAdapter::FromTensors(
                                     base_->adapter->config(), base_->adapter->scale(), tensors,
                                     dev, MetaTTAdapter::Leaves::kFrozen));
      for (const auto& t : p_.tasks) {
        if (base_->task_by_name.count(t.spec.task_name)) {
          return absl::FailedPreconditionError(absl::StrCat(
              "task '", t.spec.task_name, "' already exists in family ", spec.family));
        }
      }
      ASSIGN_OR_RETURN(MetaTTAdapter::NewTaskInit init,
                       MetaTTAdapter::ParseNewTaskInit(recipe.new_task_init));
      for (size_t i = 0; i < p_.tasks.size(); ++i) {
        ASSIGN_OR_RETURN(int64_t idx, adapter_->AddTask(init));
        task_index.push_back(idx);
      }
      adapter_->FreezeShared(true);
      for (int64_t idx : task_index) RETURN_IF_ERROR(adapter_->SetTaskTrainable(idx, true));
      new_task_index_ = task_index;
    } else if (p_.lora.has_value()) {
      LoraAdapter::Options lo;
      lo.device = dev;
      lo.seed = recipe.seed;
      ASSIGN_OR_RETURN(lora_, LoraAdapter::Create(*p_.lora, lo));
      for (size_t i = 0; i < p_.tasks.size(); ++i) task_index.push_back(static_cast<int64_t>(i));
    } else {
      MetaTTAdapter::Options ao;
      ao.device = dev;
      ao.seed = recipe.seed;
      ASSIGN_OR_RETURN(adapter_, MetaTTAdapter::Create(p_.config, ao));
      for (size_t i = 0; i < p_.tasks.size(); ++i) task_index.push_back(static_cast<int64_t>(i));
    }
    std::vector<TrainTask> tasks;
    for (size_t i = 0; i < p_.tasks.size(); ++i) {
      PreparedTask& pt = p_.tasks[i];
      TrainTask t;
      t.name = pt.spec.task_name;
      t.task_index = task_index[i];
      if (model_->is_decoder()) {  // generation: no head (the LM head is the model's)
        t.gen_train = std::move(pt.gen_train);
        t.gen_eval = std::move(pt.gen_eval);
      } else {
        TaskHead::Options ho = TaskHead::Options::ForData(
            pt.train, model_->encoder->config().hidden_size, recipe.seed + 1000 * (i + 1), dev);
        t.train = std::move(pt.train);
        t.eval = std::move(pt.eval);
        ASSIGN_OR_RETURN(t.head, TaskHead::Create(ho));
      }
      t.primary_metric = pt.spec.metric;
      tasks.push_back(std::move(t));
    }
    AdapterBinding b = lora_ != nullptr ? BindLora(lora_.get()) : BindMetaTT(adapter_.get());
    ASSIGN_OR_RETURN(TrainerOptions to, TrainerOptionsFromRecipe(recipe));
    to.max_eval_examples = options_.max_eval_examples;
    to.max_new_tokens = kDefaultDecoderMaxNewTokens;
    TrainerCallbacks cb;
    cb.on_progress = [this](const ProgressEvent& pe) {
      const absl::Time now = absl::Now();
      if (pe.step != 1 && pe.step != pe.total_steps && pe.step % options_.progress_every != 0 &&
          now - last_progress_ < absl::Seconds(1)) {
        return;
      }
      last_progress_ = now;
      JobEvent e;
      e.type = JobEvent::Type::kProgress;
      e.step = pe.step;
      e.total_steps = pe.total_steps;
      e.epoch = static_cast<int64_t>(pe.epoch);
      e.loss = pe.loss;
      e.examples_per_second = pe.examples_per_second;
      e.eta_seconds = pe.eta_seconds;
      if (model_->is_decoder()) {
        e.message = absl::StrCat("tokens/s ", static_cast<int64_t>(pe.tokens_per_second));
      }
      Emit(std::move(e));
    };
    cb.on_eval = [this](const EvalEvent& ev) {
      JobEvent e;
      e.type = JobEvent::Type::kEval;
      e.step = ev.step;
      for (const auto& [task, ms] : ev.metrics) {
        for (const auto& [name, value] : ms) e.metrics[absl::StrCat(task, "/", name)] = value;
      }
      e.metrics["score"] = ev.score;
      e.message = ev.is_best ? "best so far" : "";
      Emit(std::move(e));
    };
    cb.on_sweep = [this](const SweepEvent& sv) {
      JobEvent e;
      e.type = JobEvent::Type::kSweep;
      e.step = sv.step;
      e.epoch = static_cast<int64_t>(sv.epoch);
      for (const auto& bt : sv.bonds) {
        e.bonds.push_back({bt.bond, bt.old_rank, bt.new_rank, bt.discarded_weight});
      }
      e.message = absl::StrCat("max rank ", sv.max_rank);
      Emit(std::move(e));
    };
    std::shared_ptr<TrainObjective> objective =
        model_->is_decoder()
            ? MakeLmObjective(model_->decoder, MakeChatLmTokenizer(model_->bpe))
            : MakeEncoderObjective(model_->encoder, tokenizer_);
    ASSIGN_OR_RETURN(trainer_, Trainer::Create(to, std::move(objective), std::move(b),
                                               std::move(tasks), std::move(cb)));
    return absl::OkStatus();
  }

  // The trained tasks as task records + heads (the best evaluation's
  // tensors where kept).
  void CollectTasks(std::vector<TaskRecord>* tasks, std::vector<torch::Tensor>* weights,
                    std::vector<torch::Tensor>* biases) const {
    const auto& best = trainer_->best_tensors();
    const auto& best_eval = trainer_->best_eval();
    for (const TrainTask& t : trainer_->tasks()) {
      TaskRecord r;
      r.name = t.name;
      if (best_eval) {
        auto it = best_eval->metrics.find(t.name);
        if (it != best_eval->metrics.end()) r.eval_metrics = it->second;
      }
      if (t.head == nullptr) {
        // A generation task: no head. Published as an empty one (0 labels,
        // [0, hidden]) so that the registry's one-head-per-task records hold.
        r.num_labels = 0;
        const int64_t hidden = model_->decoder->config().hidden_size;
        weights->push_back(torch::zeros({0, hidden}, torch::kFloat32));
        biases->push_back(torch::zeros({0}, torch::kFloat32));
        tasks->push_back(std::move(r));
        continue;
      }
      r.regression = t.train.label_kind == LabelKind::kRegression;
      r.num_labels = t.head->out_features();
      if (!r.regression) r.label_names = t.train.label_vocab;
      const std::string prefix = "heads." + t.name + ".";
      auto w = best.find(prefix + "weight");
      auto bias = best.find(prefix + "bias");
      if (w != best.end() && bias != best.end()) {
        weights->push_back(w->second);
        biases->push_back(bias->second);
      } else {
        weights->push_back(t.head->weight.detach().clone());
        biases->push_back(t.head->bias.detach().clone());
      }
      tasks->push_back(std::move(r));
    }
  }

  // An add-task job publishes only what it adds (O(1) in the family's size),
  // on top of the version it trained on.
  absl::StatusOr<std::shared_ptr<const PublishedFamily>> PublishAppended() {
    const auto& best = trainer_->best_tensors();
    AppendRequest req;
    req.family = p_.job.spec.family;
    req.base_version = base_->version();
    req.created_by_job = p_.job.id;
    std::vector<torch::Tensor> slices;
    for (int64_t idx : new_task_index_) {
      auto it = best.find(absl::StrCat("adapter.task.", idx));
      slices.push_back(it != best.end() ? it->second : adapter_->TaskSlice(idx).detach().clone());
    }
    RETURN_IF_ERROR(TorchTry("stacking the new task slices", [&] {
      req.task_slices = torch::stack(slices, 0).to(torch::kCPU);
    }));
    CollectTasks(&req.tasks, &req.head_weights, &req.head_biases);
    return registry_->PublishAppend(req);
  }

  // A new family: every core, task and head.
  absl::StatusOr<std::shared_ptr<const PublishedFamily>> PublishFull() {
    const JobSpec& spec = p_.job.spec;
    const auto& best = trainer_->best_tensors();
    PublishRequest req;
    req.family = spec.family;
    req.base_version = 0;  // a new family: refused if one appeared while it trained
    req.pooling = p_.recipe.pooling;
    req.max_length = p_.recipe.max_length;
    req.created_by_job = p_.job.id;
    if (lora_ != nullptr) return PublishLora(std::move(req));
    req.scale = adapter_->scale();
    if (!best.empty()) {
      for (const auto& [k, v] : best) {
        if (k.rfind("adapter.", 0) == 0) req.adapter_tensors[k.substr(8)] = v;
      }
    }
    if (req.adapter_tensors.empty()) {
      for (const auto& [k, v] : adapter_->NamedParameters()) {
        req.adapter_tensors[k] = v.detach().clone();
      }
    }
    req.config = adapter_->config();
    ASSIGN_OR_RETURN(req.config.ranks, RanksFromTensors(req.config.form, req.adapter_tensors));
    if (req.config.form == TTForm::k4Plus1D) {
      int64_t n = 0;
      for (const auto& [k, v] : req.adapter_tensors) n += k.rfind("task.", 0) == 0 ? 1 : 0;
      req.config.num_tasks = n;
    }
    CollectTasks(&req.tasks, &req.head_weights, &req.head_biases);
    return registry_->Publish(req);
  }

  // A LoRA family: the best evaluation's factors where kept, else the last.
  absl::StatusOr<std::shared_ptr<const PublishedFamily>> PublishLora(PublishRequest req) {
    const auto& best = trainer_->best_tensors();
    std::map<LoraAdapter::Key, LoraAdapter::Factors> factors;
    for (const auto& [k, f] : lora_->factors()) {
      const std::string name = absl::StrCat("adapter.layer.", k.first, ".", ProjectionName(k.second));
      auto a = best.find(name + ".lora_A");
      auto b = best.find(name + ".lora_B");
      factors[k] = {a != best.end() ? a->second : f.a.detach(),
                    b != best.end() ? b->second : f.b.detach()};
    }
    ASSIGN_OR_RETURN(std::unique_ptr<LoraAdapter> trained,
                     LoraAdapter::FromFactors(lora_->config(), std::move(factors)));
    req.lora = trained.get();
    CollectTasks(&req.tasks, &req.head_weights, &req.head_biases);
    return registry_->Publish(req);
  }

  absl::Status Publish() {
    ASSIGN_OR_RETURN(std::shared_ptr<const PublishedFamily> fam,
                     base_ != nullptr ? PublishAppended() : PublishFull());
    const auto& best_eval = trainer_->best_eval();
    JobEvent cp;
    cp.type = JobEvent::Type::kCheckpoint;
    cp.family = fam->family();
    cp.version = fam->version();
    cp.step = trainer_->step();
    cp.total_steps = trainer_->total_steps();
    if (best_eval) {
      for (const auto& [task, ms] : best_eval->metrics) {
        for (const auto& [name, value] : ms) cp.metrics[absl::StrCat(task, "/", name)] = value;
      }
    }
    cp.message = absl::StrCat("published ", fam->family(), " v", fam->version(), " (",
                              fam->num_tasks(), " tasks)");
    Emit(cp);
    JobEvent done;
    done.type = JobEvent::Type::kState;
    done.state = JobState::kSucceeded;
    done.family = fam->family();
    done.version = fam->version();
    done.step = trainer_->step();
    done.total_steps = trainer_->total_steps();
    done.message = cp.message;
    Emit(std::move(done));
    Release();
    return absl::OkStatus();
  }

  PreparedJob p_;
  JobExecutor::EmitFn emit_;
  std::shared_ptr<std::atomic<bool>> cancel_;
  AdapterRegistry* registry_;
  std::shared_ptr<const BaseModel> model_;
  BatchTokenizer tokenizer_;  // encoder tasks
  RuntimeJobExecutor::Options options_;
  bool started_ = false;
  absl::Time last_progress_ = absl::InfinitePast();
  std::shared_ptr<const PublishedFamily> base_;
  std::vector<int64_t> new_task_index_;  // add-task: the new tasks' slices
  std::unique_ptr<MetaTTAdapter> adapter_;
  std::unique_ptr<LoraAdapter> lora_;  // form lora
  std::unique_ptr<Trainer> trainer_;
};

}  // namespace

absl::StatusOr<DatasetSpec> DatasetSpecFromRecord(const DatasetRecord& record) {
  // The one JSON reader is server/jobs (DatasetSpecFromJson); the record's own
  // fields fill what an older or hand-written spec_json leaves out.
  json j = json::object();
  if (!record.spec_json.empty()) {
    j = json::parse(record.spec_json, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat("dataset ", record.id, ": spec_json is not a JSON object"));
    }
  }
  if (!j.contains("format") && !record.format.empty()) {
    std::string format = record.format;
    std::transform(format.begin(), format.end(), format.begin(), ::tolower);
    j["format"] = format;
  }
  if (!j.contains("label_kind")) {
    j["label_kind"] = record.regression ? "regression" : "classification";
  }
  auto spec = DatasetSpecFromJson(j.dump());
  if (!spec.ok()) return Prefixed(spec.status(), absl::StrCat("dataset ", record.id));
  if (spec->label_vocab.empty() && spec->label_kind == LabelKind::kClassification) {
    spec->label_vocab = record.label_names;
  }
  spec->origin = absl::StrCat("dataset ", record.id);
  return spec;
}

RuntimeJobExecutor::RuntimeJobExecutor(const Options& options, Store* store,
                                       AdapterRegistry* registry, DeviceScheduler* scheduler,
                                       BatchTokenizer tokenizer)
    : options_(options), store_(store), registry_(registry), scheduler_(scheduler),
      tokenizer_(std::move(tokenizer)) {}

absl::Status RuntimeJobExecutor::Start(const JobRecord& job, EmitFn emit) {
  const JobSpec& spec = job.spec;
  const std::shared_ptr<const BaseModel>& model = scheduler_->base_model();
  const bool decoder = model->is_decoder();
  const int64_t max_positions = decoder ? model->decoder->config().max_position_embeddings
                                        : model->encoder->config().max_position_embeddings;
  if (job.id.empty()) return absl::InvalidArgumentError("id: the job has no id");
  // The spec's own rules (server/jobs/job_validation.h), the same the job
  // manager applied at creation, here against the base model's positions.
  JobLimits limits;
  limits.max_sequence_length = max_positions;
  limits.sequence_limit_name = "max_position_embeddings";
  {
    JobSpec named = spec;  // spec.family is the family's key (store.h FamilyKey)
    named.family = FamilyKeyName(spec.family);
    RETURN_IF_ERROR(ValidateJobSpec(named, limits));
  }
  PreparedJob p;
  p.job = job;
  p.overrides = RecipeOverridesFromSpec(spec);

  auto existing = registry_->Get(spec.family, 0);
  if (spec.kind == JobKind::kAddTask) {
    if (!existing.ok()) return Prefixed(existing.status(), "family");
    const PublishedFamily& fam = **existing;
    if (fam.adapter.is_lora() || fam.adapter->config().form != TTForm::k4Plus1D) {
      return absl::FailedPreconditionError(
          absl::StrCat("family: '", spec.family, "' is ", fam.record.form,
                       "; tasks can only be added to a 4+1d family"));
    }
    for (size_t i = 0; i < spec.tasks.size(); ++i) {
      if (fam.task_by_name.count(spec.tasks[i].task_name)) {
        return absl::AlreadyExistsError(
            absl::StrCat("tasks[", i, "].task_name: '", spec.tasks[i].task_name,
                         "' already exists in family '", spec.family, "'"));
      }
    }
    // The family's form decides the defaults; its structure (ranks,
    // projections, init, alpha) is its own: a spec that asks for another is
    // refused, naming the field, and the job's recipe event shows the family's.
    ASSIGN_OR_RETURN(p.recipe, ResolveJobRecipe(spec, "4+1d"));
    ASSIGN_OR_RETURN(p.recipe, RecipeForAddedTask(std::move(p.recipe), p.overrides,
                                                  fam.adapter->config()));
  } else {
    if (existing.ok()) {
      return absl::AlreadyExistsError(absl::StrCat(
          "family: '", spec.family, "' already exists (add tasks with an ADD_TASK job)"));
    }
    ASSIGN_OR_RETURN(p.recipe, ResolveJobRecipe(spec));
    if (p.recipe.form == "lora") {
      // The adapter fields of the resolved recipe (ranges of user-set values
      // were checked by ValidateJobSpec; the configs' Validate checks the rest).
      ASSIGN_OR_RETURN(p.lora, LoraConfigFromRecipe(p.recipe, model->geometry));
    } else {
      ASSIGN_OR_RETURN(p.config, MetaTTConfigFromRecipe(p.recipe, model->geometry,
                                                        static_cast<int64_t>(spec.tasks.size())));
    }
  }
  // Generation tasks: prompt + completion need more tokens than a sentence.
  if (decoder && !p.overrides.max_length) p.recipe.max_length = kDefaultDecoderMaxLength;
  const Recipe& hp = p.recipe;
  if (hp.max_length > max_positions) {
    return absl::InvalidArgumentError(absl::StrCat(
        "hparams.max_length: the default ", hp.max_length,
        " exceeds the base model's max_position_embeddings=", max_positions));
  }

  // Datasets (parsed here, on the caller's thread).
  for (size_t i = 0; i < spec.tasks.size(); ++i) {
    const JobTaskSpec& ts = spec.tasks[i];
    PreparedTask pt;
    pt.spec = ts;
    const std::string field = absl::StrCat("tasks[", i, "].dataset_id");
    ASSIGN_OR_RETURN(std::optional<GenerationDataset> gen,
                     LoadGenerationDataset(store_, ts.dataset_id, field, options_));
    if (gen.has_value() != decoder) {
      return absl::FailedPreconditionError(absl::StrCat(
          field, ": dataset ", ts.dataset_id, " is ",
          gen.has_value() ? "a generation dataset" : "a classification/regression dataset",
          "; this server holds a ", model->kind_name(), " base model, which trains ",
          decoder ? "generation datasets (label_kind GENERATION)"
                  : "classification/regression datasets"));
    }
    if (decoder) {
      pt.gen_train = std::move(*gen);
      if (!ts.eval_dataset_id.empty()) {
        const std::string eval_field = absl::StrCat("tasks[", i, "].eval_dataset_id");
        ASSIGN_OR_RETURN(std::optional<GenerationDataset> ev,
                         LoadGenerationDataset(store_, ts.eval_dataset_id, eval_field, options_));
        if (!ev.has_value()) {
          return absl::FailedPreconditionError(
              absl::StrCat(eval_field, ": not a generation dataset"));
        }
        pt.gen_eval = std::move(*ev);
      } else if (ts.eval_fraction > 0 && pt.gen_train.size() >= 2) {
        SeededSplit(ts.eval_fraction, hp.seed + i, &pt.gen_train, &pt.gen_eval);
      }
      if (!ts.metric.empty() && ts.metric != "answer_accuracy" && ts.metric != "exact_match") {
        return absl::InvalidArgumentError(absl::StrCat(
            "tasks[", i, "].metric: '", ts.metric,
            "' is not available for a generation task (answer_accuracy, exact_match)"));
      }
      if (ts.metric == "answer_accuracy" && !pt.gen_eval.examples.empty() &&
          !pt.gen_eval.all_answered()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "tasks[", i, "].metric: answer_accuracy needs an 'answer' on every eval record"));
      }
      p.tasks.push_back(std::move(pt));
      continue;
    }
    ASSIGN_OR_RETURN(pt.train,
                     LoadDataset(store_, ts.dataset_id, {}, absl::StrCat("tasks[", i, "].dataset_id"),
                                 options_));
    if (!ts.eval_dataset_id.empty()) {
      ASSIGN_OR_RETURN(pt.eval, LoadDataset(store_, ts.eval_dataset_id, pt.train.label_vocab,
                                            absl::StrCat("tasks[", i, "].eval_dataset_id"),
                                            options_));
      if (pt.eval.label_kind != pt.train.label_kind) {
        return absl::InvalidArgumentError(absl::StrCat(
            "tasks[", i, "].eval_dataset_id: label kind differs from the train set"));
      }
    } else if (ts.eval_fraction > 0 && pt.train.size() >= 2) {
      SeededSplit(ts.eval_fraction, hp.seed + i, &pt.train, &pt.eval);
    } else {
      pt.eval.label_kind = pt.train.label_kind;
      pt.eval.label_vocab = pt.train.label_vocab;
    }
    if (pt.train.label_kind == LabelKind::kClassification && pt.train.num_labels() < 2) {
      return absl::FailedPreconditionError(absl::StrCat(
          "tasks[", i, "].dataset_id: a classification dataset needs at least 2 labels"));
    }
    if (!ts.metric.empty()) {
      RETURN_IF_ERROR(Prefixed(
          ValidateMetricName(ts.metric, pt.train.label_kind == LabelKind::kRegression,
                             pt.train.num_labels()),
          absl::StrCat("tasks[", i, "].metric")));
    }
    p.tasks.push_back(std::move(pt));
  }

  auto cancel = std::make_shared<std::atomic<bool>>(false);
  auto task = std::make_shared<TrainingJob>(std::move(p), std::move(emit), cancel, registry_,
                                            model, tokenizer_, options_);
  {
    std::lock_guard<std::mutex> l(mu_);
    for (auto it = jobs_.begin(); it != jobs_.end();) {
      if (it->second.expired()) {
        cancel_flags_.erase(it->first);
        it = jobs_.erase(it);
      } else {
        ++it;
      }
    }
    jobs_[job.id] = task;
    cancel_flags_[job.id] = cancel;
  }
  return scheduler_->AddTrainingTask(std::move(task));
}

std::string RuntimeJobExecutor::CheckpointDir(const std::string& job_id) const {
  return JobCheckpointDir(options_, job_id);
}

absl::StatusOr<std::vector<JobCheckpointInfo>> RuntimeJobExecutor::ListCheckpoints(
    const std::string& job_id) {
  std::vector<JobCheckpointInfo> out;
  const std::string dir = CheckpointDir(job_id);
  if (dir.empty()) return out;
  std::optional<std::vector<std::string>> stored;  // blob store: what it holds
  if (options_.blobs != nullptr) {
    // Not mirrored: the job may be running here, between a write and its upload.
    ASSIGN_OR_RETURN(stored, FetchCheckpoints(options_.blobs, job_id, dir, /*mirror=*/false));
  }
  ASSIGN_OR_RETURN(std::vector<TrainerCheckpointInfo> all, ListTrainerCheckpoints(dir));
  for (const TrainerCheckpointInfo& c : all) {
    const std::string name = std::filesystem::path(c.path).filename().string();
    if (stored && std::find(stored->begin(), stored->end(), name) == stored->end()) continue;
    out.push_back({c.step, c.total_steps, c.time_unix_ms, c.metrics});
  }
  return out;
}

bool RuntimeJobExecutor::CanResume(const JobRecord& job) {
  const std::string dir = CheckpointDir(job.id);
  if (dir.empty()) return false;
  if (options_.blobs != nullptr) {
    // Another replica's job (its lease ran out) or this one's from before a
    // restart: the checkpoints in the blob store decide.
    auto fetched = FetchCheckpoints(options_.blobs, job.id, dir, /*mirror=*/true);
    if (!fetched.ok() || fetched->empty()) return false;
  }
  return LatestTrainerCheckpoint(dir).has_value();
}

void RuntimeJobExecutor::Cancel(const std::string& job_id) {
  std::lock_guard<std::mutex> l(mu_);
  auto it = cancel_flags_.find(job_id);
  if (it != cancel_flags_.end()) it->second->store(true);
}

}  // namespace metatt
