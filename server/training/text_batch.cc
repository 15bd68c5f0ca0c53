#include "server/training/text_batch.h"

#include <utility>

#include "absl/status/status.h"
#include "base/status_macros.h"

namespace metatt {

BatchTokenizer MakeBatchTokenizer(std::shared_ptr<const WordPieceTokenizer> tokenizer) {
  return [tok = std::move(tokenizer)](const std::vector<TextPair>& rows,
                                      int max_length) -> absl::StatusOr<EncoderInput> {
    if (rows.empty()) return absl::InvalidArgumentError("empty batch");
    std::vector<Encoding> enc = tok->EncodeBatch(rows, max_length);
    const int64_t B = static_cast<int64_t>(enc.size());
    const int64_t S = static_cast<int64_t>(enc[0].ids.size());
    std::vector<int64_t> ids, types, mask;
    ids.reserve(B * S);
    types.reserve(B * S);
    mask.reserve(B * S);
    for (const Encoding& e : enc) {
      if (static_cast<int64_t>(e.ids.size()) != S) {
        return absl::InternalError("tokenizer returned rows of different lengths");
      }
      ids.insert(ids.end(), e.ids.begin(), e.ids.end());
      types.insert(types.end(), e.type_ids.begin(), e.type_ids.end());
      mask.insert(mask.end(), e.attention_mask.begin(), e.attention_mask.end());
    }
    EncoderInput in;
    RETURN_IF_ERROR(TorchTry("batch tensors", [&] {
      in.input_ids = torch::tensor(ids, torch::kLong).view({B, S});
      in.token_type_ids = torch::tensor(types, torch::kLong).view({B, S});
      in.attention_mask = torch::tensor(mask, torch::kLong).view({B, S});
    }));
    return in;
  };
}

}  // namespace metatt
