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
  } else {
    return BadRequest("label_kind", "label_kind: '" + label_kind +
                                        "' is not one of classification, regression");
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
    if (first.contains("messages") || first.contains("prompt")) {
      return ApiError{400,
                      "file: chat or prompt/completion JSONL trains decoder families, and this "
                      "server's model kind is not supported yet for them; encoder families train "
                      "on JSONL lines {\"text\": ..., \"label\": ...} (optional \"text_pair\")",
                      "file", "model_kind_not_supported"};
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
                {"label_kind", d.label_kind() == v1::REGRESSION ? "regression" : "classification"},
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
  Json hp = {{"n_epochs", "auto"},
             {"batch_size", spec.hparams().has_batch_size() && spec.hparams().batch_size() > 0
                                ? Json(spec.hparams().batch_size())
                                : Json("auto")},
             {"learning_rate_multiplier",
              spec.hparams().has_learning_rate() && spec.hparams().learning_rate() > 0 &&
                      view.default_learning_rate > 0
                  ? Json(spec.hparams().learning_rate() / view.default_learning_rate)
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
  return ModelJson(absl::StrCat(v.family(), ":", t.name()), v.created_unix_ms(),
                   {{"kind", "encoder"},
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

}  // namespace metatt::http
