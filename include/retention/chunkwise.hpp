// retention: the chunkwise form (SPEC 2): parallel inside a chunk, recurrent across chunks.
#pragma once

#include <retention/decay.hpp>
#include <retention/detail/kernel_common.hpp>
#include <retention/detail/threading.hpp>
#include <retention/retention_state.hpp>

#include <algorithm>
#include <type_traits>

namespace retention {

/// Chunk size used when the caller passes none (chunk = 0 in the multi-head API).
/// Per token and head the chunkwise form costs 2C(dk+dv) (intra-chunk) + 4 dk dv (state) FLOPs, so
/// a smaller C does less work, while GEMMs shorter than about 32 rows lose their efficiency.
/// Measured on Sapphire Rapids (fp32, one head, T = 8192, time in ms for C = 16 / 32 / 64 / 128 /
/// 256, medians of 7, three runs on a shared machine): dk = dv = 32: 1.5-4 / 2.0 / 2.4 / 3.5-8 /
/// 10; dk = dv = 64: 8-9 / 4.2-8.8 / 9.2 / 11 / 15; dk = dv = 128: 21 / 21 / 22 / 19-25 / 38; dk =
/// dv = 256: 69-73 / 63-75 / 64-81 / 85-97 / 95-132; and 8 heads of 128 through
/// multi_head_retention (bench_speed): 153 / 156 / 185 / 274 ms for C = 32 / 64 / 128 / 256.
/// In four full bench/compare runs (8 heads of 128, 2 threads) C = 32 beat C = 64 every time, by
/// 2 / 2 / 10 / 13 %; single heads of 256 show 32 and 64 level. Hence 32 up to dk + dv = 256, and
/// 64 for wider heads, where the 4 dk dv state work per token dominates and longer GEMMs pay.
inline Index recommended_chunk(Index key_dim, Index value_dim) {
  return key_dim + value_dim <= 256 ? 32 : 64;
}

namespace detail {

/// Chunkwise retention with the state in the inputs' own type: one fused product per chunk.
/// The state lives in the bottom dk rows of W = [V_i ; S] ((C + dk) x dv) and the scaled queries in
/// the right part of X = [A_i | diag(gamma^(j+1)) Q_i] (C x (C + dk)), so that
/// O_i = X W = (Q_i K_i^T (.) D_L) V_i + diag(gamma^(j+1)) Q_i S_prev is one GEMM whose operands
/// stay hot in cache from chunk to chunk. Three GEMMs per chunk in all: Q_i K_i^T, X W, K~_i^T V_i.
template <class DQ, class DK, class DV, class DOut, class Mask, class T>
void chunkwise_same_type(const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                         const Eigen::MatrixBase<DV>& V, const Mask& decay, Index chunk, DOut& out,
                         Normalization normalization, Index p0, const RetentionState<T>* init,
                         RetentionState<T>* final_state) {
  const Index T_len = Q.rows(), dk = Q.cols(), dv = V.cols();
  const Index C = std::min(chunk, std::max<Index>(T_len, 1));
  const bool score = normalization == Normalization::decay_and_score;

  Matrix<T> X(C, C + dk);
  Matrix<T> W(C + dk, dv);
  Matrix<T> Kw(C, dk);
  Vector<T> z(dk);
  Vector<T> r(C);
  auto S = W.bottomRows(dk);
  bool state_nonzero = init != nullptr;
  if (init) {
    S = init->S;
    z = init->z;
  } else {
    S.setZero();
    z.setZero();
  }

  // Everything that depends only on offsets inside a chunk is formed once: the intra-chunk mask
  // D_C (its top-left L x L corner is D_L), gamma^(j+1) and, for full chunks, gamma^(C-1-l).
  const Matrix<T> D = decay.template weights<T>(0, C, 0, C);
  const Vector<T> qf = decay.template query_factors<T>(C);
  Vector<T> kf = decay.template key_factors<T>(C);
  const T gC = static_cast<T>(decay.chunk_factor(C));

  for (Index i0 = 0; i0 < T_len; i0 += C) {
    const Index L = std::min(C, T_len - i0);
    if (L != C) kf = decay.template key_factors<T>(L);
    const T gL = L == C ? gC : static_cast<T>(decay.chunk_factor(L));
    const auto Qi = Q.middleRows(i0, L);
    const auto Ki = K.middleRows(i0, L);
    auto Oi = out.middleRows(i0, L);
    // V_i goes right above S, so that [V_i ; S] is one contiguous operand.
    auto Wi = W.middleRows(C - L, L + dk);
    auto Vi = W.middleRows(C - L, L);
    Vi = V.middleRows(i0, L);

    auto Ai = X.topLeftCorner(L, L);
    Ai.noalias() = Qi * Ki.transpose();
    Ai.array() *= D.topLeftCorner(L, L).array();
    if (score) r.head(L) = Ai.rowwise().sum();
    if (state_nonzero) {
      auto Qs = X.block(0, L, L, dk);
      Qs.noalias() = qf.head(L).asDiagonal() * Qi;
      if (score) r.head(L).noalias() += Qs * z;
      Oi.noalias() = X.topLeftCorner(L, L + dk) * Wi;
    } else {
      Oi.noalias() = Ai * Vi;
    }
    normalize_rows(decay, normalization, p0 + i0, Oi, r.head(L));

    // S_next = gamma^L S_prev + K_i^T diag(gamma^(L-1-l)) V_i; z likewise with V = 1.
    auto Kwi = Kw.topRows(L);
    Kwi.noalias() = kf.head(L).asDiagonal() * Ki;
    if (state_nonzero) {
      S *= gL;
      z *= gL;
      S.noalias() += Kwi.transpose() * Vi;
    } else {
      S.noalias() = Kwi.transpose() * Vi;
    }
    z.noalias() += Kwi.colwise().sum().transpose();
    state_nonzero = true;
  }

  if (final_state) {
    final_state->S = S;
    final_state->z = z;
    final_state->position = p0 + T_len;
  }
}

/// Chunkwise retention with a wider state than the inputs (e.g. double state, float inputs): the
/// state products run in the state's type.
template <class DQ, class DK, class DV, class DOut, class Mask, class Acc>
void chunkwise_wide_state(const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                          const Eigen::MatrixBase<DV>& V, const Mask& decay, Index chunk, DOut& out,
                          Normalization normalization, Index p0, const RetentionState<Acc>* init,
                          RetentionState<Acc>* final_state) {
  using T = typename DQ::Scalar;
  const Index T_len = Q.rows(), dk = Q.cols(), dv = V.cols();
  Matrix<Acc> S = Matrix<Acc>::Zero(dk, dv);
  Vector<Acc> z = Vector<Acc>::Zero(dk);
  bool state_nonzero = false;
  if (init) {
    S = init->S;
    z = init->z;
    state_nonzero = true;
  }
  const Index C = std::min(chunk, std::max<Index>(T_len, 1));
  const Matrix<T> D = decay.template weights<T>(0, C, 0, C);
  const Vector<Acc> qf = decay.template query_factors<Acc>(C);
  Vector<Acc> kf = decay.template key_factors<Acc>(C);
  const Acc gC = static_cast<Acc>(decay.chunk_factor(C));

  Matrix<T> A(C, C);
  Matrix<Acc> Qa(C, dk), Ka(C, dk), Va(C, dv), inter(C, dv);
  Vector<T> r(C);
  for (Index i0 = 0; i0 < T_len; i0 += C) {
    const Index L = std::min(C, T_len - i0);
    if (L != C) kf = decay.template key_factors<Acc>(L);
    const Acc gL = L == C ? gC : static_cast<Acc>(decay.chunk_factor(L));
    const auto Qi = Q.middleRows(i0, L);
    const auto Ki = K.middleRows(i0, L);
    const auto Vi = V.middleRows(i0, L);
    auto Oi = out.middleRows(i0, L);
    auto Ai = A.topLeftCorner(L, L);
    Ai.noalias() = Qi * Ki.transpose();
    Ai.array() *= D.topLeftCorner(L, L).array();
    Oi.noalias() = Ai * Vi;
    r.head(L) = Ai.rowwise().sum();
    if (state_nonzero) {
      auto Qs = Qa.topRows(L);
      Qs.noalias() = qf.head(L).asDiagonal() * Qi.template cast<Acc>();
      auto In = inter.topRows(L);
      In.noalias() = Qs * S;
      Oi += In.template cast<T>();
      r.head(L) += (Qs * z).template cast<T>();
    }
    normalize_rows(decay, normalization, p0 + i0, Oi, r.head(L));
    auto Kwi = Ka.topRows(L);
    Kwi.noalias() = kf.head(L).asDiagonal() * Ki.template cast<Acc>();
    auto Vai = Va.topRows(L);
    Vai = Vi.template cast<Acc>();
    if (state_nonzero) {
      S *= gL;
      z *= gL;
    }
    S.noalias() += Kwi.transpose() * Vai;
    z.noalias() += Kwi.colwise().sum().transpose();
    state_nonzero = true;
  }
  if (final_state) {
    final_state->S = std::move(S);
    final_state->z = std::move(z);
    final_state->position = p0 + T_len;
  }
}

}  // namespace detail

/// Chunkwise retention, writing into `out` [T, dv]. See chunkwise_retention.
template <class DQ, class DK, class DV, class DOut, class Mask,
          class StateScalar = typename DQ::Scalar>
void chunkwise_retention_into(
    const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K, const Eigen::MatrixBase<DV>& V,
    const Mask& decay, Index chunk, const Eigen::MatrixBase<DOut>& out_,
    const RetentionOptions<StateScalar>& options = RetentionOptions<StateScalar>()) {
  detail::assert_retention_types<DQ, DK, DV, Mask, StateScalar>();
  using T = typename DQ::Scalar;
  const char* fn = "chunkwise_retention";
  detail::check_qkv(fn, Q, K, V);
  detail::check_positive(fn, "chunk", chunk);
  detail::check_shape(fn, "out", out_, Q.rows(), V.cols());
  auto& out = const_cast<Eigen::MatrixBase<DOut>&>(out_);
  const RetentionState<StateScalar>* init = options.initial_state;
  if (init) detail::check_state(fn, *init, Q.cols(), V.cols());
  const detail::SerialEigenScope serial_products;  // threads belong over heads, not small chunks
  const Index p0 = init ? init->position : 0;
  // Both paths read the initial state before writing the final one, so they may alias.
  if constexpr (std::is_same<T, StateScalar>::value) {
    detail::chunkwise_same_type(Q, K, V, decay, chunk, out, options.normalization, p0, init,
                                options.final_state);
  } else {
    detail::chunkwise_wide_state(Q, K, V, decay, chunk, out, options.normalization, p0, init,
                                 options.final_state);
  }
}

/// Chunkwise retention of one head, SPEC 2, chunk length `chunk` >= 1 (need not divide T, may
/// exceed it): O_i = (Q_i K_i^T (.) D_L) V_i + diag(gamma^(j+1)) Q_i S_prev,
/// S_next = gamma^L S_prev + K_i^T diag(gamma^(L-1-l)) V_i. Q [T, dk], K [T, dk], V [T, dv] -> [T,
/// dv].
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
