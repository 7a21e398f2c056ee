// retention: the parallel form (SPEC 2): O = (Q K^T (.) D) V + diag(gamma^(n+1)) Q S_init,
// computed block by block so that extra memory is O(T * tile), never T x T.
#pragma once

#include <retention/decay.hpp>
#include <retention/detail/kernel_common.hpp>
#include <retention/retention_state.hpp>

#include <algorithm>
#include <type_traits>

namespace retention {

/// Default query/key block size of the parallel form.
constexpr Index default_parallel_tile = 128;

/// Parallel retention, writing into `out` [T, dv]. See parallel_retention.
template <class DQ, class DK, class DV, class DOut, class Mask,
          class StateScalar = typename DQ::Scalar>
void parallel_retention_into(const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                             const Eigen::MatrixBase<DV>& V, const Mask& decay,
                             const Eigen::MatrixBase<DOut>& out_,
                             const RetentionOptions<StateScalar>& options = RetentionOptions<StateScalar>()) {
  detail::assert_retention_types<DQ, DK, DV, Mask, StateScalar>();
  using T = typename DQ::Scalar;
  using Acc = StateScalar;
  const char* fn = "parallel_retention";
  detail::check_qkv(fn, Q, K, V);
  detail::check_shape(fn, "out", out_, Q.rows(), V.cols());
  if (options.tile < 0) detail::fail(fn, "options.tile must be >= 0, got " + std::to_string(options.tile));
  auto& out = const_cast<Eigen::MatrixBase<DOut>&>(out_);
  const Index T_len = Q.rows(), dk = Q.cols(), dv = V.cols();

  const RetentionState<Acc>* init = options.initial_state;
  if (init) detail::check_state(fn, *init, dk, dv);
  const Index p0 = init ? init->position : 0;

  // Blocks of B queries against blocks of B keys on one grid: the diagonal block always has the
  // same mask D_B (top-left corner for the last block); an earlier key block m0 < n0 factors as
  // gamma^(n-m) = gamma^(n-n0) * gamma^(n0-m), both <= 1, so no factor can overflow.
  const Index B = std::min(options.tile > 0 ? options.tile : default_parallel_tile, std::max<Index>(T_len, 1));
  const Matrix<T> D = decay.template weights<T>(0, B, 0, B);
  Vector<T> qf(B);  // gamma^j: the query side of an off-diagonal block
  for (Index j = 0; j < B; ++j) qf(j) = static_cast<T>(decay.factor(j));
  Vector<T> kf(B);
  Matrix<T> A(B, B);
  Vector<T> r(B);
  Matrix<T> inter;
  Vector<T> Qz;
  if (init) {
    inter.resize(B, dv);
    Qz.resize(B);
  }

  for (Index n0 = 0; n0 < T_len; n0 += B) {
    const Index Ln = std::min(B, T_len - n0);
    const auto Qn = Q.middleRows(n0, Ln);
    auto On = out.middleRows(n0, Ln);
    On.setZero();
    r.head(Ln).setZero();
    for (Index m0 = 0; m0 <= n0; m0 += B) {
      const Index Lm = std::min(B, T_len - m0);
      auto Am = A.topLeftCorner(Ln, Lm);
      if (m0 == n0) {
        Am.noalias() = Qn * K.middleRows(m0, Lm).transpose();
        Am.array() *= D.topLeftCorner(Ln, Lm).array();
      } else {
        // Largest weight of the block is gamma^(n0 - (m0 + Lm - 1)); if it is 0 in T, so is
        // every weight of the block, and the block adds exactly nothing.
        if (static_cast<T>(decay.factor(n0 - m0 - Lm + 1)) == T(0)) continue;
        for (Index l = 0; l < Lm; ++l) kf(l) = static_cast<T>(decay.factor(n0 - m0 - l));
        Am.noalias() = Qn * K.middleRows(m0, Lm).transpose();
        Am = qf.head(Ln).asDiagonal() * Am * kf.head(Lm).asDiagonal();
      }
      r.head(Ln) += Am.rowwise().sum();
      On.noalias() += Am * V.middleRows(m0, Lm);
    }
    if (init) {
      // diag(gamma^(n+1)) Q S_init with n = n0 + j, and the score term gamma^(n+1) q . z_init.
      for (Index j = 0; j < Ln; ++j) kf(j) = static_cast<T>(decay.factor(n0 + j + 1));
      if (std::is_same<T, Acc>::value) {
        inter.topRows(Ln).noalias() = Qn * init->S.template cast<T>();
      } else {
        inter.topRows(Ln) = (Qn.template cast<Acc>() * init->S).template cast<T>();
      }
      On.noalias() += kf.head(Ln).asDiagonal() * inter.topRows(Ln);
      Qz.head(Ln).noalias() = Qn * init->z.template cast<T>();
      r.head(Ln).array() += kf.head(Ln).array() * Qz.head(Ln).array();
    }
    detail::normalize_rows(decay, options.normalization, p0 + n0, On, r.head(Ln));
  }

  if (options.final_state) {
    // S_final = gamma^T S_init + sum_m gamma^(T-1-m) k_m^T v_m (z likewise), key block by block.
    Matrix<Acc> S = Matrix<Acc>::Zero(dk, dv);
    Vector<Acc> z = Vector<Acc>::Zero(dk);
    if (init) {
      const Acc gT = static_cast<Acc>(decay.factor(T_len));
      S = gT * init->S;
      z = gT * init->z;
    }
    Matrix<T> Kw(B, dk);
    for (Index m0 = 0; m0 < T_len; m0 += B) {
      const Index Lm = std::min(B, T_len - m0);
      for (Index l = 0; l < Lm; ++l) kf(l) = static_cast<T>(decay.factor(T_len - 1 - m0 - l));
      auto Kwm = Kw.topRows(Lm);
      Kwm.noalias() = kf.head(Lm).asDiagonal() * K.middleRows(m0, Lm);
      S += (Kwm.transpose() * V.middleRows(m0, Lm)).template cast<Acc>();
      z += (Kwm.transpose() * Vector<T>::Ones(Lm)).template cast<Acc>();
    }
    options.final_state->S = std::move(S);
    options.final_state->z = std::move(z);
    options.final_state->position = p0 + T_len;
  }
}

/// Parallel retention of one head, SPEC 2: O = (Q K^T (.) D) V + diag(gamma^(n+1)) Q S_init, then
/// the chosen normalisation. Q [T, dk], K [T, dk], V [T, dv] -> O [T, dv]; extra memory O(T * tile).
template <class DQ, class DK, class DV, class Mask, class StateScalar = typename DQ::Scalar>
Matrix<typename DQ::Scalar> parallel_retention(
    const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K, const Eigen::MatrixBase<DV>& V,
    const Mask& decay, const RetentionOptions<StateScalar>& options = RetentionOptions<StateScalar>()) {
  Matrix<typename DQ::Scalar> out(Q.rows(), V.cols());
  parallel_retention_into(Q, K, V, decay, out, options);
  return out;
}

}  // namespace retention
