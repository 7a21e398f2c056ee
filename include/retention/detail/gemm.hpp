// retention::detail: matrix products through Eigen's own GEMM, with packing buffers the thread
// keeps instead of the two that Eigen allocates and frees in every product.
#pragma once

#include <retention/detail/scratch.hpp>

#include <algorithm>
#include <type_traits>
#include <vector>

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

/// A weight W [out, in] (row-major, torch's layout) packed once the way Eigen's GEMM packs the
/// left operand of y^T = W x^T, which is how Eigen evaluates y = x W^T for a row-major y: panels
/// of Traits::mr outputs, in blocks of kc inputs (the depth blocking Eigen computes from `in`
/// alone) and mc outputs. product() then runs Eigen's block-panel kernel on it without packing the
/// weight again, which a product of few rows spends much of its time on. Empty (and every product
/// Eigen's own) with an Eigen other than 3.4 or when products go to a BLAS.
template <class T>
class PackedWeight {
 public:
  /// Outputs a split may start or end at (multiples of it, or the last output) without falling
  /// back to Eigen's product for a ragged panel.
  static Index granule() {
#if EIGEN_WORLD_VERSION == 3 && EIGEN_MAJOR_VERSION == 4
    return Traits::mr;
#else
    return 1;
#endif
  }

  bool empty() const { return out_ == 0; }
  void clear() {
    out_ = in_ = kc_ = mc_ = k_blocks_ = 0;
    Storage().swap(data_);
    std::vector<Index>().swap(offsets_);
  }

  /// Packs W (row-major [out, in]); a no-op where products cannot use a packed weight.
  void pack(const Matrix<T>& W) {
    clear();
#if EIGEN_WORLD_VERSION == 3 && EIGEN_MAJOR_VERSION == 4
    if constexpr (!blas_products<T>) {
      const Index out = W.rows(), in = W.cols();
      if (out == 0 || in == 0) return;
      out_ = out;
      in_ = in;
      // Eigen's blocking for this weight; kc depends on `in` only, mc only places the blocks.
      Eigen::internal::gemm_blocking_space<Eigen::ColMajor, T, T, Eigen::Dynamic, Eigen::Dynamic,
                                           Eigen::Dynamic, 1, false>
          blocking(out, out, in, 1, true);
      kc_ = std::min(in, blocking.kc());
      mc_ = std::min(out, blocking.mc());
      if (mc_ > Traits::mr) mc_ -= mc_ % Traits::mr;
      // Each block starts on a 64-byte line: the packing stores aligned packets.
      constexpr Index line = 64 / static_cast<Index>(sizeof(T));
      k_blocks_ = (in + kc_ - 1) / kc_;
      Index size = 0;
      for (Index i2 = 0; i2 < out; i2 += mc_)
        for (Index k2 = 0; k2 < in; k2 += kc_) {
          offsets_.push_back(size);
          size += ((std::min(i2 + mc_, out) - i2) * (std::min(k2 + kc_, in) - k2) + line - 1) /
                  line * line;
        }
      data_.resize(static_cast<std::size_t>(size));
      Eigen::internal::gemm_pack_lhs<T, Index, LhsMapper, Traits::mr, Traits::LhsProgress,
                                     typename Traits::LhsPacket4Packing, Eigen::RowMajor>
          pack_lhs;
      const LhsMapper lhs(W.data(), in);
      for (Index i2 = 0; i2 < out; i2 += mc_) {
        const Index amc = std::min(i2 + mc_, out) - i2;
        for (Index k2 = 0; k2 < in; k2 += kc_)
          pack_lhs(data_.data() + block_offset(i2, k2), lhs.getSubMapper(i2, k2),
                   std::min(k2 + kc_, in) - k2, amc);
      }
    }
#else
    (void)W;
#endif
  }

  /// Whether product() can take x [m, in] and y [m, out] (both row-major with unit inner stride,
  /// direct access, sizes known at run time): otherwise the caller runs Eigen's product.
  template <class X, class Y>
  static constexpr bool accepts() {
    return gemm_operand<X, T> && gemm_operand<Y, T> && (int(X::Flags) & Eigen::RowMajorBit) != 0 &&
           (int(Y::Flags) & Eigen::RowMajorBit) != 0;
  }

  /// y.middleCols(c0, n) = x W[c0 : c0 + n]^T from the packed panels, c0 and c0 + n at multiples
  /// of granule() (or c0 + n = out); `y` is the whole [m, out] output. Returns false, writing
  /// nothing, where Eigen would not run a blocked GEMM (one row, tiny products, Eigen's own
  /// threads): the caller runs Eigen's product then, as before.
  template <class X, class Y>
  bool product(const X& x, Y& y, Index c0, Index n) const {
#if EIGEN_WORLD_VERSION == 3 && EIGEN_MAJOR_VERSION == 4
    if constexpr (accepts<X, Y>()) {
      const Index m = x.rows();
      eigen_assert(!empty() && x.cols() == in_ && y.rows() == m && y.cols() == out_);
      eigen_assert(c0 % Traits::mr == 0 && ((c0 + n) % Traits::mr == 0 || c0 + n == out_));
      if (n == 0) return true;
      if (m <= 1 || in_ + m + n < EIGEN_GEMM_TO_COEFFBASED_THRESHOLD || Eigen::nbThreads() > 1)
        return false;
      Eigen::internal::gemm_blocking_space<Eigen::ColMajor, T, T, Eigen::Dynamic, Eigen::Dynamic,
                                           Eigen::Dynamic, 1, false>
          blocking(n, m, in_, 1, true);
      const Index nc = std::min(m, std::max<Index>(blocking.nc(), Traits::nr));
      ThreadScratch<T, PackedWeightRhsTag> rhs_buffer(in_ * nc);
      T* const packed_rhs = rhs_buffer.data();
      Eigen::internal::gemm_pack_rhs<T, Index, RhsMapper, Traits::nr, Eigen::ColMajor> pack_rhs;
      Eigen::internal::gebp_kernel<T, T, Index, ResMapper, Traits::mr, Traits::nr, false, false>
          gebp;
      const RhsMapper rhs(x.data(), x.outerStride());
      const ResMapper res(y.data(), y.outerStride());
      const Index c1 = c0 + n;
      for (Index j = 0; j < m; ++j) y.row(j).segment(c0, n).setZero();
      for (Index j2 = 0; j2 < m; j2 += nc) {
        const Index anc = std::min(j2 + nc, m) - j2;
        // x's rows [j2, j2 + anc) for every depth block, packed once for all outputs.
        for (Index k2 = 0; k2 < in_; k2 += kc_)
          pack_rhs(packed_rhs + k2 * anc, rhs.getSubMapper(k2, j2), std::min(k2 + kc_, in_) - k2,
                   anc);
        for (Index i2 = c0 / mc_ * mc_; i2 < c1; i2 += mc_) {
          const Index amc = std::min(i2 + mc_, out_) - i2;
          const Index r0 = std::max(c0, i2), r1 = std::min(c1, i2 + amc);
          for (Index k2 = 0; k2 < in_; k2 += kc_) {
            const Index akc = std::min(k2 + kc_, in_) - k2;
            // Panels of mr outputs lie one after another in a block: rows r0 - i2 (a multiple of
            // mr) start (r0 - i2) * akc into it.
            gebp(res.getSubMapper(r0, j2), data_.data() + block_offset(i2, k2) + (r0 - i2) * akc,
                 packed_rhs + k2 * anc, r1 - r0, akc, anc, T(1));
          }
        }
      }
      return true;
    }
#endif
    (void)x, (void)y, (void)c0, (void)n;
    return false;
  }

 private:
  using Storage = std::vector<T, Eigen::aligned_allocator<T>>;
  struct PackedWeightRhsTag {};
#if EIGEN_WORLD_VERSION == 3 && EIGEN_MAJOR_VERSION == 4
  using Traits = Eigen::internal::gebp_traits<T, T>;
  using LhsMapper = Eigen::internal::const_blas_data_mapper<T, Index, Eigen::RowMajor>;
  using RhsMapper = Eigen::internal::const_blas_data_mapper<T, Index, Eigen::ColMajor>;
  using ResMapper =
      Eigen::internal::blas_data_mapper<T, Index, Eigen::ColMajor, Eigen::Unaligned, 1>;
#endif
  /// Where block (i2, k2) starts in data_ (one entry per block of mc_ outputs and kc_ inputs).
  Index block_offset(Index i2, Index k2) const {
    return offsets_[static_cast<std::size_t>(i2 / mc_ * k_blocks_ + k2 / kc_)];
  }

  Storage data_;
  std::vector<Index> offsets_;
  Index out_ = 0, in_ = 0, kc_ = 0, mc_ = 0, k_blocks_ = 0;
};

/// Eigen 3.4's block-panel kernel on operands the caller packs once and reuses (the parallel form
/// packs a head's keys and values once per call, where Eigen's product packs them again for every
/// query block). C [rows, cols] (column-major, leading dimension ldc) += A B, with Eigen's packed
/// layouts: B packed over its whole depth as the right operand; A one left panel of panel_rows()
/// rows, which for those heights is an ordinary column-major block (rows x depth, leading
/// dimension rows), so a product can write a left operand directly. `available` is false (and
/// the callers keep Eigen's product) with another Eigen, when products go to a BLAS, where the
/// kernel's column panels are not of 4, and on processors other than x86 and Arm, where Eigen may
/// bring kernels with packed layouts of their own (POWER's MMA kernels).
template <class T>
struct BlockPanel {
#if EIGEN_WORLD_VERSION == 3 && EIGEN_MAJOR_VERSION == 4 &&                                 \
    (defined(__x86_64__) || defined(__i386__) || defined(_M_X64) || defined(__aarch64__) || \
     defined(__arm__))
  using Traits = Eigen::internal::gebp_traits<T, T>;
  static constexpr bool available = !blas_products<T> && Traits::nr == 4;
  /// Columns of B per packed panel: a column range starting at a multiple of it can be read from
  /// a packing of more columns.
  static constexpr Index nr = Traits::nr;

  /// Height of the next left panel with `rows` rows left: three, two or one packets (as the kernel
  /// peels them) or a single row.
  static Index panel_rows(Index rows) {
    constexpr Index p = Traits::LhsProgress;
    if (Traits::mr >= 3 * p && rows >= 3 * p) return 3 * p;
    if (Traits::mr >= 2 * p && rows >= 2 * p) return 2 * p;
    return rows >= p ? p : 1;
  }
  /// B = X^T for X [cols, depth] (row-major, row stride `stride`): cols * depth values.
  static void pack_rhs_transposed(T* dst, const T* X, Index stride, Index cols, Index depth) {
    using Mapper = Eigen::internal::const_blas_data_mapper<T, Index, Eigen::ColMajor>;
    Eigen::internal::gemm_pack_rhs<T, Index, Mapper, Traits::nr, Eigen::ColMajor> pack;
    pack(dst, Mapper(X, stride), depth, cols);
  }
  /// B = X for X [depth, cols] (row-major): depth * cols values. Packed in slabs of rows (Eigen's
  /// panel mode) so that rows far apart (a head of a wider buffer) are read a few at a time.
  static void pack_rhs(T* dst, const T* X, Index stride, Index depth, Index cols) {
    using Mapper = Eigen::internal::const_blas_data_mapper<T, Index, Eigen::RowMajor>;
    Eigen::internal::gemm_pack_rhs<T, Index, Mapper, Traits::nr, Eigen::RowMajor, false, true> pack;
    constexpr Index slab = 64;
    const Mapper rows(X, stride);
    for (Index k0 = 0; k0 < depth; k0 += slab)
      pack(dst, rows.getSubMapper(k0, 0), std::min(slab, depth - k0), cols, depth, k0);
  }
  /// One left panel from X [rows, depth] (row-major), rows = panel_rows(...): rows * depth values.
  static void pack_lhs_panel(T* dst, const T* X, Index stride, Index rows, Index depth) {
    using Mapper = Eigen::internal::const_blas_data_mapper<T, Index, Eigen::RowMajor>;
    Eigen::internal::gemm_pack_lhs<T, Index, Mapper, Traits::mr, Traits::LhsProgress,
                                   typename Traits::LhsPacket4Packing, Eigen::RowMajor>
        pack;
    pack(dst, Mapper(X, stride), depth, rows);
  }
  /// C += A[:, offsetA : offsetA + depth] B[offsetB : offsetB + depth, :], A one left panel of
  /// `rows` rows packed over strideA columns (at a 64-byte boundary), B packed over strideB rows
  /// from its first column.
  static void product(T* C, Index ldc, const T* A, Index strideA, Index offsetA, const T* B,
                      Index strideB, Index offsetB, Index rows, Index depth, Index cols) {
    using ResMapper =
        Eigen::internal::blas_data_mapper<T, Index, Eigen::ColMajor, Eigen::Unaligned, 1>;
    Eigen::internal::gebp_kernel<T, T, Index, ResMapper, Traits::mr, Traits::nr, false, false> gebp;
    gebp(ResMapper(C, ldc), A, B, rows, depth, cols, T(1), strideA, strideB, offsetA, offsetB);
  }
  /// Eigen's depth blocking for a product of these sizes (how many rows of B one call reads).
  static Index depth_block(Index rows, Index cols, Index depth) {
    Eigen::internal::gemm_blocking_space<Eigen::ColMajor, T, T, Eigen::Dynamic, Eigen::Dynamic,
                                         Eigen::Dynamic, 1, false>
        blocking(rows, cols, depth, 1, true);
    return std::max<Index>(1, std::min(depth, blocking.kc()));
  }
#else
  static constexpr bool available = false;
#endif
};

}  // namespace detail
}  // namespace retention
