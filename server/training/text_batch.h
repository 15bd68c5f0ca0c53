// BatchTokenizer backed by the WordPiece tokenizer (HF-parity encodings,
// padded to the longest row).
#pragma once

#include <memory>

#include "server/model/tokenizer.h"
#include "server/training/trainer.h"

namespace metatt {

BatchTokenizer MakeBatchTokenizer(std::shared_ptr<const WordPieceTokenizer> tokenizer);

}  // namespace metatt
