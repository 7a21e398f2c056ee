// retention: MaSAD's fused line kernels (docs/math.md §4).
//
// One MaSAD line (a grid row or column of L tokens) is a small softmax attention: an [L, dk] x [dk,
// L] logit product, a row softmax, an [L, L] x [L, dv] product. For lines of up to four SIMD
// packets (L <= 64 in float with AVX-512), a whole row of logits fits in registers, so these
// kernels keep it there: the logit kernel starts from the log-weights, accumulates q . k, takes the
// row max, exponentiates and sums in registers and writes the probabilities once (no separate max
// or exp pass over the tile). The attend kernel accumulates P V over blocks of rows x whole packets
// of dv and applies the softmax's 1 / sum as it stores (no separate normalisation pass). Both keep
// R x NP accumulators so each loaded packet of K^T or V serves R rows.
#pragma once

#include <retention/core.hpp>
#include <retention/detail/manhattan/tile_kernels.hpp>

#include <algorithm>

namespace retention {
namespace detail {

#if defined(EIGEN_VECTORIZE)

// Every loop over the R x NP accumulators is unrolled: GCC keeps an accumulator array in registers
// only when every index is a constant, and otherwise stores all of them to the stack on every step
// of the dot-product loop.
#define RETENTION_MASAD_PRAGMA(x) _Pragma(#x)
#define RETENTION_MASAD_UNROLL RETENTION_MASAD_PRAGMA(GCC unroll 16)

/// The native SIMD packet of T and its lane count.
template <class T>
struct MasadPacket {
  using type = typename Eigen::internal::packet_traits<T>::type;
  static constexpr Index size = Eigen::internal::unpacket_traits<type>::size;
  /// Longest line the fused kernels take: four packets of logits per row in registers.
  static constexpr Index max_line = 4 * size;
};

/// exp of a packet of arguments <= 0 (-inf included): Eigen's pexp for double (its 1e-12 contract),
/// the faster masa_exp_nonpositive for float (same polynomial, no overflow guards needed here).
template <class T>
struct MasadExp {
  template <class Packet>
  static EIGEN_STRONG_INLINE Packet run(const Packet& x) {
    return Eigen::internal::pexp(x);
  }
};
template <>
struct MasadExp<float> {
  template <class Packet>
  static EIGEN_STRONG_INLINE Packet run(const Packet& x) {
    return masa_exp_nonpositive(x);
  }
#if defined(EIGEN_VECTORIZE_AVX512)
  /// AVX-512: the same Cephes polynomial, with n rounded to nearest in one instruction and 2^n
  /// applied by vscalefps, 15 operations per packet instead of 22 (the softmax's exp ran at about a
  /// third of the whole logit kernel's time). Arguments are clamped at -86 so that 2^n stays a
  /// normal number: exp(-inf) gives 4.5e-38 instead of 0, a weight 1e-38 of the row's largest
  /// (which is 1), far below float's rounding of the row sum; no denormal ever reaches the P V
  /// product. Largest relative error over [-86, 0]: 1.2e-7. vmaxps returns its second operand
  /// when either is NaN: x_in goes second, so a NaN argument gives NaN, not the clamp's exp(-86).
  static EIGEN_STRONG_INLINE Eigen::internal::Packet16f run(
      const Eigen::internal::Packet16f& x_in) {
    const __m512 x = _mm512_max_ps(_mm512_set1_ps(-86.0f), x_in);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // r = x - n ln 2 in two steps (ln 2 split into a high part exact in float and a low part).
    __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693359375f), x);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
    const __m512 r2 = _mm512_mul_ps(r, r);
    __m512 y =
        _mm512_fmadd_ps(_mm512_set1_ps(1.9875691500e-4f), r, _mm512_set1_ps(1.3981999507e-3f));
    __m512 y1 =
        _mm512_fmadd_ps(_mm512_set1_ps(4.1665795894e-2f), r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y1 = _mm512_fmadd_ps(y1, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r2, r), y1);
    y = _mm512_fmadd_ps(y, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(y, n);
  }
#endif
};

/// Row softmax of one line's logits, fused: for i < rows (a multiple of R),
///   S[i, j] = lw[i, j] + sum_c q[i, c] kt[c, j],   j < NP * size,
///   p[i, j] = exp(S[i, j] - max_j S[i, :]),   inv_sum[i] = 1 / sum_j p[i, j].
/// q [rows, dk] (row stride ldq), kt = K^T [dk, ldk >= NP * size], lw [rows, ldl] the log-weights
/// with -inf in the padding columns (they come out as weight 0 and never win the max), p [rows,
/// ldp].
template <class T, int R, int NP>
void masad_softmax_rows(const T* q, Index ldq, Index dk, const T* kt, Index ldk, const T* lw,
                        Index ldl, T* p, Index ldp, Index rows, T* inv_sum) {
  using namespace Eigen::internal;
  using Packet = typename MasadPacket<T>::type;
  constexpr Index PS = MasadPacket<T>::size;
  for (Index i0 = 0; i0 < rows; i0 += R) {
    Packet a[R][NP];
    RETENTION_MASAD_UNROLL
    for (int r = 0; r < R; ++r) RETENTION_MASAD_UNROLL
    for (int u = 0; u < NP; ++u) a[r][u] = ploadu<Packet>(lw + (i0 + r) * ldl + u * PS);
    const T* qb = q + i0 * ldq;
    for (Index c = 0; c < dk; ++c) {
      Packet kk[NP];
      RETENTION_MASAD_UNROLL
      for (int u = 0; u < NP; ++u) kk[u] = ploadu<Packet>(kt + c * ldk + u * PS);
      RETENTION_MASAD_UNROLL
      for (int r = 0; r < R; ++r) {
        const Packet b = pset1<Packet>(qb[r * ldq + c]);
        RETENTION_MASAD_UNROLL
        for (int u = 0; u < NP; ++u) a[r][u] = pmadd(b, kk[u], a[r][u]);
      }
    }
    // All R x NP exps are independent: the polynomial's latency overlaps across them.
    RETENTION_MASAD_UNROLL
    for (int r = 0; r < R; ++r) {
      Packet m = a[r][0];
      RETENTION_MASAD_UNROLL
      for (int u = 1; u < NP; ++u) m = pmax(m, a[r][u]);
      const Packet mm = pset1<Packet>(predux_max(m));
      Packet sum = pzero(m);
      RETENTION_MASAD_UNROLL
      for (int u = 0; u < NP; ++u) {
        const Packet e = MasadExp<T>::run(psub(a[r][u], mm));
        pstoreu(p + (i0 + r) * ldp + u * PS, e);
        sum = padd(sum, e);
      }
      const T s = predux(sum);
      // s >= 1 (the max weighs 1); a NaN s stays NaN (s > 0 would turn it into a weight of 0).
      inv_sum[i0 + r] = s == T(0) ? T(0) : T(1) / s;
    }
  }
}

/// out[i, d0 + :] = inv_sum[i] sum_{j < L} p[i, j] v[j, d0 + :] over ND packets of columns, for the
/// valid rows i < rows_valid (rows, a multiple of R, are computed). Columns [d0, d0 + ND * size)
/// past `store_cols` are not written (a ragged dv); out rows are out_step elements apart. Returns
/// whether every valid row's outputs are finite: their sum, one add per stored packet, is finite
/// (a finite sum that overflows only sends the line to the careful path for nothing).
template <class T, int R, int ND>
bool masad_attend_rows(const T* p, Index ldp, const T* v, Index ldv, Index L, const T* inv_sum,
                       T* out, Index out_step, Index rows, Index rows_valid, Index d0,
                       Index store_cols) {
  using namespace Eigen::internal;
  using Packet = typename MasadPacket<T>::type;
  constexpr Index PS = MasadPacket<T>::size;
  const T* vb = v + d0;
  Packet check[ND];
  RETENTION_MASAD_UNROLL
  for (int u = 0; u < ND; ++u) check[u] = pset1<Packet>(T(0));
  for (Index i0 = 0; i0 < rows; i0 += R) {
    Packet a[R][ND];
    RETENTION_MASAD_UNROLL
    for (int r = 0; r < R; ++r) RETENTION_MASAD_UNROLL
    for (int u = 0; u < ND; ++u) a[r][u] = pset1<Packet>(T(0));
    const T* pb = p + i0 * ldp;
    for (Index j = 0; j < L; ++j) {
      Packet w[ND];
      RETENTION_MASAD_UNROLL
      for (int u = 0; u < ND; ++u) w[u] = ploadu<Packet>(vb + j * ldv + u * PS);
      RETENTION_MASAD_UNROLL
      for (int r = 0; r < R; ++r) {
        const Packet b = pset1<Packet>(pb[r * ldp + j]);
        RETENTION_MASAD_UNROLL
        for (int u = 0; u < ND; ++u) a[r][u] = pmadd(b, w[u], a[r][u]);
      }
    }
    const int valid = static_cast<int>(std::min<Index>(R, rows_valid - i0));
    RETENTION_MASAD_UNROLL
    for (int r = 0; r < valid; ++r) {
      const Packet f = pset1<Packet>(inv_sum[i0 + r]);
      T* o = out + (i0 + r) * out_step + d0;
      RETENTION_MASAD_UNROLL
      for (int u = 0; u < ND; ++u) {
        const Packet y = pmul(a[r][u], f);
        check[u] = padd(check[u], y);
        const Index c0 = d0 + u * PS;
        if (c0 + PS <= store_cols) {
          pstoreu(o + u * PS, y);
        } else if (c0 < store_cols) {  // the ragged last packet of dv
          T tmp[PS];
          pstoreu(tmp, y);
          std::copy(tmp, tmp + (store_cols - c0), o + u * PS);
        }
      }
    }
  }
  RETENTION_MASAD_UNROLL
  for (int u = 1; u < ND; ++u) check[0] = padd(check[0], check[u]);
  const T sum = predux(check[0]);
  return sum - sum == T(0);
}

/// Logit-softmax of a line whose logits fit NP packets: picks the row block R (4 rows for 3 or 4
/// packets, 16 accumulators; 8 rows below, so there are still enough independent accumulators to
/// cover the FMA latency). rows is a multiple of 8.
template <class T>
void masad_softmax_line(Index np, const T* q, Index ldq, Index dk, const T* kt, Index ldk,
                        const T* lw, Index ldl, T* p, Index ldp, Index rows, T* inv_sum) {
  switch (np) {
    case 1:
      masad_softmax_rows<T, 8, 1>(q, ldq, dk, kt, ldk, lw, ldl, p, ldp, rows, inv_sum);
      break;
    case 2:
      masad_softmax_rows<T, 8, 2>(q, ldq, dk, kt, ldk, lw, ldl, p, ldp, rows, inv_sum);
      break;
    case 3:
      masad_softmax_rows<T, 4, 3>(q, ldq, dk, kt, ldk, lw, ldl, p, ldp, rows, inv_sum);
      break;
    default:
      masad_softmax_rows<T, 4, 4>(q, ldq, dk, kt, ldk, lw, ldl, p, ldp, rows, inv_sum);
      break;
  }
}

/// out[i, :dv] = inv_sum[i] sum_{j < L} p[i, j] v[j, :] for i < rows_valid; v [L, ldv >= dvp]
/// holds dvp = dv rounded up to packets readable columns (zeros past dv), out rows are out_step
/// apart. dv is processed 4 packets at a time (16 accumulators at 4 rows). Returns whether every
/// output written is finite.
template <class T>
bool masad_attend_line(const T* p, Index ldp, const T* v, Index ldv, Index L, const T* inv_sum,
                       T* out, Index out_step, Index rows, Index rows_valid, Index dv, Index dvp) {
  constexpr Index PS = MasadPacket<T>::size;
  const Index store_cols = dv;
  bool finite = true;
  for (Index d0 = 0; d0 < dvp; d0 += 4 * PS) {
    switch (std::min<Index>(4, (dvp - d0) / PS)) {
      case 1:
        finite = masad_attend_rows<T, 8, 1>(p, ldp, v, ldv, L, inv_sum, out, out_step, rows,
                                            rows_valid, d0, store_cols) &&
                 finite;
        break;
      case 2:
        finite = masad_attend_rows<T, 8, 2>(p, ldp, v, ldv, L, inv_sum, out, out_step, rows,
                                            rows_valid, d0, store_cols) &&
                 finite;
        break;
      case 3:
        finite = masad_attend_rows<T, 4, 3>(p, ldp, v, ldv, L, inv_sum, out, out_step, rows,
                                            rows_valid, d0, store_cols) &&
                 finite;
        break;
      default:
        finite = masad_attend_rows<T, 4, 4>(p, ldp, v, ldv, L, inv_sum, out, out_step, rows,
                                            rows_valid, d0, store_cols) &&
                 finite;
        break;
    }
  }
  return finite;
}
#endif  // EIGEN_VECTORIZE

}  // namespace detail
}  // namespace retention

// The unroll pragmas are this file's own: they must not reach users.
#undef RETENTION_MASAD_UNROLL
#undef RETENTION_MASAD_PRAGMA
