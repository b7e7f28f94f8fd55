// Internal: what runs in a child started with clone(CLONE_VM | CLONE_VFORK) between the clone and
// the exec. The child shares the parent's memory while the parent's thread is suspended, so it
// must not allocate, take locks, touch errno-dependent libc state or call into a sanitizer
// runtime: spawn_child.cpp makes raw syscalls only and is compiled without instrumentation.
#pragma once

#include <signal.h>
#include <sys/types.h>

namespace duplex::detail {

// Everything the child needs, prepared by the parent.
struct spawn_plan {
  const char* path = nullptr;   // the program, already found in PATH
  char* const* argv = nullptr;  // null-terminated
  char* const* envp = nullptr;  // null-terminated
  const char* cwd = nullptr;    // nullptr: stay where the parent is
  int end_fd = -1;              // the child's end, in the parent's numbering
  int child_fd = 3;             // where it must end up: at least 3, below RLIMIT_NOFILE
  bool null_stdin = false;
  bool null_stdout = false;
  bool null_stderr = false;
  bool kill_on_parent_death = false;
  pid_t parent_pid = 0;
  sigset_t parent_mask{};       // restored just before exec
  bool handlers_reset = false;  // true: the kernel reset them already (CLONE_CLEAR_SIGHAND)
  int error = 0;                // written by the child if a step or the exec fails
};

// The child's entry point for clone(); never returns if the exec succeeds.
int spawn_child_main(void* plan);

// Whether duplex_detail_clone3 exists on this architecture (x86-64 only so far).
#if defined(__x86_64__)
inline constexpr bool have_clone3_vfork = true;
#else
inline constexpr bool have_clone3_vfork = false;
#endif

// clone3(args, size) that runs fn(arg) in the child, on the stack args names, and exits the child
// with fn's result if it returns. Returns the child's pid to the parent, or -errno. The raw
// syscall needs this much assembly: the child starts on a new stack, where no C++ frame exists to
// return into. Only defined where have_clone3_vfork.
extern "C" long duplex_detail_clone3(void* args, unsigned long size, int (*fn)(void*), void* arg);

}  // namespace duplex::detail
