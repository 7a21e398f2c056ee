// retention: register-blocked micro-kernels shared by MaSA and MaSAD (docs/math.md §4).
//
// MaSAD's row and column attentions are many small products ([W, dk] x [dk, W], then [W, W] x [W,
// dv]); MaSA's streaming tiles are a few larger ones. Eigen's GEMM packs both operands on every
// call, which costs as much as the work itself at these sizes. These kernels instead read operands
// already laid out for them (keys transposed, rows zero-padded), keep a block of rows x one vector
// of accumulators in registers, and fuse what surrounds each product: the log-weight tile is the
// accumulators' initial value, and the online-softmax rescale of the output is applied on load.
//
// Every kernel here is a template over the instruction set (detail/simd/dispatch.hpp) meant to be
// inlined into a dispatched kernel of the drivers, which calls them once per tile or line.
#pragma once

#include <retention/core.hpp>
#include <retention/detail/simd/block.hpp>
#include <retention/detail/simd/dispatch.hpp>
#include <retention/detail/simd/transpose.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace retention {
namespace detail {

/// Rounds n up to a multiple of m.
constexpr Index masa_round_up(Index n, Index m) { return (n + m - 1) / m * m; }

/// S[i, j] = la[i][j] + lb[i][j] + sum_c q[i, c] kt[c, j] for i < rows, j < cols rounded up to
/// whole vectors of Isa: the logit tile Q K^T plus the log-weight tile ln D, read through one or
/// two row pointers per query row (lb == nullptr: la alone). q [rows, dk] (row stride ldq), kt =
/// K^T [dk, ..] (row stride ldk), S [rows, ..] (row stride lds); rows a multiple of
/// simd::layout_rows. Columns past `cols` come out -inf (they weigh 0 in a softmax). With
/// row_max != nullptr also writes row_max[i] = max_j S[i, j], saving a pass over S.
template <class Isa, class T>
[[gnu::always_inline]] inline void masa_logits_isa(const T* q, Index ldq, const T* kt, Index ldk,
                                                   Index dk, const T* const* la, const T* const* lb,
                                                   T* s, Index lds, Index rows, Index cols,
                                                   T* row_max) {
  constexpr int N = simd::lanes<T, Isa>;
  constexpr int R = simd::Blocking<T, Isa>::rows(1, simd::layout_rows);
  using V = simd::Vec<T, N>;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const Index cols_n = masa_round_up(cols, N);
  // Added to the last vector: 0 on the valid lanes, -inf on the padding ones.
  T tail_lanes[N];
  for (Index l = 0; l < N; ++l) tail_lanes[l] = cols_n - N + l < cols ? T(0) : neg_inf;
  const V tail = simd::load<N>(tail_lanes);
  for (Index i0 = 0; i0 < rows; i0 += R) {
    const T* qb = q + i0 * ldq;
    V mx[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) mx[r] = simd::splat<N>(neg_inf);
    for (Index j0 = 0; j0 < cols_n; j0 += N) {
      simd::Block<T, N, R, 1> b;
      if (lb) {
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r)
          b.acc[r][0] = simd::load<N>(la[i0 + r] + j0) + simd::load<N>(lb[i0 + r] + j0);
      } else {
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) b.acc[r][0] = simd::load<N>(la[i0 + r] + j0);
      }
      b.madd(qb, ldq, 1, kt + j0, ldk, dk);
      if (j0 + N > cols) {
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) b.acc[r][0] += tail;
      }
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) mx[r] = simd::vmax<N, T>(mx[r], b.acc[r][0]);
      b.store(s + i0 * lds + j0, lds);
    }
    if (row_max)
      for (int r = 0; r < R; ++r) row_max[i0 + r] = simd::hmax<N, T>(mx[r]);
  }
}

/// R rows x NP vectors of masa_attend_isa (scale: the block's rows, or nullptr).
template <class Isa, class T, int R, int NP>
[[gnu::always_inline]] inline void masa_attend_block(const T* pb, Index ldp, const T* v, Index ldv,
                                                     Index cols, const T* scale, T* ab, Index lda) {
  constexpr int N = simd::lanes<T, Isa>;
  simd::Block<T, N, R, NP> b;
  if (scale)
    b.load_row_scaled(ab, lda, scale);
  else
    b.set_zero();
  b.madd(pb, ldp, 1, v, ldv, cols);
  b.store(ab, lda);
}

/// acc[i, :] = scale[i] acc[i, :] + sum_{j < cols} p[i, j] v[j, :] for i < rows, over dv columns
/// rounded up to whole vectors of Isa (scale == nullptr: acc starts at 0). p [rows, cols] (row
/// stride ldp), v [cols, ..] (row stride ldv), acc [rows, ..] (row stride lda); rows a multiple of
/// simd::layout_rows, v and acc readable to dv rounded up to simd::max_lanes<T>. The rescale is
/// MaSA's online-softmax correction exp(old max - new max), folded into the load.
template <class Isa, class T>
[[gnu::always_inline]] inline void masa_attend_isa(const T* p, Index ldp, const T* v, Index ldv,
                                                   Index cols, const T* scale, T* acc, Index lda,
                                                   Index rows, Index dv) {
  constexpr int N = simd::lanes<T, Isa>;
  // Blocks of two vectors of dv (a last one of one): each broadcast of p serves two vectors.
  constexpr int R = simd::Blocking<T, Isa>::rows(2, simd::layout_rows);
  const Index dvn = masa_round_up(dv, N);
  for (Index i0 = 0; i0 < rows; i0 += R) {
    const T* pb = p + i0 * ldp;
    const T* sc = scale ? scale + i0 : nullptr;
    Index d0 = 0;
    for (; d0 + 2 * N <= dvn; d0 += 2 * N)
      masa_attend_block<Isa, T, R, 2>(pb, ldp, v + d0, ldv, cols, sc, acc + i0 * lda + d0, lda);
    if (d0 < dvn)
      masa_attend_block<Isa, T, R, 1>(pb, ldp, v + d0, ldv, cols, sc, acc + i0 * lda + d0, lda);
  }
}

/// s[j] = exp(s[j] - m) for j < n in place (m >= every s[j], finite; n a multiple of Isa's vector
/// lanes); returns the sum. exp(-inf) = 0, a NaN stays NaN (simd::exp_nonpositive).
template <class Isa, class T>
[[gnu::always_inline]] inline T masa_exp_sum_isa(T* s, Index n, T m) {
  constexpr int N = simd::lanes<T, Isa>;
  using V = simd::Vec<T, N>;
  const V vm = simd::splat<N>(m);
  V acc0 = simd::splat<N>(T(0)), acc1 = acc0;
  Index j = 0;
  // Two independent chains: the exp polynomial's latency overlaps across them.
  for (; j + 2 * N <= n; j += 2 * N) {
    V e0, e1;
    simd::exp_nonpositive<N, T>(e0, simd::load<N>(s + j) - vm);
    simd::exp_nonpositive<N, T>(e1, simd::load<N>(s + j + N) - vm);
    simd::store(s + j, e0);
    simd::store(s + j + N, e1);
    acc0 += e0;
    acc1 += e1;
  }
  for (; j < n; j += N) {
    V e;
    simd::exp_nonpositive<N, T>(e, simd::load<N>(s + j) - vm);
    simd::store(s + j, e);
    acc0 += e;
  }
  acc0 += acc1;
  return simd::hsum<N, T>(acc0);
}

/// Whether n contiguous values are all finite, with Isa's vectors (masa_all_finite's rule).
template <class Isa, class T>
[[gnu::always_inline]] inline bool masa_all_finite_isa(const T* x, Index n) {
  constexpr int N = simd::lanes<T, Isa>;
  using V = simd::Vec<T, N>;
  V acc = simd::splat<N>(T(0));
  Index i = 0;
  for (; i + N <= n; i += N) acc += simd::load<N>(x + i) * T(0);
  T s = simd::hsum<N, T>(acc);
  for (; i < n; ++i) s += x[i] * T(0);
  return s == s;
}

/// Whether n contiguous values are all finite: x * 0 is 0 for a finite x and NaN for Inf or NaN,
/// and a sum of them vectorises (no reassociation can change whether it is NaN). The kernels above
/// meet masked entries as -inf + q.k and 0 * v, which a non-finite k or v turns into NaN: MaSA's
/// drivers scan their inputs with this and take their careful path when it fails, MaSAD's lines
/// check their outputs (docs/math.md §2.6).
template <class T>
bool masa_all_finite(const T* x, Index n) {
  const T s = (Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>(x, n) * T(0)).sum();
  return s == s;
}

/// masa_all_finite over `rows` rows of `cols` values, `ld` apart.
template <class T>
bool masa_rows_finite(const T* x, Index ld, Index rows, Index cols) {
  if (ld == cols || rows == 1) return masa_all_finite(x, rows * cols);
  const Eigen::Map<const Matrix<T>, 0, Eigen::OuterStride<>> m(x, rows, cols,
                                                               Eigen::OuterStride<>(ld));
  const T s = (m.array() * T(0)).sum();
  return s == s;
}

/// Copies `rows` rows of x (row stride ldx, `cols` columns) into dst [.., ld] and zero-fills its
/// remaining columns up to ld: the padded operand layout the kernels read.
template <class T>
inline void masa_copy_rows(const T* x, Index ldx, Index rows, Index cols, T* dst, Index ld) {
  for (Index i = 0; i < rows; ++i) {
    std::copy(x + i * ldx, x + i * ldx + cols, dst + i * ld);
    std::fill(dst + i * ld + cols, dst + (i + 1) * ld, T(0));
  }
}

}  // namespace detail
}  // namespace retention

#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
