// retention::detail: the one thread rule and the one parallel loop of the library, and keeping
// Eigen's own GEMM threading out of the kernels' small products.
#pragma once

#include <retention/core.hpp>

#include <algorithm>
#include <atomic>
#include <exception>

#if defined(_OPENMP)
#include <omp.h>
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

/// Work (in flops, or flop-equivalents) below which a task is not worth a thread: about a few
/// hundred microseconds of one core. A team waits at its end for its slowest member, and on a
/// shared machine a member may not be scheduled for a whole time slice (milliseconds), so a team
/// only pays off for work well above that.
constexpr double min_flops_per_thread = 2.0e7;

/// Largest team the library ever starts, whatever is requested.
constexpr int max_team = 256;

/// Threads a call may use: `requested` (0 = OpenMP's default, the only place that default is read)
/// capped by the number of independent tasks, by the work (no thread for less than
/// min_flops_per_thread) and by max_team. 1 without OpenMP or inside a parallel region (no
/// nesting). `requested` must be >= 0 (callers check it with check_threads).
inline int team_size(int requested, Index tasks, double total_flops) {
#if defined(_OPENMP)
  if (omp_in_parallel()) return 1;
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

/// Runs task(i) for i in [0, tasks) on `team` threads, handed out one at a time (tasks differ in
/// cost, and on a shared machine a thread that gets more CPU takes more of them). The first
/// exception any task throws is rethrown here after the team ends; tasks not yet started when it
/// was thrown are skipped. Nothing escapes an OpenMP region.
template <class Task>
void parallel_tasks(int team, Index tasks, Task&& task) {
  if (team <= 1 || tasks <= 1) {
    // One thread means one: Eigen would otherwise spread the tasks' products over its own team.
    const SerialEigenScope serial;
    for (Index i = 0; i < tasks; ++i) task(i);
    return;
  }
#if defined(_OPENMP)
  std::exception_ptr error;
  std::atomic<bool> failed{false};
#pragma omp parallel for schedule(dynamic, 1) num_threads(team)
  for (Index i = 0; i < tasks; ++i) {
    if (failed.load(std::memory_order_relaxed)) continue;
    try {
      task(i);
    } catch (...) {
#pragma omp critical(retention_task_error)
      {
        if (!error) error = std::current_exception();
      }
      failed.store(true, std::memory_order_relaxed);
    }
  }
  if (error) std::rethrow_exception(error);
#endif
}

/// Runs region(thread, team) once on each of `team` threads (thread = 0..team-1), for work that
/// splits itself (static shares of rows). Exceptions are handled as in parallel_tasks.
template <class Region>
void parallel_region(int team, Region&& region) {
  if (team <= 1) {
    const SerialEigenScope serial;  // as in parallel_tasks
    region(0, 1);
    return;
  }
#if defined(_OPENMP)
  std::exception_ptr error;
#pragma omp parallel num_threads(team)
  {
    try {
      region(omp_get_thread_num(), omp_get_num_threads());
    } catch (...) {
#pragma omp critical(retention_task_error)
      {
        if (!error) error = std::current_exception();
      }
    }
  }
  if (error) std::rethrow_exception(error);
#endif
}

/// parallel_tasks with one workspace per thread, made by make() once per thread (never per task):
/// body(task, workspace).
template <class Make, class Body>
void for_each_with_workspace(int team, Index tasks, Make&& make, Body&& body) {
  if (team <= 1 || tasks <= 1) {
    const SerialEigenScope serial;  // as in parallel_tasks
    auto ws = make();
    for (Index i = 0; i < tasks; ++i) body(i, ws);
    return;
  }
  std::atomic<Index> next{0};
  parallel_region(team, [&](int, int) {
    auto ws = make();
    for (Index i = next.fetch_add(1, std::memory_order_relaxed); i < tasks;
         i = next.fetch_add(1, std::memory_order_relaxed))
      body(i, ws);
  });
}

/// Rejects a negative thread request (0 = default) with shape_error naming the function.
inline void check_threads(const char* function, const char* name, int threads) {
  if (threads < 0)
    fail(function,
         std::string(name) + " must be >= 0 (0 = default), got " + std::to_string(threads));
}

}  // namespace detail
}  // namespace retention
