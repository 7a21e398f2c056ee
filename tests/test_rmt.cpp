// The RMT attention layer (SPEC 4): LCE against a naive convolution loop, the whole layer against
// the naive double reference in both modes, batching, weight loading and bad input.
#include <retention/isa.hpp>
#include <retention/layers/rmt.hpp>

#include "reference/rmt_reference.hpp"
#include "support/isa_support.hpp"
#include "support/test_support.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <string>

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
  // Loaded as float64 tensors by the RMT code's names (ParameterMap views of p's storage).
  retention::ParameterMap params;
  params.add("q_proj.weight", p.wq.data(), {C, C});
  params.add("k_proj.weight", p.wk.data(), {C, C});
  params.add("v_proj.weight", p.wv.data(), {Cv, C});
  params.add("out_proj.weight", p.wo.data(), {C, Cv});
  params.add("q_proj.bias", p.bq.data(), {C});
  params.add("k_proj.bias", p.bk.data(), {C});
  params.add("v_proj.bias", p.bv.data(), {Cv});
  params.add("out_proj.bias", p.bo.data(), {C});
  params.add("lepe.conv.weight", p.lce_weight.data(), {Cv, 1, 5, 5});
  params.add("lepe.conv.bias", p.lce_bias.data(), {Cv});
  layer.load(params);
  return p;
}

// LCE of two random H x W images of C channels (seeds from *seed on), threads as given, against
// the naive double convolution of each image.
template <class T>
void expect_lce_matches_naive(Index H, Index W, Index C, std::uint64_t* seed, int threads,
                              const std::string& label) {
  const Matrix<T> v = random_matrix<T>(2 * H * W, C, ++*seed);
  const Matrix<T> w = random_matrix<T>(C, 25, ++*seed);
  const Matrix<T> b = random_matrix<T>(1, C, ++*seed);
  const Matrix<T> got = retention::local_context_enhancement(v, 2, H, W, w, b, threads);
  const Mat wd = w.template cast<double>();
  const std::vector<double> wflat(wd.data(), wd.data() + wd.size());
  const Mat bd = b.template cast<double>();
  const std::vector<double> bflat(bd.data(), bd.data() + bd.size());
  for (Index img = 0; img < 2; ++img) {
    const Mat ref = rmt_reference::lce(v.middleRows(img * H * W, H * W).template cast<double>(), H,
                                       W, wflat, bflat);
    EXPECT_LE(relative_error(got.middleRows(img * H * W, H * W), ref), spec_tolerance<T>())
        << label << H << "x" << W << " C " << C;
  }
}

TYPED_TEST(RmtTest, LceMatchesNaiveConvolutionIncludingBorders) {
  const Index shapes[][2] = {{1, 1}, {1, 6}, {2, 3}, {4, 4}, {7, 5}, {6, 9}};
  std::uint64_t seed = 1000;
  for (const auto& s : shapes) expect_lce_matches_naive<TypeParam>(s[0], s[1], 5, &seed, 0, "");
}

// The LCE kernel on every instruction set the processor runs, with channel counts that fill whole
// vectors and leave a tail (37 = 2 x 16 + 5 floats, 4 x 8 + 5 doubles) and images narrower and
// shorter than the 5 x 5 window, against the naive convolution.
TYPED_TEST(RmtTest, LceEveryInstructionSetMatchesNaiveConvolution) {
  const Index shapes[][2] = {{1, 1}, {2, 3}, {3, 7}, {7, 5}, {6, 9}};
  std::uint64_t seed = 1200;
  for (retention::Isa isa : retention_test::isa_variants()) {
    const retention_test::IsaScope scope(isa);
    for (const auto& s : shapes)
      for (Index C : {16, 37})
        expect_lce_matches_naive<TypeParam>(s[0], s[1], C, &seed, 1,
                                            std::string(retention::to_string(isa)) + " ");
  }
}

// Image rows spread over threads (the image is large enough for the thread rule to form a team of
// two): the same values as one thread, bit for bit, and the naive convolution's within tolerance.
TYPED_TEST(RmtTest, LceThreadsGiveTheOneThreadResult) {
  using T = TypeParam;
  const Index B = 2, H = 33, W = 31, C = 400;
  const Matrix<T> v = random_matrix<T>(B * H * W, C, 1100);
  const Matrix<T> w = random_matrix<T>(C, 25, 1101);
  const Matrix<T> b = random_matrix<T>(1, C, 1102);
  const Matrix<T> one = retention::local_context_enhancement(v, B, H, W, w, b, 1);
  for (int threads : {0, 2, 3}) {
    const Matrix<T> many = retention::local_context_enhancement(v, B, H, W, w, b, threads);
    EXPECT_EQ(many, one) << threads << " threads";
  }
  const Mat wd = w.template cast<double>();
  const std::vector<double> wflat(wd.data(), wd.data() + wd.size());
  const Mat bd = b.template cast<double>();
  const std::vector<double> bflat(bd.data(), bd.data() + bd.size());
  for (Index img = 0; img < B; ++img) {
    const Mat ref = rmt_reference::lce(v.middleRows(img * H * W, H * W).template cast<double>(), H,
                                       W, wflat, bflat);
    EXPECT_LE(relative_error(one.middleRows(img * H * W, H * W), ref), spec_tolerance<T>());
  }
  retention_test::expect_shape_error(
      [&] { retention::local_context_enhancement(v, B, H, W, w, b, -1); },
      "local_context_enhancement: threads must be >= 0 (0 = default), got -1");
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
  for (const bool packed : {false, true})  // ManhattanAttentionConfig::packed_weights
    for (const Case& c : cases) {
      ManhattanAttentionConfig cfg;
      cfg.packed_weights = packed;
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
        EXPECT_LE(relative_error(layer.forward(x, c.height, c.width, mode), ref),
                  spec_tolerance<T>())
            << c.embed_dim << "/" << c.heads << " " << c.height << "x" << c.width << " "
            << retention::to_string(mode) << (packed ? " packed" : "");
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
  // Every parameter as it is, but q's projection zero.
  retention::ParameterMap params;
  const Matrix<T> zero_w = Matrix<T>::Zero(16, 16);
  const retention::RowVector<T> zero_b = retention::RowVector<T>::Zero(16);
  params.add_dense("q_proj.weight", zero_w);
  params.add_dense("q_proj.bias", zero_b);
  params.add_dense("k_proj.weight", layer.k_proj().weight());
  params.add_dense("k_proj.bias", layer.k_proj().bias());
  params.add_dense("v_proj.weight", layer.v_proj().weight());
  params.add_dense("v_proj.bias", layer.v_proj().bias());
  params.add_dense("out_proj.weight", layer.out_proj().weight());
  params.add_dense("out_proj.bias", layer.out_proj().bias());
  params.add_dense("lepe.conv.weight", layer.lce_weight(), {16, 1, 5, 5});
  params.add_dense("lepe.conv.bias", layer.lce_bias());
  layer.load(params);
  const Matrix<T> x = random_matrix<T>(6 * 7, 16, 3100);
  EXPECT_LE(relative_error(layer.forward(x, 6, 7, RmtMode::full),
                           layer.forward(x, 6, 7, RmtMode::decomposed)),
            spec_tolerance<T>());
}

/// Every parameter of `a` under `prefix`, by the RMT code's names.
template <class T>
retention::ParameterMap parameters_of(const ManhattanAttention<T>& a, const std::string& prefix) {
  retention::ParameterMap params;
  const auto add = [&](const std::string& name, const retention::Linear<T>& l) {
    params.add_dense(prefix + name + ".weight", l.weight());
    params.add_dense(prefix + name + ".bias", l.bias());
  };
  add("q_proj", a.q_proj());
  add("k_proj", a.k_proj());
  add("v_proj", a.v_proj());
  add("out_proj", a.out_proj());
  params.add_dense(prefix + "lepe.conv.weight", a.lce_weight(), {a.value_dim(), 1, 5, 5});
  params.add_dense(prefix + "lepe.conv.bias", a.lce_bias());
  return params;
}

TYPED_TEST(RmtTest, LoadByNamesRoundTripsAndInitIsDeterministic) {
  using T = TypeParam;
  ManhattanAttentionConfig cfg;
  cfg.embed_dim = 8;
  cfg.heads = 2;
  ManhattanAttention<T> a(cfg), b(cfg), c(cfg);
  a.init_random(5);
  c.init_random(5);
  // Copy a's parameters into b by name under a model prefix.
  const std::string prefix = "layers.0.blocks.1.retention.";
  b.load(parameters_of(a, prefix), prefix);
  EXPECT_EQ(a.q_proj().weight(), b.q_proj().weight());
  EXPECT_EQ(a.out_proj().bias(), b.out_proj().bias());
  EXPECT_EQ(a.lce_weight(), b.lce_weight());
  const Matrix<T> x = random_matrix<T>(9, 8, 3200);
  EXPECT_EQ(a.forward(x, 3, 3), c.forward(x, 3, 3));
  EXPECT_EQ(a.forward(x, 3, 3), b.forward(x, 3, 3));
  // rmt schedule: gamma_h = 1 - 2^-(2 + 4 h / 2).
  ASSERT_EQ(a.gammas().size(), 2u);
  EXPECT_DOUBLE_EQ(a.gammas()[0], 0.75);
  EXPECT_DOUBLE_EQ(a.gammas()[1], 1.0 - 1.0 / 16.0);
  // A checkpoint's per-stage decay buffer holds ln gamma per head.
  retention::ParameterMap with_decay = parameters_of(a, prefix);
  const std::vector<float> log_gamma = {std::log(0.5f), std::log(0.875f)};
  with_decay.add("layers.0.Relpos.decay", log_gamma.data(), {2});
  b.load(with_decay, prefix, "layers.0.Relpos.decay");
  EXPECT_NEAR(b.gammas()[0], 0.5, 1e-7);
  EXPECT_NEAR(b.gammas()[1], 0.875, 1e-7);
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
  layer.init_random(3);
  const auto params = parameters_of(layer, "");
  const auto replaced = [&](const std::string& name, const std::vector<float>& values,
                            std::vector<Index> shape) {
    retention::ParameterMap p = params;
    p.add(name, values.data(), std::move(shape));
    return p;
  };
  const std::vector<float> w(63), b(8), big(200);
  expect_shape_error(
      [&] {
        layer.load(replaced("q_proj.weight", w, {7, 9}));
      },
      "ManhattanAttention::load: parameter 'q_proj.weight' has shape [7, 9], "
      "expected [8, 8]");
  expect_shape_error(
      [&] {
        layer.load(replaced("lepe.conv.weight", big, {8, 25}));
      },
      "ManhattanAttention::load: parameter 'lepe.conv.weight' has shape [8, 25], "
      "expected [8, 1, 5, 5]");
  expect_shape_error([&] { layer.load(replaced("out_proj.bias", w, {7})); },
                     "parameter 'out_proj.bias' has shape [7], expected [8]");
  expect_shape_error([&] { layer.load(params, "x."); },
                     "ManhattanAttention::load: missing parameter 'x.q_proj.weight'");
  const std::vector<float> bad_decay = {0.5f, -1.0f};  // ln gamma = 0.5: gamma > 1
  expect_shape_error([&] { layer.load(replaced("d", bad_decay, {2}), "", "d"); },
                     "is not ln gamma of a gamma in (0, 1]");
  expect_shape_error([&] { layer.load(params, "", "missing.decay"); },
                     "missing parameter 'missing.decay'");
  const Matrix<T> v = random_matrix<T>(12, 3, 3);
  expect_shape_error(
      [&] {
        retention::local_context_enhancement(v, 1, 3, 4, Matrix<T>(Matrix<T>::Zero(3, 24)),
                                             Matrix<T>(Matrix<T>::Zero(1, 3)));
      },
      "local_context_enhancement: weight is [3 x 24], expected [3 x 25]");
}

}  // namespace
