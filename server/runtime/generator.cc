#include "server/runtime/generator.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "base/status_macros.h"
#include "server/model/bpe_tokenizer.h"

namespace metatt {
namespace {

constexpr int64_t kMiB = 1 << 20;

absl::Status Internal(const std::exception& e) {
  std::string msg = e.what();
  msg.resize(std::min(msg.size(), msg.find('\n')));
  return absl::InternalError(absl::StrCat("generation: ", msg));
}

// Left-pads a cache with `n` invalid slots (keys/values zero), so that
// caches of different lengths line up at their newest token.
KvCache LeftPad(const KvCache& c, int64_t n) {
  if (n == 0) return c;
  KvCache out;
  out.next_position = c.next_position;
  for (size_t l = 0; l < c.keys.size(); ++l) {
    auto pad_shape = c.keys[l].sizes().vec();
    pad_shape[2] = n;
    torch::Tensor pad = torch::zeros(pad_shape, c.keys[l].options());
    out.keys.push_back(torch::cat({pad, c.keys[l]}, 2));
    out.values.push_back(torch::cat({pad, c.values[l]}, 2));
  }
  out.valid = torch::cat({torch::zeros({c.valid.size(0), n}, c.valid.options()), c.valid}, 1);
  return out;
}

// Rows of `b` after the rows of `a`, right-aligned.
KvCache Concat(const KvCache& a, const KvCache& b) {
  if (a.empty()) return b;
  if (b.empty()) return a;
  const int64_t T = std::max(a.length(), b.length());
  KvCache pa = LeftPad(a, T - a.length()), pb = LeftPad(b, T - b.length());
  KvCache out;
  for (size_t l = 0; l < pa.keys.size(); ++l) {
    out.keys.push_back(torch::cat({pa.keys[l], pb.keys[l]}, 0));
    out.values.push_back(torch::cat({pa.values[l], pb.values[l]}, 0));
  }
  out.valid = torch::cat({pa.valid, pb.valid}, 0);
  out.next_position = torch::cat({pa.next_position, pb.next_position}, 0);
  return out;
}

// Drops leading columns that no row uses (their rows left the batch).
void TrimLeading(KvCache* c) {
  if (c->empty() || c->length() == 0) return;
  torch::Tensor used = c->valid.any(0).to(torch::kCPU);
  auto u = used.accessor<bool, 1>();
  int64_t first = 0;
  while (first < used.size(0) && !u[first]) ++first;
  if (first == 0) return;
  for (auto& k : c->keys) k = k.narrow(2, first, k.size(2) - first).contiguous();
  for (auto& v : c->values) v = v.narrow(2, first, v.size(2) - first).contiguous();
  c->valid = c->valid.narrow(1, first, c->valid.size(1) - first).contiguous();
}

AdapterBatch TaskBatch(const std::vector<std::shared_ptr<GenSequence>>& rows,
                       torch::Device device) {
  torch::Tensor t = torch::empty({static_cast<int64_t>(rows.size())}, torch::kLong);
  auto a = t.accessor<int64_t, 1>();
  for (size_t i = 0; i < rows.size(); ++i) a[i] = rows[i]->task;
  return AdapterBatch::FromHost(t, device);
}

// Text kept back from the stream because it may be the start of a stop
// sequence: the longest suffix of `text` that is a proper prefix of one.
size_t HeldBack(const std::string& text, const std::vector<std::string>& stops) {
  size_t keep = 0;
  for (const std::string& s : stops) {
    for (size_t n = std::min(text.size(), s.size() - 1); n > keep; --n) {
      if (text.compare(text.size() - n, n, s, 0, n) == 0) {
        keep = n;
        break;
      }
    }
  }
  return keep;
}

}  // namespace

int64_t SampleNext(const float* logits, int64_t vocab, const SamplingParams& p,
                   std::mt19937_64* rng) {
  if (p.temperature <= 0) {
    return std::max_element(logits, logits + vocab) - logits;  // first maximum
  }
  std::vector<int64_t> idx(vocab);
  std::iota(idx.begin(), idx.end(), 0);
  int64_t n = vocab;
  if (p.top_k > 0 && p.top_k < vocab) {
    std::partial_sort(idx.begin(), idx.begin() + p.top_k, idx.end(),
                      [&](int64_t a, int64_t b) { return logits[a] > logits[b]; });
    n = p.top_k;
  } else {
    std::sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return logits[a] > logits[b]; });
  }
  // Softmax of logits / temperature over the n candidates (sorted, best first).
  std::vector<double> prob(n);
  const double mx = logits[idx[0]];
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    prob[i] = std::exp((logits[idx[i]] - mx) / p.temperature);
    sum += prob[i];
  }
  // Nucleus: the smallest prefix whose mass reaches top_p.
  const double top_p = (p.top_p <= 0 || p.top_p > 1) ? 1.0 : p.top_p;
  if (top_p < 1.0) {
    double acc = 0;
    int64_t keep = n;
    for (int64_t i = 0; i < n; ++i) {
      acc += prob[i] / sum;
      if (acc >= top_p) {
        keep = i + 1;
        break;
      }
    }
    n = keep;
    sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += prob[i];
  }
  std::uniform_real_distribution<double> u(0.0, sum);
  double r = u(*rng), acc = 0;
  for (int64_t i = 0; i < n; ++i) {
    acc += prob[i];
    if (r < acc) return idx[i];
  }
  return idx[n - 1];
}

// --- GenSequence ---

bool GenSequence::Wait(size_t seen, absl::Time until, std::vector<int64_t>* tokens) {
  std::unique_lock<std::mutex> l(mu);
  cv.wait_until(l, absl::ToChronoTime(until), [&] { return finished || out.size() > seen; });
  for (size_t i = seen; i < out.size(); ++i) tokens->push_back(out[i]);
  return finished;
}
FinishReason GenSequence::finish_reason() const {
  std::lock_guard<std::mutex> l(mu);
  return reason;
}
absl::Status GenSequence::status() const {
  std::lock_guard<std::mutex> l(mu);
  return final_status;
}
absl::Time GenSequence::finish_time() const {
  std::lock_guard<std::mutex> l(mu);
  return finished_at;
}
absl::Time GenSequence::first_token_time() const {
  std::lock_guard<std::mutex> l(mu);
  return first_token_at;
}

// --- ContinuousBatcher ---

ContinuousBatcher::ContinuousBatcher(const Options& options,
                                     std::shared_ptr<const BaseModel> model,
                                     DeviceScheduler* scheduler, Resolver resolver,
                                     KindCheck kind_check)
    : options_(options), model_(std::move(model)), scheduler_(scheduler),
      resolver_(std::move(resolver)), kind_check_(std::move(kind_check)) {
  const LlamaConfig& c = model_->decoder->config();
  bytes_per_token_ = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim *
                     static_cast<int64_t>(sizeof(float));
  budget_bytes_ =
      options_.kv_cache_bytes > 0 ? options_.kv_cache_bytes : options_.kv_cache_mb * kMiB;
}

absl::StatusOr<std::unique_ptr<ContinuousBatcher>> ContinuousBatcher::Create(
    const Options& options, std::shared_ptr<const BaseModel> model, DeviceScheduler* scheduler,
    Resolver resolver, KindCheck kind_check) {
  if (model == nullptr || !model->is_decoder() || model->decoder == nullptr) {
    return absl::FailedPreconditionError("generation needs a decoder base model");
  }
  if (scheduler == nullptr) return absl::InvalidArgumentError("generator: scheduler is null");
  if (options.kv_cache_mb < 1) return absl::InvalidArgumentError("kv_cache_mb: must be >= 1");
  if (options.max_running < 1) return absl::InvalidArgumentError("max_running: must be >= 1");
  if (options.max_queue < 1) return absl::InvalidArgumentError("max_queue: must be >= 1");
  if (options.default_max_tokens < 1)
    return absl::InvalidArgumentError("default_max_tokens: must be >= 1");
  std::unique_ptr<ContinuousBatcher> b(new ContinuousBatcher(
      options, std::move(model), scheduler, std::move(resolver), std::move(kind_check)));
  scheduler->SetStepWork(b.get());
  return b;
}

ContinuousBatcher::~ContinuousBatcher() = default;

void ContinuousBatcher::SetObserver(std::function<void(const GenerationStats&)> observer) {
  std::lock_guard<std::mutex> l(mu_);
  observer_ = std::move(observer);
}

int64_t ContinuousBatcher::queued() const {
  std::lock_guard<std::mutex> l(mu_);
  return static_cast<int64_t>(queue_.size());
}

absl::Status ContinuousBatcher::Submit(std::shared_ptr<GenSequence> seq) {
  if (seq == nullptr) return absl::InvalidArgumentError("sequence: null");
  if (seq->prompt.empty()) return absl::InvalidArgumentError("prompt: no tokens");
  if (seq->max_new_tokens < 1) return absl::InvalidArgumentError("max_tokens: must be >= 1");
  const int64_t context = model_->decoder->config().max_position_embeddings;
  const int64_t len = static_cast<int64_t>(seq->prompt.size());
  if (len + seq->max_new_tokens > context) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt: ", len, " tokens + max_tokens ", seq->max_new_tokens,
                     " exceed the model's context of ", context,
                     " tokens (max_position_embeddings)"));
  }
  const int64_t need = (len + seq->max_new_tokens) * bytes_per_token_;
  if (need > budget_bytes_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt: ", len, " tokens + max_tokens ", seq->max_new_tokens, " need ",
        (need + kMiB - 1) / kMiB, " MiB of KV cache (", need / bytes_per_token_,
        " token slots), more than the whole budget of ", budget_bytes_ / bytes_per_token_,
        " token slots (--kv_cache_mb=", options_.kv_cache_mb, ")"));
  }
  seq->reserved_bytes = need;
  seq->rng.seed(seq->sampling.seed);
  seq->enqueued_at = absl::Now();
  {
    std::lock_guard<std::mutex> l(mu_);
    if (stopped_) return absl::UnavailableError("the server is shutting down");
    if (static_cast<int64_t>(queue_.size()) >= options_.max_queue) {
      return absl::ResourceExhaustedError(
          absl::StrCat("generation queue full (", queue_.size(), " requests waiting, limit ",
                       options_.max_queue, "); retry later"));
    }
    queue_.push_back(std::move(seq));
  }
  scheduler_->Wake();
  return absl::OkStatus();
}

bool ContinuousBatcher::HasWork() {
  if (running_.load() > 0) return true;
  std::lock_guard<std::mutex> l(mu_);
  return !queue_.empty();
}

void ContinuousBatcher::Finish(GenSequence* seq, FinishReason reason, absl::Status status) {
  {
    std::lock_guard<std::mutex> l(seq->mu);
    if (seq->finished) return;
    seq->finished = true;
    seq->finished_at = absl::Now();
    seq->reason = reason;
    seq->final_status = std::move(status);
  }
  seq->cv.notify_all();
}

bool ContinuousBatcher::Emit(GenSequence* seq, int64_t token) {
  ++seq->generated;
  const bool eos = seq->eos_token_id >= 0 && token == seq->eos_token_id;
  {
    std::lock_guard<std::mutex> l(seq->mu);
    if (seq->first_token_at == absl::InfinitePast()) seq->first_token_at = absl::Now();
    if (!eos) seq->out.push_back(token);
  }
  seq->last_token = token;
  if (eos) {
    Finish(seq, FinishReason::kStop);
    return false;
  }
  if (seq->generated >= seq->max_new_tokens) {
    Finish(seq, FinishReason::kLength);
    return false;
  }
  seq->cv.notify_all();
  return true;
}

void ContinuousBatcher::KeepRows(Group* group, const std::vector<int64_t>& keep) {
  if (keep.size() == group->rows.size()) return;
  std::vector<std::shared_ptr<GenSequence>> rows;
  for (int64_t i : keep) rows.push_back(group->rows[i]);
  for (const auto& r : group->rows) {
    if (std::find(rows.begin(), rows.end(), r) == rows.end()) {
      reserved_.fetch_sub(r->reserved_bytes);
      running_.fetch_sub(1);
    }
  }
  group->rows = std::move(rows);
  group->tasks = AdapterBatch();  // the rows changed
  if (group->rows.empty()) {
    group->cache = KvCache();
    return;
  }
  group->cache = group->cache.SelectRows(torch::tensor(keep, torch::kLong));
  TrimLeading(&group->cache);
}

void ContinuousBatcher::FailGroup(Group* group, const absl::Status& status) {
  for (const auto& r : group->rows) Finish(r.get(), FinishReason::kNone, status);
  KeepRows(group, {});
}

void ContinuousBatcher::SweepCancelled() {
  for (auto it = groups_.begin(); it != groups_.end();) {
    Group& g = it->second;
    std::vector<int64_t> keep;
    for (size_t i = 0; i < g.rows.size(); ++i) {
      GenSequence* s = g.rows[i].get();
      if (s->cancel_requested.load()) {
        Finish(s, FinishReason::kCancelled);
      } else {
        keep.push_back(static_cast<int64_t>(i));
      }
    }
    KeepRows(&g, keep);
    it = g.rows.empty() ? groups_.erase(it) : std::next(it);
  }
}

std::vector<int64_t> ContinuousBatcher::SampleRows(
    const torch::Tensor& logits, const std::vector<std::shared_ptr<GenSequence>>& rows) {
  // logits [B, V] on the device. Greedy rows: argmax on the device (what
  // GreedyGenerate does); others on the host.
  const int64_t B = logits.size(0), V = logits.size(1);
  std::vector<int64_t> out(B);
  bool any_sampled = false;
  for (const auto& r : rows) any_sampled |= r->sampling.temperature > 0;
  torch::Tensor greedy = logits.argmax(-1).to(torch::kCPU);
  auto ga = greedy.accessor<int64_t, 1>();
  torch::Tensor host;
  if (any_sampled) host = logits.to(torch::kCPU, torch::kFloat32).contiguous();
  for (int64_t b = 0; b < B; ++b) {
    GenSequence* s = rows[b].get();
    if (s->sampling.temperature > 0) {
      out[b] = SampleNext(host.data_ptr<float>() + b * V, V, s->sampling, &s->rng);
    } else {
      out[b] = ga[b];
    }
  }
  return out;
}

void ContinuousBatcher::Admit() {
  std::vector<std::shared_ptr<GenSequence>> admitted;
  {
    std::lock_guard<std::mutex> l(mu_);
    while (!queue_.empty()) {
      std::shared_ptr<GenSequence>& front = queue_.front();
      if (front->cancel_requested.load()) {  // left while queued: never runs
        Finish(front.get(), FinishReason::kCancelled);
        queue_.pop_front();
        continue;
      }
      if (running_.load() + static_cast<int64_t>(admitted.size()) >= options_.max_running) break;
      if (reserved_.load() + front->reserved_bytes > budget_bytes_) break;  // in order: no overtaking
      reserved_.fetch_add(front->reserved_bytes);
      admitted.push_back(std::move(front));
      queue_.pop_front();
    }
  }
  if (admitted.empty()) return;
  running_.fetch_add(static_cast<int64_t>(admitted.size()));
  // One prefill per family version.
  std::map<const PublishedFamily*, std::vector<std::shared_ptr<GenSequence>>> by_family;
  for (auto& s : admitted) by_family[s->family.get()].push_back(std::move(s));
  for (auto& [fam, seqs] : by_family) {
    std::vector<std::shared_ptr<GenSequence>> keep_alive = seqs;
    absl::Status st;
    try {
      st = Prefill(std::move(seqs));
    } catch (const std::exception& e) {
      st = Internal(e);
    }
    if (!st.ok()) {
      // The rows that did not reach a group fail here and free their slots.
      auto it = groups_.find(fam);
      for (const auto& s : keep_alive) {
        const bool in_group = it != groups_.end() &&
                              std::find(it->second.rows.begin(), it->second.rows.end(), s) !=
                                  it->second.rows.end();
        if (in_group) continue;
        bool already_released;
        {
          std::lock_guard<std::mutex> l(s->mu);
          already_released = s->finished;  // finished at its first token
        }
        Finish(s.get(), FinishReason::kNone, st);
        if (!already_released) {
          reserved_.fetch_sub(s->reserved_bytes);
          running_.fetch_sub(1);
        }
      }
    }
  }
}

absl::Status ContinuousBatcher::Prefill(std::vector<std::shared_ptr<GenSequence>> seqs) {
  const LlamaDecoder& dec = *model_->decoder;
  const int64_t B = static_cast<int64_t>(seqs.size());
  int64_t S = 0;
  for (const auto& s : seqs) S = std::max<int64_t>(S, s->prompt.size());
  // Left-padded, so every row's newest token is in the last column.
  torch::Tensor ids = torch::zeros({B, S}, torch::kLong);
  torch::Tensor mask = torch::zeros({B, S}, torch::kLong);
  {
    auto ia = ids.accessor<int64_t, 2>();
    auto ma = mask.accessor<int64_t, 2>();
    for (int64_t b = 0; b < B; ++b) {
      const auto& p = seqs[b]->prompt;
      const int64_t off = S - static_cast<int64_t>(p.size());
      for (size_t i = 0; i < p.size(); ++i) {
        ia[b][off + i] = p[i];
        ma[b][off + i] = 1;
      }
    }
  }
  std::shared_ptr<const PublishedFamily> family = seqs[0]->family;
  EncoderAdapter* adapter = family ? family->adapter.get() : nullptr;
  AdapterBatch ab = TaskBatch(seqs, dec.device());
  KvCache cache;
  DecoderForwardOptions last;
  last.last_logits_only = true;
  ASSIGN_OR_RETURN(DecoderOutput out, dec.Forward({ids, mask}, &cache, adapter, ab, last));
  std::vector<int64_t> next = SampleRows(out.logits.select(1, 0), seqs);
  std::vector<int64_t> keep;
  for (int64_t b = 0; b < B; ++b) {
    if (Emit(seqs[b].get(), next[b])) keep.push_back(b);
  }
  // Finished at the first token: release at once.
  for (int64_t b = 0; b < B; ++b) {
    if (std::find(keep.begin(), keep.end(), b) == keep.end()) {
      reserved_.fetch_sub(seqs[b]->reserved_bytes);
      running_.fetch_sub(1);
    }
  }
  if (keep.empty()) return absl::OkStatus();
  if (static_cast<int64_t>(keep.size()) < B) {
    cache = cache.SelectRows(torch::tensor(keep, torch::kLong));
  }
  Group& g = groups_[family.get()];
  if (g.rows.empty()) g.family = family;
  for (int64_t b : keep) g.rows.push_back(seqs[b]);
  g.tasks = AdapterBatch();  // the rows changed
  g.cache = Concat(g.cache, cache);
  TrimLeading(&g.cache);
  return absl::OkStatus();
}

absl::Status ContinuousBatcher::DecodeStep(Group* g) {
  const LlamaDecoder& dec = *model_->decoder;
  const int64_t B = static_cast<int64_t>(g->rows.size());
  torch::Tensor ids = torch::empty({B, 1}, torch::kLong);
  auto ia = ids.accessor<int64_t, 2>();
  for (int64_t b = 0; b < B; ++b) ia[b][0] = g->rows[b]->last_token;
  EncoderAdapter* adapter = g->family ? g->family->adapter.get() : nullptr;
  if (!g->tasks.task_index.defined()) g->tasks = TaskBatch(g->rows, dec.device());
  DecoderForwardOptions last;
  last.last_logits_only = true;
  ASSIGN_OR_RETURN(DecoderOutput out,
                   dec.Forward({ids, {}}, &g->cache, adapter, g->tasks, last));
  std::vector<int64_t> next = SampleRows(out.logits.select(1, 0), g->rows);
  std::vector<int64_t> keep;
  for (int64_t b = 0; b < B; ++b) {
    if (Emit(g->rows[b].get(), next[b])) keep.push_back(b);
  }
  KeepRows(g, keep);
  return absl::OkStatus();
}

void ContinuousBatcher::RunStep() {
  torch::NoGradGuard no_grad;
  SweepCancelled();
  Admit();
  for (auto it = groups_.begin(); it != groups_.end();) {
    Group& g = it->second;
    // Rows admitted in this step already hold their first token; they
    // decode their second one here with everyone else.
    absl::Status st;
    try {
      st = DecodeStep(&g);
    } catch (const std::exception& e) {
      st = Internal(e);
    }
    if (!st.ok()) FailGroup(&g, st);
    it = g.rows.empty() ? groups_.erase(it) : std::next(it);
  }
  decode_steps_.fetch_add(1);
}

void ContinuousBatcher::Abort(const absl::Status& status) {
  std::deque<std::shared_ptr<GenSequence>> left;
  {
    std::lock_guard<std::mutex> l(mu_);
    stopped_ = true;
    left.swap(queue_);
  }
  for (auto& s : left) Finish(s.get(), FinishReason::kNone, status);
  for (auto& [fam, g] : groups_) FailGroup(&g, status);
  groups_.clear();
}

absl::Status ContinuousBatcher::Generate(
    const GenerateParams& p, int64_t deadline_unix_ms, const std::function<bool()>& cancelled,
    const std::function<bool(const GenerateChunk&)>& on_chunk) {
  const BpeTokenizer& tok = *model_->bpe;
  // --- validate and tokenise (caller's thread) ---
  if (p.prompt.empty() == p.messages.empty()) {
    return absl::InvalidArgumentError(
        p.prompt.empty() ? "prompt: give a prompt or chat messages"
                         : "messages: give either a prompt or chat messages, not both");
  }
  if (p.version < 0) return absl::InvalidArgumentError("version: negative");
  if (p.max_tokens < 0) return absl::InvalidArgumentError("max_tokens: negative");
  if (!(p.temperature >= 0) || p.temperature > 100)
    return absl::InvalidArgumentError("temperature: must be in [0, 100]");
  if (!(p.top_p >= 0) || p.top_p > 1)
    return absl::InvalidArgumentError("top_p: must be in [0, 1] (0 = 1: no nucleus cut)");
  if (p.top_k < 0) return absl::InvalidArgumentError("top_k: negative");
  if (p.stop.size() > 16) return absl::InvalidArgumentError("stop: at most 16 stop sequences");
  for (size_t i = 0; i < p.stop.size(); ++i) {
    if (p.stop[i].empty())
      return absl::InvalidArgumentError(absl::StrCat("stop[", i, "]: empty"));
  }
  size_t bytes = p.prompt.size();
  for (const auto& m : p.messages) bytes += m.content.size();
  if (static_cast<int64_t>(bytes) > options_.max_prompt_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("prompt: longer than ",
                                                   options_.max_prompt_bytes, " bytes"));
  }
  auto seq = std::make_shared<GenSequence>();
  if (!p.family.empty() || !p.task.empty()) {
    absl::StatusOr<ResolvedTask> r = resolver_ ? resolver_(p.family, p.version, p.task)
                                               : absl::NotFoundError("no families on this server");
    if (!r.ok()) {
      if (r.status().code() == absl::StatusCode::kNotFound && kind_check_ && !p.family.empty()) {
        RETURN_IF_ERROR(kind_check_(p.family));
      }
      return r.status();
    }
    seq->family = std::move(r->family);
    seq->task = r->task;
  }
  if (p.messages.empty()) {
    seq->prompt = tok.Encode(p.prompt, /*add_special_tokens=*/true);
  } else {
    std::vector<ChatMessage> msgs;
    for (size_t i = 0; i < p.messages.size(); ++i) {
      if (p.messages[i].role.empty())
        return absl::InvalidArgumentError(absl::StrCat("messages[", i, "].role: empty"));
      msgs.push_back({p.messages[i].role, p.messages[i].content});
    }
    absl::StatusOr<std::vector<int64_t>> ids = tok.EncodeChat(msgs, true);
    if (!ids.ok()) {
      return absl::Status(ids.status().code(), absl::StrCat("messages: ", ids.status().message()));
    }
    seq->prompt = std::move(*ids);
  }
  const int64_t context = model_->decoder->config().max_position_embeddings;
  const int64_t len = static_cast<int64_t>(seq->prompt.size());
  if (len == 0) return absl::InvalidArgumentError("prompt: no tokens");
  if (len >= context) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt: ", len, " tokens; the model's context is ", context,
        " tokens (max_position_embeddings), leaving no room to generate"));
  }
  const int64_t budget_tokens = budget_bytes_ / bytes_per_token_;
  if (len >= budget_tokens) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt: ", len, " tokens; the KV-cache budget holds ", budget_tokens,
        " tokens (--kv_cache_mb=", options_.kv_cache_mb, ")"));
  }
  seq->max_new_tokens = std::min(p.max_tokens > 0 ? p.max_tokens : options_.default_max_tokens,
                                 std::min(context, budget_tokens) - len);
  seq->sampling.temperature = p.temperature;
  seq->sampling.top_p = p.top_p <= 0 ? 1.0 : p.top_p;
  seq->sampling.top_k = p.top_k;
  seq->sampling.seed = p.seed ? *p.seed : std::random_device{}();
  seq->eos_token_id =
      tok.eos_id() >= 0 ? tok.eos_id() : model_->decoder->config().eos_token_id;
  const absl::Time deadline = deadline_unix_ms > 0 ? absl::FromUnixMillis(deadline_unix_ms)
                                                   : absl::InfiniteFuture();
  RETURN_IF_ERROR(Submit(seq));

  // --- stream (caller's thread) ---
  GenerateChunk head;
  if (seq->family) {
    head.family = FamilyKeyName(seq->family->family());  // the caller's name, not the key
    head.version = seq->family->version();
    head.task = seq->family->record.tasks[seq->task].name;
    head.task_index = seq->task;
  }
  BpeDecodeStream stream(&tok, /*skip_special_tokens=*/true);
  std::string text;     // all text decoded so far (stop sequences cut it)
  size_t sent = 0;      // bytes of `text` already streamed
  std::vector<int64_t> tokens;
  size_t consumed = 0;  // tokens turned into text
  FinishReason reason = FinishReason::kNone;
  bool client_gone = false;
  bool first_chunk = true;
  while (reason == FinishReason::kNone) {
    absl::Time until = std::min(deadline, absl::Now() + absl::Milliseconds(5));
    const bool done = seq->Wait(tokens.size(), until, &tokens);
    std::vector<int64_t> chunk_ids;
    for (; consumed < tokens.size() && reason == FinishReason::kNone; ++consumed) {
      chunk_ids.push_back(tokens[consumed]);
      text += stream.Step(tokens[consumed]);
      for (const std::string& s : p.stop) {
        const size_t at = text.find(s);
        if (at != std::string::npos) {
          text.resize(at);
          reason = FinishReason::kStop;
        }
      }
    }
    if (done && reason == FinishReason::kNone && consumed == tokens.size()) {
      text += stream.Finish();
      for (const std::string& s : p.stop) {
        const size_t at = text.find(s);
        if (at != std::string::npos) text.resize(at);
      }
      reason = seq->finish_reason();
      if (reason == FinishReason::kNone) {  // failed on the device
        absl::Status st = seq->status();
        return st.ok() ? absl::InternalError("generation ended without a reason") : st;
      }
    }
    if (reason == FinishReason::kNone) {
      if ((cancelled && cancelled()) || absl::Now() >= deadline) {
        seq->Cancel();
        reason = FinishReason::kCancelled;
        client_gone = cancelled && cancelled();
      }
    } else if (!done) {
      seq->Cancel();  // a stop sequence: the device frees the slot at its next step
    }
    // Text ready to stream: all of it at the end, else all but what may
    // begin a stop sequence.
    const size_t ready =
        reason != FinishReason::kNone ? text.size() : text.size() - HeldBack(text, p.stop);
    if (ready <= sent && chunk_ids.empty() && reason == FinishReason::kNone) continue;
    GenerateChunk c;
    if (first_chunk || reason != FinishReason::kNone) {
      c.family = head.family;
      c.task = head.task;
      c.version = head.version;
      c.task_index = head.task_index;
    }
    first_chunk = false;
    if (ready > sent) {
      c.text = text.substr(sent, ready - sent);
      sent = ready;
    }
    c.token_ids = std::move(chunk_ids);
    c.finish = reason;
    if (reason != FinishReason::kNone) {
      c.usage.prompt_tokens = len;
      c.usage.completion_tokens = static_cast<int64_t>(consumed);
      const absl::Time first = seq->first_token_time();
      c.time_to_first_token_s =
          first == absl::InfinitePast() ? 0 : absl::ToDoubleSeconds(first - seq->enqueued());
    }
    // The last chunk always goes out (to a gone client the write fails; the
    // caller still learns the finish reason).
    if ((!client_gone || reason != FinishReason::kNone) && !on_chunk(c) && !client_gone) {
      seq->Cancel();  // the stream is gone
      client_gone = true;
      if (reason == FinishReason::kNone) {
        reason = FinishReason::kCancelled;
        GenerateChunk fin;
        fin.family = head.family;
        fin.task = head.task;
        fin.version = head.version;
        fin.task_index = head.task_index;
        fin.finish = reason;
        fin.usage.prompt_tokens = len;
        fin.usage.completion_tokens = static_cast<int64_t>(consumed);
        on_chunk(fin);
      }
    }
  }
  std::function<void(const GenerationStats&)> observer;
  {
    std::lock_guard<std::mutex> l(mu_);
    observer = observer_;
  }
  if (observer) {
    GenerationStats s;
    s.prompt_tokens = len;
    s.completion_tokens = static_cast<int64_t>(consumed);
    const absl::Time first = seq->first_token_time();
    s.time_to_first_token_s =
        first == absl::InfinitePast() ? -1 : absl::ToDoubleSeconds(first - seq->enqueued());
    s.seconds = absl::ToDoubleSeconds(absl::Now() - seq->enqueued());
    s.finish = reason;
    observer(s);
  }
  return absl::OkStatus();
}

}  // namespace metatt
