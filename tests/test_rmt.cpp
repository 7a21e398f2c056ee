// The RMT attention layer (SPEC 4): LCE against a naive convolution loop, the whole layer against
// the naive double reference in both modes, batching, weight loading and bad input.
#include <retention/layers/rmt.hpp>

#include "reference/rmt_reference.hpp"
#include "support/test_support.hpp"

#include <gtest/gtest.h>

#include <vector>

namespace {

using retention::Index;
using retention::ManhattanAttention;
using retention::ManhattanAttentionConfig;
using retention::Matrix;
using retention::RmtMode;
using retention_test::random_matrix;
using retention_test::relative_error;
using retention_test::spec_tolerance;
using Mat = retention::Matrix<double>;

template <class T>
class RmtTest : public ::testing::Test {};
TYPED_TEST_SUITE(RmtTest, retention_test::ScalarTypes);

std::vector<double> flat(const Mat& m) {
  return std::vector<double>(m.data(), m.data() + m.size());
}

// Random torch-layout weights, loaded into the layer from raw double arrays and kept for the
// reference.
template <class T>
rmt_reference::LayerParams load_random(ManhattanAttention<T>& layer, std::uint64_t seed) {
  const Index C = layer.embed_dim(), Cv = layer.value_dim();
  rmt_reference::LayerParams p;
  p.heads = layer.heads();
  p.gammas = layer.gammas();
  // Weights are rounded through T first, so float and double layers see exactly the reference's
  // values.
  const auto draw = [&](Index r, Index c, double scale) {
    return Mat(random_matrix<T>(r, c, ++seed, scale).template cast<double>());
  };
  p.wq = draw(C, C, 0.5);
  p.wk = draw(C, C, 0.5);
  p.wv = draw(Cv, C, 0.5);
  p.wo = draw(C, Cv, 0.5);
  p.bq = flat(draw(1, C, 0.5));
  p.bk = flat(draw(1, C, 0.5));
  p.bv = flat(draw(1, Cv, 0.5));
  p.bo = flat(draw(1, C, 0.5));
  p.lce_weight = flat(draw(Cv, 25, 0.3));
  p.lce_bias = flat(draw(1, Cv, 0.3));
  const auto sz = [](const auto& v) { return static_cast<Index>(v.size()); };
  layer.load_q_proj(p.wq.data(), p.wq.size(), p.bq.data(), sz(p.bq));
  layer.load_k_proj(p.wk.data(), p.wk.size(), p.bk.data(), sz(p.bk));
  layer.load_v_proj(p.wv.data(), p.wv.size(), p.bv.data(), sz(p.bv));
  layer.load_out_proj(p.wo.data(), p.wo.size(), p.bo.data(), sz(p.bo));
  layer.load_lce(p.lce_weight.data(), sz(p.lce_weight), p.lce_bias.data(), sz(p.lce_bias));
  return p;
}

TYPED_TEST(RmtTest, LceMatchesNaiveConvolutionIncludingBorders) {
  using T = TypeParam;
  const Index shapes[][2] = {{1, 1}, {1, 6}, {2, 3}, {4, 4}, {7, 5}, {6, 9}};
  std::uint64_t seed = 1000;
  for (const auto& s : shapes) {
    const Index H = s[0], W = s[1], C = 5;
    const Matrix<T> v = random_matrix<T>(2 * H * W, C, ++seed);
    const Matrix<T> w = random_matrix<T>(C, 25, ++seed);
    const Matrix<T> b = random_matrix<T>(1, C, ++seed);
    const Matrix<T> got = retention::local_context_enhancement(v, 2, H, W, w, b);
    const Mat wd = w.template cast<double>();
    const std::vector<double> wflat(wd.data(), wd.data() + wd.size());
    const Mat bd = b.template cast<double>();
    const std::vector<double> bflat(bd.data(), bd.data() + bd.size());
    for (Index img = 0; img < 2; ++img) {
      const Mat ref = rmt_reference::lce(v.middleRows(img * H * W, H * W).template cast<double>(),
                                         H, W, wflat, bflat);
      EXPECT_LE(relative_error(got.middleRows(img * H * W, H * W), ref), spec_tolerance<T>())
          << H << "x" << W;
    }
  }
}

TYPED_TEST(RmtTest, LayerMatchesReference) {
  using T = TypeParam;
  struct Case {
    Index embed_dim, heads, value_factor, height, width;
    double heads_range;
  };
  const Case cases[] = {
      {8, 2, 1, 4, 5, 4.0}, {12, 3, 2, 7, 7, 6.0}, {4, 1, 1, 1, 1, 4.0}, {16, 4, 1, 3, 8, 5.0}};
  std::uint64_t seed = 2000;
  for (const Case& c : cases) {
    ManhattanAttentionConfig cfg;
    cfg.embed_dim = c.embed_dim;
    cfg.heads = c.heads;
    cfg.value_factor = c.value_factor;
    cfg.heads_range = c.heads_range;
    cfg.tile.query_tile = 5;  // small tiles so the streaming path really streams
    cfg.tile.key_tile = 9;
    ManhattanAttention<T> layer(cfg);
    const rmt_reference::LayerParams p = load_random(layer, seed += 20);
    const Matrix<T> x = random_matrix<T>(c.height * c.width, c.embed_dim, ++seed);
    const Mat xd = x.template cast<double>();
    for (RmtMode mode : {RmtMode::full, RmtMode::decomposed}) {
      const Mat ref = rmt_reference::layer(xd, c.height, c.width, p, mode == RmtMode::decomposed);
      EXPECT_LE(relative_error(layer.forward(x, c.height, c.width, mode), ref), spec_tolerance<T>())
          << c.embed_dim << "/" << c.heads << " " << c.height << "x" << c.width << " "
          << retention::to_string(mode);
    }
  }
}

TYPED_TEST(RmtTest, BatchEqualsPerImage) {
  using T = TypeParam;
  ManhattanAttentionConfig cfg;
  cfg.embed_dim = 16;
  cfg.heads = 2;
  cfg.value_factor = 2;
  ManhattanAttention<T> layer(cfg);
  layer.init_random(7);
  const Index H = 5, W = 6, N = H * W, B = 3;
  const Matrix<T> x = random_matrix<T>(B * N, 16, 3000);
  for (RmtMode mode : {RmtMode::full, RmtMode::decomposed}) {
    const Matrix<T> all = layer.forward(x, B, H, W, mode);
    for (Index b = 0; b < B; ++b)
      EXPECT_LE(relative_error(all.middleRows(b * N, N),
                               layer.forward(x.middleRows(b * N, N), H, W, mode)),
                spec_tolerance<T>());
  }
}

// With q = 0 every content logit is zero, so the full and decomposed layers agree (SPEC 4).
TYPED_TEST(RmtTest, ZeroQueryFullEqualsDecomposed) {
  using T = TypeParam;
  ManhattanAttentionConfig cfg;
  cfg.embed_dim = 16;
  cfg.heads = 4;
  ManhattanAttention<T> layer(cfg);
  layer.init_random(11);
  layer.load_q_proj(Matrix<T>::Zero(16, 16), Matrix<T>::Zero(1, 16));
  const Matrix<T> x = random_matrix<T>(6 * 7, 16, 3100);
  EXPECT_LE(relative_error(layer.forward(x, 6, 7, RmtMode::full),
                           layer.forward(x, 6, 7, RmtMode::decomposed)),
            spec_tolerance<T>());
}

TYPED_TEST(RmtTest, RawAndEigenLoadersAgreeAndInitIsDeterministic) {
  using T = TypeParam;
  ManhattanAttentionConfig cfg;
  cfg.embed_dim = 8;
  cfg.heads = 2;
  ManhattanAttention<T> a(cfg), b(cfg), c(cfg);
  a.init_random(5);
  c.init_random(5);
  // Copy a's weights into b through the Eigen overloads (bias given as a column this time).
  b.load_q_proj(a.q_weight(), Matrix<T>::Zero(8, 1));
  b.load_k_proj(a.k_weight(), Matrix<T>::Zero(1, 8));
  b.load_v_proj(a.v_weight(), Matrix<T>::Zero(1, 8));
  b.load_out_proj(a.out_weight(), Matrix<T>::Zero(1, 8));
  b.load_lce(a.lce_weight(), Matrix<T>::Zero(1, 8));
  EXPECT_EQ(a.q_weight(), b.q_weight());
  EXPECT_EQ(a.lce_weight(), b.lce_weight());
  const Matrix<T> x = random_matrix<T>(9, 8, 3200);
  EXPECT_EQ(a.forward(x, 3, 3), c.forward(x, 3, 3));
  // rmt schedule: gamma_h = 1 - 2^-(2 + 4 h / 2).
  ASSERT_EQ(a.gammas().size(), 2u);
  EXPECT_DOUBLE_EQ(a.gammas()[0], 0.75);
  EXPECT_DOUBLE_EQ(a.gammas()[1], 1.0 - 1.0 / 16.0);
}

TYPED_TEST(RmtTest, ShapeErrors) {
  using T = TypeParam;
  using retention_test::expect_shape_error;
  ManhattanAttentionConfig cfg;
  cfg.embed_dim = 10;
  cfg.heads = 4;
  expect_shape_error([&] { ManhattanAttention<T> l(cfg); },
                     "ManhattanAttention: embed_dim 10 is not divisible by heads 4");
  cfg.heads = 2;  // dk = 5
  expect_shape_error([&] { ManhattanAttention<T> l(cfg); },
                     "ManhattanAttention: head dim 5 is odd");
  cfg.embed_dim = 8;
  cfg.initial_value = 0.0;
  expect_shape_error([&] { ManhattanAttention<T> l(cfg); },
                     "rmt_gammas: initial_value must be > 0");
  cfg.initial_value = 2.0;
  cfg.tile.key_tile = 0;
  expect_shape_error([&] { ManhattanAttention<T> l(cfg); },
                     "ManhattanAttention: key_tile must be >= 1");
  cfg.tile.key_tile = 64;
  ManhattanAttention<T> layer(cfg);
  const Matrix<T> x = random_matrix<T>(11, 8, 1);
  expect_shape_error([&] { layer.forward(x, 3, 4); },
                     "ManhattanAttention::forward: x is [11 x 8], expected [12 x 8]");
  expect_shape_error([&] { layer.forward(x, 2, 2, 3); },
                     "ManhattanAttention::forward: x is [11 x 8], expected [12 x 8]");
  expect_shape_error([&] { layer.forward(random_matrix<T>(12, 6, 2), 3, 4); },
                     "ManhattanAttention::forward: x is [12 x 6], expected [12 x 8]");
  expect_shape_error([&] { layer.forward(x, 0, 4); },
                     "ManhattanAttention::forward: height must be >= 1");
  const std::vector<float> w(63), b(8);
  expect_shape_error(
      [&] { layer.load_q_proj(w.data(), 63, b.data(), 8); },
      "ManhattanAttention::load_q_proj: weight has 63 values, expected [8 x 8] = 64");
  expect_shape_error([&] { layer.load_lce(w.data(), 63, b.data(), 8); },
                     "ManhattanAttention::load_lce: weight has 63 values, expected [8 x 25] = 200");
  expect_shape_error([&] { layer.load_out_proj(Matrix<T>::Zero(8, 8), Matrix<T>::Zero(1, 7)); },
                     "ManhattanAttention::load_out_proj: bias is [1 x 7], expected [1 x 8]");
  expect_shape_error([&] { layer.load_v_proj(Matrix<T>::Zero(8, 9), Matrix<T>::Zero(1, 8)); },
                     "ManhattanAttention::load_v_proj: weight is [8 x 9], expected [8 x 8]");
  const Matrix<T> v = random_matrix<T>(12, 3, 3);
  expect_shape_error(
      [&] {
        retention::local_context_enhancement(v, 1, 3, 4, Matrix<T>(Matrix<T>::Zero(3, 24)),
                                             Matrix<T>(Matrix<T>::Zero(1, 3)));
      },
      "local_context_enhancement: weight is [3 x 24], expected [3 x 25]");
}

}  // namespace
