#include "server/store/json_slice.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <random>

#include "server/store/job_json.h"

namespace metatt {
namespace {

// The slice must equal what a full parse gives for the same range.
void ExpectSliceMatchesParse(const std::string& text, int64_t first, int64_t count) {
  auto slice = JsonArraySlice(text, first, count);
  ASSERT_TRUE(slice.ok()) << slice.status();
  nlohmann::json all = nlohmann::json::parse(text);
  nlohmann::json want = nlohmann::json::array();
  for (int64_t i = first; i < static_cast<int64_t>(all.size()) && (count < 0 || i < first + count);
       ++i) {
    want.push_back(all[i]);
  }
  EXPECT_EQ(nlohmann::json::parse(*slice), want) << text << " [" << first << ", +" << count << ")";
}

TEST(JsonArraySlice, TakesTheRangeOfTaskRecords) {
  std::vector<TaskRecord> tasks;
  for (int i = 0; i < 7; ++i) {
    TaskRecord t;
    t.name = i == 3 ? "we\"ird, [name]\\" : "t" + std::to_string(i);
    t.index = i;
    t.label_names = {"a,b", "]"};
    t.eval_metrics["acc"] = 0.5;
    tasks.push_back(t);
  }
  const std::string text = TasksToJson(tasks);
  for (int64_t first : {0, 1, 3, 6, 7, 9}) {
    for (int64_t count : {-1, 0, 1, 2, 100}) ExpectSliceMatchesParse(text, first, count);
  }
  auto mid = TasksFromJson(*JsonArraySlice(text, 2, 3));
  ASSERT_TRUE(mid.ok()) << mid.status();
  ASSERT_EQ(mid->size(), 3u);
  EXPECT_EQ((*mid)[1].name, "we\"ird, [name]\\");
  EXPECT_EQ((*mid)[2].index, 4);
}

TEST(JsonArraySlice, EmptyNestedAndRandomArrays) {
  ExpectSliceMatchesParse("[]", 0, -1);
  ExpectSliceMatchesParse(" [ ] ", 0, 5);
  ExpectSliceMatchesParse("[1, [2, 3], {\"a\": [4]}, \"x,y\", null]", 1, 3);
  std::mt19937 rng(7);
  for (int round = 0; round < 50; ++round) {
    nlohmann::json a = nlohmann::json::array();
    const int n = static_cast<int>(rng() % 12);
    for (int i = 0; i < n; ++i) {
      switch (rng() % 4) {
        case 0: a.push_back(static_cast<int>(rng() % 1000)); break;
        case 1: a.push_back(std::string("s\\\"],{") + std::to_string(i)); break;
        case 2: a.push_back({{"k", {1, 2, "]"}}}); break;
        default: a.push_back(nlohmann::json::array({i, nlohmann::json::object()})); break;
      }
    }
    ExpectSliceMatchesParse(a.dump(), rng() % 14, static_cast<int64_t>(rng() % 6) - 1);
  }
}

TEST(JsonArraySlice, MalformedInputIsDataLoss) {
  EXPECT_TRUE(absl::IsDataLoss(JsonArraySlice("{}", 0, 1).status()));
  EXPECT_TRUE(absl::IsDataLoss(JsonArraySlice("[1, 2", 0, -1).status()));
  EXPECT_TRUE(absl::IsDataLoss(JsonArraySlice("[\"abc", 0, 1).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(JsonArraySlice("[]", -1, 1).status()));
}

}  // namespace
}  // namespace metatt
