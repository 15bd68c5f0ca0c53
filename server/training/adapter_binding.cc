#include "server/training/adapter_binding.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"

namespace metatt {
namespace {

// Copies a snapshot into same-shaped leaves in place (keeps the leaves the
// optimizer holds).
absl::Status CopyInto(const std::vector<std::pair<std::string, torch::Tensor>>& leaves,
                      const std::map<std::string, torch::Tensor>& snap) {
  for (const auto& [name, t] : leaves) {
    auto it = snap.find(name);
    if (it == snap.end()) return absl::NotFoundError(absl::StrCat("snapshot lacks '", name, "'"));
    if (!it->second.sizes().equals(t.sizes())) {
      return absl::FailedPreconditionError(
          absl::StrCat("snapshot tensor '", name, "' has another shape (ranks changed)"));
    }
  }
  return TorchTry("restore", [&] {
    torch::NoGradGuard ng;
    for (const auto& [name, t] : leaves) {
      torch::Tensor leaf = t;
      leaf.copy_(snap.at(name));
    }
  });
}

std::map<std::string, torch::Tensor> Snapshot(
    const std::vector<std::pair<std::string, torch::Tensor>>& leaves) {
  std::map<std::string, torch::Tensor> m;
  for (const auto& [name, t] : leaves) m[name] = t.detach().clone();
  return m;
}

// What both adapters bind alike: their trainable parameters, and snapshots of
// their named tensors restored in place.
template <typename A>
AdapterBinding BindParameters(A* a) {
  AdapterBinding b;
  b.adapter = a;
  b.trainable_parameters = [a] { return a->TrainableParameters(); };
  b.snapshot = [a] { return Snapshot(a->NamedParameters()); };
  b.restore = [a](const std::map<std::string, torch::Tensor>& snap) {
    return CopyInto(a->NamedParameters(), snap);
  };
  return b;
}

}  // namespace

AdapterBinding BindMetaTT(MetaTTAdapter* a) {
  AdapterBinding b = BindParameters(a);
  b.restore = [a](const std::map<std::string, torch::Tensor>& snap) {
    RETURN_IF_ERROR(CopyInto(a->NamedParameters(), snap));
    a->MarkCoresChanged();
    return absl::OkStatus();
  };
  b.sweep = [a](int64_t max_rank,
                const RankTruncation& t) -> absl::StatusOr<std::vector<BondTruncation>> {
    TruncationParams p;
    p.max_rank = max_rank;
    p.rel_cutoff = t.relative_cutoff;
    p.min_rank = t.min_rank;
    ASSIGN_OR_RETURN(MetaTTAdapter::SweepResult r, a->Truncate(p));
    std::vector<BondTruncation> out;
    for (const BondReport& br : r.bonds) {
      out.push_back({br.bond, br.old_rank, br.new_rank, br.discarded_weight});
    }
    return out;
  };
  b.after_step = [a] { a->MarkCoresChanged(); };
  b.inner_parameters = [a] { return a->InnerParameters(); };
  return b;
}

AdapterBinding BindLora(LoraAdapter* a) { return BindParameters(a); }

}  // namespace metatt
