// gtest fixture of the registry and runtime tests: a scratch folder and an
// in-memory store, on which a test builds its registries.
#pragma once

#include <gtest/gtest.h>

#include "server/registry/test_util.h"

namespace metatt {
namespace testing_util {

class ScratchStoreTest : public ::testing::Test {
 protected:
  ScratchDir dir_;
  InMemoryStore store_;
};

}  // namespace testing_util
}  // namespace metatt
