// retention::detail: the parallel form's one-head kernel (docs/math.md §2), query blocks against
// all earlier keys with Eigen's GEMM; parallel.hpp is its public front.
#pragma once

#include <retention/decay.hpp>
#include <retention/detail/gemm.hpp>
#include <retention/detail/retention/common.hpp>
#include <retention/detail/scratch.hpp>
#include <retention/detail/threading.hpp>
#include <retention/state.hpp>

#include <algorithm>
#include <type_traits>

namespace retention {
namespace detail {

struct ParallelForwardScratch {};
struct ParallelForwardStateScratch {};
struct ParallelRowsScratch {};
struct ParallelPanelScratch {};

template <class DQ, class DK, class DV, class DOut, class Mask, class StateScalar>
void parallel_retention_rows(const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                             const Eigen::MatrixBase<DV>& V, const Mask& decay, DOut& out,
                             const RetentionOptions<StateScalar>& options) {
  using T = typename DQ::Scalar;
  using Acc = StateScalar;
  const Index T_len = Q.rows(), dk = Q.cols(), dv = V.cols();
  const SerialEigenScope serial_products;  // threads belong over heads, not small tiles

  const RetentionState<Acc>* init = options.initial_state;
  const Index p0 = init ? init->position : 0;

  // Query blocks of B rows against all earlier keys at once: one wide GEMM for the scores and one
  // for the output per block (large products run near the machine's GEMM rate; extra memory
  // B x T). An earlier key m < n0 factors as gamma^(n-m) = gamma^(n-n0) * gamma^(n0-m), both <= 1,
  // so no factor can overflow; the diagonal block always has the same mask D_B. Keys whose largest
  // weight gamma^(n0-m) is 0 in T add exactly nothing and are skipped.
  const Index B =
      std::min(options.tile > 0 ? options.tile : default_parallel_tile, std::max<Index>(T_len, 1));
  // Working buffers from slots the thread keeps (KeptMatrices): the mask, the score tile, the
  // block's outputs, the state terms, the final state's products; the factor tables.
  KeptMatrices<T, ParallelForwardScratch, 6, 5> kept;
  Matrix<T>& D = kept.matrix(0, B, B);
  decay.weights_into(0, 0, D);
  // pw[d] = gamma^d for d = 0..T (the largest distance any factor needs), each formed as exp(d ln
  // gamma); the key factors of block n0 are pw[n0 - m], read backwards. Keys at distance >=
  // horizon, where the factor is below the smallest normal number of T, contribute less than 1e-38
  // (float) of a weight each and are skipped; denormals that still arise are flushed (see
  // DenormalsFlushed).
  const DenormalsFlushed flush_guard;
  Vector<T>& pw = kept.vector(0, T_len + 1);
  const Index horizon = decay.powers_into(pw);
  Vector<T>& kf = kept.vector(1, T_len);
  Vector<T>& r = kept.vector(2, B);
  Matrix<T>& inter = kept.matrix(3, init ? B : 0, dv);
  Vector<T>& Qz = kept.vector(3, init ? B : 0);
  const bool score = options.normalization == Normalization::decay_and_score;
  const Index span = std::min(T_len, horizon + B);  // the most keys one query block reads

  // With Eigen 3.4's own products (BlockPanel), the keys (as K^T) and the values are packed once
  // for all query blocks, and the scores are formed directly as the left operand of the output
  // product, in panels; Eigen's product would pack all three again for every block. Otherwise
  // keys and values are packed again for every query block that reads them (packed_rows).
  using Panels = BlockPanel<T>;
  constexpr bool panels = Panels::available;
  KeptMatrices<T, ParallelRowsScratch, 2> kept_rows;
  const bool many = !panels && std::min(T_len, horizon) > 2 * B;
  const ConstRows<T> Qx(Q.derived());
  const ConstRows<T> Kx = packed_rows(K.derived(), many, kept_rows, 0);
  const ConstRows<T> Vx = packed_rows(V.derived(), many, kept_rows, 1);
  KeptMatrices<T, ParallelPanelScratch, 0, 5> kept_panels;
  T *Kp = nullptr, *Vp = nullptr, *Sp = nullptr, *Qp = nullptr, *Op = nullptr;
  Index score_depth = 0, out_depth = 0;
  if constexpr (panels) {
    Kp = kept_panels.vector(0, T_len * dk).data();
    Vp = kept_panels.vector(1, T_len * dv).data();
    Panels::pack_rhs_transposed(Kp, Kx.data(), Kx.outerStride(), T_len, dk);
    Panels::pack_rhs(Vp, Vx.data(), Vx.outerStride(), T_len, dv);
    // A block's scores: its keys rounded out to whole column panels at both ends.
    Sp = kept_panels.vector(2, B * (span + 2 * Panels::nr)).data();
    Qp = kept_panels.vector(3, B * dk).data();
    Op = kept_panels.vector(4, B * dv).data();
    score_depth = Panels::depth_block(B, span, dk);
    out_depth = Panels::depth_block(B, dv, span);
  }

  for (Index n0 = 0; n0 < T_len; n0 += B) {
    const Index Ln = std::min(B, T_len - n0);
    const auto Qn = Qx.middleRows(n0, Ln);
    // Keys [m_start, n0) are those with a nonzero factor gamma^(n0 - m) (distance < horizon).
    const Index m_start = std::max<Index>(0, n0 - horizon + 1);
    const Index M = n0 + Ln - m_start, Moff = n0 - m_start;
    for (Index l = 0; l < Moff; ++l) kf(l) = pw(n0 - m_start - l);
    // Row j may see keys and values up to n0 + j only. The mask is a product, and 0 x Inf = NaN:
    // a non-finite key or value in the diagonal block would reach the earlier rows of the block
    // through the masked scores and through the zero-weighted terms of the output product. Blocks
    // that hold one (found by an O(Ln d) scan) take a path that never reads past the diagonal.
    const bool safe = has_nonfinite(Kx.middleRows(n0, Ln)) || has_nonfinite(Vx.middleRows(n0, Ln));
    // The state term, the normalisation and the copy out, on the block's outputs.
    const auto finish = [&](auto&& On) {
      if (init) {
        // diag(gamma^(n+1)) Q S_init with n = n0 + j, and the score term gamma^(n+1) q . z_init.
        const auto gq = pw.segment(n0 + 1, Ln);
        if (std::is_same<T, Acc>::value) {
          inter.topRows(Ln).noalias() = Qn * init->S.template cast<T>();
        } else {
          inter.topRows(Ln) = (Qn.template cast<Acc>() * init->S).template cast<T>();
        }
        On.noalias() += gq.asDiagonal() * inter.topRows(Ln);
        if (score) {
          Qz.head(Ln).noalias() = Qn * init->z.template cast<T>();
          r.head(Ln).array() += gq.array() * Qz.head(Ln).array();
        }
      }
      normalize_rows(decay, options.normalization, p0 + n0, On, r.head(Ln));
      out.middleRows(n0, Ln) = On;
    };
    bool done = false;
    if constexpr (panels) {
      if (!safe) {
        using ColMajor = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;
        // Score columns [c0, c1): the keys [m_start, n0 + Ln) widened to whole packed panels;
        // the extra columns are computed and never read.
        const Index c0 = m_start / Panels::nr * Panels::nr;
        const Index c1 = std::min(T_len, (n0 + Ln + Panels::nr - 1) / Panels::nr * Panels::nr);
        const Index Mc = c1 - c0, lead = m_start - c0;
        Eigen::Map<ColMajor> On(Op, Ln, dv);
        On.setZero();
        for (Index i0 = 0, h = 0; i0 < Ln; i0 += h) {
          h = Panels::panel_rows(Ln - i0);
          T* const P = Sp + i0 * Mc;
          Eigen::Map<ColMajor> S(P, h, Mc);
          S.setZero();
          Panels::pack_lhs_panel(Qp + i0 * dk, Qn.row(i0).data(), Qx.outerStride(), h, dk);
          for (Index k0 = 0; k0 < dk; k0 += score_depth)
            Panels::product(P, h, Qp + i0 * dk, dk, k0, Kp + c0 * dk, dk, k0, h,
                            std::min(score_depth, dk - k0), Mc);
          for (Index l = 0; l < Moff; ++l)
            S.col(lead + l).array() *= kf(l) * pw.segment(i0, h).array();
          S.middleCols(lead + Moff, Ln).array() *= D.block(i0, 0, h, Ln).array();
          if (score) r.segment(i0, h) = S.middleCols(lead, M).rowwise().sum();
          for (Index k0 = 0; k0 < M; k0 += out_depth)
            Panels::product(On.data() + i0, Ln, P, Mc, lead + k0, Vp, T_len, m_start + k0, h,
                            std::min(out_depth, M - k0), dv);
        }
        finish(On);
        done = true;
      }
    }
    if (!done) {
      Matrix<T>& A = kept.matrix(1, B, span);
      Matrix<T>& Ob = kept.matrix(2, B, dv);
      // The block's output rows are formed in a buffer of their own and copied out: Eigen's small
      // products and element-wise loops start with scalar iterations up to the destination's
      // first aligned element, so computing in place would round differently for differently
      // aligned outputs (a head of a packed batch against the same rows alone).
      auto On = Ob.topRows(Ln);
      auto Am = A.topLeftCorner(Ln, M);
      gemm_into(Am, Qn, Kx.middleRows(m_start, M).transpose());
      for (Index j = 0; j < Ln && Moff > 0; ++j)
        Am.row(j).head(Moff).array() *= pw(j) * kf.head(Moff).transpose().array();
      auto Ad = Am.rightCols(Ln);
      if (safe) Ad.template triangularView<Eigen::StrictlyUpper>().setZero();
      Ad.array() *= D.topLeftCorner(Ln, Ln).array();
      if (score) r.head(Ln) = Am.rowwise().sum();
      if (!safe) {
        gemm_into(On, Am, Vx.middleRows(m_start, M));
      } else {
        if (Moff > 0)
          gemm_into(On, Am.leftCols(Moff), Vx.middleRows(m_start, Moff));
        else
          On.setZero();
        for (Index j = 0; j < Ln; ++j)
          On.row(j).noalias() += Ad.row(j).head(j + 1) * Vx.middleRows(n0, j + 1);
      }
      finish(On);
    }
  }

  if (options.final_state) {
    // S_final = gamma^T S_init + sum_m gamma^(T-1-m) k_m^T v_m (z likewise), key block by block.
    Matrix<T>& Kw = kept.matrix(4, B, dk);
    Vector<T>& wf = kept.vector(4, B);
    // The products' transposes, as Eigen forms (K^T V) in a column-major temporary.
    Matrix<T>& Pt = kept.matrix(5, dv, dk);
    KeptMatrices<Acc, ParallelForwardStateScratch, 1, 1> kept_state;
    Matrix<Acc>& S = kept_state.matrix(0, dk, dv);
    Vector<Acc>& z = kept_state.vector(0, dk);
    if (init) {
      const Acc gT = static_cast<Acc>(decay.factor(T_len));
      S = gT * init->S;
      z = gT * init->z;
    } else {
      S.setZero();
      z.setZero();
    }
    for (Index m0 = 0; m0 < T_len; m0 += B) {
      const Index Lm = std::min(B, T_len - m0);
      for (Index l = 0; l < Lm; ++l) wf(l) = pw(T_len - 1 - m0 - l);
      auto Kwm = Kw.topRows(Lm);
      Kwm.noalias() = wf.head(Lm).asDiagonal() * Kx.middleRows(m0, Lm);
      gemm_into(Pt, Vx.middleRows(m0, Lm).transpose(), Kwm);
      S += Pt.transpose().template cast<Acc>();
      z += (Kwm.transpose() * Vector<T>::Ones(Lm)).template cast<Acc>();
    }
    store_state(*options.final_state, S, z);
    options.final_state->position = p0 + T_len;
  }
}

/// parallel_retention_rows on the kernels' operand type (forward_on_rows).
template <class DQ, class DK, class DV, class DOut, class Mask, class StateScalar>
void parallel_retention_impl(const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                             const Eigen::MatrixBase<DV>& V, const Mask& decay, DOut& out,
                             const RetentionOptions<StateScalar>& options) {
  forward_on_rows(Q, K, V, out, [&](const auto& q, const auto& k, const auto& v, auto& o) {
    parallel_retention_rows(q, k, v, decay, o, options);
  });
}

}  // namespace detail
}  // namespace retention
