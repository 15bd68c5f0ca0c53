// Gives every thread created with an explicit stack size at least 1 MiB.
//
// Why: Debian's civetweb (the HTTP server inside prometheus-cpp's Exposer)
// creates its worker threads with a fixed ~100 KiB stack. glibc carves each
// thread's static TLS out of its stack, and the LibTorch wheel's libraries
// (libtorch_cpu, libcublasLt, libc10_cuda, ...) need ~220 KiB of static TLS,
// so pthread_create fails and the Exposer throws "null context when
// constructing CivetServer" ("Cannot create first worker thread"). Symbols of
// the executable come first in ELF lookup, so this definition wraps glibc's for
// civetweb too. It only ever raises a requested size; it must be compiled into
// the executable itself (not a static library, whose unreferenced objects the
// linker drops).
#include <dlfcn.h>
#include <pthread.h>

#include <cstddef>

extern "C" int pthread_attr_setstacksize(pthread_attr_t* attr, size_t size) {
  using Fn = int (*)(pthread_attr_t*, size_t);
  static Fn real = reinterpret_cast<Fn>(dlsym(RTLD_NEXT, "pthread_attr_setstacksize"));
  constexpr size_t kFloor = size_t{1} << 20;
  return real(attr, size < kFloor ? kFloor : size);
}
