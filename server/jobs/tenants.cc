#include "server/jobs/tenants.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include <algorithm>
#include <cctype>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "server/jobs/job_validation.h"

namespace metatt {
namespace {

using json = nlohmann::json;

std::array<unsigned char, 32> Sha256(std::string_view bytes) {
  std::array<unsigned char, 32> out{};
  unsigned int len = 0;
  EVP_Digest(bytes.data(), bytes.size(), out.data(), &len, EVP_sha256(), nullptr);
  return out;
}

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

absl::Status CheckKeys(const json& obj, const std::string& where,
                       const std::set<std::string>& allowed) {
  for (const auto& [k, v] : obj.items()) {
    if (allowed.count(k) == 0) {
      return absl::InvalidArgumentError(absl::StrCat(where, ".", k, ": unknown field"));
    }
  }
  return absl::OkStatus();
}

absl::Status ReadQuota(const json& obj, const std::string& where, const char* key,
                       int64_t* out) {
  if (!obj.contains(key)) return absl::OkStatus();
  const json& v = obj[key];
  if (!v.is_number_integer() || v.get<int64_t>() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ".", key, ": must be an integer >= 0 (0 = no limit)"));
  }
  *out = v.get<int64_t>();
  return absl::OkStatus();
}

}  // namespace

std::string HashToken(std::string_view token) {
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned char b : Sha256(token)) {
    out.push_back(hex[b >> 4]);
    out.push_back(hex[b & 15]);
  }
  return out;
}

bool IsValidTenantName(const std::string& s) { return IsValidName(s); }

absl::StatusOr<TenantConfig> TenantConfig::Parse(const std::string& text,
                                                 const TenantQuotas& defaults) {
  json doc = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded() || !doc.is_object()) {
    return absl::InvalidArgumentError("tokens file: not a JSON object");
  }
  RETURN_IF_ERROR(CheckKeys(doc, "tokens file", {"tokens", "tenants"}));
  if (!doc.contains("tokens") || !doc["tokens"].is_array() || doc["tokens"].empty()) {
    return absl::InvalidArgumentError("tokens: a non-empty array of token entries is required");
  }
  TenantConfig cfg;
  cfg.defaults_ = defaults;
  std::set<std::array<unsigned char, 32>> seen;
  for (size_t i = 0; i < doc["tokens"].size(); ++i) {
    const json& e = doc["tokens"][i];
    const std::string where = absl::StrCat("tokens[", i, "]");
    if (!e.is_object()) return absl::InvalidArgumentError(absl::StrCat(where, ": not an object"));
    RETURN_IF_ERROR(CheckKeys(e, where, {"tenant", "role", "token_sha256"}));
    Token t;
    if (!e.contains("tenant") || !e["tenant"].is_string() ||
        !IsValidTenantName(e["tenant"].get<std::string>())) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ".tenant: required, 1-64 characters of letters, digits, '-', '_' or '.'"));
    }
    t.caller.tenant = e["tenant"].get<std::string>();
    const std::string role = e.value("role", std::string("user"));
    if (role != "user" && role != "admin") {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ".role: '", role, "' is not one of user, admin"));
    }
    t.caller.admin = role == "admin";
    const std::string hex = e.contains("token_sha256") && e["token_sha256"].is_string()
                                ? e["token_sha256"].get<std::string>()
                                : "";
    if (hex.size() != 64) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ".token_sha256: required, 64 hex digits (metattctl hash-token prints it)"));
    }
    for (size_t k = 0; k < 32; ++k) {
      int hi = HexValue(hex[2 * k]), lo = HexValue(hex[2 * k + 1]);
      if (hi < 0 || lo < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ".token_sha256: not a hex digest"));
      }
      t.sha256[k] = static_cast<unsigned char>(hi * 16 + lo);
    }
    if (!seen.insert(t.sha256).second) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ".token_sha256: the same token is listed twice"));
    }
    cfg.tokens_.push_back(std::move(t));
  }
  if (doc.contains("tenants")) {
    if (!doc["tenants"].is_object()) {
      return absl::InvalidArgumentError("tenants: must be an object of tenant name -> quotas");
    }
    for (const auto& [name, q] : doc["tenants"].items()) {
      const std::string where = absl::StrCat("tenants.", name);
      if (!IsValidTenantName(name)) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": invalid tenant name"));
      }
      if (!q.is_object()) return absl::InvalidArgumentError(absl::StrCat(where, ": not an object"));
      RETURN_IF_ERROR(CheckKeys(q, where,
                                {"max_concurrent_jobs", "max_queued_jobs", "max_dataset_bytes",
                                 "max_tasks"}));
      TenantQuotas quotas = defaults;
      RETURN_IF_ERROR(ReadQuota(q, where, "max_concurrent_jobs", &quotas.max_concurrent_jobs));
      RETURN_IF_ERROR(ReadQuota(q, where, "max_queued_jobs", &quotas.max_queued_jobs));
      RETURN_IF_ERROR(ReadQuota(q, where, "max_dataset_bytes", &quotas.max_dataset_bytes));
      RETURN_IF_ERROR(ReadQuota(q, where, "max_tasks", &quotas.max_tasks));
      cfg.quotas_[name] = quotas;
    }
  }
  return cfg;
}

absl::StatusOr<TenantConfig> TenantConfig::Load(const std::string& path,
                                                const TenantQuotas& defaults) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("tokens file ", path, ": cannot open"));
  std::stringstream ss;
  ss << in.rdbuf();
  auto cfg = Parse(ss.str(), defaults);
  if (!cfg.ok()) {
    return absl::Status(cfg.status().code(),
                        absl::StrCat("tokens file ", path, ": ", cfg.status().message()));
  }
  return cfg;
}

absl::StatusOr<Caller> TenantConfig::Authenticate(std::string_view token) const {
  if (token.empty()) return absl::UnauthenticatedError("missing bearer token");
  const std::array<unsigned char, 32> h = Sha256(token);
  const Token* match = nullptr;
  // Every entry is compared (no early exit) in constant time.
  for (const Token& t : tokens_) {
    if (CRYPTO_memcmp(t.sha256.data(), h.data(), h.size()) == 0) match = &t;
  }
  if (match == nullptr) return absl::UnauthenticatedError("invalid bearer token");
  return match->caller;
}

TenantQuotas TenantConfig::QuotasFor(const std::string& tenant) const {
  auto it = quotas_.find(tenant);
  return it == quotas_.end() ? defaults_ : it->second;
}

absl::Status NotFoundFor(const std::string& what, const std::string& id) {
  return absl::NotFoundError(absl::StrCat(what, " '", id, "' not found"));
}

std::string FamilyKeyFor(const Caller& caller, const std::string& name) {
  if (name.empty()) return name;
  if (name.find(kFamilyKeySeparator) != std::string::npos) {
    if (caller.admin) return name;  // another tenant's key
    // Always prefixed, so that even tenant "default" cannot reach a key.
    return caller.tenant + kFamilyKeySeparator + name;
  }
  return FamilyKey(caller.tenant, name);
}

std::string FamilyNameFor(const Caller& caller, const std::string& key) {
  return FamilyKeyTenant(key) == caller.tenant ? FamilyKeyName(key) : key;
}

std::string WithFamilyNamesFor(const Caller& caller, std::string text) {
  if (caller.tenant.empty() || caller.tenant == kDefaultTenant) return text;
  const std::string prefix = caller.tenant + kFamilyKeySeparator;
  for (size_t at = text.find(prefix); at != std::string::npos; at = text.find(prefix, at)) {
    text.erase(at, prefix.size());
  }
  return text;
}

absl::StatusOr<int64_t> CountTenantTasks(Store* store, const std::string& tenant) {
  ASSIGN_OR_RETURN(std::vector<FamilyVersionRecord> all, store->ListFamilyVersionSummaries(""));
  std::map<std::string, const FamilyVersionRecord*> latest;
  for (const auto& v : all) {
    if (v.tenant == tenant) latest[v.family] = &v;
  }
  int64_t n = 0;
  for (const auto& [name, v] : latest) n += v->task_count;
  return n;
}

absl::Status CheckTaskQuota(Store* store, const std::string& tenant, const TenantQuotas& quotas,
                            int64_t adding) {
  if (quotas.max_tasks <= 0) return absl::OkStatus();
  ASSIGN_OR_RETURN(int64_t have, CountTenantTasks(store, tenant));
  if (have + adding > quotas.max_tasks) {
    return absl::ResourceExhaustedError(
        absl::StrCat("tenant '", tenant, "' has ", have, " tasks; ", adding,
                     " more would exceed its quota max_tasks=", quotas.max_tasks));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> FamilyAccess::Owner(const std::string& family) {
  {
    absl::MutexLock l(&mu_);
    auto it = owner_.find(family);
    if (it != owner_.end()) return it->second;
  }
  ASSIGN_OR_RETURN(std::vector<FamilyVersionRecord> versions,
                   store_->ListFamilyVersionSummaries(family));
  if (versions.empty()) return NotFoundFor("family", family);
  absl::MutexLock l(&mu_);
  owner_[family] = versions.back().tenant;
  return versions.back().tenant;
}

absl::StatusOr<std::vector<FamilyVersionRecord>> FamilyAccess::Versions(
    const Caller& caller, const std::string& family) {
  ASSIGN_OR_RETURN(std::vector<FamilyVersionRecord> versions,
                   store_->ListFamilyVersionSummaries(FamilyKeyFor(caller, family)));
  if (versions.empty() || !caller.CanSee(versions.back().tenant)) {
    return NotFoundFor("family", family);
  }
  return versions;
}

absl::StatusOr<std::shared_ptr<const FamilyVersionRecord>> FamilyAccess::Version(
    const Caller& caller, const std::string& family, int64_t version, int64_t max_tasks) {
  if (version < 0) return absl::InvalidArgumentError("version: must be >= 0 (0 = latest)");
  // Summaries are cheap: they check visibility and name the latest version.
  ASSIGN_OR_RETURN(std::vector<FamilyVersionRecord> versions, Versions(caller, family));
  const std::string key = versions.back().family;
  const int64_t latest = versions.back().version;
  if (version == 0) version = latest;
  auto summary = std::find_if(versions.begin(), versions.end(),
                              [&](const FamilyVersionRecord& v) { return v.version == version; });
  if (summary == versions.end()) {
    return absl::NotFoundError(absl::StrCat("family '", family, "' has no version ", version,
                                            " (latest is ", latest, ")"));
  }
  // A family deleted and published again reuses its version numbers: a cached
  // record counts only while it is the same publication.
  auto same = [&](const FamilyVersionRecord& c) {
    return c.family == key && c.version == version &&
           c.created_unix_ms == summary->created_unix_ms &&
           c.created_by_job == summary->created_by_job && c.task_count == summary->task_count &&
           c.tenant == summary->tenant;
  };
  // An appended version's first tasks live in its parents: read it whole.
  if (max_tasks >= 0 && summary->parent_version == 0) {  // a few tasks: read alone
    ASSIGN_OR_RETURN(FamilyVersionRecord head,
                     store_->GetFamilyVersionTasks(key, version, 0, max_tasks));
    return std::make_shared<const FamilyVersionRecord>(std::move(head));
  }
  {
    absl::MutexLock l(&mu_);
    for (auto it = cache_.begin(); it != cache_.end(); ++it) {
      if (!same(**it)) continue;
      cache_.splice(cache_.begin(), cache_, it);
      return cache_.front();
    }
  }
  ASSIGN_OR_RETURN(FamilyVersionRecord full, store_->GetFamilyVersionFull(key, version));
  auto record = std::make_shared<const FamilyVersionRecord>(std::move(full));
  absl::MutexLock l(&mu_);
  cache_.push_front(record);
  while (cache_.size() > kCachedVersions) cache_.pop_back();
  return record;
}

absl::StatusOr<std::vector<FamilyVersionRecord>> FamilyAccess::ListAll(const Caller& caller) {
  ASSIGN_OR_RETURN(std::vector<FamilyVersionRecord> all, store_->ListFamilyVersionSummaries(""));
  if (caller.admin) return all;
  std::vector<FamilyVersionRecord> mine;
  for (auto& v : all) {
    if (v.tenant == caller.tenant) mine.push_back(std::move(v));
  }
  return mine;
}

absl::Status FamilyAccess::Check(const Caller& caller, const std::string& family) {
  if (caller.admin) return absl::OkStatus();  // a missing family is the predictor's NOT_FOUND
  auto owner = Owner(FamilyKeyFor(caller, family));
  if (!owner.ok()) {
    return absl::IsNotFound(owner.status()) ? NotFoundFor("family", family) : owner.status();
  }
  if (*owner != caller.tenant) return NotFoundFor("family", family);
  return absl::OkStatus();
}

absl::StatusOr<std::string> FamilyAccess::ResolveForPredict(const Caller& caller,
                                                            const std::string& family) {
  if (!family.empty()) {
    RETURN_IF_ERROR(Check(caller, family));
    return FamilyKeyFor(caller, family);
  }
  if (caller.admin) return family;
  ASSIGN_OR_RETURN(std::vector<FamilyVersionRecord> mine, ListAll(caller));
  std::set<std::string> names;
  for (const auto& v : mine) names.insert(v.family);
  if (names.empty()) return absl::NotFoundError("family: no adapter family has been published");
  if (names.size() > 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("family: required (", names.size(), " families are published)"));
  }
  return *names.begin();
}

void FamilyAccess::NoteLoadWarnings(const std::vector<std::string>& warnings) {
  constexpr std::string_view kPrefix = "family '";
  absl::MutexLock l(&mu_);
  for (const std::string& w : warnings) {
    if (w.rfind(kPrefix, 0) != 0) continue;
    const size_t end = w.find('\'', kPrefix.size());
    if (end == std::string::npos) continue;
    warnings_[w.substr(kPrefix.size(), end - kPrefix.size())] = w.substr(end + 2);
  }
}

std::string FamilyAccess::Warning(const std::string& key) {
  absl::MutexLock l(&mu_);
  auto it = warnings_.find(key);
  return it == warnings_.end() ? std::string() : it->second;
}

absl::Status FamilyAccess::CheckImportQuota(const Caller& caller) {
  if (!quotas_) return absl::OkStatus();
  return CheckTaskQuota(store_, caller.tenant, quotas_(caller.tenant), 1);
}

}  // namespace metatt
