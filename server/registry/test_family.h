// Test helpers (torch): a random 4+1D family publish request and a tiny
// WordPiece vocabulary matching TinyBertConfig (64 ids).
#pragma once

#include <memory>
#include <random>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "absl/strings/str_cat.h"
#include "adapters/metatt_adapter.h"
#include "server/model/bert_config.h"
#include "server/model/tokenizer.h"
#include "server/registry/adapter_registry.h"

namespace metatt {
namespace testing_util {

// The adapter of the random test families: (4+1)D, bond rank `rank` on Q and
// V of `base`, `num_tasks` task slices, cores drawn with `seed` (torch is
// seeded with it too, for what the caller draws next).
inline absl::StatusOr<std::unique_ptr<MetaTTAdapter>> RandomFamilyAdapter(
    const BertConfig& base, int64_t num_tasks, uint64_t seed, int64_t rank = 4) {
  torch::manual_seed(seed);
  MetaTTConfig c;
  c.form = TTForm::k4Plus1D;
  c.ranks = {rank};
  c.projections = {Projection::kQuery, Projection::kValue};
  c.init = "normal(0.5)";
  c.num_tasks = num_tasks;
  c.d_in = c.d_out = base.hidden_size;
  c.num_layers = base.num_hidden_layers;
  c.num_heads = base.num_attention_heads;
  MetaTTAdapter::Options o;
  o.seed = seed;
  return MetaTTAdapter::Create(c, o);
}

// Task t has 2 + t % 3 labels, except every 5th task (t % 5 == 4): regression.
inline PublishRequest RandomFamily(const std::string& name, int64_t num_tasks,
                                   const BertConfig& base, uint64_t seed) {
  auto adapter = RandomFamilyAdapter(base, num_tasks, seed);
  PublishRequest req;
  req.family = name;
  req.config = (*adapter)->config();
  req.scale = (*adapter)->scale();
  for (const auto& [k, v] : (*adapter)->NamedParameters()) req.adapter_tensors[k] = v.detach();
  for (int64_t t = 0; t < num_tasks; ++t) {
    TaskRecord r;
    r.name = absl::StrCat("task", t);
    r.regression = t % 5 == 4;
    r.num_labels = r.regression ? 1 : 2 + t % 3;
    for (int64_t l = 0; !r.regression && l < r.num_labels; ++l) {
      r.label_names.push_back(absl::StrCat("L", l));
    }
    req.tasks.push_back(r);
    req.head_weights.push_back(torch::randn({r.num_labels, base.hidden_size}));
    req.head_biases.push_back(torch::randn({r.num_labels}) * 0.1);
  }
  return req;
}

inline std::vector<std::string> TinyVocab() {
  std::vector<std::string> v = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "movie",
                                "was", "plot", "actor", "a", "film", "very", "scene", "story",
                                "great", "good", "bad"};
  for (int i = 0; v.size() < 64; ++i) v.push_back(absl::StrCat("w", i));
  return v;
}

inline std::shared_ptr<const WordPieceTokenizer> TinyTokenizer() {
  auto t = WordPieceTokenizer::FromVocab(TinyVocab(), WordPieceTokenizer::Options());
  return std::make_shared<const WordPieceTokenizer>(std::move(*t));
}

// Words of TinyVocab (no special tokens) for random sentences.
inline std::string RandomSentence(std::mt19937_64& rng, int min_words = 2, int max_words = 12) {
  const auto v = TinyVocab();
  const int n = min_words + static_cast<int>(rng() % (max_words - min_words + 1));
  std::string s;
  for (int i = 0; i < n; ++i) {
    if (i) s += " ";
    s += v[5 + rng() % (v.size() - 5)];
  }
  return s;
}

}  // namespace testing_util
}  // namespace metatt
