// Decay masks and gamma schedules (SPEC 1): schedule values, ln gamma via log1p, rejected gammas,
// weights / log-weights / tiles of every mask against the direct formulas, the Kronecker structure
// of the 2-D masks, the causal factorisation across a split, the chunk factors, decay sums,
// underflow.
#include <retention/decay.hpp>

#include "support/test_support.hpp"

#include <gtest/gtest.h>

#include <string>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <vector>

namespace {

using retention_test::ScalarName;

using retention::CausalDecay;
using retention::Index;
using retention::ManhattanDecay;
using retention::Matrix;
using retention::QuadrantCausalDecay;
using retention::SymmetricDecay;
using retention_test::expect_shape_error;

/// gamma^d straight from the definition, in long double (independent of exp(k ln gamma)).
double direct_pow(double gamma, Index d) {
  return static_cast<double>(
      std::pow(static_cast<long double>(gamma), static_cast<long double>(d)));
}

/// |a - b| <= rel * |b| (and exact equality for b == 0).
::testing::AssertionResult close(double a, double b, double rel) {
  if (std::isnan(a) || std::isnan(b))
    return ::testing::AssertionFailure() << "NaN: " << a << " vs " << b;
  if (std::abs(a - b) <= rel * std::abs(b)) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << a << " vs " << b << " (rel. diff " << std::abs(a - b) / std::abs(b) << ")";
}

const double kGammas[] = {
    0.5, 0.75, 0.96875, 1.0 - std::ldexp(1.0, -12), 1.0 - std::ldexp(1.0, -30), 1.0};

// ------------------------------------------------------------------------------------------------
// Schedules
// ------------------------------------------------------------------------------------------------

TEST(Schedules, RetnetIsOneMinusTwoToMinusFiveMinusH) {
  const std::vector<double> g = retention::retnet_gammas(32);
  ASSERT_EQ(g.size(), 32u);
  for (int h = 0; h < 32; ++h)
    EXPECT_EQ(g[static_cast<std::size_t>(h)], 1.0 - std::pow(2.0, -5.0 - h)) << h;
  EXPECT_EQ(retention::retnet_gammas(1).at(0), 1.0 - 1.0 / 32);
}

TEST(Schedules, LinspaceIsGeometricBetweenFirstAndLast) {
  for (Index H : {2, 3, 8, 12}) {
    const std::vector<double> g = retention::linspace_gammas(H);
    ASSERT_EQ(static_cast<Index>(g.size()), H);
    for (Index h = 0; h < H; ++h) {
      // 1 - 2^(-5 - 4h/(H-1)), SPEC 1.
      const double expected =
          1.0 - std::pow(2.0, -5.0 - 4.0 * static_cast<double>(h) / static_cast<double>(H - 1));
      EXPECT_TRUE(close(1.0 - g[static_cast<std::size_t>(h)], 1.0 - expected, 1e-13))
          << H << " " << h;
    }
    EXPECT_TRUE(close(g.front(), 1.0 - 1.0 / 32, 1e-15));
    EXPECT_TRUE(close(g.back(), 1.0 - 1.0 / 512, 1e-15));
  }
  // H = 1: the first value alone.
  const std::vector<double> one = retention::linspace_gammas(1);
  ASSERT_EQ(one.size(), 1u);
  EXPECT_TRUE(close(one[0], 1.0 - 1.0 / 32, 1e-15));
  // Custom end points.
  const std::vector<double> custom = retention::linspace_gammas(3, 0.25, 0.0625);
  EXPECT_TRUE(close(custom[0], 0.75, 1e-15));
  EXPECT_TRUE(close(custom[1], 0.875, 1e-15));
  EXPECT_TRUE(close(custom[2], 0.9375, 1e-15));
}

TEST(Schedules, RmtIsOneMinusTwoToMinusAPlusRhOverH) {
  for (double a : {2.0, 3.0})
    for (double r : {4.0, 6.0})
      for (Index H : {1, 4, 8, 16}) {
        const std::vector<double> g = retention::rmt_gammas(H, a, r);
        ASSERT_EQ(static_cast<Index>(g.size()), H);
        for (Index h = 0; h < H; ++h) {
          const double expected =
              1.0 - std::pow(2.0, -(a + r * static_cast<double>(h) / static_cast<double>(H)));
          EXPECT_TRUE(close(g[static_cast<std::size_t>(h)], expected, 1e-15))
              << a << " " << r << " " << H << " " << h;
        }
      }
}

TEST(Schedules, BadArgumentsAreRejected) {
  expect_shape_error([] { retention::retnet_gammas(0); },
                     "retnet_gammas: heads must be >= 1, got 0");
  expect_shape_error([] { retention::linspace_gammas(-2); },
                     "linspace_gammas: heads must be >= 1, got -2");
  expect_shape_error([] { retention::linspace_gammas(4, 0.0, 0.5); },
                     "linspace_gammas: first and last must be in (0, 1)");
  expect_shape_error([] { retention::linspace_gammas(4, 0.5, 1.0); },
                     "linspace_gammas: first and last must be in (0, 1)");
  expect_shape_error([] { retention::rmt_gammas(0, 2.0, 4.0); },
                     "rmt_gammas: heads must be >= 1, got 0");
  expect_shape_error([] { retention::rmt_gammas(4, 0.0, 4.0); },
                     "rmt_gammas: initial_value must be > 0");
  expect_shape_error([] { retention::rmt_gammas(4, 2.0, -1.0); },
                     "rmt_gammas: initial_value must be > 0 and heads_range >= 0");
}

// ------------------------------------------------------------------------------------------------
// ln gamma
// ------------------------------------------------------------------------------------------------

TEST(LogGamma, RetnetHeadsNearOneStillDecay) {
  const std::vector<double> g = retention::retnet_gammas(32);
  for (int h = 0; h < 32; ++h) {
    const CausalDecay d(g[static_cast<std::size_t>(h)]);
    const double x = std::ldexp(1.0, -5 - h);
    // ln(1 - x) = -x - x^2/2 - ...: within x/2 relative of -x; for h >= 20 that is below 1e-6.
    EXPECT_LT(d.log_gamma(), 0.0) << h;
    EXPECT_TRUE(close(d.log_gamma(), std::log1p(-x), 1e-15)) << h;
    if (h >= 20) {
      EXPECT_TRUE(close(d.log_gamma(), -x, 1e-6)) << h;
      // The hazard it avoids: these gammas are exactly 1 in float.
      EXPECT_EQ(static_cast<float>(g[static_cast<std::size_t>(h)]), 1.0f) << h;
      // Yet their decay over 2^(5+h) steps is e^-1.
      EXPECT_TRUE(close(d.factor(Index(1) << (5 + h)), std::exp(-1.0), 1e-6)) << h;
    }
  }
  EXPECT_EQ(CausalDecay(1.0).log_gamma(), 0.0);
  EXPECT_TRUE(close(CausalDecay(0.5).log_gamma(), std::log(0.5), 1e-15));
}

TEST(LogGamma, GammaOutsideUnitIntervalIsRejected) {
  const double bad[] = {0.0, -0.1, 1.5, std::numeric_limits<double>::quiet_NaN()};
  const char* shown[] = {"got 0", "got -0.1", "got 1.5", "got nan"};
  for (int i = 0; i < 4; ++i) {
    const double g = bad[i];
    const std::string tail = std::string("gamma must be in (0, 1], ") + shown[i];
    expect_shape_error([g] { (void)CausalDecay(g); }, "CausalDecay: " + tail);
    expect_shape_error([g] { (void)SymmetricDecay(g); }, "SymmetricDecay: " + tail);
    expect_shape_error([g] { (void)ManhattanDecay(g, 2, 3); }, "ManhattanDecay: " + tail);
    expect_shape_error([g] { (void)QuadrantCausalDecay(g, 2, 3); }, "QuadrantCausalDecay: " + tail);
  }
  EXPECT_NO_THROW(CausalDecay(1.0));
  EXPECT_NO_THROW(CausalDecay(1e-300));
}

TEST(LogGamma, BadGridIsRejected) {
  expect_shape_error([] { (void)ManhattanDecay(0.9, 0, 3); },
                     "ManhattanDecay: height must be >= 1, got 0");
  expect_shape_error([] { (void)ManhattanDecay(0.9, 3, -1); },
                     "ManhattanDecay: width must be >= 1, got -1");
  expect_shape_error([] { (void)QuadrantCausalDecay(0.9, 0, 3); },
                     "QuadrantCausalDecay: height must be >= 1, got 0");
  expect_shape_error([] { (void)QuadrantCausalDecay(0.9, 2, 0); },
                     "QuadrantCausalDecay: width must be >= 1, got 0");
}

// ------------------------------------------------------------------------------------------------
// Weights, log-weights and tiles against the definitions
// ------------------------------------------------------------------------------------------------

/// Checks weight, log_weight and both tile kinds of `mask` over [n0, n0+r) x [m0, m0+c) against
/// `distance(n, m)` (negative = masked).
template <class T, class Mask, class Dist>
void check_mask(const Mask& mask, double gamma, Dist&& distance, Index n0, Index r, Index m0,
                Index c) {
  const double tol = sizeof(T) == sizeof(double) ? 1e-13 : 1e-6;
  const Matrix<T> W = mask.template weights<T>(n0, r, m0, c);
  const Matrix<T> L = mask.template log_weights<T>(n0, r, m0, c);
  ASSERT_EQ(W.rows(), r);
  ASSERT_EQ(W.cols(), c);
  ASSERT_EQ(L.rows(), r);
  ASSERT_EQ(L.cols(), c);
  const double lg = std::log1p(gamma - 1.0);
  for (Index i = 0; i < r; ++i)
    for (Index j = 0; j < c; ++j) {
      const Index n = n0 + i, m = m0 + j;
      const Index d = distance(n, m);
      if (d < 0) {
        EXPECT_EQ(mask.weight(n, m), 0.0);
        EXPECT_EQ(W(i, j), T(0));
        EXPECT_TRUE(std::isinf(mask.log_weight(n, m)) && mask.log_weight(n, m) < 0);
        EXPECT_TRUE(std::isinf(L(i, j)) && L(i, j) < 0);
        continue;
      }
      const double w = direct_pow(gamma, d);
      EXPECT_TRUE(close(mask.weight(n, m), w, 1e-13)) << n << "," << m;
      EXPECT_TRUE(close(static_cast<double>(W(i, j)), w, tol)) << n << "," << m;
      EXPECT_TRUE(close(mask.log_weight(n, m), static_cast<double>(d) * lg, 1e-15))
          << n << "," << m;
      EXPECT_TRUE(close(static_cast<double>(L(i, j)), static_cast<double>(d) * lg, tol))
          << n << "," << m;
    }
}

template <class T>
class MaskTiles : public ::testing::Test {};
TYPED_TEST_SUITE(MaskTiles, retention_test::ScalarTypes, ScalarName);

TYPED_TEST(MaskTiles, EveryMaskMatchesItsDefinition) {
  using T = TypeParam;
  struct Tile {
    Index n0, r, m0, c;
  };
  // Diagonal, above and below the diagonal, non-square, single entries.
  const Tile tiles[] = {{0, 5, 0, 5}, {3, 4, 7, 6}, {9, 3, 0, 8},
                        {0, 1, 0, 1}, {5, 1, 2, 9}, {1, 7, 4, 1}};
  for (double gamma : kGammas) {
    const CausalDecay causal(gamma);
    const SymmetricDecay sym(gamma);
    for (const Tile& t : tiles) {
      check_mask<T>(
          causal, gamma, [](Index n, Index m) { return m <= n ? n - m : Index(-1); }, t.n0, t.r,
          t.m0, t.c);
      check_mask<T>(
          sym, gamma, [](Index n, Index m) { return std::abs(n - m); }, t.n0, t.r, t.m0, t.c);
    }
    for (Index H : {1, 3, 4})
      for (Index W : {1, 2, 5}) {
        const Index N = H * W;
        const ManhattanDecay man(gamma, H, W);
        const QuadrantCausalDecay quad(gamma, H, W);
        EXPECT_EQ(man.size(), N);
        EXPECT_EQ(man.height(), H);
        EXPECT_EQ(man.width(), W);
        auto manhattan = [W](Index n, Index m) {
          return std::abs(n / W - m / W) + std::abs(n % W - m % W);
        };
        auto quadrant = [W](Index n, Index m) {
          const Index dy = n / W - m / W, dx = n % W - m % W;
          return dy < 0 || dx < 0 ? Index(-1) : dy + dx;
        };
        check_mask<T>(man, gamma, manhattan, 0, N, 0, N);
        check_mask<T>(quad, gamma, quadrant, 0, N, 0, N);
        if (N > 2) {
          check_mask<T>(man, gamma, manhattan, 1, N - 2, 2, N - 2);
          check_mask<T>(quad, gamma, quadrant, N - 1, 1, 0, N);
        }
      }
  }
}

// Kronecker structure (SPEC 1): Manhattan = Symmetric_H (x) Symmetric_W and
// QuadrantCausal = Causal_H (x) Causal_W, in raster order n = y*W + x.
TEST(MaskIdentities, TwoDimensionalMasksAreKroneckerProducts) {
  for (double gamma : kGammas)
    for (Index H : {1, 2, 4, 7})
      for (Index W : {1, 3, 6}) {
        const Index N = H * W;
        const Matrix<double> man = ManhattanDecay(gamma, H, W).weights<double>(0, N, 0, N);
        const Matrix<double> quad = QuadrantCausalDecay(gamma, H, W).weights<double>(0, N, 0, N);
        const Matrix<double> sh = SymmetricDecay(gamma).weights<double>(0, H, 0, H);
        const Matrix<double> sw = SymmetricDecay(gamma).weights<double>(0, W, 0, W);
        const Matrix<double> ch = CausalDecay(gamma).weights<double>(0, H, 0, H);
        const Matrix<double> cw = CausalDecay(gamma).weights<double>(0, W, 0, W);
        for (Index y = 0; y < H; ++y)
          for (Index x = 0; x < W; ++x)
            for (Index y2 = 0; y2 < H; ++y2)
              for (Index x2 = 0; x2 < W; ++x2) {
                const Index n = y * W + x, m = y2 * W + x2;
                EXPECT_TRUE(close(man(n, m), sh(y, y2) * sw(x, x2), 1e-14)) << H << "x" << W;
                EXPECT_TRUE(close(quad(n, m), ch(y, y2) * cw(x, x2), 1e-14)) << H << "x" << W;
              }
      }
  // The axes a Manhattan mask hands out carry its gamma.
  const ManhattanDecay m(0.8, 3, 4);
  EXPECT_EQ(m.row_axis().gamma(), 0.8);
  EXPECT_EQ(m.column_axis().gamma(), 0.8);
}

// gamma^(n-m) = gamma^(n-s) * gamma^(s-m) for m < s <= n: what the recurrent and chunkwise forms
// use.
TEST(MaskIdentities, CausalMaskFactorisesAcrossASplit) {
  for (double gamma : kGammas) {
    const CausalDecay d(gamma);
    for (Index m : {0, 3, 10})
      for (Index s : {m + 1, m + 5, m + 40})
        for (Index n : {s, s + 1, s + 17, s + 300}) {
          EXPECT_TRUE(close(d.weight(n, m), d.weight(n, s) * d.weight(s, m), 1e-13))
              << gamma << " " << m << " " << s << " " << n;
          EXPECT_TRUE(close(d.factor(n - m), d.factor(n - s) * d.factor(s - m), 1e-13));
        }
  }
}

template <class T>
class CausalFactors : public ::testing::Test {};
TYPED_TEST_SUITE(CausalFactors, retention_test::ScalarTypes, ScalarName);

TYPED_TEST(CausalFactors, StepChunkQueryAndKeyFactors) {
  using T = TypeParam;
  const double tol = sizeof(T) == sizeof(double) ? 1e-14 : 1e-7;
  for (double gamma : kGammas) {
    const CausalDecay d(gamma);
    EXPECT_TRUE(close(d.step_factor(), gamma, 1e-15));
    EXPECT_EQ(d.gamma(), gamma);
    EXPECT_EQ(d.factor(0), 1.0);
    for (Index L : {1, 2, 7, 64}) {
      EXPECT_TRUE(close(d.chunk_factor(L), direct_pow(gamma, L), 1e-13)) << L;
      const retention::Vector<T> q = d.template query_factors<T>(L);
      const retention::Vector<T> k = d.template key_factors<T>(L);
      ASSERT_EQ(q.size(), L);
      ASSERT_EQ(k.size(), L);
      for (Index j = 0; j < L; ++j) {
        EXPECT_TRUE(close(static_cast<double>(q(j)), direct_pow(gamma, j + 1), tol))
            << L << " " << j;
        EXPECT_TRUE(close(static_cast<double>(k(j)), direct_pow(gamma, L - 1 - j), tol))
            << L << " " << j;
      }
      // Chunk identity: the query factor of the last row is the chunk factor; the first key's
      // factor times gamma is too.
      EXPECT_TRUE(close(static_cast<double>(q(L - 1)), d.chunk_factor(L), tol));
      EXPECT_TRUE(close(static_cast<double>(k(0)) * gamma, d.chunk_factor(L), 2 * tol));
    }
  }
}

// The power table and its horizon: every entry gamma^d from std::pow in long double, the horizon
// the first d whose rounded power is below the type's smallest normal number (found by a scan
// here).
TYPED_TEST(CausalFactors, PowerTableAndHorizon) {
  using T = TypeParam;
  // exp(k ln gamma) in double carries about k |ln gamma| eps relative, then one rounding to T.
  const double round = sizeof(T) == sizeof(double) ? 2e-16 : 1.2e-7;
  std::vector<double> gammas(std::begin(kGammas), std::end(kGammas));
  gammas.push_back(1e-30);
  for (double gamma : gammas)
    for (Index size : {0, 1, 2, 40, 1100, 30000}) {
      const CausalDecay d(gamma);
      retention::Vector<T> pw(size);
      const Index horizon = d.powers_into(pw);
      Index expected = size;
      for (Index k = 0; k < size; ++k) {
        const long double exact =
            std::pow(static_cast<long double>(gamma), static_cast<long double>(k));
        const T rounded = static_cast<T>(exact);
        if (expected == size && rounded < std::numeric_limits<T>::min()) expected = k;
        if (exact >= static_cast<long double>(std::numeric_limits<T>::min()) * 2) {
          ASSERT_TRUE(
              close(static_cast<double>(pw(k)), static_cast<double>(exact),
                    round + (1.0 + static_cast<double>(k) * std::abs(std::log(gamma))) * 4e-16))
              << gamma << " " << k;
        } else {
          ASSERT_LE(static_cast<double>(pw(k)), 4.0 * std::numeric_limits<T>::min());
        }
        ASSERT_GE(pw(k), T(0));
      }
      EXPECT_EQ(horizon, expected) << gamma << " " << size;
      if (size > 0) {
        EXPECT_EQ(pw(0), T(1));
      }
    }
  // A segment of a longer vector: only the segment is written.
  retention::Vector<T> big = retention::Vector<T>::Constant(8, T(-1));
  EXPECT_EQ(CausalDecay(0.5).powers_into(big.segment(2, 4)), 4);
  EXPECT_EQ(big(1), T(-1));
  EXPECT_EQ(big(2), T(1));
  EXPECT_TRUE(close(static_cast<double>(big(5)), 0.125, 1e-7));
  EXPECT_EQ(big(6), T(-1));
  // gamma = 1: no horizon.
  retention::Vector<T> ones(50);
  EXPECT_EQ(CausalDecay(1.0).powers_into(ones), 50);
  EXPECT_TRUE((ones.array() == T(1)).all());
}

TEST(CausalFactors, DecaySumIsTheGeometricSum) {
  const std::vector<double> retnet = retention::retnet_gammas(32);
  std::vector<double> gammas(std::begin(kGammas), std::end(kGammas));
  gammas.push_back(retnet[20]);
  gammas.push_back(retnet[31]);
  for (double gamma : gammas) {
    const CausalDecay d(gamma);
    long double sum = 0.0L;
    Index next = 0;
    for (Index p : {0, 1, 2, 10, 100, 1000, 5000}) {
      for (; next <= p; ++next)
        sum += std::pow(static_cast<long double>(gamma), static_cast<long double>(next));
      EXPECT_TRUE(close(d.decay_sum(p), static_cast<double>(sum), 1e-13)) << gamma << " " << p;
    }
  }
  // gamma = 1: exactly p + 1.
  EXPECT_EQ(CausalDecay(1.0).decay_sum(0), 1.0);
  EXPECT_EQ(CausalDecay(1.0).decay_sum(99), 100.0);
  // Large p with gamma < 1: the limit 1 / (1 - gamma), never inf or NaN.
  EXPECT_TRUE(close(CausalDecay(0.96875).decay_sum(Index(1) << 40), 32.0, 1e-14));
}

// Far from the diagonal the weights underflow to exactly 0: never NaN, never negative.
TEST(CausalFactors, UnderflowIsExactZeroNotNaN) {
  const CausalDecay d(0.96875);
  // double underflows near d = 23,000; float near 3,300 (SPEC 1: beyond about 2,750 tokens).
  EXPECT_EQ(d.factor(100000), 0.0);
  EXPECT_EQ(d.weight(100000, 0), 0.0);
  EXPECT_TRUE(std::isfinite(d.log_weight(100000, 0)));
  EXPECT_EQ(d.chunk_factor(Index(1) << 40), 0.0);
  const Matrix<float> wf = d.weights<float>(5000, 3, 0, 5003);
  ASSERT_TRUE(wf.allFinite());
  EXPECT_EQ(wf(0, 0), 0.0f);
  EXPECT_EQ(wf(2, 5002), 1.0f);
  EXPECT_GT(wf(2, 4000), 0.0f);
  EXPECT_GE(wf.minCoeff(), 0.0f);
  const Matrix<double> wd = d.weights<double>(30000, 2, 0, 30002);
  ASSERT_TRUE(wd.allFinite());
  EXPECT_EQ(wd(0, 0), 0.0);
  EXPECT_EQ(wd(1, 30001), 1.0);
  const retention::Vector<float> kf = d.key_factors<float>(5000);
  ASSERT_TRUE(kf.allFinite());
  EXPECT_EQ(kf(0), 0.0f);
  EXPECT_EQ(kf(4999), 1.0f);
  // A tiny gamma: 1 on the diagonal, gamma one step below it, exactly 0 further on (no -inf * 0).
  EXPECT_TRUE(close(CausalDecay(1e-30).log_gamma(), std::log(1e-30), 1e-15));
  const Matrix<double> tiny = CausalDecay(1e-300).weights<double>(0, 4, 0, 4);
  ASSERT_TRUE(tiny.allFinite());
  for (Index i = 0; i < 4; ++i)
    for (Index j = 0; j < 4; ++j)  // exp(ln gamma) carries |ln gamma| * eps = 7.7e-14 relative
      EXPECT_TRUE(close(tiny(i, j), i == j ? 1.0 : i == j + 1 ? 1e-300 : 0.0, 1e-12));
  // Log-weights of a masked pair are -inf and of a far pair finite: no NaN in either tile kind.
  const Matrix<float> lf = d.log_weights<float>(0, 3, 0, 3000);
  EXPECT_FALSE(lf.array().isNaN().any());
  const Matrix<float> ls = SymmetricDecay(0.5).weights<float>(0, 2, 0, 4000);
  ASSERT_TRUE(ls.allFinite());
  EXPECT_EQ(ls(0, 3999), 0.0f);
}

}  // namespace
