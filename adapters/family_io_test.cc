#include "adapters/family_io.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "base/safetensors.h"

namespace metatt {
namespace {

// Every directory the tests made; removed when the binary's tests end, so
// runs leave nothing in the temp directory.
std::vector<std::string>& MadeDirs() {
  static auto* dirs = new std::vector<std::string>;
  return *dirs;
}
class RemoveMadeDirs : public ::testing::Environment {
 public:
  void TearDown() override {
    std::error_code ec;
    for (const std::string& d : MadeDirs()) std::filesystem::remove_all(d, ec);
  }
};
[[maybe_unused]] ::testing::Environment* const kRemoveMadeDirs =
    ::testing::AddGlobalTestEnvironment(new RemoveMadeDirs);

std::string FreshDir(const std::string& name) {
  std::string d = ::testing::TempDir() + "/family_io_" + std::to_string(::getpid()) + "_" + name;
  std::error_code ec;
  std::filesystem::remove_all(d, ec);
  EXPECT_FALSE(ec) << d << ": " << ec.message();
  MadeDirs().push_back(d);
  return d;
}

std::unique_ptr<MetaTTAdapter> MakeAdapter(TTForm form, torch::Dtype dtype, int64_t tasks) {
  MetaTTConfig c;
  c.form = form;
  c.ranks = {3, 4, 2, 5};
  if (form == TTForm::k4D) c.ranks = {3, 4, 2};
  c.d_in = c.d_out = 12;
  c.num_layers = 3;
  c.num_heads = 3;
  c.num_tasks = tasks;
  c.projections = {Projection::kQuery, Projection::kValue};
  c.init = "normal(0.3)";
  c.alpha = 6;
  MetaTTAdapter::Options o;
  o.dtype = dtype;
  o.seed = 17;
  auto a = MetaTTAdapter::Create(c, o);
  EXPECT_TRUE(a.ok()) << a.status();
  return std::move(*a);
}

void ExpectSameAdapter(const MetaTTAdapter& a, const MetaTTAdapter& b) {
  auto pa = a.NamedParameters(), pb = b.NamedParameters();
  ASSERT_EQ(pa.size(), pb.size());
  for (size_t i = 0; i < pa.size(); ++i) {
    EXPECT_EQ(pa[i].first, pb[i].first);
    EXPECT_EQ(pa[i].second.scalar_type(), pb[i].second.scalar_type());
    EXPECT_TRUE(torch::equal(pa[i].second, pb[i].second)) << pa[i].first;
  }
  EXPECT_EQ(a.scale(), b.scale());
  EXPECT_EQ(a.config().ToJson(), b.config().ToJson());
}

TEST(FamilyIoTest, RoundTripIsBitExact) {
  for (auto [form, dtype] :
       std::vector<std::pair<TTForm, torch::Dtype>>{{TTForm::k4Plus1D, torch::kFloat32},
                                                    {TTForm::k5D, torch::kFloat64},
                                                    {TTForm::k4D, torch::kFloat32}}) {
    const int64_t tasks = form == TTForm::k4Plus1D ? 3 : 1;
    auto a = MakeAdapter(form, dtype, tasks);
    std::vector<std::string> names = {"sst2"};
    if (tasks == 3) names = {"sst2", "mrpc", "cola"};
    std::map<std::string, torch::Tensor> heads = {{"sst2.weight", torch::randn({2, 12})},
                                                  {"sst2.bias", torch::randn({2})}};
    const std::string dir =
        FreshDir(TTFormName(form) == std::string("4+1d") ? "41" : TTFormName(form));
    ASSERT_TRUE(SaveFamily(dir, *a, names, heads, "all-MiniLM-L6-v2", "fp-123").ok());
    auto loaded = LoadFamily(dir, "fp-123");
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    ExpectSameAdapter(*a, *loaded->adapter);
    EXPECT_EQ(loaded->task_names, names);
    EXPECT_EQ(loaded->base_model_id, "all-MiniLM-L6-v2");
    ASSERT_EQ(loaded->heads.size(), 2u);
    for (auto& [k, v] : heads) EXPECT_TRUE(torch::equal(v, loaded->heads[k])) << k;
  }
}

TEST(FamilyIoTest, RoundTripAfterTruncationAndAddTask) {
  auto a = MakeAdapter(TTForm::k4Plus1D, torch::kFloat64, 2);
  TruncationParams p;
  p.max_rank = 2;
  ASSERT_TRUE(a->Truncate(p).ok());
  ASSERT_TRUE(a->AddTask().ok());
  const std::string dir = FreshDir("trunc");
  ASSERT_TRUE(SaveFamily(dir, *a, {"a", "b", "c"}, {}, "m", "fp").ok());
  auto loaded = LoadFamily(dir, "fp");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ExpectSameAdapter(*a, *loaded->adapter);
  // Same function after reload.
  torch::Tensor x = torch::randn({3, 2, 12}, torch::kFloat64);
  AdapterBatch batch{torch::tensor({2, 0, 1}, torch::kInt64)};
  auto d1 = a->Deltas(1, x, {Projection::kValue}, batch);
  auto d2 = loaded->adapter->Deltas(1, x, {Projection::kValue}, batch);
  EXPECT_TRUE(torch::equal(d1[0], d2[0]));
}

TEST(FamilyIoTest, RefusesWrongFingerprintCorruptionAndShapeMismatch) {
  auto a = MakeAdapter(TTForm::k4Plus1D, torch::kFloat32, 2);
  const std::string dir = FreshDir("bad");
  ASSERT_TRUE(SaveFamily(dir, *a, {"x", "y"}, {}, "m", "fp-good").ok());

  auto wrong = LoadFamily(dir, "fp-other");
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(std::string(wrong.status().message()).find("fp-good"), std::string::npos);
  EXPECT_NE(std::string(wrong.status().message()).find("fp-other"), std::string::npos);

  auto json = ReadFileToString(dir + "/family.json");
  auto cores = ReadFileToString(dir + "/cores.safetensors");
  ASSERT_TRUE(json.ok() && cores.ok());

  // Truncated safetensors.
  ASSERT_TRUE(
      WriteFileAtomically(dir + "/cores.safetensors", cores->substr(0, cores->size() / 2)).ok());
  EXPECT_FALSE(LoadFamily(dir, "fp-good").ok());
  // Flipped byte inside tensor data.
  std::string flipped = *cores;
  flipped[flipped.size() - 3] ^= 0x5a;
  ASSERT_TRUE(WriteFileAtomically(dir + "/cores.safetensors", flipped).ok());
  EXPECT_EQ(LoadFamily(dir, "fp-good").status().code(), absl::StatusCode::kDataLoss);
  ASSERT_TRUE(WriteFileAtomically(dir + "/cores.safetensors", *cores).ok());
  ASSERT_TRUE(LoadFamily(dir, "fp-good").ok());

  // Corrupt JSON.
  ASSERT_TRUE(WriteFileAtomically(dir + "/family.json", "{\"format_version\": 1, ").ok());
  EXPECT_EQ(LoadFamily(dir, "fp-good").status().code(), absl::StatusCode::kInvalidArgument);

  // Metadata whose ranks disagree with the stored tensors.
  nlohmann::json j = nlohmann::json::parse(*json);
  j["config"]["ranks"] = {7, 4, 2, 5};
  ASSERT_TRUE(WriteFileAtomically(dir + "/family.json", j.dump()).ok());
  auto mism = LoadFamily(dir, "fp-good");
  EXPECT_EQ(mism.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(mism.status().message()).find("tensor 'in'"), std::string::npos)
      << mism.status();

  // Missing files.
  EXPECT_FALSE(LoadFamily(dir + "/nope", "fp-good").ok());
  ASSERT_TRUE(WriteFileAtomically(dir + "/family.json", *json).ok());
  ASSERT_EQ(std::remove((dir + "/cores.safetensors").c_str()), 0);
  EXPECT_FALSE(LoadFamily(dir, "fp-good").ok());

  // Task names must match the slices.
  EXPECT_EQ(SaveFamily(dir, *a, {"only-one"}, {}, "m", "fp").code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(FamilyIoTest, ExtraAndStackedHeadsRoundTrip) {
  auto a = MakeAdapter(TTForm::k4Plus1D, torch::kFloat32, 3);
  const std::vector<std::string> names = {"sst2", "mrpc", "new"};
  torch::Tensor w = torch::randn({2, 4, 12}), b = torch::randn({2, 4});
  std::map<std::string, torch::Tensor> heads = {
      {"stacked.weight", w},
      {"stacked.bias", b},
      {"stacked.num_labels", torch::tensor({3, 1}, torch::kInt64)},
      {"new.weight", torch::randn({2, 12})},
      {"new.bias", torch::randn({2})}};
  const nlohmann::json extra = {{"pooling", "cls"}, {"max_length", 64}};
  const std::string dir = FreshDir("stacked");
  ASSERT_TRUE(SaveFamily(dir, *a, names, heads, "m", "fp", extra).ok());
  auto f = LoadFamily(dir, "fp");
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->extra, extra);
  auto h0 = FamilyTaskHead(*f, 0), h1 = FamilyTaskHead(*f, 1), h2 = FamilyTaskHead(*f, 2);
  ASSERT_TRUE(h0.ok() && h1.ok() && h2.ok());
  EXPECT_TRUE(torch::equal(h0->first, w[0].narrow(0, 0, 3)));
  EXPECT_TRUE(torch::equal(h1->second, b[1].narrow(0, 0, 1)));
  EXPECT_TRUE(torch::equal(h2->first, heads["new.weight"]));
  EXPECT_EQ(FamilyTaskHead(*f, 3).status().code(), absl::StatusCode::kOutOfRange);
  // A family without extra loads with a null extra.
  const std::string plain = FreshDir("plain");
  ASSERT_TRUE(SaveFamily(plain, *a, names, {}, "m", "fp").ok());
  auto p = LoadFamily(plain, "fp");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_TRUE(p->extra.is_null());
  EXPECT_EQ(FamilyTaskHead(*p, 0).status().code(), absl::StatusCode::kNotFound);
  // Inconsistent stacked heads are refused at load, naming the file.
  heads["stacked.num_labels"] = torch::tensor({5, 1}, torch::kInt64);  // > max 4
  const std::string bad = FreshDir("bad_stacked");
  ASSERT_TRUE(SaveFamily(bad, *a, names, heads, "m", "fp").ok());
  auto r = LoadFamily(bad, "fp");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("cores.safetensors"), std::string::npos);
  heads.erase("stacked.num_labels");
  const std::string partial = FreshDir("partial_stacked");
  ASSERT_TRUE(SaveFamily(partial, *a, names, heads, "m", "fp").ok());
  EXPECT_EQ(LoadFamily(partial, "fp").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SaveFamily(partial, *a, names, heads, "m", "fp", nlohmann::json::array()).code(),
            absl::StatusCode::kInvalidArgument);
}

// ---- LoRA families ------------------------------------------------------------

std::unique_ptr<LoraAdapter> MakeLora(std::vector<Projection> projections, std::vector<int> layers) {
  LoraConfig c;
  c.rank = 2;
  c.alpha = 3;
  c.projections = std::move(projections);
  c.layers = std::move(layers);
  c.num_layers = 3;
  c.hidden_size = 8;
  c.intermediate_size = 16;
  c.init = "random";  // B != 0
  LoraAdapter::Options o;
  o.seed = 5;
  auto a = LoraAdapter::Create(c, o);
  EXPECT_TRUE(a.ok()) << a.status();
  return std::move(*a);
}

std::map<std::string, torch::Tensor> LoraHeads() {
  return {{"pos.weight", torch::randn({2, 8})}, {"pos.bias", torch::randn({2})},
          {"reg.weight", torch::randn({1, 8})}, {"reg.bias", torch::randn({1})}};
}

TEST(FamilyIoTest, LoraFamilyRoundTripsThroughPeftFiles) {
  const std::string dir = FreshDir("lora");
  auto a = MakeLora({Projection::kQuery, Projection::kValue, Projection::kAttnOutput,
                     Projection::kFfnUp, Projection::kFfnDown},
                    {});
  auto heads = LoraHeads();
  ASSERT_TRUE(SaveLoraFamily(dir, *a, {"pos", "reg"}, heads, "base", "fp1",
                             nlohmann::json{{"pooling", "cls"}})
                  .ok());
  EXPECT_TRUE(IsLoraFamilyDir(dir));
  // PEFT's names and a target list (every layer; ffn_down beside o).
  auto cfg = nlohmann::json::parse(*ReadFileToString(dir + "/adapter_config.json"));
  EXPECT_EQ(cfg["peft_type"], "LORA");
  EXPECT_EQ(cfg["r"], 2);
  EXPECT_EQ(cfg["target_modules"],
            nlohmann::json({"query", "value", "attention.output.dense", "intermediate.dense",
                            "output.dense"}));
  auto w = ReadSafetensors(dir + "/adapter_model.safetensors");
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(w->tensors.size(), 3u * 5u * 2u);
  EXPECT_TRUE(w->tensors.count("base_model.model.encoder.layer.2.output.dense.lora_B.weight"));

  auto back = LoadLoraFamily(dir, "fp1");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->task_names, (std::vector<std::string>{"pos", "reg"}));
  EXPECT_EQ(back->extra["pooling"], "cls");
  EXPECT_EQ(back->adapter->config().intermediate_size, 16);
  EXPECT_EQ(back->adapter->scale(), a->scale());
  for (const auto& [k, f] : a->factors()) {
    EXPECT_TRUE(torch::equal(f.a, back->adapter->factors().at(k).a));
    EXPECT_TRUE(torch::equal(f.b, back->adapter->factors().at(k).b));
  }
  for (const auto& [k, t] : heads) EXPECT_TRUE(torch::equal(t, back->heads.at(k))) << k;

  // Another base model, another format version, a changed file: refused.
  EXPECT_EQ(LoadLoraFamily(dir, "fp2").status().code(), absl::StatusCode::kFailedPrecondition);
  auto meta = nlohmann::json::parse(*ReadFileToString(dir + "/family.json"));
  {
    std::ofstream(dir + "/heads.safetensors", std::ios::app) << "x";
    auto st = LoadLoraFamily(dir, "fp1").status();
    EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
    EXPECT_NE(st.message().find("heads.safetensors"), std::string::npos) << st;
  }
  meta["format_version"] = 2;
  ASSERT_TRUE(WriteFileAtomically(dir + "/family.json", meta.dump()).ok());
  EXPECT_EQ(LoadLoraFamily(dir, "fp1").status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(FamilyIoTest, PeftTargetsAreExactWhenAListWouldMatchMore) {
  // ffn_down alone: "output.dense" would also match attention.output.dense;
  // layers 0 and 2 only: a list would adapt layer 1 too.
  auto a = MakeLora({Projection::kQuery, Projection::kFfnDown}, {0, 2});
  auto files = PeftFiles(*a, "m");
  ASSERT_TRUE(files.ok()) << files.status();
  auto cfg = nlohmann::json::parse(files->at("adapter_config.json"));
  EXPECT_EQ(cfg["target_modules"],
            "(.*\\.)?encoder\\.layer\\.(0|2)\\.(attention\\.self\\.query|output\\.dense)");
}

TEST(FamilyIoTest, PeftFolderWithoutFamilyJsonTakesTasksFromHeads) {
  const std::string dir = FreshDir("peft_only");
  auto a = MakeLora({Projection::kQuery, Projection::kValue}, {});
  ASSERT_TRUE(SaveLoraFamily(dir, *a, {"pos", "reg"}, LoraHeads(), "", "").ok());
  ASSERT_EQ(std::remove((dir + "/family.json").c_str()), 0);
  auto back = LoadLoraFamily(dir, "any");  // no fingerprint to compare
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_FALSE(back->has_family_json);
  EXPECT_EQ(back->task_names, (std::vector<std::string>{"pos", "reg"}));
  // A head of another width than the adapter's is refused, naming it.
  ASSERT_TRUE(WriteSafetensors(dir + "/heads.safetensors",
                               {{"pos.weight", torch::randn({2, 9})}, {"pos.bias", torch::randn({2})}})
                  .ok());
  auto st = LoadLoraFamily(dir, "").status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("pos.weight"), std::string::npos) << st;
}

TEST(FamilyIoTest, DecoderLoraFamilyKeepsItsGeometry) {
  // A Llama LoRA (grouped-query k/v narrower than q, gate/up/down): PEFT's
  // LlamaForCausalLM names, and the geometry back from family.json.
  const std::string dir = FreshDir("llama_lora");
  LoraConfig c;
  c.rank = 2;
  c.alpha = 4;
  c.init = "random";
  c.SetModel(ModelGeometry::Llama(/*num_layers=*/2, /*hidden=*/8, /*d_ffn=*/12, /*num_heads=*/2,
                                  /*num_kv_heads=*/1, /*head_dim=*/4));
  c.projections = {Projection::kQuery, Projection::kKey, Projection::kGate, Projection::kFfnDown};
  auto a = LoraAdapter::Create(c, {});
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(SaveLoraFamily(dir, **a, {"gen"},
                             {{"gen.weight", torch::zeros({0, 8})}, {"gen.bias", torch::zeros({0})}},
                             "", "fp")
                  .ok());
  auto w = ReadSafetensors(dir + "/adapter_model.safetensors");
  ASSERT_TRUE(w.ok());
  EXPECT_TRUE(w->tensors.count("base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"));
  EXPECT_EQ(w->tensors.at("base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight").size(0), 4);
  auto back = LoadLoraFamily(dir, "fp");
  ASSERT_TRUE(back.ok()) << back.status();
  ASSERT_TRUE(back->adapter->config().model.has_value());
  EXPECT_EQ(back->adapter->config().model->family, "llama");
  for (const auto& [k, f] : (*a)->factors()) {
    EXPECT_TRUE(torch::equal(f.a, back->adapter->factors().at(k).a));
    EXPECT_TRUE(torch::equal(f.b, back->adapter->factors().at(k).b));
  }
}

}  // namespace
}  // namespace metatt
