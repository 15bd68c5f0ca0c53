// metatt-train: offline fine-tuning of a MetaTT (or LoRA) adapter on a frozen
// BERT-family encoder. The same Trainer the server's jobs drive step by step.
//
//   metatt-train --task=MRPC --form=4d --rank=8 --steps=200 --out=/tmp/mrpc
//   metatt-train --train=a.tsv --eval=b.tsv --text_col=sentence --label_col=label ...
//   metatt-train --task=MRPC,CoLA --form=4+1d            (multi-task, mixed batches)
//   metatt-train --task=SST-2 --base_family=/tmp/mt --out=/tmp/mt2   (add a task,
//                                                         shared cores frozen)
//
// Prints one line per progress/eval/sweep event and a final JSON line
// ("result {...}"); with --out writes the family (MetaTT: family_io's
// SaveFamily; LoRA: lora.safetensors) and result.json.
//
// A decoder (--model_dir of a Llama-architecture model, config.json
// model_type "llama") trains generation tasks instead (lm_objective.h):
//   metatt-train --model_dir=models/SmolLM2-135M-Instruct --task=ARC-Easy
//       --train_limit=500 --max_eval=200 --steps=200 --out=/tmp/arc
//   metatt-train --model_dir=... --train=a.jsonl --eval=b.jsonl --gen_format=chat
// --task names sets of the commonsense folder (--commonsense_dir; ARC-Easy,
// BoolQ, OpenBookQA; comma-separated for multi-task), evaluated on their
// test split by answer accuracy (greedy generation).
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "adapters/family_io.h"
#include "base/safetensors.h"
#include "base/status_macros.h"
#include "server/model/model_dir.h"
#include "server/training/adapter_binding.h"
#include "server/training/adapter_config.h"
#include "base/file_io.h"
#include "server/training/eval_scores.h"
#include "server/training/generation_dataset.h"
#include "server/training/lm_objective.h"
#include "server/training/recipe.h"
#include "server/training/text_batch.h"

ABSL_FLAG(std::string, model_dir, "", "base model directory (default: ResolveModelDir)");
ABSL_FLAG(std::string, device, "auto", "auto|cpu|cuda");
ABSL_FLAG(std::string, task, "", "GLUE task(s): MRPC, CoLA, SST-2, STS-B; comma-separated for multi-task");
ABSL_FLAG(std::string, glue_dir, "", "GLUE data dir (default <shared>/data/glue: $METATT_SHARED_DIR, else shared/ beside the repo)");
ABSL_FLAG(std::string, train, "", "custom train file (instead of --task)");
ABSL_FLAG(std::string, eval, "", "custom eval file");
ABSL_FLAG(std::string, task_name, "custom", "name of the custom task");
ABSL_FLAG(std::string, format, "tsv", "tsv|csv|jsonl");
ABSL_FLAG(bool, has_header, true, "custom file has a header line");
ABSL_FLAG(bool, quoting, true, "CSV-style double-quote quoting");
ABSL_FLAG(std::string, text_col, "0", "text column (name or 0-based index)");
ABSL_FLAG(std::string, pair_col, "", "optional second text column");
ABSL_FLAG(std::string, label_col, "1", "label column");
ABSL_FLAG(std::string, label_kind, "classification", "classification|regression");
ABSL_FLAG(std::string, metric, "", "primary metric (default: GLUE's / accuracy / pearson_spearman)");
ABSL_FLAG(std::string, adapter, "metatt", "metatt|lora (lora = --form=lora: the LoRA recipe's defaults)");
// Recipe flags: unset = the server's default for the form (DefaultRecipe in
// server/training/recipe.cc, the one definition; jobs use the same).
#define RECIPE_DEFAULT " (default: server/form default, server/training/recipe.cc)"
ABSL_FLAG(std::optional<std::string>, form, std::nullopt, "MetaTT form: 4d|5d|4+1d" RECIPE_DEFAULT);
ABSL_FLAG(std::optional<int64_t>, rank, std::nullopt,
          "TT rank (MetaTT) or LoRA rank, every bond" RECIPE_DEFAULT);
ABSL_FLAG(std::optional<std::string>, projections, std::nullopt,
          "adapted projections, comma-separated" RECIPE_DEFAULT);
ABSL_FLAG(std::optional<double>, alpha, std::nullopt,
          "scale numerator, s = alpha / r (MetaTT when unset: r; 0: alpha = r; LoRA: 16)"
          RECIPE_DEFAULT);
ABSL_FLAG(std::optional<std::string>, init, std::nullopt, "MetaTT core init spec" RECIPE_DEFAULT);
ABSL_FLAG(std::string, base_family, "", "add a task to this saved (4+1)D family (shared cores frozen)");
ABSL_FLAG(std::optional<std::string>, new_task_init, std::nullopt,
          "add-task slice init: identity|zeros|mean" RECIPE_DEFAULT);
ABSL_FLAG(std::optional<int64_t>, steps, std::nullopt,
          "optimizer steps (0: use --epochs; unset with --epochs: by epochs)" RECIPE_DEFAULT);
ABSL_FLAG(std::optional<double>, epochs, std::nullopt, "epochs when training by epochs" RECIPE_DEFAULT);
ABSL_FLAG(std::optional<int64_t>, batch_size, std::nullopt, "batch size" RECIPE_DEFAULT);
ABSL_FLAG(std::optional<double>, lr, std::nullopt, "peak learning rate" RECIPE_DEFAULT);
ABSL_FLAG(std::optional<double>, head_lr_multiplier, std::nullopt,
          "task heads train at lr * this" RECIPE_DEFAULT);
ABSL_FLAG(std::optional<double>, inner_lr_multiplier, std::nullopt,
          "MetaTT inner cores (layer, proj, task) train at lr * this" RECIPE_DEFAULT);
ABSL_FLAG(std::optional<double>, weight_decay, std::nullopt, "AdamW weight decay" RECIPE_DEFAULT);
ABSL_FLAG(std::optional<double>, warmup_ratio, std::nullopt,
          "warm-up fraction of the steps" RECIPE_DEFAULT);
ABSL_FLAG(std::optional<double>, head_first_ratio, std::nullopt,
          "first fraction of the steps training the heads only (the adapter then "
          "warms up)" RECIPE_DEFAULT);
ABSL_FLAG(std::optional<double>, grad_clip, std::nullopt,
          "gradient clip norm (0: off)" RECIPE_DEFAULT);
ABSL_FLAG(std::optional<uint64_t>, seed, std::nullopt, "seed" RECIPE_DEFAULT);
ABSL_FLAG(std::optional<int64_t>, eval_every, std::nullopt,
          "evaluate every N steps (0: only at the end)" RECIPE_DEFAULT);
ABSL_FLAG(int64_t, max_eval, 0, "evaluate on the first N eval rows (0: all)");
ABSL_FLAG(int64_t, train_limit, 0, "use a seeded random subset of N train rows per task (0: all)");
ABSL_FLAG(std::optional<int64_t>, max_length, std::nullopt, "max tokens per row" RECIPE_DEFAULT);
ABSL_FLAG(std::optional<std::string>, pooling, std::nullopt, "cls|mean" RECIPE_DEFAULT);
ABSL_FLAG(std::optional<int64_t>, patience, std::nullopt,
          "early-stop after N evals without improvement (0: off)" RECIPE_DEFAULT);
ABSL_FLAG(std::optional<std::string>, rank_schedule, std::nullopt,
          "DMRG schedule 'epoch:max_rank,...' e.g. '1:6,2:4' (\"\": fixed rank)" RECIPE_DEFAULT);
ABSL_FLAG(double, rel_cutoff, 0.0, "truncation: relative discarded-weight cutoff");
ABSL_FLAG(std::string, trainable, "all", "all|adapter|heads");
ABSL_FLAG(int64_t, log_every, 1, "print a progress line every N steps");
ABSL_FLAG(std::string, out, "", "output directory");
// Decoder (generation) tasks.
ABSL_FLAG(std::string, commonsense_dir, "",
          "commonsense data dir (default <shared>/data/commonsense: $METATT_SHARED_DIR, else "
          "shared/ beside the repo)");
ABSL_FLAG(std::string, gen_format, "auto",
          "decoder datasets: auto|prompt_completion|instruction|chat");
ABSL_FLAG(int64_t, max_new_tokens, metatt::kDefaultDecoderMaxNewTokens,
          "decoder eval: tokens generated per prompt");
ABSL_FLAG(bool, eval_only, false,
          "decoder: evaluate without training (a fresh MetaTT adapter with the default ze-* init "
          "adds nothing: the base model zero-shot, same prompts) and write result.json");

namespace metatt {
namespace {

// --glue_dir / --commonsense_dir, else <shared>/data/<sub> (ResolveSharedDir).
absl::StatusOr<std::string> DataDir(const std::string& flag_value, const std::string& sub) {
  if (!flag_value.empty()) return flag_value;
  ASSIGN_OR_RETURN(std::string shared, ResolveSharedDir());
  return absl::StrCat(shared, "/data/", sub);
}

// A seeded random subset of `limit` rows (Dataset or GenerationDataset).
template <typename DatasetT>
void Subsample(DatasetT* ds, int64_t limit, uint64_t seed) {
  if (limit <= 0 || static_cast<int64_t>(ds->size()) <= limit) return;
  std::mt19937_64 rng(seed);
  auto& ex = ds->examples;
  for (size_t i = ex.size(); i > 1; --i) std::swap(ex[i - 1], ex[rng() % i]);
  ex.resize(limit);
}

absl::StatusOr<std::vector<std::pair<double, int64_t>>> ParseSchedule(const std::string& s) {
  std::vector<std::pair<double, int64_t>> out;
  for (absl::string_view item : absl::StrSplit(s, ',', absl::SkipEmpty())) {
    std::vector<std::string> kv = absl::StrSplit(item, ':');
    double epoch = 0;
    int64_t max_rank = 0;
    if (kv.size() != 2 || !absl::SimpleAtod(kv[0], &epoch) || !absl::SimpleAtoi(kv[1], &max_rank)) {
      return absl::InvalidArgumentError(absl::StrCat("--rank_schedule: bad entry '", item,
                                                     "' (want epoch:max_rank)"));
    }
    out.emplace_back(epoch, max_rank);
  }
  return out;
}

std::vector<std::string> SplitList(const std::string& s) {
  return absl::StrSplit(s, ',', absl::SkipEmpty());
}

// The flags the user gave; everything else is auto (ResolveRecipe).
absl::StatusOr<RecipeOverrides> OverridesFromFlags() {
  RecipeOverrides o;
  o.form = absl::GetFlag(FLAGS_form);
  if (auto r = absl::GetFlag(FLAGS_rank)) o.ranks = std::vector<int64_t>{*r};
  if (auto p = absl::GetFlag(FLAGS_projections)) o.projections = SplitList(*p);
  o.init = absl::GetFlag(FLAGS_init);
  o.alpha = absl::GetFlag(FLAGS_alpha);
  o.new_task_init = absl::GetFlag(FLAGS_new_task_init);
  o.max_steps = absl::GetFlag(FLAGS_steps);
  o.epochs = absl::GetFlag(FLAGS_epochs);
  o.batch_size = absl::GetFlag(FLAGS_batch_size);
  o.learning_rate = absl::GetFlag(FLAGS_lr);
  o.head_lr_multiplier = absl::GetFlag(FLAGS_head_lr_multiplier);
  o.inner_lr_multiplier = absl::GetFlag(FLAGS_inner_lr_multiplier);
  o.weight_decay = absl::GetFlag(FLAGS_weight_decay);
  o.warmup_ratio = absl::GetFlag(FLAGS_warmup_ratio);
  o.head_first_ratio = absl::GetFlag(FLAGS_head_first_ratio);
  o.grad_clip = absl::GetFlag(FLAGS_grad_clip);
  o.seed = absl::GetFlag(FLAGS_seed);
  o.eval_every = absl::GetFlag(FLAGS_eval_every);
  o.max_length = absl::GetFlag(FLAGS_max_length);
  o.pooling = absl::GetFlag(FLAGS_pooling);
  o.early_stop_patience = absl::GetFlag(FLAGS_patience);
  if (auto s = absl::GetFlag(FLAGS_rank_schedule)) {
    ASSIGN_OR_RETURN(auto sched, ParseSchedule(*s));
    o.rank_schedule = std::move(sched);
  }
  // --adapter=lora is the recipe form "lora" (its defaults: rank 8 on q,v,
  // alpha 16, PEFT's init), as a server job with form lora gets.
  const std::string kind = absl::GetFlag(FLAGS_adapter);
  if (kind == "lora") {
    if (o.form && *o.form != "lora") {
      return absl::InvalidArgumentError(
          absl::StrCat("--adapter=lora with --form=", *o.form, ": LoRA has no MetaTT form"));
    }
    o.form = "lora";
  } else if (kind != "metatt") {
    return absl::InvalidArgumentError(absl::StrCat("--adapter: unknown '", kind, "' (metatt|lora)"));
  }
  // An added task extends a (4+1)D family: that form's defaults.
  if (!absl::GetFlag(FLAGS_base_family).empty()) {
    if (kind == "lora") return absl::InvalidArgumentError("--base_family: LoRA has no task slices");
    o.form = "4+1d";
  }
  return o;
}

struct TaskData {
  std::string name;
  Dataset train, eval;
  std::string metric;
};

absl::StatusOr<std::vector<TaskData>> LoadData(uint64_t seed) {
  std::vector<TaskData> out;
  const std::string task = absl::GetFlag(FLAGS_task);
  if (!task.empty()) {
    ASSIGN_OR_RETURN(const std::string glue_dir, DataDir(absl::GetFlag(FLAGS_glue_dir), "glue"));
    for (absl::string_view t : absl::StrSplit(task, ',', absl::SkipEmpty())) {
      ASSIGN_OR_RETURN(std::string name, CanonicalGlueName(std::string(t)));
      ASSIGN_OR_RETURN(DatasetSpec spec, GluePreset(name));
      TaskData d;
      d.name = name;
      spec.origin = absl::StrCat(name, "/train.tsv");
      ASSIGN_OR_RETURN(d.train, ReadDataset(absl::StrCat(glue_dir, "/", name, "/train.tsv"), spec));
      spec.origin = absl::StrCat(name, "/dev.tsv");
      ASSIGN_OR_RETURN(d.eval, ReadDataset(absl::StrCat(glue_dir, "/", name, "/dev.tsv"), spec));
      ASSIGN_OR_RETURN(d.metric, GluePrimaryMetric(name));
      out.push_back(std::move(d));
    }
  } else {
    if (absl::GetFlag(FLAGS_train).empty()) {
      return absl::InvalidArgumentError("give --task or --train");
    }
    DatasetSpec spec;
    ASSIGN_OR_RETURN(spec.format, ParseDataFormat(absl::GetFlag(FLAGS_format)));
    spec.has_header = absl::GetFlag(FLAGS_has_header);
    spec.quoting = absl::GetFlag(FLAGS_quoting);
    spec.text = ColumnRef::Parse(absl::GetFlag(FLAGS_text_col));
    if (!absl::GetFlag(FLAGS_pair_col).empty()) {
      spec.text_pair = ColumnRef::Parse(absl::GetFlag(FLAGS_pair_col));
    }
    spec.label = ColumnRef::Parse(absl::GetFlag(FLAGS_label_col));
    ASSIGN_OR_RETURN(spec.label_kind, ParseLabelKind(absl::GetFlag(FLAGS_label_kind)));
    TaskData d;
    d.name = absl::GetFlag(FLAGS_task_name);
    spec.origin = absl::GetFlag(FLAGS_train);
    ASSIGN_OR_RETURN(d.train, ReadDataset(absl::GetFlag(FLAGS_train), spec));
    if (!absl::GetFlag(FLAGS_eval).empty()) {
      spec.label_vocab = d.train.label_vocab;
      spec.origin = absl::GetFlag(FLAGS_eval);
      ASSIGN_OR_RETURN(d.eval, ReadDataset(absl::GetFlag(FLAGS_eval), spec));
    }
    out.push_back(std::move(d));
  }
  for (TaskData& d : out) {
    if (!absl::GetFlag(FLAGS_metric).empty()) d.metric = absl::GetFlag(FLAGS_metric);
    Subsample(&d.train, absl::GetFlag(FLAGS_train_limit), seed);
  }
  return out;
}

// The adapter's size fields of result.json (encoder and decoder runs alike).
void AddAdapterSize(const MetaTTAdapter* metatt, const LoraAdapter* lora, nlohmann::json* result) {
  if (metatt) {
    (*result)["adapter_parameters"] = metatt->NumParameters();
    (*result)["trainable_adapter_parameters"] = metatt->NumTrainableParameters();
    (*result)["ranks"] = metatt->config().BondRanks();
  } else if (lora) {
    (*result)["adapter_parameters"] = lora->NumParameters();
  }
}

// Before --out is written: the best evaluation's tensors back in place (when
// there was one) and the directory made.
void PrepareOutput(Trainer& trainer, const std::string& out) {
  if (trainer.best_eval()) {
    absl::Status st = trainer.RestoreBest();
    if (!st.ok()) std::cout << "note: saving the final tensors (" << st.message() << ")\n";
  }
  std::error_code ec;
  std::filesystem::create_directories(out, ec);
}

nlohmann::json EvalJson(const EvalEvent& e) {
  nlohmann::json j;
  j["step"] = e.step;
  j["score"] = e.score;
  j["metrics"] = e.metrics;
  return j;
}

bool IsLlamaDir(const std::string& model_dir) {
  auto text = ReadFileToString(model_dir + "/config.json");
  if (!text.ok()) return false;
  nlohmann::json j = nlohmann::json::parse(*text, nullptr, /*allow_exceptions=*/false);
  return j.is_object() && j.value("model_type", "") == "llama";
}

struct GenTaskData {
  std::string name;
  GenerationDataset train, eval;
};

absl::StatusOr<std::vector<GenTaskData>> LoadGenerationData(uint64_t seed) {
  std::vector<GenTaskData> out;
  const std::string task = absl::GetFlag(FLAGS_task);
  ASSIGN_OR_RETURN(GenerationFormat format, ParseGenerationFormat(absl::GetFlag(FLAGS_gen_format)));
  if (!task.empty()) {
    ASSIGN_OR_RETURN(const std::string data_dir,
                     DataDir(absl::GetFlag(FLAGS_commonsense_dir), "commonsense"));
    for (absl::string_view t : absl::StrSplit(task, ',', absl::SkipEmpty())) {
      ASSIGN_OR_RETURN(std::string name, CanonicalCommonsenseName(std::string(t)));
      GenerationSpec spec;
      spec.format = GenerationFormat::kInstruction;
      GenTaskData d;
      d.name = name;
      spec.origin = absl::StrCat(name, "/train.json");
      ASSIGN_OR_RETURN(d.train,
                       ReadGenerationDataset(absl::StrCat(data_dir, "/", name, "/train.json"), spec));
      spec.origin = absl::StrCat(name, "/test.json");
      ASSIGN_OR_RETURN(d.eval,
                       ReadGenerationDataset(absl::StrCat(data_dir, "/", name, "/test.json"), spec));
      out.push_back(std::move(d));
    }
  } else {
    if (absl::GetFlag(FLAGS_train).empty()) return absl::InvalidArgumentError("give --task or --train");
    GenerationSpec spec;
    spec.format = format;
    GenTaskData d;
    d.name = absl::GetFlag(FLAGS_task_name);
    spec.origin = absl::GetFlag(FLAGS_train);
    ASSIGN_OR_RETURN(d.train, ReadGenerationDataset(absl::GetFlag(FLAGS_train), spec));
    if (!absl::GetFlag(FLAGS_eval).empty()) {
      spec.origin = absl::GetFlag(FLAGS_eval);
      ASSIGN_OR_RETURN(d.eval, ReadGenerationDataset(absl::GetFlag(FLAGS_eval), spec));
    }
    out.push_back(std::move(d));
  }
  for (GenTaskData& d : out) Subsample(&d.train, absl::GetFlag(FLAGS_train_limit), seed);
  return out;
}

// The adapter a run trains: a fresh MetaTT or LoRA (adapter_config.h, the
// rule server jobs use), or new task slices on a loaded (4+1)D family with
// its shared cores frozen (--base_family).
struct RunAdapter {
  std::unique_ptr<MetaTTAdapter> metatt;
  std::unique_ptr<LoraAdapter> lora;
  AdapterBinding binding;
  std::vector<std::string> family_tasks;           // index = adapter task index
  std::map<std::string, torch::Tensor> old_heads;  // the loaded family's heads
  int64_t first_task_index = 0;
};

// Prints the resolved recipe first (an added task's structure: its family's).
absl::StatusOr<RunAdapter> MakeRunAdapter(const Recipe& recipe, const RecipeOverrides& overrides,
                                          const ModelGeometry& geometry,
                                          const std::string& fingerprint, torch::Device device,
                                          uint64_t seed, size_t num_tasks) {
  RunAdapter a;
  const std::string base = absl::GetFlag(FLAGS_base_family);
  // An added task prints its family's structure below, once the family is read.
  if (base.empty()) std::cout << DescribeRecipe(recipe, overrides) << "\n";
  if (!base.empty()) {
    // Frozen: existing tasks and shared cores never train here (no leaf per task).
    ASSIGN_OR_RETURN(LoadedFamily fam,
                     LoadFamily(base, fingerprint, device, MetaTTAdapter::Leaves::kFrozen));
    a.metatt = std::move(fam.adapter);
    if (a.metatt->config().form != TTForm::k4Plus1D) {
      return absl::FailedPreconditionError("--base_family must be a (4+1)D family");
    }
    ASSIGN_OR_RETURN(const Recipe added,
                     RecipeForAddedTask(recipe, overrides, a.metatt->config()));
    std::cout << DescribeRecipe(added, overrides, /*structure_from_family=*/true) << "\n";
    a.family_tasks = fam.task_names;
    a.old_heads = fam.heads;
    a.metatt->FreezeShared(true);
    a.first_task_index = a.metatt->num_tasks();
    ASSIGN_OR_RETURN(MetaTTAdapter::NewTaskInit init,
                     MetaTTAdapter::ParseNewTaskInit(recipe.new_task_init));
    for (size_t i = 0; i < num_tasks; ++i) RETURN_IF_ERROR(a.metatt->AddTask(init).status());
    a.binding = BindMetaTT(a.metatt.get());
    std::cout << "add-task mode: " << num_tasks << " new task slice(s) after "
              << a.first_task_index << " existing; shared cores frozen ("
              << a.metatt->NumTrainableParameters() << " trainable adapter parameters)\n";
  } else if (recipe.form == "lora") {
    if (num_tasks > 1) return absl::InvalidArgumentError("LoRA trains one task");
    ASSIGN_OR_RETURN(LoraConfig c, LoraConfigFromRecipe(recipe, geometry));
    LoraAdapter::Options ao;
    ao.device = device;
    ao.seed = seed;
    ASSIGN_OR_RETURN(a.lora, LoraAdapter::Create(c, ao));
    a.binding = BindLora(a.lora.get());
    std::cout << "LoRA r=" << c.rank << " alpha " << c.alpha << " on "
              << absl::StrJoin(recipe.projections, ",") << ": " << a.lora->NumParameters()
              << " adapter parameters\n";
  } else {
    ASSIGN_OR_RETURN(MetaTTConfig c,
                     MetaTTConfigFromRecipe(recipe, geometry, static_cast<int64_t>(num_tasks)));
    if (c.form != TTForm::k4Plus1D && num_tasks > 1) {
      return absl::InvalidArgumentError("several tasks need --form=4+1d");
    }
    MetaTTAdapter::Options ao;
    ao.device = device;
    ao.seed = seed;
    ASSIGN_OR_RETURN(a.metatt, MetaTTAdapter::Create(c, ao));
    a.binding = BindMetaTT(a.metatt.get());
    std::cout << "MetaTT " << TTFormName(c.form) << " ranks " << absl::StrJoin(recipe.ranks, ",")
              << " on " << absl::StrJoin(recipe.projections, ",") << ": "
              << a.metatt->NumParameters() << " adapter parameters\n";
  }
  return a;
}

// The trainer options every run shares (the recipe plus the flags outside it).
absl::StatusOr<TrainerOptions> RunTrainerOptions(const Recipe& recipe) {
  ASSIGN_OR_RETURN(TrainerOptions o, TrainerOptionsFromRecipe(recipe));
  o.max_eval_examples = absl::GetFlag(FLAGS_max_eval);
  o.max_new_tokens = absl::GetFlag(FLAGS_max_new_tokens);
  o.truncation.relative_cutoff = absl::GetFlag(FLAGS_rel_cutoff);
  ASSIGN_OR_RETURN(o.trainable, ParseTrainableSet(absl::GetFlag(FLAGS_trainable)));
  return o;
}

// One line per progress (every --log_every steps), eval and sweep event; the
// last progress event's throughput lands in *last.
TrainerCallbacks PrintingCallbacks(ProgressEvent* last) {
  TrainerCallbacks cb;
  const int64_t log_every = std::max<int64_t>(1, absl::GetFlag(FLAGS_log_every));
  cb.on_progress = [last, log_every](const ProgressEvent& p) {
    *last = p;
    if (p.step % log_every != 0 && p.step != p.total_steps && p.step != 1) return;
    std::cout << absl::StrFormat("step %d/%d epoch %.3f loss %.5f lr %.3g grad_norm %.3g ", p.step,
                                 p.total_steps, p.epoch, p.loss, p.lr, p.grad_norm)
              << (p.tokens_per_second > 0 ? absl::StrFormat("tokens/s %.1f ", p.tokens_per_second)
                                          : "")
              << absl::StrFormat("ex/s %.2f eta %.0fs", p.examples_per_second, p.eta_seconds)
              << std::endl;
  };
  cb.on_eval = [](const EvalEvent& e) {
    for (const auto& [task, m] : e.metrics) {
      std::string line = absl::StrCat("eval step ", e.step, " ", task);
      for (const auto& [k, v] : m) absl::StrAppend(&line, " ", k, "=", absl::StrFormat("%.4f", v));
      std::cout << line << (e.is_best ? " (best)" : "") << std::endl;
    }
  };
  cb.on_sweep = [](const SweepEvent& s) {
    std::cout << "sweep step " << s.step << " epoch " << s.epoch << " max_rank " << s.max_rank;
    for (const auto& b : s.bonds) {
      std::cout << absl::StrFormat(" | bond %d: %d -> %d discarded %.3g", b.bond, b.old_rank,
                                   b.new_rank, b.discarded_weight);
    }
    std::cout << std::endl;
  };
  return cb;
}

// --eval_only: evaluate the fresh adapter (a ze-* init adds nothing: the base
// model with these prompts) and write result.json.
absl::Status EvaluateOnly(Trainer& trainer, const TrainerCallbacks& cb, const RunAdapter& a,
                          nlohmann::json result) {
  const absl::Time t0 = absl::Now();
  ASSIGN_OR_RETURN(EvalEvent ev, trainer.Evaluate());
  cb.on_eval(ev);
  result["eval_only"] = true;
  result["seconds"] = absl::ToDoubleSeconds(absl::Now() - t0);
  result["final_eval"] = EvalJson(ev);
  AddAdapterSize(a.metatt.get(), a.lora.get(), &result);
  if (const std::string out = absl::GetFlag(FLAGS_out); !out.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(out, ec);
    RETURN_IF_ERROR(WriteFileAtomically(out + "/result.json", result.dump(2)));
  }
  std::cout << "result " << result.dump() << std::endl;
  return absl::OkStatus();
}

// Trains, then writes the family (MetaTT: SaveFamily with every head; LoRA:
// lora.safetensors with the heads) and result.json to --out, and prints the
// result line. `result` arrives with the model's own fields.
absl::Status TrainAndSave(Trainer& trainer, RunAdapter& a, const ProgressEvent& last,
                          const std::string& model_dir, const std::string& fingerprint,
                          nlohmann::json result) {
  std::cout << "training " << trainer.total_steps() << " steps (" << trainer.steps_per_epoch()
            << " per epoch)" << std::endl;
  const absl::Time t0 = absl::Now();
  RETURN_IF_ERROR(trainer.Run());
  result["steps"] = trainer.step();
  result["seconds"] = absl::ToDoubleSeconds(absl::Now() - t0);
  result["train_examples_per_second"] = last.examples_per_second;
  if (last.tokens_per_second > 0) result["train_tokens_per_second"] = last.tokens_per_second;
  result["state"] = trainer.state() == Trainer::State::kFinished       ? "finished"
                    : trainer.state() == Trainer::State::kEarlyStopped ? "early_stopped"
                                                                       : "cancelled";
  result["losses"] = trainer.losses();
  if (trainer.last_eval()) result["final_eval"] = EvalJson(*trainer.last_eval());
  if (trainer.best_eval()) result["best_eval"] = EvalJson(*trainer.best_eval());
  nlohmann::json sweeps = nlohmann::json::array();
  for (const auto& s : trainer.sweeps()) {
    nlohmann::json js;
    js["step"] = s.step;
    js["max_rank"] = s.max_rank;
    for (const auto& b : s.bonds) {
      js["bonds"].push_back({{"bond", b.bond},
                             {"old_rank", b.old_rank},
                             {"new_rank", b.new_rank},
                             {"discarded_weight", b.discarded_weight}});
    }
    sweeps.push_back(js);
  }
  result["sweeps"] = sweeps;
  AddAdapterSize(a.metatt.get(), a.lora.get(), &result);

  if (const std::string out = absl::GetFlag(FLAGS_out); !out.empty()) {
    PrepareOutput(trainer, out);
    std::map<std::string, torch::Tensor> heads = a.old_heads;
    for (const auto& t : trainer.tasks()) {
      if (!t.head) continue;  // generation tasks: the LM head is the model's
      heads[t.name + ".weight"] = t.head->weight.detach();
      heads[t.name + ".bias"] = t.head->bias.detach();
    }
    if (a.metatt) {
      for (const auto& t : trainer.tasks()) a.family_tasks.push_back(t.name);
      RETURN_IF_ERROR(SaveFamily(out, *a.metatt, a.family_tasks, heads, model_dir, fingerprint));
    } else {
      std::map<std::string, torch::Tensor> all;
      for (const auto& [n, t] : a.lora->NamedParameters()) all["lora." + n] = t.detach();
      for (const auto& [n, t] : heads) all["head." + n] = t;
      RETURN_IF_ERROR(WriteSafetensors(out + "/lora.safetensors", all));
    }
    RETURN_IF_ERROR(WriteFileAtomically(out + "/result.json", result.dump(2)));
  }
  nlohmann::json summary = result;
  summary.erase("losses");
  std::cout << "result " << summary.dump() << std::endl;
  return absl::OkStatus();
}

// Generation tasks on a Llama-architecture decoder: the same Trainer with the
// causal-LM objective. No heads: the family holds adapter tensors only.
absl::Status DecoderMain(const std::string& model_dir, torch::Device device,
                         const RecipeOverrides& overrides, Recipe recipe) {
  if (!overrides.max_length) recipe.max_length = kDefaultDecoderMaxLength;
  ASSIGN_OR_RETURN(std::vector<GenTaskData> data, LoadGenerationData(recipe.seed));
  LlamaDecoder::Options dopt;
  dopt.model_dir = model_dir;
  dopt.device = device;
  ASSIGN_OR_RETURN(std::shared_ptr<LlamaDecoder> decoder, LlamaDecoder::Create(dopt));
  ASSIGN_OR_RETURN(BpeTokenizer tok, BpeTokenizer::Create(model_dir));
  auto tokenizer = std::make_shared<const BpeTokenizer>(std::move(tok));
  const std::string fingerprint = decoder->config().Fingerprint();

  ASSIGN_OR_RETURN(TrainerOptions o, RunTrainerOptions(recipe));
  if (o.trainable == TrainableSet::kHeadsOnly) {
    return absl::InvalidArgumentError("--trainable=heads: generation tasks have no heads");
  }
  torch::manual_seed(o.seed);
  ASSIGN_OR_RETURN(RunAdapter a, MakeRunAdapter(recipe, overrides, decoder->geometry(),
                                                fingerprint, device, o.seed, data.size()));

  std::vector<TrainTask> tasks;
  for (size_t i = 0; i < data.size(); ++i) {
    TrainTask t;
    t.name = data[i].name;
    t.task_index = a.first_task_index + static_cast<int64_t>(i);
    t.gen_train = std::move(data[i].train);
    t.gen_eval = std::move(data[i].eval);
    if (!absl::GetFlag(FLAGS_metric).empty()) t.primary_metric = absl::GetFlag(FLAGS_metric);
    std::cout << "task " << t.name << " (index " << t.task_index << "): " << t.gen_train.size()
              << " train rows, " << t.gen_eval.size() << " eval rows\n";
    tasks.push_back(std::move(t));
  }

  ProgressEvent last;
  const TrainerCallbacks cb = PrintingCallbacks(&last);
  ASSIGN_OR_RETURN(std::unique_ptr<Trainer> trainer,
                   Trainer::Create(o, MakeLmObjective(decoder, MakeChatLmTokenizer(tokenizer)),
                                   a.binding, std::move(tasks), cb));
  nlohmann::json result;
  result["model"] = "decoder";
  if (absl::GetFlag(FLAGS_eval_only)) return EvaluateOnly(*trainer, cb, a, std::move(result));
  return TrainAndSave(*trainer, a, last, model_dir, fingerprint, std::move(result));
}

absl::Status Main() {
  ASSIGN_OR_RETURN(std::string model_dir, ResolveModelDir(absl::GetFlag(FLAGS_model_dir)));
  ASSIGN_OR_RETURN(torch::Device device, ParseDevice(absl::GetFlag(FLAGS_device)));
  ASSIGN_OR_RETURN(const RecipeOverrides overrides, OverridesFromFlags());
  ASSIGN_OR_RETURN(const Recipe recipe,
                   ResolveRecipe(overrides, /*adds_task=*/!absl::GetFlag(FLAGS_base_family).empty()));
  if (IsLlamaDir(model_dir)) return DecoderMain(model_dir, device, overrides, recipe);
  ASSIGN_OR_RETURN(std::vector<TaskData> data, LoadData(recipe.seed));

  BertEncoder::Options eo;
  eo.model_dir = model_dir;
  eo.device = device;
  ASSIGN_OR_RETURN(std::shared_ptr<BertEncoder> encoder, BertEncoder::Create(eo));
  ASSIGN_OR_RETURN(WordPieceTokenizer tok, WordPieceTokenizer::Create(model_dir));
  auto tokenizer = std::make_shared<const WordPieceTokenizer>(std::move(tok));
  const BertConfig& bc = encoder->config();

  ASSIGN_OR_RETURN(TrainerOptions o, RunTrainerOptions(recipe));
  torch::manual_seed(o.seed);
  ASSIGN_OR_RETURN(RunAdapter a, MakeRunAdapter(recipe, overrides, encoder->geometry(),
                                                bc.Fingerprint(), device, o.seed, data.size()));

  std::vector<TrainTask> tasks;
  for (size_t i = 0; i < data.size(); ++i) {
    TaskData& d = data[i];
    TaskHead::Options ho = TaskHead::Options::ForData(d.train, bc.hidden_size, o.seed + 1000 + i, device);
    TrainTask t;
    t.name = d.name;
    t.task_index = a.first_task_index + static_cast<int64_t>(i);
    ASSIGN_OR_RETURN(t.head, TaskHead::Create(ho));
    t.train = std::move(d.train);
    t.eval = std::move(d.eval);
    t.primary_metric = d.metric;
    std::cout << "task " << t.name << " (index " << t.task_index << "): " << t.train.size()
              << " train rows, " << t.eval.size() << " eval rows\n";
    tasks.push_back(std::move(t));
  }

  ProgressEvent last;
  const TrainerCallbacks cb = PrintingCallbacks(&last);
  ASSIGN_OR_RETURN(std::unique_ptr<Trainer> trainer,
                   Trainer::Create(o, encoder, MakeBatchTokenizer(tokenizer), a.binding,
                                   std::move(tasks), cb));
  return TrainAndSave(*trainer, a, last, model_dir, bc.Fingerprint(), nlohmann::json::object());
}

}  // namespace
}  // namespace metatt

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  absl::Status st = metatt::Main();
  if (!st.ok()) {
    std::cerr << "metatt-train: " << st << std::endl;
    return st.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  return 0;
}
