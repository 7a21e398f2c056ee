// retention::detail: the backward of one MaSAD line attention (docs/math.md §7.5, §7.6) in the
// register blocks of the forward's line kernels, dispatched on the instruction set like them.
//
// A line of L tokens is a softmax attention with an [L, L] log-weight tile. With the saved
// log-sum-exp the probabilities need no row max, so every product here is an ordinary block product
// of whole vectors, any line length: P = exp(Q K^T + ln D - lse), dP = G V^T, dS = P (.) (dP -
// delta), then dQ = dS K, dK = dS^T Q and dV = P^T G, the last two reading P and dS transposed
// through the broadcast operand's strides (no transpose pass).
#pragma once

#include <retention/core.hpp>
#include <retention/detail/manhattan/backward_attention.hpp>
#include <retention/detail/manhattan/tile_kernels.hpp>
#include <retention/detail/simd/block.hpp>
#include <retention/detail/simd/dispatch.hpp>
#include <retention/detail/simd/transpose.hpp>

#include <algorithm>
#include <limits>

#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace retention {
namespace detail {

/// Columns [v0 N, (v0 + NP) N) of masad_block_product, in blocks of as many rows as NP vectors
/// allow.
template <class Isa, class T, int NP>
[[gnu::always_inline]] inline void masad_block_columns(const T* a, Index ars, Index aks, const T* b,
                                                       Index ldb, Index depth, const T* init,
                                                       Index ldi, T* c, Index ldc, Index rows,
                                                       Index v0) {
  constexpr int N = simd::lanes<T, Isa>;
  constexpr int R = simd::Blocking<T, Isa>::rows(NP, simd::layout_rows);
  for (Index i0 = 0; i0 < rows; i0 += R) {
    simd::Block<T, N, R, NP> blk;
    if (init)
      blk.load(init + i0 * ldi + v0 * N, ldi);
    else
      blk.set_zero();
    blk.madd(a + i0 * ars, ars, aks, b + v0 * N, ldb, depth);
    blk.store(c + i0 * ldc + v0 * N, ldc);
  }
}

/// c[i, :] = (init ? init[i, :] : 0) + sum_{s < depth} a[i ars + s aks] b[s, :] for i < rows (a
/// multiple of simd::layout_rows) over `vectors` vectors of Isa's lanes; c, init and b rows ldc,
/// ldi, ldb apart. Blocks of two vectors, a last one of one.
template <class Isa, class T>
[[gnu::always_inline]] inline void masad_block_product(const T* a, Index ars, Index aks, const T* b,
                                                       Index ldb, Index depth, const T* init,
                                                       Index ldi, T* c, Index ldc, Index rows,
                                                       Index vectors) {
  Index v0 = 0;
  for (; v0 + 2 <= vectors; v0 += 2)
    masad_block_columns<Isa, T, 2>(a, ars, aks, b, ldb, depth, init, ldi, c, ldc, rows, v0);
  if (v0 < vectors)
    masad_block_columns<Isa, T, 1>(a, ars, aks, b, ldb, depth, init, ldi, c, ldc, rows, v0);
}

/// dst[i, :ld] = x[i, :cols] for i < rows, zero from column cols on (ld a multiple of Isa's lanes,
/// dst rows ld apart): masa_copy_rows in vectors, without a library call per row.
template <class Isa, class T>
[[gnu::always_inline]] inline void masad_copy_rows_isa(const T* x, Index ldx, Index rows,
                                                       Index cols, T* dst, Index ld) {
  constexpr Index N = simd::lanes<T, Isa>;
  const Index full = cols / N * N;
  for (Index i = 0; i < rows; ++i) {
    const T* a = x + i * ldx;
    T* b = dst + i * ld;
    for (Index c = 0; c < full; c += N) simd::store(b + c, simd::load<N>(a + c));
    for (Index c = full; c < cols; ++c) b[c] = a[c];
    for (Index c = cols; c < ld; ++c) b[c] = T(0);
  }
}

/// Per-thread buffers of the line backward for lines of up to `side` tokens, zero where a line
/// leaves them unwritten: padded rows and columns read as operands must hold finite values.
template <class T>
struct MasadBackwardWorkspace {
  Matrix<T> q, k, g;       // [Lr, dkp], [Lc, dkp], [Lr, dvp]: the line's rows, zero padded
  Matrix<T> kt, vt;        // [dk, Lc], [dv, Lc]: K^T, V^T, zero past the line
  Matrix<T> p, ds;         // [Lr, Lc]: P, then dS
  Matrix<T> dq, dk, dv;    // [Lc, dkp], [Lc, dkp], [Lc, dvp]: the line's gradients
  Vector<T> shift, delta;  // [Lr]: lse (+inf past the line) and rowsum(G (.) out)

  MasadBackwardWorkspace(Index side, Index dk_, Index dv_) {
    constexpr Index R = simd::layout_rows, P = simd::max_lanes<T>;
    // Columns in whole vectors of every instruction set and at least the padded row count (dK
    // and dV read P and dS transposed, one column per padded row).
    const Index Lr = masa_round_up(side, R), Lc = masa_round_up(side, std::max(P, R));
    const Index dkp = masa_round_up(dk_, P), dvp = masa_round_up(dv_, P);
    q.setZero(Lr, dkp);
    k.setZero(Lc, dkp);
    g.setZero(Lr, dvp);
    kt.setZero(dk_, Lc);
    vt.setZero(dv_, Lc);
    p.setZero(Lr, Lc);
    ds.setZero(Lr, Lc);
    dq.setZero(Lc, dkp);
    dk.setZero(Lc, dkp);
    dv.setZero(Lc, dvp);
    shift.setZero(Lr);
    delta.setZero(Lr);
  }
};

/// One line's operands and gradients: token j of the line is row j of each, `*_step` elements
/// apart. dq and dk are added to; dv is overwritten (and may be the rows g is read from: g is
/// copied first). lw: the line's padded [L, L] log-weight tile (masad_log_tile), ldl its row
/// stride. shift and delta: the workspace's, filled for the line's L rows by the caller.
template <class T>
struct MasadLineBackwardJob {
  const T* q = nullptr;
  const T* k = nullptr;
  const T* v = nullptr;
  const T* g = nullptr;
  const T* lw = nullptr;
  T* dq = nullptr;
  T* dk = nullptr;
  T* dv = nullptr;
  Index q_step = 0, k_step = 0, v_step = 0, g_step = 0, ldl = 0;
  Index dq_step = 0, dk_step = 0, dv_step = 0;
  Index L = 0, dkk = 0, dvv = 0;
};

/// Whether rows x cols values (row stride ld, cols a multiple of Isa's lanes) are all finite:
/// x * 0 is NaN exactly for Inf and NaN, and a sum of them stays NaN.
template <class Isa, class T>
[[gnu::always_inline]] inline bool masad_block_finite(const T* x, Index ld, Index rows,
                                                      Index cols) {
  constexpr Index N = simd::lanes<T, Isa>;
  using V = simd::Vec<T, N>;
  V acc = simd::splat<N>(T(0));
  for (Index i = 0; i < rows; ++i)
    for (Index c = 0; c < cols; c += N) acc += simd::load<N>(x + i * ld + c) * T(0);
  const T sum = simd::hsum<N, T>(acc);
  return sum == sum;
}

/// The line backward (the header comment's steps) on the workspace's buffers; called through
/// simd::dispatch once per line. Returns false, with the line's gradients unwritten, when q, k, v
/// or g hold an Inf or NaN (checked on the copies the kernel makes anyway).
struct MasadLineBackwardKernel {
  template <class Isa, class T>
  static bool run(const MasadLineBackwardJob<T>* job, MasadBackwardWorkspace<T>* ws) {
    constexpr Index R = simd::layout_rows, N = simd::lanes<T, Isa>;
    using V = simd::Vec<T, N>;
    const MasadLineBackwardJob<T>& j = *job;
    const Index L = j.L, dk = j.dkk, dv = j.dvv;
    const Index Lr = masa_round_up(L, R), Ln = masa_round_up(L, N);
    const Index ldq = ws->q.cols(), ldk = ws->k.cols(), ldg = ws->g.cols(), ldt = ws->kt.cols(),
                ldp = ws->p.cols(), ldv = ws->dv.cols();
    T* q = ws->q.data();
    T* kk = ws->k.data();
    T* g = ws->g.data();
    T* p = ws->p.data();
    T* ds = ws->ds.data();
    // Operands into the padded buffers: rows of q and g past L zero (their P and dS rows come out
    // 0); K^T and V^T zero past column L.
    masad_copy_rows_isa<Isa>(j.q, j.q_step, L, dk, q, ldq);
    masad_copy_rows_isa<Isa>(j.k, j.k_step, L, dk, kk, ldk);
    masad_copy_rows_isa<Isa>(j.g, j.g_step, L, dv, g, ldg);
    std::fill(q + L * ldq, q + Lr * ldq, T(0));
    std::fill(g + L * ldg, g + Lr * ldg, T(0));
    transpose_rows_isa<Isa>(j.k, j.k_step, L, dk, ws->kt.data(), ldt);
    transpose_rows_isa<Isa>(j.v, j.v_step, L, dv, ws->vt.data(), ldt);
    if (!(masad_block_finite<Isa>(q, ldq, L, ldq) && masad_block_finite<Isa>(kk, ldk, L, ldk) &&
          masad_block_finite<Isa>(g, ldg, L, ldg) &&
          masad_block_finite<Isa>(ws->vt.data(), ldt, dv, Ln)))
      return false;
    // P = exp(ln D + Q K^T - lse); padded columns have ln D = -inf, padded rows shift = +inf.
    masad_block_product<Isa, T>(q, ldq, 1, ws->kt.data(), ldt, dk, j.lw, j.ldl, p, ldp, Lr, Ln / N);
    // dP = G V^T, then dS = P (.) (dP - delta).
    masad_block_product<Isa, T>(g, ldg, 1, ws->vt.data(), ldt, dv, static_cast<const T*>(nullptr),
                                0, ds, ldp, Lr, Ln / N);
    for (Index i = 0; i < Lr; ++i) {
      T* pr = p + i * ldp;
      T* dr = ds + i * ldp;
      const V sh = simd::splat<N>(ws->shift[i]), de = simd::splat<N>(ws->delta[i]);
      for (Index c = 0; c < Ln; c += N) {
        V e;
        simd::exp_nonpositive<N, T>(e, simd::load<N>(pr + c) - sh);
        simd::store(pr + c, e);
        simd::store(dr + c, e * (simd::load<N>(dr + c) - de));
      }
    }
    const Index dkn = masa_round_up(dk, N) / N, dvn = masa_round_up(dv, N) / N;
    // dQ = dS K over the line's queries; dK = dS^T Q and dV = P^T G over its keys, the
    // transposes read through the strides (row j of dS^T is column j of dS).
    masad_block_product<Isa, T>(ds, ldp, 1, kk, ldk, L, static_cast<const T*>(nullptr), 0,
                                ws->dq.data(), ldk, Lr, dkn);
    masad_block_product<Isa, T>(ds, 1, ldp, q, ldq, L, static_cast<const T*>(nullptr), 0,
                                ws->dk.data(), ldk, Lr, dkn);
    masad_block_product<Isa, T>(p, 1, ldp, g, ldg, L, static_cast<const T*>(nullptr), 0,
                                ws->dv.data(), ldv, Lr, dvn);
    for (Index i = 0; i < L; ++i) {
      const T* a = ws->dq.data() + i * ldk;
      const T* b = ws->dk.data() + i * ldk;
      const T* c = ws->dv.data() + i * ldv;
      T* oq = j.dq + i * j.dq_step;
      T* ok = j.dk + i * j.dk_step;
      T* ov = j.dv + i * j.dv_step;
      for (Index x = 0; x < dk; ++x) {
        oq[x] += a[x];
        ok[x] += b[x];
      }
      std::copy(c, c + dv, ov);
    }
    return true;
  }
};

/// The backward of one MaSAD line: fills the workspace's shift (lse, +inf past the line) and
/// delta (rowsum(G (.) out) in double, cast), then runs the dispatched kernel. lse and out are the
/// forward's for this line, lse_step and out_step apart. Returns false, with the line's gradients
/// unwritten, where the line kernels would not be exact (docs/math.md §2.6): an Inf or NaN in q,
/// k, v, g or out (delta not finite), or an lse of NaN or +inf.
template <class T>
bool masad_line_backward(MasadLineBackwardJob<T>& job, const T* lse, Index lse_step, const T* out,
                         Index out_step, MasadBackwardWorkspace<T>& ws) {
  const Index L = job.L, dv = job.dvv;
  constexpr T inf = std::numeric_limits<T>::infinity();
  const GradConstMap<T> o(out, L, dv, Eigen::OuterStride<>(out_step)),
      g(job.g, L, dv, Eigen::OuterStride<>(job.g_step));
  const GradConstVec<T> l(lse, L, Eigen::InnerStride<>(lse_step));
  if (!grad_lse_usable(l)) return false;
  attention_row_terms<T>(o, g, l, ws.shift, ws.delta);
  // A delta that is not finite: out or g holds an Inf or NaN.
  if (!ws.delta.head(L).allFinite()) return false;
  for (Index i = L; i < ws.shift.size(); ++i) {
    ws.shift[i] = inf;
    ws.delta[i] = T(0);
  }
  return simd::dispatch<MasadLineBackwardKernel>(static_cast<const MasadLineBackwardJob<T>*>(&job),
                                                 &ws);
}

}  // namespace detail
}  // namespace retention

#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
