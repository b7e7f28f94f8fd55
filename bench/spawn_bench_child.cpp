// The child that spawn_bench starts: it exits with status 0 at once. On x86-64 and arm64 it is
// linked static without libc (DUPLEX_BENCH_BARE_CHILD, see CMakeLists.txt): its whole life is
// the exec and one exit_group, so the benchmark measures the starting and reaping, not the
// dynamic loader or libc's start-up. Elsewhere it is an ordinary program.
#if defined(DUPLEX_BENCH_BARE_CHILD)

#if defined(__x86_64__)
asm(".pushsection .text\n"
    ".globl _start\n"
    ".type _start, @function\n"
    "_start:\n"
    "  mov $231, %eax\n"  // exit_group
    "  xor %edi, %edi\n"  // status 0
    "  syscall\n"
    "  hlt\n"
    ".popsection\n");
#elif defined(__aarch64__)
asm(".pushsection .text\n"
    ".globl _start\n"
    ".type _start, %function\n"
    "_start:\n"
    "  mov x8, #94\n"  // exit_group
    "  mov x0, #0\n"   // status 0
    "  svc #0\n"
    "  brk #0\n"
    ".popsection\n");
#else
#error "DUPLEX_BENCH_BARE_CHILD is only for x86-64 and arm64"
#endif

#else

int main() { return 0; }

#endif
