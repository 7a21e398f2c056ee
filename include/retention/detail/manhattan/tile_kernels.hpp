// retention: register-blocked micro-kernels shared by MaSA and MaSAD (docs/math.md §4).
//
// MaSAD's row and column attentions are many small products ([W, dk] x [dk, W], then [W, W] x [W,
// dv]); MaSA's streaming tiles are a few larger ones. Eigen's GEMM packs both operands on every
// call, which costs as much as the work itself at these sizes. These kernels instead read operands
// already laid out for them (keys transposed, rows zero-padded), keep a block of rows x one SIMD
// packet of accumulators in registers, and fuse what surrounds each product: the log-weight tile is
// the accumulators' initial value, and the online-softmax rescale of the output is applied on load.
#pragma once

#include <retention/core.hpp>
#include <retention/detail/simd/transpose.hpp>

#include <algorithm>
#include <cmath>
#include <limits>

namespace retention {
namespace detail {

/// Block sizes of the micro-kernels: `rows` output rows by one SIMD packet of `width` columns,
/// i.e. 8 independent accumulators, enough to keep both FMA ports busy over the FMA latency.
template <class T>
struct MasaKernelShape {
  static constexpr Index simd = Eigen::internal::packet_traits<T>::size;
  static constexpr Index width = simd > 1 ? simd : 4;
  static constexpr Index rows = 8;
};

/// Rounds n up to a multiple of m.
inline Index masa_round_up(Index n, Index m) { return (n + m - 1) / m * m; }

/// S[i, j] = init(i, j) + sum_c q[i, c] kt[c, j] for i < rows, j < cols_p: the logit tile Q K^T
/// plus the log-weight tile ln D, which init(i, j0) supplies one packet of columns [j0, j0 + width)
/// at a time. q [rows, dk] (row stride ldq), kt = K^T [dk, cols_p] (row stride ldk), S [rows,
/// cols_p] (row stride lds); rows a multiple of MasaKernelShape<T>::rows, cols_p the first multiple
/// of ::width >= cols. Columns [cols, cols_p) come out -inf (they weigh 0 in a softmax). With
/// row_max != nullptr also writes row_max[i] = max_j S[i, j], saving a pass over S.
template <class T, class Init>
void masa_logits_kernel(const T* q, Index ldq, const T* kt, Index ldk, Index dk, Init init, T* s,
                        Index lds, Index rows, Index cols, T* row_max = nullptr) {
  constexpr Index P = MasaKernelShape<T>::width, R = MasaKernelShape<T>::rows;
  using Pk = Eigen::Array<T, P, 1>;
  using CMap = Eigen::Map<const Pk>;
  const Index cols_p = masa_round_up(cols, P);
  // Added to the last packet: 0 on the valid lanes, -inf on the padding ones.
  Pk tail_mask = Pk::Zero();
  for (Index l = cols - (cols_p - P); l < P; ++l)
    tail_mask(l) = -std::numeric_limits<T>::infinity();
  for (Index i0 = 0; i0 < rows; i0 += R) {
    const T* qb = q + i0 * ldq;
    Pk mx[R];
    if (row_max)
      for (Index r = 0; r < R; ++r) mx[r].setConstant(-std::numeric_limits<T>::infinity());
    for (Index j0 = 0; j0 < cols_p; j0 += P) {
      Pk a0 = init(i0 + 0, j0), a1 = init(i0 + 1, j0), a2 = init(i0 + 2, j0), a3 = init(i0 + 3, j0);
      Pk a4 = init(i0 + 4, j0), a5 = init(i0 + 5, j0), a6 = init(i0 + 6, j0), a7 = init(i0 + 7, j0);
      for (Index c = 0; c < dk; ++c) {
        const Pk k = CMap(kt + c * ldk + j0);
        a0 += qb[0 * ldq + c] * k;
        a1 += qb[1 * ldq + c] * k;
        a2 += qb[2 * ldq + c] * k;
        a3 += qb[3 * ldq + c] * k;
        a4 += qb[4 * ldq + c] * k;
        a5 += qb[5 * ldq + c] * k;
        a6 += qb[6 * ldq + c] * k;
        a7 += qb[7 * ldq + c] * k;
      }
      if (j0 + P > cols) {
        a0 += tail_mask;
        a1 += tail_mask;
        a2 += tail_mask;
        a3 += tail_mask;
        a4 += tail_mask;
        a5 += tail_mask;
        a6 += tail_mask;
        a7 += tail_mask;
      }
      Eigen::Map<Pk>(s + (i0 + 0) * lds + j0) = a0;
      Eigen::Map<Pk>(s + (i0 + 1) * lds + j0) = a1;
      Eigen::Map<Pk>(s + (i0 + 2) * lds + j0) = a2;
      Eigen::Map<Pk>(s + (i0 + 3) * lds + j0) = a3;
      Eigen::Map<Pk>(s + (i0 + 4) * lds + j0) = a4;
      Eigen::Map<Pk>(s + (i0 + 5) * lds + j0) = a5;
      Eigen::Map<Pk>(s + (i0 + 6) * lds + j0) = a6;
      Eigen::Map<Pk>(s + (i0 + 7) * lds + j0) = a7;
      if (row_max) {
        mx[0] = mx[0].max(a0);
        mx[1] = mx[1].max(a1);
        mx[2] = mx[2].max(a2);
        mx[3] = mx[3].max(a3);
        mx[4] = mx[4].max(a4);
        mx[5] = mx[5].max(a5);
        mx[6] = mx[6].max(a6);
        mx[7] = mx[7].max(a7);
      }
    }
    if (row_max)
      for (Index r = 0; r < R; ++r) row_max[i0 + r] = mx[r].maxCoeff();
  }
}

/// acc[i, :] = scale[i] acc[i, :] + sum_{j < cols} p[i, j] v[j, :] for i < rows, over dvp columns
/// (scale == nullptr: acc starts at 0). p [rows, cols] (row stride ldp), v [cols, dvp] (row stride
/// ldv), acc [rows, dvp] (row stride lda); rows a multiple of MasaKernelShape<T>::rows, dvp of
/// ::width. The rescale is MaSA's online-softmax correction exp(old max - new max), folded into the
/// load.
template <class T>
void masa_attend_kernel(const T* p, Index ldp, const T* v, Index ldv, Index cols, const T* scale,
                        T* acc, Index lda, Index rows, Index dvp) {
  constexpr Index P = MasaKernelShape<T>::width, R = MasaKernelShape<T>::rows;
  using Pk = Eigen::Array<T, P, 1>;
  using CMap = Eigen::Map<const Pk>;
  for (Index i0 = 0; i0 < rows; i0 += R) {
    const T* pb = p + i0 * ldp;
    for (Index d0 = 0; d0 < dvp; d0 += P) {
      T* ab = acc + i0 * lda + d0;
      Pk a0, a1, a2, a3, a4, a5, a6, a7;
      if (scale) {
        const T* sc = scale + i0;
        a0 = sc[0] * CMap(ab + 0 * lda);
        a1 = sc[1] * CMap(ab + 1 * lda);
        a2 = sc[2] * CMap(ab + 2 * lda);
        a3 = sc[3] * CMap(ab + 3 * lda);
        a4 = sc[4] * CMap(ab + 4 * lda);
        a5 = sc[5] * CMap(ab + 5 * lda);
        a6 = sc[6] * CMap(ab + 6 * lda);
        a7 = sc[7] * CMap(ab + 7 * lda);
      } else {
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = Pk::Zero();
      }
      for (Index j = 0; j < cols; ++j) {
        const Pk w = CMap(v + j * ldv + d0);
        a0 += pb[0 * ldp + j] * w;
        a1 += pb[1 * ldp + j] * w;
        a2 += pb[2 * ldp + j] * w;
        a3 += pb[3 * ldp + j] * w;
        a4 += pb[4 * ldp + j] * w;
        a5 += pb[5 * ldp + j] * w;
        a6 += pb[6 * ldp + j] * w;
        a7 += pb[7 * ldp + j] * w;
      }
      Eigen::Map<Pk>(ab + 0 * lda) = a0;
      Eigen::Map<Pk>(ab + 1 * lda) = a1;
      Eigen::Map<Pk>(ab + 2 * lda) = a2;
      Eigen::Map<Pk>(ab + 3 * lda) = a3;
      Eigen::Map<Pk>(ab + 4 * lda) = a4;
      Eigen::Map<Pk>(ab + 5 * lda) = a5;
      Eigen::Map<Pk>(ab + 6 * lda) = a6;
      Eigen::Map<Pk>(ab + 7 * lda) = a7;
    }
  }
}

/// exp(x) for x <= 0 on one packet of floats: Cephes' polynomial (as Eigen's pexp, same accuracy)
/// with 2^n formed directly in the exponent bits. Eigen's generic ldexp guards against overflow and
/// denormal results that cannot occur here; dropping it makes the softmax's exp about twice as
/// fast. Arguments below -88 (including -inf) give exactly 0: they lie below float's normal range,
/// and the weight they stand for is below 1e-38 of the row's largest weight, which is 1. A NaN
/// argument stays NaN: Eigen's pmax(a, b) returns a when either is NaN (std::max's order).
template <class Packet>
EIGEN_STRONG_INLINE Packet masa_exp_nonpositive(const Packet& x_in) {
  using namespace Eigen::internal;
  const Packet x = pmax(x_in, pset1<Packet>(-88.0f));
  const Packet n = pfloor(pmadd(x, pset1<Packet>(1.44269504088896341f), pset1<Packet>(0.5f)));
  Packet r = pmadd(n, pset1<Packet>(-0.693359375f), x);
  r = pmadd(n, pset1<Packet>(2.12194440e-4f), r);
  const Packet r2 = pmul(r, r), r3 = pmul(r2, r);
  Packet y = pmadd(pset1<Packet>(1.9875691500E-4f), r, pset1<Packet>(1.3981999507E-3f));
  Packet y1 = pmadd(pset1<Packet>(4.1665795894E-2f), r, pset1<Packet>(1.6666665459E-1f));
  const Packet y2 = padd(r, pset1<Packet>(1.0f));
  y = pmadd(y, r, pset1<Packet>(8.3334519073E-3f));
  y1 = pmadd(y1, r, pset1<Packet>(5.0000001201E-1f));
  y = pmadd(y, r3, y1);
  y = pmadd(y, r2, y2);
  return pldexp_fast_impl<Packet>::run(y, n);  // n >= -127: biased exponent >= 0, 2^-127 -> 0
}

/// s[j] = exp(s[j] - m) for j < cols_p in place (m >= every s[j], finite); returns the sum. cols_p
/// is a multiple of MasaKernelShape<T>::width, so whole packets run (a ragged row ends in scalar
/// libm calls).
template <class T>
T masa_exp_sum(T* s, Index cols_p, T m) {
  Eigen::Map<Eigen::Array<T, 1, Eigen::Dynamic>> row(s, cols_p);
  row = (row - m).exp();
  return row.sum();
}

#if defined(EIGEN_VECTORIZE)
/// float: the packet exp above (double keeps Eigen's exp, whose extra care its 1e-12 contract
/// needs).
template <>
inline float masa_exp_sum<float>(float* s, Index cols_p, float m) {
  using Packet = typename Eigen::internal::packet_traits<float>::type;
  constexpr Index P = Eigen::internal::packet_traits<float>::size;
  if (cols_p % P != 0) {
    Eigen::Map<Eigen::ArrayXf> row(s, cols_p);
    row = (row - m).exp();
    return row.sum();
  }
  const Packet pm = Eigen::internal::pset1<Packet>(m);
  Packet acc0 = Eigen::internal::pzero(pm), acc1 = acc0;
  Index j = 0;
  for (; j + 2 * P <= cols_p; j += 2 * P) {
    const Packet e0 =
        masa_exp_nonpositive(Eigen::internal::psub(Eigen::internal::ploadu<Packet>(s + j), pm));
    const Packet e1 =
        masa_exp_nonpositive(Eigen::internal::psub(Eigen::internal::ploadu<Packet>(s + j + P), pm));
    Eigen::internal::pstoreu(s + j, e0);
    Eigen::internal::pstoreu(s + j + P, e1);
    acc0 = Eigen::internal::padd(acc0, e0);
    acc1 = Eigen::internal::padd(acc1, e1);
  }
  for (; j < cols_p; j += P) {
    const Packet e =
        masa_exp_nonpositive(Eigen::internal::psub(Eigen::internal::ploadu<Packet>(s + j), pm));
    Eigen::internal::pstoreu(s + j, e);
    acc0 = Eigen::internal::padd(acc0, e);
  }
  return Eigen::internal::predux(Eigen::internal::padd(acc0, acc1));
}
#endif

/// Whether n contiguous values are all finite: x * 0 is 0 for a finite x and NaN for Inf or NaN,
/// and a sum of them vectorises (no reassociation can change whether it is NaN). The kernels above
/// meet masked entries as -inf + q.k and 0 * v, which a non-finite k or v turns into NaN: MaSA's
/// drivers scan their inputs with this and take their careful path when it fails, MaSAD's tiled
/// lines check their outputs (docs/math.md §2.6).
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
void masa_copy_rows(const T* x, Index ldx, Index rows, Index cols, T* dst, Index ld) {
  for (Index i = 0; i < rows; ++i) {
    std::copy(x + i * ldx, x + i * ldx + cols, dst + i * ld);
    std::fill(dst + i * ld + cols, dst + (i + 1) * ld, T(0));
  }
}

}  // namespace detail
}  // namespace retention
