// retention::detail: the parallel backward pass (docs/math.md §7), in query and key blocks so that
// no T x T matrix is ever formed.
//   Query blocks (rows n0..n0+B): the forward quantities of the block (score row sums s_n and, on
//   the exact score path, the rows u_n) give the row factors, then
//     dP = (Gu V^T + gs 1^T) (.) D,   dQ_n = dP K + diag(gamma^(n+1)) (Gu S_init^T + gs z_init^T),
//     dS_init += (diag(gamma^(n+1)) Q_n)^T Gu  (dz_init likewise with gs).
//   Key blocks (rows m0..m0+B), over the later queries:
//     dK_m = ((V_m Gu^T + 1 gs^T) (.) D^T) Q + diag(gamma^(T-1-m)) (V_m dS_final^T + 1 dz_final^T)
//     dV_m = ((K_m Q^T) (.) D^T) Gu + diag(gamma^(T-1-m)) K_m dS_final.
// Pairs whose decay factor is below the smallest normal number of T are skipped, as in the forward.
#pragma once

#include <retention/detail/gemm.hpp>
#include <retention/detail/retention/backward_kernels.hpp>
#include <retention/detail/scratch.hpp>

#include <algorithm>
#include <limits>
#include <type_traits>

namespace retention {
namespace detail {

struct ParallelBackwardScratch {};
struct ParallelBackwardStateScratch {};
struct ParallelBackwardRowsScratch {};

struct ParallelBackwardPanelScratch {};

/// The final-state gradient's terms of a key block (docs/math.md §7), added to its dK and dV:
/// S_final = gamma^T S_init + sum_m gamma^(T-1-m) k_m^T v_m, so dK_m += gamma^(T-1-m) (v_m
/// dS_final^T + dz_final^T) and dV_m += gamma^(T-1-m) k_m dS_final. `dist` = T - m0 - Lm (the
/// block's last key is at distance dist from the end); Kk, Vk, lk are working buffers of >= Lm
/// rows.
template <class T, class DK, class DV, class Acc, class OK, class OV>
void add_final_state_terms(const DK& Km, const DV& Vm, const Vector<T>& pw, Index dist,
                           const RetentionState<Acc>& fin, Matrix<T>& Kk, Matrix<T>& Vk,
                           Vector<T>& lk, OK&& dKm, OV&& dVm) {
  const Index Lm = Km.rows();
  lk.head(Lm) = pw.segment(dist, Lm).reverse();  // gamma^(T-1-m)
  Vk.topRows(Lm) = lk.head(Lm).asDiagonal() * Vm;
  Kk.topRows(Lm) = lk.head(Lm).asDiagonal() * Km;
  if constexpr (std::is_same<T, Acc>::value) {
    dKm.noalias() += Vk.topRows(Lm) * fin.S.transpose();
    dKm.noalias() += lk.head(Lm) * fin.z.transpose();
    dVm.noalias() += Kk.topRows(Lm) * fin.S;
  } else {
    const Matrix<Acc> a = Vk.topRows(Lm).template cast<Acc>() * fin.S.transpose() +
                          lk.head(Lm).template cast<Acc>() * fin.z.transpose();
    const Matrix<Acc> b = Kk.topRows(Lm).template cast<Acc>() * fin.S;
    dKm += a.template cast<T>();
    dVm += b.template cast<T>();
  }
}

/// dL/dS_init (and dz_init) into args.d_init when asked: the query blocks' sums dS0, dz0 plus
/// gamma^T times the final-state gradient.
template <class Mask, class Acc>
void store_initial_state_gradient(const Mask& decay, Index T_len, const RetentionState<Acc>* fin,
                                  const BackwardArgs<Acc>& args, Matrix<Acc>& dS0,
                                  Vector<Acc>& dz0) {
  if (!args.d_init) return;
  const Acc gT = static_cast<Acc>(decay.factor(T_len));
  if (fin) {
    dS0 += gT * fin->S;
    dz0 += gT * fin->z;
  }
  store_state(*args.d_init, dS0, dz0);
  args.d_init->position = args.start_position();
}

/// parallel_backward for finite inputs with Eigen 3.4's own products (BlockPanel::available): the
/// operands the blocks read (K^T, K, V^T, V for the query blocks, then Q^T, Q, Gu^T, Gu for the
/// key blocks) are packed once, in four buffers of T d numbers, and each tile is formed panel by
/// panel (a few rows at a time) directly as the left operand of the products that read it, as in
/// the forward (parallel_forward.hpp), instead of Eigen packing operands and tiles again for every
/// block.
/// Same equations, order of rows and factors as parallel_backward below.
template <class T, class OQ, class OK, class OV, class Mask, class Acc>
void parallel_backward_panels(const ConstRows<T>& Q, const ConstRows<T>& K, const ConstRows<T>& V,
                              const Mask& decay, Index tile, const ConstRows<T>& G, OQ& dQ, OK& dK,
                              OV& dV, const BackwardArgs<Acc>& args) {
  using Panels = BlockPanel<T>;
  using ColMajor = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;
  constexpr Index nr = Panels::nr;
  const Index T_len = Q.rows(), dk = Q.cols(), dv = V.cols();
  const Index p0 = args.start_position();
  const Normalization norm = args.normalization;
  const bool score = norm == Normalization::decay_and_score;
  const bool exact = args.score_path();
  const RetentionState<Acc>* init = args.init;
  const RetentionState<Acc>* fin = args.final_grad;
  const Index B = std::min(tile, std::max<Index>(T_len, 1));
  const Index dmax = std::max(dk, dv);

  KeptMatrices<T, ParallelBackwardPanelScratch, 4, 13> kept;
  Vector<T>& pw = kept.vector(0, T_len + 1);
  const Index horizon = decay.powers_into(pw);
  Matrix<T>& D = kept.matrix(0, B, B);
  decay.weights_into(0, 0, D);
  const Index width = std::min(T_len, horizon + B);
  Matrix<T>& Gu = kept.matrix(1, T_len, dv);
  Vector<T>& gs = kept.vector(1, T_len);
  gs.setZero();
  Vector<T>& s = kept.vector(2, B);
  // Two tiles of one panel each (at most 3 packets of rows), the panel's packed rows, the
  // products' outputs (column-major) and the four packed operands.
  const Index panel_cap = Panels::panel_rows(std::numeric_limits<Index>::max());
  T* const tile_a = kept.vector(3, panel_cap * (width + 2 * nr)).data();
  T* const tile_b = kept.vector(4, panel_cap * (width + 2 * nr)).data();
  T* const lhs = kept.vector(5, panel_cap * dmax).data();
  T* const out_a = kept.vector(6, B * dmax).data();
  T* const out_b = kept.vector(7, B * dmax).data();
  // K^T and K (keys as columns, as depth), then Q^T and Q; V^T and V, then Gu^T and Gu.
  T* const pack_cols_k = kept.vector(8, T_len * dk).data();
  T* const pack_rows_k = kept.vector(9, T_len * dk).data();
  T* const pack_cols_v = kept.vector(10, T_len * dv).data();
  T* const pack_rows_v = kept.vector(11, T_len * dv).data();

  KeptMatrices<Acc, ParallelBackwardStateScratch, 4, 3> kept_acc;
  const Index Bi = init ? B : 0;
  Matrix<Acc>& Qg = kept_acc.matrix(0, Bi, dk);
  Matrix<Acc>& Guq = kept_acc.matrix(1, Bi, dv);
  Matrix<Acc>& inter = kept_acc.matrix(2, exact ? Bi : 0, dv);
  Vector<Acc>& qz = kept_acc.vector(0, Bi);
  Vector<Acc>& gsq = kept_acc.vector(1, Bi);
  gsq.setZero();
  const bool d_init = init && args.d_init;
  Matrix<Acc>& dS0 = kept_acc.zero_matrix(3, d_init ? dk : 0, dv);
  Vector<Acc>& dz0 = kept_acc.vector(2, d_init ? dk : 0);
  dz0.setZero();

  const Index short_depth = Panels::depth_block(panel_cap, width, dmax);
  const Index long_depth = Panels::depth_block(panel_cap, dmax, width);
  // tile [h, Mc] (column-major) = rows [h, depth] (row-major) x the packed columns from c0.
  const auto tile_product = [&](T* tile_, const T* rows, Index stride, Index h, Index depth,
                                const T* packed_cols, Index c0, Index Mc) {
    Eigen::Map<ColMajor>(tile_, h, Mc).setZero();
    Panels::pack_lhs_panel(lhs, rows, stride, h, depth);
    for (Index k0 = 0; k0 < depth; k0 += short_depth)
      Panels::product(tile_, h, lhs, depth, k0, packed_cols + c0 * depth, depth, k0, h,
                      std::min(short_depth, depth - k0), Mc);
  };
  // out rows [i0, i0 + h) (column-major, leading dimension ld) += tile columns [lead, lead + M)
  // x rows [first, first + M) of the operand packed as depth.
  const auto out_product = [&](T* out, Index ld, Index i0, const T* tile_, Index Mc, Index lead,
                               Index h, const T* packed_rows, Index first, Index M, Index cols) {
    for (Index k0 = 0; k0 < M; k0 += long_depth)
      Panels::product(out + i0, ld, tile_, Mc, lead + k0, packed_rows, T_len, first + k0, h,
                      std::min(long_depth, M - k0), cols);
  };
  // Decay of a query panel (rows n0 + i0 ..) against keys [m_start, n0 + Ln) at columns lead..:
  // earlier keys by gamma^(j) gamma^(n0-m), the diagonal block by D, masked entries selected to 0
  // (docs/math.md §2.6), as decay_query_tile in parallel_backward.
  const auto decay_query_panel = [&](Eigen::Map<ColMajor>& P, Index i0, Index h, Index lead,
                                     Index Moff, Index Ln) {
    for (Index l = 0; l < Moff; ++l)
      P.col(lead + l).array() *= pw.segment(i0, h).array() * pw(Moff - l);
    for (Index c = 0; c < Ln; ++c) {
      auto col = P.col(lead + Moff + c).array();
      const auto d = D.col(c).segment(i0, h).array();
      col = (d == T(0)).select(T(0), col * d);
    }
  };

  // Query blocks.
  Panels::pack_rhs_transposed(pack_cols_v, V.data(), V.outerStride(), T_len, dv);
  Panels::pack_rhs(pack_rows_k, K.data(), K.outerStride(), T_len, dk);
  if (score) Panels::pack_rhs_transposed(pack_cols_k, K.data(), K.outerStride(), T_len, dk);
  if (exact) Panels::pack_rhs(pack_rows_v, V.data(), V.outerStride(), T_len, dv);
  for (Index n0 = 0; n0 < T_len; n0 += B) {
    const Index Ln = std::min(B, T_len - n0);
    const Index m_start = std::max<Index>(0, n0 - horizon + 1);
    const Index M = n0 + Ln - m_start, Moff = n0 - m_start;
    const Index c0 = m_start / nr * nr;
    const Index Mc = std::min(T_len, (n0 + Ln + nr - 1) / nr * nr) - c0, lead = m_start - c0;
    const auto Qn = Q.middleRows(n0, Ln);
    const auto Gn = G.middleRows(n0, Ln);
    const auto gq = pw.segment(n0 + 1, Ln);  // gamma^(n+1)
    auto Gun = Gu.middleRows(n0, Ln);
    if (init) {
      Qg.topRows(Ln) = gq.template cast<Acc>().asDiagonal() * Qn.template cast<Acc>();
      if (score) qz.head(Ln).noalias() = Qg.topRows(Ln) * init->z;
      if (exact) inter.topRows(Ln).noalias() = Qg.topRows(Ln) * init->S;
    }
    Eigen::Map<ColMajor> Un(out_a, Ln, dv), dQn_(out_b, Ln, dk);
    dQn_.setZero();
    if (exact) Un.setZero();
    for (Index i0 = 0, h = 0; i0 < Ln; i0 += h) {
      h = Panels::panel_rows(Ln - i0);
      if (norm == Normalization::none) {
        Gun.middleRows(i0, h) = Gn.middleRows(i0, h);
      } else {
        Eigen::Map<ColMajor> A(tile_a, h, Mc);
        if (score) {
          tile_product(tile_a, Qn.row(i0).data(), Q.outerStride(), h, dk, pack_cols_k, c0, Mc);
          decay_query_panel(A, i0, h, lead, Moff, Ln);
          s.segment(i0, h) = A.middleCols(lead, M).rowwise().sum();
        }
        if (exact) {
          out_product(out_a, Ln, i0, tile_a, Mc, lead, h, pack_rows_v, m_start, M, dv);
          if (init) Un.middleRows(i0, h) += inter.middleRows(i0, h).template cast<T>();
        }
        for (Index j = i0; j < i0 + h; ++j) {
          double sj = 0.0, gu = 0.0;
          if (score) {
            sj = static_cast<double>(s(j));
            if (init) sj += static_cast<double>(qz(j));
          }
          if (exact) gu = static_cast<double>(Gn.row(j).dot(Un.row(j)));
          const BackwardRowFactors f =
              backward_row_factors(decay, norm, args.detach_score_normalizer, p0 + n0 + j, sj, gu);
          Gun.row(j) = static_cast<T>(f.a) * Gn.row(j);
          gs(n0 + j) = static_cast<T>(f.gs);
        }
      }
      Eigen::Map<ColMajor> dP(tile_b, h, Mc);
      tile_product(tile_b, Gun.row(i0).data(), Gu.outerStride(), h, dv, pack_cols_v, c0, Mc);
      if (exact) dP.middleCols(lead, M).colwise() += gs.segment(n0 + i0, h);
      decay_query_panel(dP, i0, h, lead, Moff, Ln);
      out_product(out_b, Ln, i0, tile_b, Mc, lead, h, pack_rows_k, m_start, M, dk);
    }
    auto dQn = dQ.middleRows(n0, Ln);
    dQn = dQn_;
    if (init) {
      // diag(gamma^(n+1)) Gu S_init^T, and the same with gs and z_init.
      Guq.topRows(Ln) = gq.template cast<Acc>().asDiagonal() * Gun.template cast<Acc>();
      if (exact)
        gsq.head(Ln) =
            gq.template cast<Acc>().cwiseProduct(gs.segment(n0, Ln).template cast<Acc>());
      add_product(dQn, Guq.topRows(Ln), init->S.transpose());
      if (exact) add_product(dQn, gsq.head(Ln), init->z.transpose());
      if (args.d_init) {
        dS0.noalias() += Qn.template cast<Acc>().transpose() * Guq.topRows(Ln);
        if (exact) dz0.noalias() += Qn.template cast<Acc>().transpose() * gsq.head(Ln);
      }
    }
  }

  // Key blocks: key m0 + l against queries n in [m0, n_end); the diagonal block is D^T, a later
  // query n >= m0 + Lm factors as gamma^(n-m) = gamma^(n-m0-Lm) gamma^(m0+Lm-m).
  Panels::pack_rhs_transposed(pack_cols_k, Q.data(), Q.outerStride(), T_len, dk);
  Panels::pack_rhs(pack_rows_k, Q.data(), Q.outerStride(), T_len, dk);
  Panels::pack_rhs_transposed(pack_cols_v, Gu.data(), Gu.outerStride(), T_len, dv);
  Panels::pack_rhs(pack_rows_v, Gu.data(), Gu.outerStride(), T_len, dv);
  Matrix<T>& Vk = kept.matrix(2, fin ? B : 0, dv);
  Matrix<T>& Kk = kept.matrix(3, fin ? B : 0, dk);
  Vector<T>& lk = kept.vector(12, fin ? B : 0);
  // Decay of a key panel (keys m0 + i0 ..) against queries [m0, m0 + N) at columns lead..: the
  // diagonal block by D^T (selected), later queries by gamma^(Lm-l) gamma^(n-m0-Lm).
  const auto decay_key_panel = [&](Eigen::Map<ColMajor>& P, Index i0, Index h, Index lead, Index Lm,
                                   Index N) {
    for (Index c = 0; c < std::min(Lm, N); ++c) {
      auto col = P.col(lead + c).array();
      const auto d = D.row(c).segment(i0, h).transpose().array();
      col = (d == T(0)).select(T(0), col * d);
    }
    const auto first = pw.segment(Lm - i0 - h + 1, h).reverse().array();  // gamma^(Lm - l)
    for (Index c = Lm; c < N; ++c) P.col(lead + c).array() *= first * pw(c - Lm);
  };
  for (Index m0 = 0; m0 < T_len; m0 += B) {
    const Index Lm = std::min(B, T_len - m0);
    const Index n_end = std::min(T_len, m0 + Lm - 1 + horizon);
    const Index N = n_end - m0;
    const Index c0 = m0 / nr * nr;
    const Index Nc = std::min(T_len, (n_end + nr - 1) / nr * nr) - c0, lead = m0 - c0;
    Eigen::Map<ColMajor> dKm_(out_a, Lm, dk), dVm_(out_b, Lm, dv);
    dKm_.setZero();
    dVm_.setZero();
    for (Index i0 = 0, h = 0; i0 < Lm; i0 += h) {
      h = Panels::panel_rows(Lm - i0);
      Eigen::Map<ColMajor> Pt(tile_a, h, Nc), At(tile_b, h, Nc);
      tile_product(tile_a, V.row(m0 + i0).data(), V.outerStride(), h, dv, pack_cols_v, c0, Nc);
      if (exact) Pt.middleCols(lead, N).rowwise() += gs.segment(m0, N).transpose();
      tile_product(tile_b, K.row(m0 + i0).data(), K.outerStride(), h, dk, pack_cols_k, c0, Nc);
      decay_key_panel(Pt, i0, h, lead, Lm, N);
      decay_key_panel(At, i0, h, lead, Lm, N);
      out_product(out_a, Lm, i0, tile_a, Nc, lead, h, pack_rows_k, m0, N, dk);
      out_product(out_b, Lm, i0, tile_b, Nc, lead, h, pack_rows_v, m0, N, dv);
    }
    auto dKm = dK.middleRows(m0, Lm);
    auto dVm = dV.middleRows(m0, Lm);
    dKm = dKm_;
    dVm = dVm_;
    if (fin)
      add_final_state_terms(K.middleRows(m0, Lm), V.middleRows(m0, Lm), pw, T_len - m0 - Lm, *fin,
                            Kk, Vk, lk, dKm, dVm);
  }
  store_initial_state_gradient(decay, T_len, fin, args, dS0, dz0);
}

/// Parallel backward of one head into dQ, dK [T, dk] and dV [T, dv]; the inputs are checked.
/// Finite inputs go to parallel_backward_panels where Eigen's own products run; here, extra
/// memory: T dv + T (the scaled upstream gradient and gs) plus three B x (T + B) tiles, and
/// T (2 dk + dv) for contiguous copies of Q, K and V when their rows are spread out (packed_rows).
template <class DQ, class DK, class DV, class DG, class OQ, class OK, class OV, class Mask,
          class Acc>
void parallel_backward(const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                       const Eigen::MatrixBase<DV>& V, const Mask& decay, Index tile,
                       const Eigen::MatrixBase<DG>& G, OQ&& dQ, OK&& dK, OV&& dV,
                       const BackwardArgs<Acc>& args) {
  using T = typename DQ::Scalar;
  if constexpr (BlockPanel<T>::available) {
    const ConstRows<T> q(Q.derived()), k(K.derived()), v(V.derived()), g(G.derived());
    if (!(has_nonfinite(q) || has_nonfinite(k) || has_nonfinite(v) || has_nonfinite(g))) {
      parallel_backward_panels(q, k, v, decay, tile, g, dQ, dK, dV, args);
      return;
    }
  }
  const Index T_len = Q.rows(), dk = Q.cols(), dv = V.cols();
  const Index p0 = args.start_position();
  const Normalization norm = args.normalization;
  const bool score = norm == Normalization::decay_and_score;
  const bool exact = args.score_path();
  const RetentionState<Acc>* init = args.init;
  const RetentionState<Acc>* fin = args.final_grad;
  const Index B = std::min(tile, std::max<Index>(T_len, 1));

  // Working buffers from slots the thread keeps (KeptMatrices).
  KeptMatrices<T, ParallelBackwardScratch, 7, 5> kept;
  // pw[d] = gamma^d, d = 0..T; keys at distance >= horizon add nothing (as in the forward).
  Vector<T>& pw = kept.vector(0, T_len + 1);
  const Index horizon = decay.powers_into(pw);
  Matrix<T>& D = kept.matrix(0, B, B);
  decay.weights_into(0, 0, D);
  const Index width = std::min(T_len, horizon + B);
  Matrix<T>& A = kept.matrix(1, B, width);
  Matrix<T>& dP = kept.matrix(2, B, width);
  Matrix<T>& U = kept.matrix(3, exact ? B : 0, dv);
  Matrix<T>& Gu = kept.matrix(4, T_len, dv);
  Vector<T>& gs = kept.vector(1, T_len);
  gs.setZero();
  Vector<T>& s = kept.vector(2, B);
  // The initial state's terms, in its scalar type (slots of their own, which a float head with a
  // double state needs).
  KeptMatrices<Acc, ParallelBackwardStateScratch, 4, 3> kept_acc;
  const Index Bi = init ? B : 0;
  Matrix<Acc>& Qg = kept_acc.matrix(0, Bi, dk);
  Matrix<Acc>& Guq = kept_acc.matrix(1, Bi, dv);
  Matrix<Acc>& inter = kept_acc.matrix(2, exact ? Bi : 0, dv);
  Vector<Acc>& qz = kept_acc.vector(0, Bi);
  Vector<Acc>& gsq = kept_acc.vector(1, Bi);
  gsq.setZero();
  const bool d_init = init && args.d_init;
  Matrix<Acc>& dS0 = kept_acc.zero_matrix(3, d_init ? dk : 0, dv);
  Vector<Acc>& dz0 = kept_acc.vector(2, d_init ? dk : 0);
  dz0.setZero();

  // Keys and values are packed again for every query block that reads them, queries for every
  // key block (packed_rows).
  KeptMatrices<T, ParallelBackwardRowsScratch, 3> kept_rows;
  const bool many = std::min(T_len, horizon) > 2 * B;
  const ConstRows<T> Qx = packed_rows(Q.derived(), many, kept_rows, 0);
  const ConstRows<T> Kx = packed_rows(K.derived(), many, kept_rows, 1);
  const ConstRows<T> Vx = packed_rows(V.derived(), many, kept_rows, 2);
  // With a non-finite input the products over a diagonal block run row by row over the causal
  // range only, so that a masked 0 never meets a later token's Inf or NaN (docs/math.md §2.6).
  const bool finite =
      !(has_nonfinite(Qx) || has_nonfinite(Kx) || has_nonfinite(Vx) || has_nonfinite(G));

  // Decay of a query-block tile against keys [m_start, n0 + Ln): earlier keys m < n0 factor as
  // gamma^(n-m) = gamma^(n-n0) gamma^(n0-m) (both <= 1), the diagonal block is D.
  auto decay_query_tile = [&](auto& tile_, Index n0, Index Ln, Index m_start) {
    const Index Moff = n0 - m_start;
    for (Index j = 0; j < Ln; ++j) {
      if (Moff > 0)
        tile_.row(j).head(Moff).array() *=
            pw(j) * pw.segment(1, Moff).reverse().transpose().array();
      // Masked entries are selected to 0, not multiplied by it: a non-finite later token must
      // not reach earlier rows (docs/math.md §2.6).
      auto diag = tile_.row(j).segment(Moff, Ln).array();
      const auto d = D.row(j).head(Ln).array();
      diag = (d == T(0)).select(T(0), diag * d);
    }
  };

  for (Index n0 = 0; n0 < T_len; n0 += B) {
    const Index Ln = std::min(B, T_len - n0);
    const Index m_start = std::max<Index>(0, n0 - horizon + 1);
    const Index M = n0 + Ln - m_start;
    const auto Qn = Qx.middleRows(n0, Ln);
    const auto Gn = G.middleRows(n0, Ln);
    const auto Km = Kx.middleRows(m_start, M);
    const auto Vm = Vx.middleRows(m_start, M);
    const auto gq = pw.segment(n0 + 1, Ln);  // gamma^(n+1)
    auto Gun = Gu.middleRows(n0, Ln);
    auto Am = A.topLeftCorner(Ln, M);
    if (init) Qg.topRows(Ln) = gq.template cast<Acc>().asDiagonal() * Qn.template cast<Acc>();

    if (norm == Normalization::none) {
      Gun = Gn;
    } else {
      if (score) {
        gemm_into(Am, Qn, Km.transpose());
        decay_query_tile(Am, n0, Ln, m_start);
        s.head(Ln) = Am.rowwise().sum();
        if (init) qz.head(Ln).noalias() = Qg.topRows(Ln) * init->z;
      }
      if (exact) {
        auto Un = U.topRows(Ln);
        if (finite) {
          gemm_into(Un, Am, Vm);
        } else {
          for (Index j = 0; j < Ln; ++j) {
            const Index c = n0 - m_start + j + 1;  // keys up to query n0 + j
            Un.row(j).noalias() = Am.row(j).head(c) * Vm.topRows(c);
          }
        }
        if (init) {
          inter.topRows(Ln).noalias() = Qg.topRows(Ln) * init->S;
          Un += inter.topRows(Ln).template cast<T>();
        }
      }
      for (Index j = 0; j < Ln; ++j) {
        double sj = 0.0, gu = 0.0;
        if (score) {
          sj = static_cast<double>(s(j));
          if (init) sj += static_cast<double>(qz(j));
        }
        if (exact) gu = static_cast<double>(Gn.row(j).dot(U.row(j)));
        const BackwardRowFactors f =
            backward_row_factors(decay, norm, args.detach_score_normalizer, p0 + n0 + j, sj, gu);
        Gun.row(j) = static_cast<T>(f.a) * Gn.row(j);
        gs(n0 + j) = static_cast<T>(f.gs);
      }
    }

    auto dPm = dP.topLeftCorner(Ln, M);
    gemm_into(dPm, Gun, Vm.transpose());
    if (exact) dPm.colwise() += gs.segment(n0, Ln);
    decay_query_tile(dPm, n0, Ln, m_start);
    auto dQn = dQ.middleRows(n0, Ln);
    if (finite) {
      gemm_into(dQn, dPm, Km);
    } else {
      for (Index j = 0; j < Ln; ++j) {
        const Index c = n0 - m_start + j + 1;
        dQn.row(j).noalias() = dPm.row(j).head(c) * Km.topRows(c);
      }
    }
    if (init) {
      // diag(gamma^(n+1)) Gu S_init^T, and the same with gs and z_init.
      Guq.topRows(Ln) = gq.template cast<Acc>().asDiagonal() * Gun.template cast<Acc>();
      if (exact)
        gsq.head(Ln) =
            gq.template cast<Acc>().cwiseProduct(gs.segment(n0, Ln).template cast<Acc>());
      add_product(dQn, Guq.topRows(Ln), init->S.transpose());
      if (exact) add_product(dQn, gsq.head(Ln), init->z.transpose());
      if (args.d_init) {
        dS0.noalias() += Qn.template cast<Acc>().transpose() * Guq.topRows(Ln);
        if (exact) dz0.noalias() += Qn.template cast<Acc>().transpose() * gsq.head(Ln);
      }
    }
  }

  // Key blocks: key m0 + l against queries n in [m0, n_end); the diagonal block is D^T, a later
  // query n >= m0 + Lm factors as gamma^(n-m) = gamma^(n-m0-Lm) gamma^(m0+Lm-m).
  Matrix<T>& Vk = kept.matrix(5, fin ? B : 0, dv);
  Matrix<T>& Kk = kept.matrix(6, fin ? B : 0, dk);
  Vector<T>& lk = kept.vector(3, fin ? B : 0);
  Vector<T>& later = kept.vector(4, width);
  for (Index m0 = 0; m0 < T_len; m0 += B) {
    const Index Lm = std::min(B, T_len - m0);
    const Index n_end = std::min(T_len, m0 + Lm - 1 + horizon);
    const Index N = n_end - m0;
    const auto Km = Kx.middleRows(m0, Lm);
    const auto Vm = Vx.middleRows(m0, Lm);
    const auto Qn = Qx.middleRows(m0, N);
    const auto Gun = Gu.middleRows(m0, N);
    auto Pt = dP.topLeftCorner(Lm, N);
    auto At = A.topLeftCorner(Lm, N);
    gemm_into(Pt, Vm, Gun.transpose());
    if (exact) Pt.rowwise() += gs.segment(m0, N).transpose();
    gemm_into(At, Km, Qn.transpose());
    for (Index l = 0; l < Lm; ++l) {
      const auto dl = D.col(l).head(Lm).transpose();
      // Selected, not multiplied, as in decay_query_tile: a bad earlier token stays out of dK_m
      // and dV_m.
      Pt.row(l).head(Lm).array() =
          (dl.array() == T(0)).select(T(0), Pt.row(l).head(Lm).array() * dl.array());
      At.row(l).head(Lm).array() =
          (dl.array() == T(0)).select(T(0), At.row(l).head(Lm).array() * dl.array());
      if (N > Lm) {
        later.head(N - Lm) = pw(Lm - l) * pw.head(N - Lm);
        Pt.row(l).tail(N - Lm).array() *= later.head(N - Lm).transpose().array();
        At.row(l).tail(N - Lm).array() *= later.head(N - Lm).transpose().array();
      }
    }
    auto dKm = dK.middleRows(m0, Lm);
    auto dVm = dV.middleRows(m0, Lm);
    if (finite) {
      gemm_into(dKm, Pt, Qn);
      gemm_into(dVm, At, Gun);
    } else {
      for (Index l = 0; l < Lm; ++l) {  // queries from key m0 + l on
        dKm.row(l).noalias() = Pt.row(l).tail(N - l) * Qn.bottomRows(N - l);
        dVm.row(l).noalias() = At.row(l).tail(N - l) * Gun.bottomRows(N - l);
      }
    }
    if (fin) add_final_state_terms(Km, Vm, pw, T_len - m0 - Lm, *fin, Kk, Vk, lk, dKm, dVm);
  }
  store_initial_state_gradient(decay, T_len, fin, args, dS0, dz0);
}

}  // namespace detail
}  // namespace retention
