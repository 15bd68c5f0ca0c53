#include "client/metattctl_format.h"

#include <gtest/gtest.h>

namespace metatt::ctl {
namespace {

TEST(FormatTest, BarDurationBytes) {
  EXPECT_EQ(Bar(5, 10, 10), "[#####.....]");
  EXPECT_EQ(Bar(20, 10, 4), "[####]");
  EXPECT_EQ(Bar(1, 0, 4), "[....]");
  EXPECT_EQ(Duration(12.4), "12s");
  EXPECT_EQ(Duration(185), "3m05s");
  EXPECT_EQ(Duration(3720), "1h02m");
  EXPECT_EQ(Duration(-1), "?");
  EXPECT_EQ(Bytes(512), "512 B");
  EXPECT_EQ(Bytes(1536), "1.5 KiB");
  EXPECT_EQ(Num(0.812345), "0.8123");
}

}  // namespace
}  // namespace metatt::ctl
