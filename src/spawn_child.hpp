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
  int child_fd = 3;             // where it must end up
  bool null_stdin = false;
  bool null_stdout = false;
  bool null_stderr = false;
  bool kill_on_parent_death = false;
  pid_t parent_pid = 0;
  sigset_t parent_mask{};  // restored just before exec
  int error = 0;           // written by the child if a step or the exec fails
};

// The child's entry point for clone(); never returns if the exec succeeds.
int spawn_child_main(void* plan);

}  // namespace duplex::detail
