// retention: MaSAD's fused line kernels (docs/math.md §4).
//
// One MaSAD line (a grid row or column of L tokens) is a small softmax attention: an [L, dk] x [dk,
// L] logit product, a row softmax, an [L, L] x [L, dv] product. For lines of up to four vectors
// (masad_line_vectors: L <= 64 in float with AVX-512), a whole row of logits fits in
// registers, so these kernels keep it there: the logit kernel starts from the log-weights,
// accumulates q . k, takes the row max, exponentiates and sums in registers and writes the
// probabilities once (no separate max or exp pass over the tile). The attend kernel accumulates P V
// over blocks of rows x whole vectors of dv and applies the softmax's 1 / sum as it stores (no
// separate normalisation pass). Both accumulate in simd::Block's of R x NP vectors, so each loaded
// vector of K^T or V serves R rows. Templates over the instruction set, inlined into MaSAD's
// dispatched line kernel.
#pragma once

#include <retention/core.hpp>
#include <retention/detail/manhattan/tile_kernels.hpp>
#include <retention/detail/simd/block.hpp>
#include <retention/detail/simd/dispatch.hpp>

#include <algorithm>
#include <cmath>

#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace retention {
namespace detail {

/// Longest line the fused kernels take, in vectors of logits per row held in registers.
constexpr int masad_line_vectors = 4;

/// Rows per block of a line kernel np vectors wide: as many as the register budget allows that
/// also divide the padded row count (simd::Blocking::rows).
template <class T, class Isa>
constexpr int masad_rows(int np) {
  return simd::Blocking<T, Isa>::rows(np, simd::layout_rows);
}

/// Most vectors of dv the attend kernel takes at once: the widest block that keeps four rows.
template <class T, class Isa>
constexpr int masad_dv_vectors = simd::Blocking<T, Isa>::accumulators / 4;

/// Row softmax of one line's logits, the row max taken in registers: for i < rows (a multiple of
/// R),
///   S[i, j] = lw[i, j] + sum_c q[i, c] kt[c, j],   j < NP * lanes,
///   p[i, j] = exp(S[i, j] - max_j S[i, :]),   inv_sum[i] = 1 / sum_j p[i, j],
/// and, with row_max != nullptr, row_max[i] = max_j S[i, :] and row_sum[i] = sum_j p[i, j] (the
/// training forward's log-sum-exp is their log's sum: stores only, no call inside the kernel).
/// q [rows, dk] (row stride ldq), kt = K^T [dk, ldk >= NP * lanes], lw [rows, ldl] the log-weights
/// with -inf in the padding columns (they come out as weight 0 and never win the max), p [rows,
/// ldp].
template <class Isa, class T, int R, int NP>
[[gnu::always_inline]] inline void masad_softmax_rows(const T* q, Index ldq, Index dk, const T* kt,
                                                      Index ldk, const T* lw, Index ldl, T* p,
                                                      Index ldp, Index rows, T* inv_sum, T* row_max,
                                                      T* row_sum) {
  constexpr int N = simd::lanes<T, Isa>;
  using V = simd::Vec<T, N>;
  for (Index i0 = 0; i0 < rows; i0 += R) {
    simd::Block<T, N, R, NP> b;
    b.load(lw + i0 * ldl, ldl);
    b.madd(q + i0 * ldq, ldq, 1, kt, ldk, dk);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      V m = b.acc[r][0];
#pragma GCC unroll 16
      for (int u = 1; u < NP; ++u) m = simd::vmax<N, T>(m, b.acc[r][u]);
      inv_sum[i0 + r] = simd::hmax<N, T>(m);  // the row max, until the pass below
    }
    b.store(p + i0 * ldp, ldp);
  }
  // The exps in a pass of their own, over rows still in L1: inside the product's loop nest their
  // constants would hold registers that the accumulators need.
  for (Index i = 0; i < rows; ++i) {
    T* pr = p + i * ldp;
    const V mm = simd::splat<N>(inv_sum[i]);
    V e[NP];
#pragma GCC unroll 16
    for (int u = 0; u < NP; ++u) simd::exp_nonpositive<N, T>(e[u], simd::load<N>(pr + u * N) - mm);
    V sum = e[0];
#pragma GCC unroll 16
    for (int u = 0; u < NP; ++u) {
      simd::store(pr + u * N, e[u]);
      if (u > 0) sum += e[u];
    }
    const T s = simd::hsum<N, T>(sum);
    if (row_max) {
      row_max[i] = inv_sum[i];
      row_sum[i] = s;
    }
    // s >= 1 (the max weighs 1); a NaN s stays NaN (s > 0 would turn it into a weight of 0).
    inv_sum[i] = s == T(0) ? T(0) : T(1) / s;
  }
}

/// out[i, d0 + :] = inv_sum[i] sum_{j < L} p[i, j] v[j, d0 + :] over ND vectors of columns, for the
/// valid rows i < rows_valid (rows, a multiple of R, are computed). Columns [d0, d0 + ND * lanes)
/// past `store_cols` are not written (a ragged dv); out rows are out_step elements apart. Returns
/// whether every valid row's outputs are finite: their sum, one add per stored vector, is finite
/// (a finite sum that overflows only sends the line to the careful path for nothing).
template <class Isa, class T, int R, int ND>
[[gnu::always_inline]] inline bool masad_attend_rows(const T* p, Index ldp, const T* v, Index ldv,
                                                     Index L, const T* inv_sum, T* out,
                                                     Index out_step, Index rows, Index rows_valid,
                                                     Index d0, Index store_cols) {
  constexpr int N = simd::lanes<T, Isa>;
  using V = simd::Vec<T, N>;
  const T* vb = v + d0;
  // One vector for the finiteness sum: with one per column vector, the default-flags build (generic
  // tuning) spilled a value vector of the product loop to the stack.
  V check = simd::splat<N>(T(0));
  for (Index i0 = 0; i0 < rows; i0 += R) {
    simd::Block<T, N, R, ND> b;
    b.set_zero();
    b.madd(p + i0 * ldp, ldp, 1, vb, ldv, L);
    const int valid = static_cast<int>(std::min<Index>(R, rows_valid - i0));
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      if (r >= valid) break;
      const T f = inv_sum[i0 + r];
      T* o = out + (i0 + r) * out_step + d0;
#pragma GCC unroll 16
      for (int u = 0; u < ND; ++u) {
        const V y = b.acc[r][u] * f;
        check += y;
        const Index c0 = d0 + u * N;
        if (c0 + N <= store_cols) {
          simd::store(o + u * N, y);
        } else if (c0 < store_cols) {  // the ragged last vector of dv
          // Lane by lane, unrolled: a copy of variable length would be a library call, around
          // which every accumulator is saved and restored.
          T tmp[N];
          simd::store(tmp, y);
#pragma GCC unroll 64
          for (int l = 0; l < N; ++l)
            if (c0 + l < store_cols) o[u * N + l] = tmp[l];
        }
      }
    }
  }
  const T sum = simd::hsum<N, T>(check);
  return sum - sum == T(0);
}

/// Logit-softmax of a line whose logits fit np vectors of Isa (1 <= np <= 4), with the row block
/// of masad_rows(np). rows is a multiple of simd::layout_rows; row_max, row_sum as
/// masad_softmax_rows.
template <class Isa, class T>
[[gnu::always_inline]] inline void masad_softmax_line(Index np, const T* q, Index ldq, Index dk,
                                                      const T* kt, Index ldk, const T* lw,
                                                      Index ldl, T* p, Index ldp, Index rows,
                                                      T* inv_sum, T* row_max, T* row_sum) {
  switch (np) {
    case 1:
      masad_softmax_rows<Isa, T, masad_rows<T, Isa>(1), 1>(q, ldq, dk, kt, ldk, lw, ldl, p, ldp,
                                                           rows, inv_sum, row_max, row_sum);
      break;
    case 2:
      masad_softmax_rows<Isa, T, masad_rows<T, Isa>(2), 2>(q, ldq, dk, kt, ldk, lw, ldl, p, ldp,
                                                           rows, inv_sum, row_max, row_sum);
      break;
    case 3:
      masad_softmax_rows<Isa, T, masad_rows<T, Isa>(3), 3>(q, ldq, dk, kt, ldk, lw, ldl, p, ldp,
                                                           rows, inv_sum, row_max, row_sum);
      break;
    default:
      masad_softmax_rows<Isa, T, masad_rows<T, Isa>(4), 4>(q, ldq, dk, kt, ldk, lw, ldl, p, ldp,
                                                           rows, inv_sum, row_max, row_sum);
      break;
  }
}

/// masad_attend_rows for ND vectors of dv as a kernel of its own (simd::call): the four widths
/// inlined into one function shared one register allocation, which kept fewer value vectors in
/// registers where the including file's own flags are the defaults (bench/results/isa-dispatch.md).
template <int ND>
struct MasadAttendRowsKernel {
  template <class Isa, class T>
  static bool run(const T* p, Index ldp, const T* v, Index ldv, Index L, const T* inv_sum, T* out,
                  Index out_step, Index rows, Index rows_valid, Index d0, Index dv) {
    return masad_attend_rows<Isa, T, masad_rows<T, Isa>(ND), ND>(
        p, ldp, v, ldv, L, inv_sum, out, out_step, rows, rows_valid, d0, dv);
  }
};

/// out[i, :dv] = inv_sum[i] sum_{j < L} p[i, j] v[j, :] for i < rows_valid; v [L, ldv] holds dv
/// rounded up to whole vectors of Isa readable columns (zeros past dv), out rows are out_step
/// apart. dv is processed masad_dv_vectors vectors at a time. Returns whether
/// every output written is finite.
template <class Isa, class T>
[[gnu::always_inline]] inline bool masad_attend_line(const T* p, Index ldp, const T* v, Index ldv,
                                                     Index L, const T* inv_sum, T* out,
                                                     Index out_step, Index rows, Index rows_valid,
                                                     Index dv) {
  constexpr Index N = simd::lanes<T, Isa>, most = masad_dv_vectors<T, Isa>;
  static_assert(most >= 3, "the cases below");
  const Index dvn = masa_round_up(dv, N);
  bool finite = true;
  for (Index d0 = 0; d0 < dvn; d0 += most * N) {
    bool ok = true;
    switch (std::min<Index>(most, (dvn - d0) / N)) {
      case 1:
        ok = simd::call<Isa, MasadAttendRowsKernel<1>>(p, ldp, v, ldv, L, inv_sum, out, out_step,
                                                       rows, rows_valid, d0, dv);
        break;
      case 2:
        ok = simd::call<Isa, MasadAttendRowsKernel<2>>(p, ldp, v, ldv, L, inv_sum, out, out_step,
                                                       rows, rows_valid, d0, dv);
        break;
      case 3:
        ok = simd::call<Isa, MasadAttendRowsKernel<3>>(p, ldp, v, ldv, L, inv_sum, out, out_step,
                                                       rows, rows_valid, d0, dv);
        break;
      default:  // `most` vectors (3 or 4)
        ok = simd::call<Isa, MasadAttendRowsKernel<static_cast<int>(most)>>(
            p, ldp, v, ldv, L, inv_sum, out, out_step, rows, rows_valid, d0, dv);
        break;
    }
    finite = ok && finite;
  }
  return finite;
}

/// masad_softmax_line and masad_attend_line as kernels of their own (simd::call): inlined together
/// into one line kernel, their row pointers and strides did not fit the registers and were
/// reloaded from the stack inside the product loops.
struct MasadSoftmaxLine {
  template <class Isa, class T>
  static void run(Index np, const T* q, Index ldq, Index dk, const T* kt, Index ldk, const T* lw,
                  Index ldl, T* p, Index ldp, Index rows, T* inv_sum, T* row_max, T* row_sum) {
    masad_softmax_line<Isa>(np, q, ldq, dk, kt, ldk, lw, ldl, p, ldp, rows, inv_sum, row_max,
                            row_sum);
  }
};
struct MasadAttendLine {
  template <class Isa, class T>
  static bool run(const T* p, Index ldp, const T* v, Index ldv, Index L, const T* inv_sum, T* out,
                  Index out_step, Index rows, Index rows_valid, Index dv) {
    return masad_attend_line<Isa>(p, ldp, v, ldv, L, inv_sum, out, out_step, rows, rows_valid, dv);
  }
};

}  // namespace detail
}  // namespace retention

#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
