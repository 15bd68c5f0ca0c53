// scripts/tsan.sh runs this first: the TSan set-up must report a real race and
// must not report data guarded by an absl::Mutex (the annotation shim,
// absl_mutex_annotations.cc), through a plain lock, a CondVar wait, a
// LockWhen condition and an absl::Notification (waited for after it was
// notified: the wait's lock-free fast path). Expected: at least one report, every one in
// RacyIncrement (TSan may report its read/write pair once or twice), with
// tests/tsan/tsan.supp (its Condition entries are needed here too: without
// them the LockWhen condition, evaluated inside absl, is reported).
#include <chrono>
#include <cstdio>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"

namespace {
absl::Mutex mu;
absl::CondVar cv;
long guarded = 0;
bool ready = false;
int stage = 0;
long unguarded = 0;
absl::Notification handed;
long handed_over = 0;  // written before Notify, read after the wait
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
  std::thread d([] {
    handed_over = 42;
    handed.Notify();
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));  // notified by now
  if (!handed.WaitForNotificationWithTimeout(absl::Seconds(10))) return 1;
  handed_over += 1;
  d.join();
  std::thread c([] { RacyIncrement(); });
  RacyIncrement();
  c.join();
  a.join();
  b.join();
  std::printf("guarded=%ld stage=%d handed_over=%ld\n", guarded, stage, handed_over);
  return 0;
}
