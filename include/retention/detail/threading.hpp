// retention::detail: the one thread rule and the one parallel loop of the library, and keeping
// Eigen's own GEMM threading out of the kernels' small products.
#pragma once

#include <retention/core.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>

#if defined(_OPENMP)
#include <omp.h>
#include <pthread.h>
#endif

namespace retention {
namespace detail {

/// For its lifetime, Eigen's products on the calling thread run single-threaded.
///
/// Why: with OpenMP enabled, Eigen splits every product above a small size over all threads. A
/// single-head kernel runs hundreds of small products one after another; waking a team for each
/// costs more than the product, and a team that waits for a busy core makes the kernel many times
/// slower. Parallelism belongs one level up, over (batch, head) pairs. Eigen reads its thread count
/// from omp_get_max_threads() (unless the user fixed it with Eigen::setNbThreads), which is this
/// thread's own setting, so changing it here affects no other thread and is restored on exit.
class SerialEigenScope {
 public:
  SerialEigenScope() {
#if defined(_OPENMP)
    if (!omp_in_parallel()) {
      saved_ = omp_get_max_threads();
      if (saved_ > 1) omp_set_num_threads(1);
    }
#endif
  }
  ~SerialEigenScope() {
#if defined(_OPENMP)
    if (saved_ > 1) omp_set_num_threads(saved_);
#endif
  }
  SerialEigenScope(const SerialEigenScope&) = delete;
  SerialEigenScope& operator=(const SerialEigenScope&) = delete;

 private:
#if defined(_OPENMP)
  int saved_ = 0;  // the caller's thread count while it is lowered to 1; 0 = nothing changed
#endif
};

#if defined(_OPENMP)
/// True on a thread while it runs its share of a team's work: calls made there run on that
/// thread alone (teams do not nest).
inline bool& in_team() {
  static thread_local bool flag = false;
  return flag;
}

/// Marks the calling thread as inside a team for its lifetime (in_team), then restores the mark.
class TeamScope {
 public:
  TeamScope() : outer_(in_team()) { in_team() = true; }
  ~TeamScope() { in_team() = outer_; }
  TeamScope(const TeamScope&) = delete;
  TeamScope& operator=(const TeamScope&) = delete;

 private:
  bool outer_;
};

#endif

/// Work (in flops, or flop-equivalents) below which a task is not worth a thread: tens of
/// microseconds of one core, several times what a team costs while its threads poll for work
/// (docs/math.md, Layouts and conventions).
constexpr double min_flops_per_thread = 2.0e6;

/// Work below which a team does not wake pool threads that sleep (only threads still polling
/// after a recent region join, or none): a few hundred microseconds for each of two threads.
/// Waking a sleeping thread costs the caller tens of microseconds (a futex wake; on a virtual
/// machine an interrupt to an idle core), and the woken thread starts about a hundred
/// microseconds later.
constexpr double min_flops_to_wake = 4.0e7;

/// Largest team the library ever starts, whatever is requested.
constexpr int max_team = 256;

/// Threads a call may use: `requested` (0 = OpenMP's default, the only place that default is read)
/// capped by the number of independent tasks, by the work (no thread for less than
/// min_flops_per_thread) and by max_team. 1 without OpenMP or inside a parallel region (no
/// nesting). `requested` must be >= 0 (callers check it with check_threads).
inline int team_size(int requested, Index tasks, double total_flops) {
#if defined(_OPENMP)
  if (omp_in_parallel() || in_team()) return 1;
  Index team = requested > 0 ? requested : omp_get_max_threads();
  team = std::min<Index>(team, max_team);
  team = std::min<Index>(team, std::max<Index>(tasks, 1));
  const double by_work = total_flops / min_flops_per_thread;
  if (by_work < static_cast<double>(team)) team = std::max<Index>(1, static_cast<Index>(by_work));
  return static_cast<int>(std::max<Index>(team, 1));
#else
  (void)requested;
  (void)tasks;
  (void)total_flops;
  return 1;
#endif
}

/// A team for one parallel region: at most `size` threads take its shares, and `wake` says
/// whether pool threads that sleep are woken for it (otherwise only threads still polling after
/// an earlier region join; the caller runs whatever shares nobody else takes).
/// A bare count (as in parallel_region(2, ...)) is a team that wakes.
struct Team {
  Team(int n = 1, bool w = true) : size(n), wake(w) {}  // NOLINT: implicit from a count
  int size;
  bool wake;
};

/// The team for `tasks` independent tasks worth total_flops, at most `requested` threads (0 =
/// default): team_size's count, waking sleeping threads only for min_flops_to_wake or more.
inline Team plan_team(int requested, Index tasks, double total_flops) {
  const int size = team_size(requested, tasks, total_flops);
  return Team(size, size > 1 && total_flops >= min_flops_to_wake);
}

/// Remembers when a team member was late (ThreadPool::run) and says when regions should stop
/// waiting for members. A member that finishes more than late_margin plus the caller's own time
/// after the caller was most likely not running (another process holds its core). Twice within
/// late_window, and regions run their shares on the caller alone for the next pause; once is not
/// enough (a virtual machine's core can stall for a moment).
class LateMembers {
 public:
  using Clock = std::chrono::steady_clock;
  static constexpr std::chrono::microseconds late_margin{200};
  static constexpr std::chrono::milliseconds late_window{50};
  static constexpr std::chrono::milliseconds pause{20};

  /// A region whose caller ran its shares from `start` to `own_done` and whose last member
  /// finished at `end`; returns whether this starts a pause.
  bool note(Clock::time_point start, Clock::time_point own_done, Clock::time_point end) {
    if (end - own_done <= (own_done - start) + late_margin) return false;
    const Clock::rep now = end.time_since_epoch().count();
    const Clock::rep previous = last_late_.exchange(now, std::memory_order_relaxed);
    if (previous == 0 || now - previous >= Clock::duration(late_window).count()) return false;
    pause_until(end + pause);
    return true;
  }
  /// Whether regions at `now` should run their shares on the caller alone.
  bool paused(Clock::time_point now = Clock::now()) const {
    return now.time_since_epoch().count() < paused_until_.load(std::memory_order_relaxed);
  }
  /// Ends a pause and forgets earlier late members.
  void forget() {
    paused_until_.store(0, std::memory_order_relaxed);
    last_late_.store(0, std::memory_order_relaxed);
  }
  /// Pauses until `until`.
  void pause_until(Clock::time_point until) {
    paused_until_.store(until.time_since_epoch().count(), std::memory_order_relaxed);
  }

 private:
  std::atomic<Clock::rep> paused_until_{0};
  std::atomic<Clock::rep> last_late_{0};
};

#if defined(_OPENMP)
/// The threads that run the library's parallel regions, started on first use and kept for the
/// process (never destroyed: one may still be asleep when the process exits).
///
/// Why not an OpenMP parallel region: an OpenMP thread that waits (at the region's closing
/// barrier, or between regions for the next one) spins before it sleeps (libgomp: 300,000 pause
/// loops by default), and on a shared machine the team member it waits for may be the one that
/// needs the spinning core; measured beside a busy process, two threads then ran the MSR layer
/// 1.5-2x slower than one. Here every wait sleeps on a condition variable, which frees the core
/// at once. OpenMP still sets the default thread count (omp_get_max_threads).
class ThreadPool {
 public:
  static ThreadPool& get() {
    static const bool registered = [] {
      // A child process after fork() has none of the parent's threads: it starts a new pool.
      pthread_atfork(nullptr, nullptr, [] { instance() = nullptr; });
      return true;
    }();
    (void)registered;
    ThreadPool*& pool = instance();
    if (!pool) pool = new ThreadPool();
    return *pool;
  }

  /// Runs region(i, team) once for each share i in [0, team) and returns when all have finished.
  /// The caller and up to team - 1 pool threads take shares in turn: a pool thread that has not
  /// woken by the time the caller has taken the last share takes no part, and the caller waits
  /// only for the threads that did, so on a busy machine a team member that is not scheduled
  /// costs nothing but its share, which the caller runs. With wake false, sleeping pool threads
  /// are not woken: only those still polling join. region must not throw. Returns false without
  /// running anything when another thread's region is using the pool (the caller then runs the
  /// work alone).
  template <class Region>
  bool run(int team, Region& region, bool wake) {
    std::unique_lock<std::mutex> owner(run_mutex_, std::try_to_lock);
    if (!owner.owns_lock()) return false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      while (started_ < team - 1) {
        std::thread(&ThreadPool::work, this, started_ + 1).detach();
        ++started_;  // only once the thread exists
      }
      job_ = [](void* r, int i, int n) { (*static_cast<Region*>(r))(i, n); };
      context_ = &region;
      team_ = team;
      open_ = true;
      next_share_.store(0, std::memory_order_relaxed);
      generation_.store(generation_.load(std::memory_order_relaxed) + 1, std::memory_order_release);
    }
    if (wake) work_ready_.notify_all();
    const auto start = std::chrono::steady_clock::now();
    int own_shares = 0;
    {
      const TeamScope scope;
      for (int i = next_share_.fetch_add(1, std::memory_order_relaxed); i < team;
           i = next_share_.fetch_add(1, std::memory_order_relaxed), ++own_shares)
        region(i, team);
    }
    {
      // Every share is taken: threads that have not joined yet must not.
      std::lock_guard<std::mutex> lock(mutex_);
      open_ = false;
    }
    const auto own_done = std::chrono::steady_clock::now();
    spin_until([this] { return active_.load(std::memory_order_acquire) == 0; });
    {
      std::unique_lock<std::mutex> lock(mutex_);
      work_done_.wait(lock, [this] { return active_.load(std::memory_order_relaxed) == 0; });
    }
    // A caller that ran no share has nothing to compare a member's time with.
    if (own_shares > 0) late_.note(start, own_done, std::chrono::steady_clock::now());
    return true;
  }

  /// When recent regions waited for late members: regions then run every share on the caller.
  LateMembers& late_members() { return late_; }

 private:
  ThreadPool() = default;
  static ThreadPool*& instance() {
    static ThreadPool* pool = nullptr;
    return pool;
  }

  /// Polls done() for up to spin_time, giving the core to any other runnable thread between
  /// polls: a wait that ends within microseconds does not pay for a sleep and a wake-up (which
  /// on a virtual machine can take longer than the wait), and a longer one costs at most
  /// spin_time of a core before the thread sleeps.
  template <class Done>
  static void spin_until(Done&& done) {
    const auto end = std::chrono::steady_clock::now() + spin_time;
    while (!done() && std::chrono::steady_clock::now() < end) std::this_thread::yield();
  }
  static constexpr std::chrono::microseconds spin_time{100};

  void work(int index) {
    in_team() = true;
    omp_set_num_threads(1);  // Eigen's products on this thread stay single-threaded
    std::uint64_t seen = 0;
    for (;;) {
      spin_until([&] { return generation_.load(std::memory_order_acquire) != seen; });
      std::unique_lock<std::mutex> lock(mutex_);
      work_ready_.wait(lock, [&] { return generation_.load(std::memory_order_relaxed) != seen; });
      seen = generation_.load(std::memory_order_relaxed);
      if (index >= team_ || !open_) continue;  // not in this team, or woke after it closed
      void (*job)(void*, int, int) = job_;
      void* context = context_;
      const int team = team_;
      active_.fetch_add(1, std::memory_order_relaxed);
      lock.unlock();
      for (int i = next_share_.fetch_add(1, std::memory_order_relaxed); i < team;
           i = next_share_.fetch_add(1, std::memory_order_relaxed))
        job(context, i, team);
      lock.lock();
      if (active_.fetch_sub(1, std::memory_order_acq_rel) == 1) work_done_.notify_one();
    }
  }

  std::mutex run_mutex_;  // held by the caller whose region is running
  std::mutex mutex_;      // guards everything below
  std::condition_variable work_ready_, work_done_;
  void (*job_)(void*, int, int) = nullptr;
  void* context_ = nullptr;
  int team_ = 0, started_ = 0;
  bool open_ = false;  // pool threads may still join the current region
  // Changed only under mutex_, read without it while spinning: the pool threads inside the
  // current region (active_) and the region count (generation_).
  std::atomic<int> active_{0};
  std::atomic<std::uint64_t> generation_{0};
  // The next share of the current region to run; taken by whoever is free, without the mutex.
  std::atomic<int> next_share_{0};
  LateMembers late_;
};
#endif

/// Runs region(share, team) once for each share = 0..team-1 on up to `team` threads, for work that
/// splits itself into `team` parts: the share number, not the thread, says which part (a thread
/// runs another share when a team member is late). The first exception any share throws is
/// rethrown here after the team ends.
template <class Region>
void parallel_region(Team plan, Region&& region) {
  // One thread means one: Eigen would otherwise spread the region's products over OpenMP's team.
  const SerialEigenScope serial;
  const int team = plan.size;
  if (team <= 1) {
    region(0, 1);
    return;
  }
#if defined(_OPENMP)
  std::exception_ptr error;
  std::mutex error_mutex;
  auto guarded = [&](int thread, int n) {
    try {
      region(thread, n);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  };
  ThreadPool& pool = ThreadPool::get();
  if (pool.late_members().paused()) {
    // Every share here, in order: the same split, so the same result, as with the team.
    const TeamScope scope;
    for (int i = 0; i < team; ++i) guarded(i, team);
  } else if (!pool.run(team, guarded, plan.wake)) {
    guarded(0, 1);  // another thread's region holds the pool: this one runs here alone
  }
  if (error) std::rethrow_exception(error);
#else
  region(0, 1);
#endif
}

/// Runs body(first_row, rows) over row blocks of a per-row computation (projections, an MLP): one
/// static block per share of a team sized by the thread rule (at least min_rows rows each), every
/// product inside single-threaded; a team of one is one call over all rows.
template <class Body>
void for_row_blocks(int threads, Index rows, double flops_per_row, Body&& body,
                    Index min_rows = 32) {
  const Team team = plan_team(threads, rows / min_rows, flops_per_row * static_cast<double>(rows));
  parallel_region(team, [&](int t, int n) {
    const Index r0 = rows * t / n, r1 = rows * (t + 1) / n;
    body(r0, r1 - r0);
  });
}

/// Column blocks of a split product: at least this many outputs each, starting at multiples of
/// column_block_align (whole cache lines of floats and doubles).
constexpr Index min_columns_per_block = 64;
constexpr Index column_block_align = 16;
/// Rows per thread below which a product may be split over its outputs: with more, the packing
/// that a row block repeats is a small part of its work, and row blocks keep a layer's per-row
/// stages (an MLP's LayerNorm, fc1, GELU, fc2) together in cache.
constexpr Index max_rows_to_split_columns = 64;

/// Whether a product of `rows` rows into `cols` outputs is better split over its outputs than over
/// its rows on `team` threads: Eigen packs the whole weight for every row block, so with few rows
/// each thread would pack all of it; split over outputs, each packs its own slice (and the few
/// input rows). Outputs win when rows < cols (1 - 1 / team).
inline bool split_columns(Index rows, Index cols, int team) {
  return team > 1 && rows < max_rows_to_split_columns * team &&
         static_cast<double>(rows) <
             static_cast<double>(cols) * (1.0 - 1.0 / static_cast<double>(team));
}

/// The team for a per-row computation of `rows` rows into `cols` outputs worth flops_per_row a
/// row, at most `threads` threads, when it is to be split over its outputs (split_columns);
/// a team of one when it is not (split its rows with for_row_blocks instead).
inline Team plan_column_split(int threads, Index rows, Index cols, double flops_per_row) {
  const Team team =
      plan_team(threads, cols / min_columns_per_block, flops_per_row * static_cast<double>(rows));
  return split_columns(rows, cols, team.size) ? team : Team(1);
}

/// Runs body(first_col, cols) over column blocks of `cols` outputs (starts at multiples of
/// `align` outputs but the first), one block per share of `team`.
template <class Body>
void for_column_blocks(Team team, Index cols, Body&& body, Index align = column_block_align) {
  parallel_region(team, [&](int t, int n) {
    const auto edge = [&](int i) {
      const Index a = align;
      return i == n ? cols : std::min(cols, cols * i / n / a * a);
    };
    const Index c0 = edge(t), c1 = edge(t + 1);
    if (c1 > c0) body(c0, c1 - c0);
  });
}

/// Runs body(i, workspace) for i in [0, tasks) on `team` threads, handed out one at a time (tasks
/// differ in cost, and on a shared machine a thread that gets more CPU takes more of them), with
/// one workspace per share of the team made by make() (never per task; not at all for a share
/// that starts after the last task was taken). The first exception any task throws is rethrown
/// here after the team ends; tasks not yet started when it was thrown are skipped.
template <class Make, class Body>
void for_each_with_workspace(Team team, Index tasks, Make&& make, Body&& body) {
  if (team.size <= 1 || tasks <= 1) {
    const SerialEigenScope serial;  // as in parallel_region
    auto ws = make();
    for (Index i = 0; i < tasks; ++i) body(i, ws);
    return;
  }
  std::atomic<Index> next{0};
  std::atomic<bool> failed{false};
  team.size = static_cast<int>(std::min<Index>(team.size, tasks));
  parallel_region(team, [&](int, int) {
    // A share run after every task is taken (its thread came late) needs no workspace.
    if (next.load(std::memory_order_relaxed) >= tasks) return;
    try {
      auto ws = make();
      for (Index i = next.fetch_add(1, std::memory_order_relaxed);
           i < tasks && !failed.load(std::memory_order_relaxed);
           i = next.fetch_add(1, std::memory_order_relaxed))
        body(i, ws);
    } catch (...) {
      failed.store(true, std::memory_order_relaxed);
      throw;
    }
  });
}

/// for_each_with_workspace without a workspace: task(i) for i in [0, tasks).
template <class Task>
void parallel_tasks(Team team, Index tasks, Task&& task) {
  for_each_with_workspace(
      team, tasks, [] { return 0; }, [&](Index i, int&) { task(i); });
}

/// Rejects a negative thread request (0 = default) with shape_error naming the function.
inline void check_threads(const char* function, const char* name, int threads) {
  if (threads < 0)
    fail(function,
         std::string(name) + " must be >= 0 (0 = default), got " + std::to_string(threads));
}

}  // namespace detail
}  // namespace retention
