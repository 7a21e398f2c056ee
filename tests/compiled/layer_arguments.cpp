// The argument forms that the layers' thin wrappers (MultiScaleRetention, ManhattanAttention)
// handle before their out-of-line code (compiled mode or not): column-major and strided inputs and
// outputs, expressions, 16-bit batch rows, and fixed-size arguments of a wrong shape. Each gives
// exactly what the same values as plain row-major matrices give, or the same shape error.
#include <retention/layers/msr.hpp>
#include <retention/layers/rmt.hpp>

#include "support/test_support.hpp"

#include <gtest/gtest.h>

#include <vector>

namespace {

using retention::Index;
using retention::ManhattanAttention;
using retention::ManhattanAttentionConfig;
using retention::Matrix;
using retention::MsrConfig;
using retention::MsrState;
using retention::MultiScaleRetention;
using retention::RmtMode;
using retention::RowVector;
using retention_test::expect_shape_error;
using retention_test::random_matrix;
using ColMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;

constexpr Index kDim = 8;

MultiScaleRetention<float> make_layer() {
  MsrConfig c;
  c.embed_dim = kDim;
  c.value_dim = 2 * kDim;
  c.heads = 2;
  MultiScaleRetention<float> layer(c);
  layer.init_random(7);
  return layer;
}

TEST(MsrArguments, StepIntoStridedRowsEqualsContiguousRows) {
  const auto layer = make_layer();
  const Matrix<float> x = random_matrix<float>(6, kDim, 1);
  const ColMajor xc = x;  // x.row(t) of a column-major matrix has an inner stride of 6
  ColMajor yc = ColMajor::Zero(6, kDim);
  Matrix<float> y(6, kDim);
  auto a = layer.make_state(), b = layer.make_state(), c = layer.make_state();
  RowVector<float> yt(kDim);
  for (Index t = 0; t < 6; ++t) {
    layer.step_into(x.row(t), a, y.row(t));
    layer.step_into(xc.row(t), b, yc.row(t));
    layer.step_into(x.row(t) * 1.0f, c, yt);  // an expression, evaluated first
    EXPECT_EQ(yt, y.row(t)) << "step " << t;
  }
  EXPECT_EQ(Matrix<float>(yc), y);
  EXPECT_EQ(b.position, 6);
}

TEST(MsrArguments, StepBatchColumnMajorAnd16BitRowsEqualRowMajor) {
  const auto layer = make_layer();
  std::vector<MsrState<float>> a(3, layer.make_state()), b = a, c = a;
  std::vector<MsrState<float>*> pa, pb, pc;
  for (std::size_t i = 0; i < 3; ++i) pa.push_back(&a[i]), pb.push_back(&b[i]), pc.push_back(&c[i]);
  MultiScaleRetention<float>::BatchWorkspace wa, wb, wc;
  for (Index t = 0; t < 4; ++t) {
    const Matrix<Eigen::bfloat16> x16 =
        random_matrix<float>(3, kDim, 10 + static_cast<std::uint64_t>(t)).cast<Eigen::bfloat16>();
    const Matrix<float> x = x16.cast<float>();
    const ColMajor xc = x;
    Matrix<float> y(3, kDim);
    ColMajor yc(3, kDim), y16(3, kDim);
    layer.step_batch(x, pa, y, wa);
    layer.step_batch(xc, pb, yc, wb);
    layer.step_batch(x16, pc, y16, wc);
    EXPECT_EQ(Matrix<float>(yc), y) << "step " << t;
    EXPECT_EQ(Matrix<float>(y16), y) << "step " << t;
  }
}

TEST(MsrArguments, ColumnMajorPromptsEqualRowMajor) {
  const auto layer = make_layer();
  const Matrix<float> x = random_matrix<float>(9, kDim, 3);
  const ColMajor xc = x;
  EXPECT_EQ(layer.forward(xc), layer.forward(x));
  EXPECT_EQ(layer.forward_batch(xc, 3), layer.forward_batch(x, 3));
  auto a = layer.make_state(), b = layer.make_state();
  EXPECT_EQ(layer.prefill(xc, a), layer.prefill(x, b));
  auto c = layer.make_state(), d = layer.make_state();
  EXPECT_EQ(layer.prefill_packed(xc, {0, 4, 9}, {&a, &c}),
            layer.prefill_packed(x, {0, 4, 9}, {&b, &d}));
  EXPECT_EQ(a.heads[0].S, b.heads[0].S);
}

TEST(MsrArguments, FixedSizeArgumentsOfAWrongShapeAreShapeErrors) {
  const auto layer = make_layer();
  auto s = layer.make_state();
  const Eigen::Matrix<float, 2, kDim> two_rows = Eigen::Matrix<float, 2, kDim>::Zero();
  Eigen::Matrix<float, 2, kDim> out2;
  RowVector<float> y(kDim);
  expect_shape_error([&] { layer.step(two_rows, s); },
                     "MultiScaleRetention::step: x_t is [2 x 8], expected [1 x 8]");
  expect_shape_error([&] { layer.step_into(two_rows.row(0), s, out2); },
                     "MultiScaleRetention::step: out is [2 x 8], expected [1 x 8]");
  EXPECT_EQ(s.position, 0);
  layer.step_into(two_rows.row(1), s, y);  // a row of a fixed-size matrix is fine
  EXPECT_EQ(s.position, 1);
}

template <class T>
void check_rmt_layouts() {
  using ColMajorT = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;
  ManhattanAttentionConfig c;
  c.embed_dim = kDim;
  c.heads = 2;
  ManhattanAttention<T> layer(c);
  layer.init_random(5);
  const Matrix<T> x = random_matrix<T>(2 * 12, kDim, 4);
  const ColMajorT xc = x;
  for (RmtMode mode : {RmtMode::full, RmtMode::decomposed}) {
    const Matrix<T> y = layer.forward(x, 2, 3, 4, mode);
    EXPECT_EQ(y.rows(), 24);
    EXPECT_TRUE(y.allFinite());
    EXPECT_EQ(layer.forward(xc, 2, 3, 4, mode), y);
  }
  expect_shape_error([&] { layer.forward(x, 3, 4); },
                     "ManhattanAttention::forward: x is [24 x 8], expected [12 x 8]");
}

TEST(RmtArguments, ColumnMajorImagesEqualRowMajor) {
  check_rmt_layouts<float>();
  check_rmt_layouts<double>();
}

}  // namespace
