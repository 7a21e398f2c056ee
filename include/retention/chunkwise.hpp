// retention: the chunkwise form (SPEC 2): parallel inside a chunk, recurrent across chunks.
#pragma once

#include <retention/decay.hpp>
#include <retention/detail/kernel_common.hpp>
#include <retention/retention_state.hpp>

#include <algorithm>
#include <type_traits>

namespace retention {

/// Chunk size used when the caller passes none (chunk = 0 in the multi-head API).
/// Heuristic: 64 keeps the intra-chunk work (2C(dk+dv) per token) below the state work
/// (4 dk dv) for dk, dv >= 64 while the GEMMs stay large enough to run near peak.
inline Index recommended_chunk(Index key_dim, Index value_dim) {
  (void)key_dim;
  (void)value_dim;
  return 64;
}

/// Chunkwise retention, writing into `out` [T, dv]. See chunkwise_retention.
template <class DQ, class DK, class DV, class DOut, class Mask,
          class StateScalar = typename DQ::Scalar>
void chunkwise_retention_into(const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                              const Eigen::MatrixBase<DV>& V, const Mask& decay, Index chunk,
                              const Eigen::MatrixBase<DOut>& out_,
                              const RetentionOptions<StateScalar>& options = RetentionOptions<StateScalar>()) {
  detail::assert_retention_types<DQ, DK, DV, Mask, StateScalar>();
  using T = typename DQ::Scalar;
  using Acc = StateScalar;
  const char* fn = "chunkwise_retention";
  detail::check_qkv(fn, Q, K, V);
  detail::check_positive(fn, "chunk", chunk);
  detail::check_shape(fn, "out", out_, Q.rows(), V.cols());
  auto& out = const_cast<Eigen::MatrixBase<DOut>&>(out_);
  const Index T_len = Q.rows(), dk = Q.cols(), dv = V.cols();

  Matrix<Acc> S = Matrix<Acc>::Zero(dk, dv);
  Vector<Acc> z = Vector<Acc>::Zero(dk);
  Index p0 = 0;
  bool state_nonzero = false;
  if (options.initial_state) {
    detail::check_state(fn, *options.initial_state, dk, dv);
    S = options.initial_state->S;
    z = options.initial_state->z;
    p0 = options.initial_state->position;
    state_nonzero = true;
  }

  // Everything that depends only on offsets inside a chunk is formed once: the intra-chunk mask
  // D_C (its top-left L x L corner is D_L), the query factors gamma^(j+1) and, for full chunks,
  // the key factors gamma^(C-1-l). The last, shorter chunk forms its own key factors.
  const Index C = std::min(chunk, std::max<Index>(T_len, 1));
  const Matrix<T> D = decay.template weights<T>(0, C, 0, C);
  const Vector<T> qf = decay.template query_factors<T>(C);
  const Vector<T> kf_full = decay.template key_factors<T>(C);
  const Acc gC = static_cast<Acc>(decay.chunk_factor(C));

  Matrix<T> A(C, C);
  Matrix<T> inter(C, dv);
  Matrix<T> KtV(dk, dv);
  Matrix<T> Kw(C, dk);
  Vector<T> Qz(C);
  Vector<T> r(C);
  Vector<T> kf_last;

  for (Index i0 = 0; i0 < T_len; i0 += C) {
    const Index L = std::min(C, T_len - i0);
    const auto Qi = Q.middleRows(i0, L);
    const auto Ki = K.middleRows(i0, L);
    const auto Vi = V.middleRows(i0, L);
    auto Oi = out.middleRows(i0, L);
    auto Ai = A.topLeftCorner(L, L);

    // Intra-chunk: (Q_i K_i^T (.) D_L) V_i.
    Ai.noalias() = Qi * Ki.transpose();
    Ai.array() *= D.topLeftCorner(L, L).array();
    Oi.noalias() = Ai * Vi;
    r.head(L) = Ai.rowwise().sum();

    // Inter-chunk: diag(gamma^(j+1)) Q_i S_prev, and the matching score term q_j . z_prev.
    if (state_nonzero) {
      if (std::is_same<T, Acc>::value) {
        inter.topRows(L).noalias() = Qi * S.template cast<T>();
      } else {
        inter.topRows(L) = (Qi.template cast<Acc>() * S).template cast<T>();
      }
      Oi.noalias() += qf.head(L).asDiagonal() * inter.topRows(L);
      Qz.head(L).noalias() = Qi * z.template cast<T>();
      r.head(L).array() += qf.head(L).array() * Qz.head(L).array();
    }
    detail::normalize_rows(decay, options.normalization, p0 + i0, Oi, r.head(L));

    // State: S_next = gamma^L S_prev + K_i^T diag(gamma^(L-1-l)) V_i; z likewise with V = 1.
    const Vector<T>* kf = &kf_full;
    Acc gL = gC;
    if (L != C) {
      kf_last = decay.template key_factors<T>(L);
      kf = &kf_last;
      gL = static_cast<Acc>(decay.chunk_factor(L));
    }
    auto Kwi = Kw.topRows(L);
    Kwi.noalias() = kf->asDiagonal() * Ki;
    KtV.noalias() = Kwi.transpose() * Vi;
    if (state_nonzero) {
      S *= gL;
      z *= gL;
    }
    S += KtV.template cast<Acc>();
    z += (Kwi.transpose() * Vector<T>::Ones(L)).template cast<Acc>();
    state_nonzero = true;
  }

  if (options.final_state) {
    options.final_state->S = std::move(S);
    options.final_state->z = std::move(z);
    options.final_state->position = p0 + T_len;
  }
}

/// Chunkwise retention of one head, SPEC 2, chunk length `chunk` >= 1 (need not divide T, may
/// exceed it): O_i = (Q_i K_i^T (.) D_L) V_i + diag(gamma^(j+1)) Q_i S_prev,
/// S_next = gamma^L S_prev + K_i^T diag(gamma^(L-1-l)) V_i. Q [T, dk], K [T, dk], V [T, dv] -> [T, dv].
template <class DQ, class DK, class DV, class Mask, class StateScalar = typename DQ::Scalar>
Matrix<typename DQ::Scalar> chunkwise_retention(
    const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K, const Eigen::MatrixBase<DV>& V,
    const Mask& decay, Index chunk,
    const RetentionOptions<StateScalar>& options = RetentionOptions<StateScalar>()) {
  Matrix<typename DQ::Scalar> out(Q.rows(), V.cols());
  chunkwise_retention_into(Q, K, V, decay, chunk, out, options);
  return out;
}

}  // namespace retention
