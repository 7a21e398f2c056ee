// retention::detail: keeping Eigen's own GEMM threading out of the kernels' small products.
#pragma once

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace retention {
namespace detail {

/// For its lifetime, Eigen's products on the calling thread run single-threaded.
///
/// Why: with OpenMP enabled, Eigen splits every product above a small size over all threads. A
/// single-head kernel runs hundreds of small products (a 64 x 128 chunk, a 128 x 128 tile) one
/// after another; waking a team for each costs more than the product, and on a loaded machine a
/// team that waits for a busy core makes the kernel 10 to 100 times slower (measured: parallel
/// form, T = 4096, 40 ms serial against 2.3 s with 2 threads). Parallelism belongs one level up,
/// over (batch, head) pairs. Eigen reads its thread count from omp_get_max_threads() (unless the
/// user fixed it with Eigen::setNbThreads), which is this thread's own setting, so changing it
/// here affects no other thread and is restored on exit. Inside an active parallel region Eigen
/// does not nest anyway, and nothing is changed.
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

}  // namespace detail
}  // namespace retention
