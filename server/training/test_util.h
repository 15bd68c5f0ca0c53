// Test helpers: a tiny random BERT, a whitespace tokenizer over a hashed
// vocabulary, a synthetic learnable dataset and a LoRA-like test adapter.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "adapters/adapter.h"
#include "adapters/lora_adapter.h"
#include "adapters/metatt_config.h"
#include "server/model/bert_encoder.h"
#include "server/model/test_util.h"
#include "server/training/dataset.h"
#include "server/training/trainer.h"

namespace metatt {
namespace testing_util {

inline std::shared_ptr<BertEncoder> TinyEncoder(uint64_t seed = 1) {
  torch::manual_seed(seed);
  const BertConfig c = TinyBertConfig();
  const auto t = RandomBertWeights(c);
  auto e = BertEncoder::FromTensors(c, t, torch::kCPU);
  return e.ok() ? *e : nullptr;
}

// A LoRA on the tiny encoder's shapes (TinyBertConfig): rank 4, alpha 8, Q and V
// of both layers.
inline LoraConfig TinyLoraConfig() {
  const BertConfig e = TinyBertConfig();
  LoraConfig c;
  c.rank = 4;
  c.alpha = 8;
  c.num_layers = e.num_hidden_layers;
  c.hidden_size = e.hidden_size;
  c.intermediate_size = e.intermediate_size;
  return c;
}

// A MetaTT config on the tiny encoder's shapes (TinyBertConfig: width 16, 2
// layers, 2 heads): `form`, bond rank `rank`, initialisation `init`.
inline MetaTTConfig TinyMetaTTConfig(TTForm form, int64_t rank, const std::string& init) {
  const BertConfig e = TinyBertConfig();
  MetaTTConfig c;
  c.form = form;
  c.ranks = {rank};
  c.d_in = c.d_out = e.hidden_size;
  c.num_layers = e.num_hidden_layers;
  c.num_heads = e.num_attention_heads;
  c.init = init;
  return c;
}

// A task head on the tiny encoder's width: two classes, or a regression head.
inline std::shared_ptr<TaskHead> TinyHead(uint64_t seed,
                                          LabelKind kind = LabelKind::kClassification) {
  TaskHead::Options o;
  o.kind = kind;
  o.hidden_size = TinyBertConfig().hidden_size;
  o.seed = seed;
  auto h = TaskHead::Create(o);
  return h.ok() ? *h : nullptr;
}

// The options the encoder trainer tests start from: `steps` steps of batch 16
// at lr 1e-2, mean pooling, sequences of at most 32 tokens.
inline TrainerOptions TinyTrainerOptions(int64_t steps, uint64_t seed) {
  TrainerOptions o;
  o.steps = steps;
  o.batch_size = 16;
  o.lr = 1e-2;
  o.seed = seed;
  o.pooling = Pooling::kMean;
  o.max_length = 32;
  return o;
}

// [CLS]=1, [SEP]=2, [PAD]=0; words hash (FNV-1a) into ids 4..63.
inline int64_t WordId(const std::string& w) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char ch : w) h = (h ^ ch) * 1099511628211ull;
  return 4 + static_cast<int64_t>(h % 60);
}

inline BatchTokenizer WhitespaceTokenizer() {
  return [](const std::vector<TextPair>& rows, int max_length) -> absl::StatusOr<EncoderInput> {
    std::vector<std::vector<int64_t>> ids, types;
    size_t longest = 0;
    for (const auto& [a, b] : rows) {
      std::vector<int64_t> id = {1}, ty = {0};
      for (auto w : absl::StrSplit(a, ' ', absl::SkipEmpty())) {
        id.push_back(WordId(std::string(w)));
        ty.push_back(0);
      }
      id.push_back(2);
      ty.push_back(0);
      if (b) {
        for (auto w : absl::StrSplit(*b, ' ', absl::SkipEmpty())) {
          id.push_back(WordId(std::string(w)));
          ty.push_back(1);
        }
        id.push_back(2);
        ty.push_back(1);
      }
      if (static_cast<int>(id.size()) > max_length) {
        id.resize(max_length);
        ty.resize(max_length);
      }
      longest = std::max(longest, id.size());
      ids.push_back(id);
      types.push_back(ty);
    }
    const int64_t B = static_cast<int64_t>(rows.size()), S = static_cast<int64_t>(longest);
    EncoderInput in;
    in.input_ids = torch::zeros({B, S}, torch::kLong);
    in.token_type_ids = torch::zeros({B, S}, torch::kLong);
    in.attention_mask = torch::zeros({B, S}, torch::kLong);
    for (int64_t i = 0; i < B; ++i) {
      for (size_t j = 0; j < ids[i].size(); ++j) {
        in.input_ids[i][j] = ids[i][j];
        in.token_type_ids[i][j] = types[i][j];
        in.attention_mask[i][j] = 1;
      }
    }
    return in;
  };
}

// Label 1 iff the sentence contains `cue`; regression target = count of cue.
inline Dataset SyntheticDataset(int n, uint64_t seed, bool regression = false,
                                const std::string& cue = "great") {
  const std::vector<std::string> words = {"the", "movie", "was", "plot", "actor", "a",
                                          "film", "very", "scene", "story"};
  std::mt19937_64 rng(seed);
  Dataset ds;
  ds.label_kind = regression ? LabelKind::kRegression : LabelKind::kClassification;
  if (!regression) ds.label_vocab = {"0", "1"};
  for (int i = 0; i < n; ++i) {
    std::string s;
    int cues = 0;
    const int len = 3 + static_cast<int>(rng() % 5);
    for (int k = 0; k < len; ++k) {
      if (rng() % 4 == 0) {
        s += cue + " ";
        ++cues;
      } else {
        s += words[rng() % words.size()] + " ";
      }
    }
    Example e;
    e.text = s;
    e.label_id = cues > 0 ? 1 : 0;
    e.label_value = static_cast<float>(cues);
    e.line = i + 1;
    ds.examples.push_back(e);
  }
  return ds;
}

// Low-rank additive adapter on Q and V of every layer: delta = x A_l B_l
// (per projection), plus a per-task output scale vector so multi-task rows
// can be told apart. A "sweep" keeps the first max_rank columns of A.
class TestAdapter : public EncoderAdapter {
 public:
  TestAdapter(int layers, int64_t d, int64_t rank, int64_t tasks, uint64_t seed) {
    torch::manual_seed(seed);
    for (int l = 0; l < layers; ++l) {
      for (int m = 0; m < 2; ++m) {
        a.push_back((torch::randn({d, rank}) * 0.3).set_requires_grad(true));
        b.push_back(torch::zeros({rank, d}).set_requires_grad(true));
      }
    }
    task_scale = torch::ones({tasks, 1}).set_requires_grad(true);
  }
  std::vector<torch::Tensor> Deltas(int layer, const torch::Tensor& x,
                                    const std::vector<Projection>& projections,
                                    const AdapterBatch& batch) override {
    std::vector<torch::Tensor> out;
    if (batch.task_index.defined()) seen_tasks.push_back(batch.task_index.clone());
    for (Projection p : projections) {
      int m = p == Projection::kQuery ? 0 : p == Projection::kValue ? 1 : -1;
      if (m < 0) {
        out.emplace_back();
        continue;
      }
      torch::Tensor y = x.matmul(a[layer * 2 + m]).matmul(b[layer * 2 + m]);
      if (batch.task_index.defined()) {
        y = y * task_scale.index_select(0, batch.task_index).unsqueeze(-1);
      }
      out.push_back(y);
    }
    return out;
  }
  std::vector<torch::Tensor> Params() const {
    std::vector<torch::Tensor> p = a;
    p.insert(p.end(), b.begin(), b.end());
    p.push_back(task_scale);
    return p;
  }
  AdapterBinding Binding() {
    AdapterBinding bnd;
    bnd.adapter = this;
    bnd.trainable_parameters = [this] {
      std::vector<torch::Tensor> out;
      for (auto& p : Params())
        if (p.requires_grad()) out.push_back(p);
      return out;
    };
    bnd.snapshot = [this] {
      std::map<std::string, torch::Tensor> m;
      auto ps = Params();
      for (size_t i = 0; i < ps.size(); ++i) m[absl::StrCat("p", i)] = ps[i].detach().clone();
      return m;
    };
    bnd.sweep = [this](int64_t max_rank, const RankTruncation&)
        -> absl::StatusOr<std::vector<BondTruncation>> {
      std::vector<BondTruncation> out;
      for (size_t i = 0; i < a.size(); ++i) {
        const int64_t old = a[i].size(1), nr = std::min(old, max_rank);
        double discarded = 0;
        if (nr < old) {
          discarded = b[i].detach().slice(0, nr).pow(2).sum().item<double>();
          a[i] = a[i].detach().slice(1, 0, nr).clone().set_requires_grad(true);
          b[i] = b[i].detach().slice(0, 0, nr).clone().set_requires_grad(true);
        }
        out.push_back({static_cast<int>(i), old, nr, discarded});
      }
      return out;
    };
    return bnd;
  }

  std::vector<torch::Tensor> a, b;
  torch::Tensor task_scale;
  std::vector<torch::Tensor> seen_tasks;
};

}  // namespace testing_util
}  // namespace metatt
