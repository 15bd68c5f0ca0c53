// Generation (decoder) datasets: prompt -> completion pairs read from JSONL
// (one object a line) or a JSON array of objects, in three record formats:
//
//   prompt_completion  {"prompt": "...", "completion": "..."}
//   instruction        {"instruction": "...", "input": "...", "output": "...",
//                       "answer": "..."}  (../shared/data/commonsense/; the
//                      prompt is the instruction, then "\n\n" + input when the
//                      input is not empty; the completion is `output`)
//   chat               {"messages": [{"role": "system"|"user"|"assistant",
//                       "content": "..."}, ...]}  (the last message must be
//                      the assistant's: it is the completion; the messages
//                      before it are the prompt)
//
// Any record may carry "answer" (a string, or a boolean written as
// true/false): the label answer accuracy compares with the answer extracted
// from generated text (eval_scores.h, ExtractAnswer). `auto` (the default)
// picks the format of each record from its keys.
//
// Prompts are kept as chat messages; the model's chat template renders them
// (lm_objective.h), so the same file trains any chat model.
//
// Parsing is all-or-nothing as for classification datasets (dataset.h): every
// bad record is collected with its 1-based line (for a JSON array, the line
// where the element starts) and a reason naming the field, and a file with
// any bad record is refused as a whole (INVALID_ARGUMENT listing the first
// ones and the total count). Torch-free.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/model/bpe_tokenizer.h"  // ChatMessage (torch-free)
#include "server/training/dataset.h"     // BadLine, kMaxReportedBadLines

namespace metatt {

enum class GenerationFormat { kAuto, kPromptCompletion, kInstruction, kChat };
// auto | prompt_completion | instruction | chat
absl::StatusOr<GenerationFormat> ParseGenerationFormat(const std::string& name);
std::string GenerationFormatName(GenerationFormat format);

struct GenerationSpec {
  GenerationFormat format = GenerationFormat::kAuto;
  std::string origin = "dataset";  // name used in error messages
};

struct GenerationExample {
  std::vector<ChatMessage> prompt;  // the conversation before the completion
  std::string completion;           // the assistant's reply to learn
  std::string answer;               // optional label for answer accuracy ("" = none)
  int line = 0;                     // 1-based line where the record starts
};

struct GenerationDataset {
  std::vector<GenerationExample> examples;
  size_t size() const { return examples.size(); }
  // True when every example carries an answer (answer accuracy applies).
  bool all_answered() const;
};

absl::StatusOr<GenerationDataset> ParseGenerationDataset(const std::string& bytes,
                                                         const GenerationSpec& spec,
                                                         std::vector<BadLine>* bad_lines = nullptr);
absl::StatusOr<GenerationDataset> ReadGenerationDataset(const std::string& path,
                                                        GenerationSpec spec);

// The three commonsense sets of ../shared/data/commonsense/ ("ARC-Easy",
// "BoolQ", "OpenBookQA"; case-insensitive, "arc_easy"/"obqa" accepted): the
// canonical name, which is also the set's folder (<name>/train.json,
// <name>/test.json, instruction format).
absl::StatusOr<std::string> CanonicalCommonsenseName(const std::string& name);

}  // namespace metatt
