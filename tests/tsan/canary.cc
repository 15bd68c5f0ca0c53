// scripts/tsan.sh runs this first: the TSan set-up must report a real race and
// must not report data guarded by an absl::Mutex (the annotation shim,
// absl_mutex_annotations.cc), through a plain lock, a CondVar wait and a
// LockWhen condition. Expected: exactly one report, on `unguarded`.
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
  std::thread c([] { ++unguarded; });  // the one real race
  ++unguarded;
  c.join();
  a.join();
  b.join();
  std::printf("guarded=%ld stage=%d\n", guarded, stage);
  return 0;
}
