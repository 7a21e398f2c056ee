// retention-test-links: compiled
// Long sequences in float (SPEC 1, SPEC 2): T = 100,000 through the recurrent and chunkwise forms,
// T = 20,000 through the parallel form where the decay underflows to exactly 0, a huge starting
// position; all finite and in agreement with a double reference. The reference here is SPEC 2's
// recurrence written out in double (O(T dk dv), cheap at this length), not the library's code.
#include <retention/chunkwise.hpp>
#include <retention/decay.hpp>
#include <retention/parallel.hpp>
#include <retention/recurrent.hpp>

#include "support/test_support.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <iostream>
#include <limits>
#include <vector>

namespace {

using retention::CausalDecay;
using retention::Index;
using retention::Matrix;
using retention::Normalization;
using retention::RetentionOptions;
using retention::RetentionState;
using retention_test::random_matrix;
using retention_test::relative_error;

const Normalization kNormalizations[] = {Normalization::none, Normalization::decay,
                                         Normalization::decay_and_score};

struct LongReference {
  Matrix<double> raw;         // o_n before normalisation
  std::vector<double> score;  // q_n . z_n
  std::vector<double> dsum;   // sum_{i=0}^{p} gamma^i, p = position + n
};

/// SPEC 2's recurrence in double: S_n = gamma S_{n-1} + k_n^T v_n, o_n = q_n S_n,
/// z_n = gamma z_{n-1} + k_n; the decay sums term by term (the terms become negligible within
/// ~4,500 steps for gamma = 0.96875, so a huge position costs no more than that).
LongReference long_reference(const Matrix<double>& Q, const Matrix<double>& K,
                             const Matrix<double>& V, double gamma, Index position) {
  const Index T = Q.rows(), dk = Q.cols(), dv = V.cols();
  const double g = std::exp(std::log1p(gamma - 1.0));
  LongReference r;
  r.raw = Matrix<double>::Zero(T, dv);
  r.score.assign(static_cast<std::size_t>(T), 0.0);
  r.dsum.assign(static_cast<std::size_t>(T), 0.0);
  Matrix<double> S = Matrix<double>::Zero(dk, dv);
  std::vector<double> z(static_cast<std::size_t>(dk), 0.0);
  for (Index n = 0; n < T; ++n) {
    for (Index i = 0; i < dk; ++i) {
      z[static_cast<std::size_t>(i)] = g * z[static_cast<std::size_t>(i)] + K(n, i);
      for (Index c = 0; c < dv; ++c) S(i, c) = g * S(i, c) + K(n, i) * V(n, c);
    }
    for (Index c = 0; c < dv; ++c) {
      double o = 0.0;
      for (Index i = 0; i < dk; ++i) o += Q(n, i) * S(i, c);
      r.raw(n, c) = o;
    }
    double s = 0.0;
    for (Index i = 0; i < dk; ++i) s += Q(n, i) * z[static_cast<std::size_t>(i)];
    r.score[static_cast<std::size_t>(n)] = s;
  }
  // sum_{i=0}^{p} gamma^i for p = position .. position + T - 1, Kahan-summed.
  double sum = 0.0, carry = 0.0, term = 1.0;
  Index i = 0;
  auto add = [&] {
    const double y = term - carry;
    const double t = sum + y;
    carry = (t - sum) - y;
    sum = t;
    term *= g;
    ++i;
  };
  // Terms below 2^-200 cannot change a sum >= 1 (and gamma * the smallest denormal rounds back
  // to itself, so waiting for an exact 0 would never end).
  const double negligible = std::ldexp(1.0, -200);
  while (i <= position && term > negligible) add();
  for (Index n = 0; n < T; ++n) {
    while (i <= position + n && term > negligible) add();
    if (gamma == 1.0) sum = static_cast<double>(position + n + 1);
    r.dsum[static_cast<std::size_t>(n)] = sum;
  }
  return r;
}

Matrix<double> normalized(const LongReference& r, Normalization norm) {
  Matrix<double> O = r.raw;
  if (norm == Normalization::none) return O;
  for (Index n = 0; n < O.rows(); ++n) {
    const double root = std::sqrt(r.dsum[static_cast<std::size_t>(n)]);
    double div = root;
    if (norm == Normalization::decay_and_score)
      div *= std::max(std::abs(r.score[static_cast<std::size_t>(n)]) / root, 1.0);
    O.row(n) /= div;
  }
  return O;
}

/// SPEC 6 float bound, widened per SPEC 1 where float cannot apply the per-step factor f
/// faithfully (see test_retention_forms.cpp): min(steps, 1/(1-f)) * 2^-24, twice.
double float_bound(double factor, Index steps) {
  const bool exact = static_cast<double>(static_cast<float>(factor)) == factor;
  if (exact && !(factor < 1.0 && 1.0 - factor <= std::ldexp(1.0, -20))) return 1e-5;
  return 1e-5 +
         2.0 * std::min(static_cast<double>(steps), 1.0 / (1.0 - factor)) * std::ldexp(1.0, -24);
}

TEST(LongSequence, HundredThousandTokensRecurrentAndChunkwise) {
  const Index T = 100000, d = 8, C = 64;
  // Scaled so that decay_and_score divides on some rows and not on others.
  const Matrix<float> Q = random_matrix<float>(T, d, 1, 0.8),
                      K = random_matrix<float>(T, d, 2, 0.8);
  const Matrix<float> V = random_matrix<float>(T, d, 3);
  for (double gamma : {0.96875, 1.0 - std::ldexp(1.0, -12)}) {
    const CausalDecay decay(gamma);
    const LongReference ref =
        long_reference(Q.cast<double>(), K.cast<double>(), V.cast<double>(), gamma, 0);
    for (Normalization norm : kNormalizations) {
      const Matrix<double> expected = normalized(ref, norm);
      RetentionOptions<float> opt;
      opt.normalization = norm;
      const Matrix<float> rec = retention::recurrent_retention(Q, K, V, decay, opt);
      const Matrix<float> chk = retention::chunkwise_retention(Q, K, V, decay, C, opt);
      ASSERT_TRUE(rec.allFinite()) << gamma;
      ASSERT_TRUE(chk.allFinite()) << gamma;
      const double e_rec = relative_error(rec, expected), e_chk = relative_error(chk, expected);
      EXPECT_LE(e_rec, float_bound(gamma, T)) << gamma << " " << retention::to_string(norm);
      EXPECT_LE(e_chk, float_bound(decay.chunk_factor(C), T / C))
          << gamma << " " << retention::to_string(norm);
      // The last rows alone (far from the start) are as good as the whole.
      EXPECT_LE(relative_error(chk.bottomRows(1000), expected.bottomRows(1000)),
                float_bound(decay.chunk_factor(C), T / C));
      // A double state for the same float inputs.
      RetentionOptions<double> wide;
      wide.normalization = norm;
      EXPECT_LE(relative_error(retention::recurrent_retention(Q, K, V, decay, wide), expected),
                1e-5);
      std::cout << "[long] gamma 1-" << 1.0 - gamma << " " << retention::to_string(norm)
                << ": recurrent " << e_rec << ", chunkwise C=64 " << e_chk << "\n";
    }
  }
}

// Parallel at T = 20,000 with gamma = 0.96875: in float every weight beyond ~3,300 tokens is
// exactly 0, and whole key blocks are skipped; nothing turns into NaN.
TEST(LongSequence, ParallelTwentyThousandTokensUnderflowsCleanly) {
  const Index T = 20000, d = 8;
  const double gamma = 0.96875;
  const Matrix<float> Q = random_matrix<float>(T, d, 11, 0.8),
                      K = random_matrix<float>(T, d, 12, 0.8);
  const Matrix<float> V = random_matrix<float>(T, d, 13);
  const CausalDecay decay(gamma);
  EXPECT_EQ(static_cast<float>(decay.factor(4000)), 0.0f);
  const LongReference ref =
      long_reference(Q.cast<double>(), K.cast<double>(), V.cast<double>(), gamma, 0);
  RetentionOptions<float> opt;
  opt.normalization = Normalization::decay_and_score;
  RetentionState<float> fin;
  opt.final_state = &fin;
  const Matrix<float> par = retention::parallel_retention(Q, K, V, decay, opt);
  ASSERT_TRUE(par.allFinite());
  ASSERT_TRUE(fin.S.allFinite() && fin.z.allFinite());
  EXPECT_LE(relative_error(par, normalized(ref, Normalization::decay_and_score)), 1e-5);
}

// A state at a huge position: the decay sum is at its limit 1 / (1 - gamma); still finite and
// exact.
TEST(LongSequence, HugeStartingPosition) {
  const Index T = 500, d = 4;
  const Index position = Index(1) << 40;
  const double gamma = 0.96875;
  const Matrix<float> Q = random_matrix<float>(T, d, 21), K = random_matrix<float>(T, d, 22);
  const Matrix<float> V = random_matrix<float>(T, d, 23);
  const CausalDecay decay(gamma);
  const LongReference ref =
      long_reference(Q.cast<double>(), K.cast<double>(), V.cast<double>(), gamma, position);
  RetentionState<float> st(d, d);  // zero state, but far into a sequence
  st.position = position;
  for (Normalization norm : {Normalization::decay, Normalization::decay_and_score}) {
    RetentionOptions<float> opt;
    opt.normalization = norm;
    opt.initial_state = &st;
    const Matrix<double> expected = normalized(ref, norm);
    EXPECT_LE(relative_error(retention::recurrent_retention(Q, K, V, decay, opt), expected), 1e-5);
    EXPECT_LE(relative_error(retention::chunkwise_retention(Q, K, V, decay, 64, opt), expected),
              1e-5);
    EXPECT_LE(relative_error(retention::parallel_retention(Q, K, V, decay, opt), expected), 1e-5);
  }
}

}  // namespace
