// Tenants: who is calling (Caller), the tokens file that maps bearer tokens
// to tenants (TenantConfig, tokens stored as SHA-256), per-tenant quotas, and
// the ownership rules of adapter families (FamilyAccess). Torch-free and
// gRPC-free: the service layer turns call metadata into a Caller
// (server/service/auth.h) and every manager takes it.
//
// Ownership: every dataset, job and family record carries its tenant; a task
// belongs to its family's tenant. A caller sees only its own tenant's objects
// (another tenant's object is NOT_FOUND with the same message as a missing
// one); an admin sees every tenant's. With authentication off every call is
// Caller::Local(): tenant "default", admin.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "server/store/store.h"

namespace metatt {

inline constexpr char kDefaultTenant[] = "default";

struct Caller {
  std::string tenant = kDefaultTenant;
  bool admin = false;
  // The caller when authentication is off, and of internal calls.
  static Caller Local() { return Caller{kDefaultTenant, true}; }
  // Whether this caller may see an object owned by `owner`.
  bool CanSee(const std::string& owner) const { return admin || owner == tenant; }
};

// Per-tenant quotas; 0 = no limit.
struct TenantQuotas {
  int64_t max_concurrent_jobs = 0;  // unfinished jobs (queued + validating + running)
  int64_t max_queued_jobs = 0;      // jobs waiting in the queue
  int64_t max_dataset_bytes = 0;    // sum of the tenant's dataset sizes
  int64_t max_tasks = 0;            // tasks in the latest versions of the tenant's families
};
using QuotaFn = std::function<TenantQuotas(const std::string& tenant)>;

// Lowercase hex SHA-256 of a token: what the tokens file stores.
std::string HashToken(std::string_view token);
// The one name rule (job_validation.h: IsValidName).
bool IsValidTenantName(const std::string& name);

// The tokens file (JSON):
//   {"tokens":  [{"tenant": "acme", "role": "user", "token_sha256": "<64 hex>"}, ...],
//    "tenants": {"acme": {"max_concurrent_jobs": 2, "max_queued_jobs": 4,
//                         "max_dataset_bytes": 104857600, "max_tasks": 100}}}
// role: user | admin. "tenants" is optional; a missing quota takes `defaults`.
class TenantConfig {
 public:
  static absl::StatusOr<TenantConfig> Parse(const std::string& json_text,
                                            const TenantQuotas& defaults);
  static absl::StatusOr<TenantConfig> Load(const std::string& path, const TenantQuotas& defaults);

  // The caller a bearer token stands for; UNAUTHENTICATED for an unknown one.
  // Compares the token's hash against every entry in constant time.
  absl::StatusOr<Caller> Authenticate(std::string_view token) const;
  TenantQuotas QuotasFor(const std::string& tenant) const;
  size_t num_tokens() const { return tokens_.size(); }

 private:
  struct Token {
    std::array<unsigned char, 32> sha256;
    Caller caller;
  };
  std::vector<Token> tokens_;
  std::map<std::string, TenantQuotas> quotas_;
  TenantQuotas defaults_;
};

// "<what> '<id>' not found": one message for a missing object and for another
// tenant's, so an error never tells that an object exists.
absl::Status NotFoundFor(const std::string& what, const std::string& id);

// Family names are per tenant (store.h FamilyKey): tenant B's "x" is another
// family than tenant A's "x", and looking it up follows the same path whether
// A has one or not. The family a caller names -> its key: the caller's own
// tenant's key; an admin may name another tenant's family by its key
// ("<tenant>~<name>", what an admin's listings show). A non-admin's name with
// '~' becomes a key that no family has and no name rule accepts.
std::string FamilyKeyFor(const Caller& caller, const std::string& name);
// The name a caller sees for a key: its own tenant's families by name, other
// tenants' (an admin's view) by key.
std::string FamilyNameFor(const Caller& caller, const std::string& key);
// `text` (a job's failure reason, an event message) with the keys of the
// caller's own families written as their names ("<tenant>~x" -> "x").
std::string WithFamilyNamesFor(const Caller& caller, std::string text);

// Tasks in the latest versions of `tenant`'s families.
absl::StatusOr<int64_t> CountTenantTasks(Store* store, const std::string& tenant);
// RESOURCE_EXHAUSTED naming max_tasks when `adding` more tasks would pass it.
absl::Status CheckTaskQuota(Store* store, const std::string& tenant, const TenantQuotas& quotas,
                            int64_t adding);

// Ownership of adapter families, read from the Store (family records carry
// their tenant). Owners are cached: a family's tenant never changes.
// Every `family` argument is the name the caller uses (FamilyKeyFor maps it
// to the key); returned records carry keys (FamilyNameFor shows them), and
// errors name the family as the caller named it.
class FamilyAccess {
 public:
  explicit FamilyAccess(Store* store, QuotaFn quotas = nullptr)
      : store_(store), quotas_(std::move(quotas)) {}

  // Versions of `family` (oldest first) as summaries: `tasks` is empty, and
  // task_count says how many there are (Store::ListFamilyVersionSummaries).
  // NOT_FOUND "family '<name>' not found" when it is missing or the caller
  // may not see it.
  absl::StatusOr<std::vector<FamilyVersionRecord>> Versions(const Caller& caller,
                                                            const std::string& family);
  // Every version of every family the caller sees, ordered by (family,
  // version), as summaries (no tasks, task_count set).
  absl::StatusOr<std::vector<FamilyVersionRecord>> ListAll(const Caller& caller);
  // One version (0 = latest) with all its tasks. Versions are immutable, so
  // the last kCachedVersions records read stay cached: paging through a
  // version's tasks parses its task list once. NOT_FOUND as Versions, or
  // "family '<name>' has no version <v> (latest is <n>)".
  // max_tasks >= 0: only the first max_tasks tasks (task_count counts all),
  // parsed alone and not cached (what a listing inlines).
  static constexpr size_t kCachedVersions = 2;
  absl::StatusOr<std::shared_ptr<const FamilyVersionRecord>> Version(const Caller& caller,
                                                                     const std::string& family,
                                                                     int64_t version,
                                                                     int64_t max_tasks = -1);
  // OK when the caller may use `family`, else the NOT_FOUND above.
  absl::Status Check(const Caller& caller, const std::string& family);
  // The key of the family a Predict input names: "" = the caller's only
  // family (an admin's "" is passed on unchanged: the predictor picks the
  // only one).
  absl::StatusOr<std::string> ResolveForPredict(const Caller& caller, const std::string& family);
  // Before an import: RESOURCE_EXHAUSTED when the caller's tenant is at max_tasks.
  absl::Status CheckImportQuota(const Caller& caller);

  // Load problems the registry reported at start-up (AdapterRegistry::LoadAll:
  // "family '<key>' v<N>: cannot be loaded (...); serving v<M>"), kept per
  // family; other strings are ignored. Warning(key): "" when none.
  void NoteLoadWarnings(const std::vector<std::string>& warnings);
  std::string Warning(const std::string& key);

 private:
  absl::StatusOr<std::string> Owner(const std::string& family);  // NOT_FOUND when missing

  Store* store_;
  QuotaFn quotas_;
  absl::Mutex mu_;
  std::map<std::string, std::string> owner_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::string> warnings_ ABSL_GUARDED_BY(mu_);  // key -> load warning
  // Full records, most recently used first (at most kCachedVersions).
  std::list<std::shared_ptr<const FamilyVersionRecord>> cache_ ABSL_GUARDED_BY(mu_);
};

}  // namespace metatt
