// retention::detail: MaSA's backward over [query_tile, key_tile] tiles (docs/math.md §7.5) in the
// register blocks of the forward's tile kernels, dispatched on the instruction set like them.
//
// Key tiles outside, query tiles inside: for each pair the logits come from the forward's logit
// kernel (ln D from the same two axis tables, so they are the forward's to the bit), then P = exp(S
// - lse), dP = G V^T, dS = P (.) (dP - delta), and dV_j += P^T G_i, dK_j += dS^T Q_i (the
// transposes read through the strides, the key tile's gradients staying in cache while the query
// tiles stream past) and dQ_i += dS K_j. Nothing of size N x N is formed: two tiles per thread and
// the head's operands and gradients, zero padded, O(N (dk + dv)).
#pragma once

#include <retention/core.hpp>
#include <retention/detail/manhattan/line_backward.hpp>
#include <retention/detail/manhattan/masa_driver.hpp>
#include <retention/detail/manhattan/tile_kernels.hpp>
#include <retention/detail/scratch.hpp>
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

/// One head's operands, gradients and tiles as plain pointers for the dispatched kernel. Rows of
/// q, k, g, dq, dk, dv are ld_dk (q, k, dq, dk) or ld_dv (g, dv) apart and zero past N; kt = K^T
/// and vt = V^T have rows ld_t apart, zero past column N; shift (lse, +inf past N) and delta
/// (rowsum(G (.) out), 0 past N) per row. The tiles are multiples of masa_backward_align<T>.
template <class T>
struct MasaBackwardJob {
  const T* q = nullptr;
  const T* k = nullptr;
  const T* g = nullptr;
  const T* kt = nullptr;
  const T* vt = nullptr;
  const T* log_x = nullptr;
  const T* log_y = nullptr;
  const T* shift = nullptr;
  const T* delta = nullptr;
  T* dq = nullptr;
  T* dk = nullptr;
  T* dv = nullptr;
  T* s = nullptr;               // [query_tile, key_tile]: logits, then P
  T* ds = nullptr;              // [query_tile, key_tile]: dP, then dS
  T* row_max = nullptr;         // [query_tile]
  const T** lx_rows = nullptr;  // [query_tile]: where each query row's ln D terms start
  const T** ly_rows = nullptr;
  Index ld_dk = 0, ld_dv = 0, ld_t = 0, ldx = 0, ldy = 0, lds = 0;
  Index N = 0, height = 0, width = 0, dk_cols = 0, dv_cols = 0, query_tile = 0, key_tile = 0;
};

/// Row and column counts of the backward's tiles and padded buffers are multiples of this: whole
/// row blocks (simd::layout_rows) and whole vectors of every instruction set.
template <class T>
constexpr Index masa_backward_align = std::max<Index>(simd::layout_rows, simd::max_lanes<T>);

/// The kernel of the header comment over every tile pair of one head; ADDS into dq, dk, dv.
struct MasaTileBackwardKernel {
  template <class Isa, class T>
  static void run(const MasaBackwardJob<T>* job) {
    constexpr Index R = simd::layout_rows, N = simd::lanes<T, Isa>;
    using V = simd::Vec<T, N>;
    const MasaBackwardJob<T>& j = *job;
    constexpr T neg_inf = -std::numeric_limits<T>::infinity();
    const Index dkn = masa_round_up(j.dk_cols, N) / N, dvn = masa_round_up(j.dv_cols, N) / N;
    T* s = j.s;
    T* ds = j.ds;
    for (Index m0 = 0; m0 < j.N; m0 += j.key_tile) {
      const Index cols = std::min(j.key_tile, j.N - m0), a = m0 / j.width, b = m0 % j.width;
      // P and dS are read transposed as cols_r rows: zero past the logit kernel's cols_n columns.
      const Index cols_n = masa_round_up(cols, N), cols_r = masa_round_up(cols, R);
      const Index cols_z = std::max(cols_n, cols_r);
      T* dk_j = j.dk + m0 * j.ld_dk;
      T* dv_j = j.dv + m0 * j.ld_dv;
      for (Index n0 = 0; n0 < j.N; n0 += j.query_tile) {
        const Index rows = std::min(j.query_tile, j.N - n0), rows_r = masa_round_up(rows, R);
        for (Index i = 0; i < rows_r; ++i) {
          // Padding rows (past N) reuse the last row's terms; their shift is +inf, so P = 0.
          const Index n = n0 + std::min(i, rows - 1), yn = n / j.width, xn = n % j.width;
          j.lx_rows[i] = j.log_x + xn * j.ldx + b;
          j.ly_rows[i] = j.log_y + (yn - a + j.height - 1) * j.ldy + b;
        }
        const T* q_i = j.q + n0 * j.ld_dk;
        const T* g_i = j.g + n0 * j.ld_dv;
        masa_logits_isa<Isa>(q_i, j.ld_dk, j.kt + m0, j.ld_t, j.dk_cols, j.lx_rows, j.ly_rows, s,
                             j.lds, rows_r, cols, j.row_max);
        // A pair the mask removes whole (a quadrant-causal mask's future rows) adds nothing.
        bool any = false;
        for (Index i = 0; i < rows; ++i) any = any || j.row_max[i] != neg_inf;
        if (!any) continue;
        masad_block_product<Isa, T>(g_i, j.ld_dv, 1, j.vt + m0, j.ld_t, j.dv_cols,
                                    static_cast<const T*>(nullptr), 0, ds, j.lds, rows_r,
                                    cols_n / N);
        for (Index i = 0; i < rows_r; ++i) {
          T* pr = s + i * j.lds;
          T* dr = ds + i * j.lds;
          const V sh = simd::splat<N>(j.shift[n0 + i]), de = simd::splat<N>(j.delta[n0 + i]);
          for (Index c = 0; c < cols_n; c += N) {
            V e;
            simd::exp_nonpositive<N, T>(e, simd::load<N>(pr + c) - sh);
            simd::store(pr + c, e);
            simd::store(dr + c, e * (simd::load<N>(dr + c) - de));
          }
          std::fill(pr + cols_n, pr + cols_z, T(0));
          std::fill(dr + cols_n, dr + cols_z, T(0));
        }
        // dV_j += P^T G_i and dK_j += dS^T Q_i over the key tile's rows (its padding rows add 0);
        // dQ_i += dS K_j.
        masad_block_product<Isa, T>(s, 1, j.lds, g_i, j.ld_dv, rows, dv_j, j.ld_dv, dv_j, j.ld_dv,
                                    cols_r, dvn);
        masad_block_product<Isa, T>(ds, 1, j.lds, q_i, j.ld_dk, rows, dk_j, j.ld_dk, dk_j, j.ld_dk,
                                    cols_r, dkn);
        T* dq_i = j.dq + n0 * j.ld_dk;
        masad_block_product<Isa, T>(ds, j.lds, 1, j.k + m0 * j.ld_dk, j.ld_dk, cols, dq_i, j.ld_dk,
                                    dq_i, j.ld_dk, rows_r, dkn);
      }
    }
  }
};

/// KeptMatrices' tag of the tile backward's buffers.
struct MasaTileBackwardScratch {};

/// MaSA backward of one head with finite inputs (masa_backward_head checks them) by the tile
/// kernel: shift and delta from lse, out and G (attention_row_terms), the padded copies, the
/// kernel, then dQ, dK, dV overwritten from the padded gradients. query_tile and key_tile are
/// rounded up to masa_backward_align<T>. Extra memory: N (5 dk + 3 dv) values of padded copies and
/// gradients, the two axis tables, and two [query_tile, key_tile] tiles.
template <class T, class Mask2D>
void masa_tile_backward(const GradConstMap<T>& Q, const GradConstMap<T>& K,
                        const GradConstMap<T>& V, const Mask2D& mask, const GradConstMap<T>& out,
                        const GradConstVec<T>& lse, const GradConstMap<T>& G, Index query_tile,
                        Index key_tile, GradMap<T> dQ, GradMap<T> dK, GradMap<T> dV) {
  constexpr Index A = masa_backward_align<T>;
  constexpr T inf = std::numeric_limits<T>::infinity();
  const Index N = Q.rows(), dk = Q.cols(), dv = V.cols();
  const Index Np = masa_round_up(N, A), dkp = masa_round_up(dk, A), dvp = masa_round_up(dv, A);
  const Index bq = masa_round_up(std::min(query_tile, N), A);
  const Index bk = masa_round_up(std::min(key_tile, N), A);
  KeptMatrices<T, MasaTileBackwardScratch, 12, 3> kept;
  // The copies write every entry (padding columns and K^T, V^T past column N as zeros) but the
  // rows past N; only the gradients, which the kernel adds into, start zeroed whole.
  Matrix<T>& q = kept.matrix(0, Np, dkp);
  Matrix<T>& k = kept.matrix(1, Np, dkp);
  Matrix<T>& g = kept.matrix(2, Np, dvp);
  Matrix<T>& kt = kept.matrix(3, dk, Np);
  Matrix<T>& vt = kept.matrix(4, dv, Np);
  Matrix<T>& gq = kept.zero_matrix(5, Np, dkp);
  Matrix<T>& gk = kept.zero_matrix(6, Np, dkp);
  Matrix<T>& gv = kept.zero_matrix(7, Np, dvp);
  Matrix<T>& s = kept.matrix(8, bq, bk);
  Matrix<T>& ds = kept.matrix(9, bq, bk);
  Matrix<T>& log_x = kept.matrix(10, 1, 1);
  Matrix<T>& log_y = kept.matrix(11, 1, 1);
  Vector<T>& shift = kept.vector(0, Np);
  Vector<T>& delta = kept.vector(1, Np);
  Vector<T>& row_max = kept.vector(2, bq);
  masa_copy_rows(Q.data(), Q.outerStride(), N, dk, q.data(), dkp);
  masa_copy_rows(K.data(), K.outerStride(), N, dk, k.data(), dkp);
  masa_copy_rows(G.data(), G.outerStride(), N, dv, g.data(), dvp);
  q.bottomRows(Np - N).setZero();
  k.bottomRows(Np - N).setZero();
  g.bottomRows(Np - N).setZero();
  transpose_rows(K.data(), K.outerStride(), N, dk, kt.data(), Np);
  transpose_rows(V.data(), V.outerStride(), N, dv, vt.data(), Np);
  attention_row_terms<T>(out, G, lse, shift, delta);
  shift.tail(Np - N).setConstant(inf);
  delta.tail(Np - N).setZero();
  masa_log_tables<T>(mask, bk, log_x, log_y);
  std::vector<const T*> lx_rows(static_cast<std::size_t>(bq)), ly_rows(lx_rows.size());
  MasaBackwardJob<T> job;
  job.q = q.data(), job.k = k.data(), job.g = g.data(), job.kt = kt.data(), job.vt = vt.data();
  job.log_x = log_x.data(), job.log_y = log_y.data();
  job.shift = shift.data(), job.delta = delta.data();
  job.dq = gq.data(), job.dk = gk.data(), job.dv = gv.data();
  job.s = s.data(), job.ds = ds.data(), job.row_max = row_max.data();
  job.lx_rows = lx_rows.data(), job.ly_rows = ly_rows.data();
  job.ld_dk = dkp, job.ld_dv = dvp, job.ld_t = Np, job.ldx = log_x.cols(), job.ldy = log_y.cols();
  job.lds = bk;
  job.N = N, job.height = mask.height(), job.width = mask.width();
  job.dk_cols = dk, job.dv_cols = dv, job.query_tile = bq, job.key_tile = bk;
  simd::dispatch<MasaTileBackwardKernel>(static_cast<const MasaBackwardJob<T>*>(&job));
  dQ = gq.topLeftCorner(N, dk);
  dK = gk.topLeftCorner(N, dk);
  dV = gv.topLeftCorner(N, dv);
}

}  // namespace detail
}  // namespace retention

#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
