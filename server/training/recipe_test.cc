#include "server/training/recipe.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace metatt {
namespace {

using ::testing::HasSubstr;

TEST(Recipe, EveryFormHasDefaults) {
  for (const char* form : {"4d", "5d", "4+1d"}) {
    auto r = DefaultRecipe(form);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->form, form);
    EXPECT_FALSE(r->ranks.empty());
    EXPECT_FALSE(r->projections.empty());
    EXPECT_FALSE(r->init.empty());
    EXPECT_FALSE(r->new_task_init.empty());
    EXPECT_GT(r->learning_rate, 0);
    EXPECT_GT(r->inner_lr_multiplier, 0);
    EXPECT_GT(r->head_lr_multiplier, 0);
    EXPECT_TRUE(r->max_steps > 0 || r->epochs > 0);
    EXPECT_GT(r->batch_size, 0);
    EXPECT_GE(r->max_length, 8);
    EXPECT_TRUE(r->pooling == "mean" || r->pooling == "cls");
  }
  EXPECT_FALSE(DefaultRecipe("3d").ok());
  EXPECT_TRUE(DefaultRecipe(DefaultForm()).ok());
}

TEST(Recipe, LoraFormHasItsOwnDefaults) {
  auto r = DefaultRecipe("lora");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->ranks, (std::vector<int64_t>{8}));  // r
  EXPECT_EQ(r->projections, (std::vector<std::string>{"q", "v"}));
  EXPECT_EQ(r->alpha, 16);
  EXPECT_EQ(r->init, "peft");
  EXPECT_GT(r->learning_rate, 0);
  RecipeOverrides o;
  o.form = "lora";
  o.ranks = std::vector<int64_t>{4};
  auto resolved = ResolveRecipe(o);
  ASSERT_TRUE(resolved.ok()) << resolved.status();
  EXPECT_EQ(resolved->ranks, (std::vector<int64_t>{4}));
  EXPECT_EQ(resolved->alpha, 16);
}

TEST(Recipe, UnsetAlphaIsTheAdaptersDefault) {
  // MetaTT forms: alpha unset stays 0 (the adapter's own default, alpha = r)
  // whatever the rank; a set alpha, 0 included, is kept.
  for (const char* form : {"4d", "5d", "4+1d"}) {
    RecipeOverrides o;
    o.form = form;
    o.ranks = std::vector<int64_t>{4, 6};
    auto r = ResolveRecipe(o);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->alpha, 0.0) << form;
    EXPECT_THAT(DescribeRecipe(*r, o), HasSubstr("alpha=r (auto)"));
    o.alpha = 0.0;
    r = ResolveRecipe(o);
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(r->alpha, 0.0) << form;
    o.alpha = 5.0;
    r = ResolveRecipe(o);
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(r->alpha, 5.0) << form;
  }
  // LoRA keeps alpha 16 whatever the rank (PEFT's convention).
  RecipeOverrides o;
  o.form = "lora";
  o.ranks = std::vector<int64_t>{4};
  EXPECT_EQ(ResolveRecipe(o)->alpha, 16);
}

TEST(Recipe, UnsetTakesTheFormDefault) {
  auto r = ResolveRecipe({});
  ASSERT_TRUE(r.ok()) << r.status();
  auto d = DefaultRecipe(DefaultForm());
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(r->form, DefaultForm());
  // Every field (DescribeRecipe lists them all) is the default's.
  EXPECT_EQ(DescribeRecipe(*r, {}), DescribeRecipe(*d, {}));

  RecipeOverrides o;
  o.form = "5d";
  o.ranks = std::vector<int64_t>{};  // empty = auto
  o.pooling = "";                    // empty = auto
  r = ResolveRecipe(o);
  ASSERT_TRUE(r.ok());
  auto d5 = DefaultRecipe("5d");
  EXPECT_EQ(r->form, "5d");
  EXPECT_EQ(r->ranks, d5->ranks);
  EXPECT_EQ(r->pooling, d5->pooling);
  EXPECT_EQ(r->learning_rate, d5->learning_rate);
}

TEST(Recipe, SetFieldsAreKeptIncludingZero) {
  RecipeOverrides o;
  o.form = "4d";
  o.ranks = std::vector<int64_t>{4, 6};
  o.projections = std::vector<std::string>{"q", "v"};
  o.learning_rate = 5e-3;
  o.weight_decay = 0.0;
  o.grad_clip = 0.0;  // explicitly off
  o.seed = 0;
  o.pooling = "cls";
  o.head_lr_multiplier = 10;
  o.rank_schedule = std::vector<std::pair<double, int64_t>>{{1, 6}};
  auto r = ResolveRecipe(o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->form, "4d");
  EXPECT_EQ(r->ranks, (std::vector<int64_t>{4, 6}));
  EXPECT_EQ(r->projections, (std::vector<std::string>{"q", "v"}));
  EXPECT_EQ(r->learning_rate, 5e-3);
  EXPECT_EQ(r->grad_clip, 0.0);
  EXPECT_EQ(r->seed, 0u);
  EXPECT_EQ(r->pooling, "cls");
  EXPECT_EQ(r->head_lr_multiplier, 10);
  ASSERT_EQ(r->rank_schedule.size(), 1u);
  RecipeOverrides bad;
  bad.form = "7d";
  EXPECT_FALSE(ResolveRecipe(bad).ok());
}

TEST(Recipe, StepsAndEpochs) {
  RecipeOverrides o;
  o.epochs = 3;
  auto r = ResolveRecipe(o);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->max_steps, 0);  // by epochs
  EXPECT_EQ(r->epochs, 3);
  o.max_steps = 300;  // steps win
  r = ResolveRecipe(o);
  EXPECT_EQ(r->max_steps, 300);
  o.max_steps = 0;  // explicit 0: by epochs
  r = ResolveRecipe(o);
  EXPECT_EQ(r->max_steps, 0);
  EXPECT_EQ(r->epochs, 3);
}

TEST(Recipe, DescribeMarksAutoFields) {
  RecipeOverrides o;
  o.learning_rate = 0.01;
  auto r = ResolveRecipe(o);
  ASSERT_TRUE(r.ok());
  const std::string line = DescribeRecipe(*r, o);
  EXPECT_THAT(line, HasSubstr("learning_rate=0.01 "));
  EXPECT_THAT(line, HasSubstr("form=" + DefaultForm() + " (auto)"));
  EXPECT_THAT(line, HasSubstr("batch_size=" + std::to_string(r->batch_size) + " (auto)"));
}

TEST(Recipe, DescribeMarksAnAddedTasksStructureAsTheFamilys) {
  RecipeOverrides o;
  o.ranks = std::vector<int64_t>{32};
  o.learning_rate = 0.01;
  auto r = ResolveRecipe(o, /*adds_task=*/true);
  ASSERT_TRUE(r.ok());
  const std::string line = DescribeRecipe(*r, o, /*structure_from_family=*/true);
  EXPECT_THAT(line, HasSubstr("ranks=32 (family)"));
  EXPECT_THAT(line, HasSubstr("init=" + r->init + " (family)"));
  EXPECT_THAT(line, HasSubstr("learning_rate=0.01 "));
  EXPECT_THAT(line, HasSubstr("weight_decay=0 (auto)"));
  EXPECT_THAT(DescribeRecipe(*r, o), HasSubstr("ranks=32 projections"));  // set by the user
}

}  // namespace
}  // namespace metatt

namespace metatt {
namespace {

TEST(RecipeTest, AddTaskDefaultsToAHigherLearningRateUnlessSet) {
  auto base = ResolveRecipe(RecipeOverrides{});
  auto add = ResolveRecipe(RecipeOverrides{}, /*adds_task=*/true);
  ASSERT_TRUE(base.ok() && add.ok());
  EXPECT_DOUBLE_EQ(add->learning_rate, base->learning_rate * kAddTaskLearningRateMultiplier);
  EXPECT_EQ(add->ranks, base->ranks);  // nothing else moves
  RecipeOverrides set;
  set.learning_rate = 1e-3;
  auto add_set = ResolveRecipe(set, /*adds_task=*/true);
  ASSERT_TRUE(add_set.ok());
  EXPECT_DOUBLE_EQ(add_set->learning_rate, 1e-3);  // a rate the user set is kept
}

}  // namespace
}  // namespace metatt
