// Naive double-precision gradients of SPEC 2 retention (SPEC 7), written element by element from
// the equations with explicit loops. Shares no code with the library's kernels; the forward
// quantities (raw rows, scores, decay sums) come from retention_reference.hpp.
//
// With o_n = a_n u_n (u_n the raw row, a_n the normalisation factor), s_n the raw score
// sum_m gamma^(n-m) q_n . k_m + gamma^(n+1) q_n . z_init, c_n = 1 / sqrt(decay_sum_n), r_n = c_n
// s_n:
//   Gu_n = a_n G_n,  gs_n = -c_n^2 (G_n . u_n) / (r_n |r_n|) where |r_n| > 1 (exact score path),
//   w[n, m] = gamma^(n-m) (Gu_n . v_m + gs_n) for m <= n,
//   dQ[n, i]  = sum_{m<=n} w[n, m] k_m[i] + gamma^(n+1) (sum_j Gu_n[j] S0[i, j] + gs_n z0[i])
//   dK[m, i]  = sum_{n>=m} w[n, m] q_n[i] + gamma^(T-1-m) (sum_j dSf[i, j] v_m[j] + dzf[i])
//   dV[m, j]  = sum_{n>=m} gamma^(n-m) (q_n . k_m) Gu_n[j] + gamma^(T-1-m) sum_i k_m[i] dSf[i, j]
//   dS0[i, j] = sum_n gamma^(n+1) q_n[i] Gu_n[j] + gamma^T dSf[i, j]
//   dz0[i]    = sum_n gamma^(n+1) q_n[i] gs_n + gamma^T dzf[i]
#pragma once

#include "reference/retention_reference.hpp"

#include <cmath>

namespace retention_reference {

/// dL/dQ, dL/dK, dL/dV and dL/d(S_init, z_init) (zero-sized without an initial state).
struct Gradients {
  Mat dQ, dK, dV;
  Mat dS0;
  Vec dz0;
};

/// Gradients of L = sum(G .* O) + sum(dSf .* S_final) + dzf . z_final, O = retention(Q, K, V,
/// gamma, normalization, init). `final_grad` holds dSf in S and dzf in z (nullptr = zero);
/// `detach` treats max(|r_n|, 1) as a constant.
inline Gradients retention_backward(const Mat& Q, const Mat& K, const Mat& V, double gamma,
                                    Normalization normalization, const State* init, const Mat& G,
                                    const State* final_grad, bool detach) {
  const Index T = Q.rows(), dk = Q.cols(), dv = V.cols();
  const Raw raw = retention_reference::raw(Q, K, V, gamma, init);

  Mat Gu(T, dv);
  Vec gs = Vec::Zero(T);
  for (Index n = 0; n < T; ++n) {
    double a = 1.0;
    if (normalization != Normalization::none) {
      const double c = 1.0 / std::sqrt(raw.decay_sum(n));
      a = c;
      if (normalization == Normalization::decay_and_score) {
        const double r = c * raw.score(n);
        if (std::abs(r) > 1.0) {
          a = c / std::abs(r);
          if (!detach) {
            double gu = 0.0;
            for (Index j = 0; j < dv; ++j) gu += G(n, j) * raw.O(n, j);
            gs(n) = -c * c * gu / (r * std::abs(r));
          }
        }
      }
    }
    for (Index j = 0; j < dv; ++j) Gu(n, j) = a * G(n, j);
  }

  Gradients g;
  g.dQ = Mat::Zero(T, dk);
  g.dK = Mat::Zero(T, dk);
  g.dV = Mat::Zero(T, dv);
  for (Index n = 0; n < T; ++n)
    for (Index m = 0; m <= n; ++m) {
      const double decay = gamma_pow(gamma, n - m);
      double gv = 0.0, qk = 0.0;
      for (Index j = 0; j < dv; ++j) gv += Gu(n, j) * V(m, j);
      for (Index i = 0; i < dk; ++i) qk += Q(n, i) * K(m, i);
      const double w = decay * (gv + gs(n));
      for (Index i = 0; i < dk; ++i) {
        g.dQ(n, i) += w * K(m, i);
        g.dK(m, i) += w * Q(n, i);
      }
      for (Index j = 0; j < dv; ++j) g.dV(m, j) += decay * qk * Gu(n, j);
    }
  if (init) {
    g.dS0 = Mat::Zero(dk, dv);
    g.dz0 = Vec::Zero(dk);
    for (Index n = 0; n < T; ++n) {
      const double w = gamma_pow(gamma, n + 1);
      for (Index i = 0; i < dk; ++i) {
        double gsz = gs(n) * init->z(i);
        for (Index j = 0; j < dv; ++j) gsz += Gu(n, j) * init->S(i, j);
        g.dQ(n, i) += w * gsz;
        g.dz0(i) += w * Q(n, i) * gs(n);
        for (Index j = 0; j < dv; ++j) g.dS0(i, j) += w * Q(n, i) * Gu(n, j);
      }
    }
  }
  if (final_grad) {
    for (Index m = 0; m < T; ++m) {
      const double w = gamma_pow(gamma, T - 1 - m);
      for (Index i = 0; i < dk; ++i) {
        double sv = final_grad->z(i);
        for (Index j = 0; j < dv; ++j) sv += final_grad->S(i, j) * V(m, j);
        g.dK(m, i) += w * sv;
      }
      for (Index j = 0; j < dv; ++j) {
        double ks = 0.0;
        for (Index i = 0; i < dk; ++i) ks += K(m, i) * final_grad->S(i, j);
        g.dV(m, j) += w * ks;
      }
    }
    if (init) {
      const double w = gamma_pow(gamma, T);
      for (Index i = 0; i < dk; ++i) {
        g.dz0(i) += w * final_grad->z(i);
        for (Index j = 0; j < dv; ++j) g.dS0(i, j) += w * final_grad->S(i, j);
      }
    }
  }
  return g;
}

/// The scalar loss whose gradient retention_backward returns, evaluated by the forward reference
/// (for finite differences).
inline double retention_loss(const Mat& Q, const Mat& K, const Mat& V, double gamma,
                             Normalization normalization, const State* init, const Mat& G,
                             const State* final_grad) {
  State fin;
  const Mat O = retention(Q, K, V, gamma, normalization, init, &fin);
  double L = 0.0;
  for (Index n = 0; n < O.rows(); ++n)
    for (Index j = 0; j < O.cols(); ++j) L += G(n, j) * O(n, j);
  if (final_grad) {
    for (Index i = 0; i < fin.S.rows(); ++i) {
      L += final_grad->z(i) * fin.z(i);
      for (Index j = 0; j < fin.S.cols(); ++j) L += final_grad->S(i, j) * fin.S(i, j);
    }
  }
  return L;
}

/// Test inputs away from the one non-differentiable point: rows n of Q whose decay-normalised score
/// |r_n| lies within `margin` of 1 are scaled by 1.01 (r_n is linear in q_n and no other row
/// depends on q_n), which moves |r_n| about 0.01 away.
inline Mat keep_scores_off_kink(Mat Q, const Mat& K, const Mat& V, double gamma, const State* init,
                                double margin = 1e-4) {
  const Raw r = raw(Q, K, V, gamma, init);
  for (Index n = 0; n < Q.rows(); ++n)
    if (std::abs(std::abs(normalized_score(r, n)) - 1.0) < margin) Q.row(n) *= 1.01;
  return Q;
}

/// The size of dz_init's terms on the exact decay_and_score path: the norm of
/// sum_n gamma^(n+1) |q_n| |gs|_n + gamma^T |dz_final| with |gs|_n = c_n^2 sum_j |G_nj u_nj| /
/// r_n^2 where |r_n| > 1 (0 without an initial state). dz_init depends on the inputs only through
/// gs_n, whose factor G_n . u_n may cancel; any rounding of u_n then errs relative to sum_j |G_nj
/// u_nj|, not to the dot product, and dz_init (sometimes a sum of one or two such terms: short T,
/// fast decay) inherits that error. Tolerances for dz_init are relative to this scale.
inline double dz_init_term_scale(const Mat& Q, const Mat& K, const Mat& V, const Mat& G,
                                 double gamma, const State* init, const State* final_grad) {
  if (!init) return 0.0;
  const Raw r = raw(Q, K, V, gamma, init);
  const Index T = Q.rows(), dk = Q.cols(), dv = V.cols();
  Vec acc = Vec::Zero(dk);
  for (Index n = 0; n < T; ++n) {
    const double score = normalized_score(r, n);
    if (!(std::abs(score) > 1.0)) continue;
    double gu = 0.0;
    for (Index j = 0; j < dv; ++j) gu += std::abs(G(n, j) * r.O(n, j));
    const double gabs = gu / (r.decay_sum(n) * score * score);
    for (Index i = 0; i < dk; ++i) acc(i) += gamma_pow(gamma, n + 1) * gabs * std::abs(Q(n, i));
  }
  if (final_grad)
    for (Index i = 0; i < dk; ++i) acc(i) += gamma_pow(gamma, T) * std::abs(final_grad->z(i));
  return acc.norm();
}

}  // namespace retention_reference
