// retention: register-blocked micro-kernels of the chunkwise form (docs/math.md §2).
//
// One chunk of the chunkwise form is three small products (C = 32..64 rows against dk, dv of about
// 128): the score tile Q_i K_i^T, the output (Q_i K_i^T (.) D) V_i + diag(gamma^(j+1)) Q_i S, and
// the state update gamma^L S + K~_i^T V_i. Eigen's GEMM packs both operands on every call, which at
// these sizes costs a large share of the work. These kernels instead keep a block of rows x a few
// SIMD packets of accumulators in registers and read operands where they lie (strided token rows,
// the row-major state), with what surrounds each product fused into it: the decay mask is applied
// to the score tile as it leaves the registers, the score tile is skipped above the diagonal
// (causal), the query factor and the output normalisation are row scales of the accumulators, and
// gamma^L S is the state accumulators' initial value.
#pragma once

#include <retention/core.hpp>
#include <retention/detail/simd/transpose.hpp>

#include <algorithm>
#include <type_traits>

namespace retention {
namespace detail {

/// Block sizes: `rows` rows x `packets` SIMD packets of `width` lanes = 16 accumulators, enough
/// to hide the FMA latency on two FMA ports while the loads (packets + row broadcasts per step)
/// stay below the FMA count.
template <class T>
struct ChunkKernelShape {
  static constexpr int simd = Eigen::internal::packet_traits<T>::size;
  static constexpr int width = simd > 1 ? simd : 4;
  static constexpr int rows = 8;
  static constexpr int packets = 2;
};

template <int N>
using ChunkInt = std::integral_constant<int, N>;

/// A rows R x NP packets of W lanes block of accumulators; every loop has compile-time bounds so
/// that the block lives in registers.
template <class T, int W, int R, int NP>
struct ChunkAccumulators {
  using Pk = Eigen::Array<T, W, 1>;
  using CMap = Eigen::Map<const Pk>;
  using MapPk = Eigen::Map<Pk>;
  Pk acc[R][NP];

  EIGEN_ALWAYS_INLINE void set_zero() {
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < NP; ++p) acc[r][p].setZero();
  }
  /// acc = beta * c[r, :] (row stride ldc).
  EIGEN_ALWAYS_INLINE void load_scaled(const T* c, Index ldc, T beta) {
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < NP; ++p) acc[r][p] = beta * CMap(c + r * ldc + p * W);
  }
  /// acc[r, :] += sum_{k < n} a[r * ars + k * aks] b[k * ldb + :]: rows of a broadcast against
  /// packets of b's rows.
  EIGEN_ALWAYS_INLINE void madd(const T* a, Index ars, Index aks, const T* b, Index ldb, Index n) {
    for (Index k = 0; k < n; ++k) {
      Pk bk[NP];
      for (int p = 0; p < NP; ++p) bk[p] = CMap(b + k * ldb + p * W);
      const T* ak = a + k * aks;
      for (int r = 0; r < R; ++r) {
        const T ar = ak[r * ars];
        for (int p = 0; p < NP; ++p) acc[r][p] += ar * bk[p];
      }
    }
  }
  /// acc[r, :] *= s[r].
  EIGEN_ALWAYS_INLINE void scale_rows(const T* s) {
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < NP; ++p) acc[r][p] *= s[r];
  }
  EIGEN_ALWAYS_INLINE void store(T* c, Index ldc) const {
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < NP; ++p) MapPk(c + r * ldc + p * W) = acc[r][p];
  }
};

/// Calls body(ChunkInt<W>, ChunkInt<NP>, j) over columns [0, n) in blocks of NP packets of W
/// lanes: whole blocks of ChunkKernelShape::packets packets first, then single packets, then
/// halving widths down to one lane for a ragged end (dv = 33 ends in one scalar column).
template <int W, class Body>
EIGEN_STRONG_INLINE void chunk_column_tail(Index n, Index j, Body& body) {
  // n - j < 2 W here: at most one block of each width W, W / 2, .., 1.
  if (j + W <= n) {
    body(ChunkInt<W>(), ChunkInt<1>(), j);
    j += W;
  }
  if constexpr (W > 1) chunk_column_tail<W / 2>(n, j, body);
}

template <class T, class Body>
EIGEN_STRONG_INLINE void chunk_for_columns(Index n, Body&& body) {
  constexpr int P = ChunkKernelShape<T>::width, NP = ChunkKernelShape<T>::packets;
  Index j = 0;
  for (; j + NP * P <= n; j += NP * P) body(ChunkInt<P>(), ChunkInt<NP>(), j);
  for (; j + P <= n; j += P) body(ChunkInt<P>(), ChunkInt<1>(), j);
  if constexpr (P > 1) chunk_column_tail<P / 2>(n, j, body);
}

/// Calls body(ChunkInt<R>, i) over rows [0, m): blocks of ChunkKernelShape::rows rows, then
/// single rows.
template <class T, class Body>
EIGEN_STRONG_INLINE void chunk_for_rows(Index m, Body&& body) {
  constexpr int R = ChunkKernelShape<T>::rows;
  Index i = 0;
  for (; i + R <= m; i += R) body(ChunkInt<R>(), i);
  for (; i < m; ++i) body(ChunkInt<1>(), i);
}

/// Brings the next chunk's token rows into the caches while this chunk computes, a few cache lines
/// per kernel block. In the multi-head layout [B, T, H, D] consecutive rows of a head lie one page
/// apart (4 KiB for 8 heads of 128 floats), so the hardware's streaming prefetch, which stays
/// within a page, hardly helps, and a core keeps only a handful of misses in flight. Issuing all of
/// a chunk's prefetches at once stalls the core on line-fill buffers; spread over the blocks they
/// overlap with the arithmetic (bench/results/design-measurements.md).
template <class T>
class ChunkPrefetcher {
 public:
  /// Forgets all ranges (start of a chunk).
  void clear() {
    count_ = 0;
    range_ = 0;
    row_ = 0;
    col_ = 0;
    lines_ = 0;
  }
  /// Adds rows [0, rows) x columns [0, cols) of x (row stride ld); write: the rows will be stored.
  void add(const T* x, Index ld, Index rows, Index cols, bool write) {
    if (count_ == kMaxRanges || rows <= 0) return;
    ranges_[count_++] = Range{x, ld, rows, cols, write};
    lines_ += rows * ((cols + kLine - 1) / kLine);
  }
  /// Spreads the lines added so far evenly over `work` units of step() (kernel reduction steps).
  void plan(Index work) {
    work_ = std::max<Index>(work, 1);
    credit_ = 0;
  }
  /// Called before `work` units of arithmetic: issues the matching share of the prefetches.
  inline void step(Index work) {
    credit_ += work * lines_;
    while (credit_ >= work_ && range_ < count_) {
      credit_ -= work_;
      const Range& r = ranges_[range_];
      issue(r.x + row_ * r.ld + col_, r.write);
      col_ += kLine;
      if (col_ >= r.cols) {
        col_ = 0;
        if (++row_ == r.rows) {
          row_ = 0;
          ++range_;
        }
      }
    }
  }

 private:
  static constexpr int kMaxRanges = 4;
  static constexpr Index kLine = 64 / static_cast<Index>(sizeof(T));
  struct Range {
    const T* x;
    Index ld, rows, cols;
    bool write;
  };
  static EIGEN_STRONG_INLINE void issue(const T* p, bool write) {
#if defined(__GNUC__) || defined(__clang__)
    if (write)
      __builtin_prefetch(p, 1, 3);
    else
      __builtin_prefetch(p, 0, 3);
#else
    (void)p, (void)write;
#endif
  }
  Range ranges_[kMaxRanges] = {};
  int count_ = 0, range_ = 0;
  Index row_ = 0, col_ = 0, lines_ = 0, work_ = 1, credit_ = 0;
};

/// The masked score tile of one chunk: A[i, j] = D[i, j] sum_c q[i, c] kt[c, j] for i < rows and
/// j below the causal limit of i's row block (the rest of A is never read, and stays as it was).
/// q [rows, dk] (row stride ldq), kt = K_i^T [dk, ld] (zero or finite beyond the chunk's keys), d
/// and a [.., ld] with ld a multiple of ChunkKernelShape<T>::width; d is 0 above the diagonal. With
/// row_sum != nullptr also writes row_sum[i] = sum_j A[i, j] (decay_and_score's r without the
/// state part). The mask is applied by multiplication, so the chunk's keys must be finite (0 x Inf
/// = NaN would reach earlier rows); chunkwise_same_type sends chunks holding an Inf or NaN down an
/// exact path instead.
template <class T>
void chunk_scores(const T* q, Index ldq, const T* kt, const T* d, T* a, Index ld, Index rows,
                  Index dk, T* row_sum) {
  constexpr int P = ChunkKernelShape<T>::width;
  chunk_for_rows<T>(rows, [&](auto r_tag, Index i0) {
    constexpr int R = decltype(r_tag)::value;
    // Columns [0, i0 + R) hold every key at or before the block's last query.
    const Index jend = std::min(i0 + R, rows);
    T sums[R];
    for (int r = 0; r < R; ++r) sums[r] = T(0);
    auto block = [&](auto np_tag, Index j0) {
      constexpr int NP = decltype(np_tag)::value;
      ChunkAccumulators<T, P, R, NP> acc;
      acc.set_zero();
      acc.madd(q + i0 * ldq, ldq, 1, kt + j0, ld, dk);
      using CMap = typename ChunkAccumulators<T, P, R, NP>::CMap;
      for (int r = 0; r < R; ++r)
        for (int p = 0; p < NP; ++p) {
          acc.acc[r][p] *= CMap(d + (i0 + r) * ld + j0 + p * P);
          if (row_sum) sums[r] += acc.acc[r][p].sum();
        }
      acc.store(a + i0 * ld + j0, ld);
    };
    constexpr int NPmax = ChunkKernelShape<T>::packets;
    Index j0 = 0;
    for (; j0 + NPmax * P <= jend; j0 += NPmax * P) block(ChunkInt<NPmax>(), j0);
    for (; j0 < jend; j0 += P) block(ChunkInt<1>(), j0);
    if (row_sum)
      for (int r = 0; r < R; ++r) row_sum[i0 + r] = sums[r];
  });
}

/// Columns [j0, j0 + W NP) of one chunk's output rows:
/// O[i, :] = norm[i] (qf[i] sum_c q[i, c] S[c, :] + sum_{j <= i} A[i, j] v[j, :]), i < rows.
/// q [rows, dk] (ldq), s [dk, ..] (lds; not read when qf == nullptr: zero state), a [rows, lda]
/// (the score tile, read below the causal limit only), v [rows, ..] (ldv), o (ldo); norm ==
/// nullptr: no normalisation. Each row block first calls prefetcher.step(its reduction length).
/// A row block reads the values of keys up to its last row, weighted by zero scores above the
/// diagonal: finite values only (see chunk_scores).
template <class T, int W, int NP>
void chunk_output_columns(const T* q, Index ldq, const T* s, Index lds, const T* qf, const T* a,
                          Index lda, const T* v, Index ldv, const T* norm, T* o, Index ldo,
                          Index rows, Index dk, Index j0, ChunkPrefetcher<T>& prefetcher) {
  chunk_for_rows<T>(rows, [&](auto r_tag, Index i0) {
    constexpr int R = decltype(r_tag)::value;
    const Index jend = std::min(i0 + R, rows);
    prefetcher.step((qf ? dk : 0) + jend);
    ChunkAccumulators<T, W, R, NP> acc;
    acc.set_zero();
    if (qf) {
      acc.madd(q + i0 * ldq, ldq, 1, s + j0, lds, dk);
      acc.scale_rows(qf + i0);
    }
    acc.madd(a + i0 * lda, lda, 1, v + j0, ldv, jend);
    if (norm) acc.scale_rows(norm + i0);
    acc.store(o + i0 * ldo + j0, ldo);
  });
}

/// Columns [j0, j0 + W NP) of the state update S = beta S + kw^T v over its dk rows: kw = key
/// rows scaled by gamma^(L-1-l) [rows, dk] (ldkw), v [rows, ..] (ldv), s [dk, ..] (lds);
/// zero_state: S starts at 0 (beta unused). Each row block first calls prefetcher.step(its
/// reduction length).
template <class T, int W, int NP>
void chunk_state_columns(const T* kw, Index ldkw, const T* v, Index ldv, T* s, Index lds, T beta,
                         bool zero_state, Index rows, Index dk, Index j0,
                         ChunkPrefetcher<T>& prefetcher) {
  chunk_for_rows<T>(dk, [&](auto r_tag, Index c0) {
    constexpr int R = decltype(r_tag)::value;
    prefetcher.step(rows);
    ChunkAccumulators<T, W, R, NP> acc;
    if (zero_state)
      acc.set_zero();
    else
      acc.load_scaled(s + c0 * lds + j0, lds, beta);
    acc.madd(kw + c0, 1, ldkw, v + j0, ldv, rows);
    acc.store(s + c0 * lds + j0, lds);
  });
}

}  // namespace detail
}  // namespace retention
