// The adapter of a published family: a MetaTT tensor train (4d, 5d, 4+1d) or
// a LoRA (form "lora": a trained LoRA job, or a PEFT folder imported). The
// model only sees the seam (get(): EncoderAdapter*), so the scheduler batches
// rows of MetaTT and LoRA families alike; code that needs the tensor train
// (add-task, DeleteTask, compaction, export) asks metatt() / operator->,
// which holds only for MetaTT families (is_lora() says which).
#pragma once

#include <memory>
#include <utility>

#include "adapters/adapter.h"
#include "adapters/lora_adapter.h"
#include "adapters/metatt_adapter.h"

namespace metatt {

class FamilyAdapter {
 public:
  FamilyAdapter() = default;
  FamilyAdapter& operator=(std::unique_ptr<MetaTTAdapter> a) {
    metatt_ = std::move(a);
    lora_.reset();
    return *this;
  }
  FamilyAdapter& operator=(std::unique_ptr<LoraAdapter> a) {
    lora_ = std::move(a);
    metatt_.reset();
    return *this;
  }

  // The served adapter, whatever its form (null when none is set).
  EncoderAdapter* get() const {
    return metatt_ != nullptr ? static_cast<EncoderAdapter*>(metatt_.get()) : lora_.get();
  }
  bool is_lora() const { return lora_ != nullptr; }
  MetaTTAdapter* metatt() const { return metatt_.get(); }
  LoraAdapter* lora() const { return lora_.get(); }
  // The tensor train; only for a MetaTT family (callers check is_lora() first).
  MetaTTAdapter* operator->() const { return metatt_.get(); }
  MetaTTAdapter& operator*() const { return *metatt_; }
  explicit operator bool() const { return get() != nullptr; }

 private:
  std::unique_ptr<MetaTTAdapter> metatt_;
  std::unique_ptr<LoraAdapter> lora_;
};

}  // namespace metatt
