// Row norms (SPEC 3 head norm, SPEC 5 LayerNorm) against loops, edge cases and bad input.
#include <retention/nn/norms.hpp>

#include "support/test_support.hpp"

#include <gtest/gtest.h>

#include <cmath>

namespace {

using retention::Index;
using retention::Matrix;
using retention_test::expect_shape_error;
using retention_test::random_matrix;
using retention_test::relative_error;
using retention_test::spec_tolerance;
using Mat = retention::Matrix<double>;

Mat norm_reference(const Mat& x, Index group, double eps, bool subtract_mean) {
  Mat y = x;
  for (Index t = 0; t < x.rows(); ++t)
    for (Index g0 = 0; g0 < x.cols(); g0 += group) {
      double mean = 0.0;
      if (subtract_mean) {
        for (Index c = 0; c < group; ++c) mean += x(t, g0 + c);
        mean /= double(group);
      }
      double ms = 0.0;
      for (Index c = 0; c < group; ++c) ms += (x(t, g0 + c) - mean) * (x(t, g0 + c) - mean);
      ms /= double(group);
      for (Index c = 0; c < group; ++c) y(t, g0 + c) = (x(t, g0 + c) - mean) / std::sqrt(ms + eps);
    }
  return y;
}

template <class T>
class NormsTest : public ::testing::Test {};
TYPED_TEST_SUITE(NormsTest, retention_test::ScalarTypes);

TYPED_TEST(NormsTest, GroupNormsMatchLoops) {
  using T = TypeParam;
  struct Case {
    Index rows, group, groups;
    double eps;
  };
  for (const Case c : {Case{1, 1, 1, 1e-6}, Case{3, 4, 2, 1e-6}, Case{5, 7, 3, 0.0},
                       Case{2, 64, 4, 1e-5}, Case{4, 3, 1, 0.5}}) {
    const Matrix<T> x =
        random_matrix<T>(c.rows, c.group * c.groups, std::uint64_t(c.group * 7 + c.groups), 3.0);
    const Mat xd = x.template cast<double>();
    Matrix<T> a = x, b = x;
    retention::rms_norm_groups(a, c.group, c.eps);
    retention::layer_norm_groups(b, c.group, c.eps);
    EXPECT_LE(relative_error(a, norm_reference(xd, c.group, c.eps, false)), spec_tolerance<T>())
        << c.group;
    if (c.group > 1 || c.eps > 0) {  // LayerNorm of a 1-wide group at eps = 0 is 0/0
      EXPECT_LE(relative_error(b, norm_reference(xd, c.group, c.eps, true)), spec_tolerance<T>())
          << c.group;
    }
  }
}

TEST(Norms, GroupOfOneAndConstantRows) {
  Mat x(2, 3);
  x << 2.0, -3.0, 0.5, 1.0, 1.0, 1.0;
  Mat r = x;
  retention::rms_norm_groups(r, 1, 0.0);  // each entry alone: its sign
  EXPECT_EQ(r, (Mat(2, 3) << 1.0, -1.0, 1.0, 1.0, 1.0, 1.0).finished());
  Mat l = x.bottomRows(1);
  retention::layer_norm_groups(l, 3, 1e-6);  // constant row: zero, not NaN
  EXPECT_EQ(l, Mat::Zero(1, 3));
  // Norms work on blocks of larger matrices in place.
  Mat big = random_matrix<double>(4, 6, 9);
  const Mat orig = big;
  retention::rms_norm_groups(big.middleCols(2, 4), 2, 1e-6);
  EXPECT_EQ(big.leftCols(2), orig.leftCols(2));
  EXPECT_LE(
      relative_error(big.middleCols(2, 4), norm_reference(orig.middleCols(2, 4), 2, 1e-6, false)),
      1e-14);
}

TYPED_TEST(NormsTest, LayerNormWithAffine) {
  using T = TypeParam;
  const Matrix<T> x = random_matrix<T>(5, 12, 3, 2.0);
  const retention::Vector<T> w = random_matrix<T>(12, 1, 4);
  const retention::RowVector<T> b = random_matrix<T>(1, 12, 5);
  const Matrix<T> y = retention::layer_norm(x, w, b, 1e-6);
  Mat ref = norm_reference(x.template cast<double>(), 12, 1e-6, true);
  for (Index t = 0; t < 5; ++t)
    for (Index c = 0; c < 12; ++c) ref(t, c) = ref(t, c) * double(w(c)) + double(b(c));
  EXPECT_LE(relative_error(y, ref), spec_tolerance<T>());
}

// A user's template that takes Eigen::MatrixBase<D>& and forwards it (the pattern of
// examples/02_generate.cpp) must compile and normalise in place: the output check accepts any
// DenseBase-derived type, not only concrete matrices, Maps, Blocks and Refs.
template <class D>
void user_rms(Eigen::MatrixBase<D>& x, double eps) {
  retention::rms_norm_groups(x, x.cols(), eps);
}

TEST(Norms, AcceptsMatrixBaseReferences) {
  Mat x = random_matrix<double>(3, 4, 91);
  const Mat x0 = x;
  user_rms(x, 0.0);
  for (Index t = 0; t < 3; ++t) {
    const double rms = std::sqrt(x0.row(t).squaredNorm() / 4.0);
    EXPECT_LE(relative_error(x.row(t), x0.row(t) / rms), 1e-15);
  }
  retention::RowVector<float> r = random_matrix<float>(1, 6, 92);
  const retention::RowVector<float> r0 = r;
  Eigen::MatrixBase<retention::RowVector<float>>& rb = r;
  retention::layer_norm_groups(rb, 3, 0.0);
  for (Index g = 0; g < 6; g += 3) {
    const Eigen::VectorXd in = r0.segment(g, 3).cast<double>().transpose();
    const double mean = in.mean();
    const double var = (in.array() - mean).square().mean();
    for (Index j = 0; j < 3; ++j) EXPECT_NEAR(r(g + j), (in(j)-mean) / std::sqrt(var), 1e-5);
  }
}

TEST(Norms, Errors) {
  Mat x = random_matrix<double>(2, 6, 1);
  expect_shape_error([&] { retention::rms_norm_groups(x, 4, 1e-6); },
                     "rms_norm_groups: x is [2 x 6], columns not a multiple of group 4");
  expect_shape_error([&] { retention::layer_norm_groups(x, 0, 1e-6); },
                     "layer_norm_groups: x is [2 x 6], columns not a multiple of group 0");
  expect_shape_error([&] { retention::rms_norm_groups(x, 3, -1e-3); },
                     "rms_norm_groups: eps must be >= 0");
  expect_shape_error([&] { retention::layer_norm_groups(x, 3, std::nan("")); }, "eps must be >= 0");
  const retention::Vector<double> w5 = retention::Vector<double>::Ones(5);
  const retention::Vector<double> w6 = retention::Vector<double>::Ones(6);
  expect_shape_error([&] { retention::layer_norm(x, w5, w6, 1e-6); },
                     "layer_norm: weight/bias have 5/6 entries, expected 6");
  expect_shape_error([&] { retention::layer_norm(x, w6, w5, 1e-6); },
                     "layer_norm: weight/bias have 6/5 entries, expected 6");
}

}  // namespace
