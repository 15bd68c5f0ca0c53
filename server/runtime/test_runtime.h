// Test fixture of the scheduler and job executor tests: a tiny random BERT,
// an adapter registry on a scratch directory over an in-memory store, and
// (StartScheduler) the device scheduler with a predictor on them.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <memory>
#include <utility>

#include "server/registry/adapter_registry.h"
#include "server/registry/test_family.h"
#include "server/registry/test_fixture.h"
#include "server/registry/test_util.h"
#include "server/runtime/predictor.h"
#include "server/runtime/scheduler.h"
#include "server/training/test_util.h"

namespace metatt {
namespace testing_util {

class RuntimeTest : public ScratchStoreTest {
 protected:
  // The encoder (TinyEncoder(seed)) and the registry; call from SetUp and
  // return when a fatal failure was recorded.
  void MakeEncoderAndRegistry(uint64_t seed) {
    encoder_ = TinyEncoder(seed);
    ASSERT_NE(encoder_, nullptr);
    AdapterRegistry::Options ro;
    ro.data_dir = dir_.path();
    auto reg = AdapterRegistry::Create(ro, &store_);
    ASSERT_TRUE(reg.ok()) << reg.status();
    registry_ = std::move(*reg);
  }

  // A scheduler with `so` on the encoder, and a predictor over the registry.
  void StartScheduler(DeviceScheduler::Options so) {
    auto s = DeviceScheduler::Create(so, encoder_);
    ASSERT_TRUE(s.ok()) << s.status();
    scheduler_ = std::move(*s);
    predictor_ = std::make_unique<ScheduledPredictor>(
        ScheduledPredictor::Options(), registry_.get(), scheduler_.get(), TinyTokenizer());
  }

  std::shared_ptr<BertEncoder> encoder_;
  std::unique_ptr<AdapterRegistry> registry_;
  std::unique_ptr<DeviceScheduler> scheduler_;
  std::unique_ptr<ScheduledPredictor> predictor_;
};

}  // namespace testing_util
}  // namespace metatt
