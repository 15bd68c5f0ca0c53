// Test helpers for the registry and the runtime: an in-memory Store and a
// scratch directory.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "server/store/store.h"

namespace metatt {
namespace testing_util {

class InMemoryStore : public Store {
 public:
  absl::Status PutDataset(const DatasetRecord& d) override {
    Put(&datasets_, d);
    return absl::OkStatus();
  }
  absl::StatusOr<DatasetRecord> GetDataset(const std::string& id) override {
    return Find(datasets_, "dataset", id);
  }
  absl::StatusOr<std::vector<DatasetRecord>> ListDatasets() override {
    std::lock_guard<std::mutex> l(mu_);
    std::vector<DatasetRecord> out;
    for (const auto& [k, v] : datasets_) out.push_back(v);
    return out;
  }
  absl::Status DeleteDataset(const std::string& id) override {
    std::lock_guard<std::mutex> l(mu_);
    datasets_.erase(id);
    return absl::OkStatus();
  }
  absl::StatusOr<JobRecord> CreateJob(const JobRecord& j) override {
    Put(&jobs_, j);
    return j;
  }
  absl::Status UpdateJob(const JobRecord& j) override {
    Put(&jobs_, j);
    return absl::OkStatus();
  }
  absl::StatusOr<JobRecord> GetJob(const std::string& id) override {
    return Find(jobs_, "job", id);
  }
  absl::StatusOr<std::vector<JobRecord>> ListJobs(std::optional<JobState> state, int64_t,
                                                  const std::string&,
                                                  std::string* next) override {
    std::lock_guard<std::mutex> l(mu_);
    std::vector<JobRecord> out;
    for (const auto& [k, v] : jobs_) {
      if (!state || v.state == *state) out.push_back(v);
    }
    if (next) next->clear();
    return out;
  }
  absl::Status AppendJobEvent(const std::string& job_id, const JobEvent& e) override {
    std::lock_guard<std::mutex> l(mu_);
    events_[job_id].push_back(e);
    return absl::OkStatus();
  }
  absl::StatusOr<std::vector<JobEvent>> ListJobEvents(const std::string& job_id) override {
    std::lock_guard<std::mutex> l(mu_);
    return events_[job_id];
  }
  absl::Status PublishFamilyVersion(const FamilyVersionRecord& f) override {
    std::lock_guard<std::mutex> l(mu_);
    if (FindVersionLocked(f.family, f.version) != nullptr) {
      return absl::AlreadyExistsError(absl::StrCat(f.family, " v", f.version));
    }
    families_.push_back(f);
    if (f.parent_version == 0) families_.back().task_count = static_cast<int64_t>(f.tasks.size());
    return absl::OkStatus();
  }
  absl::Status CompactFamilyVersion(const std::string& family, int64_t version,
                                    const std::vector<TaskRecord>& tasks) override {
    std::lock_guard<std::mutex> l(mu_);
    FamilyVersionRecord* v = FindVersionLocked(family, version);
    if (v == nullptr) return FamilyVersionNotFound(family, version);
    v->tasks = tasks;
    v->task_count = static_cast<int64_t>(tasks.size());
    v->parent_version = 0;
    return absl::OkStatus();
  }
  absl::StatusOr<std::vector<FamilyVersionRecord>> ListFamilyVersionSummaries(
      const std::string& family) override {
    auto out = ListFamilyVersions(family);
    for (FamilyVersionRecord& s : *out) s.tasks.clear();  // no task list, as the real stores
    return out;
  }
  absl::StatusOr<FamilyVersionRecord> GetFamilyVersion(const std::string& family,
                                                       int64_t version) override {
    std::lock_guard<std::mutex> l(mu_);
    const FamilyVersionRecord* v = FindVersionLocked(family, version);
    if (v == nullptr) return FamilyVersionNotFound(family, version);
    return *v;
  }
  absl::StatusOr<std::vector<FamilyVersionRecord>> ListFamilyVersions(
      const std::string& family) override {
    std::lock_guard<std::mutex> l(mu_);
    std::vector<FamilyVersionRecord> out;
    for (const auto& v : families_) {
      if (family.empty() || v.family == family) out.push_back(v);
    }
    return out;
  }
  absl::Status DeleteFamily(const std::string& family) override {
    std::lock_guard<std::mutex> l(mu_);
    families_.erase(std::remove_if(families_.begin(), families_.end(),
                                   [&](const FamilyVersionRecord& v) { return v.family == family; }),
                    families_.end());
    return absl::OkStatus();
  }

 private:
  // Datasets and jobs by id.
  template <typename Record>
  void Put(std::map<std::string, Record>* records, const Record& r) {
    std::lock_guard<std::mutex> l(mu_);
    (*records)[r.id] = r;
  }
  template <typename Record>
  absl::StatusOr<Record> Find(const std::map<std::string, Record>& records, const char* what,
                              const std::string& id) {
    std::lock_guard<std::mutex> l(mu_);
    auto it = records.find(id);
    if (it == records.end()) return absl::NotFoundError(absl::StrCat(what, " ", id));
    return it->second;
  }

  // The record of `family` v`version`, or null; mu_ held.
  FamilyVersionRecord* FindVersionLocked(const std::string& family, int64_t version) {
    for (auto& v : families_) {
      if (v.family == family && v.version == version) return &v;
    }
    return nullptr;
  }

  std::mutex mu_;
  std::map<std::string, DatasetRecord> datasets_;
  std::map<std::string, JobRecord> jobs_;
  std::map<std::string, std::vector<JobEvent>> events_;
  std::vector<FamilyVersionRecord> families_;
};

// A fresh directory under $TMPDIR, removed by the destructor.
class ScratchDir {
 public:
  ScratchDir() {
    static std::atomic<int> counter{0};
    const char* tmp = std::getenv("TMPDIR");
    path_ = absl::StrCat(tmp ? tmp : "/tmp", "/metatt_test_", getpid(), "_", counter++);
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

}  // namespace testing_util
}  // namespace metatt
