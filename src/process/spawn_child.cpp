// Compiled with -fno-sanitize=all (see CMakeLists.txt): this code runs in a vfork-style child on
// a stack the sanitizers do not know, sharing the parent's memory.
#include "process/spawn_child.hpp"

#include <fcntl.h>
#include <linux/close_range.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>

namespace duplex::detail {
namespace {

// The kernel's struct sigaction (generic layout, as on x86-64 and arm64).
struct kernel_sigaction {
  void (*handler)(int);
  unsigned long flags;
  void (*restorer)();
  unsigned long mask;
};

// A raw syscall: returns the result, or -errno. (No libc wrapper: some are intercepted by the
// sanitizers, and this child must not reach their runtime.)
long raw(long number, long a = 0, long b = 0, long c = 0, long d = 0) {
  const long r = ::syscall(number, a, b, c, d);
  return r < 0 ? -errno : r;
}

[[noreturn]] void fail(spawn_plan* p, long negative_errno) {
  p->error = static_cast<int>(-negative_errno);
  ::syscall(SYS_exit_group, 127);
  __builtin_unreachable();
}

// Closes every fd from low to high (close_range; one at a time before Linux 5.9, as far as 65535).
void close_fds(unsigned low, unsigned high) {
  if (low > high) return;
  if (raw(SYS_close_range, low, high, 0) != -ENOSYS) return;
  for (unsigned long fd = low; fd <= high && fd < 65536; ++fd)
    raw(SYS_close, static_cast<long>(fd));
}

long move_to(int from, int to) {
  if (from == to) return raw(SYS_fcntl, to, F_SETFD, 0);  // keep it, without close-on-exec
  return raw(SYS_dup3, from, to, 0);
}

}  // namespace

int spawn_child_main(void* arg) {
  auto* p = static_cast<spawn_plan*>(arg);

  // Every signal arrives blocked (the parent blocked them all around clone). A handler of the
  // parent's must never run here, in the parent's memory: reset each caught signal to default,
  // unless clone3 did so already (64 queries, about 30 us on a VM where a syscall costs 0.5 us).
  for (int sig = 1; sig < 65 && !p->handlers_reset; ++sig) {
    if (sig == SIGKILL || sig == SIGSTOP) continue;
    kernel_sigaction old{};
    if (raw(SYS_rt_sigaction, sig, 0, reinterpret_cast<long>(&old), 8) < 0) continue;
    if (old.handler == SIG_IGN || old.handler == SIG_DFL) continue;
    kernel_sigaction dfl{};
    dfl.handler = SIG_DFL;
    raw(SYS_rt_sigaction, sig, reinterpret_cast<long>(&dfl), 0, 8);
  }

  if (p->kill_on_parent_death) {
    if (long r = raw(SYS_prctl, PR_SET_PDEATHSIG, SIGKILL); r < 0) fail(p, r);
    // The parent may have died before the request took effect.
    if (raw(SYS_getppid) != p->parent_pid) fail(p, -ESRCH);
  }

  // The fds. No step needs an fd number above child_fd or a free slot the parent did not have,
  // so any child_fd below RLIMIT_NOFILE works however low the limit. First every fd but stdio and
  // the end is closed, whatever other threads of the parent had open: what is left is fds 0-2
  // (those the parent had open) and the end, wherever it is.
  const auto end = static_cast<unsigned>(p->end_fd);
  if (end > 3) close_fds(3, end - 1);
  close_fds(end < 3 ? 3 : end + 1, ~0U);

  // The end to child_fd, without close-on-exec. child_fd is at least 3 (spawn checks), so it is
  // never a stdio fd and, all else being closed, is free unless the end is there already. The
  // end's own number may be a stdio fd (a parent that runs with one closed): that is closed, as
  // the exec would have closed it (close-on-exec), and may take /dev/null below.
  if (p->end_fd == p->child_fd) {
    if (long r = raw(SYS_fcntl, p->child_fd, F_SETFD, 0); r < 0) fail(p, r);
  } else {
    if (long r = raw(SYS_dup3, p->end_fd, p->child_fd, 0); r < 0) fail(p, r);
    raw(SYS_close, p->end_fd);
  }

  // /dev/null on the stdio fds asked for. The lowest of them is closed first, so the open takes
  // a number at or below it (the lowest free): it needs no slot that may not exist.
  const bool want[3] = {p->null_stdin, p->null_stdout, p->null_stderr};
  int first = 0;
  while (first < 3 && !want[first])
    ++first;
  if (first < 3) {
    raw(SYS_close, first);
    const long null =
        raw(SYS_openat, AT_FDCWD, reinterpret_cast<long>("/dev/null"), O_RDWR | O_CLOEXEC);
    if (null < 0) fail(p, null);
    for (int fd = first; fd < 3; ++fd) {
      if (!want[fd]) continue;
      if (long r = move_to(static_cast<int>(null), fd); r < 0) fail(p, r);
    }
    // Below `first`: a stdio fd the parent had closed; it stays closed.
    if (null > 2 || !want[null]) raw(SYS_close, null);
  }

  if (p->cwd != nullptr) {
    if (long r = raw(SYS_chdir, reinterpret_cast<long>(p->cwd)); r < 0) fail(p, r);
  }

  raw(SYS_rt_sigprocmask, SIG_SETMASK, reinterpret_cast<long>(&p->parent_mask), 0, 8);
  const long r = raw(SYS_execve, reinterpret_cast<long>(p->path), reinterpret_cast<long>(p->argv),
                     reinterpret_cast<long>(p->envp));
  fail(p, r);
}

}  // namespace duplex::detail

#if defined(__x86_64__)
// rdi: args, rsi: size, rdx: fn, rcx: arg. The syscall keeps r8 and r9 (it clobbers rcx and
// r11), so fn and arg wait there. The child gets rax 0 and rsp at the top of its stack (16-byte
// aligned), calls fn(arg) (the call's push leaves the alignment the ABI expects) and passes its
// result to exit_group.
asm(".pushsection .text\n"
    ".globl duplex_detail_clone3\n"
    ".hidden duplex_detail_clone3\n"
    ".type duplex_detail_clone3, @function\n"
    "duplex_detail_clone3:\n"
    "  .cfi_startproc\n"
    "  mov %rdx, %r8\n"
    "  mov %rcx, %r9\n"
    "  mov $435, %eax\n"  // SYS_clone3
    "  syscall\n"
    "  test %rax, %rax\n"
    "  jz 1f\n"
    "  ret\n"
    "1:\n"
    "  .cfi_undefined %rip\n"  // the child's outermost frame: nothing to unwind into
    "  xor %ebp, %ebp\n"
    "  mov %r9, %rdi\n"
    "  call *%r8\n"
    "  mov %eax, %edi\n"
    "  mov $231, %eax\n"  // SYS_exit_group
    "  syscall\n"
    "  hlt\n"
    "  .cfi_endproc\n"
    ".size duplex_detail_clone3, .-duplex_detail_clone3\n"
    ".popsection\n");
#endif
