#include "server/runtime/runtime.h"

#include <map>
#include <utility>

#include <torch/torch.h>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
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

class RuntimeImpl : public Runtime, public AdapterCatalog {
 public:
  absl::Status Init(const RuntimeOptions& options, Store* store) {
    if (store == nullptr) return absl::InvalidArgumentError("runtime: store is null");
    if (options.num_threads > 0) torch::set_num_threads(static_cast<int>(options.num_threads));
    ASSIGN_OR_RETURN(const std::string model_dir, ResolveModelDir(options.model_dir));
    ASSIGN_OR_RETURN(torch::Device device, ParseDevice(options.device));
    BertEncoder::Options eo;
    eo.model_dir = model_dir;
    eo.device = device;
    ASSIGN_OR_RETURN(std::shared_ptr<BertEncoder> encoder, BertEncoder::Create(eo));
    ASSIGN_OR_RETURN(WordPieceTokenizer tok, WordPieceTokenizer::Create(model_dir));
    auto tokenizer = std::make_shared<const WordPieceTokenizer>(std::move(tok));
    device_ = device.str();
    fingerprint_ = encoder->config().Fingerprint();

    AdapterRegistry::Options ro;
    ro.data_dir = options.data_dir;
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
    ASSIGN_OR_RETURN(scheduler_, DeviceScheduler::Create(so, encoder));

    ScheduledPredictor::Options po;
    po.max_inputs = options.max_predict_inputs;
    predictor_ = std::make_unique<ScheduledPredictor>(po, registry_.get(), scheduler_.get(),
                                                      tokenizer);
    RuntimeJobExecutor::Options jo;
    jo.max_eval_examples = options.max_eval_examples;
    executor_ = std::make_unique<RuntimeJobExecutor>(jo, store, registry_.get(), scheduler_.get(),
                                                     MakeBatchTokenizer(tokenizer));
    return absl::OkStatus();
  }

  ~RuntimeImpl() override { Shutdown(); }

  Predictor* predictor() override { return predictor_.get(); }
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
  int64_t QueueDepth() override { return scheduler_->queue_depth(); }
  int64_t ResidentTasks() override { return registry_->ResidentTasks(); }
  int64_t DeviceMemoryBytes() override { return 0; }

  std::string device() const override { return device_; }
  std::string base_model_fingerprint() const override { return fingerprint_; }
  const std::vector<std::string>& load_warnings() const override { return warnings_; }

  void Shutdown() override {
    if (scheduler_) scheduler_->Shutdown();
  }

 private:
  std::string device_, fingerprint_;
  std::vector<std::string> warnings_;
  // Destruction order: executor and predictor before the scheduler, the
  // scheduler (joins the device thread) before the registry.
  std::unique_ptr<AdapterRegistry> registry_;
  std::unique_ptr<DeviceScheduler> scheduler_;
  std::unique_ptr<ScheduledPredictor> predictor_;
  std::unique_ptr<RuntimeJobExecutor> executor_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Runtime>> Runtime::Create(const RuntimeOptions& options,
                                                         Store* store) {
  auto rt = std::make_unique<RuntimeImpl>();
  RETURN_IF_ERROR(rt->Init(options, store));
  return std::unique_ptr<Runtime>(std::move(rt));
}

}  // namespace metatt
