// AdapterBindings for the concrete adapters: MetaTT (trainable leaves,
// snapshot/restore, DMRG truncation sweeps) and LoRA.
#pragma once

#include "adapters/lora_adapter.h"
#include "adapters/metatt_adapter.h"
#include "server/training/trainer.h"

namespace metatt {

// The adapter must outlive the binding. trainable_parameters() follows the
// adapter's requires_grad flags, so FreezeShared(true) before training gives
// the cheap add-task mode (only new task slices + heads train).
AdapterBinding BindMetaTT(MetaTTAdapter* adapter);
AdapterBinding BindLora(LoraAdapter* adapter);

}  // namespace metatt
