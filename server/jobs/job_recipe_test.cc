#include "server/jobs/job_recipe.h"

#include <gtest/gtest.h>

#include "server/jobs/job_validation.h"

namespace metatt {
namespace {

JobSpec Minimal() {
  JobSpec s;
  s.family = "f";
  s.tasks.push_back({"t", "ds1", "", 0.1, ""});
  return s;
}

TEST(JobRecipe, UnsetFieldsTakeTheFormDefaults) {
  JobSpec s = Minimal();
  ASSERT_TRUE(ValidateJobSpec(s).ok()) << ValidateJobSpec(s);  // unset passes
  auto r = ResolveJobRecipe(s);
  ASSERT_TRUE(r.ok()) << r.status();
  auto d = DefaultRecipe(DefaultForm());
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(r->form, DefaultForm());
  // Every field (DescribeRecipe lists them all) is the default's.
  EXPECT_EQ(DescribeRecipe(*r, {}), DescribeRecipe(*d, {}));

  s.adapter.form = "4d";
  r = ResolveJobRecipe(s);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->form, "4d");
  EXPECT_EQ(r->learning_rate, DefaultRecipe("4d")->learning_rate);
  // An add-task job takes its family's form.
  r = ResolveJobRecipe(s, "4+1d");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->form, "4+1d");
}

TEST(JobRecipe, SetFieldsAreKept) {
  JobSpec s = Minimal();
  s.adapter.form = "5d";
  s.adapter.ranks = {4};
  s.adapter.projections = {"q", "v"};
  s.adapter.alpha = 16.0;
  s.hparams.learning_rate = 5e-3;
  s.hparams.grad_clip = 0.0;  // set to zero, not auto
  s.hparams.seed = 0;
  s.hparams.max_steps = 30;
  s.hparams.pooling = "cls";
  s.hparams.head_lr_multiplier = 4.0;
  s.hparams.head_first_ratio = 0.1;
  s.hparams.rank_schedule = {{1, 2}};
  ASSERT_TRUE(ValidateJobSpec(s).ok()) << ValidateJobSpec(s);
  auto r = ResolveJobRecipe(s);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->form, "5d");
  EXPECT_EQ(r->ranks, (std::vector<int64_t>{4}));
  EXPECT_EQ(r->projections, (std::vector<std::string>{"q", "v"}));
  EXPECT_EQ(r->alpha, 16.0);
  EXPECT_EQ(r->learning_rate, 5e-3);
  EXPECT_EQ(r->grad_clip, 0.0);
  EXPECT_EQ(r->seed, 0u);
  EXPECT_EQ(r->max_steps, 30);
  EXPECT_EQ(r->pooling, "cls");
  EXPECT_EQ(r->head_lr_multiplier, 4.0);
  EXPECT_EQ(r->head_first_ratio, 0.1);
  ASSERT_EQ(r->rank_schedule.size(), 1u);
  EXPECT_EQ(r->rank_schedule[0].first, 1.0);
  EXPECT_EQ(r->rank_schedule[0].second, 2);
}

// The defaults themselves obey the rules a user's values must obey.
TEST(JobRecipe, EveryFormDefaultPassesTheValidator) {
  for (const char* form : {"4d", "5d", "4+1d"}) {
    auto d = DefaultRecipe(form);
    ASSERT_TRUE(d.ok());
    JobSpec s = Minimal();
    s.adapter.form = d->form;
    s.adapter.ranks = d->ranks;
    s.adapter.projections = d->projections;
    s.adapter.init = d->init;
    s.adapter.alpha = d->alpha;
    s.adapter.new_task_init = d->new_task_init;
    HyperParams& h = s.hparams;
    const Recipe& r = *d;
    for (const auto& f : kRealHyperParams) h.*f.spec = r.*f.recipe;
    for (const auto& f : kIntegerHyperParams) h.*f.spec = r.*f.recipe;
    h.*kSeedHyperParam.spec = r.*kSeedHyperParam.recipe;
    if (d->max_steps == 0) h.max_steps.reset();  // by epochs: a spec leaves max_steps unset
    h.pooling = d->pooling;
    EXPECT_TRUE(ValidateJobSpec(s).ok()) << form << ": " << ValidateJobSpec(s);
  }
}

TEST(JobValidation, SetValuesAreRangeChecked) {
  JobSpec s = Minimal();
  s.hparams.inner_lr_multiplier = 0.0;
  EXPECT_FALSE(ValidateJobSpec(s).ok());
  s.hparams.inner_lr_multiplier.reset();
  s.adapter.new_task_init = "random";
  EXPECT_FALSE(ValidateJobSpec(s).ok());
  s.adapter.new_task_init = "mean";
  s.hparams.grad_clip = -1.0;
  EXPECT_FALSE(ValidateJobSpec(s).ok());
  s.hparams.grad_clip = 0.0;
  EXPECT_TRUE(ValidateJobSpec(s).ok()) << ValidateJobSpec(s);
}

}  // namespace
}  // namespace metatt
