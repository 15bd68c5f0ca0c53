// PageTasks: page sizes, tokens, version pinning and the errors naming fields.
#include "server/jobs/task_pages.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"

namespace metatt {
namespace {

using ::testing::HasSubstr;

FamilyVersionRecord Version(int64_t version, int64_t tasks) {
  FamilyVersionRecord v;
  v.family = "fam";
  v.version = version;
  for (int64_t i = 0; i < tasks; ++i) {
    TaskRecord t;
    t.name = absl::StrCat("t", i);
    t.index = i;
    v.tasks.push_back(std::move(t));
  }
  return v;
}

std::vector<FamilyVersionRecord> Versions() { return {Version(1, 2500), Version(2, 7)}; }

TEST(TaskPagesTest, PagesThroughEveryTaskOnceInOrder) {
  std::vector<int64_t> seen;
  std::string token;
  int pages = 0;
  do {
    auto p = PageTasks(Versions(), 1, 1000, token);
    ASSERT_TRUE(p.ok()) << p.status();
    EXPECT_EQ(p->version.version, 1);
    for (int64_t i = p->begin; i < p->end; ++i) seen.push_back(p->version.tasks[i].index);
    token = p->next_page_token;
    ++pages;
  } while (!token.empty());
  EXPECT_EQ(pages, 3);
  ASSERT_EQ(seen.size(), 2500u);
  for (int64_t i = 0; i < 2500; ++i) ASSERT_EQ(seen[i], i);
}

TEST(TaskPagesTest, DefaultAndClampedPageSizes) {
  auto p = PageTasks(Versions(), 1, 0, "");
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->end - p->begin, kDefaultTaskPageSize);
  std::vector<FamilyVersionRecord> big = {Version(1, kMaxTaskPageSize + 5)};
  p = PageTasks(big, 0, kMaxTaskPageSize * 3, "");
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->end - p->begin, kMaxTaskPageSize);
  EXPECT_FALSE(p->next_page_token.empty());
}

TEST(TaskPagesTest, SmallVersionIsOnePageWithoutToken) {
  auto p = PageTasks(Versions(), 0, 0, "");
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->version.version, 2);
  EXPECT_EQ(p->begin, 0);
  EXPECT_EQ(p->end, 7);
  EXPECT_EQ(p->next_page_token, "");
}

TEST(TaskPagesTest, TokenPinsItsVersion) {
  auto first = PageTasks({Version(1, 30)}, 0, 10, "");
  ASSERT_TRUE(first.ok());
  // Version 2 is published before the next page: "latest" stays version 1.
  auto next = PageTasks({Version(1, 30), Version(2, 29)}, 0, 10, first->next_page_token);
  ASSERT_TRUE(next.ok()) << next.status();
  EXPECT_EQ(next->version.version, 1);
  EXPECT_EQ(next->begin, 10);
  auto other = PageTasks({Version(1, 30), Version(2, 29)}, 2, 10, first->next_page_token);
  EXPECT_EQ(other.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(other.status().message(), HasSubstr("page_token"));
}

TEST(TaskPagesTest, BadArgumentsNameTheirField) {
  for (const std::string token :
       {"x", "1", "1:", ":5", "1:0", "1:-3", "0:5", "1:2:3", "1:2500", "1:99999"}) {
    auto p = PageTasks(Versions(), 0, 10, token);
    EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument) << token;
    EXPECT_THAT(p.status().message(), HasSubstr("page_token")) << token;
  }
  auto p = PageTasks(Versions(), 0, -1, "");
  EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(p.status().message(), HasSubstr("page_size"));
  p = PageTasks(Versions(), -1, 0, "");
  EXPECT_THAT(p.status().message(), HasSubstr("version"));
  p = PageTasks(Versions(), 9, 0, "");
  EXPECT_EQ(p.status().code(), absl::StatusCode::kNotFound);
  p = PageTasks(Versions(), 0, 0, "9:1");
  EXPECT_EQ(p.status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace metatt
