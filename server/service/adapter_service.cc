#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "server/jobs/task_pages.h"
#include "server/service/handler.h"
#include "server/service/proto_convert.h"
#include "server/service/services.h"

namespace metatt {
namespace {

constexpr size_t kChunkBytes = 64 << 10;

// version 0 = latest, with all its tasks (shared, not copied: a version can
// hold 10^6 task records); NOT_FOUND naming the family / version (another
// tenant's family is NOT_FOUND like a missing one: FamilyAccess).
absl::StatusOr<std::shared_ptr<const FamilyVersionRecord>> FindVersion(FamilyAccess* families,
                                                                       const Caller& caller,
                                                                       const std::string& family,
                                                                       int64_t version) {
  if (family.empty()) return absl::InvalidArgumentError("family: required");
  return families->Version(caller, family, version);
}

// A version as `caller` sees it: the family by the caller's name for it
// (records carry keys: tenants.h FamilyNameFor).
void ToCallerProto(const Caller& caller, const FamilyVersionRecord& v, v1::FamilyVersion* out) {
  ToProto(v, out);
  out->set_family(FamilyNameFor(caller, v.family));
}

// A version holding only its first tasks (FamilyAccess::Version with
// max_tasks): ToProto counts the tasks it holds, the record knows them all.
void ToProtoWithCount(const Caller& caller, const FamilyVersionRecord& head,
                      v1::FamilyVersion* out) {
  ToCallerProto(caller, head, out);
  out->set_task_count(head.task_count);
}

// A family as `caller` sees it (`name`: the caller's name for it, `key`: the
// stored one): its latest version, its warning and `versions`, each holding
// only its first tasks (inlined: only those are read) and their full count.
absl::Status FamilyToProto(FamilyAccess* families, const Caller& caller, const std::string& name,
                           const std::string& key, const std::vector<int64_t>& versions,
                           v1::Family* out) {
  out->set_name(name);
  out->set_latest_version(versions.back());
  out->set_warning(families->Warning(key));
  for (int64_t version : versions) {
    ASSIGN_OR_RETURN(auto head, families->Version(caller, name, version, kInlineFamilyTasks));
    ToProtoWithCount(caller, *head, out->add_versions());
  }
  return absl::OkStatus();
}

// The files of a published version, read from its directory.
absl::StatusOr<std::vector<FamilyFile>> ReadVersionFiles(const FamilyVersionRecord& v) {
  namespace fs = std::filesystem;
  std::error_code ec;
  std::vector<FamilyFile> files;
  if (v.path.empty() || !fs::is_directory(v.path, ec)) {
    return absl::DataLossError(absl::StrCat("family '", v.family, "' version ", v.version,
                                            ": directory '", v.path, "' is missing"));
  }
  for (const auto& entry : fs::directory_iterator(v.path, ec)) {
    if (!entry.is_regular_file()) continue;
    std::ifstream in(entry.path(), std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    files.push_back({entry.path().filename().string(), ss.str()});
  }
  std::sort(files.begin(), files.end(),
            [](const FamilyFile& a, const FamilyFile& b) { return a.name < b.name; });
  return files;
}

}  // namespace

grpc::Status AdapterServiceImpl::ListFamilies(grpc::ServerContext* ctx,
                                              const v1::ListFamiliesRequest*,
                                              v1::ListFamiliesResponse* resp) {
  return Serve(ctx, [&](const Caller& caller) -> absl::Status {
    // Summaries (no task lists), ordered by (family, version): the last
    // record of each family is its latest.
    ASSIGN_OR_RETURN(const auto all, options_.families->ListAll(caller));
    std::map<std::string, const FamilyVersionRecord*> latest;
    for (const auto& v : all) latest[v.family] = &v;
    for (const auto& [key, v] : latest) {
      absl::Status st = FamilyToProto(options_.families, caller, FamilyNameFor(caller, key), key,
                                      {v->version}, resp->add_families());
      if (!st.ok()) return st;
    }
    return absl::OkStatus();
  });
}

grpc::Status AdapterServiceImpl::GetFamily(grpc::ServerContext* ctx,
                                           const v1::GetFamilyRequest* req,
                                           v1::GetFamilyResponse* resp) {
  return Serve(ctx, [&](const Caller& caller) -> absl::Status {
    if (req->family().empty()) return absl::InvalidArgumentError("family: required");
    ASSIGN_OR_RETURN(const auto versions,  // summaries
                     options_.families->Versions(caller, req->family()));
    std::vector<int64_t> numbers;
    for (const auto& v : versions) numbers.push_back(v.version);
    return FamilyToProto(options_.families, caller, req->family(), versions.back().family,
                         numbers, resp->mutable_family());
  });
}

grpc::Status AdapterServiceImpl::ListTasks(grpc::ServerContext* ctx,
                                           const v1::ListTasksRequest* req,
                                           v1::ListTasksResponse* resp) {
  return Serve(ctx, [&](const Caller& caller) -> absl::Status {
    if (req->family().empty()) return absl::InvalidArgumentError("family: required");
    ASSIGN_OR_RETURN(const int64_t version, TaskPageVersion(req->version(), req->page_token()));
    // The one version (cached by FamilyAccess while pages are read), not all.
    ASSIGN_OR_RETURN(const auto v, options_.families->Version(caller, req->family(), version));
    const FamilyVersionRecord& rec = *v;
    ASSIGN_OR_RETURN(const auto page, PageTaskRange(rec, req->page_size(), req->page_token()));
    resp->set_family(FamilyNameFor(caller, rec.family));
    resp->set_version(rec.version);
    resp->set_task_count(static_cast<int64_t>(rec.tasks.size()));
    for (int64_t i = page.begin; i < page.end; ++i) ToProto(rec.tasks[i], resp->add_tasks());
    resp->set_next_page_token(page.next_page_token);
    return absl::OkStatus();
  });
}

grpc::Status AdapterServiceImpl::DeleteTask(grpc::ServerContext* ctx,
                                            const v1::DeleteTaskRequest* req,
                                            v1::DeleteTaskResponse* resp) {
  return Serve(ctx, [&](const Caller& caller) -> absl::Status {
    if (req->task().empty()) return absl::InvalidArgumentError("task: required");
    ASSIGN_OR_RETURN(const auto v, FindVersion(options_.families, caller, req->family(), 0));
    bool found = std::any_of(v->tasks.begin(), v->tasks.end(),
                             [&](const TaskRecord& t) { return t.name == req->task(); });
    if (!found) {
      return absl::NotFoundError(
          absl::StrCat("family '", req->family(), "' has no task '", req->task(), "'"));
    }
    if (options_.catalog == nullptr) {
      return absl::UnimplementedError("DeleteTask: this server has no adapter catalog");
    }
    const std::string& key = v->family;
    ASSIGN_OR_RETURN(const auto nv, options_.catalog->DeleteTask(key, req->task()));
    if (options_.on_family_changed) options_.on_family_changed(key);
    ToCallerProto(caller, nv, resp->mutable_version());
    return absl::OkStatus();
  });
}

grpc::Status AdapterServiceImpl::ExportFamily(grpc::ServerContext* ctx,
                                              const v1::ExportFamilyRequest* req,
                                              grpc::ServerWriter<v1::FamilyChunk>* writer) {
  return Serve(ctx, [&](const Caller& caller) -> absl::Status {
    ASSIGN_OR_RETURN(const auto v,
                     FindVersion(options_.families, caller, req->family(), req->version()));
    absl::StatusOr<std::vector<FamilyFile>> files;
    if (options_.catalog != nullptr) {
      files = options_.catalog->ExportFamily(v->family, v->version);
    } else {
      files = ReadVersionFiles(*v);
    }
    if (!files.ok()) return files.status();
    for (const FamilyFile& f : *files) {
      size_t off = 0;
      do {
        if (ctx->IsCancelled()) return absl::CancelledError("cancelled");
        v1::FamilyChunk c;
        if (off == 0) {
          c.set_file_name(f.name);
          c.set_file_size(static_cast<int64_t>(f.bytes.size()));
        }
        size_t n = std::min(kChunkBytes, f.bytes.size() - off);
        c.set_data(f.bytes.substr(off, n));
        off += n;
        if (!writer->Write(c)) return absl::CancelledError("client went away");
      } while (off < f.bytes.size());
    }
    return absl::OkStatus();
  });
}

grpc::Status AdapterServiceImpl::ImportFamily(grpc::ServerContext* ctx,
                                              grpc::ServerReader<v1::ImportFamilyRequest>* reader,
                                              v1::ImportFamilyResponse* resp) {
  return Serve(ctx, [&](const Caller& caller) -> absl::Status {
    if (auto q = options_.families->CheckImportQuota(caller); !q.ok()) return q;
    v1::ImportFamilyRequest msg;
    std::string family;
    std::vector<FamilyFile> files;
    int64_t total = 0;
    bool first = true;
    while (reader->Read(&msg)) {
      if (msg.part_case() == v1::ImportFamilyRequest::kFamily) {
        if (!first) {
          return absl::InvalidArgumentError("family: only the first message may name the family");
        }
        family = msg.family();
      } else if (msg.part_case() == v1::ImportFamilyRequest::kChunk) {
        const auto& c = msg.chunk();
        if (!c.file_name().empty()) {
          if (c.file_name().find('/') != std::string::npos || c.file_name() == "..") {
            return absl::InvalidArgumentError(
                absl::StrCat("chunk.file_name: '", c.file_name(), "' must be a plain file name"));
          }
          files.push_back({c.file_name(), ""});
        } else if (files.empty()) {
          return absl::InvalidArgumentError("chunk.file_name: the first chunk of a file names it");
        }
        total += static_cast<int64_t>(c.data().size());
        if (total > options_.max_import_bytes) {
          return absl::ResourceExhaustedError(
              absl::StrCat("import exceeds max_import_bytes=", options_.max_import_bytes));
        }
        files.back().bytes += c.data();
      }
      first = false;
    }
    if (files.empty()) return absl::InvalidArgumentError("chunk: no files were sent");
    if (options_.catalog == nullptr) {
      return absl::UnimplementedError("ImportFamily: this server has no adapter catalog");
    }
    // "" = the name in family.json, which the catalog puts in the caller's tenant.
    ASSIGN_OR_RETURN(const auto v, options_.catalog->ImportFamily(FamilyKeyFor(caller, family),
                                                                  files, caller.tenant));
    if (options_.on_family_changed) options_.on_family_changed(v.family);
    ToCallerProto(caller, v, resp->mutable_version());
    return absl::OkStatus();
  });
}

}  // namespace metatt
