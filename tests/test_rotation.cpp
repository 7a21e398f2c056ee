// The theta shift of SPEC 3: against the formula, the relative-position property, dk = 2, the
// pair overload, and bad input.
#include <retention/nn/rotation.hpp>

#include "support/test_support.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using retention::Index;
using retention::Matrix;
using retention::ThetaShift;
using retention_test::expect_shape_error;
using retention_test::random_matrix;
using retention_test::relative_error;
using retention_test::spec_tolerance;
using Mat = retention::Matrix<double>;

/// SPEC 3 written out: pair (2j, 2j+1) of every head group at position p rotated by p * theta_j.
Mat rotate_reference(const Mat& x, Index head_dim, Index first_position) {
  Mat y = x;
  const Index half = head_dim / 2;
  for (Index t = 0; t < x.rows(); ++t)
    for (Index h = 0; h < x.cols() / head_dim; ++h)
      for (Index j = 0; j < half; ++j) {
        const double theta = half == 1 ? 1.0 : std::pow(10000.0, -double(j) / double(half - 1));
        const double a = double(first_position + t) * theta;
        const Index i = h * head_dim + 2 * j;
        y(t, i) = x(t, i) * std::cos(a) - x(t, i + 1) * std::sin(a);
        y(t, i + 1) = x(t, i + 1) * std::cos(a) + x(t, i) * std::sin(a);
      }
  return y;
}

template <class T>
class RotationTest : public ::testing::Test {};
TYPED_TEST_SUITE(RotationTest, retention_test::ScalarTypes);

TYPED_TEST(RotationTest, MatchesFormula) {
  using T = TypeParam;
  struct Case {
    Index head_dim, groups, rows, first;
  };
  for (const Case c : {Case{2, 1, 1, 0}, Case{2, 3, 5, 7}, Case{4, 2, 9, 0}, Case{8, 1, 4, 1000},
                       Case{64, 3, 6, 123456},
                       // 128 rows and more take the angle-addition path (spans of 64 positions),
                       // here with a ragged last span and a far first position.
                       Case{8, 2, 300, 0}, Case{16, 1, 200, 99999}, Case{2, 1, 128, 5}}) {
    const Matrix<T> x =
        random_matrix<T>(c.rows, c.head_dim * c.groups, std::uint64_t(c.head_dim * 31 + c.first));
    Matrix<T> y = x;
    ThetaShift(c.head_dim).apply(y, c.first);
    const Mat ref = rotate_reference(x.template cast<double>(), c.head_dim, c.first);
    EXPECT_LE(relative_error(y, ref), spec_tolerance<T>())
        << "head_dim " << c.head_dim << " first " << c.first;
  }
}

TEST(Rotation, Thetas) {
  const ThetaShift r2(2);
  ASSERT_EQ(r2.thetas().size(), 1u);
  EXPECT_EQ(r2.thetas()[0], 1.0);
  const ThetaShift r8(8);
  ASSERT_EQ(r8.thetas().size(), 4u);
  EXPECT_EQ(r8.thetas()[0], 1.0);
  EXPECT_NEAR(r8.thetas()[3], 1e-4, 1e-18);
  EXPECT_NEAR(r8.thetas()[1], std::pow(10000.0, -1.0 / 3.0), 1e-15);
  EXPECT_EQ(r8.head_dim(), 8);
}

// q~_n . k~_m depends only on n - m: shifting both positions by s leaves the dot product unchanged.
TYPED_TEST(RotationTest, DotProductDependsOnlyOnOffset) {
  using T = TypeParam;
  for (Index dk : {Index(2), Index(6), Index(32)}) {
    const ThetaShift rot(dk);
    const Matrix<T> q = random_matrix<T>(1, dk, std::uint64_t(dk)),
                    k = random_matrix<T>(1, dk, std::uint64_t(dk + 1));
    for (Index n : {Index(0), Index(3), Index(40)})
      for (Index m : {Index(0), Index(5), Index(17)})
        for (Index shift : {Index(1), Index(9), Index(250)}) {
          Matrix<T> qa = q, ka = k, qb = q, kb = k;
          rot.apply(qa, n);
          rot.apply(ka, m);
          rot.apply(qb, n + shift);
          rot.apply(kb, m + shift);
          const double a = double(qa.row(0).dot(ka.row(0))), b = double(qb.row(0).dot(kb.row(0)));
          EXPECT_NEAR(a, b, 50 * spec_tolerance<T>() * double(q.norm() * k.norm()))
              << "dk " << dk << " n " << n << " m " << m << " shift " << shift;
        }
    // A rotation keeps norms.
    Matrix<T> q2 = q;
    rot.apply(q2, 77);
    EXPECT_NEAR(double(q2.norm()), double(q.norm()), 10 * spec_tolerance<T>());
  }
}

TYPED_TEST(RotationTest, PairEqualsTwoApplies) {
  using T = TypeParam;
  const ThetaShift rot(4);
  const Matrix<T> q = random_matrix<T>(6, 8, 1), k = random_matrix<T>(6, 12, 2);
  Matrix<T> q1 = q, k1 = k, q2 = q, k2 = k;
  rot.apply(q1, 11);
  rot.apply(k1, 11);
  rot.apply_pair(q2, k2, 11);
  EXPECT_EQ(q1, q2);
  EXPECT_EQ(k1, k2);
  // Blocks of a larger matrix (what the layer does per batch element).
  Matrix<T> big = random_matrix<T>(10, 4, 3);
  const Matrix<T> orig = big;
  rot.apply(big.middleRows(4, 3), 2);
  EXPECT_EQ(big.topRows(4), orig.topRows(4));
  Matrix<T> mid = orig.middleRows(4, 3);
  rot.apply(mid, 2);
  EXPECT_EQ(big.middleRows(4, 3), mid);
}

// Long inputs split their spans over threads: any thread count gives the one-thread result bit
// for bit (each span's angles are formed alike on any thread), and a negative count is rejected.
TYPED_TEST(RotationTest, ThreadsGiveTheOneThreadResult) {
  using T = TypeParam;
  const ThetaShift rot(64);
  // 4099 rows (65 spans, the last one short) x 8 heads: enough work for a team by the thread rule.
  const Matrix<T> q = random_matrix<T>(4099, 512, 4), k = random_matrix<T>(4099, 256, 5);
  Matrix<T> q1 = q, k1 = k;
  rot.apply_pair(q1, k1, 1000, 1);
  for (int threads : {0, 2, 3}) {
    Matrix<T> q2 = q, k2 = k, q3 = q;
    rot.apply_pair(q2, k2, 1000, threads);
    rot.apply(q3, 1000, threads);
    EXPECT_EQ(q2, q1) << "threads " << threads;
    EXPECT_EQ(k2, k1) << "threads " << threads;
    EXPECT_EQ(q3, q1) << "threads " << threads;
  }
  // Against the angles formed directly in double (docs/math.md §3): row t, pair j of head g.
  double worst = 0;
  for (Index t : {Index(0), Index(63), Index(64), Index(2048), Index(4098)})
    for (Index col = 0; col < 512; col += 2) {
      const Index j = (col % 64) / 2;
      const double angle =
          static_cast<double>(1000 + t) * rot.thetas()[static_cast<std::size_t>(j)];
      const double x0 = static_cast<double>(q(t, col)), x1 = static_cast<double>(q(t, col + 1));
      const double r0 = x0 * std::cos(angle) - x1 * std::sin(angle);
      const double r1 = x1 * std::cos(angle) + x0 * std::sin(angle);
      worst = std::max(worst, std::abs(static_cast<double>(q1(t, col)) - r0));
      worst = std::max(worst, std::abs(static_cast<double>(q1(t, col + 1)) - r1));
    }
  EXPECT_LT(worst, 10 * spec_tolerance<T>());
  Matrix<T> x = q;
  expect_shape_error([&] { rot.apply(x, 0, -1); }, "ThetaShift::apply: threads must be >= 0");
  expect_shape_error([&] { rot.apply_pair(x, k1, 0, -2); },
                     "ThetaShift::apply_pair: threads must be >= 0");
}

TEST(Rotation, Errors) {
  expect_shape_error([] { ThetaShift r(3); }, "ThetaShift: head_dim must be even and >= 2");
  expect_shape_error([] { ThetaShift r(0); },
                     "head_dim must be even and >= 2 (rotation acts on pairs), got 0");
  const ThetaShift rot(4);
  Mat x = random_matrix<double>(2, 6, 1), y = random_matrix<double>(3, 4, 2),
      ok = random_matrix<double>(2, 4, 3);
  expect_shape_error([&] { rot.apply(x, 0); },
                     "ThetaShift::apply: x is [2 x 6], columns not a multiple of head_dim 4");
  expect_shape_error([&] { rot.apply(ok, -1); }, "first_position must be >= 0, got -1");
  expect_shape_error([&] { rot.apply_pair(ok, x, 0); },
                     "ThetaShift::apply_pair: y is [2 x 6], columns not a multiple");
  expect_shape_error([&] { rot.apply_pair(ok, y, 0); },
                     "ThetaShift::apply_pair: y is [3 x 4], expected [2 x *]");
}

}  // namespace
