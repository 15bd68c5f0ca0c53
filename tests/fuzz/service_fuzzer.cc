// Fuzz target: the gRPC request handlers (server/service/) with structured
// inputs, in-process, against the real SQLite store, dataset manager (real
// upload parser), job manager, tenants file, authentication interceptor and
// family ownership rules, through an in-process gRPC channel.
//
// Not real here: the job executor (FakeExecutor: a started job is RUNNING
// until cancelled or ended by an op), the predictor (records what reaches it)
// and the adapter catalog (a small one below that publishes families into the
// store without tensors: the real one needs the base model, too slow per exec).
//
// Input: a sequence of ops (tests/fuzz/make_corpus.py writes valid ones):
//   op   := caller:u8 rpc:u8 len:u16le payload[len]
//   caller % 4: 0 tenant "alpha" (user), 1 tenant "beta" (user),
//               2 tenant "ops" (admin), 3 a wrong token
//   payload: the request proto (binary); for a client stream (UploadDataset,
//            ImportFamily) a sequence of len:u16le message[len].
// String fields "$d<k>" / "$j<k>" are replaced by the k-th dataset / job id
// created so far in this input (so ops can refer to each other's objects).
//
// Invariants (FUZZ_CHECK aborts):
//   - every status code is in the documented set (no UNKNOWN, INTERNAL,
//     DATA_LOSS, UNAVAILABLE, ABORTED...): kAllowedCodes below;
//   - the wrong token always gets UNAUTHENTICATED;
//   - no cross-tenant visibility: a user's OK answer never contains a dataset,
//     job or family another tenant created; a user's Get/Cancel/Delete/Stream of
//     another tenant's dataset or job is NOT_FOUND and changes nothing; a
//     user's request naming a family only another tenant has under that name
//     gets exactly the answer for a family nobody has (code and message, the
//     name swapped) and no data; a user's Predict never reaches the predictor
//     with another tenant's family;
//   - after the ops, each user's listings are exactly its own live objects.
// Each input runs on a fresh store in a fresh temporary directory.
// METATT_FUZZ_VERBOSE=1 prints every RPC's caller and status code.
#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>

#include <nlohmann/json.hpp>
#include "server/jobs/adapter_catalog.h"
#include "server/jobs/dataset_manager.h"
#include "server/jobs/dataset_spec_json.h"
#include "server/jobs/job_manager.h"
#include "server/jobs/job_validation.h"
#include "server/jobs/tenants.h"
#include "server/jobs/test_util.h"
#include "server/service/auth.h"
#include "server/service/in_process.h"
#include "server/service/services.h"
#include "server/store/sqlite_store.h"
#include "tests/fuzz/fuzz_check.h"

namespace fs = std::filesystem;

namespace metatt {
namespace {

constexpr const char* kTokens[] = {"alpha-token-0123456789", "beta-token-0123456789",
                                   "ops-admin-token-0123456789", "wrong-token-0123456789"};
constexpr const char* kTenants[] = {"alpha", "beta", "ops"};
constexpr int kAdmin = 2;
constexpr int kWrong = 3;

bool Allowed(grpc::StatusCode c) {
  switch (c) {
    case grpc::StatusCode::OK:
    case grpc::StatusCode::CANCELLED:
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::DEADLINE_EXCEEDED:
    case grpc::StatusCode::NOT_FOUND:
    case grpc::StatusCode::ALREADY_EXISTS:
    case grpc::StatusCode::PERMISSION_DENIED:
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
    case grpc::StatusCode::FAILED_PRECONDITION:
    case grpc::StatusCode::UNIMPLEMENTED:
    case grpc::StatusCode::UNAUTHENTICATED:
      return true;
    default:  // UNKNOWN, INTERNAL, DATA_LOSS, UNAVAILABLE, ABORTED, OUT_OF_RANGE
      return false;
  }
}

// ---- fakes ----------------------------------------------------------------------

// Records every family key a Predict reached, answers one label per input.
class RecordingPredictor : public Predictor {
 public:
  absl::StatusOr<std::vector<PredictOutput>> Predict(const std::vector<PredictInput>& inputs,
                                                     int64_t) override {
    std::lock_guard<std::mutex> l(mu_);
    std::vector<PredictOutput> out;
    for (size_t i = 0; i < inputs.size(); ++i) {
      families_.push_back(inputs[i].family);
      PredictOutput o;
      o.input_index = static_cast<int64_t>(i);
      o.task = inputs[i].task;
      o.label = 0;
      o.scores = {1.0f};
      out.push_back(o);
    }
    return out;
  }
  std::vector<std::string> TakeFamilies() {
    std::lock_guard<std::mutex> l(mu_);
    return std::exchange(families_, {});
  }

 private:
  std::mutex mu_;
  std::vector<std::string> families_;
};

// Publishes families into the store without tensors. family.json must be
// {"name": "<name>", "tasks": ["<task>", ...]} (valid names); the files are
// kept in the version's directory.
class StoreCatalog : public AdapterCatalog {
 public:
  StoreCatalog(Store* store, fs::path dir) : store_(store), dir_(std::move(dir)) {}

  absl::StatusOr<FamilyVersionRecord> DeleteTask(const std::string& family,
                                                 const std::string& task) override {
    auto latest = store_->GetFamilyVersionFull(family, 0);
    if (!latest.ok()) return latest.status();
    FamilyVersionRecord v = *latest;
    std::vector<TaskRecord> kept;
    for (const auto& t : v.tasks) {
      if (t.name != task) kept.push_back(t);
    }
    if (kept.size() == v.tasks.size()) return absl::NotFoundError("no such task");
    v.tasks = kept;
    v.version = latest->version + 1;
    v.parent_version = 0;
    return Publish(v, ReadFiles(latest->path));
  }
  absl::StatusOr<std::vector<FamilyFile>> ExportFamily(const std::string& family,
                                                       int64_t version) override {
    auto v = store_->GetFamilyVersion(family, version);
    if (!v.ok()) return v.status();
    return ReadFiles(v->path);
  }
  absl::StatusOr<FamilyVersionRecord> ImportFamily(const std::string& family,
                                                   const std::vector<FamilyFile>& files,
                                                   const std::string& tenant) override {
    const FamilyFile* meta = nullptr;
    for (const auto& f : files) {
      if (f.name == "family.json") meta = &f;
    }
    if (meta == nullptr) return absl::InvalidArgumentError("family.json: missing");
    auto j = nlohmann::json::parse(meta->bytes, nullptr, /*allow_exceptions=*/false);
    if (!j.is_object() || !j.contains("name") || !j["name"].is_string() ||
        !j.contains("tasks") || !j["tasks"].is_array()) {
      return absl::InvalidArgumentError("family.json: expected {name, tasks}");
    }
    std::string key = family;
    if (key.empty()) {
      const std::string name = j["name"].get<std::string>();
      if (!IsValidName(name)) return absl::InvalidArgumentError("family.json: name");
      key = FamilyKey(tenant, name);
    }
    if (!IsValidName(FamilyKeyName(key))) return absl::InvalidArgumentError("family: name");
    auto existing = store_->ListFamilyVersionSummaries(key);
    if (existing.ok() && !existing->empty()) {
      return absl::AlreadyExistsError("family '" + FamilyKeyName(key) + "' exists");
    }
    FamilyVersionRecord v;
    v.family = key;
    v.version = 1;
    v.form = "4d";
    v.config_json = "{}";
    v.tenant = tenant;
    std::set<std::string> seen;
    for (const auto& t : j["tasks"]) {
      if (!t.is_string() || !IsValidName(t.get<std::string>())) {
        return absl::InvalidArgumentError("family.json: task name");
      }
      if (!seen.insert(t.get<std::string>()).second) {
        return absl::InvalidArgumentError("family.json: duplicate task");
      }
      TaskRecord r;
      r.name = t.get<std::string>();
      r.index = static_cast<int64_t>(v.tasks.size());
      r.num_labels = 2;
      r.label_names = {"0", "1"};
      v.tasks.push_back(r);
    }
    if (v.tasks.empty()) return absl::InvalidArgumentError("family.json: no tasks");
    return Publish(v, files);
  }

 private:
  static std::vector<FamilyFile> ReadFiles(const std::string& path) {
    std::vector<FamilyFile> files;
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(path, ec)) {
      std::ifstream in(e.path(), std::ios::binary);
      std::stringstream ss;
      ss << in.rdbuf();
      files.push_back({e.path().filename().string(), ss.str()});
    }
    return files;
  }
  absl::StatusOr<FamilyVersionRecord> Publish(FamilyVersionRecord v,
                                              const std::vector<FamilyFile>& files) {
    fs::path p = dir_ / ("v" + std::to_string(++counter_));
    fs::create_directories(p);
    for (const auto& f : files) std::ofstream(p / f.name, std::ios::binary) << f.bytes;
    v.path = p.string();
    if (auto st = store_->PublishFamilyVersion(v); !st.ok()) return st;
    return store_->GetFamilyVersion(v.family, v.version);
  }
  Store* store_;
  fs::path dir_;
  int counter_ = 0;
};

// ---- the stack ------------------------------------------------------------------

std::string TokensJson() {
  nlohmann::json j;
  j["tokens"] = nlohmann::json::array();
  for (int i = 0; i < 3; ++i) {
    j["tokens"].push_back({{"tenant", kTenants[i]},
                           {"role", i == kAdmin ? "admin" : "user"},
                           {"token_sha256", HashToken(kTokens[i])}});
  }
  // Small quotas so that their paths are reachable.
  j["tenants"]["alpha"] = {{"max_queued_jobs", 3}, {"max_dataset_bytes", 4096}, {"max_tasks", 6}};
  j["tenants"]["beta"] = {{"max_concurrent_jobs", 2}, {"max_dataset_bytes", 2048}};
  return j.dump();
}

struct Stack {
  fs::path dir;
  std::unique_ptr<SqliteStore> store;
  std::unique_ptr<TenantConfig> tenants;
  std::unique_ptr<Authenticator> auth;
  std::unique_ptr<DatasetManager> datasets;
  FakeExecutor executor;
  RecordingPredictor predictor;
  std::unique_ptr<JobManager> jobs;
  std::unique_ptr<FamilyAccess> families;
  std::unique_ptr<StoreCatalog> catalog;
  std::unique_ptr<Services> services;
  std::unique_ptr<InProcessServer> rpc;

  explicit Stack(const fs::path& root) : dir(root) {
    fs::remove_all(dir);
    fs::create_directories(dir);
    store = std::move(*SqliteStore::Create((dir / "metatt.db").string()));
    auto config = TenantConfig::Parse(TokensJson(), TenantQuotas{});
    FUZZ_CHECK(config.ok());
    tenants = std::make_unique<TenantConfig>(std::move(*config));
    auth = std::make_unique<Authenticator>(tenants.get());
    QuotaFn quotas = [t = tenants.get()](const std::string& tenant) { return t->QuotasFor(tenant); };
    DatasetManagerOptions dopt;
    dopt.data_dir = (dir / "data").string();
    dopt.parse = ParseUploadedDataset;
    dopt.quotas = quotas;
    dopt.max_upload_bytes = 8192;
    dopt.max_labels_per_task = 64;
    datasets = std::move(*DatasetManager::Create(dopt, store.get()));
    JobManagerOptions jopt;
    jopt.max_queued_jobs = 4;
    jopt.quotas = quotas;
    jopt.limits.max_steps = 100000;
    jopt.limits.max_tasks_per_job = 8;
    jopt.limits.max_labels_per_task = 64;
    jopt.max_event_streams = 4;
    jobs = std::move(*JobManager::Create(jopt, store.get(), &executor));
    families = std::make_unique<FamilyAccess>(store.get(), quotas);
    catalog = std::make_unique<StoreCatalog>(store.get(), dir / "families");
    AdapterServiceOptions aopt;
    aopt.store = store.get();
    aopt.catalog = catalog.get();
    aopt.max_import_bytes = 16384;
    aopt.families = families.get();
    InferenceServiceOptions iopt;
    iopt.predictor = &predictor;
    iopt.max_inputs = 16;
    iopt.families = families.get();
    services = std::make_unique<Services>(jobs.get(), datasets.get(), aopt, iopt);
    rpc = std::make_unique<InProcessServer>(services.get(), auth.get());
    FUZZ_CHECK(rpc->server != nullptr);
  }
  ~Stack() {
    jobs->Shutdown();
    rpc->server->Shutdown(std::chrono::system_clock::now());
    jobs.reset();
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
};

// ---- one input ------------------------------------------------------------------

struct Owned {
  std::map<std::string, int> datasets;  // id -> creating caller (0/1/2)
  std::map<std::string, int> jobs;
  std::vector<std::string> dataset_order, job_order;
  std::set<std::string> deleted_datasets;
  std::map<std::string, std::set<int>> families;  // family key -> creator
};

class Runner {
 public:
  Runner(Stack* s) : s_(s) {}

  void Op(int caller, int rpc, const std::string& payload) {
    switch (rpc % 17) {
      case 0: Upload(caller, payload); break;
      case 1: Unary<v1::GetDatasetRequest, v1::GetDatasetResponse>(caller, payload, &Runner::GetDataset); break;
      case 2: ListDatasets(caller); break;
      case 3: Unary<v1::DeleteDatasetRequest, v1::DeleteDatasetResponse>(caller, payload, &Runner::DeleteDataset); break;
      case 4: Unary<v1::CreateJobRequest, v1::CreateJobResponse>(caller, payload, &Runner::CreateJob); break;
      case 5: Unary<v1::GetJobRequest, v1::GetJobResponse>(caller, payload, &Runner::GetJob); break;
      case 6: Unary<v1::ListJobsRequest, v1::ListJobsResponse>(caller, payload, &Runner::ListJobs); break;
      case 7: Unary<v1::CancelJobRequest, v1::CancelJobResponse>(caller, payload, &Runner::CancelJob); break;
      case 8: Unary<v1::ListJobCheckpointsRequest, v1::ListJobCheckpointsResponse>(caller, payload, &Runner::Checkpoints); break;
      case 9: Unary<v1::StreamJobEventsRequest, int>(caller, payload, &Runner::Stream); break;
      case 10: ListFamilies(caller); break;
      case 11: Unary<v1::GetFamilyRequest, v1::GetFamilyResponse>(caller, payload, &Runner::GetFamily); break;
      case 12: Unary<v1::ListTasksRequest, v1::ListTasksResponse>(caller, payload, &Runner::ListTasks); break;
      case 13: Unary<v1::DeleteTaskRequest, v1::DeleteTaskResponse>(caller, payload, &Runner::DeleteTask); break;
      case 14: Unary<v1::ExportFamilyRequest, int>(caller, payload, &Runner::Export); break;
      case 15: Import(caller, payload); break;
      case 16: Unary<v1::PredictRequest, v1::PredictResponse>(caller, payload, &Runner::Predict); break;
    }
  }

  // After the ops: every user's listings hold exactly its own live objects.
  void FinalChecks() {
    for (int c = 0; c < 2; ++c) {
      ListDatasets(c);
      std::set<std::string> want;
      for (const auto& [id, owner] : owned_.datasets) {
        if (owner == c && !owned_.deleted_datasets.count(id)) want.insert(id);
      }
      FUZZ_CHECK(last_listed_datasets_ == want);
      v1::ListJobsRequest lj;
      lj.set_page_size(1000);
      v1::ListJobsResponse r;
      auto st = Call(c, s_->rpc->jobs.get(), &v1::JobService::Stub::ListJobs, lj, &r, nullptr);
      FUZZ_CHECK(st.ok());
      std::set<std::string> jobs_seen, jobs_want;
      for (const auto& j : r.jobs()) jobs_seen.insert(j.id());
      for (const auto& [id, owner] : owned_.jobs) {
        if (owner == c) jobs_want.insert(id);
      }
      FUZZ_CHECK(jobs_seen == jobs_want);
    }
  }

 private:
  void Auth(grpc::ClientContext* ctx, int caller) {
    ctx->AddMetadata("authorization", std::string("Bearer ") + kTokens[caller]);
    ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
  }
  // A unary RPC as `caller`; `name` set: its status checked against the
  // documented set (CheckStatus).
  template <typename Stub, typename Req, typename Resp>
  grpc::Status Call(int caller, Stub* stub,
                    grpc::Status (Stub::*rpc)(grpc::ClientContext*, const Req&, Resp*),
                    const Req& req, Resp* resp, const char* name) {
    grpc::ClientContext ctx;
    Auth(&ctx, caller);
    grpc::Status st = (stub->*rpc)(&ctx, req, resp);
    if (name != nullptr) CheckStatus(caller, st, name);
    return st;
  }
  // A client-streaming RPC as `caller`: `payload` holds its requests, each
  // after a two-byte little-endian length; nothing is sent when one does not
  // parse. Its status is checked against the documented set; the response
  // when it succeeded, else nullopt.
  template <typename Stub, typename Req, typename Resp>
  std::optional<Resp> ClientStream(
      int caller, Stub* stub,
      std::unique_ptr<grpc::ClientWriter<Req>> (Stub::*rpc)(grpc::ClientContext*, Resp*),
      const std::string& payload, const char* name) {
    std::vector<Req> msgs;
    for (size_t off = 0; off + 2 <= payload.size();) {
      size_t n = static_cast<uint8_t>(payload[off]) | (static_cast<uint8_t>(payload[off + 1]) << 8);
      off += 2;
      n = std::min(n, payload.size() - off);
      Req m;
      if (!m.ParseFromString(payload.substr(off, n))) return std::nullopt;
      msgs.push_back(std::move(m));
      off += n;
    }
    grpc::ClientContext ctx;
    Auth(&ctx, caller);
    Resp resp;
    auto w = (stub->*rpc)(&ctx, &resp);
    for (const auto& m : msgs) {
      if (!w->Write(m)) break;
    }
    w->WritesDone();
    grpc::Status st = w->Finish();
    CheckStatus(caller, st, name);
    if (!st.ok()) return std::nullopt;
    return resp;
  }
  bool User(int caller) const { return caller < kAdmin; }
  // The caller that may see an object created by `owner`.
  bool Sees(int caller, int owner) const { return caller == kAdmin || caller == owner; }

  void CheckStatus(int caller, const grpc::Status& st, const char* rpc) {
    static const bool verbose = std::getenv("METATT_FUZZ_VERBOSE") != nullptr;
    if (verbose) {
      std::fprintf(stderr, "  %-20s caller %d: %d %s\n", rpc, caller,
                   static_cast<int>(st.error_code()), st.error_message().substr(0, 100).c_str());
    }
    if (!Allowed(st.error_code())) {
      std::fprintf(stderr, "%s (caller %d): code %d '%s'\n", rpc, caller,
                   static_cast<int>(st.error_code()), st.error_message().c_str());
      FUZZ_CHECK(Allowed(st.error_code()));
    }
    if (caller == kWrong && st.error_code() != grpc::StatusCode::UNAUTHENTICATED) {
      std::fprintf(stderr, "%s with a wrong token: code %d\n", rpc,
                   static_cast<int>(st.error_code()));
      FUZZ_CHECK(st.error_code() == grpc::StatusCode::UNAUTHENTICATED);
    }
  }
  // "$d<k>" / "$j<k>" -> the k-th dataset / job id of this input.
  void Resolve(std::string* s) {
    if (s->size() < 3 || (*s)[0] != '$') return;
    const std::vector<std::string>* v = (*s)[1] == 'd' ? &owned_.dataset_order
                                        : (*s)[1] == 'j' ? &owned_.job_order
                                                         : nullptr;
    if (v == nullptr || v->empty()) return;
    size_t k = static_cast<size_t>(std::atoi(s->c_str() + 2));
    *s = (*v)[k % v->size()];
  }
  // An id another tenant owns (NOT_FOUND expected for a user).
  bool Foreign(int caller, const std::map<std::string, int>& m, const std::string& id) const {
    auto it = m.find(id);
    return User(caller) && it != m.end() && it->second != caller;
  }
  // Another tenant's object is answered like a missing one.
  void NotFoundIfForeign(int caller, const std::map<std::string, int>& m, const std::string& id,
                         const grpc::Status& st) const {
    if (Foreign(caller, m, id)) FUZZ_CHECK(st.error_code() == grpc::StatusCode::NOT_FOUND);
  }

  template <typename Req, typename Resp>
  void Unary(int caller, const std::string& payload,
             void (Runner::*fn)(int, Req*)) {
    Req req;
    if (!req.ParseFromString(payload)) return;
    (this->*fn)(caller, &req);
  }

  // ---- datasets ----
  void Upload(int caller, const std::string& payload) {
    const auto uploaded = ClientStream(caller, s_->rpc->datasets.get(),
                                       &v1::DatasetService::Stub::UploadDataset, payload,
                                       "UploadDataset");
    if (!uploaded) return;
    const std::string& id = uploaded->dataset().id();
    FUZZ_CHECK(!id.empty());
    FUZZ_CHECK(!owned_.datasets.count(id));
    owned_.datasets[id] = caller;
    owned_.dataset_order.push_back(id);
  }
  void GetDataset(int caller, v1::GetDatasetRequest* req) {
    Resolve(req->mutable_dataset_id());
    v1::GetDatasetResponse resp;
    auto st = Call(caller, s_->rpc->datasets.get(), &v1::DatasetService::Stub::GetDataset, *req,
                   &resp, "GetDataset");
    NotFoundIfForeign(caller, owned_.datasets, req->dataset_id(), st);
    if (st.ok()) CheckDatasetVisible(caller, resp.dataset().id());
  }
  void CheckDatasetVisible(int caller, const std::string& id) {
    auto it = owned_.datasets.find(id);
    FUZZ_CHECK(it != owned_.datasets.end());  // only datasets of this input exist
    if (!Sees(caller, it->second)) {
      std::fprintf(stderr, "caller %d sees dataset %s of caller %d\n", caller, id.c_str(),
                   it->second);
      FUZZ_CHECK(Sees(caller, it->second));
    }
    FUZZ_CHECK(!owned_.deleted_datasets.count(id));
  }
  void ListDatasets(int caller) {
    v1::ListDatasetsResponse resp;
    auto st = Call(caller, s_->rpc->datasets.get(), &v1::DatasetService::Stub::ListDatasets,
                   v1::ListDatasetsRequest(), &resp, "ListDatasets");
    last_listed_datasets_.clear();
    for (const auto& d : resp.datasets()) {
      CheckDatasetVisible(caller, d.id());
      last_listed_datasets_.insert(d.id());
    }
  }
  void DeleteDataset(int caller, v1::DeleteDatasetRequest* req) {
    Resolve(req->mutable_dataset_id());
    v1::DeleteDatasetResponse resp;
    auto st = Call(caller, s_->rpc->datasets.get(), &v1::DatasetService::Stub::DeleteDataset, *req,
                   &resp, "DeleteDataset");
    NotFoundIfForeign(caller, owned_.datasets, req->dataset_id(), st);
    if (st.ok()) {
      CheckDatasetVisible(caller, req->dataset_id());
      owned_.deleted_datasets.insert(req->dataset_id());
    }
  }

  // ---- jobs ----
  void CheckJobVisible(int caller, const v1::Job& j) {
    auto it = owned_.jobs.find(j.id());
    FUZZ_CHECK(it != owned_.jobs.end());
    if (!Sees(caller, it->second)) {
      std::fprintf(stderr, "caller %d sees job %s of caller %d\n", caller, j.id().c_str(),
                   it->second);
      FUZZ_CHECK(Sees(caller, it->second));
    }
    // A user's own job names its family by name, never by another tenant's key.
    if (User(caller)) FUZZ_CHECK(j.spec().family().find('~') == std::string::npos);
  }
  void CreateJob(int caller, v1::CreateJobRequest* req) {
    for (auto& t : *req->mutable_spec()->mutable_tasks()) Resolve(t.mutable_dataset_id());
    v1::CreateJobResponse resp;
    auto st = Call(caller, s_->rpc->jobs.get(), &v1::JobService::Stub::CreateJob, *req, &resp,
                   "CreateJob");
    if (User(caller)) {
      for (const auto& t : req->spec().tasks()) {
        // A job may not train on another tenant's dataset.
        if (Foreign(caller, owned_.datasets, t.dataset_id())) FUZZ_CHECK(!st.ok());
      }
    }
    if (st.ok()) {
      const std::string& id = resp.job().id();
      FUZZ_CHECK(!id.empty());
      if (owned_.jobs.count(id)) {  // an idempotent retry: the same caller's job
        FUZZ_CHECK(owned_.jobs[id] == caller || caller == kAdmin);
      } else {
        owned_.jobs[id] = caller;
        owned_.job_order.push_back(id);
      }
      CheckJobVisible(caller, resp.job());
    }
  }
  void GetJob(int caller, v1::GetJobRequest* req) {
    Resolve(req->mutable_job_id());
    v1::GetJobResponse resp;
    auto st =
        Call(caller, s_->rpc->jobs.get(), &v1::JobService::Stub::GetJob, *req, &resp, "GetJob");
    NotFoundIfForeign(caller, owned_.jobs, req->job_id(), st);
    if (st.ok()) CheckJobVisible(caller, resp.job());
  }
  void ListJobs(int caller, v1::ListJobsRequest* req) {
    if (req->page_size() < 0 || req->page_size() > 1000) req->set_page_size(1000);
    v1::ListJobsResponse resp;
    auto st =
        Call(caller, s_->rpc->jobs.get(), &v1::JobService::Stub::ListJobs, *req, &resp, "ListJobs");
    for (const auto& j : resp.jobs()) CheckJobVisible(caller, j);
  }
  void CancelJob(int caller, v1::CancelJobRequest* req) {
    Resolve(req->mutable_job_id());
    const bool foreign = Foreign(caller, owned_.jobs, req->job_id());
    std::string before;
    if (foreign) before = JobState(req->job_id());
    v1::CancelJobResponse resp;
    auto st = Call(caller, s_->rpc->jobs.get(), &v1::JobService::Stub::CancelJob, *req, &resp,
                   "CancelJob");
    if (foreign) {
      FUZZ_CHECK(st.error_code() == grpc::StatusCode::NOT_FOUND);
      // Not cancelled by it (the dispatcher may have started it meanwhile).
      if (before != "CANCELLED") FUZZ_CHECK(JobState(req->job_id()) != "CANCELLED");
    }
    if (st.ok()) CheckJobVisible(caller, resp.job());
  }
  std::string JobState(const std::string& id) {
    grpc::ClientContext ctx;
    Auth(&ctx, kAdmin);
    v1::GetJobRequest req;
    req.set_job_id(id);
    v1::GetJobResponse resp;
    auto st = s_->rpc->jobs->GetJob(&ctx, req, &resp);
    FUZZ_CHECK(st.ok());
    return v1::JobState_Name(resp.job().state());
  }
  void Checkpoints(int caller, v1::ListJobCheckpointsRequest* req) {
    Resolve(req->mutable_job_id());
    v1::ListJobCheckpointsResponse resp;
    auto st = Call(caller, s_->rpc->jobs.get(), &v1::JobService::Stub::ListJobCheckpoints, *req,
                   &resp, "ListJobCheckpoints");
    NotFoundIfForeign(caller, owned_.jobs, req->job_id(), st);
  }
  void Stream(int caller, v1::StreamJobEventsRequest* req) {
    Resolve(req->mutable_job_id());
    const bool foreign = Foreign(caller, owned_.jobs, req->job_id());
    grpc::ClientContext ctx;
    Auth(&ctx, caller);
    // A live job streams until it ends: read what is there for a moment. A
    // foreign job's NOT_FOUND comes at once: a longer deadline, so that a slow
    // (sanitized) run does not turn it into DEADLINE_EXCEEDED.
    ctx.set_deadline(std::chrono::system_clock::now() +
                     std::chrono::milliseconds(foreign ? 5000 : 30));
    auto r = s_->rpc->jobs->StreamJobEvents(&ctx, *req);
    v1::JobEvent e;
    int n = 0;
    bool open = true;
    while (n < 64 && (open = r->Read(&e))) ++n;
    // Cancel only a stream still open after 64 events: cancelling one that
    // ended by itself can race its final status (a wrong token's
    // UNAUTHENTICATED read as CANCELLED).
    if (open) ctx.TryCancel();
    auto st = r->Finish();
    CheckStatus(caller, st, "StreamJobEvents");
    if (foreign) {
      // No event of another tenant's job, and no OK end. (The code is not
      // pinned to NOT_FOUND: the stream's deadline and cancellation can end
      // it first on a slow run.)
      if (n != 0 || st.ok()) {
        std::fprintf(stderr, "foreign stream: %d events, code %d '%s'\n", n,
                     static_cast<int>(st.error_code()), st.error_message().c_str());
      }
      FUZZ_CHECK(n == 0);
      FUZZ_CHECK(!st.ok());
    }
  }

  // ---- families ----
  // The key of a family as `caller` names it (tenants.h FamilyKeyFor).
  std::string KeyFor(int caller, const std::string& name) {
    Caller c{kTenants[caller == kWrong ? 0 : caller], caller == kAdmin};
    return FamilyKeyFor(c, name);
  }
  void CheckFamilyVisible(int caller, const std::string& name_as_seen) {
    const std::string key = KeyFor(caller, name_as_seen);
    if (User(caller)) {
      if (FamilyKeyTenant(key) != kTenants[caller]) {
        std::fprintf(stderr, "caller %d sees family '%s' (key '%s')\n", caller,
                     name_as_seen.c_str(), key.c_str());
        FUZZ_CHECK(FamilyKeyTenant(key) == kTenants[caller]);
      }
    }
    FUZZ_CHECK(owned_.families.count(key));
  }
  void ListFamilies(int caller) {
    v1::ListFamiliesResponse resp;
    auto st = Call(caller, s_->rpc->adapters.get(), &v1::AdapterService::Stub::ListFamilies,
                   v1::ListFamiliesRequest(), &resp, "ListFamilies");
    for (const auto& f : resp.families()) CheckFamilyVisible(caller, f.name());
  }
  // A user naming a family it does not own that another tenant owns under
  // that name: the answer must be the one for a family nobody has (same code,
  // same message with the name swapped), so that no answer tells that it exists.
  bool ForeignFamily(int caller, const std::string& name) {
    if (!User(caller) || name.empty() || owned_.families.count(KeyFor(caller, name))) return false;
    for (const auto& [key, creators] : owned_.families) {
      if (FamilyKeyName(key) == name || key == name) return true;
    }
    return false;
  }
  static std::string Swap(std::string text, const std::string& from, const std::string& to) {
    for (size_t p = 0; !from.empty() && (p = text.find(from, p)) != std::string::npos; p += to.size()) {
      text.replace(p, from.size(), to);
    }
    return text;
  }
  template <typename Req>
  void SameAsMissing(int caller, const Req& req, const grpc::Status& st,
                     grpc::Status (Runner::*call)(int, const Req&, int64_t*)) {
    if (!ForeignFamily(caller, req.family())) return;
    FUZZ_CHECK(!st.ok());
    std::string missing = "zz" + std::string(req.family().size() > 2 ? req.family().size() - 2 : 1, 'q');
    while (owned_.families.count(KeyFor(caller, missing)) || missing == req.family()) missing += "q";
    Req probe = req;
    probe.set_family(missing);
    int64_t items = 0;
    grpc::Status want = (this->*call)(caller, probe, &items);
    const std::string got_msg = Swap(st.error_message(), req.family(), missing);
    if (want.error_code() != st.error_code() || want.error_message() != got_msg) {
      std::fprintf(stderr, "foreign family '%s': %d '%s'; missing '%s': %d '%s'\n",
                   req.family().c_str(), static_cast<int>(st.error_code()),
                   st.error_message().c_str(), missing.c_str(),
                   static_cast<int>(want.error_code()), want.error_message().c_str());
      FUZZ_CHECK(want.error_code() == st.error_code() && want.error_message() == got_msg);
    }
  }
  grpc::Status CallGetFamily(int caller, const v1::GetFamilyRequest& req, int64_t*) {
    v1::GetFamilyResponse resp;
    return Call(caller, s_->rpc->adapters.get(), &v1::AdapterService::Stub::GetFamily, req, &resp,
                nullptr);
  }
  grpc::Status CallListTasks(int caller, const v1::ListTasksRequest& req, int64_t*) {
    v1::ListTasksResponse resp;
    return Call(caller, s_->rpc->adapters.get(), &v1::AdapterService::Stub::ListTasks, req, &resp,
                nullptr);
  }
  grpc::Status CallDeleteTask(int caller, const v1::DeleteTaskRequest& req, int64_t*) {
    v1::DeleteTaskResponse resp;
    return Call(caller, s_->rpc->adapters.get(), &v1::AdapterService::Stub::DeleteTask, req, &resp,
                nullptr);
  }
  grpc::Status CallExport(int caller, const v1::ExportFamilyRequest& req, int64_t* chunks) {
    grpc::ClientContext ctx;
    Auth(&ctx, caller);
    auto r = s_->rpc->adapters->ExportFamily(&ctx, req);
    v1::FamilyChunk c;
    while (r->Read(&c)) ++*chunks;
    return r->Finish();
  }
  void GetFamily(int caller, v1::GetFamilyRequest* req) {
    v1::GetFamilyResponse resp;
    auto st = Call(caller, s_->rpc->adapters.get(), &v1::AdapterService::Stub::GetFamily, *req,
                   &resp, "GetFamily");
    SameAsMissing(caller, *req, st, &Runner::CallGetFamily);
    if (st.ok()) CheckFamilyVisible(caller, req->family());
  }
  void ListTasks(int caller, v1::ListTasksRequest* req) {
    v1::ListTasksResponse resp;
    auto st = Call(caller, s_->rpc->adapters.get(), &v1::AdapterService::Stub::ListTasks, *req,
                   &resp, "ListTasks");
    SameAsMissing(caller, *req, st, &Runner::CallListTasks);
    if (st.ok()) CheckFamilyVisible(caller, resp.family());
  }
  void DeleteTask(int caller, v1::DeleteTaskRequest* req) {
    v1::DeleteTaskResponse resp;
    auto st = Call(caller, s_->rpc->adapters.get(), &v1::AdapterService::Stub::DeleteTask, *req,
                   &resp, "DeleteTask");
    SameAsMissing(caller, *req, st, &Runner::CallDeleteTask);
    if (st.ok()) CheckFamilyVisible(caller, resp.version().family());
  }
  void Export(int caller, v1::ExportFamilyRequest* req) {
    int64_t n = 0;
    auto st = CallExport(caller, *req, &n);
    CheckStatus(caller, st, "ExportFamily");
    if (ForeignFamily(caller, req->family())) FUZZ_CHECK(n == 0);
    SameAsMissing(caller, *req, st, &Runner::CallExport);
    if (st.ok()) CheckFamilyVisible(caller, req->family());
  }
  void Import(int caller, const std::string& payload) {
    const auto imported = ClientStream(caller, s_->rpc->adapters.get(),
                                       &v1::AdapterService::Stub::ImportFamily, payload,
                                       "ImportFamily");
    if (!imported) return;
    const std::string key = KeyFor(caller, imported->version().family());
    // A user's import lands in its own tenant.
    if (User(caller)) FUZZ_CHECK(FamilyKeyTenant(key) == kTenants[caller]);
    owned_.families[key].insert(caller);
  }
  void Predict(int caller, v1::PredictRequest* req) {
    v1::PredictResponse resp;
    auto st = Call(caller, s_->rpc->inference.get(), &v1::InferenceService::Stub::Predict, *req,
                   &resp, "Predict");
    for (const std::string& key : s_->predictor.TakeFamilies()) {
      // What reached the predictor is a family the caller may use.
      if (User(caller) && FamilyKeyTenant(key) != kTenants[caller]) {
        std::fprintf(stderr, "caller %d's Predict reached family '%s'\n", caller, key.c_str());
        FUZZ_CHECK(FamilyKeyTenant(key) == kTenants[caller]);
      }
      if (User(caller)) FUZZ_CHECK(owned_.families.count(key));
    }
  }

  Stack* s_;
  Owned owned_;
  std::set<std::string> last_listed_datasets_;
};

}  // namespace
}  // namespace metatt

namespace {
const fs::path& Root() {
  static const fs::path root = [] {
    const char* t = std::getenv("TMPDIR");
    fs::path base = t != nullptr ? fs::path(t) : fs::temp_directory_path();
    return base / ("metatt_service_fuzz_" + std::to_string(::getpid()));
  }();
  return root;
}
}  // namespace

// One stack up and down before the first input: gRPC, protobuf and SQLite
// allocate their process-wide state then, not inside an input (libFuzzer's
// leak check would take it for a leak of that input).
extern "C" int LLVMFuzzerInitialize(int*, char***) {
  metatt::Stack warm(Root());
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > 1 << 16) return 0;
  metatt::Stack stack(Root());
  metatt::Runner runner(&stack);
  size_t off = 0;
  int ops = 0;
  while (off + 4 <= size && ops < 64) {
    const int caller = data[off] % 4;
    const int rpc = data[off + 1];
    size_t n = data[off + 2] | (data[off + 3] << 8);
    off += 4;
    n = std::min(n, size - off);
    runner.Op(caller, rpc, std::string(reinterpret_cast<const char*>(data + off), n));
    off += n;
    ++ops;
  }
  runner.FinalChecks();
  return 0;
}
