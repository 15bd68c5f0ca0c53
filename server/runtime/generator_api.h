// Torch-free interface of text generation (decoder servers), so the gRPC
// layer can include it without LibTorch headers. The implementation is the
// continuous batcher in generator.h.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace metatt {

struct GenerateMessage {
  std::string role;  // system | user | assistant
  std::string content;
};

struct GenerateParams {
  std::string family;   // "" with task "" = the base model without adapter
  int64_t version = 0;  // 0 = latest published
  std::string task;     // task name in the family
  // Exactly one of: a raw prompt (tokenised as is), or chat messages
  // (rendered through the model's chat template with the generation prompt).
  std::string prompt;
  std::vector<GenerateMessage> messages;
  int64_t max_tokens = 0;     // 0 = the server default; clipped to the context
  double temperature = 0.0;   // 0 = greedy (argmax)
  double top_p = 1.0;         // nucleus mass in (0, 1]; 0 = 1
  int64_t top_k = 0;          // 0 = no top-k cut
  std::optional<uint64_t> seed;  // absent: a random seed
  std::vector<std::string> stop;  // stop sequences (not included in the text)
};

enum class FinishReason { kNone, kStop, kLength, kCancelled };
inline const char* FinishReasonName(FinishReason r) {
  switch (r) {
    case FinishReason::kStop: return "stop";
    case FinishReason::kLength: return "length";
    case FinishReason::kCancelled: return "cancelled";
    default: return "";
  }
}

struct GenerateUsage {
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
};

struct GenerateChunk {
  std::string text;                // new text since the previous chunk
  std::vector<int64_t> token_ids;  // the tokens this chunk adds
  // Set on the last chunk only.
  FinishReason finish = FinishReason::kNone;
  GenerateUsage usage;
  double time_to_first_token_s = 0;  // on the last chunk
  // The task that generated (first and last chunk).
  std::string family, task;
  int64_t version = 0, task_index = -1;
};

// What the metrics observe once per finished generation.
struct GenerationStats {
  int64_t prompt_tokens = 0, completion_tokens = 0;
  double time_to_first_token_s = -1;  // < 0: no token was generated
  double seconds = 0;                 // submit to finish
  FinishReason finish = FinishReason::kNone;
};

class Generator {
 public:
  virtual ~Generator() = default;
  // Blocking; called from many RPC threads. Tokenises on the caller's
  // thread, queues the request to the device thread's continuous batch and
  // streams chunks through `on_chunk` as tokens arrive (the last chunk
  // carries finish and usage). `cancelled` (may be empty) is polled: the
  // caller went away, the sequence leaves the batch at the next step; so
  // does one whose `on_chunk` returns false. Errors before the first chunk:
  // NOT_FOUND (family / task), INVALID_ARGUMENT naming the field (over-long
  // prompt: names the limit), RESOURCE_EXHAUSTED (queue full),
  // FAILED_PRECONDITION (an encoder server; a family of the other model kind).
  virtual absl::Status Generate(const GenerateParams& params, int64_t deadline_unix_ms,
                                const std::function<bool()>& cancelled,
                                const std::function<bool(const GenerateChunk&)>& on_chunk) = 0;
};

}  // namespace metatt
