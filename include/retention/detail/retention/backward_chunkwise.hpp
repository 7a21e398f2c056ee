// retention::detail: the chunkwise backward pass (docs/math.md §7), two sweeps over the chunks,
// each a handful of products of chunk blocks, and no stored states:
//   Forward sweep (S, z: the state before chunk i, advanced as in the forward pass): everything
//   that needs the state before the chunk,
//     A  = Q_i K_i^T (.) D_L,  U = A V_i + diag(gamma^(j+1)) Q_i S   (exact score path only)
//     row factors a, gs from s = rowsum(A) + gamma^(j+1) Q_i z and U (kept, O(T))
//     Gu = diag(a) G_i,  dP = (Gu V_i^T + gs 1^T) (.) D_L
//     dQ_i = dP K_i + diag(gamma^(j+1)) (Gu S^T + gs z^T)
//   Reverse sweep (dS, dz: the gradient of the state after chunk i, from dS_final):
//     A, Gu and dP again (two small products), then
//     dK_i = dP^T Q_i + diag(gamma^(L-1-l)) (V_i dS^T + 1 dz^T)
//     dV_i = A^T Gu + diag(gamma^(L-1-l)) K_i dS
//     dS <- gamma^L dS + Q_i^T diag(gamma^(j+1)) Gu,   dz <- gamma^L dz + Q_i^T (gamma^(j+1) .*
//     gs).
// Recomputing A and dP (2 L^2 (dk + dv) flops per chunk) costs less than storing the ceil(T/C)
// chunk-boundary states would: megabytes per head, freshly allocated and page-faulted on each call.
// Products with the state run in the state's type.
//
// chunkwise_backward sends a CausalDecay head with the state in the inputs' type to
// backward_chunkwise_fast.hpp instead (three retentions on the forward's register-blocked kernels);
// with other masks, a wider state or no tokens it runs the two sweeps below.
#pragma once

#include <retention/decay.hpp>
#include <retention/detail/retention/backward_chunkwise_fast.hpp>
#include <retention/detail/retention/backward_kernels.hpp>
#include <retention/detail/retention/chunk_kernels.hpp>

#include <algorithm>
#include <type_traits>

namespace retention {
namespace detail {

/// Work buffers of one chunkwise backward call, sized for chunks of C rows.
template <class T, class Acc>
struct ChunkBackwardBuffers {
  Matrix<T> Qc, Kc, Vc, Gc, Gu, A, dP, U, dX, dV;
  Matrix<Acc> Guq, Kk, Vk, Uq;
  Vector<Acc> gsq, sz;
  AccRows<T, Acc> Qa, Ka, Va, Gua;
  ChunkBackwardBuffers(Index C, Index dk, Index dv, bool exact)
      : Qc(C, dk),
        Kc(C, dk),
        Vc(C, dv),
        Gc(C, dv),
        Gu(C, dv),
        A(C, C),
        dP(C, C),
        U(exact ? C : 0, dv),
        dX(C, dk),
        dV(C, dv),
        Guq(C, dv),
        Kk(C, dk),
        Vk(C, dv),
        Uq(exact ? C : 0, dv),
        gsq(C),
        sz(C),
        Qa(C, dk),
        Ka(C, dk),
        Va(C, dv),
        Gua(C, dv) {}
};

/// The two-sweep chunkwise backward of one head into dQ, dK [T, dk] and dV [T, dv]; the inputs
/// are checked. Extra memory: 2 T scalars (row factors) + dk dv + dk of Acc (the state or its
/// gradient) + O(C (C + dk + dv)) buffers.
template <class DQ, class DK, class DV, class DG, class OQ, class OK, class OV, class Mask,
          class Acc>
void chunkwise_backward_sweeps(const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                               const Eigen::MatrixBase<DV>& V, const Mask& decay, Index chunk,
                               const Eigen::MatrixBase<DG>& G, OQ&& dQ, OK&& dK, OV&& dV,
                               const BackwardArgs<Acc>& args) {
  using T = typename DQ::Scalar;
  const Index T_len = Q.rows(), dk = Q.cols(), dv = V.cols();
  const Index C = chunk_length(chunk, T_len);
  const Index chunks = (T_len + C - 1) / C;
  const Index p0 = args.start_position();
  const Normalization norm = args.normalization;
  const bool normalize = norm != Normalization::none;
  const bool score = norm == Normalization::decay_and_score;
  const bool exact = args.score_path();
  const RetentionState<Acc>* init = args.init;

  const Matrix<T> D = decay.template weights<T>(0, C, 0, C);
  const Vector<Acc> qf = decay.template query_factors<Acc>(C);
  const Vector<Acc> kf_full = decay.template key_factors<Acc>(C);
  const Acc gC = static_cast<Acc>(decay.chunk_factor(C));
  ChunkBackwardBuffers<T, Acc> w(C, dk, dv, exact);
  // Row factors of every token: dL/du_n = a_n G_n, dL/ds_n = gs_n (backward_kernels.hpp).
  Vector<T> a_all(normalize ? T_len : 0), gs_all = Vector<T>::Zero(exact ? T_len : 0);

  // Loads chunk i's rows into the buffers; returns its length.
  auto load = [&](Index i) {
    const Index i0 = i * C, L = std::min(C, T_len - i0);
    w.Qc.topRows(L) = Q.middleRows(i0, L);
    w.Kc.topRows(L) = K.middleRows(i0, L);
    w.Vc.topRows(L) = V.middleRows(i0, L);
    w.Gc.topRows(L) = G.middleRows(i0, L);
    return L;
  };
  auto scores = [&](Index L) {  // A = Q_i K_i^T (.) D_L
    auto Ai = w.A.topLeftCorner(L, L);
    Ai.noalias() = w.Qc.topRows(L) * w.Kc.topRows(L).transpose();
    Ai.array() *= D.topLeftCorner(L, L).array();
  };
  // Gu = diag(a) G_i (or G_i itself) and dP = (Gu V_i^T + gs 1^T) (.) D_L, for chunk rows i0...
  auto upstream = [&](Index i0, Index L) -> const Matrix<T>& {
    const Matrix<T>* Gsrc = &w.Gc;
    if (normalize) {
      w.Gu.topRows(L) = a_all.segment(i0, L).asDiagonal() * w.Gc.topRows(L);
      Gsrc = &w.Gu;
    }
    auto dPi = w.dP.topLeftCorner(L, L);
    dPi.noalias() = Gsrc->topRows(L) * w.Vc.topRows(L).transpose();
    if (exact) dPi.colwise() += gs_all.segment(i0, L);
    dPi.array() *= D.topLeftCorner(L, L).array();
    return *Gsrc;
  };

  // Forward sweep: row factors and dQ.
  Matrix<Acc> S = Matrix<Acc>::Zero(dk, dv);
  Vector<Acc> z = Vector<Acc>::Zero(dk);
  if (init) {
    S = init->S;
    z = init->z;
  }
  for (Index i = 0; i < chunks; ++i) {
    const Index i0 = i * C, L = load(i);
    const bool state = i > 0 || init != nullptr;
    const Matrix<Acc>& Qa = w.Qa.of(w.Qc, L);
    if (score) {
      scores(L);
      const auto Ai = w.A.topLeftCorner(L, L);
      if (state) w.sz.head(L).noalias() = Qa.topRows(L) * z;
      if (exact) {
        auto Ui = w.U.topRows(L);
        Ui.noalias() = Ai * w.Vc.topRows(L);
        if (state) {
          w.Uq.topRows(L).noalias() = Qa.topRows(L) * S;
          Ui += (qf.head(L).asDiagonal() * w.Uq.topRows(L)).template cast<T>();
        }
      }
    }
    if (normalize) {
      for (Index j = 0; j < L; ++j) {
        double s = 0.0, gu = 0.0;
        if (score) {
          s = static_cast<double>(w.A.row(j).head(L).sum());
          if (state) s += static_cast<double>(qf(j) * w.sz(j));
        }
        if (exact) gu = static_cast<double>(w.Gc.row(j).dot(w.U.row(j)));
        const BackwardRowFactors f =
            backward_row_factors(decay, norm, args.detach_score_normalizer, p0 + i0 + j, s, gu);
        a_all(i0 + j) = static_cast<T>(f.a);
        if (exact) gs_all(i0 + j) = static_cast<T>(f.gs);
      }
    }
    const Matrix<T>& Gsrc = upstream(i0, L);
    auto dQi = w.dX.topRows(L);
    dQi.noalias() = w.dP.topLeftCorner(L, L) * w.Kc.topRows(L);
    if (state) {
      auto Guqi = w.Guq.topRows(L);
      Guqi.noalias() = qf.head(L).asDiagonal() * w.Gua.of(Gsrc, L).topRows(L);
      add_product(dQi, Guqi, S.transpose());
      if (exact) {
        w.gsq.head(L) = qf.head(L).cwiseProduct(gs_all.segment(i0, L).template cast<Acc>());
        add_product(dQi, w.gsq.head(L), z.transpose());
      }
    }
    dQ.middleRows(i0, L) = dQi;
    if (i + 1 < chunks) {
      // S <- gamma^C S + K_i^T diag(gamma^(C-1-l)) V_i (only full chunks precede another).
      auto Kw = w.Kk.topRows(L);
      Kw.noalias() = kf_full.asDiagonal() * w.Ka.of(w.Kc, L).topRows(L);
      S *= gC;
      S.noalias() += Kw.transpose() * w.Va.of(w.Vc, L).topRows(L);
      z = gC * z + Kw.colwise().sum().transpose();
    }
  }

  // Reverse sweep: dK, dV and the state gradients.
  Matrix<Acc>& dS = S;
  Vector<Acc>& dz = z;
  bool dS_nonzero = args.final_grad != nullptr;
  if (args.final_grad) {
    dS = args.final_grad->S;
    dz = args.final_grad->z;
  } else {
    dS.setZero();
    dz.setZero();
  }
  for (Index i = chunks - 1; i >= 0; --i) {
    const Index i0 = i * C, L = load(i);
    const bool carry = i > 0 || args.d_init != nullptr;  // dS before this chunk is needed
    const Vector<Acc> kf_short = L == C ? Vector<Acc>() : decay.template key_factors<Acc>(L);
    const auto kf = L == C ? kf_full.head(L) : kf_short.head(L);
    const Acc gL = L == C ? gC : static_cast<Acc>(decay.chunk_factor(L));
    scores(L);
    const Matrix<T>& Gsrc = upstream(i0, L);
    auto dKi = w.dX.topRows(L);
    auto dVi = w.dV.topRows(L);
    dKi.noalias() = w.dP.topLeftCorner(L, L).transpose() * w.Qc.topRows(L);
    dVi.noalias() = w.A.topLeftCorner(L, L).transpose() * Gsrc.topRows(L);
    if (dS_nonzero) {
      // The state after this chunk: S_next = gamma^L S_prev + K_i^T diag(gamma^(L-1-l)) V_i.
      auto Vki = w.Vk.topRows(L);
      auto Kki = w.Kk.topRows(L);
      Vki.noalias() = kf.asDiagonal() * w.Va.of(w.Vc, L).topRows(L);
      Kki.noalias() = kf.asDiagonal() * w.Ka.of(w.Kc, L).topRows(L);
      add_product(dKi, Vki, dS.transpose());
      add_product(dKi, kf, dz.transpose());
      add_product(dVi, Kki, dS);
    }
    if (carry) {
      const Matrix<Acc>& Qa = w.Qa.of(w.Qc, L);
      auto Guqi = w.Guq.topRows(L);
      Guqi.noalias() = qf.head(L).asDiagonal() * w.Gua.of(Gsrc, L).topRows(L);
      dS *= gL;
      dS.noalias() += Qa.topRows(L).transpose() * Guqi;
      dz *= gL;
      if (exact) {
        w.gsq.head(L) = qf.head(L).cwiseProduct(gs_all.segment(i0, L).template cast<Acc>());
        dz.noalias() += Qa.topRows(L).transpose() * w.gsq.head(L);
      }
      dS_nonzero = true;
    }
    dK.middleRows(i0, L) = dKi;
    dV.middleRows(i0, L) = dVi;
  }

  if (args.d_init) {
    // With no tokens dS and dz still hold dS_final, dz_final (the initial state is the final).
    args.d_init->S = std::move(dS);
    args.d_init->z = std::move(dz);
    args.d_init->position = p0;
  }
}

/// Whether chunkwise_backward runs a head on the forward's chunk kernels
/// (backward_chunkwise_fast.hpp): a CausalDecay mask and the state in the inputs' type.
template <class T, class Mask, class Acc>
constexpr bool chunkwise_backward_by_retention_applies() {
  return std::is_same<Mask, CausalDecay>::value && std::is_same<T, Acc>::value;
}

/// Chunkwise backward of one head into dQ, dK [T, dk] and dV [T, dv]; the inputs are checked.
template <class DQ, class DK, class DV, class DG, class OQ, class OK, class OV, class Mask,
          class Acc>
void chunkwise_backward(const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                        const Eigen::MatrixBase<DV>& V, const Mask& decay, Index chunk,
                        const Eigen::MatrixBase<DG>& G, OQ&& dQ, OK&& dK, OV&& dV,
                        const BackwardArgs<Acc>& args) {
  if constexpr (chunkwise_backward_by_retention_applies<typename DQ::Scalar, Mask, Acc>()) {
    if (Q.rows() > 0) {
      chunkwise_backward_by_retention(Q, K, V, decay, chunk, G, dQ, dK, dV, args);
      return;
    }
  }
  chunkwise_backward_sweeps(Q, K, V, decay, chunk, G, dQ, dK, dV, args);
}

}  // namespace detail
}  // namespace retention
