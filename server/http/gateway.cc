#include "server/http/gateway.h"

#include <arpa/inet.h>
#include <grpcpp/grpcpp.h>
#include <httplib.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <memory>
#include <optional>
#include <mutex>
#include <regex>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "base/pem.h"
#include "metatt/v1/adapters.grpc.pb.h"
#include "metatt/v1/datasets.grpc.pb.h"
#include "metatt/v1/inference.grpc.pb.h"
#include "metatt/v1/jobs.grpc.pb.h"
#include "server/http/openai_mapping.h"
#include "server/training/recipe.h"

namespace metatt::http {
namespace {

constexpr size_t kUploadChunk = 256 << 10;
constexpr size_t kMaxFirstLine = 1 << 20;
constexpr size_t kMaxFormField = 4096;

std::pair<std::string, std::string> SplitHostPort(const std::string& listen) {
  size_t colon = listen.rfind(':');
  if (colon == std::string::npos) return {listen, ""};
  std::string host = listen.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  return {host, listen.substr(colon + 1)};
}

void Reply(httplib::Response& res, int status, const Json& body) {
  res.status = status;
  res.set_content(body.dump(), "application/json");
}

void ReplyError(httplib::Response& res, const ApiError& e) {
  Reply(res, e.status, ErrorBody(e));
  if (e.status == 401) res.set_header("WWW-Authenticate", "Bearer");
}

std::optional<int64_t> IntParam(const httplib::Request& req, const std::string& name) {
  if (!req.has_param(name.c_str())) return std::nullopt;
  int64_t v;
  if (!absl::SimpleAtoi(req.get_param_value(name.c_str()), &v)) return std::nullopt;
  return v;
}

bool IsTerminal(v1::JobState s) {
  return s == v1::SUCCEEDED || s == v1::FAILED || s == v1::CANCELLED;
}

// The learning rate a job with `spec` gets when it sets none, which OpenAI's
// learning_rate_multiplier scales: ResolveRecipe's (server/training/recipe.h,
// the one rule) for the spec's form, an added task's being higher. An added
// task's family is 4+1d; an unknown form (refused by the server) reads as
// the default form's.
double DefaultLearningRate(const v1::JobSpec& spec) {
  const bool adds_task = spec.kind() == v1::ADD_TASK;
  RecipeOverrides o;
  o.form = adds_task ? "4+1d" : spec.adapter().form();
  absl::StatusOr<Recipe> r = ResolveRecipe(o, adds_task);
  if (!r.ok()) r = ResolveRecipe(RecipeOverrides{}, adds_task);
  return r.ok() ? r->learning_rate : 0;
}

}  // namespace

bool IsLoopbackAddress(const std::string& listen) {
  const std::string host = absl::AsciiStrToLower(SplitHostPort(listen).first);
  if (host == "localhost") return true;
  in_addr v4{};
  if (inet_pton(AF_INET, host.c_str(), &v4) == 1) return (ntohl(v4.s_addr) >> 24) == 127;
  in6_addr v6{};
  if (inet_pton(AF_INET6, host.c_str(), &v6) == 1) return IN6_IS_ADDR_LOOPBACK(&v6);
  return false;
}

struct Gateway::Impl {
  GatewayOptions o;
  std::unique_ptr<httplib::Server> http;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::JobService::Stub> jobs;
  std::unique_ptr<v1::DatasetService::Stub> datasets;
  std::unique_ptr<v1::AdapterService::Stub> adapters;
  std::unique_ptr<v1::InferenceService::Stub> inference;

  // The caller's bearer token, forwarded as gRPC metadata, and the unary
  // deadline. A header gRPC cannot carry is refused here.
  std::optional<ApiError> Context(const std::string& authorization, grpc::ClientContext* ctx,
                                  bool unary = true) const {
    if (!authorization.empty()) {
      for (char c : authorization) {
        if (c < 0x20 || c > 0x7e) {
          return ApiError{401, "Authorization: malformed header", "", "invalid_api_key"};
        }
      }
      ctx->AddMetadata("authorization", authorization);
    }
    if (unary && o.rpc_timeout_s > 0) {
      ctx->set_deadline(std::chrono::system_clock::now() +
                        std::chrono::milliseconds(static_cast<int64_t>(o.rpc_timeout_s * 1000)));
    }
    return std::nullopt;
  }
  std::optional<ApiError> Context(const httplib::Request& req, grpc::ClientContext* ctx,
                                  bool unary = true) const {
    return Context(req.get_header_value("Authorization"), ctx, unary);
  }

  // One unary RPC, `rpc(ctx)`, with the caller's token and deadline: false
  // once its error (or the token's) was replied.
  template <typename Rpc>
  bool Unary(const httplib::Request& req, httplib::Response& res, Rpc rpc) const {
    grpc::ClientContext ctx;
    if (auto e = Context(req, &ctx)) {
      ReplyError(res, *e);
      return false;
    }
    grpc::Status st = rpc(&ctx);
    if (!st.ok()) {
      ReplyError(res, FromGrpc(st));
      return false;
    }
    return true;
  }
  // The same for `(stub->*rpc)(ctx, request, &response)`: the response, or
  // nullopt once the error was replied.
  template <typename Stub, typename Request, typename Response>
  std::optional<Response> Call(const httplib::Request& req, httplib::Response& res, Stub* stub,
                               grpc::Status (Stub::*rpc)(grpc::ClientContext*, const Request&,
                                                         Response*),
                               const Request& request) const {
    Response resp;
    auto call = [&](grpc::ClientContext* ctx) { return (stub->*rpc)(ctx, request, &resp); };
    if (!Unary(req, res, call)) return std::nullopt;
    return resp;
  }

  JobView View() const { return JobView{o.base_model, DefaultLearningRate}; }

  static std::optional<Json> Body(const httplib::Request& req, httplib::Response& res) {
    Json body = Json::parse(req.body, nullptr, false);
    if (body.is_discarded() || !body.is_object()) {
      ReplyError(res, BadRequest("", "the request body must be a JSON object"));
      return std::nullopt;
    }
    return body;
  }

  void Routes();
  void UploadFile(const httplib::Request& req, httplib::Response& res,
                  const httplib::ContentReader& reader);
  void CreateJob(const httplib::Request& req, httplib::Response& res);
  void ListJobs(const httplib::Request& req, httplib::Response& res);
  void JobEvents(const httplib::Request& req, httplib::Response& res, const std::string& id);
  void ListModels(const httplib::Request& req, httplib::Response& res);
  void GetModel(const httplib::Request& req, httplib::Response& res, const std::string& id);
  void Classify(const httplib::Request& req, httplib::Response& res);
  void Complete(const httplib::Request& req, httplib::Response& res, bool chat);
  void SetGenerateDeadline(grpc::ClientContext* ctx) const {
    if (o.generate_timeout_s > 0) {
      ctx->set_deadline(std::chrono::system_clock::now() +
                        std::chrono::milliseconds(static_cast<int64_t>(o.generate_timeout_s * 1000)));
    }
  }
};

// ---- files ---------------------------------------------------------------------

// Streams the multipart `file` part into UploadDataset as it arrives: the
// first line picks the header (format, text_pair), then 256 KiB chunks
// follow. Form fields `purpose` (must be fine-tune) and `label_kind` are
// read from the other parts (label_kind must come before `file`).
//
// A refused upload's body is still read to its end (at most --max_body_bytes)
// and dropped: httplib keeps the connection alive after the reply, and an
// unread rest of the body would be parsed as the next request on it and
// answered with a bare 400.
void Gateway::Impl::UploadFile(const httplib::Request& req, httplib::Response& res,
                               const httplib::ContentReader& reader) {
  if (!req.is_multipart_form_data()) {
    reader([](const char*, size_t) { return true; });
    return ReplyError(res, BadRequest("file", "POST /v1/files takes multipart/form-data with a "
                                              "`file` part and purpose=fine-tune"));
  }
  grpc::ClientContext ctx;
  if (auto e = Context(req, &ctx, /*unary=*/false)) {
    reader([](const httplib::MultipartFormData&) { return true; },
           [](const char*, size_t) { return true; });
    return ReplyError(res, *e);
  }
  std::map<std::string, std::string> fields;
  std::string part, filename, pending, buffer;
  v1::UploadDatasetResponse resp;
  std::unique_ptr<grpc::ClientWriter<v1::UploadDatasetRequest>> writer;
  std::optional<ApiError> error;
  bool stream_broken = false, saw_file = false;

  auto flush = [&](bool all) {
    while (!stream_broken && (buffer.size() >= kUploadChunk || (all && !buffer.empty()))) {
      size_t n = std::min(buffer.size(), kUploadChunk);
      v1::UploadDatasetRequest c;
      c.set_chunk(buffer.substr(0, n));
      buffer.erase(0, n);
      if (!writer->Write(c)) stream_broken = true;  // Finish() says why
    }
  };
  auto start = [&]() {
    std::string first = pending.substr(0, pending.find('\n'));
    if (!first.empty() && first.back() == '\r') first.pop_back();
    v1::UploadDatasetRequest h;
    const auto kind = fields.find("label_kind");
    if (auto e = DatasetHeaderFor(filename, first, kind == fields.end() ? "" : kind->second,
                                  h.mutable_header())) {
      error = e;
      return;
    }
    writer = datasets->UploadDataset(&ctx, &resp);
    if (!writer->Write(h)) stream_broken = true;
    buffer.swap(pending);
    flush(false);
  };
  auto feed = [&](const char* data, size_t n) {
    if (error || stream_broken) return;  // refused: drop the rest
    if (writer) {
      buffer.append(data, n);
      flush(false);
      return;
    }
    pending.append(data, n);
    if (pending.find('\n') != std::string::npos || pending.size() > kMaxFirstLine) start();
  };

  // The callbacks never stop the read (above: a refused body is dropped).
  reader(
      [&](const httplib::MultipartFormData& f) {
        part = f.name;
        if (error) return true;
        if (part == "file") {
          if (saw_file) {
            error = BadRequest("file", "file: give one file per upload");
            return true;
          }
          saw_file = true;
          filename = f.filename;
        }
        if (part == "purpose" || part == "label_kind") fields[part].clear();
        if (part == "file" && fields.count("purpose") > 0 && fields.at("purpose") != "fine-tune") {
          error = BadRequest("purpose", "purpose: '" + fields["purpose"] +
                                            "' is not supported; use fine-tune");
        }
        return true;
      },
      [&](const char* data, size_t n) {
        if (part == "file") {
          feed(data, n);
        } else if (!error && (part == "purpose" || part == "label_kind")) {
          fields[part].append(data, n);
          if (fields[part].size() > kMaxFormField) error = BadRequest(part, part + ": too long");
        }
        return true;  // other fields are ignored
      });
  if (!error && !saw_file) error = BadRequest("file", "file: required (a multipart part named file)");
  if (!error && (fields.find("purpose") == fields.end() || fields["purpose"] != "fine-tune")) {
    error = BadRequest("purpose", fields.count("purpose")
                                      ? "purpose: '" + fields["purpose"] +
                                            "' is not supported; use fine-tune"
                                      : "purpose: required (fine-tune)");
  }
  if (!error && !writer) start();  // a file of one line, no newline
  if (error) {
    if (writer) ctx.TryCancel();  // nothing is stored: the upload never finishes
    if (writer) (void)writer->Finish();
    return ReplyError(res, *error);
  }
  flush(true);
  writer->WritesDone();
  grpc::Status st = writer->Finish();
  if (!st.ok()) return ReplyError(res, FromGrpc(st));
  Reply(res, 200, FileJson(resp.dataset()));
}

// ---- jobs ----------------------------------------------------------------------------

void Gateway::Impl::CreateJob(const httplib::Request& req, httplib::Response& res) {
  auto body = Body(req, res);
  if (!body) return;
  JobRequest jr;
  if (auto e = ParseJobRequest(*body, &jr)) return ReplyError(res, *e);
  v1::JobSpec* spec = jr.req.mutable_spec();
  std::string form = spec->adapter().form();
  std::string task;
  if (jr.model == o.base_model) {
    // A new family from the base model: suffix = family[:task].
    if (jr.family.empty()) {
      return ReplyError(res, BadRequest("suffix", "suffix: required when training from the base "
                                                  "model: family[:task] names the new family"));
    }
    spec->set_kind(v1::TRAIN_FAMILY);
    spec->set_family(jr.family);
    task = jr.task.empty() ? "default" : jr.task;
  } else {
    // model = family or family:task: add a task to that family.
    std::string family = jr.model, unused;
    if (!SplitModelId(jr.model, &family, &unused)) family = jr.model;
    grpc::ClientContext ctx;
    if (auto e = Context(req, &ctx)) return ReplyError(res, *e);
    v1::GetFamilyRequest gr;
    gr.set_family(family);
    v1::GetFamilyResponse gresp;
    grpc::Status st = adapters->GetFamily(&ctx, gr, &gresp);
    if (st.error_code() == grpc::StatusCode::NOT_FOUND) {
      return ReplyError(res, ApiError{404,
                                      absl::StrCat("The model '", jr.model, "' does not exist: use the base model '",
                                                   o.base_model,
                                                   "' with suffix family[:task] to train a new "
                                                   "family, or a family (GET /v1/models) to add a task to it"),
                                      "model", "model_not_found"});
    }
    if (!st.ok()) return ReplyError(res, FromGrpc(st));
    if (jr.task.empty()) {
      task = jr.family;  // suffix = the new task's name
    } else if (jr.family != family) {
      return ReplyError(res, BadRequest("suffix", absl::StrCat("suffix: names family '", jr.family,
                                                               "' but model names family '",
                                                               family, "'")));
    } else {
      task = jr.task;
    }
    if (task.empty()) {
      return ReplyError(res, BadRequest("suffix", "suffix: required when adding a task to a "
                                                  "family: it names the new task"));
    }
    spec->set_kind(v1::ADD_TASK);
    spec->set_family(family);
    const auto& versions = gresp.family().versions();
    if (form.empty() && !versions.empty()) form = versions[versions.size() - 1].form();
  }
  spec->mutable_tasks(0)->set_task_name(task);

  // OpenAI's relative hyper-parameters onto ours, from the recipe's defaults
  // for the form (server/training/recipe.h, the one copy).
  auto recipe = DefaultRecipe(form.empty() ? DefaultForm() : form);
  if (!recipe.ok()) recipe = DefaultRecipe(DefaultForm());
  v1::HyperParams* h = spec->mutable_hparams();
  if (jr.learning_rate_multiplier) {
    h->set_learning_rate(*jr.learning_rate_multiplier * DefaultLearningRate(*spec));
  }
  if (jr.n_epochs) {
    grpc::ClientContext ctx;
    if (auto e = Context(req, &ctx)) return ReplyError(res, *e);
    v1::GetDatasetRequest dr;
    dr.set_dataset_id(jr.training_file);
    v1::GetDatasetResponse dresp;
    grpc::Status st = datasets->GetDataset(&ctx, dr, &dresp);
    if (!st.ok()) {
      ApiError e = FromGrpc(st);
      if (e.param.empty() || e.param == "file_id") e.param = "training_file";
      return ReplyError(res, e);
    }
    if (!h->has_batch_size()) h->set_batch_size(recipe->batch_size);
    const double steps = std::ceil(*jr.n_epochs * static_cast<double>(dresp.dataset().num_rows()) /
                                   static_cast<double>(std::max<int64_t>(h->batch_size(), 1)));
    h->set_max_steps(std::max<int64_t>(1, static_cast<int64_t>(steps)));
  }
  if (jr.req.idempotency_key().empty() && req.has_header("Idempotency-Key")) {
    jr.req.set_idempotency_key(req.get_header_value("Idempotency-Key"));
  }
  if (auto resp = Call(req, res, jobs.get(), &v1::JobService::Stub::CreateJob, jr.req)) {
    Reply(res, 200, JobJson(resp->job(), View()));
  }
}

// OpenAI's cursor paging (`after` = the last id seen, `limit`) over the
// server's page tokens, in the server's order.
void Gateway::Impl::ListJobs(const httplib::Request& req, httplib::Response& res) {
  const int64_t limit = std::clamp<int64_t>(IntParam(req, "limit").value_or(20), 1, 1000);
  const std::string after = req.has_param("after") ? req.get_param_value("after") : "";
  bool passed = after.empty(), more = false;
  Json data = Json::array();
  v1::ListJobsRequest lr;
  lr.set_page_size(100);
  do {
    v1::ListJobsResponse page;
    if (!Unary(req, res,
               [&](grpc::ClientContext* ctx) { return jobs->ListJobs(ctx, lr, &page); })) {
      return;
    }
    for (const auto& j : page.jobs()) {
      if (!passed) {
        passed = j.id() == after;
        continue;
      }
      if (static_cast<int64_t>(data.size()) == limit) {
        more = true;
        break;
      }
      data.push_back(JobJson(j, View()));
    }
    lr.set_page_token(page.next_page_token());
  } while (!more && !lr.page_token().empty());
  Reply(res, 200, Json{{"object", "list"}, {"data", data}, {"has_more", more}});
}

// The job's events, newest first. StreamJobEvents replays the stored events
// and then follows live ones: a finished job's stream ends by itself; a
// running job's list is what arrived before the stream went quiet
// (events_quiet_ms), and a client polls again for more.
void Gateway::Impl::JobEvents(const httplib::Request& req, httplib::Response& res,
                              const std::string& id) {
  const int64_t limit = std::clamp<int64_t>(IntParam(req, "limit").value_or(20), 1, 10000);
  std::optional<int64_t> after_seq;
  if (req.has_param("after")) {
    after_seq = EventSequence(req.get_param_value("after"));
    if (!after_seq) return ReplyError(res, BadRequest("after", "after: not an event id"));
  }
  grpc::ClientContext ctx;
  if (auto e = Context(req, &ctx, /*unary=*/false)) return ReplyError(res, *e);
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(600));
  v1::StreamJobEventsRequest sr;
  sr.set_job_id(id);
  auto reader = jobs->StreamJobEvents(&ctx, sr);
  std::mutex mu;
  std::condition_variable cv;
  std::vector<v1::JobEvent> events;
  bool done = false;
  grpc::Status st;
  std::thread t([&] {
    v1::JobEvent e;
    while (reader->Read(&e)) {
      std::lock_guard<std::mutex> l(mu);
      events.push_back(e);
      cv.notify_all();
    }
    grpc::Status s = reader->Finish();
    std::lock_guard<std::mutex> l(mu);
    st = s;
    done = true;
    cv.notify_all();
  });
  bool cancelled = false;
  {
    std::unique_lock<std::mutex> l(mu);
    size_t seen = 0;
    while (!done) {
      auto wait = std::chrono::milliseconds(seen == 0 ? 5000 : o.events_quiet_ms);
      if (!cv.wait_for(l, wait, [&] { return done || events.size() > seen; })) break;
      seen = events.size();
      if (seen > 0 && IsTerminal(events.back().has_state() ? events.back().state().state()
                                                           : v1::JOB_STATE_UNSPECIFIED)) {
        break;
      }
    }
    cancelled = !done;
  }
  if (cancelled) ctx.TryCancel();
  t.join();
  if (!st.ok() && !(cancelled && st.error_code() == grpc::StatusCode::CANCELLED) &&
      !(cancelled && st.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED)) {
    return ReplyError(res, FromGrpc(st));
  }
  Json data = Json::array();
  bool more = false;
  for (auto it = events.rbegin(); it != events.rend(); ++it) {
    if (after_seq && it->sequence() >= *after_seq) continue;
    if (static_cast<int64_t>(data.size()) == limit) {
      more = true;
      break;
    }
    data.push_back(EventJson(*it));
  }
  Reply(res, 200, Json{{"object", "list"}, {"data", data}, {"has_more", more}});
}

// ---- models --------------------------------------------------------------------------

// The base model, then every family's tasks as family:task. A family can hold
// 10^6 tasks, so the body is streamed (chunked), one ListTasks page at a time.
void Gateway::Impl::ListModels(const httplib::Request& req, httplib::Response& res) {
  auto families = std::make_shared<v1::ListFamiliesResponse>();
  if (!Unary(req, res, [&](grpc::ClientContext* ctx) {
        return adapters->ListFamilies(ctx, {}, families.get());
      })) {
    return;
  }
  struct State {
    int family = -1;  // -1: the opening and the base model
    std::string page_token;
    bool first_page = true;
    bool first_item = true;
  };
  auto state = std::make_shared<State>();
  const std::string auth = req.get_header_value("Authorization");
  res.status = 200;
  res.set_chunked_content_provider(
      "application/json", [this, families, state, auth](size_t, httplib::DataSink& sink) {
        auto item = [&](const Json& j) {
          std::string s = (state->first_item ? "" : ",") + j.dump();
          state->first_item = false;
          sink.write(s.data(), s.size());
        };
        if (state->family < 0) {
          const char* open = "{\"object\":\"list\",\"data\":[";
          sink.write(open, std::strlen(open));
          item(ModelJson(o.base_model, 0, {{"kind", "base"}}));
          state->family = 0;
          return true;
        }
        if (state->family >= families->families_size()) {
          const char* close = "],\"has_more\":false}";
          sink.write(close, std::strlen(close));
          sink.done();
          return true;
        }
        const v1::Family& f = families->families(state->family);
        if (f.versions_size() == 0) {
          ++state->family;
          return true;
        }
        const v1::FamilyVersion& v = f.versions(f.versions_size() - 1);
        if (v.task_count() <= v.tasks_size()) {
          for (const auto& t : v.tasks()) item(TaskModelJson(v, t));
          ++state->family;
          return true;
        }
        grpc::ClientContext ctx;
        (void)Context(auth, &ctx);
        v1::ListTasksRequest tr;
        tr.set_family(v.family());
        tr.set_version(v.version());
        tr.set_page_size(10000);
        tr.set_page_token(state->page_token);
        v1::ListTasksResponse page;
        grpc::Status st = adapters->ListTasks(&ctx, tr, &page);
        if (!st.ok()) {
          // Mid-stream: the status line is sent; end the body with the error.
          std::string tail = "],\"has_more\":false,\"error\":" + ErrorBody(FromGrpc(st))["error"].dump() + "}";
          sink.write(tail.data(), tail.size());
          sink.done();
          return true;
        }
        for (const auto& t : page.tasks()) item(TaskModelJson(v, t));
        state->page_token = page.next_page_token();
        if (state->page_token.empty()) ++state->family;
        return true;
      });
}

void Gateway::Impl::GetModel(const httplib::Request& req, httplib::Response& res,
                             const std::string& id) {
  if (id == o.base_model) return Reply(res, 200, ModelJson(o.base_model, 0, {{"kind", "base"}}));
  std::string family, task;
  ApiError not_found{404, absl::StrCat("The model '", id, "' does not exist"), "model",
                     "model_not_found"};
  if (!SplitModelId(id, &family, &task)) return ReplyError(res, not_found);
  v1::ListTasksRequest tr;
  tr.set_family(family);
  tr.set_page_size(10000);
  do {
    grpc::ClientContext ctx;
    if (auto e = Context(req, &ctx)) return ReplyError(res, *e);
    v1::ListTasksResponse page;
    grpc::Status st = adapters->ListTasks(&ctx, tr, &page);
    if (st.error_code() == grpc::StatusCode::NOT_FOUND) return ReplyError(res, not_found);
    if (!st.ok()) return ReplyError(res, FromGrpc(st));
    for (const auto& t : page.tasks()) {
      if (t.name() == task) {
        // The version's own record (created time, form).
        grpc::ClientContext fctx;
        (void)Context(req, &fctx);
        v1::GetFamilyRequest gr;
        gr.set_family(family);
        v1::GetFamilyResponse gresp;
        v1::FamilyVersion v;
        v.set_family(family);
        v.set_version(page.version());
        if (adapters->GetFamily(&fctx, gr, &gresp).ok()) {
          for (const auto& fv : gresp.family().versions())
            if (fv.version() == page.version()) v = fv;
        }
        return Reply(res, 200, TaskModelJson(v, t));
      }
    }
    tr.set_version(page.version());
    tr.set_page_token(page.next_page_token());
  } while (!tr.page_token().empty());
  ReplyError(res, not_found);
}

void Gateway::Impl::Classify(const httplib::Request& req, httplib::Response& res) {
  auto body = Body(req, res);
  if (!body) return;
  v1::PredictRequest pr;
  std::vector<std::pair<int, std::string>> rows;
  if (auto e = ParseClassification(*body, &pr, &rows)) return ReplyError(res, *e);
  grpc::ClientContext ctx;
  if (auto e = Context(req, &ctx)) return ReplyError(res, *e);
  v1::PredictResponse resp;
  grpc::Status st = inference->Predict(&ctx, pr, &resp);
  if (!st.ok()) {
    ApiError e = FromGrpc(st);
    if (st.error_code() == grpc::StatusCode::NOT_FOUND) {
      e.param = "model";
      e.code = "model_not_found";
    }
    return ReplyError(res, e);
  }
  Json out = ClassificationJson(resp, rows);
  out["model"] = (*body)["model"];
  Reply(res, 200, out);
}

// ---- chat and text completions ----------------------------------------------------------

namespace {

std::string NewCompletionId(bool chat) {
  static std::atomic<uint64_t> counter{0};
  static const uint64_t boot = static_cast<uint64_t>(
      std::chrono::system_clock::now().time_since_epoch().count());
  char buf[40];
  std::snprintf(buf, sizeof(buf), "%012llx%08llx",
                static_cast<unsigned long long>(boot & 0xffffffffffffull),
                static_cast<unsigned long long>(counter.fetch_add(1)));
  return std::string(chat ? "chatcmpl-" : "cmpl-") + buf;
}

// One streamed completion: the GenerateStream call and what has gone out.
// The reader is declared after the context so it is destroyed first.
struct CompletionStream {
  grpc::ClientContext ctx;
  std::unique_ptr<grpc::ClientReader<v1::GenerateChunk>> reader;
  std::optional<v1::GenerateChunk> pending;  // read before the status line went out
  bool first = true;                         // the next chunk carries delta.role
  bool finished = false;                     // Finish() called
  v1::GenerateUsage usage;
};

}  // namespace

// POST /v1/chat/completions and /v1/completions onto Generate (unary) or
// GenerateStream (stream: true, as server-sent events). The first chunk is
// read before the HTTP status goes out, so a refused request (unknown model,
// bad parameter, a model of the other kind) is an ordinary error response;
// a failure after that ends the event stream with an error event. When the
// HTTP client goes away mid-stream, the next write fails and the gRPC call is
// cancelled, which frees the sequence's slot on the server.
void Gateway::Impl::Complete(const httplib::Request& req, httplib::Response& res, bool chat) {
  auto body = Body(req, res);
  if (!body) return;
  auto cr = std::make_shared<CompletionRequest>();
  if (auto e = ParseCompletionRequest(*body, chat, o.base_model, cr.get())) {
    return ReplyError(res, *e);
  }
  const std::string id = NewCompletionId(chat);
  const int64_t created = std::chrono::duration_cast<std::chrono::seconds>(
                              std::chrono::system_clock::now().time_since_epoch())
                              .count();
  if (!cr->stream) {
    grpc::ClientContext ctx;
    if (auto e = Context(req, &ctx, /*unary=*/false)) return ReplyError(res, *e);
    SetGenerateDeadline(&ctx);
    v1::GenerateResponse resp;
    grpc::Status st = inference->Generate(&ctx, cr->req, &resp);
    if (!st.ok()) return ReplyError(res, GenerateError(st, *cr));
    return Reply(res, 200, CompletionJson(resp, *cr, id, created));
  }

  auto s = std::make_shared<CompletionStream>();
  if (auto e = Context(req, &s->ctx, /*unary=*/false)) return ReplyError(res, *e);
  SetGenerateDeadline(&s->ctx);
  s->reader = inference->GenerateStream(&s->ctx, cr->req);
  v1::GenerateChunk first;
  if (s->reader->Read(&first)) {
    s->pending = std::move(first);
  } else {
    s->finished = true;
    grpc::Status st = s->reader->Finish();
    if (!st.ok()) return ReplyError(res, GenerateError(st, *cr));
  }
  res.status = 200;
  res.set_header("Cache-Control", "no-cache");
  res.set_header("X-Accel-Buffering", "no");
  res.set_chunked_content_provider(
      "text/event-stream",
      [s, cr, id, created](size_t, httplib::DataSink& sink) {
        auto send = [&](const std::string& data) {
          const std::string ev = SseEvent(data);
          return sink.write(ev.data(), ev.size());
        };
        v1::GenerateChunk c;
        bool have = false;
        if (s->pending) {
          c = std::move(*s->pending);
          s->pending.reset();
          have = true;
        } else if (!s->finished) {
          have = s->reader->Read(&c);
        }
        if (have) {
          if (!c.finish_reason().empty()) s->usage = c.usage();
          const bool first = s->first;
          s->first = false;
          // false: the client is gone; the releaser cancels the call.
          return send(CompletionChunkJson(c, *cr, id, created, first).dump());
        }
        if (!s->finished) {
          s->finished = true;
          grpc::Status st = s->reader->Finish();
          if (!st.ok()) {
            send(ErrorBody(GenerateError(st, *cr)).dump());
            sink.done();
            return true;
          }
        }
        if (cr->include_usage) send(UsageChunkJson(s->usage, *cr, id, created).dump());
        send("[DONE]");
        sink.done();
        return true;
      },
      [s](bool) {
        if (s->finished) return;
        s->ctx.TryCancel();
        v1::GenerateChunk drain;
        while (s->reader->Read(&drain)) {
        }
        s->finished = true;
        (void)s->reader->Finish();
      });
}

// ---- routes ----------------------------------------------------------------------------

void Gateway::Impl::Routes() {
  httplib::Server& s = *http;
  s.Post("/v1/files", [this](const httplib::Request& req, httplib::Response& res,
                             const httplib::ContentReader& reader) { UploadFile(req, res, reader); });
  s.Get("/v1/files", [this](const httplib::Request& req, httplib::Response& res) {
    auto resp = Call(req, res, datasets.get(), &v1::DatasetService::Stub::ListDatasets,
                     v1::ListDatasetsRequest());
    if (!resp) return;
    Json data = Json::array();
    for (const auto& d : resp->datasets()) data.push_back(FileJson(d));
    Reply(res, 200, Json{{"object", "list"}, {"data", data}, {"has_more", false}});
  });
  s.Get(R"(/v1/files/([^/]+))", [this](const httplib::Request& req, httplib::Response& res) {
    v1::GetDatasetRequest r;
    r.set_dataset_id(req.matches[1]);
    if (auto resp = Call(req, res, datasets.get(), &v1::DatasetService::Stub::GetDataset, r)) {
      Reply(res, 200, FileJson(resp->dataset()));
    }
  });
  s.Delete(R"(/v1/files/([^/]+))", [this](const httplib::Request& req, httplib::Response& res) {
    v1::DeleteDatasetRequest r;
    r.set_dataset_id(req.matches[1]);
    if (Call(req, res, datasets.get(), &v1::DatasetService::Stub::DeleteDataset, r)) {
      Reply(res, 200, Json{{"id", req.matches[1]}, {"object", "file"}, {"deleted", true}});
    }
  });

  s.Post("/v1/fine_tuning/jobs",
         [this](const httplib::Request& req, httplib::Response& res) { CreateJob(req, res); });
  s.Get("/v1/fine_tuning/jobs",
        [this](const httplib::Request& req, httplib::Response& res) { ListJobs(req, res); });
  s.Get(R"(/v1/fine_tuning/jobs/([^/]+))", [this](const httplib::Request& req,
                                                  httplib::Response& res) {
    v1::GetJobRequest r;
    r.set_job_id(req.matches[1]);
    if (auto resp = Call(req, res, jobs.get(), &v1::JobService::Stub::GetJob, r)) {
      Reply(res, 200, JobJson(resp->job(), View()));
    }
  });
  auto cancel = [this](const httplib::Request& req, httplib::Response& res, const std::string& id) {
    v1::CancelJobRequest r;
    r.set_job_id(id);
    if (auto resp = Call(req, res, jobs.get(), &v1::JobService::Stub::CancelJob, r)) {
      Reply(res, 200, JobJson(resp->job(), View()));
    }
  };
  s.Post(R"(/v1/fine_tuning/jobs/([^/]+)/cancel)",
         [cancel](const httplib::Request& req, httplib::Response& res) {
           cancel(req, res, req.matches[1]);
         });
  // `curl -X POST .../cancel` sends no body and no Content-Length, and
  // cpp-httplib would read such a POST body until the connection closes:
  // answer body-less cancels before routing reads anything.
  s.set_pre_routing_handler([cancel](const httplib::Request& req, httplib::Response& res) {
    static const std::regex kCancel(R"(/v1/fine_tuning/jobs/([^/]+)/cancel)");
    std::smatch m;
    if (req.method != "POST" || req.has_header("Content-Length") ||
        req.has_header("Transfer-Encoding") || !std::regex_match(req.path, m, kCancel)) {
      return httplib::Server::HandlerResponse::Unhandled;
    }
    cancel(req, res, m[1]);
    return httplib::Server::HandlerResponse::Handled;
  });
  s.Get(R"(/v1/fine_tuning/jobs/([^/]+)/events)",
        [this](const httplib::Request& req, httplib::Response& res) {
          JobEvents(req, res, req.matches[1]);
        });
  // Resumable checkpoints, newest first (OpenAI's order).
  s.Get(R"(/v1/fine_tuning/jobs/([^/]+)/checkpoints)",
        [this](const httplib::Request& req, httplib::Response& res) {
          v1::ListJobCheckpointsRequest r;
          r.set_job_id(req.matches[1]);
          auto resp = Call(req, res, jobs.get(), &v1::JobService::Stub::ListJobCheckpoints, r);
          if (!resp) return;
          Json data = Json::array();
          for (int i = resp->checkpoints_size() - 1; i >= 0; --i) {
            data.push_back(CheckpointJson(resp->checkpoints(i)));
          }
          Json out{{"object", "list"}, {"data", data}, {"has_more", false}};
          out["first_id"] = data.empty() ? Json(nullptr) : data.front()["id"];
          out["last_id"] = data.empty() ? Json(nullptr) : data.back()["id"];
          Reply(res, 200, out);
        });

  s.Get("/v1/models",
        [this](const httplib::Request& req, httplib::Response& res) { ListModels(req, res); });
  s.Get(R"(/v1/models/(.+))", [this](const httplib::Request& req, httplib::Response& res) {
    GetModel(req, res, req.matches[1]);
  });
  s.Post("/v1/classifications",
         [this](const httplib::Request& req, httplib::Response& res) { Classify(req, res); });

  // Decoder families: chat and text completions, unary or streamed (SSE).
  s.Post("/v1/chat/completions", [this](const httplib::Request& req, httplib::Response& res) {
    Complete(req, res, /*chat=*/true);
  });
  s.Post("/v1/completions", [this](const httplib::Request& req, httplib::Response& res) {
    Complete(req, res, /*chat=*/false);
  });

  s.Get("/healthz", [](const httplib::Request&, httplib::Response& res) {
    Reply(res, 200, Json{{"status", "ok"}});
  });

  s.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;
    if (res.status == 404) {
      return ReplyError(res, ApiError{404,
                                      absl::StrCat("Unknown request URL: ", req.method, " ",
                                                   req.path),
                                      "", "unknown_url"});
    }
    ReplyError(res, ApiError{res.status, absl::StrCat("HTTP ", res.status), "", ""});
  });
  s.set_exception_handler(
      [](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
        std::string what = "internal error";
        try {
          std::rethrow_exception(ep);
        } catch (const std::exception& e) {
          what = e.what();
        } catch (...) {
        }
        ReplyError(res, ApiError{500, what, "", "internal"});
      });
  s.set_logger([](const httplib::Request& req, const httplib::Response& res) {
    std::fprintf(stderr, "http %s %s -> %d\n", req.method.c_str(), req.path.c_str(), res.status);
  });
}

// ---- Gateway ---------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<Gateway>> Gateway::Create(const GatewayOptions& o) {
  auto impl = std::make_unique<Impl>();
  impl->o = o;
  const bool tls = !o.tls_cert.empty() || !o.tls_key.empty();
  if (tls && (o.tls_cert.empty() || o.tls_key.empty())) {
    return absl::InvalidArgumentError("--tls_cert and --tls_key: give both");
  }
  if (!o.tls_client_ca.empty() && !tls) {
    return absl::InvalidArgumentError("--tls_client_ca: needs --tls_cert/--tls_key");
  }
  if (!IsLoopbackAddress(o.listen) && !tls) {
    if (!o.insecure_allow_open_network) {
      return absl::FailedPreconditionError(absl::StrCat(
          "--listen=", o.listen, " is not a loopback address and the gateway has no TLS "
          "(--tls_cert/--tls_key): bearer tokens would cross the network in plaintext. Add TLS, "
          "listen on 127.0.0.1, or pass --insecure_allow_open_network to accept the risk"));
    }
    std::fprintf(stderr,
                 "WARNING: --insecure_allow_open_network: --listen=%s serves plaintext HTTP to the "
                 "network\n",
                 o.listen.c_str());
  }
  if (!IsLoopbackAddress(o.server) && o.server_tls_ca.empty()) {
    if (!o.insecure_allow_open_network) {
      return absl::FailedPreconditionError(absl::StrCat(
          "--server=", o.server, " is not a loopback address and --server_tls_ca is not set: "
          "bearer tokens would reach metatt-server in plaintext. Add --server_tls_ca, or pass "
          "--insecure_allow_open_network"));
    }
  }
  for (const auto& [flag, path] : {std::pair<const char*, std::string>{"tls_cert", o.tls_cert},
                                   {"tls_key", o.tls_key},
                                   {"tls_client_ca", o.tls_client_ca}}) {
    if (!path.empty()) {
      auto pem = ReadPem(flag, path);
      if (!pem.ok()) return pem.status();
    }
  }
  if (tls) {
    auto server = std::make_unique<httplib::SSLServer>(
        o.tls_cert.c_str(), o.tls_key.c_str(),
        o.tls_client_ca.empty() ? nullptr : o.tls_client_ca.c_str());
    if (!server->is_valid()) {
      return absl::InvalidArgumentError(
          "--tls_cert/--tls_key/--tls_client_ca: OpenSSL refused them (a key that does not match "
          "the certificate?)");
    }
    impl->http = std::move(server);
  } else {
    impl->http = std::make_unique<httplib::Server>();
  }
  impl->http->set_payload_max_length(static_cast<size_t>(o.max_body_bytes));
  // The status line + headers and the body go out in separate writes: without
  // TCP_NODELAY, Nagle holds the body for the client's delayed ACK (~40 ms a
  // request on Linux).
  impl->http->set_tcp_nodelay(true);
  impl->http->set_read_timeout(60);
  impl->http->set_write_timeout(60);

  std::shared_ptr<grpc::ChannelCredentials> creds = grpc::InsecureChannelCredentials();
  if (!o.server_tls_ca.empty()) {
    grpc::SslCredentialsOptions so;
    auto ca = ReadPem("server_tls_ca", o.server_tls_ca);
    if (!ca.ok()) return ca.status();
    so.pem_root_certs = *ca;
    if (!o.server_tls_cert.empty()) {
      auto client = ReadPemCertAndKey("server_tls_cert", o.server_tls_cert, "server_tls_key",
                                      o.server_tls_key);
      if (!client.ok()) return client.status();
      so.pem_cert_chain = client->cert_chain;
      so.pem_private_key = client->private_key;
    }
    creds = grpc::SslCredentials(so);
  }
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  args.SetMaxSendMessageSize(64 << 20);
  impl->channel = grpc::CreateCustomChannel(o.server, creds, args);
  impl->jobs = v1::JobService::NewStub(impl->channel);
  impl->datasets = v1::DatasetService::NewStub(impl->channel);
  impl->adapters = v1::AdapterService::NewStub(impl->channel);
  impl->inference = v1::InferenceService::NewStub(impl->channel);
  impl->Routes();
  std::unique_ptr<Gateway> g(new Gateway());
  g->impl_ = std::move(impl);
  return g;
}

Gateway::~Gateway() { Stop(); }

absl::StatusOr<int> Gateway::Bind() {
  auto [host, port_str] = SplitHostPort(impl_->o.listen);
  int port;
  if (!absl::SimpleAtoi(port_str, &port) || port < 0 || port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("--listen=", impl_->o.listen, ": not host:port"));
  }
  if (port == 0) {
    port = impl_->http->bind_to_any_port(host);
    if (port <= 0) return absl::UnavailableError(absl::StrCat("cannot bind ", impl_->o.listen));
    return port;
  }
  if (!impl_->http->bind_to_port(host, port)) {
    return absl::UnavailableError(absl::StrCat("cannot bind ", impl_->o.listen));
  }
  return port;
}

void Gateway::Serve() { impl_->http->listen_after_bind(); }

void Gateway::Stop() {
  if (impl_ && impl_->http) impl_->http->stop();
}

}  // namespace metatt::http
