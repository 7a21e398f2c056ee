// Naive double-precision evaluation of SPEC section 2 (retention of one head with an initial state,
// the three normalisations and the final state), written straight from the formulas with explicit
// loops. It shares no code with the library's kernels: no decay mask, no factor helpers.
#pragma once

#include <retention/core.hpp>

#include <algorithm>
#include <cmath>
#include <vector>

namespace retention_reference {

using retention::Index;
using retention::Normalization;
using Mat = retention::Matrix<double>;
using Vec = retention::Vector<double>;

/// gamma^k in double as exp(k ln gamma), ln gamma = log1p(gamma - 1): exact for gammas near 1,
/// where log(gamma) of a rounded gamma would lose the decay (SPEC 1).
inline double gamma_pow(double gamma, Index k) {
  if (k == 0) return 1.0;
  return std::exp(static_cast<double>(k) * std::log1p(gamma - 1.0));
}

/// The state of SPEC 2: S [dk, dv], z [dk], the number of tokens seen.
struct State {
  Mat S;
  Vec z;
  Index position = 0;
};

/// Unnormalised output and everything a normalisation needs, so that one evaluation serves the
/// three normalisations.
struct Raw {
  Mat O;              // [T, dv]: sum_{m<=n} gamma^(n-m) (q_n . k_m) v_m + gamma^(n+1) q_n S_init
  Vec score;          // [T]: sum_{m<=n} gamma^(n-m) (q_n . k_m) + gamma^(n+1) q_n . z_init
  Vec decay_sum;      // [T]: sum_{i=0}^{p} gamma^i, p = n + position
  State final_state;  // S_{T-1}, z_{T-1}, position + T
};

/// SPEC 2 by direct summation. Q, K [T, dk], V [T, dv]; `init` = nullptr means S_init = 0, z_init =
/// 0, position 0.
inline Raw raw(const Mat& Q, const Mat& K, const Mat& V, double gamma,
               const State* init = nullptr) {
  const Index T = Q.rows(), dk = Q.cols(), dv = V.cols();
  const Index p0 = init ? init->position : 0;
  std::vector<double> pw(static_cast<std::size_t>(T + 1));
  for (Index k = 0; k <= T; ++k) pw[static_cast<std::size_t>(k)] = gamma_pow(gamma, k);

  Raw out;
  out.O = Mat::Zero(T, dv);
  out.score = Vec::Zero(T);
  out.decay_sum = Vec::Zero(T);
  for (Index n = 0; n < T; ++n) {
    for (Index m = 0; m <= n; ++m) {
      double qk = 0.0;
      for (Index i = 0; i < dk; ++i) qk += Q(n, i) * K(m, i);
      const double w = pw[static_cast<std::size_t>(n - m)] * qk;
      out.score(n) += w;
      for (Index c = 0; c < dv; ++c) out.O(n, c) += w * V(m, c);
    }
    if (init) {
      const double g = pw[static_cast<std::size_t>(n + 1)];
      for (Index c = 0; c < dv; ++c) {
        double qs = 0.0;
        for (Index i = 0; i < dk; ++i) qs += Q(n, i) * init->S(i, c);
        out.O(n, c) += g * qs;
      }
      double qz = 0.0;
      for (Index i = 0; i < dk; ++i) qz += Q(n, i) * init->z(i);
      out.score(n) += g * qz;
    }
  }

  // sum_{i=0}^{p} gamma^i term by term (compensated), for p = p0 .. p0 + T - 1.
  double sum = 0.0, carry = 0.0;
  Index next = 0;
  auto add_up_to = [&](Index p) {
    for (; next <= p; ++next) {
      const double y = gamma_pow(gamma, next) - carry;
      const double t = sum + y;
      carry = (t - sum) - y;
      sum = t;
    }
  };
  for (Index n = 0; n < T; ++n) {
    add_up_to(p0 + n);
    out.decay_sum(n) = sum;
  }

  // S_{T-1} = gamma^T S_init + sum_m gamma^(T-1-m) k_m^T v_m; z likewise with v = 1.
  State& f = out.final_state;
  f.S = Mat::Zero(dk, dv);
  f.z = Vec::Zero(dk);
  if (init) {
    f.S = pw[static_cast<std::size_t>(T)] * init->S;
    f.z = pw[static_cast<std::size_t>(T)] * init->z;
  }
  for (Index m = 0; m < T; ++m) {
    const double w = pw[static_cast<std::size_t>(T - 1 - m)];
    for (Index i = 0; i < dk; ++i) {
      f.z(i) += w * K(m, i);
      for (Index c = 0; c < dv; ++c) f.S(i, c) += w * K(m, i) * V(m, c);
    }
  }
  f.position = p0 + T;
  return out;
}

/// The decay-normalised signed score row sum r_n = score_n / sqrt(sum_{i<=p} gamma^i) (SPEC 2).
inline double normalized_score(const Raw& r, Index n) {
  return r.score(n) / std::sqrt(r.decay_sum(n));
}

/// Applies a normalisation of SPEC 2 to the raw output:
/// none: O; decay: row n / sqrt(sum_{i<=p} gamma^i); decay_and_score: further / max(|r_n|, 1).
inline Mat normalize(const Raw& r, Normalization normalization) {
  Mat O = r.O;
  if (normalization == Normalization::none) return O;
  for (Index n = 0; n < O.rows(); ++n) {
    double divisor = std::sqrt(r.decay_sum(n));
    if (normalization == Normalization::decay_and_score)
      divisor *= std::max(std::abs(normalized_score(r, n)), 1.0);
    for (Index c = 0; c < O.cols(); ++c) O(n, c) /= divisor;
  }
  return O;
}

/// Output of SPEC 2 with the chosen normalisation; the final state goes to `final_state` if given.
inline Mat retention(const Mat& Q, const Mat& K, const Mat& V, double gamma,
                     Normalization normalization, const State* init = nullptr,
                     State* final_state = nullptr) {
  Raw r = raw(Q, K, V, gamma, init);
  if (final_state) *final_state = r.final_state;
  return normalize(r, normalization);
}

}  // namespace retention_reference
