// Test helpers (torch-free) of the store, job and dataset tests: a fresh
// folder name per test, and the gtest fixture of tests that run on a SQLite
// store in such a folder.
#pragma once

#include <gtest/gtest.h>

#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <utility>

#include "server/store/sqlite_store.h"

namespace metatt {
namespace testing_util {

// <temp dir>/<prefix><random number>: a path no other test uses (not created).
inline std::filesystem::path NewTestDirPath(const std::string& prefix) {
  return std::filesystem::temp_directory_path() /
         (prefix + std::to_string(std::random_device{}()));
}

// A SQLite store in a fresh folder named after the test suite (dir_, store_
// on db_path()). A derived fixture calls SqliteStoreFixture::SetUp() before
// its own. The store is closed and the folder removed by the destructor,
// after every member of the derived fixture (the managers over the store) is
// gone: a derived fixture needs no TearDown to release them first.
class SqliteStoreFixture : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* test = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = NewTestDirPath(std::string(test->test_suite_name()) + "_");
    std::filesystem::create_directories(dir_);
    OpenStore();
  }
  ~SqliteStoreFixture() override {
    store_.reset();
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  // Opens the store on db_path(); again after the first time: a restart on
  // the same file.
  void OpenStore() {
    auto s = SqliteStore::Create(db_path());
    ASSERT_TRUE(s.ok()) << s.status();
    store_ = std::move(*s);
  }
  std::string db_path() const { return (dir_ / "metatt.db").string(); }

  std::filesystem::path dir_;
  std::unique_ptr<SqliteStore> store_;
};

}  // namespace testing_util
}  // namespace metatt
