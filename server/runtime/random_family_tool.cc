// metatt-random-family: a MetaTT family with RANDOM cores over a base
// model's geometry (encoder or decoder, from --model_dir), written in the
// family format (adapters/FORMAT.md) for ImportFamily. Serving tests and the
// decode benchmark use it to get many-task decoder families without
// training; its tasks mean nothing.
//
//   metatt-random-family --model_dir models/SmolLM2-135M-Instruct --out DIR
//       --tasks 100 [--form 4+1d] [--rank 8] [--std 0.3] [--seed 1]
#include <cstdio>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "adapters/family_io.h"
#include "adapters/metatt_adapter.h"
#include "server/runtime/base_model.h"

ABSL_FLAG(std::string, model_dir, "", "base model directory (config.json + model.safetensors)");
ABSL_FLAG(std::string, out, "", "output directory (family.json + cores.safetensors)");
ABSL_FLAG(int64_t, tasks, 2, "number of tasks (named t0, t1, ...)");
ABSL_FLAG(std::string, form, "4+1d", "4d | 4+1d");
ABSL_FLAG(int64_t, rank, 8, "TT rank of every bond");
ABSL_FLAG(std::string, std, "0.3", "cores drawn from normal(std)");
ABSL_FLAG(uint64_t, seed, 1, "random seed");
ABSL_FLAG(std::string, name, "random", "family name recorded in family.json extra");
ABSL_FLAG(int64_t, head_labels, 2,
          "rows of a zero classification head per task (0 = none: generation tasks need none, "
          "but a registry that requires heads refuses the import without them)");

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  using namespace metatt;
  const std::string dir = absl::GetFlag(FLAGS_model_dir), out = absl::GetFlag(FLAGS_out);
  if (dir.empty() || out.empty()) {
    std::fprintf(stderr, "metatt-random-family: --model_dir and --out are required\n");
    return 2;
  }
  auto model = BaseModel::Load(dir, torch::kCPU);
  if (!model.ok()) {
    std::fprintf(stderr, "metatt-random-family: %s\n", model.status().ToString().c_str());
    return 1;
  }
  const int64_t T = absl::GetFlag(FLAGS_tasks);
  MetaTTConfig c;
  c.SetModel((*model)->geometry);
  auto form = ParseTTForm(absl::GetFlag(FLAGS_form));
  if (!form.ok()) {
    std::fprintf(stderr, "metatt-random-family: --form: %s\n", form.status().ToString().c_str());
    return 2;
  }
  c.form = *form;
  c.ranks = {absl::GetFlag(FLAGS_rank)};
  c.projections.clear();
  for (int p = 0; p < kNumProjections; ++p) {
    if (c.Geometry().Has(static_cast<Projection>(p))) c.projections.push_back(static_cast<Projection>(p));
  }
  c.num_tasks = c.form == TTForm::k4Plus1D ? T : 1;
  c.init = absl::StrCat("normal(", absl::GetFlag(FLAGS_std), ")");
  auto a = MetaTTAdapter::Create(c, {torch::kFloat32, torch::kCPU, absl::GetFlag(FLAGS_seed)});
  if (!a.ok()) {
    std::fprintf(stderr, "metatt-random-family: %s\n", a.status().ToString().c_str());
    return 1;
  }
  std::vector<std::string> names;
  for (int64_t t = 0; t < T; ++t) names.push_back(absl::StrCat("t", t));
  nlohmann::json extra = {{"family", absl::GetFlag(FLAGS_name)}};
  std::map<std::string, torch::Tensor> heads;
  const int64_t labels = absl::GetFlag(FLAGS_head_labels);
  const int64_t hidden = (*model)->geometry.of(Projection::kQuery).in_width;
  for (const std::string& n : names) {
    if (labels <= 0) break;
    heads[n + ".weight"] = torch::zeros({labels, hidden});
    heads[n + ".bias"] = torch::zeros({labels});
  }
  absl::Status st =
      SaveFamily(out, **a, names, heads, (*model)->model_dir, (*model)->fingerprint, extra);
  if (!st.ok()) {
    std::fprintf(stderr, "metatt-random-family: %s\n", st.ToString().c_str());
    return 1;
  }
  std::printf("%s: %lld tasks, %s, fingerprint %s\n", out.c_str(), static_cast<long long>(T),
              absl::GetFlag(FLAGS_form).c_str(), (*model)->fingerprint.c_str());
  return 0;
}
