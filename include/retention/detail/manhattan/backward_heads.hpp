// retention::detail: the MaSA / MaSAD training kernels (forward saving what the backward needs,
// and the backward) of one head on strided maps, and MaSAD's backward over the lines of a group
// of heads. Each runs on its caller's thread; parallelism is over heads or head groups
// (masa_backward.hpp).
#pragma once

#include <retention/core.hpp>
#include <retention/detail/manhattan/backward_attention.hpp>
#include <retention/detail/manhattan/backward_log_tiles.hpp>
#include <retention/detail/manhattan/line_backward.hpp>
#include <retention/detail/manhattan/masad_driver.hpp>
#include <retention/detail/manhattan/tile_backward.hpp>
#include <retention/detail/threading.hpp>

#include <algorithm>
#include <limits>

namespace retention {
namespace detail {

/// A mutable map seen as a const one.
template <class T>
GradConstMap<T> grad_const(GradMap<T> m) {
  return GradConstMap<T>(m.data(), m.rows(), m.cols(), Eigen::OuterStride<>(m.outerStride()));
}

// ---------------------------------------------------------------------------------------------
// MaSA
// ---------------------------------------------------------------------------------------------

/// MaSA backward of one head by the careful path (attention_backward_careful over the whole grid,
/// ln D from the mask's axis tables in double); dQ, dK, dV zeroed by the caller. Dependencies
/// (docs/math.md §2.6, §7.5): dQ_n reads only q_n, dO_n and the keys and values row n weighs;
/// dK_m and dV_m only what the queries that weigh key m read (dV reads no value at all).
template <class T, class Mask>
void masa_backward_careful(const GradConstMap<T>& Q, const GradConstMap<T>& K,
                           const GradConstMap<T>& V, const Mask& mask, const GradConstMap<T>& G,
                           GradMap<T> dQ, GradMap<T> dK, GradMap<T> dV) {
  const Index H = mask.height(), W = mask.width();
  const Matrix<double> ly = mask.row_axis().template log_weights<double>(0, H, 0, H);
  const Matrix<double> lx = mask.column_axis().template log_weights<double>(0, W, 0, W);
  attention_backward_careful<T>(
      Q.data(), Q.outerStride(), K.data(), K.outerStride(), V.data(), V.outerStride(), G.data(),
      G.outerStride(), H * W, H * W, Q.cols(), V.cols(),
      [&](Index n, Index m) { return ly(n / W, m / W) + lx(n % W, m % W); }, dQ.data(),
      dQ.outerStride(), dK.data(), dK.outerStride(), dV.data(), dV.outerStride());
}

/// MaSA backward of one head; overwrites dQ, dK, dV. When Q, K, V, G or the saved out hold an Inf
/// or NaN, or lse a NaN or +inf (an O(N d) scan), the careful path runs instead: the tiles meet a
/// masked pair as -inf + q.k and 0 * (g.v - delta), which a bad entry turns into NaN in rows that
/// do not depend on it. Up to masa_line_tokens tokens one line of the line backward, above them
/// the tile backward (masa_tile_backward, whose extra memory is O(N (dk + dv)), never N x N).
template <class T, class Mask>
void masa_backward_head(const GradConstMap<T>& Q, const GradConstMap<T>& K,
                        const GradConstMap<T>& V, const Mask& mask, const GradConstMap<T>& out,
                        const GradConstVec<T>& lse, const GradConstMap<T>& G, Index query_tile,
                        Index key_tile, GradMap<T> dQ, GradMap<T> dK, GradMap<T> dV) {
  const Index N = Q.rows();
  if (has_nonfinite(Q) || has_nonfinite(K) || has_nonfinite(V) || has_nonfinite(G) ||
      has_nonfinite(out) || !grad_lse_usable(lse)) {
    dQ.setZero();
    dK.setZero();
    dV.setZero();
    masa_backward_careful<T>(Q, K, V, mask, G, dQ, dK, dV);
    return;
  }
  if (N <= masa_line_tokens) {
    const Matrix<T> lw = masa_line_log_tile<T>(mask);
    MasadBackwardWorkspace<T> ws(N, Q.cols(), V.cols());
    dQ.setZero();
    dK.setZero();
    MasadLineBackwardJob<T> job;
    job.q = Q.data(), job.k = K.data(), job.v = V.data(), job.g = G.data();
    job.q_step = Q.outerStride(), job.k_step = K.outerStride(), job.v_step = V.outerStride();
    job.g_step = G.outerStride();
    job.lw = lw.data(), job.ldl = lw.cols();
    job.dq = dQ.data(), job.dk = dK.data(), job.dv = dV.data();
    job.dq_step = dQ.outerStride(), job.dk_step = dK.outerStride(), job.dv_step = dV.outerStride();
    job.L = N, job.dkk = Q.cols(), job.dvv = V.cols();
    masad_line_backward<T>(job, lse.data(), lse.innerStride(), out.data(), out.outerStride(), ws);
    return;
  }
  masa_tile_backward<T>(Q, K, V, mask, out, lse, G, query_tile, key_tile, dQ, dK, dV);
}

// ---------------------------------------------------------------------------------------------
// MaSAD
// ---------------------------------------------------------------------------------------------

/// MaSAD forward of one head: u = row pass (along x), out = column pass (along y) of u, with each
/// pass's lse. Q, K [N, dk], V, out, u [N, dv], row_lse, column_lse [N]. The line attentions of
/// masad() (masad_grid, serial), which also write u and the lse rows; a line with a non-finite
/// output is redone on its careful path (docs/math.md §2.6), so out is masad()'s to the bit.
template <class T, class Mask>
void masad_forward_head(const GradConstMap<T>& Q, const GradConstMap<T>& K,
                        const GradConstMap<T>& V, const Mask& mask, GradMap<T> out, GradMap<T> u,
                        GradVec<T> row_lse, GradVec<T> column_lse) {
  MasadGrid<T> g = masad_head_grid<T>(Q, K, V, out, mask.height(), mask.width());
  g.u = u.data();
  g.ldu = u.outerStride();
  g.row_lse.data = row_lse.data();
  g.row_lse.token = row_lse.innerStride();
  g.column_lse.data = column_lse.data();
  g.column_lse.token = column_lse.innerStride();
  masad_grid<T>(g, std::vector<Mask>{mask}, 1);
}

/// MaSAD backward of one head by the careful path: attention_backward_careful on every grid column
/// (queries q, keys k, values the saved u, upstream G; gives dQ, dK parts and dU [N, dv]), then on
/// every grid row (values V, upstream dU; gives the other dQ, dK parts and dV), each line alone
/// with its axis table in double. Overwrites dQ, dK, dV; an extra [N, dv] dU.
template <class T, class Mask>
void masad_backward_careful(const GradConstMap<T>& Q, const GradConstMap<T>& K,
                            const GradConstMap<T>& V, const Mask& mask, const GradConstMap<T>& u,
                            const GradConstMap<T>& G, GradMap<T> dQ, GradMap<T> dK, GradMap<T> dV) {
  const Index H = mask.height(), W = mask.width(), dk = Q.cols(), dv = V.cols();
  const Matrix<double> lx = mask.column_axis().template log_weights<double>(0, W, 0, W);
  const Matrix<double> ly = mask.row_axis().template log_weights<double>(0, H, 0, H);
  const Index lq = Q.outerStride(), lk = K.outerStride(), lv = V.outerStride(),
              lu = u.outerStride(), lg = G.outerStride(), ldq = dQ.outerStride(),
              ldk = dK.outerStride(), ldv = dV.outerStride();
  dQ.setZero();
  dK.setZero();
  dV.setZero();
  Matrix<T> dU = Matrix<T>::Zero(H * W, dv);
  for (Index x = 0; x < W; ++x)
    attention_backward_careful<T>(
        Q.data() + x * lq, W * lq, K.data() + x * lk, W * lk, u.data() + x * lu, W * lu,
        G.data() + x * lg, W * lg, H, H, dk, dv, [&](Index i, Index j) { return ly(i, j); },
        dQ.data() + x * ldq, W * ldq, dK.data() + x * ldk, W * ldk, dU.data() + x * dv, W * dv);
  for (Index y = 0; y < H; ++y) {
    const Index n0 = y * W;
    attention_backward_careful<T>(
        Q.data() + n0 * lq, lq, K.data() + n0 * lk, lk, V.data() + n0 * lv, lv, dU.data() + n0 * dv,
        dv, W, W, dk, dv, [&](Index i, Index j) { return lx(i, j); }, dQ.data() + n0 * ldq, ldq,
        dK.data() + n0 * ldk, ldk, dV.data() + n0 * ldv, ldv);
  }
}

/// One head of a MaSAD backward over lines (masad_backward_lines): its operands, with the row
/// strides of MasadBackwardStrides, and its mask's padded axis tiles.
template <class T>
struct MasadBackwardHead {
  const T* q = nullptr;
  const T* k = nullptr;
  const T* v = nullptr;
  const T* out = nullptr;
  const T* u = nullptr;
  const T* g = nullptr;
  const T* row_lse = nullptr;
  const T* column_lse = nullptr;
  T* dq = nullptr;
  T* dk = nullptr;
  T* dv = nullptr;
  const Matrix<T>* lx = nullptr;  // [W, W] along x (row pass), padded (masad_log_tile)
  const Matrix<T>* ly = nullptr;  // [H, H] along y (column pass)
};

/// Steps between consecutive tokens of each operand (the same for every head of a call).
struct MasadBackwardStrides {
  Index q = 0, k = 0, v = 0, out = 0, u = 0, g = 0, row_lse = 0, column_lse = 0;
  Index dq = 0, dk = 0, dv = 0;
};

/// The MaSAD backward (docs/math.md §7.6) of `count` heads, one line at a time through
/// masad_line_backward, each line for every head in turn (a head of a wider buffer is a short
/// piece of each token's row; the heads together read whole rows, which the caches keep between
/// them). The column pass runs backward first (dQ, dK and dU = dL/du, kept in dV's rows), then the
/// row pass (dQ, dK added, dV from dU). dQ and dK must be zero. A head whose line meets an input
/// the line kernels cannot take (masad_line_backward) gets failed[i] = true and no more lines;
/// its gradients are then partial, for the caller to redo by masad_backward_careful.
template <class T>
void masad_backward_lines(const MasadBackwardHead<T>* heads, Index count,
                          const MasadBackwardStrides& st, Index H, Index W, Index dk, Index dv,
                          MasadBackwardWorkspace<T>& ws, bool* failed) {
  MasadLineBackwardJob<T> job;
  job.dkk = dk;
  job.dvv = dv;
  // Column pass backward: queries q, keys k, values u, output out, upstream G; writes dU into
  // dV's rows (each token's once).
  job.L = H;
  job.q_step = W * st.q, job.k_step = W * st.k, job.v_step = W * st.u, job.g_step = W * st.g;
  job.dq_step = W * st.dq, job.dk_step = W * st.dk, job.dv_step = W * st.dv;
  for (Index x = 0; x < W; ++x)
    for (Index i = 0; i < count; ++i) {
      if (failed[i]) continue;
      const MasadBackwardHead<T>& h = heads[i];
      job.lw = h.ly->data();
      job.ldl = h.ly->cols();
      job.q = h.q + x * st.q;
      job.k = h.k + x * st.k;
      job.v = h.u + x * st.u;
      job.g = h.g + x * st.g;
      job.dq = h.dq + x * st.dq;
      job.dk = h.dk + x * st.dk;
      job.dv = h.dv + x * st.dv;
      failed[i] = !masad_line_backward<T>(job, h.column_lse + x * st.column_lse, W * st.column_lse,
                                          h.out + x * st.out, W * st.out, ws);
    }
  // Row pass backward: queries q, keys k, values V, output u, upstream dU (read from dV's rows
  // before the kernel overwrites them with dV).
  job.L = W;
  job.q_step = st.q, job.k_step = st.k, job.v_step = st.v, job.g_step = st.dv;
  job.dq_step = st.dq, job.dk_step = st.dk, job.dv_step = st.dv;
  for (Index y = 0; y < H; ++y)
    for (Index i = 0; i < count; ++i) {
      if (failed[i]) continue;
      const MasadBackwardHead<T>& h = heads[i];
      const Index n0 = y * W;
      job.lw = h.lx->data();
      job.ldl = h.lx->cols();
      job.q = h.q + n0 * st.q;
      job.k = h.k + n0 * st.k;
      job.v = h.v + n0 * st.v;
      job.g = h.dv + n0 * st.dv;
      job.dq = h.dq + n0 * st.dq;
      job.dk = h.dk + n0 * st.dk;
      job.dv = h.dv + n0 * st.dv;
      failed[i] = !masad_line_backward<T>(job, h.row_lse + n0 * st.row_lse, st.row_lse,
                                          h.u + n0 * st.u, st.u, ws);
    }
}

/// MaSAD backward of one head; overwrites dQ, dK, dV: masad_backward_lines, redone by
/// masad_backward_careful when a line meets an Inf or NaN in Q, K, V, G, the saved out or u, or an
/// lse of NaN or +inf (checked on the way, on data the lines read anyway): the line kernels meet a
/// masked pair as -inf + q.k and 0 * (g.v - delta), which a bad entry turns into NaN in rows that
/// do not depend on it. Extra memory: the two padded axis tiles and one line workspace,
/// O(L^2 + L (dk + dv)) for L = max(H, W); nothing of size N.
template <class T, class Mask>
void masad_backward_head(const GradConstMap<T>& Q, const GradConstMap<T>& K,
                         const GradConstMap<T>& V, const Mask& mask, const GradConstMap<T>& out,
                         const GradConstMap<T>& u, const GradConstVec<T>& row_lse,
                         const GradConstVec<T>& column_lse, const GradConstMap<T>& G,
                         Index query_tile, Index key_tile, GradMap<T> dQ, GradMap<T> dK,
                         GradMap<T> dV) {
  (void)query_tile, (void)key_tile;  // MaSAD's lines are never tiled
  const Index H = mask.height(), W = mask.width(), dk = Q.cols(), dv = V.cols();
  const Matrix<T> lx = masad_log_tile<T>(mask.column_axis(), W);
  const Matrix<T> ly = masad_log_tile<T>(mask.row_axis(), H);
  MasadBackwardWorkspace<T> ws(std::max(H, W), dk, dv);
  dQ.setZero();
  dK.setZero();
  MasadBackwardHead<T> h;
  h.q = Q.data(), h.k = K.data(), h.v = V.data(), h.out = out.data(), h.u = u.data();
  h.g = G.data(), h.row_lse = row_lse.data(), h.column_lse = column_lse.data();
  h.dq = dQ.data(), h.dk = dK.data(), h.dv = dV.data();
  h.lx = &lx, h.ly = &ly;
  MasadBackwardStrides st;
  st.q = Q.outerStride(), st.k = K.outerStride(), st.v = V.outerStride();
  st.out = out.outerStride(), st.u = u.outerStride(), st.g = G.outerStride();
  st.row_lse = row_lse.innerStride(), st.column_lse = column_lse.innerStride();
  st.dq = dQ.outerStride(), st.dk = dK.outerStride(), st.dv = dV.outerStride();
  bool failed = false;
  masad_backward_lines<T>(&h, 1, st, H, W, dk, dv, ws, &failed);
  if (failed) masad_backward_careful<T>(Q, K, V, mask, u, G, dQ, dK, dV);
}

}  // namespace detail
}  // namespace retention
