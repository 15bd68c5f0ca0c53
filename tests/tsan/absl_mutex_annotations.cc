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
// The names are the Itanium-mangled members of absl::debian3 (Debian 12's
// libabsl 20220623); a library with another inline namespace fails the link
// loudly (undefined reference via dlsym -> abort below), never silently.
#include <dlfcn.h>
#include <sanitizer/tsan_interface.h>

#include <cstdio>
#include <cstdlib>

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

using absl::Condition;
using absl::CondVar;
using absl::Duration;
using absl::Mutex;
using absl::Notification;
using absl::Time;

}  // namespace

#define METATT_REAL(type, sym) static const auto real = Real<type>(#sym)

extern "C" {

// ---- Mutex: lock / unlock --------------------------------------------------------
void _ZN4absl7debian35Mutex4LockEv(Mutex* mu) {
  METATT_REAL(void (*)(Mutex*), _ZN4absl7debian35Mutex4LockEv);
  real(mu);
  Acquired(mu);
}
void _ZN4absl7debian35Mutex10ReaderLockEv(Mutex* mu) {
  METATT_REAL(void (*)(Mutex*), _ZN4absl7debian35Mutex10ReaderLockEv);
  real(mu);
  Acquired(mu);
}
bool _ZN4absl7debian35Mutex7TryLockEv(Mutex* mu) {
  METATT_REAL(bool (*)(Mutex*), _ZN4absl7debian35Mutex7TryLockEv);
  bool ok = real(mu);
  if (ok) Acquired(mu);
  return ok;
}
bool _ZN4absl7debian35Mutex13ReaderTryLockEv(Mutex* mu) {
  METATT_REAL(bool (*)(Mutex*), _ZN4absl7debian35Mutex13ReaderTryLockEv);
  bool ok = real(mu);
  if (ok) Acquired(mu);
  return ok;
}
void _ZN4absl7debian35Mutex6UnlockEv(Mutex* mu) {
  METATT_REAL(void (*)(Mutex*), _ZN4absl7debian35Mutex6UnlockEv);
  Releasing(mu);
  real(mu);
}
void _ZN4absl7debian35Mutex12ReaderUnlockEv(Mutex* mu) {
  METATT_REAL(void (*)(Mutex*), _ZN4absl7debian35Mutex12ReaderUnlockEv);
  Releasing(mu);
  real(mu);
}

// ---- Mutex: lock when a condition holds (acquire after) ----------------------------
void _ZN4absl7debian35Mutex8LockWhenERKNS0_9ConditionE(Mutex* mu, const Condition& c) {
  METATT_REAL(void (*)(Mutex*, const Condition&), _ZN4absl7debian35Mutex8LockWhenERKNS0_9ConditionE);
  real(mu, c);
  Acquired(mu);
}
void _ZN4absl7debian35Mutex14ReaderLockWhenERKNS0_9ConditionE(Mutex* mu, const Condition& c) {
  METATT_REAL(void (*)(Mutex*, const Condition&),
              _ZN4absl7debian35Mutex14ReaderLockWhenERKNS0_9ConditionE);
  real(mu, c);
  Acquired(mu);
}
bool _ZN4absl7debian35Mutex19LockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE(
    Mutex* mu, const Condition& c, Duration d) {
  METATT_REAL(bool (*)(Mutex*, const Condition&, Duration),
              _ZN4absl7debian35Mutex19LockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE);
  bool r = real(mu, c, d);
  Acquired(mu);  // held on return either way
  return r;
}
bool _ZN4absl7debian35Mutex20LockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE(
    Mutex* mu, const Condition& c, Time t) {
  METATT_REAL(bool (*)(Mutex*, const Condition&, Time),
              _ZN4absl7debian35Mutex20LockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE);
  bool r = real(mu, c, t);
  Acquired(mu);
  return r;
}
bool _ZN4absl7debian35Mutex25ReaderLockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE(
    Mutex* mu, const Condition& c, Duration d) {
  METATT_REAL(bool (*)(Mutex*, const Condition&, Duration),
              _ZN4absl7debian35Mutex25ReaderLockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE);
  bool r = real(mu, c, d);
  Acquired(mu);
  return r;
}
bool _ZN4absl7debian35Mutex26ReaderLockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE(
    Mutex* mu, const Condition& c, Time t) {
  METATT_REAL(bool (*)(Mutex*, const Condition&, Time),
              _ZN4absl7debian35Mutex26ReaderLockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE);
  bool r = real(mu, c, t);
  Acquired(mu);
  return r;
}

// ---- Mutex: await (held on entry and on return; released while waiting) ------------
void _ZN4absl7debian35Mutex5AwaitERKNS0_9ConditionE(Mutex* mu, const Condition& c) {
  METATT_REAL(void (*)(Mutex*, const Condition&), _ZN4absl7debian35Mutex5AwaitERKNS0_9ConditionE);
  Releasing(mu);
  real(mu, c);
  Acquired(mu);
}
bool _ZN4absl7debian35Mutex16AwaitWithTimeoutERKNS0_9ConditionENS0_8DurationE(
    Mutex* mu, const Condition& c, Duration d) {
  METATT_REAL(bool (*)(Mutex*, const Condition&, Duration),
              _ZN4absl7debian35Mutex16AwaitWithTimeoutERKNS0_9ConditionENS0_8DurationE);
  Releasing(mu);
  bool r = real(mu, c, d);
  Acquired(mu);
  return r;
}
bool _ZN4absl7debian35Mutex17AwaitWithDeadlineERKNS0_9ConditionENS0_4TimeE(
    Mutex* mu, const Condition& c, Time t) {
  METATT_REAL(bool (*)(Mutex*, const Condition&, Time),
              _ZN4absl7debian35Mutex17AwaitWithDeadlineERKNS0_9ConditionENS0_4TimeE);
  Releasing(mu);
  bool r = real(mu, c, t);
  Acquired(mu);
  return r;
}

// ---- CondVar: wait releases the mutex and takes it back -----------------------------
void _ZN4absl7debian37CondVar4WaitEPNS0_5MutexE(CondVar* cv, Mutex* mu) {
  METATT_REAL(void (*)(CondVar*, Mutex*), _ZN4absl7debian37CondVar4WaitEPNS0_5MutexE);
  Releasing(mu);
  real(cv, mu);
  Acquired(mu);
}
bool _ZN4absl7debian37CondVar15WaitWithTimeoutEPNS0_5MutexENS0_8DurationE(CondVar* cv, Mutex* mu,
                                                                         Duration d) {
  METATT_REAL(bool (*)(CondVar*, Mutex*, Duration),
              _ZN4absl7debian37CondVar15WaitWithTimeoutEPNS0_5MutexENS0_8DurationE);
  Releasing(mu);
  bool r = real(cv, mu, d);
  Acquired(mu);
  return r;
}
bool _ZN4absl7debian37CondVar16WaitWithDeadlineEPNS0_5MutexENS0_4TimeE(CondVar* cv, Mutex* mu,
                                                                      Time t) {
  METATT_REAL(bool (*)(CondVar*, Mutex*, Time),
              _ZN4absl7debian37CondVar16WaitWithDeadlineEPNS0_5MutexENS0_4TimeE);
  Releasing(mu);
  bool r = real(cv, mu, t);
  Acquired(mu);
  return r;
}

// ---- Notification -----------------------------------------------------------
// Notify() sets its flag inside the library; a waiter that finds it set
// returns from WaitForNotification* without touching the mutex (the fast
// path), so the mutex annotations above never order it after the notifier.
// Notify releases on the notification's address, every wait that returns
// notified acquires on it.
void _ZN4absl7debian312Notification6NotifyEv(Notification* n) {
  METATT_REAL(void (*)(Notification*), _ZN4absl7debian312Notification6NotifyEv);
  Releasing(n);
  real(n);
}
void _ZNK4absl7debian312Notification19WaitForNotificationEv(const Notification* n) {
  METATT_REAL(void (*)(const Notification*), _ZNK4absl7debian312Notification19WaitForNotificationEv);
  real(n);
  Acquired(n);
}
bool _ZNK4absl7debian312Notification30WaitForNotificationWithTimeoutENS0_8DurationE(
    const Notification* n, Duration timeout) {
  METATT_REAL(bool (*)(const Notification*, Duration),
              _ZNK4absl7debian312Notification30WaitForNotificationWithTimeoutENS0_8DurationE);
  const bool notified = real(n, timeout);
  if (notified) Acquired(n);
  return notified;
}
bool _ZNK4absl7debian312Notification31WaitForNotificationWithDeadlineENS0_4TimeE(
    const Notification* n, Time deadline) {
  METATT_REAL(bool (*)(const Notification*, Time),
              _ZNK4absl7debian312Notification31WaitForNotificationWithDeadlineENS0_4TimeE);
  const bool notified = real(n, deadline);
  if (notified) Acquired(n);
  return notified;
}

}  // extern "C"
