// ThreadSanitizer annotations for Debian's (uninstrumented) absl::Mutex.
//
// Our code synchronizes through absl::Mutex / absl::CondVar, whose lock and
// unlock live in libabsl_synchronization.so, built without -fsanitize=thread:
// TSan never sees them, so every access guarded by one looks like a race.
// This file, linked into every binary of the TSan build (scripts/tsan.sh
// passes its object in CMAKE_EXE_LINKER_FLAGS), defines the exported Mutex /
// CondVar entry points itself (symbols of the executable take precedence over
// the shared library's, also for gRPC's and absl's own calls through the PLT),
// tells TSan about each acquire / release (__tsan_acquire / __tsan_release on
// the mutex's address) and calls the library's function (dlsym RTLD_NEXT).
//
// Readers are treated like writers (a reader's unlock releases): this can only
// hide races between two readers, which are reads. Await / CondVar::Wait
// release before waiting and acquire after, as the library does inside.
//
// Each entry point is one METATT_SHIM line: its symbol is named once, so the
// function defined and the library function it calls cannot differ.
//
// The names are the Itanium-mangled members of absl::debian3 (Debian 12's
// libabsl 20220623); a library with another inline namespace fails the link
// loudly (undefined reference via dlsym -> abort below), never silently.
#include <dlfcn.h>
#include <sanitizer/tsan_interface.h>

#include <cstdio>
#include <cstdlib>
#include <type_traits>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"

namespace {

template <typename Fn>
Fn Real(const char* name) {
  void* p = dlsym(RTLD_NEXT, name);
  if (p == nullptr) {
    std::fprintf(stderr, "tsan absl shim: %s not found in libabsl_synchronization\n", name);
    std::abort();
  }
  return reinterpret_cast<Fn>(p);
}

inline void Acquired(const void* mu) { __tsan_acquire(const_cast<void*>(mu)); }
inline void Releasing(const void* mu) { __tsan_release(const_cast<void*>(mu)); }

// What an entry point tells TSan, on the mutex's (or notification's) address.
enum class Sync {
  kAcquire,         // acquires after the call (held on return)
  kAcquireIfTrue,   // acquires after the call when it returned true
  kRelease,         // releases before the call
  kReleaseAcquire,  // releases before the call, acquires after (waits)
};

// The library call `call` with `sync` told to TSan on `addr`; its result.
template <Sync sync, typename Call>
auto Around(const void* addr, Call call) {
  constexpr bool kReleases = sync == Sync::kRelease || sync == Sync::kReleaseAcquire;
  constexpr bool kAcquires = sync == Sync::kAcquire || sync == Sync::kReleaseAcquire;
  if constexpr (kReleases) Releasing(addr);
  if constexpr (std::is_void_v<decltype(call())>) {
    call();
    if constexpr (kAcquires) Acquired(addr);
  } else {
    const auto r = call();
    if (kAcquires || (sync == Sync::kAcquireIfTrue && r)) Acquired(addr);
    return r;
  }
}

using absl::Condition;
using absl::CondVar;
using absl::Duration;
using absl::Mutex;
using absl::Notification;
using absl::Time;

}  // namespace

// Defines the exported `ret sym params`: the library's `sym` called with
// `args`, `sync` told to TSan on `addr`.
#define METATT_SHIM(sync, ret, sym, params, args, addr)        \
  ret sym params {                                              \
    static const auto real = Real<ret(*) params>(#sym);         \
    return Around<Sync::sync>(addr, [&] { return real args; }); \
  }

// One entry point per line, a table (clang-format would wrap the long rows).
// clang-format off
extern "C" {

// ---- Mutex: lock / unlock --------------------------------------------------------
METATT_SHIM(kAcquire, void, _ZN4absl7debian35Mutex4LockEv, (Mutex* mu), (mu), mu)
METATT_SHIM(kAcquire, void, _ZN4absl7debian35Mutex10ReaderLockEv, (Mutex* mu), (mu), mu)
METATT_SHIM(kAcquireIfTrue, bool, _ZN4absl7debian35Mutex7TryLockEv, (Mutex* mu), (mu), mu)
METATT_SHIM(kAcquireIfTrue, bool, _ZN4absl7debian35Mutex13ReaderTryLockEv, (Mutex* mu), (mu), mu)
METATT_SHIM(kRelease, void, _ZN4absl7debian35Mutex6UnlockEv, (Mutex* mu), (mu), mu)
METATT_SHIM(kRelease, void, _ZN4absl7debian35Mutex12ReaderUnlockEv, (Mutex* mu), (mu), mu)

// ---- Mutex: lock when a condition holds (held on return either way) ----------------
METATT_SHIM(kAcquire, void, _ZN4absl7debian35Mutex8LockWhenERKNS0_9ConditionE, (Mutex* mu, const Condition& c), (mu, c), mu)
METATT_SHIM(kAcquire, void, _ZN4absl7debian35Mutex14ReaderLockWhenERKNS0_9ConditionE, (Mutex* mu, const Condition& c), (mu, c), mu)
METATT_SHIM(kAcquire, bool, _ZN4absl7debian35Mutex19LockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE, (Mutex* mu, const Condition& c, Duration d), (mu, c, d), mu)
METATT_SHIM(kAcquire, bool, _ZN4absl7debian35Mutex20LockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE, (Mutex* mu, const Condition& c, Time t), (mu, c, t), mu)
METATT_SHIM(kAcquire, bool, _ZN4absl7debian35Mutex25ReaderLockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE, (Mutex* mu, const Condition& c, Duration d), (mu, c, d), mu)
METATT_SHIM(kAcquire, bool, _ZN4absl7debian35Mutex26ReaderLockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE, (Mutex* mu, const Condition& c, Time t), (mu, c, t), mu)

// ---- Mutex: await (held on entry and on return; released while waiting) ------------
METATT_SHIM(kReleaseAcquire, void, _ZN4absl7debian35Mutex5AwaitERKNS0_9ConditionE, (Mutex* mu, const Condition& c), (mu, c), mu)
METATT_SHIM(kReleaseAcquire, bool, _ZN4absl7debian35Mutex16AwaitWithTimeoutERKNS0_9ConditionENS0_8DurationE, (Mutex* mu, const Condition& c, Duration d), (mu, c, d), mu)
METATT_SHIM(kReleaseAcquire, bool, _ZN4absl7debian35Mutex17AwaitWithDeadlineERKNS0_9ConditionENS0_4TimeE, (Mutex* mu, const Condition& c, Time t), (mu, c, t), mu)

// ---- CondVar: wait releases the mutex and takes it back -----------------------------
METATT_SHIM(kReleaseAcquire, void, _ZN4absl7debian37CondVar4WaitEPNS0_5MutexE, (CondVar* cv, Mutex* mu), (cv, mu), mu)
METATT_SHIM(kReleaseAcquire, bool, _ZN4absl7debian37CondVar15WaitWithTimeoutEPNS0_5MutexENS0_8DurationE, (CondVar* cv, Mutex* mu, Duration d), (cv, mu, d), mu)
METATT_SHIM(kReleaseAcquire, bool, _ZN4absl7debian37CondVar16WaitWithDeadlineEPNS0_5MutexENS0_4TimeE, (CondVar* cv, Mutex* mu, Time t), (cv, mu, t), mu)

// ---- Notification -----------------------------------------------------------
// Notify() sets its flag inside the library; a waiter that finds it set
// returns from WaitForNotification* without touching the mutex (the fast
// path), so the mutex annotations above never order it after the notifier.
// Notify releases on the notification's address, every wait that returns
// notified acquires on it.
METATT_SHIM(kRelease, void, _ZN4absl7debian312Notification6NotifyEv, (Notification* n), (n), n)
METATT_SHIM(kAcquire, void, _ZNK4absl7debian312Notification19WaitForNotificationEv, (const Notification* n), (n), n)
METATT_SHIM(kAcquireIfTrue, bool, _ZNK4absl7debian312Notification30WaitForNotificationWithTimeoutENS0_8DurationE, (const Notification* n, Duration timeout), (n, timeout), n)
METATT_SHIM(kAcquireIfTrue, bool, _ZNK4absl7debian312Notification31WaitForNotificationWithDeadlineENS0_4TimeE, (const Notification* n, Time deadline), (n, deadline), n)

}  // extern "C"
// clang-format on
