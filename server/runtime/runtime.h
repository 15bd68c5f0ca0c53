// The device-owning runtime the gRPC service is wired to. TORCH-FREE header
// (LibTorch ships its own google/protobuf headers): everything LibTorch
// lives behind this interface in runtime.cc, linked PRIVATE.
//
//   RuntimeOptions opts{...};
//   ASSIGN_OR_RETURN(auto rt, Runtime::Create(opts, store));
//   rt->predictor()->Predict(...);            // InferenceService
//   rt->job_executor()->Start(job, emit);     // JobManager
//   rt->catalog()->DeleteTask(...);           // AdapterService
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/runtime/batch_stats.h"
#include "server/runtime/generator_api.h"
#include "server/runtime/model_kind.h"
#include "server/runtime/predictor_api.h"
#include "server/jobs/adapter_catalog.h"
#include "server/store/blob_store.h"
#include "server/store/job_types.h"
#include "server/store/store.h"

namespace metatt {

struct RuntimeOptions {
  std::string model_dir;  // "" = ResolveModelDir rule ($METATT_MODEL_DIR, repo models/)
  std::string device = "auto";  // auto | cpu | cuda | cuda:N
  std::string data_dir = "data";  // families under <data_dir>/families
  // Not owned. Set: family versions, dataset bytes and job checkpoints live
  // in this blob store (server/store/blob_store.h) and data_dir is this
  // replica's read-through cache of them; null: data_dir holds them.
  BlobStore* blobs = nullptr;
  int64_t max_batch_size = 32;   // rows per forward
  int64_t batch_timeout_ms = 2;  // batching window
  int64_t max_queue = 1024;      // queued rows before RESOURCE_EXHAUSTED
  int64_t train_share = 4;       // training steps in a row while no inference waits
  int64_t max_predict_inputs = 1024;  // inputs per Predict call
  int64_t max_eval_examples = 2000;   // per evaluation during training
  // Resumable training checkpoints under <data_dir>/checkpoints/<job id>/
  // every N steps and at each evaluation (0 = none: a job killed mid-way fails
  // on restart). server/training/checkpoint.h.
  int64_t checkpoint_every_steps = 50;
  int64_t num_threads = 0;       // torch intra-op threads (0 = torch default)
  bool base_only_inference = false;  // benchmark baseline: Predict skips the adapter
  // Generation (decoder servers): KV-cache budget of the running sequences,
  // sequences decoded together, waiting requests before RESOURCE_EXHAUSTED,
  // and max_tokens when a request gives none.
  int64_t kv_cache_mb = 1024;
  int64_t max_running_sequences = 32;
  int64_t max_generate_queue = 256;
  int64_t default_max_tokens = 256;
  // Resident stacked task heads: float32 | float16 | bfloat16 (files on disk
  // stay float32; AdapterRegistry::Options::head_dtype).
  std::string head_dtype = "float32";
};

// One loaded family version, for AdapterService (no tensors).
struct FamilyInfo {
  // tasks, ranks (config_json), parameter count: the resident family's own
  // record, shared (never copied: it can hold 10^6 tasks; task_pages.h pages it).
  std::shared_ptr<const FamilyVersionRecord> record;
  int64_t resident_tasks = 0;
  std::string pooling;
  int64_t max_length = 0;
};

class Runtime {
 public:
  virtual ~Runtime() = default;
  // Loads the base model and tokenizer (config.json model_type "llama": a
  // decoder server, BaseModel in base_model.h; else an encoder), reloads every published family
  // (warnings for skipped ones in load_warnings()), starts the device thread.
  static absl::StatusOr<std::unique_ptr<Runtime>> Create(const RuntimeOptions& options,
                                                         Store* store);

  virtual Predictor* predictor() = 0;
  // Generate: the continuous batcher on a decoder server; on an encoder
  // server every call is FAILED_PRECONDITION naming the model kind.
  virtual Generator* generator() = 0;
  // Once per finished generation (metrics).
  virtual void SetGenerationObserver(std::function<void(const GenerationStats&)> observer) {
    (void)observer;
  }
  virtual JobExecutor* job_executor() = 0;
  // DeleteTask (task slices after the removed one move down one index),
  // ExportFamily / ImportFamily with the files "adapter.safetensors"
  // (adapter.<core>, heads.weight [T, max_labels, D], heads.bias) and
  // "family.json" (config, scale, pooling, max_length, tasks, fingerprint).
  virtual AdapterCatalog* catalog() = 0;

  // Latest version of every loaded family.
  virtual std::vector<FamilyInfo> ListFamilies() = 0;
  // version 0 = latest; NOT_FOUND otherwise.
  virtual absl::StatusOr<FamilyInfo> GetFamily(const std::string& family, int64_t version) = 0;
  // Drops a family from memory (call after Store::DeleteFamily).
  virtual void ForgetFamily(const std::string& family) = 0;
  // Several replicas on one store: loads families other replicas published
  // (or drops deleted ones); returns what changed (AdapterRegistry::Refresh).
  virtual absl::StatusOr<std::vector<std::string>> RefreshFamilies() {
    return std::vector<std::string>{};
  }

  // Metrics hooks.
  virtual void SetBatchObserver(BatchObserver observer) = 0;
  virtual int64_t QueueDepth() = 0;     // queued inference rows
  virtual int64_t ResidentTasks() = 0;  // tasks of the latest versions in memory
  virtual int64_t DeviceMemoryBytes() = 0;  // CUDA allocated bytes; 0 on CPU

  // The one base model this process holds: an encoder serves Predict, a
  // decoder Generate; the other RPC is FAILED_PRECONDITION naming the kind.
  virtual ModelKind model_kind() const = 0;
  virtual std::string model_kind_name() const = 0;  // "encoder (bert)", "decoder (llama)"
  virtual std::string device() const = 0;  // "cpu", "cuda:0"
  virtual std::string base_model_fingerprint() const = 0;
  virtual const std::vector<std::string>& load_warnings() const = 0;

  // Stops the device thread: queued predictions fail UNAVAILABLE, the running
  // job stops where it is (the JobManager marks it on restart).
  virtual void Shutdown() = 0;
};

}  // namespace metatt
