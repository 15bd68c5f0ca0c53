// Power-loss journal: an LD_PRELOAD shim for tests/chaos/powerloss.py
// (issue 17, hole 5). It records, under $METATT_POWERLOSS_JOURNAL, what a
// power cut would take back from files under $METATT_POWERLOSS_ROOT:
//
//   D seq ino path pre      the file's content before its first change since
//                           its last fsync (pre: a copy in the journal, "-" =
//                           it was empty); written before the change happens
//   S seq ino               fsync/fdatasync of a file: its changes are durable
//   C seq dirino name ino   a file created in a directory
//   M seq dirino name ino   a directory created
//   R seq fdir fname tdir tname saved   a rename (saved: a copy of the file it
//                           replaced, "-" when none)
//   U seq dirino name saved a file unlinked (saved: a copy of it)
//   X seq dirino name ino   a directory removed (ino: its own inode)
//   Y seq dirino            fsync of a directory: its entries are durable
//
// powerloss.py kills the process (SIGKILL) and then undoes, from the
// journal, every change no fsync made durable: file data back to its last
// fsynced content, directory entries back to their last fsynced state (the
// ext4 / POSIX model without data=journal: neither a file's data nor a
// directory entry survives a power cut unless fsynced). The journal itself
// is written with plain write(2) before each change: a SIGKILL loses none of
// it. Only direct calls to the wrapped functions are seen (glibc's internal
// calls, e.g. from stdio, are not): the server writes through open/write/
// fsync/rename (base/file_io.cc, dataset_manager.cc, SQLite's VFS).
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#define REAL(name, ret, ...)                                  \
  static ret (*real_##name)(__VA_ARGS__);                     \
  static void load_##name(void) {                             \
    if (!real_##name) real_##name = dlsym(RTLD_NEXT, #name);  \
  }

REAL(open, int, const char*, int, ...)
REAL(open64, int, const char*, int, ...)
REAL(openat, int, int, const char*, int, ...)
REAL(openat64, int, int, const char*, int, ...)
REAL(creat, int, const char*, mode_t)
REAL(write, ssize_t, int, const void*, size_t)
REAL(pwrite, ssize_t, int, const void*, size_t, off_t)
REAL(pwrite64, ssize_t, int, const void*, size_t, off_t)
REAL(writev, ssize_t, int, const struct iovec*, int)
REAL(ftruncate, int, int, off_t)
REAL(ftruncate64, int, int, off_t)
REAL(fallocate, int, int, int, off_t, off_t)
REAL(rename, int, const char*, const char*)
REAL(renameat, int, int, const char*, int, const char*)
REAL(renameat2, int, int, const char*, int, const char*, unsigned)
REAL(unlink, int, const char*)
REAL(unlinkat, int, int, const char*, int)
REAL(remove, int, const char*)
REAL(mkdir, int, const char*, mode_t)
REAL(mkdirat, int, int, const char*, mode_t)
REAL(rmdir, int, const char*)
REAL(fsync, int, int)
REAL(fdatasync, int, int)

static pthread_mutex_t mu = PTHREAD_RECURSIVE_MUTEX_INITIALIZER_NP;
static int log_fd = -2;  // -2: not opened yet; -1: off
static char root[PATH_MAX];
static size_t root_len;
static char journal[PATH_MAX];
static unsigned long long seq;
#define MAX_DIRTY 65536
static ino_t dirty[MAX_DIRTY];  // inodes changed since their last fsync (pre-image taken)
static int n_dirty;

static void load_all(void) {
  load_open(); load_open64(); load_openat(); load_openat64(); load_creat(); load_write();
  load_pwrite(); load_pwrite64(); load_writev(); load_ftruncate(); load_ftruncate64();
  load_fallocate(); load_rename(); load_renameat(); load_renameat2(); load_unlink();
  load_unlinkat(); load_remove(); load_mkdir(); load_mkdirat(); load_rmdir(); load_fsync();
  load_fdatasync();
}

// Caller holds mu. 1 when the journal is on.
static int on(void) {
  if (log_fd != -2) return log_fd >= 0;
  load_all();
  const char* r = getenv("METATT_POWERLOSS_ROOT");
  const char* j = getenv("METATT_POWERLOSS_JOURNAL");
  log_fd = -1;
  if (!r || !j || !realpath(r, root)) return 0;
  root_len = strlen(root);
  snprintf(journal, sizeof journal, "%s", j);
  char p[PATH_MAX];
  snprintf(p, sizeof p, "%s/pre", journal);
  real_mkdir(p, 0755);
  snprintf(p, sizeof p, "%s/log", journal);
  log_fd = real_open(p, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  return log_fd >= 0;
}

static void logf_(const char* fmt, ...) {
  char line[3 * PATH_MAX];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(line, sizeof line, fmt, ap);
  va_end(ap);
  if (n > 0) real_write(log_fd, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
}

static int under_root(const char* abs) {
  return strncmp(abs, root, root_len) == 0 && (abs[root_len] == '/' || abs[root_len] == 0);
}

// Absolute path of `path` relative to dirfd (the last component need not exist).
static int absolute(int dirfd, const char* path, char* out) {
  char base[PATH_MAX];
  if (path[0] == '/') {
    snprintf(base, sizeof base, "%s", path);
  } else {
    char dir[PATH_MAX];
    if (dirfd == AT_FDCWD) {
      if (!getcwd(dir, sizeof dir)) return -1;
    } else {
      char link[64];
      snprintf(link, sizeof link, "/proc/self/fd/%d", dirfd);
      ssize_t n = readlink(link, dir, sizeof dir - 1);
      if (n < 0) return -1;
      dir[n] = 0;
    }
    snprintf(base, sizeof base, "%s/%s", dir, path);
  }
  // Resolve the parent (it exists); keep the last component.
  char parent[PATH_MAX];
  snprintf(parent, sizeof parent, "%s", base);
  char* slash = strrchr(parent, '/');
  if (!slash) return -1;
  const char* name = slash + 1;
  char name_copy[PATH_MAX];
  snprintf(name_copy, sizeof name_copy, "%s", base + (name - parent));
  if (slash == parent) slash[1] = 0; else *slash = 0;
  char rp[PATH_MAX];
  if (!realpath(parent, rp)) return -1;
  snprintf(out, PATH_MAX, "%s/%s", strcmp(rp, "/") == 0 ? "" : rp, name_copy);
  return 0;
}

static int fd_path(int fd, char* out) {
  char link[64];
  snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  ssize_t n = readlink(link, out, PATH_MAX - 1);
  if (n < 0) return -1;
  out[n] = 0;
  return 0;
}

static ino_t parent_ino(const char* abs, const char** name) {
  char parent[PATH_MAX];
  snprintf(parent, sizeof parent, "%s", abs);
  char* slash = strrchr(parent, '/');
  *name = abs + (slash - parent) + 1;
  *slash = 0;
  struct stat st;
  if (stat(parent[0] ? parent : "/", &st) != 0) return 0;
  return st.st_ino;
}

static int is_dirty(ino_t ino) {
  for (int i = 0; i < n_dirty; ++i) if (dirty[i] == ino) return 1;
  return 0;
}
static void set_clean(ino_t ino) {
  for (int i = 0; i < n_dirty; ++i) {
    if (dirty[i] == ino) { dirty[i] = dirty[--n_dirty]; return; }
  }
}

// Copies `src` (a path) into the journal; returns the copy's name in buf, or "-".
static void save_copy(const char* src, char* buf) {
  int in = real_open(src, O_RDONLY | O_CLOEXEC);
  if (in < 0) { strcpy(buf, "-"); return; }
  char dst[PATH_MAX];
  snprintf(buf, PATH_MAX, "pre/%llu", ++seq);
  snprintf(dst, sizeof dst, "%s/%s", journal, buf);
  int out = real_open(dst, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  char chunk[1 << 16];
  ssize_t n;
  while ((n = read(in, chunk, sizeof chunk)) > 0) real_write(out, chunk, (size_t)n);
  close(in);
  close(out);
}

// Before the first change to the file at `abs` since its last fsync.
static void before_change_path(const char* abs) {
  if (!under_root(abs)) return;
  struct stat st;
  if (stat(abs, &st) != 0 || !S_ISREG(st.st_mode)) return;
  if (is_dirty(st.st_ino)) return;
  char pre[PATH_MAX];
  if (st.st_size == 0) strcpy(pre, "-"); else save_copy(abs, pre);
  if (n_dirty < MAX_DIRTY) dirty[n_dirty++] = st.st_ino;
  logf_("D\t%llu\t%lu\t%s\t%s\n", ++seq, (unsigned long)st.st_ino, abs, pre);
}

static void before_change_fd(int fd) {
  if (!on()) return;
  char p[PATH_MAX];
  if (fd_path(fd, p) == 0) before_change_path(p);
}

static int do_open(int dirfd, const char* path, int flags, mode_t mode, int at) {
  pthread_mutex_lock(&mu);
  int journaled = on();
  char abs[PATH_MAX];
  int existed = 1, track = 0;
  if (journaled && (flags & (O_CREAT | O_TRUNC)) && absolute(dirfd, path, abs) == 0 &&
      under_root(abs)) {
    struct stat st;
    existed = stat(abs, &st) == 0;
    track = 1;
    if (existed && (flags & O_TRUNC) && (flags & O_ACCMODE) != O_RDONLY) before_change_path(abs);
  }
  int fd = at ? real_openat(dirfd, path, flags, mode) : real_open(path, flags, mode);
  if (fd >= 0 && track && !existed) {
    struct stat st;
    if (fstat(fd, &st) == 0) {
      const char* name;
      ino_t d = parent_ino(abs, &name);
      logf_("C\t%llu\t%lu\t%s\t%lu\n", ++seq, (unsigned long)d, name, (unsigned long)st.st_ino);
      if (S_ISREG(st.st_mode) && n_dirty < MAX_DIRTY && !is_dirty(st.st_ino)) {
        dirty[n_dirty++] = st.st_ino;
        logf_("D\t%llu\t%lu\t%s\t-\n", ++seq, (unsigned long)st.st_ino, abs);
      }
    }
  }
  pthread_mutex_unlock(&mu);
  return fd;
}

#define MODE_ARG(flags, mode)                    \
  mode_t mode = 0;                               \
  if ((flags) & (O_CREAT | O_TMPFILE)) {         \
    va_list ap;                                  \
    va_start(ap, flags);                         \
    mode = va_arg(ap, mode_t);                   \
    va_end(ap);                                  \
  }

int open(const char* path, int flags, ...) { MODE_ARG(flags, mode); load_open(); return do_open(AT_FDCWD, path, flags, mode, 0); }
int open64(const char* path, int flags, ...) { MODE_ARG(flags, mode); load_open(); return do_open(AT_FDCWD, path, flags, mode, 0); }
int openat(int d, const char* path, int flags, ...) { MODE_ARG(flags, mode); load_openat(); return do_open(d, path, flags, mode, 1); }
int openat64(int d, const char* path, int flags, ...) { MODE_ARG(flags, mode); load_openat(); return do_open(d, path, flags, mode, 1); }
int creat(const char* path, mode_t mode) { load_open(); return do_open(AT_FDCWD, path, O_CREAT | O_WRONLY | O_TRUNC, mode, 0); }

#define DATA_CALL(expr, fd)          \
  pthread_mutex_lock(&mu);           \
  before_change_fd(fd);              \
  __typeof__(expr) r_ = (expr);      \
  pthread_mutex_unlock(&mu);         \
  return r_;

ssize_t write(int fd, const void* b, size_t n) {
  load_write();
  if (fd <= 2 || fd == log_fd) return real_write(fd, b, n);
  DATA_CALL(real_write(fd, b, n), fd)
}
ssize_t pwrite(int fd, const void* b, size_t n, off_t o) { load_pwrite(); DATA_CALL(real_pwrite(fd, b, n, o), fd) }
ssize_t pwrite64(int fd, const void* b, size_t n, off_t o) { load_pwrite64(); DATA_CALL(real_pwrite64(fd, b, n, o), fd) }
ssize_t writev(int fd, const struct iovec* v, int c) {
  load_writev();
  if (fd <= 2) return real_writev(fd, v, c);
  DATA_CALL(real_writev(fd, v, c), fd)
}
int ftruncate(int fd, off_t l) { load_ftruncate(); DATA_CALL(real_ftruncate(fd, l), fd) }
int ftruncate64(int fd, off_t l) { load_ftruncate64(); DATA_CALL(real_ftruncate64(fd, l), fd) }
int fallocate(int fd, int m, off_t o, off_t l) { load_fallocate(); DATA_CALL(real_fallocate(fd, m, o, l), fd) }

static int do_sync(int fd, int data_only) {
  pthread_mutex_lock(&mu);
  int r = data_only ? real_fdatasync(fd) : real_fsync(fd);
  if (r == 0 && on()) {
    struct stat st;
    char p[PATH_MAX];
    if (fstat(fd, &st) == 0 && fd_path(fd, p) == 0 && under_root(p)) {
      if (S_ISDIR(st.st_mode)) {
        logf_("Y\t%llu\t%lu\n", ++seq, (unsigned long)st.st_ino);
      } else {
        logf_("S\t%llu\t%lu\n", ++seq, (unsigned long)st.st_ino);
        set_clean(st.st_ino);
      }
    }
  }
  pthread_mutex_unlock(&mu);
  return r;
}
int fsync(int fd) { load_fsync(); load_fdatasync(); return do_sync(fd, 0); }
int fdatasync(int fd) { load_fsync(); load_fdatasync(); return do_sync(fd, 1); }

static int do_rename(int fd1, const char* a, int fd2, const char* b, unsigned flags, int kind) {
  pthread_mutex_lock(&mu);
  char fa[PATH_MAX], fb[PATH_MAX], saved[PATH_MAX] = "-";
  int track = on() && absolute(fd1, a, fa) == 0 && absolute(fd2, b, fb) == 0 &&
              (under_root(fa) || under_root(fb));
  ino_t da = 0, db = 0;
  const char *na = "", *nb = "";
  if (track) {
    struct stat st;
    if (lstat(fb, &st) == 0 && S_ISREG(st.st_mode)) save_copy(fb, saved);
    da = parent_ino(fa, &na);
    db = parent_ino(fb, &nb);
  }
  int r = kind == 0 ? real_rename(a, b)
        : kind == 1 ? real_renameat(fd1, a, fd2, b)
                    : real_renameat2(fd1, a, fd2, b, flags);
  if (r == 0 && track) {
    logf_("R\t%llu\t%lu\t%s\t%lu\t%s\t%s\n", ++seq, (unsigned long)da, na, (unsigned long)db, nb,
          saved);
  }
  pthread_mutex_unlock(&mu);
  return r;
}
int rename(const char* a, const char* b) { load_all(); return do_rename(AT_FDCWD, a, AT_FDCWD, b, 0, 0); }
int renameat(int f1, const char* a, int f2, const char* b) { load_all(); return do_rename(f1, a, f2, b, 0, 1); }
int renameat2(int f1, const char* a, int f2, const char* b, unsigned fl) { load_all(); return do_rename(f1, a, f2, b, fl, 2); }

static int do_unlink(int dirfd, const char* path, int flags, int kind) {
  pthread_mutex_lock(&mu);
  char abs[PATH_MAX], saved[PATH_MAX] = "-";
  int track = on() && absolute(dirfd, path, abs) == 0 && under_root(abs);
  struct stat st;
  int is_dir = 0;
  ino_t d = 0;
  const char* name = "";
  if (track) {
    if (lstat(abs, &st) != 0) track = 0;
    else {
      is_dir = S_ISDIR(st.st_mode);
      if (!is_dir) save_copy(abs, saved);
      d = parent_ino(abs, &name);
    }
  }
  int r;
  switch (kind) {
    case 0: r = real_unlink(path); break;
    case 1: r = real_unlinkat(dirfd, path, flags); break;
    case 2: r = real_remove(path); break;
    default: r = real_rmdir(path); break;
  }
  if (r == 0 && track) {
    if (is_dir) {
      logf_("X\t%llu\t%lu\t%s\t%lu\n", ++seq, (unsigned long)d, name, (unsigned long)st.st_ino);
    }
    else logf_("U\t%llu\t%lu\t%s\t%s\n", ++seq, (unsigned long)d, name, saved);
  }
  pthread_mutex_unlock(&mu);
  return r;
}
int unlink(const char* p) { load_all(); return do_unlink(AT_FDCWD, p, 0, 0); }
int unlinkat(int d, const char* p, int f) { load_all(); return do_unlink(d, p, f, 1); }
int remove(const char* p) { load_all(); return do_unlink(AT_FDCWD, p, 0, 2); }
int rmdir(const char* p) { load_all(); return do_unlink(AT_FDCWD, p, 0, 3); }

static int do_mkdir(int dirfd, const char* path, mode_t mode, int at) {
  pthread_mutex_lock(&mu);
  int r = at ? real_mkdirat(dirfd, path, mode) : real_mkdir(path, mode);
  char abs[PATH_MAX];
  if (r == 0 && on() && absolute(dirfd, path, abs) == 0 && under_root(abs)) {
    struct stat st;
    const char* name;
    ino_t d = parent_ino(abs, &name);
    if (stat(abs, &st) == 0) {
      logf_("M\t%llu\t%lu\t%s\t%lu\n", ++seq, (unsigned long)d, name, (unsigned long)st.st_ino);
    }
  }
  pthread_mutex_unlock(&mu);
  return r;
}
int mkdir(const char* p, mode_t m) { load_all(); return do_mkdir(AT_FDCWD, p, m, 0); }
int mkdirat(int d, const char* p, mode_t m) { load_all(); return do_mkdir(d, p, m, 1); }
