// The encoder objective: a BERT-family encoder, the pooled hidden state and
// a task head per task (classification or regression). Each row's loss comes
// from its own task's head; the batch loss is their mean over rows.
#pragma once

#include <memory>

#include "server/model/bert_encoder.h"
#include "server/training/trainer.h"

namespace metatt {

std::shared_ptr<TrainObjective> MakeEncoderObjective(std::shared_ptr<const BertEncoder> encoder,
                                                     BatchTokenizer tokenizer);

}  // namespace metatt
