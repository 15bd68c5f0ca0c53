// metattctl: command-line client of metatt-server.
//
//   metattctl upload FILE --name mrpc --format tsv --has_header
//       --text_column sentence1 --text_pair_column sentence2 --label_column 0
//   metattctl jobs create --family glue --task MRPC --dataset ds-... --steps 60 [--follow]
//   metattctl jobs list [--state RUNNING] | get ID | cancel ID | follow ID | checkpoints ID
//   metattctl families list | get NAME
//   metattctl tasks list --family glue   (pages through every task)
//   metattctl predict --family glue --task MRPC --text "..." [--text_pair "..."]
//   metattctl generate [--family F --task T] --chat "..." | --prompt "..." [--max_tokens N]
//       (a decoder server; streams the text to the terminal as it is generated)
//   metattctl datasets list | get ID | delete ID
//
// Tables by default, --json for scripts. `jobs follow` (and `jobs create
// --follow`) ends with the job's final row and exits 1 when the job FAILED and
// 3 when it was CANCELLED. `metattctl COMMAND --help` lists that command's flags.
#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/generic/generic_stub.h>
#include <openssl/evp.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <future>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/reflection.h"
#include "absl/flags/usage.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "client/metattctl_format.h"
#include "metatt/v1/adapters.grpc.pb.h"
#include "metatt/v1/datasets.grpc.pb.h"
#include "metatt/v1/inference.grpc.pb.h"
#include "metatt/v1/jobs.grpc.pb.h"

ABSL_FLAG(std::string, server, "127.0.0.1:50051", "metatt-server address");
ABSL_FLAG(bool, json, false, "print JSON (one object per line) instead of tables");
// Unary RPCs get a deadline by default (a server that hangs must not hang a
// script); the streams (upload, follow) only when --timeout is given.
constexpr double kDefaultTimeoutSeconds = 60;
ABSL_FLAG(std::optional<double>, timeout, std::nullopt,
          "deadline of each RPC in seconds (default: 60 for unary RPCs, none for the upload and "
          "follow streams; 0 = none)");
ABSL_FLAG(std::string, token, "",
          "bearer token for a server with --auth_tokens (default: $METATT_TOKEN)");
ABSL_FLAG(std::string, tls_ca, "",
          "PEM CA that signed the server's certificate: connect with TLS (empty = plaintext)");
ABSL_FLAG(std::string, tls_cert, "", "PEM client certificate for a mutual-TLS server");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert");
// upload
ABSL_FLAG(std::string, name, "", "upload: dataset name (default: the file name)");
ABSL_FLAG(std::string, format, "", "upload: tsv | csv | jsonl (default: from the extension)");
ABSL_FLAG(bool, has_header, true, "upload: the first line is a header (TSV/CSV)");
ABSL_FLAG(std::string, text_column, "0", "upload: text column (header name or 0-based index)");
ABSL_FLAG(std::string, text_pair_column, "", "upload: second text column (sentence pairs)");
ABSL_FLAG(std::string, label_column, "1", "upload: label column");
ABSL_FLAG(std::string, label_kind, "classification", "upload: classification | regression");
ABSL_FLAG(bool, quoting, false, "upload: RFC 4180 double quotes (off for GLUE TSV)");
ABSL_FLAG(std::string, glue, "",
          "upload: column preset for a GLUE TSV file: MRPC | SST-2 | CoLA | STS-B | QNLI | RTE");
// jobs
ABSL_FLAG(std::string, kind, "train", "jobs create: train | add_task | multi_task");
ABSL_FLAG(std::string, family, "", "family name");
ABSL_FLAG(std::vector<std::string>, task, {}, "task name(s) (comma separated for multi_task; predict: several, or * for every task of the family, in one call)");
ABSL_FLAG(std::vector<std::string>, dataset, {}, "dataset id(s), one per task");
ABSL_FLAG(std::vector<std::string>, eval_dataset, {}, "eval dataset id(s), one per task");
ABSL_FLAG(double, eval_fraction, 0, "held-out fraction when no eval dataset (0 = server default)");
ABSL_FLAG(std::string, metric, "", "eval metric (accuracy | f1 | matthews | pearson | spearman)");
// jobs create: every adapter and training flag left out is "auto", the
// server's default for the form (DefaultRecipe in server/training/recipe.cc);
// the job's first log event lists the values it ran with.
#define SERVER_DEFAULT " (default: server/form default)"
ABSL_FLAG(std::string, form, "", "adapter form: 4d | 5d | 4+1d | lora" SERVER_DEFAULT);
ABSL_FLAG(std::vector<std::string>, ranks, {},
          "TT ranks: one for all bonds or one per bond" SERVER_DEFAULT);
ABSL_FLAG(std::vector<std::string>, projections, {}, "adapted projections" SERVER_DEFAULT);
ABSL_FLAG(std::string, init, "", "core init, e.g. ze-id-id-id" SERVER_DEFAULT);
ABSL_FLAG(std::optional<double>, alpha, std::nullopt, "adapter scale alpha (0: alpha = r)" SERVER_DEFAULT);
ABSL_FLAG(std::optional<int64_t>, steps, std::nullopt, "max training steps" SERVER_DEFAULT);
ABSL_FLAG(std::optional<int64_t>, batch_size, std::nullopt, "training batch size" SERVER_DEFAULT);
ABSL_FLAG(std::optional<double>, lr, std::nullopt, "learning rate" SERVER_DEFAULT);
ABSL_FLAG(std::optional<double>, weight_decay, std::nullopt, "AdamW weight decay" SERVER_DEFAULT);
ABSL_FLAG(std::optional<double>, warmup_ratio, std::nullopt,
          "warm-up fraction of the steps" SERVER_DEFAULT);
ABSL_FLAG(std::optional<double>, head_first_ratio, std::nullopt,
          "first fraction of the steps training the heads only" SERVER_DEFAULT);
ABSL_FLAG(std::optional<double>, grad_clip, std::nullopt, "gradient clip norm" SERVER_DEFAULT);
ABSL_FLAG(std::optional<int64_t>, eval_every, std::nullopt, "evaluate every N steps" SERVER_DEFAULT);
ABSL_FLAG(std::optional<int64_t>, max_length, std::nullopt,
          "max tokens per example" SERVER_DEFAULT);
ABSL_FLAG(std::optional<int64_t>, patience, std::nullopt,
          "early-stop after N evals without improvement" SERVER_DEFAULT);
ABSL_FLAG(std::string, pooling, "", "mean | cls" SERVER_DEFAULT);
ABSL_FLAG(std::optional<uint64_t>, seed, std::nullopt, "random seed" SERVER_DEFAULT);
ABSL_FLAG(std::string, idempotency_key, "", "jobs create: retry-safe key");
ABSL_FLAG(bool, follow, false, "jobs create: follow the job until it ends");
ABSL_FLAG(std::string, state, "", "jobs list: filter by state (QUEUED, RUNNING, ...)");
ABSL_FLAG(int32_t, page_size, 0, "jobs list, tasks list: page size (0 = server default)");
// predict / tasks
ABSL_FLAG(int64_t, version, 0, "family version (0 = latest)");
ABSL_FLAG(std::string, text, "", "predict: input text");
ABSL_FLAG(std::string, text_pair, "", "predict: second text of a sentence pair");
ABSL_FLAG(int64_t, task_index, -1, "predict: task by index instead of name");
// generate
ABSL_FLAG(std::string, prompt, "", "generate: raw prompt text (tokenised as is)");
ABSL_FLAG(std::string, chat, "",
          "generate: a user message, rendered through the model's chat template");
ABSL_FLAG(std::string, system, "", "generate: system message before --chat");
ABSL_FLAG(int64_t, max_tokens, 0, "generate: most tokens to generate (0 = server default)");
ABSL_FLAG(double, temperature, 0, "generate: sampling temperature (0 = greedy)");
ABSL_FLAG(double, top_p, 0, "generate: nucleus mass (0 = off)");
ABSL_FLAG(int64_t, top_k, 0, "generate: top-k cut (0 = off)");
ABSL_FLAG(std::vector<std::string>, stop, {}, "generate: stop sequences (comma separated)");

namespace metatt::ctl {
namespace {

namespace v1 = metatt::v1;
using grpc::ClientContext;

int Fail(const std::string& what) {
  std::fprintf(stderr, "metattctl: %s\n", what.c_str());
  return 2;
}

// The flags that name one of a few values: each word with its value.
constexpr std::pair<const char*, v1::DataFormat> kFormats[] = {
    {"tsv", v1::TSV}, {"csv", v1::CSV}, {"jsonl", v1::JSONL}};
constexpr std::pair<const char*, v1::JobKind> kKinds[] = {
    {"train", v1::TRAIN_FAMILY}, {"add_task", v1::ADD_TASK}, {"multi_task", v1::MULTI_TASK}};

// The value that `flag`'s `word` names in `choices`, else an error that lists them.
template <typename E, size_t N>
absl::StatusOr<E> Choice(const char* flag, const std::pair<const char*, E> (&choices)[N],
                         const std::string& word) {
  std::vector<std::string> words;
  for (const auto& [w, v] : choices) {
    if (word == w) return v;
    words.push_back(w);
  }
  return absl::InvalidArgumentError(
      absl::StrCat(flag, ": '", word, "' is not one of ", absl::StrJoin(words, ", ")));
}

int Fail(const std::string& what, const grpc::Status& st) {
  static const char* kNames[] = {"OK",
                                 "CANCELLED",
                                 "UNKNOWN",
                                 "INVALID_ARGUMENT",
                                 "DEADLINE_EXCEEDED",
                                 "NOT_FOUND",
                                 "ALREADY_EXISTS",
                                 "PERMISSION_DENIED",
                                 "RESOURCE_EXHAUSTED",
                                 "FAILED_PRECONDITION",
                                 "ABORTED",
                                 "OUT_OF_RANGE",
                                 "UNIMPLEMENTED",
                                 "INTERNAL",
                                 "UNAVAILABLE",
                                 "DATA_LOSS",
                                 "UNAUTHENTICATED"};
  int code = static_cast<int>(st.error_code());
  std::fprintf(stderr, "metattctl: %s: %s: %s\n", what.c_str(),
               code >= 0 && code <= 16 ? kNames[code] : "?", st.error_message().c_str());
  return 1;
}

std::string Token() {
  std::string t = absl::GetFlag(FLAGS_token);
  if (t.empty()) {
    const char* env = std::getenv("METATT_TOKEN");
    if (env != nullptr) t = env;
  }
  return t;
}

// Every RPC's context: the deadline and, when a token is set, the bearer
// token. Unary RPCs default to kDefaultTimeoutSeconds; streams have no
// deadline unless --timeout is given.
void SetDeadline(ClientContext* ctx, bool stream = false) {
  const std::string token = Token();
  if (!token.empty()) ctx->AddMetadata("authorization", "Bearer " + token);
  double t = absl::GetFlag(FLAGS_timeout).value_or(stream ? 0 : kDefaultTimeoutSeconds);
  if (t > 0) {
    ctx->set_deadline(std::chrono::system_clock::now() +
                      std::chrono::milliseconds(static_cast<int64_t>(t * 1000)));
  }
}

void PrintJson(const google::protobuf::Message& m) {
  std::string out;
  google::protobuf::util::JsonPrintOptions o;
  o.preserve_proto_field_names = true;
  (void)google::protobuf::util::MessageToJsonString(m, &out, o);
  std::printf("%s\n", out.c_str());
  std::fflush(stdout);
}

bool Json() { return absl::GetFlag(FLAGS_json); }

// With --json, every item as a line of JSON (true); false: print a table.
template <typename Items>
bool PrintedAsJson(const Items& items) {
  if (!Json()) return false;
  for (const auto& m : items) PrintJson(m);
  return true;
}

// One object: JSON with --json, else its table (`table`: PrintDatasets, PrintJobs).
template <typename M>
void PrintOne(const M& m, void (*table)(const std::vector<const M*>&)) {
  if (Json()) {
    PrintJson(m);
  } else {
    table({&m});
  }
}

std::string StateName(v1::JobState s) { return v1::JobState_Name(s); }

struct Stubs {
  std::unique_ptr<v1::JobService::Stub> jobs;
  std::unique_ptr<v1::DatasetService::Stub> datasets;
  std::unique_ptr<v1::AdapterService::Stub> adapters;
  std::unique_ptr<v1::InferenceService::Stub> inference;
};

// ---- datasets -----------------------------------------------------------------

void PrintDatasets(const std::vector<const v1::Dataset*>& ds) {
  std::vector<std::vector<std::string>> rows;
  for (const auto* d : ds) {
    rows.push_back(
        {d->id(), d->name(), absl::AsciiStrToLower(v1::DataFormat_Name(d->format())),
         absl::StrCat(d->num_rows()), Bytes(d->size_bytes()),
         d->label_kind() == v1::REGRESSION ? "regression" : absl::StrJoin(d->label_names(), ","),
         d->sha256().substr(0, 12)});
  }
  PrintTable({"ID", "NAME", "FORMAT", "ROWS", "SIZE", "LABELS", "SHA256"}, rows);
}

bool ApplyGluePreset(const std::string& task, v1::DatasetHeader* h) {
  std::string t = absl::AsciiStrToUpper(task);
  h->set_format(v1::TSV);
  h->set_has_header(true);
  h->set_quoting(false);
  if (t == "MRPC") {
    h->set_text_column("3");
    h->set_text_pair_column("4");
    h->set_label_column("0");
  } else if (t == "SST-2" || t == "SST2") {
    h->set_text_column("sentence");
    h->set_label_column("label");
  } else if (t == "COLA") {
    h->set_has_header(false);
    h->set_text_column("3");
    h->set_label_column("1");
  } else if (t == "STS-B" || t == "STSB") {
    h->set_text_column("sentence1");
    h->set_text_pair_column("sentence2");
    h->set_label_column("score");
    h->set_label_kind(v1::REGRESSION);
  } else if (t == "QNLI") {
    h->set_text_column("question");
    h->set_text_pair_column("sentence");
    h->set_label_column("label");
  } else if (t == "RTE") {
    h->set_text_column("sentence1");
    h->set_text_pair_column("sentence2");
    h->set_label_column("label");
  } else {
    return false;
  }
  return true;
}

int Upload(Stubs& s, const std::vector<std::string>& args) {
  if (args.size() != 1)
    return Fail("usage: metattctl upload FILE [--name N] [--format tsv|csv|jsonl] ...");
  const std::string& path = args[0];
  std::ifstream in(path, std::ios::binary);
  if (!in) return Fail(absl::StrCat("cannot read ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string bytes = ss.str();

  v1::UploadDatasetRequest first;
  v1::DatasetHeader* h = first.mutable_header();
  std::string base = path.substr(path.find_last_of('/') + 1);
  h->set_name(absl::GetFlag(FLAGS_name).empty() ? base : absl::GetFlag(FLAGS_name));
  std::string format = absl::GetFlag(FLAGS_format);
  if (format.empty()) {
    std::string ext = base.substr(base.find_last_of('.') + 1);
    format = ext == "csv" ? "csv" : ext == "jsonl" || ext == "json" ? "jsonl" : "tsv";
  }
  const auto data_format = Choice("--format", kFormats, format);
  if (!data_format.ok()) return Fail(std::string(data_format.status().message()));
  h->set_format(*data_format);
  h->set_has_header(absl::GetFlag(FLAGS_has_header));
  h->set_text_column(absl::GetFlag(FLAGS_text_column));
  h->set_text_pair_column(absl::GetFlag(FLAGS_text_pair_column));
  h->set_label_column(absl::GetFlag(FLAGS_label_column));
  h->set_label_kind(absl::GetFlag(FLAGS_label_kind) == "regression" ? v1::REGRESSION
                                                                    : v1::CLASSIFICATION);
  h->set_quoting(absl::GetFlag(FLAGS_quoting));
  if (!absl::GetFlag(FLAGS_glue).empty() && !ApplyGluePreset(absl::GetFlag(FLAGS_glue), h)) {
    return Fail(absl::StrCat("--glue: unknown GLUE task '", absl::GetFlag(FLAGS_glue), "'"));
  }

  ClientContext ctx;
  SetDeadline(&ctx, /*stream=*/true);
  v1::UploadDatasetResponse resp;
  auto writer = s.datasets->UploadDataset(&ctx, &resp);
  bool ok = writer->Write(first);
  constexpr size_t kChunk = 256 << 10;
  for (size_t off = 0; ok && off < bytes.size(); off += kChunk) {
    v1::UploadDatasetRequest c;
    c.set_chunk(bytes.substr(off, kChunk));
    ok = writer->Write(c);
    double done = static_cast<double>(std::min(off + kChunk, bytes.size()));
    std::fprintf(stderr, "\rupload %s %s / %s",
                 Bar(done, static_cast<double>(bytes.size())).c_str(),
                 Bytes(static_cast<int64_t>(done)).c_str(),
                 Bytes(static_cast<int64_t>(bytes.size())).c_str());
  }
  std::fprintf(stderr, "\n");
  writer->WritesDone();
  grpc::Status st = writer->Finish();
  if (!st.ok()) return Fail(absl::StrCat("upload ", path), st);
  PrintOne(resp.dataset(), PrintDatasets);
  return 0;
}

int Datasets(Stubs& s, const std::vector<std::string>& args) {
  std::string sub = args.empty() ? "list" : args[0];
  ClientContext ctx;
  SetDeadline(&ctx);
  if (sub == "list") {
    v1::ListDatasetsResponse resp;
    auto st = s.datasets->ListDatasets(&ctx, {}, &resp);
    if (!st.ok()) return Fail("datasets list", st);
    if (PrintedAsJson(resp.datasets())) return 0;
    std::vector<const v1::Dataset*> ds;
    for (const auto& d : resp.datasets()) ds.push_back(&d);
    PrintDatasets(ds);
    return 0;
  }
  if (args.size() != 2) return Fail("usage: metattctl datasets list | get ID | delete ID");
  if (sub == "get") {
    v1::GetDatasetRequest req;
    req.set_dataset_id(args[1]);
    v1::GetDatasetResponse resp;
    auto st = s.datasets->GetDataset(&ctx, req, &resp);
    if (!st.ok()) return Fail("datasets get", st);
    PrintOne(resp.dataset(), PrintDatasets);
    return 0;
  }
  if (sub == "delete") {
    v1::DeleteDatasetRequest req;
    req.set_dataset_id(args[1]);
    v1::DeleteDatasetResponse resp;
    auto st = s.datasets->DeleteDataset(&ctx, req, &resp);
    if (!st.ok()) return Fail("datasets delete", st);
    if (!Json()) std::printf("deleted %s\n", args[1].c_str());
    return 0;
  }
  return Fail(absl::StrCat("datasets: unknown command '", sub, "'"));
}

// ---- jobs -----------------------------------------------------------------------

void PrintJobs(const std::vector<const v1::Job*>& jobs) {
  std::vector<std::vector<std::string>> rows;
  for (const auto* j : jobs) {
    std::vector<std::string> tasks;
    for (const auto& t : j->spec().tasks()) tasks.push_back(t.task_name());
    std::string result = j->result_family().empty()
                             ? ""
                             : absl::StrCat(j->result_family(), " v", j->result_version());
    rows.push_back({j->id(), StateName(j->state()), j->spec().family(), absl::StrJoin(tasks, ","),
                    absl::StrCat(j->step(), "/", j->total_steps()), Time(j->created_unix_ms()),
                    result.empty() ? j->failure_reason() : result});
  }
  PrintTable({"ID", "STATE", "FAMILY", "TASKS", "STEP", "CREATED", "RESULT"}, rows);
}

// Follows the job's events (progress on stderr) and ends with the job's row
// as the server has it after the last event (the final state, step and
// result), on stdout.
int Follow(Stubs& s, const std::string& id) {
  ClientContext ctx;
  SetDeadline(&ctx, /*stream=*/true);
  v1::StreamJobEventsRequest req;
  req.set_job_id(id);
  auto reader = s.jobs->StreamJobEvents(&ctx, req);
  v1::JobEvent e;
  v1::JobState state = v1::JOB_STATE_UNSPECIFIED;
  std::string reason;
  bool bar_open = false;
  auto end_bar = [&] {
    if (bar_open) std::fprintf(stderr, "\n");
    bar_open = false;
  };
  while (reader->Read(&e)) {
    if (Json()) PrintJson(e);
    if (e.has_state()) {
      state = e.state().state();
      reason = e.state().reason();
      if (!Json()) {
        end_bar();
        std::fprintf(stderr, "%s %s%s\n", id.c_str(), StateName(state).c_str(),
                     reason.empty() ? "" : (": " + reason).c_str());
      }
    } else if (Json()) {
      continue;
    } else if (e.has_progress()) {
      const auto& p = e.progress();
      std::fprintf(stderr, "\r%s step %lld/%lld  loss %s  %s ex/s  ETA %s   ",
                   Bar(static_cast<double>(p.step()), static_cast<double>(p.total_steps())).c_str(),
                   static_cast<long long>(p.step()), static_cast<long long>(p.total_steps()),
                   Num(p.loss()).c_str(), Num(p.examples_per_second(), 3).c_str(),
                   Duration(p.eta_seconds()).c_str());
      bar_open = true;
    } else if (e.has_eval()) {
      end_bar();
      std::vector<std::string> parts;
      std::map<std::string, double> sorted(e.eval().metrics().begin(), e.eval().metrics().end());
      for (const auto& [k, v] : sorted) parts.push_back(absl::StrCat(k, "=", Num(v)));
      std::fprintf(stderr, "eval @ step %lld: %s\n", static_cast<long long>(e.eval().step()),
                   absl::StrJoin(parts, "  ").c_str());
    } else if (e.has_sweep()) {
      end_bar();
      std::vector<std::string> parts;
      for (const auto& b : e.sweep().bonds()) {
        parts.push_back(absl::StrCat("bond ", b.bond(), ": ", b.old_rank(), "->", b.new_rank(),
                                     " (discarded ", Num(b.discarded_weight(), 3), ")"));
      }
      std::fprintf(stderr, "DMRG sweep @ step %lld: %s\n", static_cast<long long>(e.sweep().step()),
                   absl::StrJoin(parts, ", ").c_str());
    } else if (e.has_checkpoint()) {
      end_bar();
      std::fprintf(stderr, "published %s version %lld\n", e.checkpoint().family().c_str(),
                   static_cast<long long>(e.checkpoint().version()));
    } else if (e.has_log()) {
      end_bar();
      std::fprintf(stderr, "%s\n", e.log().message().c_str());
    }
  }
  end_bar();
  grpc::Status st = reader->Finish();
  if (!st.ok()) return Fail(absl::StrCat("follow ", id), st);
  {
    ClientContext get_ctx;
    SetDeadline(&get_ctx);
    v1::GetJobRequest get;
    get.set_job_id(id);
    v1::GetJobResponse final_job;
    st = s.jobs->GetJob(&get_ctx, get, &final_job);
    if (!st.ok()) return Fail(absl::StrCat("jobs get ", id), st);
    PrintOne(final_job.job(), PrintJobs);
    state = final_job.job().state();
  }
  if (state == v1::FAILED) return 1;
  if (state == v1::CANCELLED) return 3;
  return state == v1::SUCCEEDED ? 0 : 1;
}

int CreateJob(Stubs& s) {
  v1::CreateJobRequest req;
  v1::JobSpec* spec = req.mutable_spec();
  const std::string kind = absl::GetFlag(FLAGS_kind);
  const auto job_kind = Choice("--kind", kKinds, kind);
  if (!job_kind.ok()) return Fail(std::string(job_kind.status().message()));
  spec->set_kind(*job_kind);
  spec->set_family(absl::GetFlag(FLAGS_family));
  auto tasks = absl::GetFlag(FLAGS_task);
  auto datasets = absl::GetFlag(FLAGS_dataset);
  auto evals = absl::GetFlag(FLAGS_eval_dataset);
  if (tasks.empty() || tasks.size() != datasets.size()) {
    return Fail("--task and --dataset: give one dataset per task (comma separated)");
  }
  for (size_t i = 0; i < tasks.size(); ++i) {
    auto* t = spec->add_tasks();
    t->set_task_name(tasks[i]);
    t->set_dataset_id(datasets[i]);
    if (i < evals.size()) t->set_eval_dataset_id(evals[i]);
    t->set_eval_fraction(absl::GetFlag(FLAGS_eval_fraction));
    t->set_metric(absl::GetFlag(FLAGS_metric));
  }
  auto* a = spec->mutable_adapter();
  a->set_form(absl::GetFlag(FLAGS_form));
  for (const auto& r : absl::GetFlag(FLAGS_ranks)) {
    int64_t v;
    if (!absl::SimpleAtoi(r, &v)) return Fail(absl::StrCat("--ranks: '", r, "' is not an integer"));
    a->add_ranks(v);
  }
  for (const auto& p : absl::GetFlag(FLAGS_projections)) a->add_projections(p);
  a->set_init(absl::GetFlag(FLAGS_init));
  // Only the flags given are sent (proto3 optional): the rest stay auto.
  if (auto v = absl::GetFlag(FLAGS_alpha)) a->set_alpha(*v);
  auto* h = spec->mutable_hparams();
  if (auto v = absl::GetFlag(FLAGS_steps)) h->set_max_steps(*v);
  if (auto v = absl::GetFlag(FLAGS_batch_size)) h->set_batch_size(*v);
  if (auto v = absl::GetFlag(FLAGS_lr)) h->set_learning_rate(*v);
  if (auto v = absl::GetFlag(FLAGS_weight_decay)) h->set_weight_decay(*v);
  if (auto v = absl::GetFlag(FLAGS_warmup_ratio)) h->set_warmup_ratio(*v);
  if (auto v = absl::GetFlag(FLAGS_head_first_ratio)) h->set_head_first_ratio(*v);
  if (auto v = absl::GetFlag(FLAGS_grad_clip)) h->set_grad_clip(*v);
  if (auto v = absl::GetFlag(FLAGS_eval_every)) h->set_eval_every(*v);
  if (auto v = absl::GetFlag(FLAGS_max_length)) h->set_max_length(*v);
  if (auto v = absl::GetFlag(FLAGS_patience)) h->set_early_stop_patience(*v);
  h->set_pooling(absl::GetFlag(FLAGS_pooling));
  if (auto v = absl::GetFlag(FLAGS_seed)) h->set_seed(*v);
  req.set_idempotency_key(absl::GetFlag(FLAGS_idempotency_key));
  ClientContext ctx;
  SetDeadline(&ctx);
  v1::CreateJobResponse resp;
  auto st = s.jobs->CreateJob(&ctx, req, &resp);
  if (!st.ok()) return Fail("jobs create", st);
  if (absl::GetFlag(FLAGS_follow)) {
    // The create response is QUEUED at step 0: with --follow only the final
    // row (printed by Follow) goes to stdout.
    if (!Json()) std::fprintf(stderr, "created %s\n", resp.job().id().c_str());
    return Follow(s, resp.job().id());
  }
  PrintOne(resp.job(), PrintJobs);
  return 0;
}

// jobs checkpoints ID: the job's resumable checkpoints (step, time, metrics).
int JobCheckpoints(Stubs& s, const std::string& id) {
  ClientContext ctx;
  SetDeadline(&ctx);
  v1::ListJobCheckpointsRequest req;
  req.set_job_id(id);
  v1::ListJobCheckpointsResponse resp;
  auto st = s.jobs->ListJobCheckpoints(&ctx, req, &resp);
  if (!st.ok()) return Fail("jobs checkpoints", st);
  if (PrintedAsJson(resp.checkpoints())) return 0;
  std::vector<std::vector<std::string>> rows;
  for (const auto& c : resp.checkpoints()) {
    std::map<std::string, double> sorted(c.metrics().begin(), c.metrics().end());
    std::vector<std::string> parts;
    for (const auto& [k, v] : sorted) parts.push_back(absl::StrCat(k, "=", Num(v)));
    rows.push_back({absl::StrCat(c.step(), "/", c.total_steps()),
                    absl::FormatTime("%Y-%m-%dT%H:%M:%SZ", absl::FromUnixMillis(c.time_unix_ms()),
                                     absl::UTCTimeZone()),
                    absl::StrJoin(parts, " ")});
  }
  PrintTable({"STEP", "TIME", "METRICS"}, rows);
  return 0;
}

int Jobs(Stubs& s, const std::vector<std::string>& args) {
  std::string sub = args.empty() ? "list" : args[0];
  if (sub == "create") return CreateJob(s);
  if (sub == "list") {
    v1::ListJobsRequest req;
    std::string state = absl::AsciiStrToUpper(absl::GetFlag(FLAGS_state));
    if (!state.empty()) {
      v1::JobState js;
      if (!v1::JobState_Parse(state, &js))
        return Fail(absl::StrCat("--state: unknown state '", state, "'"));
      req.set_state(js);
    }
    req.set_page_size(absl::GetFlag(FLAGS_page_size));
    std::vector<v1::Job> all;
    do {
      ClientContext ctx;
      SetDeadline(&ctx);
      v1::ListJobsResponse resp;
      auto st = s.jobs->ListJobs(&ctx, req, &resp);
      if (!st.ok()) return Fail("jobs list", st);
      for (const auto& j : resp.jobs()) all.push_back(j);
      req.set_page_token(resp.next_page_token());
    } while (!req.page_token().empty());
    if (PrintedAsJson(all)) return 0;
    std::vector<const v1::Job*> ptrs;
    for (const auto& j : all) ptrs.push_back(&j);
    PrintJobs(ptrs);
    return 0;
  }
  if (args.size() != 2) {
    return Fail("usage: metattctl jobs create|list|get ID|cancel ID|follow ID|checkpoints ID");
  }
  if (sub == "follow") return Follow(s, args[1]);
  if (sub == "checkpoints") return JobCheckpoints(s, args[1]);
  ClientContext ctx;
  SetDeadline(&ctx);
  v1::Job job;
  grpc::Status st;
  if (sub == "get") {
    v1::GetJobRequest req;
    req.set_job_id(args[1]);
    v1::GetJobResponse resp;
    st = s.jobs->GetJob(&ctx, req, &resp);
    job = resp.job();
  } else if (sub == "cancel") {
    v1::CancelJobRequest req;
    req.set_job_id(args[1]);
    v1::CancelJobResponse resp;
    st = s.jobs->CancelJob(&ctx, req, &resp);
    job = resp.job();
  } else {
    return Fail(absl::StrCat("jobs: unknown command '", sub, "'"));
  }
  if (!st.ok()) return Fail(absl::StrCat("jobs ", sub), st);
  PrintOne(job, PrintJobs);
  return 0;
}

// ---- families / tasks -------------------------------------------------------------

std::string Metrics(const v1::Task& t) {
  std::map<std::string, double> sorted(t.eval_metrics().begin(), t.eval_metrics().end());
  std::vector<std::string> parts;
  for (const auto& [k, v] : sorted) parts.push_back(absl::StrCat(k, "=", Num(v)));
  return absl::StrJoin(parts, " ");
}

void PrintTasks(const google::protobuf::RepeatedPtrField<v1::Task>& tasks) {
  std::vector<std::vector<std::string>> rows;
  for (const auto& t : tasks) {
    rows.push_back({absl::StrCat(t.index()), t.name(),
                    t.regression() ? "regression" : absl::StrJoin(t.label_names(), ","),
                    Metrics(t)});
  }
  PrintTable({"INDEX", "TASK", "LABELS", "EVAL"}, rows);
}

// All tasks of a version (older servers leave task_count 0: then `tasks` is all).
int64_t TaskCount(const v1::FamilyVersion& v) {
  return std::max<int64_t>(v.task_count(), v.tasks_size());
}

// The names of the tasks a FamilyVersion carries (the first 100 of a large
// family); the rest are counted, `tasks list` pages through them.
std::string TaskNames(const v1::FamilyVersion& v) {
  std::vector<std::string> names;
  const int64_t total = TaskCount(v);
  const int shown = total > v.tasks_size() ? std::min(v.tasks_size(), 5) : v.tasks_size();
  for (int i = 0; i < shown; ++i) names.push_back(v.tasks(i).name());
  std::string out = absl::StrJoin(names, ",");
  if (shown < total) absl::StrAppend(&out, ",... (", total - shown, " more)");
  return out;
}

// families export NAME DIR: the version's files into DIR (adapters/FORMAT.md:
// family.json + cores.safetensors, or a PEFT folder + heads.safetensors +
// family.json for a LoRA family), with a progress bar.
int ExportFamily(Stubs& s, const std::string& family, const std::string& dir) {
  ClientContext ctx;
  SetDeadline(&ctx, /*stream=*/true);
  v1::ExportFamilyRequest req;
  req.set_family(family);
  req.set_version(absl::GetFlag(FLAGS_version));
  auto reader = s.adapters->ExportFamily(&ctx, req);
  std::vector<std::pair<std::string, std::string>> files;  // name, bytes
  std::vector<int64_t> sizes;
  v1::FamilyChunk c;
  while (reader->Read(&c)) {
    if (!c.file_name().empty()) {
      if (c.file_name().find('/') != std::string::npos || c.file_name() == "." ||
          c.file_name() == "..")
        return Fail(absl::StrCat("families export: the server sent a bad file name '",
                                 c.file_name(), "'"));
      files.emplace_back(c.file_name(), "");
      sizes.push_back(c.file_size());
    }
    if (files.empty()) return Fail("families export: the server sent data before a file name");
    files.back().second += c.data();
    std::fprintf(stderr, "\rexport %-28s %s %s", files.back().first.c_str(),
                 Bar(static_cast<double>(files.back().second.size()),
                     static_cast<double>(std::max<int64_t>(sizes.back(), 1)))
                     .c_str(),
                 Bytes(static_cast<int64_t>(files.back().second.size())).c_str());
  }
  std::fprintf(stderr, "\n");
  grpc::Status st = reader->Finish();
  if (!st.ok()) return Fail(absl::StrCat("families export ", family), st);
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return Fail(absl::StrCat("cannot create ", dir, ": ", ec.message()));
  for (const auto& [name, bytes] : files) {
    const std::string path = dir + "/" + name;
    std::ofstream out(path + ".tmp", std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    out.close();
    if (!out) return Fail(absl::StrCat("cannot write ", path));
    std::filesystem::rename(path + ".tmp", path, ec);
    if (ec) return Fail(absl::StrCat("cannot write ", path, ": ", ec.message()));
  }
  if (Json()) {
    std::printf("{\"family\":\"%s\",\"dir\":\"%s\",\"files\":[", family.c_str(), dir.c_str());
    for (size_t i = 0; i < files.size(); ++i)
      std::printf("%s\"%s\"", i ? "," : "", files[i].first.c_str());
    std::printf("]}\n");
  } else {
    for (const auto& [name, bytes] : files)
      std::printf("%s/%s  %s\n", dir.c_str(), name.c_str(),
                  Bytes(static_cast<int64_t>(bytes.size())).c_str());
  }
  return 0;
}

// families import DIR [--family NAME]: an exported family, or a PEFT LoRA
// folder (adapter_config.json + adapter_model.safetensors) with
// heads.safetensors beside it; every *.json and *.safetensors file is sent.
int ImportFamily(Stubs& s, const std::string& dir) {
  std::vector<std::string> names;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
    const std::string n = e.path().filename().string();
    if (!e.is_regular_file() || n.empty() || n[0] == '.') continue;
    if (absl::EndsWith(n, ".json") || absl::EndsWith(n, ".safetensors")) names.push_back(n);
  }
  if (ec) return Fail(absl::StrCat("cannot read ", dir, ": ", ec.message()));
  if (names.empty()) return Fail(absl::StrCat(dir, ": no .json or .safetensors file"));
  std::sort(names.begin(), names.end());
  ClientContext ctx;
  SetDeadline(&ctx, /*stream=*/true);
  v1::ImportFamilyResponse resp;
  auto writer = s.adapters->ImportFamily(&ctx, &resp);
  v1::ImportFamilyRequest first;
  first.set_family(absl::GetFlag(FLAGS_family));
  bool ok = writer->Write(first);
  constexpr size_t kChunk = 1 << 20;
  for (const std::string& name : names) {
    std::ifstream in(dir + "/" + name, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    const std::string bytes = ss.str();
    size_t off = 0;
    do {
      v1::ImportFamilyRequest m;
      v1::FamilyChunk* c = m.mutable_chunk();
      if (off == 0) {
        c->set_file_name(name);
        c->set_file_size(static_cast<int64_t>(bytes.size()));
      }
      c->set_data(bytes.substr(off, kChunk));
      off += std::min(kChunk, bytes.size() - off);
      ok = ok && writer->Write(m);
      std::fprintf(stderr, "\rimport %-28s %s %s", name.c_str(),
                   Bar(static_cast<double>(off), static_cast<double>(std::max<size_t>(bytes.size(), 1)))
                       .c_str(),
                   Bytes(static_cast<int64_t>(off)).c_str());
    } while (ok && off < bytes.size());
  }
  std::fprintf(stderr, "\n");
  writer->WritesDone();
  grpc::Status st = writer->Finish();
  if (!st.ok()) return Fail(absl::StrCat("families import ", dir), st);
  if (Json()) {
    PrintJson(resp.version());
  } else {
    const auto& v = resp.version();
    std::printf("imported %s version %lld  form %s  %lld tasks\n", v.family().c_str(),
                static_cast<long long>(v.version()), v.form().c_str(),
                static_cast<long long>(TaskCount(v)));
  }
  return 0;
}

int Families(Stubs& s, const std::vector<std::string>& args) {
  std::string sub = args.empty() ? "list" : args[0];
  if (sub == "export" && args.size() == 3) return ExportFamily(s, args[1], args[2]);
  if (sub == "import" && args.size() == 2) return ImportFamily(s, args[1]);
  ClientContext ctx;
  SetDeadline(&ctx);
  if (sub == "list") {
    v1::ListFamiliesResponse resp;
    auto st = s.adapters->ListFamilies(&ctx, {}, &resp);
    if (!st.ok()) return Fail("families list", st);
    if (PrintedAsJson(resp.families())) return 0;
    std::vector<std::vector<std::string>> rows;
    for (const auto& f : resp.families()) {
      if (f.versions_size() == 0) continue;
      const auto& v = f.versions(f.versions_size() - 1);
      rows.push_back({f.name(), absl::StrCat(f.latest_version()), v.form(),
                      absl::StrJoin(v.ranks(), ","), absl::StrCat(v.adapter_parameters()),
                      absl::StrCat(TaskCount(v)), TaskNames(v)});
    }
    PrintTable({"FAMILY", "VERSION", "FORM", "RANKS", "PARAMETERS", "NTASKS", "TASKS"}, rows);
    return 0;
  }
  if (sub == "get" && args.size() == 2) {
    v1::GetFamilyRequest req;
    req.set_family(args[1]);
    v1::GetFamilyResponse resp;
    auto st = s.adapters->GetFamily(&ctx, req, &resp);
    if (!st.ok()) return Fail("families get", st);
    if (Json()) {
      PrintJson(resp.family());
      return 0;
    }
    for (const auto& v : resp.family().versions()) {
      std::printf(
          "%s version %lld  form %s  ranks [%s]  %lld parameters  %lld tasks  created %s by %s\n",
          v.family().c_str(), static_cast<long long>(v.version()), v.form().c_str(),
          absl::StrJoin(v.ranks(), ",").c_str(), static_cast<long long>(v.adapter_parameters()),
          static_cast<long long>(TaskCount(v)), Time(v.created_unix_ms()).c_str(),
          v.created_by_job().c_str());
      PrintTasks(v.tasks());
      if (TaskCount(v) > v.tasks_size()) {
        std::printf("(first %d of %lld tasks: metattctl tasks list --family %s --version %lld)\n",
                    v.tasks_size(), static_cast<long long>(TaskCount(v)), v.family().c_str(),
                    static_cast<long long>(v.version()));
      }
      std::printf("\n");
    }
    return 0;
  }
  return Fail(
      "usage: metattctl families list | get NAME | export NAME DIR [--version N] | "
      "import DIR [--family NAME]");
}

int Tasks(Stubs& s, const std::vector<std::string>& args) {
  if (!args.empty() && args[0] != "list") return Fail("usage: metattctl tasks list --family F");
  v1::ListTasksRequest req;
  req.set_family(absl::GetFlag(FLAGS_family));
  req.set_version(absl::GetFlag(FLAGS_version));
  req.set_page_size(absl::GetFlag(FLAGS_page_size));
  // Every page, merged into one response (a family can hold 10^6 tasks, one
  // page at most 10000); the first page's version is pinned by the tokens.
  v1::ListTasksResponse resp;
  do {
    v1::ListTasksResponse page;
    ClientContext ctx;
    SetDeadline(&ctx);
    auto st = s.adapters->ListTasks(&ctx, req, &page);
    if (!st.ok()) return Fail("tasks list", st);
    req.set_page_token(page.next_page_token());
    if (resp.family().empty()) {
      resp.set_family(page.family());
      resp.set_version(page.version());
      resp.set_task_count(page.task_count());
      resp.mutable_tasks()->Reserve(static_cast<int>(page.task_count()));
    }
    for (auto& t : *page.mutable_tasks()) resp.add_tasks()->Swap(&t);
  } while (!req.page_token().empty());
  if (Json()) {
    PrintJson(resp);
    return 0;
  }
  std::printf("%s version %lld\n", resp.family().c_str(), static_cast<long long>(resp.version()));
  PrintTasks(resp.tasks());
  return 0;
}

// ---- predict ------------------------------------------------------------------------

int Predict(Stubs& s) {
  v1::PredictRequest req;
  std::vector<std::string> texts = {absl::GetFlag(FLAGS_text)};
  if (texts[0].empty()) return Fail("predict: --text is required");
  std::vector<std::string> tasks = absl::GetFlag(FLAGS_task);
  if (tasks.empty() && absl::GetFlag(FLAGS_task_index) < 0) {
    return Fail("predict: --task or --task_index is required");
  }
  // Several --task values (or --task='*', every task of the family) go as
  // one input with a task list: one row per task of one batch.
  for (const auto& text : texts) {
    auto* in = req.add_inputs();
    in->set_family(absl::GetFlag(FLAGS_family));
    in->set_version(absl::GetFlag(FLAGS_version));
    if (tasks.size() == 1 && tasks[0] == "*") {
      in->mutable_tasks()->set_all(true);
    } else if (tasks.size() > 1) {
      for (const auto& t : tasks) in->mutable_tasks()->add_names(t);
    } else if (tasks.size() == 1) {
      in->set_task(tasks[0]);
    } else {
      in->set_task_index(absl::GetFlag(FLAGS_task_index));
    }
    in->set_text(text);
    if (!absl::GetFlag(FLAGS_text_pair).empty()) in->set_text_pair(absl::GetFlag(FLAGS_text_pair));
  }
  ClientContext ctx;
  SetDeadline(&ctx);
  v1::PredictResponse resp;
  auto st = s.inference->Predict(&ctx, req, &resp);
  if (!st.ok()) return Fail("predict", st);
  if (Json()) {
    PrintJson(resp);
    return 0;
  }
  // Sentence pairs show both texts (a PAIR column only when some input has one).
  bool any_pair = false;
  for (const auto& in : req.inputs()) any_pair = any_pair || !in.text_pair().empty();
  const auto clip = [](std::string t) { return t.size() > 50 ? t.substr(0, 47) + "..." : t; };
  std::vector<std::vector<std::string>> rows;
  for (int i = 0; i < resp.predictions_size(); ++i) {
    const auto& p = resp.predictions(i);
    std::vector<std::string> scores;
    for (float f : p.scores()) scores.push_back(Num(f, 3));
    const auto& in = req.inputs(p.input_index() < req.inputs_size() ? p.input_index() : 0);
    std::vector<std::string> row = {p.task(), clip(in.text())};
    if (any_pair) row.push_back(clip(in.text_pair()));
    row.push_back(p.regression()
                      ? Num(p.value())
                      : (p.label_name().empty() ? absl::StrCat(p.label()) : p.label_name()));
    row.push_back(absl::StrJoin(scores, ","));
    row.push_back(absl::StrCat(Num((p.queue_seconds() + p.model_seconds()) * 1000, 3), " ms"));
    rows.push_back(std::move(row));
  }
  std::vector<std::string> header = {"TASK", "TEXT"};
  if (any_pair) header.push_back("PAIR");
  for (const char* h : {"PREDICTION", "SCORES", "LATENCY"}) header.push_back(h);
  PrintTable(header, rows);
  return 0;
}

// ---- generate -----------------------------------------------------------------------

// Streams the generated text to stdout as it arrives; the finish reason and
// usage go to stderr (--json: one JSON object per chunk on stdout).
int Generate(Stubs& s) {
  v1::GenerateRequest req;
  req.set_family(absl::GetFlag(FLAGS_family));
  req.set_version(absl::GetFlag(FLAGS_version));
  const std::vector<std::string> tasks = absl::GetFlag(FLAGS_task);
  if (tasks.size() > 1) return Fail("generate: --task: one task per generation");
  if (!tasks.empty()) req.set_task(tasks[0]);
  const std::string prompt = absl::GetFlag(FLAGS_prompt), chat = absl::GetFlag(FLAGS_chat);
  if (prompt.empty() == chat.empty()) return Fail("generate: give --prompt or --chat (one)");
  if (!prompt.empty()) {
    if (!absl::GetFlag(FLAGS_system).empty()) return Fail("generate: --system needs --chat");
    req.set_prompt(prompt);
  } else {
    if (!absl::GetFlag(FLAGS_system).empty()) {
      auto* m = req.mutable_messages()->add_messages();
      m->set_role("system");
      m->set_content(absl::GetFlag(FLAGS_system));
    }
    auto* m = req.mutable_messages()->add_messages();
    m->set_role("user");
    m->set_content(chat);
  }
  req.set_max_tokens(absl::GetFlag(FLAGS_max_tokens));
  req.set_temperature(static_cast<float>(absl::GetFlag(FLAGS_temperature)));
  req.set_top_p(static_cast<float>(absl::GetFlag(FLAGS_top_p)));
  req.set_top_k(absl::GetFlag(FLAGS_top_k));
  if (auto v = absl::GetFlag(FLAGS_seed)) req.set_seed(*v);
  for (const auto& stop : absl::GetFlag(FLAGS_stop)) req.add_stop(stop);
  ClientContext ctx;
  SetDeadline(&ctx, /*stream=*/true);
  auto reader = s.inference->GenerateStream(&ctx, req);
  v1::GenerateChunk chunk, last;
  while (reader->Read(&chunk)) {
    if (Json()) {
      std::string line;
      google::protobuf::util::JsonPrintOptions o;
      o.preserve_proto_field_names = true;
      (void)google::protobuf::util::MessageToJsonString(chunk, &line, o);
      std::printf("%s\n", line.c_str());
    } else {
      std::fwrite(chunk.text().data(), 1, chunk.text().size(), stdout);
    }
    std::fflush(stdout);
    if (!chunk.finish_reason().empty()) last = chunk;
  }
  auto st = reader->Finish();
  if (!st.ok()) {
    if (!Json()) std::printf("\n");
    return Fail("generate", st);
  }
  if (!Json()) {
    std::printf("\n");
    std::fprintf(stderr, "[%s%s: %s, %lld prompt + %lld completion tokens, first token %s s]\n",
                 last.task().empty() ? "base model" : last.family().c_str(),
                 last.task().empty() ? "" : absl::StrCat("/", last.task()).c_str(),
                 last.finish_reason().c_str(),
                 static_cast<long long>(last.usage().prompt_tokens()),
                 static_cast<long long>(last.usage().completion_tokens()),
                 Num(last.time_to_first_token_seconds(), 3).c_str());
  }
  return 0;
}

// grpc.health.v1.Health/Check through the generic stub (Debian ships no
// generated health stubs): exit 0 when the server answers SERVING. Used by the
// Docker HEALTHCHECK.
int Health(const std::shared_ptr<grpc::Channel>& channel) {
  grpc::GenericStub stub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  grpc::Slice empty("");  // HealthCheckRequest{service: ""}: the whole server
  grpc::ByteBuffer request(&empty, 1), response;
  std::promise<grpc::Status> done;
  stub.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request, &response,
                 [&done](grpc::Status st) { done.set_value(std::move(st)); });
  grpc::Status st = done.get_future().get();
  if (!st.ok()) return Fail(absl::StrCat("health: ", st.error_message()));
  std::vector<grpc::Slice> slices;
  std::string bytes;
  if (response.Dump(&slices).ok())
    for (const auto& sl : slices) bytes.append(reinterpret_cast<const char*>(sl.begin()), sl.size());
  // HealthCheckResponse{status: SERVING (1)} encodes as field 1 varint 1.
  const bool serving = bytes == std::string("\x08\x01", 2);
  std::cout << (serving ? "SERVING" : "NOT_SERVING") << "\n";
  return serving ? 0 : 1;
}

// The line of a tokens file for a token read from stdin (or the argument):
// only its SHA-256 is stored on the server.
int HashToken(const std::vector<std::string>& args) {
  std::string token;
  if (args.size() == 2) {
    token = args[1];
  } else if (args.size() == 1) {
    std::getline(std::cin, token);
  } else {
    return Fail("usage: metattctl hash-token [TOKEN]   (reads the token from stdin without one)");
  }
  token = std::string(absl::StripAsciiWhitespace(token));
  if (token.size() < 16) return Fail("hash-token: use a token of at least 16 characters");
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_Digest(token.data(), token.size(), digest, &len, EVP_sha256(), nullptr);
  std::string hex;
  for (unsigned int i = 0; i < len; ++i) {
    absl::StrAppend(&hex, absl::Hex(digest[i], absl::kZeroPad2));
  }
  std::cout << hex << "\n";
  return 0;
}

int ReadFile(const std::string& flag, const std::string& path, std::string* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Fail(absl::StrCat("--", flag, ": cannot read ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  *out = ss.str();
  return 0;
}

// ---- help --------------------------------------------------------------------------

// Each command's usage and the flags it reads (the connection flags apply to
// every command that talks to a server).
struct CommandHelp {
  const char* name;
  const char* usage;
  std::vector<const char*> flags;
};

const std::vector<const char*> kConnectionFlags = {"server",  "token",    "tls_ca", "tls_cert",
                                                   "tls_key", "timeout", "json"};

const std::vector<CommandHelp>& Commands() {
  static const auto* kCommands = new std::vector<CommandHelp>{
      {"upload", "metattctl upload FILE [--glue TASK | --format ... --text_column ...]",
       {"name", "format", "has_header", "text_column", "text_pair_column", "label_column",
        "label_kind", "quoting", "glue"}},
      {"datasets", "metattctl datasets list | get ID | delete ID", {}},
      {"jobs",
       "metattctl jobs create --family F --task T --dataset ID [--follow] | list [--state S] | "
       "get ID | cancel ID | follow ID | checkpoints ID",
       {"kind", "family", "task", "dataset", "eval_dataset", "eval_fraction", "metric", "form",
        "ranks", "projections", "init", "alpha", "steps", "batch_size", "lr", "weight_decay",
        "warmup_ratio", "head_first_ratio", "grad_clip", "eval_every", "max_length", "patience", "pooling", "seed",
        "idempotency_key", "follow", "state", "page_size"}},
      {"families",
       "metattctl families list | get NAME | export NAME DIR [--version N] | import DIR "
       "[--family NAME]   (adapters/FORMAT.md: MetaTT files, or a PEFT folder for LoRA)",
       {"version", "family"}},
      {"tasks", "metattctl tasks list --family F [--version N]", {"family", "version", "page_size"}},
      {"predict",
       "metattctl predict --family F --task T[,T2...] --text TEXT [--text_pair TEXT]",
       {"family", "task", "task_index", "version", "text", "text_pair"}},
      {"generate",
       "metattctl generate [--family F --task T] --chat TEXT [--system TEXT] | --prompt TEXT "
       "[--max_tokens N] [--temperature T --top_p P --top_k K --seed S] [--stop S1,S2]   "
       "(a decoder server; streams the text)",
       {"family", "task", "version", "prompt", "chat", "system", "max_tokens", "temperature",
        "top_p", "top_k", "seed", "stop"}},
      {"health", "metattctl health   (grpc.health.v1: exit 0 when SERVING)", {}},
      {"hash-token", "metattctl hash-token [TOKEN]   (reads stdin without one; no server)", {}},
  };
  return *kCommands;
}

void PrintFlags(const std::vector<const char*>& names) {
  for (const char* name : names) {
    const absl::CommandLineFlag* f = absl::FindCommandLineFlag(name);
    if (f == nullptr) continue;
    std::string def = f->DefaultValue();
    std::printf("  --%s  %s", name, f->Help().c_str());
    if (!def.empty() && def != "false") std::printf(" (default: %s)", def.c_str());
    std::printf("\n");
  }
}

// `metattctl --help` and `metattctl COMMAND --help`: the command's usage and
// only its flags (`--helpfull` still lists every flag of the binary).
int PrintHelp(const std::string& command) {
  for (const auto& c : Commands()) {
    if (command != c.name) continue;
    std::printf("usage: %s\n", c.usage);
    if (!c.flags.empty()) {
      std::printf("\n%s flags:\n", c.name);
      PrintFlags(c.flags);
    }
    if (command != "hash-token") {
      std::printf("\nconnection flags:\n");
      PrintFlags(kConnectionFlags);
    }
    return 0;
  }
  std::printf("usage: metattctl COMMAND [flags]   (metattctl COMMAND --help: its flags)\n\n"
              "commands:\n");
  for (const auto& c : Commands()) std::printf("  %-10s %s\n", c.name, c.usage);
  std::printf("\nconnection flags:\n");
  PrintFlags(kConnectionFlags);
  return command.empty() ? 0 : Fail(absl::StrCat("unknown command '", command, "'"));
}

int Main(std::vector<std::string> args) {
  if (args.empty()) {
    return Fail(
        "usage: metattctl upload|datasets|jobs|families|tasks|predict|generate|health|hash-token ... "
        "(--help)");
  }
  if (args[0] == "hash-token") return HashToken(args);
  std::shared_ptr<grpc::ChannelCredentials> creds = grpc::InsecureChannelCredentials();
  if (!absl::GetFlag(FLAGS_tls_ca).empty()) {
    grpc::SslCredentialsOptions o;
    if (int rc = ReadFile("tls_ca", absl::GetFlag(FLAGS_tls_ca), &o.pem_root_certs)) return rc;
    if (!absl::GetFlag(FLAGS_tls_cert).empty()) {
      if (int rc = ReadFile("tls_cert", absl::GetFlag(FLAGS_tls_cert), &o.pem_cert_chain)) {
        return rc;
      }
      if (int rc = ReadFile("tls_key", absl::GetFlag(FLAGS_tls_key), &o.pem_private_key)) {
        return rc;
      }
    }
    creds = grpc::SslCredentials(o);
  } else if (!absl::GetFlag(FLAGS_tls_cert).empty()) {
    return Fail("--tls_cert: needs --tls_ca (the CA of the server's certificate)");
  }
  auto channel = grpc::CreateChannel(absl::GetFlag(FLAGS_server), creds);
  if (args[0] == "health") return Health(channel);
  Stubs s{v1::JobService::NewStub(channel), v1::DatasetService::NewStub(channel),
          v1::AdapterService::NewStub(channel), v1::InferenceService::NewStub(channel)};
  std::string cmd = args[0];
  args.erase(args.begin());
  if (cmd == "upload") return Upload(s, args);
  if (cmd == "datasets") return Datasets(s, args);
  if (cmd == "jobs") return Jobs(s, args);
  if (cmd == "families") return Families(s, args);
  if (cmd == "tasks") return Tasks(s, args);
  if (cmd == "predict") return Predict(s);
  if (cmd == "generate") return Generate(s);
  return Fail(absl::StrCat("unknown command '", cmd, "'"));
}

}  // namespace
}  // namespace metatt::ctl

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "metattctl upload|datasets|jobs|families|tasks|predict|generate|health ... [--server host:port] [--json]");
  // --help / -h: our per-command help (absl's --help would list every flag of
  // every command); the command is the first argument naming one.
  bool help = false;
  std::string command;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-help" || a == "-h" || a == "--help=true") help = true;
    for (const auto& c : metatt::ctl::Commands()) {
      if (command.empty() && a == c.name) command = a;
    }
  }
  if (help) return metatt::ctl::PrintHelp(command);
  std::vector<char*> rest = absl::ParseCommandLine(argc, argv);
  std::vector<std::string> args(rest.begin() + 1, rest.end());
  return metatt::ctl::Main(args);
}
