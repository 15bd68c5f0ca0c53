// scripts/tsan.sh runs this first: the TSan set-up must report a real race and
// must not report data guarded by an absl::Mutex (the annotation shim,
// absl_mutex_annotations.cc), through a plain lock, a CondVar wait and a
// LockWhen condition. Expected: at least one report, every one in
// RacyIncrement (TSan may report its read/write pair once or twice), with
// tests/tsan/tsan.supp (its Condition entries are needed here too: without
// them the LockWhen condition, evaluated inside absl, is reported).
#include <cstdio>
#include <thread>

#include "absl/synchronization/mutex.h"

namespace {
absl::Mutex mu;
absl::CondVar cv;
long guarded = 0;
bool ready = false;
int stage = 0;
long unguarded = 0;
// The one real race: called from two threads without a lock.
__attribute__((noinline)) void RacyIncrement() { ++unguarded; }
}  // namespace

int main() {
  std::thread a([] {
    for (int i = 0; i < 20000; ++i) {
      absl::MutexLock l(&mu);
      ++guarded;
    }
    absl::MutexLock l(&mu);
    ready = true;
    cv.Signal();
  });
  std::thread b([] {
    for (int i = 0; i < 20000; ++i) {
      absl::MutexLock l(&mu);
      ++guarded;
    }
    mu.LockWhen(absl::Condition(+[](int* s) { return *s == 1; }, &stage));
    guarded += 1;
    stage = 2;
    mu.Unlock();
  });
  {
    absl::MutexLock l(&mu);
    while (!ready) cv.Wait(&mu);
    stage = 1;
  }
  std::thread c([] { RacyIncrement(); });
  RacyIncrement();
  c.join();
  a.join();
  b.join();
  std::printf("guarded=%ld stage=%d\n", guarded, stage);
  return 0;
}
