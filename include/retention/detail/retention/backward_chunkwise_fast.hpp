// retention::detail: the chunkwise backward of a CausalDecay head as three retentions run by the
// forward chunkwise kernels (docs/math.md §7.1, §7.4). With Gu = diag(c / mu) G (G itself for
// normalisation none) and beta the score path's dL/ds (backward_kernels.hpp):
//   dQ_n = sum_{m <= n} gamma^(n-m) (Gu_n . V_m) K_m + gamma^(n+1) Gu_n S_init^T + beta_n z_n^T
//   dK_m = sum_{n >= m} gamma^(n-m) (V_m . Gu_n) Q_n + gamma^(T-1-m) V_m dS_final^T + w_m
//   dV_m = sum_{n >= m} gamma^(n-m) (K_m . Q_n) Gu_n + gamma^(T-1-m) K_m dS_final
// with w_m = sum_{n >= m} gamma^(n-m) beta_n q_n + gamma^(T-1-m) dz_final. The first terms are
// causal retentions: queries Gu, keys V, values K from S_init^T; and, in reversed time (m' =
// T-1-m; the weight gamma^(n-m) depends on the distance only, so the reversed problem has the same
// mask), queries V, keys Gu, values Q, and queries K, keys Q, values Gu. A reversed row m' sees an
// initial state with weight gamma^(m'+1), so dS_final / gamma as initial state gives the
// gamma^(T-1-m) dS_final terms, and gamma times the dK retention's final state is dS_init^T
// (sum_n gamma^(n+1) Q_n^T Gu_n + gamma^T dS_final). Small gammas, where 1 / gamma could
// overflow, add those terms row by row instead (gamma^(T-1-m) dies out within a few hundred rows
// there). The score path's pieces are O(T dk) recurrences in double: z_n (forward) gives s_n =
// q_n . z_n and the beta_n z_n^T rows, w_m (backward) the w rows and dz_init = gamma w_0. The row
// factors need u_n: one forward retention of Q, K, V from S_init (normalisation none), written
// into dV, which the dV retention overwrites last. Nothing of size T x d is allocated: the
// reversed operands are views, Gu is a lazy row scaling of G.
#pragma once

#include <retention/chunkwise.hpp>
#include <retention/decay.hpp>
#include <retention/detail/retention/backward_kernels.hpp>

#include <algorithm>

namespace retention {
namespace detail {

/// Largest gamma whose final-state terms are added row by row instead of through dS_final / gamma.
constexpr double backward_divide_min_gamma = 0.5;

/// Chunkwise backward of one CausalDecay head (state in the inputs' type) into dQ, dK [T, dk] and
/// dV [T, dv], T >= 1; the inputs are checked. Extra memory O(T + dk dv) besides the forward
/// kernels' chunk buffers.
template <class DQ, class DK, class DV, class DG, class OQ, class OK, class OV, class T>
void chunkwise_backward_by_retention(const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                                     const Eigen::MatrixBase<DV>& V, const CausalDecay& decay,
                                     Index chunk, const Eigen::MatrixBase<DG>& G, OQ& dQ, OK& dK,
                                     OV& dV, const BackwardArgs<T>& args) {
  const Index T_len = Q.rows(), dk = Q.cols(), dv = V.cols();
  const Normalization norm = args.normalization;
  const bool normalize = norm != Normalization::none;
  const bool score = norm == Normalization::decay_and_score;
  const bool exact = args.score_path();
  const RetentionState<T>* init = args.init;
  const RetentionState<T>* fgrad = args.final_grad;
  const Index p0 = args.start_position();
  const double gamma = decay.gamma();
  const bool divide = gamma > backward_divide_min_gamma;
  RetentionState<T>* const no_state = nullptr;  // typed: chunkwise_same_type deduces T from it

  // z_n = gamma z_{n-1} + k_n^T from z_init, in double; calls row(n, z_n) for n = 0..T-1.
  auto z_sweep = [&](auto&& row) {
    Vector<double> z =
        init ? Vector<double>(init->z.template cast<double>()) : Vector<double>::Zero(dk);
    for (Index n = 0; n < T_len; ++n) {
      z = gamma * z + K.row(n).transpose().template cast<double>();
      row(n, z);
    }
  };

  // Row factors: Gu_n = a_n G_n, beta_n (exact score path only).
  Vector<T> a(normalize ? T_len : 0), beta = Vector<T>::Zero(exact ? T_len : 0);
  if (normalize) {
    Vector<double> s = Vector<double>::Zero(T_len);
    if (score)
      z_sweep([&](Index n, const Vector<double>& z) {
        s(n) = Q.row(n).template cast<double>().dot(z.transpose());
      });
    if (exact) {
      // u_n = q_n S_n into dV, which the dV retention below overwrites.
      chunkwise_same_type(Q, K, V, decay, chunk, dV, Normalization::none, 0, init, no_state);
    }
    for (Index n = 0; n < T_len; ++n) {
      const double gu = exact ? static_cast<double>(G.row(n).dot(dV.row(n))) : 0.0;
      const BackwardRowFactors f =
          backward_row_factors(decay, norm, args.detach_score_normalizer, p0 + n, s(n), gu);
      a(n) = static_cast<T>(f.a);
      if (exact) beta(n) = static_cast<T>(f.gs);
    }
  }

  // dS_final / gamma as the reversed retentions' initial states.
  const bool divided = fgrad != nullptr && divide;
  RetentionState<T> init_k, init_v;
  if (divided) {
    const T inv = static_cast<T>(1.0 / gamma);
    init_k.S = inv * fgrad->S.transpose();
    init_k.z = Vector<T>::Zero(dv);
    init_v.S = inv * fgrad->S;
    init_v.z = Vector<T>::Zero(dk);
  }
  RetentionState<T> final_k;

  auto reversed = [](const auto& x) { return x.colwise().reverse(); };
  auto run = [&](const auto& Gu) {
    RetentionState<T> init_q;
    if (init) {
      init_q.S = init->S.transpose();
      init_q.z = Vector<T>::Zero(dv);
    }
    chunkwise_same_type(Gu, V, K, decay, chunk, dQ, Normalization::none, 0,
                        init ? &init_q : nullptr, no_state);
    auto dK_rev = dK.colwise().reverse();
    chunkwise_same_type(reversed(V), reversed(Gu), reversed(Q), decay, chunk, dK_rev,
                        Normalization::none, 0, divided ? &init_k : nullptr,
                        args.d_init ? &final_k : no_state);
    auto dV_rev = dV.colwise().reverse();
    chunkwise_same_type(reversed(K), reversed(Q), reversed(Gu), decay, chunk, dV_rev,
                        Normalization::none, 0, divided ? &init_v : nullptr, no_state);
  };
  if (normalize)
    run(a.asDiagonal() * G);
  else
    run(G);

  if (exact)
    z_sweep([&](Index n, const Vector<double>& z) {
      dQ.row(n) += (static_cast<double>(beta(n)) * z.transpose()).template cast<T>();
    });
  // w_m, last row first; dz_init = gamma w_0.
  Vector<double> w = Vector<double>::Zero(dk);
  if (exact || fgrad) {
    if (fgrad) w = fgrad->z.template cast<double>();
    for (Index m = T_len - 1; m >= 0; --m) {
      if (m < T_len - 1) w *= gamma;
      if (exact) w += static_cast<double>(beta(m)) * Q.row(m).transpose().template cast<double>();
      dK.row(m) += w.transpose().template cast<T>();
    }
  }
  if (fgrad && !divide) {
    // gamma^(T-1-m) (V_m dS_final^T, K_m dS_final), from the last row back while the factor is
    // nonzero.
    for (Index m = T_len - 1; m >= 0; --m) {
      const T f = static_cast<T>(decay.chunk_factor(T_len - 1 - m));
      if (f == T(0)) break;
      dK.row(m).noalias() += f * (V.row(m) * fgrad->S.transpose());
      dV.row(m).noalias() += f * (K.row(m) * fgrad->S);
    }
  }

  if (args.d_init) {
    const T g = static_cast<T>(gamma);
    Matrix<T> dS = g * final_k.S.transpose();
    Vector<T> dz = (gamma * w).template cast<T>();
    if (fgrad && !divide) dS += static_cast<T>(decay.chunk_factor(T_len)) * fgrad->S;
    args.d_init->S = std::move(dS);
    args.d_init->z = std::move(dz);
    args.d_init->position = p0;
  }
}

}  // namespace detail
}  // namespace retention
