#include "server/http/openai_mapping.h"

#include <google/protobuf/util/json_util.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <map>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace metatt::http {
namespace {

std::string TypeOf(int status) {
  if (status == 401) return "authentication_error";
  if (status == 403) return "permission_error";
  if (status == 404) return "invalid_request_error";
  if (status == 429) return "rate_limit_error";
  if (status >= 500) return "server_error";
  return "invalid_request_error";
}

const char* CodeName(grpc::StatusCode c) {
  switch (c) {
    case grpc::StatusCode::CANCELLED: return "cancelled";
    case grpc::StatusCode::UNKNOWN: return "unknown";
    case grpc::StatusCode::INVALID_ARGUMENT: return "invalid_argument";
    case grpc::StatusCode::DEADLINE_EXCEEDED: return "deadline_exceeded";
    case grpc::StatusCode::NOT_FOUND: return "not_found";
    case grpc::StatusCode::ALREADY_EXISTS: return "already_exists";
    case grpc::StatusCode::PERMISSION_DENIED: return "permission_denied";
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return "resource_exhausted";
    case grpc::StatusCode::FAILED_PRECONDITION: return "failed_precondition";
    case grpc::StatusCode::ABORTED: return "aborted";
    case grpc::StatusCode::OUT_OF_RANGE: return "out_of_range";
    case grpc::StatusCode::UNIMPLEMENTED: return "unimplemented";
    case grpc::StatusCode::INTERNAL: return "internal";
    case grpc::StatusCode::UNAVAILABLE: return "unavailable";
    case grpc::StatusCode::DATA_LOSS: return "data_loss";
    case grpc::StatusCode::UNAUTHENTICATED: return "invalid_api_key";
    default: return "unknown";
  }
}

bool IsFieldChar(char c) {
  return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '.' || c == '[' ||
         c == ']';
}

// Proto JSON of a message as nlohmann JSON (proto field names).
Json ProtoJson(const google::protobuf::Message& m) {
  std::string out;
  google::protobuf::util::JsonPrintOptions o;
  o.preserve_proto_field_names = true;
  if (!google::protobuf::util::MessageToJsonString(m, &out, o).ok()) return Json::object();
  return Json::parse(out, nullptr, false);
}

int64_t Seconds(int64_t unix_ms) { return unix_ms / 1000; }

// "auto" | a positive number -> unset | value.
std::optional<ApiError> AutoNumber(const Json& h, const std::string& key, const std::string& param,
                                   bool integer, std::optional<double>* out) {
  auto it = h.find(key);
  if (it == h.end() || it->is_null()) return std::nullopt;
  if (it->is_string()) {
    if (it->get<std::string>() == "auto") return std::nullopt;
    return BadRequest(param, absl::StrCat(param, ": '", it->get<std::string>(),
                                          "' is neither \"auto\" nor a number"));
  }
  if (!it->is_number()) return BadRequest(param, param + ": must be \"auto\" or a number");
  double v = it->get<double>();
  if (!(v > 0) || !std::isfinite(v)) return BadRequest(param, param + ": must be > 0");
  if (integer && v != std::floor(v)) return BadRequest(param, param + ": must be an integer");
  *out = v;
  return std::nullopt;
}

std::optional<ApiError> OptionalString(const Json& body, const std::string& key, std::string* out) {
  auto it = body.find(key);
  if (it == body.end() || it->is_null()) return std::nullopt;
  if (!it->is_string()) return BadRequest(key, key + ": must be a string");
  *out = it->get<std::string>();
  return std::nullopt;
}

}  // namespace

Json ErrorBody(const ApiError& e) {
  Json err = {{"message", e.message},
              {"type", TypeOf(e.status)},
              {"param", e.param.empty() ? Json(nullptr) : Json(e.param)},
              {"code", e.code.empty() ? Json(nullptr) : Json(e.code)}};
  return Json{{"error", err}};
}

ApiError BadRequest(const std::string& param, const std::string& message) {
  return ApiError{400, message, param, "invalid_request"};
}

int HttpStatusOf(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK: return 200;
    case grpc::StatusCode::CANCELLED: return 499;
    case grpc::StatusCode::INVALID_ARGUMENT: return 400;
    case grpc::StatusCode::FAILED_PRECONDITION: return 400;
    case grpc::StatusCode::OUT_OF_RANGE: return 400;
    case grpc::StatusCode::DEADLINE_EXCEEDED: return 504;
    case grpc::StatusCode::NOT_FOUND: return 404;
    case grpc::StatusCode::ALREADY_EXISTS: return 409;
    case grpc::StatusCode::ABORTED: return 409;
    case grpc::StatusCode::PERMISSION_DENIED: return 403;
    case grpc::StatusCode::UNAUTHENTICATED: return 401;
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return 429;
    case grpc::StatusCode::UNIMPLEMENTED: return 501;
    case grpc::StatusCode::UNAVAILABLE: return 503;
    default: return 500;
  }
}

std::string HttpParamOf(const std::string& f) {
  static const std::pair<const char*, const char*> kExact[] = {
      {"spec.tasks[0].dataset_id", "training_file"},
      {"spec.tasks[0].eval_dataset_id", "validation_file"},
      {"spec.tasks[0].task_name", "suffix"},
      {"spec.tasks[0].eval_fraction", "metatt.eval_fraction"},
      {"spec.tasks[0].metric", "metatt.metric"},
      {"spec.family", "suffix"},
      {"spec.hparams.batch_size", "hyperparameters.batch_size"},
      {"spec.hparams.seed", "seed"},
      {"job_id", "fine_tuning_job_id"},
      {"dataset_id", "file_id"},
      {"dataset", "file"},  // upload parse errors: "dataset: line 3: ..."
  };
  for (const auto& [from, to] : kExact)
    if (f == from) return to;
  if (absl::StartsWith(f, "spec.hparams.")) return "metatt.hparams." + f.substr(13);
  if (absl::StartsWith(f, "spec.adapter.")) return "metatt.adapter." + f.substr(13);
  if (absl::StartsWith(f, "header.")) return "file";
  if (absl::StartsWith(f, "inputs[")) return "input";
  return f;
}

ApiError FromGrpc(const grpc::Status& st) {
  ApiError e;
  e.status = HttpStatusOf(st.error_code());
  e.message = st.error_message();
  e.code = CodeName(st.error_code());
  const std::string& m = st.error_message();
  size_t colon = m.find(": ");
  if (colon != std::string::npos && colon > 0 &&
      std::all_of(m.begin(), m.begin() + colon, IsFieldChar) &&
      std::isalpha(static_cast<unsigned char>(m[0]))) {
    e.param = HttpParamOf(m.substr(0, colon));
  }
  if (st.error_code() == grpc::StatusCode::UNAVAILABLE && e.message.empty()) {
    e.message = "the metatt-server behind this gateway is unavailable";
  }
  return e;
}

// ---- files ---------------------------------------------------------------------

std::optional<ApiError> DatasetHeaderFor(const std::string& filename, const std::string& first_line,
                                         const std::string& label_kind, v1::DatasetHeader* h) {
  h->set_name(filename.empty() ? "upload.jsonl" : filename);
  h->set_text_column("text");
  h->set_label_column("label");
  if (label_kind.empty() || label_kind == "classification") {
    h->set_label_kind(v1::CLASSIFICATION);
  } else if (label_kind == "regression") {
    h->set_label_kind(v1::REGRESSION);
  } else if (label_kind == "generation") {
    h->set_label_kind(v1::GENERATION);
  } else {
    return BadRequest("label_kind", "label_kind: '" + label_kind +
                                        "' is not one of classification, regression, generation");
  }
  const std::string lower = absl::AsciiStrToLower(filename);
  if (absl::EndsWith(lower, ".tsv") || absl::EndsWith(lower, ".csv")) {
    const bool tsv = absl::EndsWith(lower, ".tsv");
    h->set_format(tsv ? v1::TSV : v1::CSV);
    h->set_has_header(true);
    h->set_quoting(!tsv);
    for (absl::string_view col : absl::StrSplit(first_line, tsv ? '\t' : ',')) {
      col = absl::StripAsciiWhitespace(col);
      if (col == "text_pair" || col == "\"text_pair\"") h->set_text_pair_column("text_pair");
    }
    return std::nullopt;
  }
  h->set_format(v1::JSONL);
  Json first = Json::parse(first_line, nullptr, false);
  if (first.is_object()) {
    // Chat (`messages`), prompt/completion and instruction records train
    // decoder families: a generation dataset, its format detected per record
    // by the server (a decoder server; an encoder server refuses the job).
    if (label_kind.empty() &&
        (first.contains("messages") || first.contains("prompt") || first.contains("instruction"))) {
      h->set_label_kind(v1::GENERATION);
    }
    if (first.contains("text_pair")) h->set_text_pair_column("text_pair");
  }
  // Anything else goes to the server, which names the bad lines.
  return std::nullopt;
}

Json FileJson(const v1::Dataset& d) {
  Json labels = Json::array();
  for (const auto& l : d.label_names()) labels.push_back(l);
  return Json{{"id", d.id()},
              {"object", "file"},
              {"bytes", d.size_bytes()},
              {"created_at", Seconds(d.created_unix_ms())},
              {"filename", d.name()},
              {"purpose", "fine-tune"},
              {"status", "processed"},
              {"status_details", nullptr},
              {"metatt",
               {{"rows", d.num_rows()},
                {"format", absl::AsciiStrToLower(v1::DataFormat_Name(d.format()))},
                {"label_kind", d.label_kind() == v1::REGRESSION   ? "regression"
                               : d.label_kind() == v1::GENERATION ? "generation"
                                                                  : "classification"},
                {"labels", labels},
                {"sha256", d.sha256()}}}};
}

// ---- jobs -------------------------------------------------------------------------

std::optional<ApiError> ParseJobRequest(const Json& body, JobRequest* out) {
  if (!body.is_object()) return BadRequest("", "the request body must be a JSON object");
  if (auto e = OptionalString(body, "model", &out->model)) return e;
  if (out->model.empty()) return BadRequest("model", "model: required (the base model, or family:task to add a task to a family)");
  if (auto e = OptionalString(body, "training_file", &out->training_file)) return e;
  if (out->training_file.empty()) return BadRequest("training_file", "training_file: required");
  if (auto e = OptionalString(body, "validation_file", &out->validation_file)) return e;
  std::string suffix;
  if (auto e = OptionalString(body, "suffix", &suffix)) return e;
  if (!suffix.empty()) {
    std::vector<std::string> parts = absl::StrSplit(suffix, absl::MaxSplits(':', 1));
    out->family = parts[0];
    if (parts.size() == 2) out->task = parts[1];
  }

  // Hyper-parameters: method.supervised.hyperparameters, or the older
  // top-level `hyperparameters`.
  Json hp = Json::object();
  std::string hp_param = "hyperparameters";
  if (auto m = body.find("method"); m != body.end() && !m->is_null()) {
    if (!m->is_object()) return BadRequest("method", "method: must be an object");
    std::string type = m->value("type", "supervised");
    if (type != "supervised") {
      return BadRequest("method.type", "method.type: '" + type +
                                           "' is not supported; encoder families train "
                                           "\"supervised\"");
    }
    if (auto s = m->find("supervised"); s != m->end() && s->is_object()) {
      if (auto h = s->find("hyperparameters"); h != s->end() && !h->is_null()) {
        hp = *h;
        hp_param = "method.supervised.hyperparameters";
      }
    }
  } else if (auto h = body.find("hyperparameters"); h != body.end() && !h->is_null()) {
    hp = *h;
  }
  if (!hp.is_object()) return BadRequest(hp_param, hp_param + ": must be an object");
  for (const auto& [k, v] : hp.items()) {
    (void)v;
    if (k != "n_epochs" && k != "batch_size" && k != "learning_rate_multiplier") {
      return BadRequest(hp_param + "." + k,
                        hp_param + "." + k +
                            ": unknown hyper-parameter (n_epochs, batch_size, "
                            "learning_rate_multiplier; MetaTT's own go in the `metatt` object)");
    }
  }
  std::optional<double> batch;
  if (auto e = AutoNumber(hp, "n_epochs", hp_param + ".n_epochs", false, &out->n_epochs)) return e;
  if (auto e = AutoNumber(hp, "batch_size", hp_param + ".batch_size", true, &batch)) return e;
  if (batch) out->batch_size = static_cast<int64_t>(*batch);
  if (auto e = AutoNumber(hp, "learning_rate_multiplier", hp_param + ".learning_rate_multiplier",
                          false, &out->learning_rate_multiplier)) {
    return e;
  }

  // The MetaTT extension: {"adapter": AdapterConfig, "hparams": HyperParams,
  // "eval_fraction", "metric", "idempotency_key"} in the proto's JSON.
  v1::JobSpec* spec = out->req.mutable_spec();
  v1::JobTask* task = spec->add_tasks();
  if (auto x = body.find("metatt"); x != body.end() && !x->is_null()) {
    if (!x->is_object()) return BadRequest("metatt", "metatt: must be an object");
    for (const auto& [k, v] : x->items()) {
      google::protobuf::util::JsonParseOptions po;
      if (k == "adapter" || k == "hparams") {
        google::protobuf::Message* m =
            k == "adapter" ? static_cast<google::protobuf::Message*>(spec->mutable_adapter())
                           : static_cast<google::protobuf::Message*>(spec->mutable_hparams());
        auto st = google::protobuf::util::JsonStringToMessage(v.dump(), m, po);
        if (!st.ok()) {
          return BadRequest("metatt." + k,
                            absl::StrCat("metatt.", k, ": ", std::string(st.message().data(), st.message().size())));
        }
      } else if (k == "eval_fraction") {
        if (!v.is_number()) return BadRequest("metatt.eval_fraction", "metatt.eval_fraction: must be a number");
        task->set_eval_fraction(v.get<double>());
      } else if (k == "metric" || k == "idempotency_key") {
        if (!v.is_string()) return BadRequest("metatt." + k, "metatt." + k + ": must be a string");
        if (k == "metric") {
          task->set_metric(v.get<std::string>());
        } else {
          out->req.set_idempotency_key(v.get<std::string>());
        }
      } else {
        return BadRequest("metatt." + k,
                          "metatt." + k +
                              ": unknown field (adapter, hparams, eval_fraction, metric, "
                              "idempotency_key)");
      }
    }
  }
  v1::HyperParams* h = spec->mutable_hparams();
  if (out->n_epochs && h->has_max_steps()) {
    return BadRequest(hp_param + ".n_epochs",
                      hp_param + ".n_epochs: give n_epochs or metatt.hparams.max_steps, not both");
  }
  if (out->batch_size) {
    if (h->has_batch_size()) {
      return BadRequest(hp_param + ".batch_size",
                        hp_param + ".batch_size: also set in metatt.hparams.batch_size");
    }
    h->set_batch_size(*out->batch_size);
  }
  if (out->learning_rate_multiplier && h->has_learning_rate()) {
    return BadRequest(hp_param + ".learning_rate_multiplier",
                      hp_param +
                          ".learning_rate_multiplier: give it or metatt.hparams.learning_rate, "
                          "not both");
  }
  if (auto s = body.find("seed"); s != body.end() && !s->is_null()) {
    if (!s->is_number_integer() || s->get<int64_t>() < 0) {
      return BadRequest("seed", "seed: must be a non-negative integer");
    }
    if (h->has_seed()) return BadRequest("seed", "seed: also set in metatt.hparams.seed");
    h->set_seed(s->get<uint64_t>());
  }
  task->set_dataset_id(out->training_file);
  task->set_eval_dataset_id(out->validation_file);
  return std::nullopt;
}

std::string JobStatus(v1::JobState s) {
  switch (s) {
    case v1::QUEUED: return "queued";
    case v1::VALIDATING: return "validating_files";
    case v1::RUNNING: return "running";
    case v1::SUCCEEDED: return "succeeded";
    case v1::FAILED: return "failed";
    case v1::CANCELLED: return "cancelled";
    default: return "queued";
  }
}

Json JobJson(const v1::Job& job, const JobView& view) {
  const v1::JobSpec& spec = job.spec();
  const bool terminal =
      job.state() == v1::SUCCEEDED || job.state() == v1::FAILED || job.state() == v1::CANCELLED;
  const std::string task = spec.tasks_size() > 0 ? spec.tasks(0).task_name() : "";
  const double default_lr = view.default_learning_rate ? view.default_learning_rate(spec) : 0;
  Json hp = {{"n_epochs", "auto"},
             {"batch_size", spec.hparams().has_batch_size() && spec.hparams().batch_size() > 0
                                ? Json(spec.hparams().batch_size())
                                : Json("auto")},
             {"learning_rate_multiplier",
              spec.hparams().has_learning_rate() && spec.hparams().learning_rate() > 0 &&
                      default_lr > 0
                  ? Json(spec.hparams().learning_rate() / default_lr)
                  : Json("auto")}};
  Json out = {
      {"id", job.id()},
      {"object", "fine_tuning.job"},
      {"created_at", Seconds(job.created_unix_ms())},
      {"finished_at", terminal ? Json(Seconds(job.updated_unix_ms())) : Json(nullptr)},
      {"model", spec.kind() == v1::ADD_TASK ? spec.family() : view.base_model},
      {"fine_tuned_model", job.state() == v1::SUCCEEDED && !job.result_family().empty()
                               ? Json(absl::StrCat(job.result_family(), ":", task))
                               : Json(nullptr)},
      {"organization_id", "metatt"},
      {"status", JobStatus(job.state())},
      {"error", job.state() == v1::FAILED
                    ? Json{{"code", "job_failed"}, {"message", job.failure_reason()}, {"param", nullptr}}
                    : Json(nullptr)},
      {"hyperparameters", hp},
      {"method", {{"type", "supervised"}, {"supervised", {{"hyperparameters", hp}}}}},
      {"training_file", spec.tasks_size() > 0 ? spec.tasks(0).dataset_id() : ""},
      {"validation_file", spec.tasks_size() > 0 && !spec.tasks(0).eval_dataset_id().empty()
                              ? Json(spec.tasks(0).eval_dataset_id())
                              : Json(nullptr)},
      {"result_files", Json::array()},
      {"seed", spec.hparams().has_seed() ? spec.hparams().seed() : 0},
      {"trained_tokens", nullptr},
      {"estimated_finish", nullptr},
      {"metatt",
       {{"state", v1::JobState_Name(job.state())},
        {"step", job.step()},
        {"total_steps", job.total_steps()},
        {"result_family", job.result_family()},
        {"result_version", job.result_version()},
        {"failure_reason", job.failure_reason()},
        {"spec", ProtoJson(spec)}}}};
  return out;
}

std::string EventId(const std::string& job_id, int64_t sequence) {
  return absl::StrCat("ftevent-", job_id, "-", sequence);
}

std::optional<int64_t> EventSequence(const std::string& event_id) {
  size_t dash = event_id.rfind('-');
  int64_t seq;
  if (!absl::StartsWith(event_id, "ftevent-") || dash == std::string::npos ||
      !absl::SimpleAtoi(event_id.substr(dash + 1), &seq) || seq < 0) {
    return std::nullopt;
  }
  return seq;
}

Json EventJson(const v1::JobEvent& e) {
  std::string level = "info", type = "message", message;
  Json data = nullptr;
  if (e.has_state()) {
    const std::string s = JobStatus(e.state().state());
    message = "Job " + s;
    if (!e.state().reason().empty()) message += ": " + e.state().reason();
    if (e.state().state() == v1::FAILED) level = "error";
    data = {{"status", s}, {"reason", e.state().reason()}};
  } else if (e.has_progress()) {
    const auto& p = e.progress();
    type = "metrics";
    message = absl::StrCat("Step ", p.step(), "/", p.total_steps(), ": training loss=", p.loss());
    data = {{"step", p.step()},
            {"total_steps", p.total_steps()},
            {"epoch", p.epoch()},
            {"train_loss", p.loss()},
            {"examples_per_second", p.examples_per_second()},
            {"eta_seconds", p.eta_seconds()}};
  } else if (e.has_eval()) {
    type = "metrics";
    Json metrics = Json::object();
    std::vector<std::string> parts;
    std::map<std::string, double> sorted(e.eval().metrics().begin(), e.eval().metrics().end());
    for (const auto& [k, v] : sorted) {
      metrics[k] = v;
      parts.push_back(absl::StrCat(k, "=", v));
    }
    message = absl::StrCat("Step ", e.eval().step(), ": eval ", absl::StrJoin(parts, " "));
    data = {{"step", e.eval().step()}, {"metrics", metrics}};
  } else if (e.has_sweep()) {
    std::vector<std::string> parts;
    Json bonds = Json::array();
    for (const auto& b : e.sweep().bonds()) {
      parts.push_back(absl::StrCat("bond ", b.bond(), " ", b.old_rank(), "->", b.new_rank()));
      bonds.push_back({{"bond", b.bond()},
                       {"old_rank", b.old_rank()},
                       {"new_rank", b.new_rank()},
                       {"discarded_weight", b.discarded_weight()}});
    }
    message = absl::StrCat("DMRG sweep at step ", e.sweep().step(), ": ", absl::StrJoin(parts, ", "));
    data = {{"step", e.sweep().step()}, {"epoch", e.sweep().epoch()}, {"bonds", bonds}};
  } else if (e.has_checkpoint()) {
    message = absl::StrCat("Published family ", e.checkpoint().family(), " version ",
                           e.checkpoint().version());
    data = {{"family", e.checkpoint().family()}, {"version", e.checkpoint().version()}};
  } else if (e.has_log()) {
    message = e.log().message();
  }
  return Json{{"id", EventId(e.job_id(), e.sequence())},
              {"object", "fine_tuning.job.event"},
              {"created_at", Seconds(e.time_unix_ms())},
              {"level", level},
              {"message", message},
              {"data", data},
              {"type", type}};
}

Json CheckpointJson(const v1::JobCheckpoint& c) {
  Json metrics = {{"step", c.step()}};
  for (const auto& [k, v] : c.metrics()) metrics[k == "loss" ? "train_loss" : k] = v;
  return Json{{"id", absl::StrCat("ftckpt-", c.job_id(), "-", c.step())},
              {"object", "fine_tuning.job.checkpoint"},
              {"created_at", Seconds(c.time_unix_ms())},
              {"fine_tuned_model_checkpoint", nullptr},
              {"fine_tuning_job_id", c.job_id()},
              {"metrics", metrics},
              {"step_number", c.step()}};
}

// ---- models and classification ----------------------------------------------------

Json ModelJson(const std::string& id, int64_t created_unix_ms, const Json& metatt) {
  return Json{{"id", id},
              {"object", "model"},
              {"created", Seconds(created_unix_ms)},
              {"owned_by", "metatt"},
              {"metatt", metatt}};
}

Json TaskModelJson(const v1::FamilyVersion& v, const v1::Task& t) {
  Json labels = Json::array();
  for (const auto& l : t.label_names()) labels.push_back(l);
  // Display only: a decoder family's config names the llama architecture.
  const bool decoder = absl::StrContains(v.config_json(), "\"llama\"");
  return ModelJson(absl::StrCat(v.family(), ":", t.name()), v.created_unix_ms(),
                   {{"kind", decoder ? "decoder" : "encoder"},
                    {"family", v.family()},
                    {"version", v.version()},
                    {"form", v.form()},
                    {"task", t.name()},
                    {"task_index", t.index()},
                    {"regression", t.regression()},
                    {"labels", labels}});
}

bool SplitModelId(const std::string& id, std::string* family, std::string* task) {
  size_t colon = id.find(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == id.size()) return false;
  *family = id.substr(0, colon);
  *task = id.substr(colon + 1);
  return true;
}

std::optional<ApiError> ParseClassification(const Json& body, v1::PredictRequest* req,
                                            std::vector<std::pair<int, std::string>>* rows) {
  if (!body.is_object()) return BadRequest("", "the request body must be a JSON object");
  std::vector<std::string> models;
  auto m = body.find("model");
  if (m == body.end() || m->is_null()) return BadRequest("model", "model: required (family:task)");
  if (m->is_string()) {
    models.push_back(m->get<std::string>());
  } else if (m->is_array() && !m->empty()) {
    for (const auto& x : *m) {
      if (!x.is_string()) return BadRequest("model", "model: a list of family:task strings");
      models.push_back(x.get<std::string>());
    }
  } else {
    return BadRequest("model", "model: a family:task string or a non-empty list of them");
  }
  for (const auto& id : models) {
    std::string f, t;
    if (!SplitModelId(id, &f, &t)) {
      return BadRequest("model", "model: '" + id + "' is not of the form family:task (GET /v1/models lists them)");
    }
  }
  auto in = body.find("input");
  if (in == body.end() || in->is_null()) return BadRequest("input", "input: required");
  std::vector<Json> inputs;
  if (in->is_array()) {
    if (in->empty()) return BadRequest("input", "input: empty list");
    inputs.assign(in->begin(), in->end());
  } else {
    inputs.push_back(*in);
  }
  for (size_t i = 0; i < inputs.size(); ++i) {
    const Json& x = inputs[i];
    const std::string param = in->is_array() ? absl::StrCat("input[", i, "]") : "input";
    std::string text;
    std::optional<std::string> pair;
    if (x.is_string()) {
      text = x.get<std::string>();
    } else if (x.is_object()) {
      auto t = x.find("text");
      if (t == x.end() || !t->is_string()) return BadRequest(param + ".text", param + ".text: required string");
      text = t->get<std::string>();
      if (auto p = x.find("text_pair"); p != x.end() && !p->is_null()) {
        if (!p->is_string()) return BadRequest(param + ".text_pair", param + ".text_pair: must be a string");
        pair = p->get<std::string>();
      }
    } else {
      return BadRequest(param, param + ": a string or {\"text\", \"text_pair\"}");
    }
    for (const auto& id : models) {
      std::string f, t;
      SplitModelId(id, &f, &t);
      v1::PredictInput* pi = req->add_inputs();
      pi->set_family(f);
      pi->set_task(t);
      pi->set_text(text);
      if (pair) pi->set_text_pair(*pair);
      rows->emplace_back(static_cast<int>(i), id);
    }
  }
  return std::nullopt;
}

Json ClassificationJson(const v1::PredictResponse& resp,
                        const std::vector<std::pair<int, std::string>>& rows) {
  Json data = Json::array();
  for (int i = 0; i < resp.predictions_size() && i < static_cast<int>(rows.size()); ++i) {
    const v1::Prediction& p = resp.predictions(i);
    Json scores = Json::array();
    for (float s : p.scores()) scores.push_back(s);
    Json row = {{"object", "classification"},
                {"index", rows[i].first},
                {"model", rows[i].second},
                {"scores", scores},
                {"queue_seconds", p.queue_seconds()},
                {"model_seconds", p.model_seconds()}};
    if (p.regression()) {
      row["label"] = nullptr;
      row["label_index"] = nullptr;
      row["value"] = p.value();
    } else {
      row["label"] = p.label_name().empty() ? absl::StrCat(p.label()) : p.label_name();
      row["label_index"] = p.label();
    }
    data.push_back(std::move(row));
  }
  return Json{{"object", "list"}, {"data", data}, {"server_seconds", resp.server_seconds()}};
}

// ---- chat and text completions ------------------------------------------------------

namespace {

bool Truthy(const Json& body, const char* key) {
  auto it = body.find(key);
  return it != body.end() && it->is_boolean() && it->get<bool>();
}

bool Present(const Json& body, const char* key) {
  auto it = body.find(key);
  return it != body.end() && !it->is_null();
}

std::optional<ApiError> OptionalNumber(const Json& body, const std::string& key,
                                       std::optional<double>* out) {
  auto it = body.find(key);
  if (it == body.end() || it->is_null()) return std::nullopt;
  if (!it->is_number()) return BadRequest(key, key + ": must be a number");
  *out = it->get<double>();
  return std::nullopt;
}

std::optional<ApiError> OptionalInt(const Json& body, const std::string& key,
                                    const std::string& param, std::optional<int64_t>* out) {
  auto it = body.find(key);
  if (it == body.end() || it->is_null()) return std::nullopt;
  if (it->is_number_float() && it->get<double>() == std::floor(it->get<double>()) &&
      std::abs(it->get<double>()) < 9e15) {
    *out = static_cast<int64_t>(it->get<double>());
    return std::nullopt;
  }
  if (!it->is_number_integer()) return BadRequest(param, param + ": must be an integer");
  *out = it->get<int64_t>();
  return std::nullopt;
}

// A message's content: a string, or a list of {"type": "text", "text": ...}
// parts (joined); null counts as empty.
std::optional<ApiError> MessageContent(const Json& c, const std::string& param, std::string* out) {
  if (c.is_null()) return std::nullopt;
  if (c.is_string()) {
    *out = c.get<std::string>();
    return std::nullopt;
  }
  if (!c.is_array()) return BadRequest(param, param + ": a string or a list of text parts");
  for (size_t i = 0; i < c.size(); ++i) {
    const std::string pp = absl::StrCat(param, "[", i, "]");
    const Json& part = c[i];
    if (!part.is_object() || !part.contains("type") || part["type"] != "text" ||
        !part.contains("text") || !part["text"].is_string()) {
      return BadRequest(pp, pp + ": only {\"type\": \"text\", \"text\": ...} parts are supported "
                                 "(this model reads text only)");
    }
    *out += part["text"].get<std::string>();
  }
  return std::nullopt;
}

}  // namespace

std::optional<ApiError> ParseCompletionRequest(const Json& body, bool chat,
                                               const std::string& base_model,
                                               CompletionRequest* out) {
  if (!body.is_object()) return BadRequest("", "the request body must be a JSON object");
  out->chat = chat;
  v1::GenerateRequest& g = out->req;
  // model: family:task, or the base model itself (no adapter).
  if (auto e = OptionalString(body, "model", &out->model)) return e;
  if (out->model.empty()) {
    return BadRequest("model", "model: required (family:task, or the base model '" + base_model +
                                   "'; GET /v1/models lists them)");
  }
  std::string family, task;
  if (out->model == base_model) {
    // family "" and task "": the base model without an adapter.
  } else if (SplitModelId(out->model, &family, &task)) {
    g.set_family(family);
    g.set_task(task);
  } else {
    return ApiError{404,
                    absl::StrCat("The model '", out->model, "' does not exist: use family:task "
                                 "or the base model '", base_model, "' (GET /v1/models lists them)"),
                    "model", "model_not_found"};
  }

  // The input.
  if (chat) {
    if (Present(body, "prompt")) {
      return BadRequest("prompt", "prompt: POST /v1/chat/completions takes messages; "
                                  "POST /v1/completions takes a prompt");
    }
    auto m = body.find("messages");
    if (m == body.end() || m->is_null()) return BadRequest("messages", "messages: required");
    if (!m->is_array() || m->empty()) {
      return BadRequest("messages", "messages: a non-empty list of {\"role\", \"content\"}");
    }
    v1::ChatMessages* msgs = g.mutable_messages();
    for (size_t i = 0; i < m->size(); ++i) {
      const std::string param = absl::StrCat("messages[", i, "]");
      const Json& x = (*m)[i];
      if (!x.is_object()) return BadRequest(param, param + ": must be an object");
      auto role = x.find("role");
      if (role == x.end() || !role->is_string()) {
        return BadRequest(param + ".role", param + ".role: required string");
      }
      if (Present(x, "tool_calls") || Present(x, "function_call")) {
        return BadRequest(param + ".tool_calls", param + ".tool_calls: tools are not supported");
      }
      v1::ChatMessage* cm = msgs->add_messages();
      // OpenAI's newer name for the system role.
      cm->set_role(role->get<std::string>() == "developer" ? "system" : role->get<std::string>());
      auto content = x.find("content");
      if (content != x.end()) {
        if (auto e = MessageContent(*content, param + ".content", cm->mutable_content())) return e;
      }
    }
  } else {
    if (Present(body, "messages")) {
      return BadRequest("messages", "messages: POST /v1/completions takes a prompt; "
                                    "POST /v1/chat/completions takes messages");
    }
    auto p = body.find("prompt");
    if (p == body.end() || p->is_null()) return BadRequest("prompt", "prompt: required");
    if (p->is_string()) {
      g.set_prompt(p->get<std::string>());
    } else if (p->is_array() && p->size() == 1 && (*p)[0].is_string()) {
      g.set_prompt((*p)[0].get<std::string>());
    } else {
      return BadRequest("prompt", "prompt: a string (or a list of exactly one string; token "
                                  "lists and several prompts are not supported)");
    }
    if (Truthy(body, "echo")) return BadRequest("echo", "echo: not supported");
    std::optional<int64_t> best_of;
    if (auto e = OptionalInt(body, "best_of", "best_of", &best_of)) return e;
    if (best_of && *best_of != 1) return BadRequest("best_of", "best_of: only 1 is supported");
    std::string suffix;
    if (auto e = OptionalString(body, "suffix", &suffix)) return e;
    if (!suffix.empty()) return BadRequest("suffix", "suffix: not supported");
  }

  // Fields with no equivalent in the gRPC API.
  std::optional<int64_t> n;
  if (auto e = OptionalInt(body, "n", "n", &n)) return e;
  if (n && *n != 1) return BadRequest("n", "n: only 1 choice per request is supported");
  if (chat ? Truthy(body, "logprobs") : Present(body, "logprobs")) {
    return BadRequest("logprobs", "logprobs: not supported");
  }
  if (Present(body, "top_logprobs")) return BadRequest("top_logprobs", "top_logprobs: not supported");
  for (const char* k : {"tools", "functions"}) {
    auto it = body.find(k);
    if (it != body.end() && !it->is_null() && !(it->is_array() && it->empty())) {
      return BadRequest(k, std::string(k) + ": tools are not supported");
    }
  }
  if (auto it = body.find("response_format"); it != body.end() && !it->is_null()) {
    if (!it->is_object() || it->value("type", "") != "text") {
      return BadRequest("response_format", "response_format: only {\"type\": \"text\"} is "
                                           "supported");
    }
  }
  if (auto it = body.find("logit_bias"); it != body.end() && !it->is_null() &&
                                         !(it->is_object() && it->empty())) {
    return BadRequest("logit_bias", "logit_bias: not supported");
  }
  for (const char* k : {"presence_penalty", "frequency_penalty"}) {
    std::optional<double> v;
    if (auto e = OptionalNumber(body, k, &v)) return e;
    if (v && *v != 0) return BadRequest(k, std::string(k) + ": not supported (only 0)");
  }

  // Sampling. OpenAI's temperature defaults to 1; the proto's 0 is greedy.
  std::optional<double> temperature, top_p;
  if (auto e = OptionalNumber(body, "temperature", &temperature)) return e;
  g.set_temperature(temperature ? static_cast<float>(*temperature) : 1.0f);
  if (auto e = OptionalNumber(body, "top_p", &top_p)) return e;
  if (top_p) g.set_top_p(static_cast<float>(*top_p));
  std::optional<int64_t> max_tokens, max_completion_tokens;
  if (auto e = OptionalInt(body, "max_tokens", "max_tokens", &max_tokens)) return e;
  if (auto e = OptionalInt(body, "max_completion_tokens", "max_completion_tokens",
                           &max_completion_tokens)) {
    return e;
  }
  if (max_tokens && max_completion_tokens && *max_tokens != *max_completion_tokens) {
    return BadRequest("max_completion_tokens",
                      "max_completion_tokens: differs from max_tokens; give one of them");
  }
  if (max_completion_tokens) {
    out->max_tokens_param = "max_completion_tokens";
    max_tokens = max_completion_tokens;
  }
  if (max_tokens) {
    // 0 would mean "the server's default" in the proto: pass -1 so the
    // server refuses it (naming max_tokens) as OpenAI does.
    g.set_max_tokens(*max_tokens == 0 ? -1 : *max_tokens);
  }
  if (auto s = body.find("seed"); s != body.end() && !s->is_null()) {
    if (!s->is_number_integer() || s->get<int64_t>() < 0) {
      return BadRequest("seed", "seed: must be a non-negative integer");
    }
    g.set_seed(s->get<uint64_t>());
  }
  if (auto st = body.find("stop"); st != body.end() && !st->is_null()) {
    if (st->is_string()) {
      g.add_stop(st->get<std::string>());
    } else if (st->is_array()) {
      for (size_t i = 0; i < st->size(); ++i) {
        if (!(*st)[i].is_string()) {
          return BadRequest(absl::StrCat("stop[", i, "]"),
                            absl::StrCat("stop[", i, "]: must be a string"));
        }
        g.add_stop((*st)[i].get<std::string>());
      }
    } else {
      return BadRequest("stop", "stop: a string or a list of strings");
    }
  }

  // Streaming.
  if (auto s = body.find("stream"); s != body.end() && !s->is_null()) {
    if (!s->is_boolean()) return BadRequest("stream", "stream: must be a boolean");
    out->stream = s->get<bool>();
  }
  if (auto so = body.find("stream_options"); so != body.end() && !so->is_null()) {
    if (!so->is_object()) return BadRequest("stream_options", "stream_options: must be an object");
    if (!out->stream) {
      return BadRequest("stream_options", "stream_options: only with stream: true");
    }
    if (auto iu = so->find("include_usage"); iu != so->end() && !iu->is_null()) {
      if (!iu->is_boolean()) {
        return BadRequest("stream_options.include_usage",
                          "stream_options.include_usage: must be a boolean");
      }
      out->include_usage = iu->get<bool>();
    }
  }

  // The extension object: {"top_k", "version"}.
  if (auto mt = body.find("metatt"); mt != body.end() && !mt->is_null()) {
    if (!mt->is_object()) return BadRequest("metatt", "metatt: must be an object");
    for (const auto& [k, v] : mt->items()) {
      if (k != "top_k" && k != "version") {
        return BadRequest("metatt." + k, "metatt." + k + ": unknown field (known: top_k, version)");
      }
    }
    std::optional<int64_t> top_k, version;
    if (auto e = OptionalInt(*mt, "top_k", "metatt.top_k", &top_k)) return e;
    if (auto e = OptionalInt(*mt, "version", "metatt.version", &version)) return e;
    if (top_k) g.set_top_k(*top_k);
    if (version) g.set_version(*version);
  }
  return std::nullopt;
}

std::string GenerateParamOf(const std::string& f, const CompletionRequest& r) {
  if (f == "family" || f == "task" || f == "Generate" || f == "GenerateStream") return "model";
  if (f == "top_k") return "metatt.top_k";
  if (f == "version") return "metatt.version";
  if (f == "max_tokens") return r.max_tokens_param;
  if (f == "prompt" || absl::StartsWith(f, "messages")) {
    if (!r.chat) return "prompt";
    return f == "prompt" ? "messages" : f;
  }
  return f;
}

ApiError GenerateError(const grpc::Status& st, const CompletionRequest& r) {
  ApiError e = FromGrpc(st);
  const std::string& m = st.error_message();
  size_t colon = m.find(": ");
  if (!e.param.empty() && colon != std::string::npos) e.param = GenerateParamOf(m.substr(0, colon), r);
  if (st.error_code() == grpc::StatusCode::NOT_FOUND) {
    e.param = "model";
    e.code = "model_not_found";
  } else if (st.error_code() == grpc::StatusCode::FAILED_PRECONDITION) {
    e.param = "model";  // a model of the other kind (an encoder family or server)
  }
  return e;
}

Json UsageJson(const v1::GenerateUsage& u) {
  return Json{{"prompt_tokens", u.prompt_tokens()},
              {"completion_tokens", u.completion_tokens()},
              {"total_tokens", u.prompt_tokens() + u.completion_tokens()}};
}

namespace {

Json FinishReason(const std::string& r) { return r.empty() ? Json(nullptr) : Json(r); }

Json CompletionEnvelope(const CompletionRequest& r, const std::string& id, int64_t created_s,
                        bool chunk) {
  Json out = {{"id", id},
              {"object", r.chat ? (chunk ? "chat.completion.chunk" : "chat.completion")
                                : "text_completion"},
              {"created", created_s},
              {"model", r.model},
              {"system_fingerprint", nullptr}};
  return out;
}

}  // namespace

Json CompletionJson(const v1::GenerateResponse& resp, const CompletionRequest& r,
                    const std::string& id, int64_t created_s) {
  Json out = CompletionEnvelope(r, id, created_s, false);
  Json choice = {{"index", 0}, {"logprobs", nullptr}, {"finish_reason", FinishReason(resp.finish_reason())}};
  if (r.chat) {
    choice["message"] = {{"role", "assistant"}, {"content", resp.text()}, {"refusal", nullptr}};
  } else {
    choice["text"] = resp.text();
  }
  out["choices"] = Json::array({choice});
  out["usage"] = UsageJson(resp.usage());
  out["metatt"] = {{"family", resp.family()},
                   {"version", resp.version()},
                   {"task", resp.task()},
                   {"task_index", resp.task_index()},
                   {"time_to_first_token_seconds", resp.time_to_first_token_seconds()},
                   {"server_seconds", resp.server_seconds()}};
  return out;
}

Json CompletionChunkJson(const v1::GenerateChunk& c, const CompletionRequest& r,
                         const std::string& id, int64_t created_s, bool first) {
  Json out = CompletionEnvelope(r, id, created_s, true);
  Json choice = {{"index", 0}, {"logprobs", nullptr}, {"finish_reason", FinishReason(c.finish_reason())}};
  if (r.chat) {
    Json delta = Json::object();
    if (first) delta["role"] = "assistant";
    delta["content"] = c.text();
    choice["delta"] = delta;
  } else {
    choice["text"] = c.text();
  }
  out["choices"] = Json::array({choice});
  if (r.include_usage) out["usage"] = nullptr;
  return out;
}

Json UsageChunkJson(const v1::GenerateUsage& u, const CompletionRequest& r, const std::string& id,
                    int64_t created_s) {
  Json out = CompletionEnvelope(r, id, created_s, true);
  out["choices"] = Json::array();
  out["usage"] = UsageJson(u);
  return out;
}

std::string SseEvent(const std::string& data) { return "data: " + data + "\n\n"; }

}  // namespace metatt::http
