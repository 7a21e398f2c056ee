// Unit tests of the building blocks the layers share, each against the formula written out in
// double: nn/linear.hpp (forward, forward_into, concat with factors), nn/layer_norm.hpp,
// nn/activations.hpp (exact GELU, SiLU and its extremes), io/tensor.hpp (dtype sizes and names,
// checked shape products, 16-bit float decoding from bit patterns).
#include <retention/io/tensor.hpp>
#include <retention/nn/activations.hpp>
#include <retention/nn/layer_norm.hpp>
#include <retention/nn/linear.hpp>
#include <retention/nn/parameters.hpp>

#include "support/test_support.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

using retention::Index;
using retention::Matrix;
using retention_test::expect_shape_error;
using retention_test::random_matrix;
using retention_test::relative_error;

TEST(NnUnits, LinearForwardAndConcat) {
  retention::Linear<double> a(5, 3, true), b(5, 2, true);
  a.set_weight(random_matrix<double>(3, 5, 1));
  a.set_bias(random_matrix<double>(1, 3, 2));
  b.set_weight(random_matrix<double>(2, 5, 3));
  b.set_bias(random_matrix<double>(3 - 1, 1, 4));  // a column vector is accepted too
  const Matrix<double> x = random_matrix<double>(4, 5, 5);
  Matrix<double> want(4, 3);
  for (Index r = 0; r < 4; ++r)
    for (Index o = 0; o < 3; ++o) {
      double s = a.bias()(o);
      for (Index i = 0; i < 5; ++i) s += x(r, i) * a.weight()(o, i);
      want(r, o) = s;
    }
  EXPECT_LE(relative_error(a.forward(x), want), 1e-15);
  Matrix<double> y(4, 3);
  a.forward_into(x, y);
  EXPECT_LE(relative_error(y, want), 1e-15);
  // [a | 0.5 b] in one product.
  const retention::Linear<double> ab = retention::Linear<double>::concat({{&a, 1.0}, {&b, 0.5}});
  const Matrix<double> yab = ab.forward(x);
  ASSERT_EQ(yab.cols(), 5);
  EXPECT_LE(relative_error(yab.leftCols(3), want), 1e-15);
  EXPECT_LE(relative_error(yab.rightCols(2), 0.5 * b.forward(x)), 1e-15);
  expect_shape_error([&] { (void)a.forward(Matrix<double>(4, 6)); }, "Linear");
}

// The threaded forward_into: many rows split into row blocks, few rows into blocks of outputs
// (detail::split_columns; an output count that is no multiple of the block alignment, and an
// output that is a block of a larger matrix), each against the product written out in double.
TEST(NnUnits, LinearThreadedForwardSplitsRowsOrOutputs) {
  const Index in = 256, out = 301;
  retention::Linear<float> l(in, out, true);
  l.set_weight(random_matrix<float>(out, in, 21, 0.1f));
  l.set_bias(random_matrix<float>(1, out, 22));
  for (const Index rows : {Index(1), Index(40), Index(300)}) {
    const Matrix<float> x = random_matrix<float>(rows, in, 23 + static_cast<std::uint64_t>(rows));
    Matrix<double> want(rows, out);
    for (Index r = 0; r < rows; ++r)
      for (Index o = 0; o < out; ++o) {
        double s = l.bias()(o);
        for (Index i = 0; i < in; ++i)
          s += static_cast<double>(x(r, i)) * static_cast<double>(l.weight()(o, i));
        want(r, o) = s;
      }
    Matrix<float> big = Matrix<float>::Constant(rows + 3, out + 5, 7.0f);
    auto y = big.block(1, 2, rows, out);
    l.forward_into(x, y, 2);
    EXPECT_LE(relative_error(Matrix<float>(y), want), 1e-5) << rows << " rows";
    // Nothing outside the block was written.
    EXPECT_TRUE((big.topRows(1).array() == 7.0f).all());
    EXPECT_TRUE((big.leftCols(2).array() == 7.0f).all());
    EXPECT_TRUE((big.rightCols(3).array() == 7.0f).all());
    EXPECT_TRUE((big.bottomRows(2).array() == 7.0f).all());
  }
  EXPECT_TRUE(retention::detail::split_columns(40, 301, 2)) << "40 rows split over outputs";
  EXPECT_FALSE(retention::detail::split_columns(300, 301, 2)) << "300 rows split over rows";
  EXPECT_FALSE(retention::detail::split_columns(40, 301, 1)) << "no team, no split";
  const double flops_per_row = 2.0 * in * out;
  EXPECT_EQ(retention::detail::plan_column_split(2, 40, out, flops_per_row).size, 2);
  EXPECT_EQ(retention::detail::plan_column_split(2, 300, out, flops_per_row).size, 1);
  EXPECT_EQ(retention::detail::plan_column_split(1, 40, out, flops_per_row).size, 1);
}

// Two and three rows run one matrix-vector product per row (Eigen's GEMM would pack the whole
// weight for them): against the sum in double, and the bits of each row's own product, so that a
// batch of decoding sequences gives what decoding them one at a time gives.
TEST(NnUnits, LinearFewRowsAreRowProducts) {
  for (const Index out : {Index(3), Index(301)}) {
    retention::Linear<float> l(256, out, true);
    l.set_weight(random_matrix<float>(out, 256, 51, 0.1f));
    l.set_bias(random_matrix<float>(1, out, 52));
    for (const Index rows : {Index(2), Index(3)}) {
      const Matrix<float> x =
          random_matrix<float>(rows, 256, 53 + static_cast<std::uint64_t>(rows));
      Matrix<double> want(rows, out);
      for (Index r = 0; r < rows; ++r)
        for (Index o = 0; o < out; ++o) {
          double s = l.bias()(o);
          for (Index i = 0; i < 256; ++i)
            s += static_cast<double>(x(r, i)) * static_cast<double>(l.weight()(o, i));
          want(r, o) = s;
        }
      const Matrix<float> y = l.forward(x);
      EXPECT_LE(relative_error(y, want), 1e-6) << rows << " rows";
      for (Index r = 0; r < rows; ++r) {
        const Matrix<float> one = l.forward(Matrix<float>(x.row(r)));
        EXPECT_TRUE(y.row(r) == one.row(0)) << "row " << r << " of " << rows;
      }
      // Outputs [5, out) only (a column block, as the threaded split over outputs runs it).
      if (out > 5) {
        Matrix<float> part = Matrix<float>::Zero(rows, out);
        l.forward_columns_into(x, part, 5, out - 5);
        EXPECT_TRUE(part.rightCols(out - 5) == y.rightCols(out - 5)) << rows << " rows";
      }
    }
  }
}

/// y = x W^T + b written out in double.
template <class T>
Matrix<double> linear_reference(const retention::Linear<T>& l, const Matrix<T>& x) {
  Matrix<double> want(x.rows(), l.out_features());
  for (Index r = 0; r < x.rows(); ++r)
    for (Index o = 0; o < l.out_features(); ++o) {
      double s = l.has_bias() ? static_cast<double>(l.bias()(o)) : 0.0;
      for (Index i = 0; i < l.in_features(); ++i)
        s += static_cast<double>(x(r, i)) * static_cast<double>(l.weight()(o, i));
      want(r, o) = s;
    }
  return want;
}

// A packed Linear (set_packed): every product against the sum written out in double, over output
// counts that are and are not multiples of the packing's panels, inputs above and below Eigen's
// depth block, one to 600 rows; column blocks that start and end inside a panel, outputs in a
// block of a larger matrix, both threaded splits; a new weight (set_weight, load, a copy) is
// packed again, and set_packed(false) goes back to the plain product.
template <class T>
void check_packed_linear(double tol) {
  std::uint64_t seed = 100;
  for (const Index out : {Index(1), Index(5), Index(47), Index(48), Index(49), Index(301)})
    for (const Index in : {Index(1), Index(3), Index(200), Index(1100)}) {
      retention::Linear<T> l(in, out, out % 2 == 1);
      l.set_packed(true);
      l.set_weight(random_matrix<double>(out, in, ++seed, 0.5));
      if (l.has_bias()) l.set_bias(random_matrix<double>(1, out, ++seed));
      ASSERT_TRUE(l.packed());
      for (const Index rows : {Index(0), Index(1), Index(2), Index(7), Index(64), Index(600)}) {
        const Matrix<T> x = random_matrix<T>(rows, in, ++seed);
        const Matrix<double> want = linear_reference(l, x);
        Matrix<T> y(rows, out);
        l.forward_into(x, y);
        EXPECT_LE(relative_error(y, want), tol) << out << " x " << in << ", " << rows << " rows";
        // Outputs [c0, c0 + n) into a block of a larger matrix; nothing else written.
        const Index c0 = out / 3, n = out - out / 3 - out / 5;
        Matrix<T> big = Matrix<T>::Constant(rows + 2, out + 3, T(7));
        auto block = big.block(1, 1, rows, out);
        l.forward_columns_into(x, block, c0, n);
        if (n > 0) {
          EXPECT_LE(relative_error(Matrix<T>(block.middleCols(c0, n)), want.middleCols(c0, n)), tol)
              << out << " x " << in << ", " << rows << " rows, columns " << c0 << " + " << n;
        }
        Matrix<T> outside = big;
        outside.block(1, 1 + c0, rows, n).setConstant(T(7));
        EXPECT_TRUE((outside.array() == T(7)).all()) << out << " x " << in << ", " << rows;
      }
    }
  // Threaded splits over outputs (40 rows) and over rows (300), as in the test above.
  retention::Linear<T> l(256, 301, true);
  l.set_packed(true);
  l.set_weight(random_matrix<double>(301, 256, 31, 0.1));
  l.set_bias(random_matrix<double>(1, 301, 32));
  EXPECT_EQ(l.column_align() % retention::detail::column_block_align, 0);
  // Splits fall on whole panels of the packing the active instruction set's products read.
  EXPECT_EQ(
      l.column_align() % (retention::detail::linear_kernel_active<T>()
                              ? retention::detail::linear_panel_width<T>(retention::active_isa())
                              : retention::detail::PackedWeight<T>::granule()),
      0);
  for (const Index rows : {Index(40), Index(300)}) {
    const Matrix<T> x = random_matrix<T>(rows, 256, 33 + static_cast<std::uint64_t>(rows));
    Matrix<T> y(rows, 301);
    l.forward_into(x, y, 2);
    EXPECT_LE(relative_error(y, linear_reference(l, x)), tol) << rows << " rows, 2 threads";
  }
  // A new weight is packed again: set_weight, load, and on a copy (the original keeps its own).
  const Matrix<T> x = random_matrix<T>(64, 256, 40);
  retention::Linear<T> copy = l;
  copy.set_weight(random_matrix<double>(301, 256, 41));
  EXPECT_LE(relative_error(copy.forward(x), linear_reference(copy, x)), tol);
  EXPECT_LE(relative_error(l.forward(x), linear_reference(l, x)), tol);
  retention::ParameterMap m;
  const Matrix<T> w = random_matrix<T>(301, 256, 42);
  const retention::RowVector<T> b = random_matrix<T>(1, 301, 43);
  m.add_dense("p.weight", w);
  m.add_dense("p.bias", b);
  l.load(m, "p.");
  EXPECT_EQ(l.weight(), w);
  EXPECT_LE(relative_error(l.forward(x), linear_reference(l, x)), tol);
  l.set_packed(false);
  EXPECT_FALSE(l.packed());
  EXPECT_EQ(l.column_align(), retention::detail::column_block_align);
  EXPECT_LE(relative_error(l.forward(x), linear_reference(l, x)), tol);
}

TEST(NnUnits, LinearPackedWeightsFloat) { check_packed_linear<float>(1e-5); }
TEST(NnUnits, LinearPackedWeightsDouble) { check_packed_linear<double>(1e-13); }

TEST(NnUnits, LayerNorm) {
  retention::LayerNorm<double> ln(6, 1e-5);
  const Matrix<double> w = random_matrix<double>(1, 6, 11), b = random_matrix<double>(1, 6, 12);
  ln.set(w, b);
  const Matrix<double> x = random_matrix<double>(3, 6, 13);
  const Matrix<double> y = ln.forward(x);
  for (Index r = 0; r < 3; ++r) {
    const double mean = x.row(r).mean();
    const double var = (x.row(r).array() - mean).square().mean();  // biased, as torch
    for (Index c = 0; c < 6; ++c)
      EXPECT_NEAR(y(r, c), (x(r, c) - mean) / std::sqrt(var + 1e-5) * w(0, c) + b(0, c), 1e-13);
  }
  expect_shape_error([] { retention::LayerNorm<double>(0, 1e-5); }, "LayerNorm");
  expect_shape_error([] { retention::LayerNorm<double>(4, std::nan("")); }, "eps");
  expect_shape_error([&] { (void)ln.forward(Matrix<double>(2, 5)); }, "LayerNorm::forward");
}

TEST(NnUnits, Activations) {
  Matrix<double> x = random_matrix<double>(4, 5, 21) * 4.0;
  const Matrix<double> x0 = x;
  retention::gelu_inplace(x);
  for (Index i = 0; i < x.size(); ++i) {
    const double v = x0.data()[i];
    EXPECT_NEAR(x.data()[i], 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0))), 1e-15);
  }
  // Float takes a vectorised erf: within 8 units of 2^-24 |x| of the formula in double over
  // [-12, 12] (4.4 measured; glibc's erff gives 1.8), in a matrix and in a block of one.
  {
    const Index n = 96001;
    Matrix<float> xf(1, n);
    for (Index i = 0; i < n; ++i)
      xf(0, i) = static_cast<float>(-12.0 + 24.0 * static_cast<double>(i) / (n - 1.0));
    Matrix<float> gf = xf;
    retention::gelu_inplace(gf);
    Matrix<float> g1 = xf.leftCols(7);
    retention::gelu_inplace(g1.block(0, 3, 1, 1));
    for (Index i = 0; i < n; ++i) {
      const double v = xf(0, i), want = 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0)));
      ASSERT_NEAR(gf(0, i), want, 8.0 * std::ldexp(std::max(std::abs(v), 1e-30), -24)) << v;
    }
    EXPECT_NEAR(g1(0, 3), gf(0, 3), 1e-6f);
    EXPECT_EQ(g1(0, 2), xf(0, 2));
    Matrix<float> e(1, 4);
    e << std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN(), 0.0f,
        -0.0f;
    retention::gelu_inplace(e);
    EXPECT_EQ(e(0, 0), std::numeric_limits<float>::infinity());
    EXPECT_TRUE(std::isnan(e(0, 1)));
    EXPECT_EQ(e(0, 2), 0.0f);
    EXPECT_EQ(e(0, 3), 0.0f);
  }
  Matrix<float> s(1, 4);
  s << 2.0f, -1000.0f, std::numeric_limits<float>::quiet_NaN(), 0.0f;
  retention::silu_inplace(s);
  EXPECT_NEAR(s(0, 0), 2.0 / (1.0 + std::exp(-2.0)), 1e-6);
  EXPECT_EQ(s(0, 1), 0.0f);  // exp(1000) = inf: -0, not NaN
  EXPECT_TRUE(std::isnan(s(0, 2)));
  EXPECT_EQ(s(0, 3), 0.0f);
  // In place on a block: the other columns stay.
  Matrix<double> u = x0;
  retention::silu_inplace(u.leftCols(2));
  EXPECT_EQ(u.rightCols(3), x0.rightCols(3));
  EXPECT_NEAR(u(0, 0), x0(0, 0) / (1.0 + std::exp(-x0(0, 0))), 1e-15);
}

TEST(NnUnits, TensorDtypesShapesAndDecoding) {
  namespace io = retention::io;
  EXPECT_EQ(io::dtype_size(io::DType::f64), 8u);
  EXPECT_EQ(io::dtype_size(io::DType::bf16), 2u);
  EXPECT_EQ(io::dtype_size(io::DType::u8), 1u);
  for (const char* name : {"F64", "F32", "F16", "BF16", "I64", "BOOL"}) {
    io::DType d{};
    ASSERT_TRUE(io::parse_dtype(name, d)) << name;
    EXPECT_STREQ(io::to_string(d), name);
  }
  io::DType d{};
  EXPECT_FALSE(io::parse_dtype("F33", d));
  EXPECT_TRUE(io::is_float_dtype(io::DType::bf16));
  EXPECT_FALSE(io::is_float_dtype(io::DType::i32));
  Index n = 0;
  EXPECT_TRUE(io::detail::shape_numel({2, 3, 4}, n));
  EXPECT_EQ(n, 24);
  EXPECT_TRUE(io::detail::shape_numel({}, n));
  EXPECT_EQ(n, 1);
  EXPECT_FALSE(io::detail::shape_numel({2, -1}, n));
  EXPECT_FALSE(io::detail::shape_numel({Index(1) << 40, Index(1) << 40}, n));
  // 1.0 and -2.5 as little-endian f16 (0x3C00, 0xC100) and bf16 (0x3F80, 0xC020) bit patterns.
  const unsigned char f16_one[] = {0x00, 0x3C}, f16_m25[] = {0x00, 0xC1};
  const unsigned char bf16_one[] = {0x80, 0x3F}, bf16_m25[] = {0x20, 0xC0};
  EXPECT_EQ(io::detail::decode_float<double>(io::DType::f16, f16_one), 1.0);
  EXPECT_EQ(io::detail::decode_float<double>(io::DType::f16, f16_m25), -2.5);
  EXPECT_EQ(io::detail::decode_float<float>(io::DType::bf16, bf16_one), 1.0f);
  EXPECT_EQ(io::detail::decode_float<float>(io::DType::bf16, bf16_m25), -2.5f);
}

}  // namespace
