// retention::detail: matrix products through Eigen's own GEMM, with packing buffers the thread
// keeps instead of the two that Eigen allocates and frees in every product.
#pragma once

#include <retention/detail/scratch.hpp>

#include <type_traits>

namespace retention {
namespace detail {

// The kept path uses Eigen 3.4's internal GEMM interface (general_matrix_matrix_product and
// gemm_blocking_space); with any other Eigen version every product is Eigen's own.
#if EIGEN_WORLD_VERSION == 3 && EIGEN_MAJOR_VERSION == 4

struct GemmPackedLhsTag {};
struct GemmPackedRhsTag {};

/// Eigen's blocking for one sequential product (the sizes Eigen itself would choose), with its
/// packed-operand buffers from ThreadScratch. Eigen's dynamic blocking space otherwise takes them
/// from the stack up to 128 KiB and from the heap above, for every product: blocks that glibc
/// may hand back to the system at once, so that the next product faults fresh pages in
/// (bench/results/backward-ratio.md, session 19).
template <int DstOrder, class T>
class KeptGemmBlocking
    : public Eigen::internal::gemm_blocking_space<DstOrder, T, T, Eigen::Dynamic, Eigen::Dynamic,
                                                  Eigen::Dynamic, 1, false> {
  using Base = Eigen::internal::gemm_blocking_space<DstOrder, T, T, Eigen::Dynamic, Eigen::Dynamic,
                                                    Eigen::Dynamic, 1, false>;

 public:
  KeptGemmBlocking(Index rows, Index cols, Index depth)
      : Base(rows, cols, depth, 1, true), a_(this->m_kc * this->m_mc), b_(this->m_kc * this->m_nc) {
    this->m_blockA = a_.data();
    this->m_blockB = b_.data();
  }
  ~KeptGemmBlocking() {
    // The base's destructor frees these: they belong to the thread.
    this->m_blockA = nullptr;
    this->m_blockB = nullptr;
  }
  KeptGemmBlocking(const KeptGemmBlocking&) = delete;
  KeptGemmBlocking& operator=(const KeptGemmBlocking&) = delete;

 private:
  ThreadScratch<T, GemmPackedLhsTag> a_;
  ThreadScratch<T, GemmPackedRhsTag> b_;
};

#endif

/// Whether gemm_into can hand an operand or destination type to Eigen's GEMM directly: scalar T,
/// direct access with unit inner stride, sizes known at run time only (Eigen may choose other
/// products for sizes fixed at compile time).
template <class X, class T>
constexpr bool gemm_operand = std::is_same<typename X::Scalar, T>::value &&
                              (int(X::Flags) & Eigen::DirectAccessBit) != 0 &&
                              int(X::InnerStrideAtCompileTime) == 1 &&
                              (int(X::RowsAtCompileTime) == int(Eigen::Dynamic)) &&
                              (int(X::ColsAtCompileTime) == int(Eigen::Dynamic));

/// Whether Eigen hands products of T to a BLAS (EIGEN_USE_BLAS, e.g. RETENTION_USE_BLAS), which
/// keeps its own buffers.
template <class T>
constexpr bool blas_products =
#if defined(EIGEN_USE_BLAS)
    std::is_same<T, float>::value || std::is_same<T, double>::value;
#else
    false;
#endif

/// dst = lhs * rhs, or dst += lhs * rhs when accumulate: bit for bit Eigen's
/// `dst.noalias() (+)= lhs * rhs` (the same dispatch, kernel and blocking), but a product that
/// Eigen runs as a sequential GEMM uses packing buffers the thread keeps (KeptGemmBlocking).
/// Everything else is Eigen's own product: products that Eigen hands to a BLAS, operands that
/// gemm_operand rejects, tiny products (coefficient-based), a single row or column
/// (matrix-vector), an empty inner dimension, products that Eigen may split over its own threads
/// (Eigen::nbThreads() > 1: outside the library's regions, which set it to 1, with OpenMP on),
/// and every product with an Eigen other than 3.4.
template <class Dst, class Lhs, class Rhs>
void gemm_into(Dst&& dst, const Lhs& lhs, const Rhs& rhs, bool accumulate = false) {
  const auto eigen_product = [&] {
    if (accumulate)
      dst.noalias() += lhs * rhs;
    else
      dst.noalias() = lhs * rhs;
  };
#if EIGEN_WORLD_VERSION == 3 && EIGEN_MAJOR_VERSION == 4
  using D = std::decay_t<Dst>;
  using T = typename D::Scalar;
  if constexpr (blas_products<T> ||
                !(gemm_operand<D, T> && gemm_operand<Lhs, T> && gemm_operand<Rhs, T>)) {
    eigen_product();
  } else {
    const Index m = dst.rows(), n = dst.cols(), k = lhs.cols();
    eigen_assert(lhs.rows() == m && rhs.rows() == k && rhs.cols() == n);
    // Eigen's dispatch (GeneralMatrixMatrix.h and GeneralProduct.h, 3.4).
    if ((k + m + n < EIGEN_GEMM_TO_COEFFBASED_THRESHOLD && k > 0) || m <= 1 || n <= 1 || k == 0 ||
        Eigen::nbThreads() > 1) {
      eigen_product();
      return;
    }
    constexpr int DstOrder =
        (int(D::Flags) & Eigen::RowMajorBit) ? Eigen::RowMajor : Eigen::ColMajor;
    constexpr int LhsOrder =
        (int(Lhs::Flags) & Eigen::RowMajorBit) ? Eigen::RowMajor : Eigen::ColMajor;
    constexpr int RhsOrder =
        (int(Rhs::Flags) & Eigen::RowMajorBit) ? Eigen::RowMajor : Eigen::ColMajor;
    if (!accumulate) dst.setZero();
    KeptGemmBlocking<DstOrder, T> blocking(m, n, k);
    Eigen::internal::general_matrix_matrix_product<Index, T, LhsOrder, false, T, RhsOrder, false,
                                                   DstOrder, 1>::run(m, n, k, lhs.data(),
                                                                     lhs.outerStride(), rhs.data(),
                                                                     rhs.outerStride(), dst.data(),
                                                                     1, dst.outerStride(), T(1),
                                                                     blocking, nullptr);
  }
#else
  eigen_product();
#endif
}

}  // namespace detail
}  // namespace retention
