// retention::detail: one head of the MaSA / MaSAD training kernels (forward saving what the
// backward needs, and the backward), on strided maps. Eigen runs single-threaded inside a head;
// parallelism is over heads (masa_backward.hpp).
#pragma once

#include <retention/core.hpp>
#include <retention/detail/manhattan/backward_attention.hpp>
#include <retention/detail/manhattan/backward_log_tiles.hpp>
#include <retention/detail/scratch.hpp>
#include <retention/detail/threading.hpp>

#include <algorithm>

namespace retention {
namespace detail {

/// Segment [n0, n0 + rows) of a strided vector.
template <class T>
GradVec<T> grad_segment(GradVec<T> v, Index n0, Index rows) {
  return GradVec<T>(v.data() + n0 * v.innerStride(), rows, Eigen::InnerStride<>(v.innerStride()));
}
template <class T>
GradConstVec<T> grad_segment(const GradConstVec<T>& v, Index n0, Index rows) {
  return GradConstVec<T>(v.data() + n0 * v.innerStride(), rows,
                         Eigen::InnerStride<>(v.innerStride()));
}

template <class T>
GradConstMap<T> grad_const(GradMap<T> m) {
  return GradConstMap<T>(m.data(), m.rows(), m.cols(), Eigen::OuterStride<>(m.outerStride()));
}

/// A dense matrix buffer seen as a [rows, cols] map (rows <= its rows).
template <class T>
GradMap<T> grad_top(Matrix<T>& m, Index rows) {
  return GradMap<T>(m.data(), rows, m.cols(), Eigen::OuterStride<>(m.cols()));
}
template <class T>
GradConstMap<T> grad_top_const(const Matrix<T>& m, Index rows) {
  return GradConstMap<T>(m.data(), rows, m.cols(), Eigen::OuterStride<>(m.cols()));
}

/// KeptMatrices' tags of the contiguous copies of inputs (packed_rows) and gradients.
struct AttentionRowsScratch {};
struct AttentionGradientScratch {};

// ---------------------------------------------------------------------------------------------
// MaSA
// ---------------------------------------------------------------------------------------------

/// MaSA forward of one head: out = softmax_row(Q K^T + ln D) V, lse [N]. Extra memory: the two axis
/// tables and one workspace, O(H^2 + W^2 + query_tile (key_tile + dv)), and N (dk + dv) for
/// contiguous copies of K and V when their rows are spread out and N is above two query tiles.
template <class T, class Mask>
void masa_forward_head(const GradConstMap<T>& Q, const GradConstMap<T>& K, const GradConstMap<T>& V,
                       const Mask& mask, Index query_tile, Index key_tile, GradMap<T> out,
                       GradVec<T> lse) {
  SerialEigenScope serial;
  const Index N = Q.rows();
  const Index bq = std::min(query_tile, N), bk = std::min(key_tile, N);
  const GridLogTile<T> log_tile(mask);
  AttentionWorkspace<T> ws(bq, bk, V.cols());
  // Every query tile packs the keys and values again.
  KeptMatrices<T, AttentionRowsScratch, 4> kept;
  const bool many = N > 2 * bq;
  const GradConstMap<T> Kx = packed_rows(K, many, kept, 1);
  const GradConstMap<T> Vx = packed_rows(V, many, kept, 2);
  attention_forward<T>(Q, Kx, Vx, log_tile, bq, bk, out, lse, ws);
}

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
/// do not depend on it. Extra memory: shift and delta [N], the axis tables and two [query_tile,
/// key_tile] tiles; for a head of a wider buffer (rows spread out) and N above two tiles,
/// contiguous copies of Q, K, V, G and the gradients, N (3 dk + 3 dv) values (packed_rows).
template <class T, class Mask>
void masa_backward_head(const GradConstMap<T>& Q, const GradConstMap<T>& K,
                        const GradConstMap<T>& V, const Mask& mask, const GradConstMap<T>& out,
                        const GradConstVec<T>& lse, const GradConstMap<T>& G, Index query_tile,
                        Index key_tile, GradMap<T> dQ, GradMap<T> dK, GradMap<T> dV) {
  SerialEigenScope serial;
  const Index N = Q.rows();
  const Index bq = std::min(query_tile, N), bk = std::min(key_tile, N);
  if (has_nonfinite(Q) || has_nonfinite(K) || has_nonfinite(V) || has_nonfinite(G) ||
      has_nonfinite(out) || !grad_lse_usable(lse)) {
    dQ.setZero();
    dK.setZero();
    dV.setZero();
    masa_backward_careful<T>(Q, K, V, mask, G, dQ, dK, dV);
    return;
  }
  Vector<T> shift(N), delta(N);
  attention_row_terms<T>(out, G, lse, shift, delta);
  const GridLogTile<T> log_tile(mask);
  AttentionWorkspace<T> ws(bq, bk, 0);
  // Every key tile packs the queries and dO again, and adds into every row of dQ; every query tile
  // packs the keys and values again. Rows spread out in a wider buffer are copied to contiguous
  // ones first (inputs) or gathered there and copied out once (gradients).
  const bool many = N > 2 * std::max(bq, bk);
  KeptMatrices<T, AttentionRowsScratch, 4> kept;
  const GradConstMap<T> Qx = packed_rows(Q, many, kept, 0);
  const GradConstMap<T> Kx = packed_rows(K, many, kept, 1);
  const GradConstMap<T> Vx = packed_rows(V, many, kept, 2);
  const GradConstMap<T> Gx = packed_rows(G, many, kept, 3);
  // attention_backward adds into the gradients: each starts at zero, in its own rows or in a
  // contiguous buffer.
  KeptMatrices<T, AttentionGradientScratch, 3> kept_grad;
  auto gradient = [&](int i, GradMap<T> d) {
    GradMap<T> g =
        many && d.outerStride() != d.cols() ? grad_top(kept_grad.matrix(i, N, d.cols()), N) : d;
    g.setZero();
    return g;
  };
  GradMap<T> dQx = gradient(0, dQ), dKx = gradient(1, dK), dVx = gradient(2, dV);
  attention_backward<T>(Qx, Kx, Vx, Gx, shift, delta, log_tile, bq, bk, dQx, dKx, dVx, ws);
  if (dQx.data() != dQ.data()) dQ = dQx;
  if (dKx.data() != dK.data()) dK = dKx;
  if (dVx.data() != dV.data()) dV = dVx;
}

// ---------------------------------------------------------------------------------------------
// MaSAD
// ---------------------------------------------------------------------------------------------

/// Lines of `length` tokens handled as one group (out of `lines`): short lines are batched up to
/// about this many tokens, so a group's products are large enough for a GEMM to pay off; the price
/// is the cross-line entries, computed and masked out (at most this many per row).
constexpr Index masad_group_tokens = 32;

inline Index masad_lines_per_group(Index length, Index lines) {
  return std::max<Index>(1, std::min(lines, masad_group_tokens / length));
}

/// Per-head buffers of a MaSAD call: the two axis tables, one attention workspace and the packed
/// copies of a group of column lines (whose tokens are W rows apart in the grid).
template <class T>
struct MasadHeadBuffers {
  Matrix<T> lx, ly;  // [W, W] along x (row pass), [H, H] along y (column pass)
  Index row_group = 1, col_group = 1;
  Index bq = 1, bk = 1;
  AttentionWorkspace<T> ws;
  Matrix<T> q, k, v, o, g, dq, dk, dv;  // [column group tokens, dk or dv]
  Vector<T> lse, shift, delta;          // [max group tokens]

  template <class Mask>
  MasadHeadBuffers(const Mask& mask, Index dk_, Index dv_, Index query_tile, Index key_tile,
                   bool backward)
      : lx(mask.column_axis().template log_weights<T>(0, mask.width(), 0, mask.width())),
        ly(mask.row_axis().template log_weights<T>(0, mask.height(), 0, mask.height())),
        row_group(masad_lines_per_group(mask.width(), mask.height())),
        col_group(masad_lines_per_group(mask.height(), mask.width())),
        ws(1, 1, 0) {
    const Index H = mask.height(), W = mask.width();
    const Index row_tokens = row_group * W, col_tokens = col_group * H;
    const Index most = std::max(row_tokens, col_tokens);
    bq = std::min(query_tile, most);
    bk = std::min(key_tile, most);
    ws = AttentionWorkspace<T>(bq, bk, backward ? 0 : dv_);
    q.resize(col_tokens, dk_);
    k.resize(col_tokens, dk_);
    v.resize(col_tokens, dv_);
    o.resize(col_tokens, dv_);
    if (backward) {
      g.resize(std::max(col_tokens, row_tokens), dv_);
      dq.resize(col_tokens, dk_);
      dk.resize(col_tokens, dk_);
      dv.resize(col_tokens, dv_);
      shift.resize(most);
      delta.resize(most);
    }
    lse.resize(col_tokens);
  }
};

/// Copies rows [src = y W + x] of the column lines x0 .. x0 + lines - 1 into dst, line after line
/// (dst row l H + y).
template <class T, class Src>
void masad_gather(const Src& src, Index H, Index W, Index x0, Index lines, Matrix<T>& dst) {
  for (Index l = 0; l < lines; ++l)
    for (Index y = 0; y < H; ++y) dst.row(l * H + y) = src.row(y * W + x0 + l);
}

/// MaSAD forward of one head: u = row pass (along x), out = column pass (along y) of u, with each
/// pass's lse. Q, K [N, dk], V, out, u [N, dv], row_lse, column_lse [N].
template <class T, class Mask>
void masad_forward_head(const GradConstMap<T>& Q, const GradConstMap<T>& K,
                        const GradConstMap<T>& V, const Mask& mask, Index query_tile,
                        Index key_tile, GradMap<T> out, GradMap<T> u, GradVec<T> row_lse,
                        GradVec<T> column_lse) {
  SerialEigenScope serial;
  const Index H = mask.height(), W = mask.width(), dk = Q.cols(), dv = V.cols();
  MasadHeadBuffers<T> b(mask, dk, dv, query_tile, key_tile, false);
  // Row pass: a group of grid rows is a block of consecutive tokens, read in place.
  const LineLogTile<T> along_x(b.lx);
  for (Index y0 = 0; y0 < H; y0 += b.row_group) {
    const Index rows = std::min(b.row_group, H - y0) * W, n0 = y0 * W;
    attention_forward<T>(grad_rows(Q, n0, rows), grad_rows(K, n0, rows), grad_rows(V, n0, rows),
                         along_x, b.bq, b.bk, grad_rows(u, n0, rows),
                         grad_segment(row_lse, n0, rows), b.ws);
  }
  // Column pass: a group of grid columns is gathered into packed buffers, then scattered back.
  const LineLogTile<T> along_y(b.ly);
  const GradConstMap<T> U = grad_const(u);
  for (Index x0 = 0; x0 < W; x0 += b.col_group) {
    const Index lines = std::min(b.col_group, W - x0), rows = lines * H;
    masad_gather(Q, H, W, x0, lines, b.q);
    masad_gather(K, H, W, x0, lines, b.k);
    masad_gather(U, H, W, x0, lines, b.v);
    attention_forward<T>(grad_top_const(b.q, rows), grad_top_const(b.k, rows),
                         grad_top_const(b.v, rows), along_y, b.bq, b.bk, grad_top(b.o, rows),
                         GradVec<T>(b.lse.data(), rows, Eigen::InnerStride<>(1)), b.ws);
    for (Index l = 0; l < lines; ++l)
      for (Index y = 0; y < H; ++y) {
        out.row(y * W + x0 + l) = b.o.row(l * H + y);
        column_lse(y * W + x0 + l) = b.lse(l * H + y);
      }
  }
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

/// MaSAD backward of one head; overwrites dQ, dK, dV. Inputs with an Inf or NaN (Q, K, V, G, the
/// saved out and u; a NaN or +inf lse) take masad_backward_careful: a packed line group shares
/// one product across lines, through which a bad entry would reach the group's other lines. The
/// column pass runs backward first (dQ, dK and dU = dL/du, kept in dV's buffer), then the row pass
/// (dQ, dK added, dV from dU). Extra memory: the axis tables, one workspace and O(group tokens *
/// (dk + dv)) packed buffers; no [N, dv] dU.
template <class T, class Mask>
void masad_backward_head(const GradConstMap<T>& Q, const GradConstMap<T>& K,
                         const GradConstMap<T>& V, const Mask& mask, const GradConstMap<T>& out,
                         const GradConstMap<T>& u, const GradConstVec<T>& row_lse,
                         const GradConstVec<T>& column_lse, const GradConstMap<T>& G,
                         Index query_tile, Index key_tile, GradMap<T> dQ, GradMap<T> dK,
                         GradMap<T> dV) {
  SerialEigenScope serial;
  const Index H = mask.height(), W = mask.width(), dk = Q.cols(), dv = V.cols();
  if (has_nonfinite(Q) || has_nonfinite(K) || has_nonfinite(V) || has_nonfinite(G) ||
      has_nonfinite(out) || has_nonfinite(u) || !grad_lse_usable(row_lse) ||
      !grad_lse_usable(column_lse)) {
    masad_backward_careful<T>(Q, K, V, mask, u, G, dQ, dK, dV);
    return;
  }
  MasadHeadBuffers<T> b(mask, dk, dv, query_tile, key_tile, true);
  dQ.setZero();
  dK.setZero();
  // Column pass backward: queries q, keys k, values u, output out, upstream G.
  const LineLogTile<T> along_y(b.ly);
  for (Index x0 = 0; x0 < W; x0 += b.col_group) {
    const Index lines = std::min(b.col_group, W - x0), rows = lines * H;
    masad_gather(Q, H, W, x0, lines, b.q);
    masad_gather(K, H, W, x0, lines, b.k);
    masad_gather(u, H, W, x0, lines, b.v);
    masad_gather(out, H, W, x0, lines, b.o);
    masad_gather(G, H, W, x0, lines, b.g);
    for (Index l = 0; l < lines; ++l)
      for (Index y = 0; y < H; ++y) b.lse(l * H + y) = column_lse(y * W + x0 + l);
    const GradConstMap<T> o = grad_top_const(b.o, rows), g = grad_top_const(b.g, rows);
    attention_row_terms<T>(o, g, GradConstVec<T>(b.lse.data(), rows, Eigen::InnerStride<>(1)),
                           b.shift, b.delta);
    GradMap<T> dq = grad_top(b.dq, rows), dk_ = grad_top(b.dk, rows), du = grad_top(b.dv, rows);
    dq.setZero();
    dk_.setZero();
    du.setZero();
    attention_backward<T>(grad_top_const(b.q, rows), grad_top_const(b.k, rows),
                          grad_top_const(b.v, rows), g, b.shift, b.delta, along_y, b.bq, b.bk, dq,
                          dk_, du, b.ws);
    for (Index l = 0; l < lines; ++l)
      for (Index y = 0; y < H; ++y) {
        const Index n = y * W + x0 + l, p = l * H + y;
        dQ.row(n) += dq.row(p);
        dK.row(n) += dk_.row(p);
        dV.row(n) = du.row(p);
      }
  }
  // Row pass backward: queries q, keys k, values V, output u, upstream dU (read out of dV's rows
  // before they are overwritten with the row group's dV).
  const LineLogTile<T> along_x(b.lx);
  for (Index y0 = 0; y0 < H; y0 += b.row_group) {
    const Index rows = std::min(b.row_group, H - y0) * W, n0 = y0 * W;
    GradMap<T> dVr = grad_rows(dV, n0, rows);
    b.g.topRows(rows) = dVr;
    dVr.setZero();
    const GradConstMap<T> g = grad_top_const(b.g, rows), ur = grad_rows(u, n0, rows);
    attention_row_terms<T>(ur, g, grad_segment(row_lse, n0, rows), b.shift, b.delta);
    attention_backward<T>(grad_rows(Q, n0, rows), grad_rows(K, n0, rows), grad_rows(V, n0, rows), g,
                          b.shift, b.delta, along_x, b.bq, b.bk, grad_rows(dQ, n0, rows),
                          grad_rows(dK, n0, rows), dVr, b.ws);
  }
}

}  // namespace detail
}  // namespace retention
