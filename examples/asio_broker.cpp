// A broker that hands open files to worker processes, from one thread, with Asio coroutines.
//
// Run plainly, this is the broker. It starts three workers with duplex::spawn (this very program,
// /proc/self/exe, with the argument "worker"), wraps each worker's channel in a
// duplex::asio::channel on one io_context, and makes some files in memory (memfd_create) with
// contents it knows. The jobs wait in one queue; each job is one to three files. One coroutine
// per worker takes the next job, sends the job's open fds to its worker in one message, and
// awaits the reply: the size and a checksum of each file, which the worker computed by reading
// through the fds it received. A worker that is quick gets more jobs. The broker checks every
// answer against what it wrote.
//
// Nothing here ever blocks the broker's thread: while one worker reads its files, the
// coroutines of the others are sending and receiving. Each reply is awaited with a timeout, the
// Asio way: the receive races a timer (operator|| of asio/experimental/awaitable_operators.hpp),
// and whichever loses is cancelled. A cancelled receive loses nothing: a reply that arrives later
// would be the next message, whole.
//
// When the queue is empty, each coroutine half-closes its channel (shutdown_send). A worker
// receives every job sent before that, then errc::peer_closed, and exits 0; the broker reaps it
// with wait(). The workers are plain blocking duplex code: Asio is the broker's choice alone.
//
// An fd received is the same open file as the broker's, with the same file offset: if two
// processes read() through it at once, each moves the other's offset. The worker uses pread,
// which reads at an offset of its own choosing and leaves the shared one alone.
#include <sys/mman.h>
#include <unistd.h>

#include <array>
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/experimental/awaitable_operators.hpp>
#include <asio/io_context.hpp>
#include <asio/steady_timer.hpp>
#include <asio/this_coro.hpp>
#include <asio/use_awaitable.hpp>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <iomanip>
#include <iostream>
#include <sstream>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "duplex/asio.hpp"
#include "duplex/duplex.hpp"

namespace {

using namespace std::chrono_literals;
using namespace asio::experimental::awaitable_operators;

constexpr int worker_count = 3;
// How many files each job carries, in queue order: 8 jobs, 15 files.
constexpr std::array<int, 8> files_per_job{1, 2, 3, 1, 2, 3, 1, 2};

int fail(const char* what, std::error_code ec) {
  std::cerr << what << ": " << ec.message() << '\n';
  return EXIT_FAILURE;
}

// What is known of one file's contents: its size and a 64-bit FNV-1a hash of its bytes.
struct digest {
  std::uint64_t size = 0;
  std::uint64_t checksum = 0xcbf29ce484222325;  // FNV-1a's offset basis

  void add(std::string_view bytes) {
    for (const char c : bytes) {
      checksum = (checksum ^ static_cast<unsigned char>(c)) * 0x100000001b3;  // FNV prime
    }
    size += bytes.size();
  }

  // "<size> <checksum in hex>": one line of a worker's reply.
  [[nodiscard]] std::string line() const {
    std::ostringstream out;
    out << size << ' ' << std::hex << std::setw(16) << std::setfill('0') << checksum << '\n';
    return out.str();
  }
};

// ---------------------------------------------------------------------------------------------
// The worker: plain blocking duplex.

// Reads a whole file through fd without touching its (shared) file offset.
duplex::result<digest> read_through(int fd) {
  digest d;
  std::array<char, 64 * 1024> buf{};
  for (;;) {
    const ssize_t n = ::pread(fd, buf.data(), buf.size(), static_cast<off_t>(d.size));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return duplex::fail_errno(errno);
    if (n == 0) return d;
    d.add(std::string_view(buf.data(), static_cast<std::size_t>(n)));
  }
}

int worker() {
  auto broker = duplex::inherited_channel();
  if (!broker) {
    // In words that name DUPLEX_FD and its value, not a bare errc.
    std::cerr << "Worker: no inherited channel (run me without arguments): "
              << duplex::describe_inherited_error(broker.error()) << '\n';
    return EXIT_FAILURE;
  }
  int jobs = 0;
  for (;;) {
    // One job: a name, and the files as fds (received close-on-exec, owned by the message).
    auto job = broker->receive();
    if (!job) {
      if (job.error() == duplex::errc::peer_closed) break;  // no more jobs
      return fail("Worker: receive", job.error());
    }
    std::string reply;
    for (const duplex::unique_fd& file : job->fds()) {
      auto d = read_through(file.get());
      if (!d) return fail("Worker: pread", d.error());
      reply += d->line();
    }
    if (auto r = broker->send(duplex::as_bytes(reply)); !r) return fail("Worker: send", r.error());
    ++jobs;
  }  // every fd received was closed with its message
  std::cout << "Worker: end of jobs after " << jobs << " jobs; exiting with 0." << std::endl;
  return EXIT_SUCCESS;
}

// ---------------------------------------------------------------------------------------------
// The broker: one thread, one io_context, one coroutine per worker.

struct file {
  duplex::unique_fd fd;
  digest expected;
};

struct job {
  int number = 0;
  std::vector<const file*> files;
};

// A worker process, its channel as an Asio I/O object, and what it did.
struct worker_slot {
  int number = 0;
  duplex::child process;
  duplex::asio::channel ch;
  int jobs = 0;
};

// A file in memory whose contents depend on its number.
duplex::result<file> make_file(int number) {
  file f;
  f.fd = duplex::unique_fd{::memfd_create("duplex-broker-job", MFD_CLOEXEC)};
  if (!f.fd.valid()) return duplex::fail_errno(errno);
  std::string contents(static_cast<std::size_t>(number + 1) * 100'000, '\0');
  for (std::size_t i = 0; i < contents.size(); ++i) {
    contents[i] =
        static_cast<char>((i * 7 + i / 1000 + static_cast<std::size_t>(number) * 131) & 0xff);
  }
  for (std::size_t done = 0; done < contents.size();) {
    const ssize_t n = ::write(f.fd.get(), contents.data() + done, contents.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return duplex::fail_errno(errno);
    done += static_cast<std::size_t>(n);
  }
  f.expected.add(contents);
  return f;
}

struct totals {
  int jobs = 0;
  int files = 0;
  std::uint64_t bytes = 0;
  int mismatches = 0;
  bool failed = false;
};

// One worker's coroutine: takes jobs from the shared queue until it is empty. The queue needs no
// lock: every coroutine runs on the io_context's one thread, and each runs until its next
// co_await.
asio::awaitable<void> serve(worker_slot& w, std::deque<job>& queue, totals& sum) {
  asio::steady_timer timer(co_await asio::this_coro::executor);
  while (!queue.empty()) {
    const job j = queue.front();
    queue.pop_front();
    std::vector<int> fds;
    for (const file* f : j.files)
      fds.push_back(f->fd.get());
    const std::string name = "job " + std::to_string(j.number);
    // Completes once the whole message (and its fds) is in the kernel. name and fds live on in
    // this coroutine's frame until then, as async_send requires.
    co_await w.ch.async_send(duplex::as_bytes(name), fds, asio::use_awaitable);

    // The reply, or the timer: whichever comes first cancels the other.
    timer.expires_after(10s);
    auto outcome =
        co_await (w.ch.async_receive(asio::experimental::as_tuple(asio::use_awaitable)) ||
                  timer.async_wait(asio::use_awaitable));
    if (outcome.index() == 1) {
      std::cerr << "Broker: worker " << w.number << " did not answer " << name << " in time\n";
      sum.failed = true;
      co_return;
    }
    auto [ec, reply] = std::move(std::get<0>(outcome));
    if (ec) {  // e.g. errc::peer_closed: the worker died
      std::cerr << "Broker: worker " << w.number << ", " << name << ": " << ec.message() << '\n';
      sum.failed = true;
      co_return;
    }

    // One line per file, in the order the fds were sent.
    std::string expected;
    for (const file* f : j.files) {
      expected += f->expected.line();
      sum.bytes += f->expected.size;
    }
    if (reply.text() != expected) ++sum.mismatches;
    std::cout << "Broker: " << name << " (" << j.files.size()
              << (j.files.size() == 1 ? " file" : " files") << ") checked by worker " << w.number
              << std::endl;
    ++sum.jobs;
    sum.files += static_cast<int>(j.files.size());
    ++w.jobs;
  }
  // No more jobs: the worker receives what was sent, then the end, and exits.
  if (auto r = w.ch.channel().shutdown_send(); !r) {
    std::cerr << "Broker: shutdown_send: " << r.error().message() << '\n';
    sum.failed = true;
  }
}

int broker() {
  // The files and the jobs that carry them.
  std::vector<file> files;
  std::deque<job> queue;
  int file_number = 0;
  for (std::size_t j = 0; j < files_per_job.size(); ++j) {
    for (int k = 0; k < files_per_job[j]; ++k) {
      auto f = make_file(file_number++);
      if (!f) return fail("Broker: memfd", f.error());
      files.push_back(std::move(*f));
    }
  }
  std::size_t next = 0;
  for (std::size_t j = 0; j < files_per_job.size(); ++j) {
    job jb{static_cast<int>(j) + 1, {}};
    for (int k = 0; k < files_per_job[j]; ++k)
      jb.files.push_back(&files[next++]);
    queue.push_back(std::move(jb));
  }

  // The workers, each channel an Asio I/O object on the one io_context.
  asio::io_context io(1);
  std::vector<worker_slot> workers;
  workers.reserve(worker_count);  // the coroutines hold references: no reallocation later
  // A duplex::child kills and reaps its worker when destroyed, but a broker ended by a signal
  // (SIGTERM, SIGKILL) runs no destructor: kill_on_parent_death has the kernel kill the workers
  // then, rather than leave them orphaned. It is tied to the spawning thread: the main thread.
  duplex::spawn_options options;
  options.kill_on_parent_death = true;
  for (int i = 1; i <= worker_count; ++i) {
    auto child = duplex::spawn({"/proc/self/exe", "worker"}, options);
    if (!child) return fail("Broker: spawn", child.error());
    duplex::asio::channel ch(io, std::move(child->channel()));
    workers.push_back({i, std::move(*child), std::move(ch), 0});
  }
  std::cout << "Broker: started " << worker_count << " workers" << std::endl;

  totals sum;
  for (worker_slot& w : workers)
    asio::co_spawn(io, serve(w, queue, sum), asio::detached);
  io.run();  // returns when every coroutine has finished

  // Reap each worker: it exits once it has seen the end of its jobs.
  bool all_exited_well = true;
  for (worker_slot& w : workers) {
    auto status = w.process.wait();
    if (!status) return fail("Broker: wait", status.error());
    std::cout << "Broker: worker " << w.number << " " << status->describe() << " after " << w.jobs
              << " jobs." << std::endl;
    all_exited_well = all_exited_well && status->success();
  }
  std::cout << "Broker: " << sum.jobs << " jobs, " << sum.files << " files, " << sum.bytes
            << " bytes: " << (sum.mismatches == 0 ? "every checksum matches" : "MISMATCHES")
            << std::endl;
  return !sum.failed && sum.mismatches == 0 && all_exited_well ? EXIT_SUCCESS : EXIT_FAILURE;
}

}  // namespace

int run(int argc, char** argv) {
  if (argc == 1) return broker();
  if (argc == 2 && std::string_view(argv[1]) == "worker") return worker();
  std::cerr << "usage: " << argv[0] << "   (the broker starts itself as '" << argv[0]
            << " worker')\n";
  return 2;
}

// What the example printed is its result: output that could not be written (a full disk, a
// closed pipe) is a failure, not an exit status of 0.
int main(int argc, char** argv) {
  const int status = run(argc, argv);
  if (!std::cout.flush()) {
    std::cerr << "asio_broker: output lost\n";
    return EXIT_FAILURE;
  }
  return status;
}
