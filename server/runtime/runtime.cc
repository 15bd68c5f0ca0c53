#include "server/runtime/runtime.h"

#include <filesystem>
#include <map>
#include <utility>

#include <torch/torch.h>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "server/runtime/base_model.h"
#include "server/runtime/generator.h"
#include "server/runtime/job_executor.h"
#include "server/runtime/predictor.h"
#include "server/runtime/scheduler.h"
#include "server/model/bert_encoder.h"
#include "server/model/model_dir.h"
#include "server/model/tokenizer.h"
#include "server/registry/adapter_registry.h"
#include "server/training/text_batch.h"

namespace metatt {
namespace {

FamilyInfo ToInfo(const std::shared_ptr<const PublishedFamily>& f) {
  FamilyInfo info;
  // Aliases the family: the record stays in place while `info` lives.
  info.record = std::shared_ptr<const FamilyVersionRecord>(f, &f->record);
  info.resident_tasks = f->num_tasks();
  info.pooling = f->pooling_name;
  info.max_length = f->max_length;
  return info;
}

// Predict on a decoder server: refused, naming the model kind (the rule
// lives in one place; the service only maps the status).
class WrongKindPredictor : public Predictor {
 public:
  explicit WrongKindPredictor(std::string kind) : kind_(std::move(kind)) {}
  absl::StatusOr<std::vector<PredictOutput>> Predict(const std::vector<PredictInput>&,
                                                     int64_t) override {
    return absl::FailedPreconditionError(absl::StrCat(
        "Predict: this server holds a ", kind_,
        " base model, which generates text: use Generate (Predict needs a server started "
        "with an encoder --model_dir)"));
  }

 private:
  std::string kind_;
};

// Generate on an encoder server: refused, naming the model kind.
class WrongKindGenerator : public Generator {
 public:
  explicit WrongKindGenerator(std::string kind) : kind_(std::move(kind)) {}
  absl::Status Generate(const GenerateParams&, int64_t, const std::function<bool()>&,
                        const std::function<bool(const GenerateChunk&)>&) override {
    return absl::FailedPreconditionError(absl::StrCat(
        "Generate: this server holds an ", kind_,
        " base model, which classifies and scores text: use Predict (Generate needs a server "
        "started with a decoder --model_dir, e.g. models/SmolLM2-135M-Instruct)"));
  }

 private:
  std::string kind_;
};

class RuntimeImpl : public Runtime, public AdapterCatalog {
 public:
  absl::Status Init(const RuntimeOptions& options, Store* store) {
    if (store == nullptr) return absl::InvalidArgumentError("runtime: store is null");
    if (options.num_threads > 0) torch::set_num_threads(static_cast<int>(options.num_threads));
    ASSIGN_OR_RETURN(const std::string model_dir, ResolveModelDir(options.model_dir));
    ASSIGN_OR_RETURN(torch::Device device, ParseDevice(options.device));
    ASSIGN_OR_RETURN(model_, BaseModel::Load(model_dir, device));
    device_ = device.str();
    fingerprint_ = model_->fingerprint;

    AdapterRegistry::Options ro;
    ro.data_dir = options.data_dir;
    ro.blobs = options.blobs;
    ro.device = device;
    ro.base_model_fingerprint = fingerprint_;
    ro.head_dtype = options.head_dtype;
    ASSIGN_OR_RETURN(registry_, AdapterRegistry::Create(ro, store));
    ASSIGN_OR_RETURN(warnings_, registry_->LoadAll());

    DeviceScheduler::Options so;
    so.max_batch_size = options.max_batch_size;
    so.batch_timeout_ms = options.batch_timeout_ms;
    so.max_queue = options.max_queue;
    so.train_share = options.train_share;
    so.base_only = options.base_only_inference;
    ASSIGN_OR_RETURN(scheduler_, DeviceScheduler::Create(so, model_));

    RuntimeJobExecutor::Options jo;
    jo.max_eval_examples = options.max_eval_examples;
    jo.checkpoint_dir = (std::filesystem::path(options.data_dir) / "checkpoints").string();
    jo.checkpoint_every_steps = options.checkpoint_every_steps;
    jo.blobs = options.blobs;
    jo.dataset_cache_dir = options.data_dir;
    if (model_->is_decoder()) {
      predictor_ = std::make_unique<WrongKindPredictor>(model_->kind_name());
      // The job executor finds the decoder, its BPE tokenizer, geometry and
      // fingerprint in scheduler_->base_model() (generation tasks).
      executor_ = std::make_unique<RuntimeJobExecutor>(jo, store, registry_.get(),
                                                       scheduler_.get(), BatchTokenizer());
      ContinuousBatcher::Options go;
      go.kv_cache_mb = options.kv_cache_mb;
      go.max_running = options.max_running_sequences;
      go.max_queue = options.max_generate_queue;
      go.default_max_tokens = options.default_max_tokens;
      AdapterRegistry* registry = registry_.get();
      auto resolve = [registry](const std::string& family, int64_t version,
                                const std::string& task) {
        return registry->Resolve(family, version, task, -1);
      };
      const std::string kind = model_->kind_name(), fingerprint = fingerprint_;
      // A family in the store that this server did not load: trained on
      // another base model (e.g. an encoder family on a decoder server).
      auto kind_check = [store, kind, fingerprint](const std::string& family) -> absl::Status {
        auto versions = store->ListFamilyVersionSummaries(family);
        if (!versions.ok() || versions->empty()) return absl::OkStatus();
        const FamilyVersionRecord& r = versions->back();
        if (r.base_model_fingerprint == fingerprint) return absl::OkStatus();
        const bool encoder =
            !r.config_json.empty() && r.config_json.find("\"llama\"") == std::string::npos;
        return absl::FailedPreconditionError(absl::StrCat(
            "family '", family, "' was trained on another base model",
            encoder ? " (an encoder family: use Predict on an encoder server)" : "",
            "; this server holds a ", kind, " base model"));
      };
      ASSIGN_OR_RETURN(generator_, ContinuousBatcher::Create(go, model_, scheduler_.get(),
                                                             resolve, kind_check));
    } else {
      wrong_generator_ = std::make_unique<WrongKindGenerator>(model_->kind_name());
      ScheduledPredictor::Options po;
      po.max_inputs = options.max_predict_inputs;
      predictor_ = std::make_unique<ScheduledPredictor>(po, registry_.get(), scheduler_.get(),
                                                        model_->wordpiece);
      executor_ = std::make_unique<RuntimeJobExecutor>(jo, store, registry_.get(),
                                                       scheduler_.get(),
                                                       MakeBatchTokenizer(model_->wordpiece));
    }
    return absl::OkStatus();
  }

  ~RuntimeImpl() override { Shutdown(); }

  Predictor* predictor() override { return predictor_.get(); }
  Generator* generator() override {
    return generator_ ? static_cast<Generator*>(generator_.get()) : wrong_generator_.get();
  }
  void SetGenerationObserver(std::function<void(const GenerationStats&)> observer) override {
    if (generator_) generator_->SetObserver(std::move(observer));
  }
  JobExecutor* job_executor() override { return executor_.get(); }
  AdapterCatalog* catalog() override { return this; }

  // AdapterCatalog. Publishing runs on the device thread (the registry's
  // adapters are only touched there).
  absl::StatusOr<FamilyVersionRecord> DeleteTask(const std::string& family,
                                                 const std::string& task) override {
    absl::StatusOr<std::shared_ptr<const PublishedFamily>> r =
        absl::InternalError("device thread did not run");
    RETURN_IF_ERROR(scheduler_->RunOnDevice([&] { r = registry_->DeleteTask(family, task); }));
    if (!r.ok()) return r.status();
    return (*r)->record;
  }
  absl::StatusOr<std::vector<FamilyFile>> ExportFamily(const std::string& family,
                                                       int64_t version) override {
    ASSIGN_OR_RETURN(auto files, registry_->ExportFiles(family, version));
    std::vector<FamilyFile> out;
    for (auto& [name, bytes] : files) out.push_back({name, std::move(bytes)});
    return out;
  }
  absl::StatusOr<FamilyVersionRecord> ImportFamily(const std::string& family,
                                                   const std::vector<FamilyFile>& files,
                                                   const std::string& tenant) override {
    std::map<std::string, std::string> by_name;
    for (const auto& f : files) by_name[f.name] = f.bytes;
    absl::StatusOr<std::shared_ptr<const PublishedFamily>> r =
        absl::InternalError("device thread did not run");
    RETURN_IF_ERROR(scheduler_->RunOnDevice([&] { r = registry_->Import(family, by_name, tenant); }));
    if (!r.ok()) return r.status();
    return (*r)->record;
  }

  std::vector<FamilyInfo> ListFamilies() override {
    std::vector<FamilyInfo> out;
    for (const auto& f : registry_->Latest()) out.push_back(ToInfo(f));
    return out;
  }
  absl::StatusOr<FamilyInfo> GetFamily(const std::string& family, int64_t version) override {
    ASSIGN_OR_RETURN(std::shared_ptr<const PublishedFamily> f, registry_->Get(family, version));
    return ToInfo(f);
  }
  void ForgetFamily(const std::string& family) override { registry_->Remove(family); }
  absl::StatusOr<std::vector<std::string>> RefreshFamilies() override {
    absl::StatusOr<std::vector<std::string>> r = absl::InternalError("device thread did not run");
    RETURN_IF_ERROR(scheduler_->RunOnDevice([&] { r = registry_->Refresh(); }));
    return r;
  }

  void SetBatchObserver(BatchObserver observer) override {
    scheduler_->SetBatchObserver(std::move(observer));
  }
  int64_t QueueDepth() override {
    return scheduler_->queue_depth() + (generator_ ? generator_->queued() : 0);
  }
  int64_t ResidentTasks() override { return registry_->ResidentTasks(); }
  int64_t DeviceMemoryBytes() override { return 0; }

  ModelKind model_kind() const override { return model_->kind; }
  std::string model_kind_name() const override { return model_->kind_name(); }
  std::string device() const override { return device_; }
  std::string base_model_fingerprint() const override { return fingerprint_; }
  const std::vector<std::string>& load_warnings() const override { return warnings_; }

  void Shutdown() override {
    if (scheduler_) scheduler_->Shutdown();
  }

 private:
  std::string device_, fingerprint_;
  std::vector<std::string> warnings_;
  std::shared_ptr<const BaseModel> model_;
  // Destruction order: executor and predictor before the scheduler, the
  // scheduler (joins the device thread) before the registry.
  std::unique_ptr<AdapterRegistry> registry_;
  std::unique_ptr<DeviceScheduler> scheduler_;
  std::unique_ptr<Predictor> predictor_;
  // The batcher outlives the scheduler's loop: Shutdown() (the destructor)
  // joins the device thread before the members are destroyed.
  std::unique_ptr<ContinuousBatcher> generator_;
  std::unique_ptr<WrongKindGenerator> wrong_generator_;
  std::unique_ptr<JobExecutor> executor_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Runtime>> Runtime::Create(const RuntimeOptions& options,
                                                         Store* store) {
  auto rt = std::make_unique<RuntimeImpl>();
  RETURN_IF_ERROR(rt->Init(options, store));
  return std::unique_ptr<Runtime>(std::move(rt));
}

}  // namespace metatt
