// ViR (SPEC 5): MHR, block and encoder against the naive double reference; all encoder forms and
// orders against each other; causality of the class token; torch-layout loading; every error path.
#include <retention/layers/vir.hpp>

#include "reference/vir_reference.hpp"
#include "support/test_support.hpp"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace {

using retention::Form;
using retention::Index;
using retention::Matrix;
using retention::RetentionState;
using retention::VirOptions;
using retention::VirOrder;
using retention_test::expect_shape_error;
using retention_test::random_matrix;
using retention_test::relative_error;
using retention_test::spec_tolerance;
namespace ref = vir_reference;

template <class T>
class Vir : public ::testing::Test {};
TYPED_TEST_SUITE(Vir, retention_test::ScalarTypes, );  // empty name generator: clang -Wpedantic

ref::Config small_ref(Index dim = 16, Index heads = 2, Index depth = 2, Index grid = 4) {
  ref::Config c;
  c.dim = dim;
  c.heads = heads;
  c.depth = depth;
  c.hidden = 4 * dim;
  c.patch = 4;
  c.channels = 3;
  c.grid = grid;
  c.eps = 1e-6;
  return c;
}

retention::VirConfig to_config(const ref::Config& r) {
  retention::VirConfig c;
  c.image_size = r.grid * r.patch;
  c.patch_size = r.patch;
  c.in_channels = r.channels;
  c.embed_dim = r.dim;
  c.heads = r.heads;
  c.depth = r.depth;
  c.mlp_ratio = static_cast<double>(r.hidden) / static_cast<double>(r.dim);
  c.layer_norm_eps = r.eps;
  c.gammas = r.gammas;
  return c;
}

/// Fresh random parameters, exactly representable in T (so the float model and the double
/// reference use the same values). LayerNorm weights and layer scales stay positive and O(1).
template <class T>
ref::Params random_params(const ref::Config& c, std::uint64_t seed) {
  ref::Params P;
  std::uint64_t s = seed * 1000;
  for (const auto& [name, shape] : ref::parameter_shapes(c)) {
    Index n = 1;
    for (Index d : shape) n *= d;
    const bool weight = name.find(".weight") != std::string::npos && shape.size() >= 2;
    const bool norm_w =
        name.find("norm") != std::string::npos && name.find(".weight") != std::string::npos;
    const bool scale = name.find(".gamma") != std::string::npos;
    const Index fan_in = weight ? n / shape[0] : 1;
    const double amp = weight ? 1.5 / std::sqrt(static_cast<double>(fan_in)) : 0.3;
    const Matrix<T> r = random_matrix<T>(1, n, ++s, amp);
    std::vector<double> v(static_cast<std::size_t>(n));
    for (Index i = 0; i < n; ++i) {
      double x = static_cast<double>(r(0, i));
      if (norm_w || scale) x = static_cast<double>(static_cast<T>(1.0 + x));
      v[static_cast<std::size_t>(i)] = x;
    }
    P[name] = ref::Param{shape, v};
  }
  return P;
}

template <class T>
void load_all(retention::VirEncoder<T>& enc, const ref::Params& P) {
  for (const auto& [name, p] : P) enc.load(name, p.values.data(), p.shape);
}

template <class T>
Matrix<T> as_matrix(const ref::Param& p, Index rows, Index cols) {
  return Eigen::Map<const Matrix<double>>(p.values.data(), rows, cols).cast<T>();
}
template <class T>
retention::RowVector<T> as_row(const ref::Param& p) {
  return Eigen::Map<const retention::RowVector<double>>(p.values.data(),
                                                        static_cast<Index>(p.values.size()))
      .cast<T>();
}

template <class T>
retention::VirRetentionWeights<T> mhr_weights(const ref::Params& P, const std::string& pre,
                                              Index C) {
  retention::VirRetentionWeights<T> w;
  w.qkv_weight = as_matrix<T>(P.at(pre + "retention.qkv.weight"), 3 * C, C);
  w.qkv_bias = as_row<T>(P.at(pre + "retention.qkv.bias"));
  w.proj_weight = as_matrix<T>(P.at(pre + "retention.proj.weight"), C, C);
  w.proj_bias = as_row<T>(P.at(pre + "retention.proj.bias"));
  return w;
}

template <class T>
void set_block(retention::VirBlock<T>& b, const ref::Params& P, const std::string& pre,
               const ref::Config& c) {
  b.retention().weights() = mhr_weights<T>(P, pre, c.dim);
  auto& w = b.weights();
  w.norm1_weight = as_row<T>(P.at(pre + "norm1.weight"));
  w.norm1_bias = as_row<T>(P.at(pre + "norm1.bias"));
  w.ls1 = as_row<T>(P.at(pre + "ls1.gamma"));
  w.norm2_weight = as_row<T>(P.at(pre + "norm2.weight"));
  w.norm2_bias = as_row<T>(P.at(pre + "norm2.bias"));
  w.fc1_weight = as_matrix<T>(P.at(pre + "mlp.fc1.weight"), c.hidden, c.dim);
  w.fc1_bias = as_row<T>(P.at(pre + "mlp.fc1.bias"));
  w.fc2_weight = as_matrix<T>(P.at(pre + "mlp.fc2.weight"), c.dim, c.hidden);
  w.fc2_bias = as_row<T>(P.at(pre + "mlp.fc2.bias"));
  w.ls2 = as_row<T>(P.at(pre + "ls2.gamma"));
}

/// Pixels in [0, 1), exactly representable in T; returned in double for the reference.
template <class T>
std::vector<double> random_image(Index H, Index W, Index ch, std::uint64_t seed) {
  const Matrix<T> r = random_matrix<T>(1, H * W * ch, seed, 0.5);
  std::vector<double> v(static_cast<std::size_t>(H * W * ch));
  for (Index i = 0; i < H * W * ch; ++i)
    v[static_cast<std::size_t>(i)] = static_cast<double>(r(0, i) + T(0.5));
  return v;
}

template <class T>
std::vector<T> cast_image(const std::vector<double>& v) {
  return std::vector<T>(v.begin(), v.end());
}

VirOptions opts(Form f, Index chunk = 64, VirOrder order = VirOrder::layer_major) {
  VirOptions o;
  o.form = f;
  o.chunk = chunk;
  o.order = order;
  return o;
}

/// Every way of running the encoder that the tests compare: the three forms layer-major, then
/// chunk-major with chunks dividing and not dividing the token count (and one over it).
std::vector<std::pair<std::string, VirOptions>> all_runs(Index tokens) {
  std::vector<std::pair<std::string, VirOptions>> r = {
      {"parallel", opts(Form::parallel)},
      {"recurrent", opts(Form::recurrent)},
      {"chunkwise c=1", opts(Form::chunkwise, 1)},
      {"chunkwise c=5", opts(Form::chunkwise, 5)},
      {"chunkwise c>T", opts(Form::chunkwise, tokens + 3)},
      {"chunk-major c=1", opts(Form::chunkwise, 1, VirOrder::chunk_major)},
      {"chunk-major c=5", opts(Form::chunkwise, 5, VirOrder::chunk_major)},
      {"chunk-major c=T", opts(Form::chunkwise, tokens, VirOrder::chunk_major)},
      {"chunk-major c>T", opts(Form::chunkwise, tokens + 7, VirOrder::chunk_major)},
      {"chunk-major parallel c=4", opts(Form::parallel, 4, VirOrder::chunk_major)},
      {"chunk-major recurrent c=6", opts(Form::recurrent, 6, VirOrder::chunk_major)}};
  // A chunk that divides the token count (tokens = N + 1 > 1 always has itself; add a proper
  // divisor).
  for (Index d = 2; d < tokens; ++d)
    if (tokens % d == 0) {
      r.push_back({"chunk-major c=" + std::to_string(d) + " (divides)",
                   opts(Form::chunkwise, d, VirOrder::chunk_major)});
      r.push_back({"chunkwise c=" + std::to_string(d) + " (divides)", opts(Form::chunkwise, d)});
      break;
    }
  return r;
}

// ------------------------------------------------------------------------------------------------
// MHR
// ------------------------------------------------------------------------------------------------

TYPED_TEST(Vir, MhrMatchesReference) {
  using T = TypeParam;
  struct Case {
    Index dim, heads, T_len;
  };
  for (const Case cs :
       {Case{16, 2, 37}, Case{16, 2, 1}, Case{6, 6, 9}, Case{8, 1, 12}, Case{3, 1, 5}}) {
    const ref::Config rc = small_ref(cs.dim, cs.heads, 1);
    const ref::Params P = random_params<T>(rc, 11 + static_cast<std::uint64_t>(cs.dim + cs.heads));
    const retention::VirRetention<T> mhr(cs.dim, cs.heads, mhr_weights<T>(P, "blocks.0.", cs.dim));
    const Matrix<T> x =
        random_matrix<T>(cs.T_len, cs.dim, 7 + static_cast<std::uint64_t>(cs.T_len));
    const Matrix<double> expected = ref::mhr(x.template cast<double>(), P, "blocks.0.", rc);
    for (const VirOptions& o :
         {opts(Form::parallel), opts(Form::recurrent), opts(Form::chunkwise, 4),
          opts(Form::chunkwise, 1), opts(Form::chunkwise, cs.T_len + 5)}) {
      const Matrix<T> y = mhr.forward(x, o);
      EXPECT_LE(relative_error(y, expected), spec_tolerance<T>())
          << "dim " << cs.dim << " heads " << cs.heads << " T " << cs.T_len << " "
          << retention::to_string(o.form) << " chunk " << o.chunk;
    }
  }
}

TYPED_TEST(Vir, MhrGammaOneAndGivenGammas) {
  using T = TypeParam;
  ref::Config rc = small_ref(4, 2, 1);
  rc.gammas = {1.0, 0.5};
  const ref::Params P = random_params<T>(rc, 5);
  const retention::VirRetention<T> mhr(4, 2, mhr_weights<T>(P, "blocks.0.", 4), rc.gammas);
  EXPECT_EQ(mhr.gammas(), rc.gammas);
  const Matrix<T> x = random_matrix<T>(21, 4, 3);
  const Matrix<double> expected = ref::mhr(x.template cast<double>(), P, "blocks.0.", rc);
  for (Form f : {Form::parallel, Form::recurrent, Form::chunkwise})
    EXPECT_LE(relative_error(mhr.forward(x, opts(f, 6)), expected), spec_tolerance<T>())
        << retention::to_string(f);
  // Default gammas are linspace_gammas(heads).
  EXPECT_EQ(retention::VirRetention<T>(4, 2).gammas(), retention::linspace_gammas(2));
}

TYPED_TEST(Vir, MhrStateHandOffAndStep) {
  using T = TypeParam;
  const ref::Config rc = small_ref(12, 3, 1);
  const ref::Params P = random_params<T>(rc, 21);
  const retention::VirRetention<T> mhr(12, 3, mhr_weights<T>(P, "blocks.0.", 12));
  const Index T_len = 23, split = 9;
  const Matrix<T> x = random_matrix<T>(T_len, 12, 77);
  const Matrix<double> expected = ref::mhr(x.template cast<double>(), P, "blocks.0.", rc);
  for (Form first : {Form::parallel, Form::recurrent, Form::chunkwise})
    for (Form second : {Form::parallel, Form::recurrent, Form::chunkwise}) {
      std::vector<RetentionState<T>> states;
      Matrix<T> y(T_len, 12);
      y.topRows(split) = mhr.forward(x.topRows(split), opts(first, 4), &states);
      ASSERT_EQ(states.size(), 3u);
      EXPECT_EQ(states[0].position, split);
      y.bottomRows(T_len - split) =
          mhr.forward(x.bottomRows(T_len - split), opts(second, 5), &states);
      EXPECT_EQ(states[2].position, T_len);
      EXPECT_LE(relative_error(y, expected), spec_tolerance<T>())
          << retention::to_string(first) << " then " << retention::to_string(second);
    }
  std::vector<RetentionState<T>> states = mhr.zero_states();
  Matrix<T> y(T_len, 12);
  for (Index t = 0; t < T_len; ++t) y.row(t) = mhr.step(x.row(t), states);
  EXPECT_LE(relative_error(y, expected), spec_tolerance<T>());
}

// ------------------------------------------------------------------------------------------------
// Block
// ------------------------------------------------------------------------------------------------

TYPED_TEST(Vir, BlockMatchesReference) {
  using T = TypeParam;
  for (const Index T_len : {Index(1), Index(13)}) {
    ref::Config rc = small_ref(16, 2, 1);
    rc.eps = 1e-5;  // eps is carried from the config, not hard-wired
    const ref::Params P = random_params<T>(rc, 31);
    retention::VirConfig cfg = to_config(rc);
    retention::VirBlock<T> block(cfg);
    set_block(block, P, "blocks.0.", rc);
    const Matrix<T> x = random_matrix<T>(T_len, 16, 41, 2.0);
    const Matrix<double> expected = ref::block(x.template cast<double>(), P, "blocks.0.", rc);
    for (const VirOptions& o :
         {opts(Form::parallel), opts(Form::recurrent), opts(Form::chunkwise, 3)})
      EXPECT_LE(relative_error(block.forward(x, o), expected), spec_tolerance<T>())
          << "T " << T_len << " " << retention::to_string(o.form);
  }
}

// ------------------------------------------------------------------------------------------------
// Encoder
// ------------------------------------------------------------------------------------------------

TYPED_TEST(Vir, EncoderMatchesReferenceInEveryForm) {
  using T = TypeParam;
  const ref::Config rc =
      small_ref(16, 2, 2, 4);  // 16 x 16 image, patch 4: 16 patches + class token
  const ref::Params P = random_params<T>(rc, 51);
  retention::VirEncoder<T> enc(to_config(rc), 99);
  load_all(enc, P);
  // The training grid, then other grids (the position embedding is resampled) incl. non-square.
  struct Size {
    Index H, W;
  };
  for (const Size sz : {Size{16, 16}, Size{12, 20}, Size{4, 4}, Size{24, 8}}) {
    const std::vector<double> img =
        random_image<T>(sz.H, sz.W, 3, 61 + static_cast<std::uint64_t>(sz.H));
    const std::vector<T> img_t = cast_image<T>(img);
    const retention::ImageView<T> view{img_t.data(), sz.H, sz.W, 3};
    const Matrix<double> expected = ref::encoder(img, sz.H, sz.W, P, rc);
    const Index tokens = expected.rows();
    for (const auto& [name, o] : all_runs(tokens)) {
      const Matrix<T> y = enc.forward_tokens(view, o);
      EXPECT_LE(relative_error(y, expected), spec_tolerance<T>())
          << name << " image " << sz.H << "x" << sz.W;
      const retention::RowVector<T> f = enc.forward(view, o);
      EXPECT_LE(relative_error(f, expected.bottomRows(1)), spec_tolerance<T>()) << name;
    }
    // Input tokens alone (patch embedding with the torch [C, 3, p, p] flattening, position, class
    // last).
    EXPECT_LE(relative_error(enc.tokens(view, 0, tokens), ref::tokens(img, sz.H, sz.W, P, rc)),
              spec_tolerance<T>());
  }
}

TYPED_TEST(Vir, EncoderFormsAgree) {
  using T = TypeParam;
  // 24 x 32 image, patch 4: 48 patches + class = 49 tokens (7 divides it; 5 does not).
  const ref::Config rc = small_ref(24, 3, 2, 6);
  const ref::Params P = random_params<T>(rc, 71);
  retention::VirEncoder<T> enc(to_config(rc));
  load_all(enc, P);
  const std::vector<T> img = cast_image<T>(random_image<T>(24, 32, 3, 81));
  const retention::ImageView<T> view{img.data(), 24, 32, 3};
  const Matrix<T> base = enc.forward_tokens(view, opts(Form::parallel));
  ASSERT_EQ(base.rows(), 49);
  for (const auto& [name, o] : all_runs(49)) {
    const Matrix<T> y = enc.forward_tokens(view, o);
    EXPECT_LE(relative_error(y, base), spec_tolerance<T>()) << name;
  }
  for (Index c : {Index(7), Index(16), Index(64)}) {
    const Matrix<T> y = enc.forward_tokens(view, opts(Form::chunkwise, c, VirOrder::chunk_major));
    EXPECT_LE(relative_error(y, base), spec_tolerance<T>()) << "chunk-major " << c;
  }
}

TEST(VirCausality, ClassTokenAndSinglePatches) {
  const ref::Config rc = small_ref(16, 2, 2, 4);
  const ref::Params P = random_params<double>(rc, 91);
  retention::VirEncoder<double> enc(to_config(rc));
  load_all(enc, P);
  std::vector<double> img = random_image<double>(16, 16, 3, 92);
  const Index N = 16;
  for (const auto& [name, o] : all_runs(N + 1)) {
    retention::VirEncoder<double> other = enc;
    std::vector<double> cls(16);
    for (std::size_t i = 0; i < cls.size(); ++i) cls[i] = 0.7 - 0.1 * static_cast<double>(i);
    other.load("cls_token", cls.data(), {1, 1, 16});
    const retention::ImageView<double> view{img.data(), 16, 16, 3};
    const Matrix<double> a = enc.forward_tokens(view, o);
    const Matrix<double> b = other.forward_tokens(view, o);
    // Patches never see the class token (it comes last): bit-identical patch outputs.
    EXPECT_TRUE((a.topRows(N).array() == b.topRows(N).array()).all()) << name;
    EXPECT_GT(relative_error(b.bottomRows(1), a.bottomRows(1)), 1e-3) << name;
  }
  // Every single patch reaches the class feature; patches before it are untouched.
  const retention::ImageView<double> view{img.data(), 16, 16, 3};
  const Matrix<double> base =
      enc.forward_tokens(view, opts(Form::chunkwise, 5, VirOrder::chunk_major));
  for (Index n = 0; n < N; ++n) {
    std::vector<double> changed = img;
    const Index gy = n / 4, gx = n % 4;
    changed[static_cast<std::size_t>(((gy * 4 + 2) * 16 + gx * 4 + 1) * 3 + 1)] +=
        0.25;  // one pixel of patch n
    const retention::ImageView<double> cview{changed.data(), 16, 16, 3};
    const Matrix<double> y =
        enc.forward_tokens(cview, opts(Form::chunkwise, 5, VirOrder::chunk_major));
    EXPECT_GT(relative_error(y.bottomRows(1), base.bottomRows(1)), 1e-9) << "patch " << n;
    if (n > 0) {
      EXPECT_TRUE((y.topRows(n).array() == base.topRows(n).array()).all()) << "patch " << n;
    }
    EXPECT_GT(relative_error(y.row(n), base.row(n)), 1e-9) << "patch " << n;
  }
}

TEST(VirEncoder, LoadParametersRoundTripAndDeterministicInit) {
  const ref::Config rc = small_ref(8, 2, 3, 2);
  const retention::VirConfig cfg = to_config(rc);
  const retention::VirEncoder<double> a(cfg, 5), same(cfg, 5);
  retention::VirEncoder<double> b(cfg, 6);
  const std::vector<double> img = random_image<double>(8, 8, 3, 7);
  const retention::ImageView<double> view{img.data(), 8, 8, 3};
  EXPECT_TRUE((a.forward(view).array() == same.forward(view).array()).all());
  EXPECT_GT(relative_error(b.forward(view), a.forward(view)), 1e-3);
  // Names and shapes are exactly the torch ones the reference lists, in order.
  const auto params = a.parameters();
  const auto shapes = ref::parameter_shapes(rc);
  ASSERT_EQ(params.size(), shapes.size());
  for (std::size_t i = 0; i < params.size(); ++i) {
    EXPECT_EQ(params[i].name, shapes[i].first);
    EXPECT_EQ(params[i].shape, shapes[i].second) << params[i].name;
  }
  // Copy every parameter of a into b through float arrays (a float checkpoint into a double model).
  for (const auto& p : params) {
    std::vector<float> buf(p.data, p.data + p.size());
    b.load(p.name, buf.data(), p.shape);
  }
  EXPECT_LE(relative_error(b.forward(view), a.forward(view)), 1e-6);
  EXPECT_EQ(b.parameter_count(), a.parameter_count());
}

TEST(VirEncoder, Configs) {
  const retention::VirConfig s = retention::vir_s16(), b = retention::vir_b16(),
                             l = retention::vir_l16(384);
  EXPECT_EQ(s.embed_dim, 384);
  EXPECT_EQ(s.heads, 6);
  EXPECT_EQ(s.depth, 12);
  EXPECT_EQ(s.mlp_hidden(), 1536);
  EXPECT_EQ(s.patch_size, 16);
  EXPECT_EQ(s.layer_norm_eps, 1e-6);
  EXPECT_EQ(b.embed_dim, 768);
  EXPECT_EQ(b.heads, 12);
  EXPECT_EQ(b.depth, 12);
  EXPECT_EQ(l.embed_dim, 1024);
  EXPECT_EQ(l.heads, 16);
  EXPECT_EQ(l.depth, 24);
  EXPECT_EQ(l.image_size, 384);
  // ViR-S/16 at 224: the usual ~22M parameters, counted from the shapes.
  const Index C = 384, Hd = 1536;
  const Index per_block =
      4 * C + (3 * C * C + 3 * C) + (C * C + C) + 2 * C + (Hd * C + Hd) + (C * Hd + C);
  const Index expected = C * 3 * 16 * 16 + C + 196 * C + C + 12 * per_block + 2 * C;
  EXPECT_EQ(retention::VirEncoder<float>(s).parameter_count(), expected);
}

// ------------------------------------------------------------------------------------------------
// Errors
// ------------------------------------------------------------------------------------------------

TEST(VirErrors, ImageAndConfig) {
  const ref::Config rc = small_ref(16, 2, 1, 4);
  const retention::VirEncoder<float> enc(to_config(rc));
  const std::vector<float> img(20 * 20 * 4, 0.5f);
  expect_shape_error(
      [&] {
        enc.forward(retention::ImageView<float>{img.data(), 18, 16, 3});
      },
      "VirEncoder::forward: image is [18 x 16 x 3], expected height and width positive multiples "
      "of patch_size 4");
  expect_shape_error(
      [&] {
        enc.forward_tokens(retention::ImageView<float>{img.data(), 16, 2, 3});
      },
      "VirEncoder::forward_tokens: image is [16 x 2 x 3], expected height and width positive "
      "multiples");
  expect_shape_error(
      [&] {
        enc.forward(retention::ImageView<float>{img.data(), 16, 16, 4});
      },
      "VirEncoder::forward: image is [16 x 16 x 4], expected [H x W x 3]");
  expect_shape_error(
      [&] {
        enc.forward(retention::ImageView<float>{nullptr, 16, 16, 3});
      },
      "null pointer");
  expect_shape_error(
      [&] {
        enc.tokens(retention::ImageView<float>{img.data(), 16, 16, 3}, 10, 8);
      },
      "VirEncoder::tokens: rows [10, 18) outside the 17 tokens");

  retention::VirConfig bad = to_config(rc);
  bad.image_size = 18;
  expect_shape_error([&] { retention::VirEncoder<float> e(bad); },
                     "VirEncoder: config.image_size 18 is not a multiple of config.patch_size 4");
  bad = to_config(rc);
  bad.heads = 3;
  expect_shape_error([&] { retention::VirEncoder<float> e(bad); },
                     "VirEncoder: config.embed_dim 16 is not a multiple of config.heads 3");
  bad = to_config(rc);
  bad.gammas = {0.9};
  expect_shape_error([&] { retention::VirEncoder<float> e(bad); },
                     "gammas has 1 entries, expected heads = 2");
  bad.gammas = {0.9, 1.5};
  expect_shape_error([&] { retention::VirEncoder<float> e(bad); }, "gamma must be in (0, 1]");
}

TEST(VirErrors, WeightShapes) {
  const ref::Config rc = small_ref(16, 2, 2, 4);
  retention::VirEncoder<double> enc(to_config(rc));
  const std::vector<double> buf(48 * 17, 0.1);
  expect_shape_error(
      [&] {
        enc.load("blocks.1.retention.qkv.weight", buf.data(), {48, 17});
      },
      "VirEncoder::load: blocks.1.retention.qkv.weight is [48 x 17], expected [48 x 16]");
  expect_shape_error(
      [&] {
        enc.load("patch_embed.proj.weight", buf.data(), {16, 4, 4, 3});
      },
      "patch_embed.proj.weight is [16 x 4 x 4 x 3], expected [16 x 3 x 4 x 4]");
  expect_shape_error(
      [&] {
        enc.load("pos_embed", buf.data(), {16, 16});
      },
      "pos_embed is [16 x 16], expected [1 x 16 x 16]");
  expect_shape_error([&] { enc.load("blocks.2.norm1.weight", buf.data(), {16}); },
                     "VirEncoder::load: unknown parameter \"blocks.2.norm1.weight\"");
  expect_shape_error([&] { enc.load<double>("norm.bias", nullptr, {16}); }, "null data pointer");

  retention::VirRetentionWeights<double> w;
  w.qkv_weight = Matrix<double>::Zero(48, 15);
  w.qkv_bias = retention::RowVector<double>::Zero(48);
  w.proj_weight = Matrix<double>::Zero(16, 16);
  w.proj_bias = retention::RowVector<double>::Zero(16);
  expect_shape_error([&] { retention::VirRetention<double> m(16, 2, w); },
                     "VirRetention: qkv_weight is [48 x 15], expected [48 x 16]");
  w.qkv_weight = Matrix<double>::Zero(48, 16);
  w.proj_bias = retention::RowVector<double>::Zero(15);
  expect_shape_error([&] { retention::VirRetention<double> m(16, 2, w); },
                     "VirRetention: proj_bias is [1 x 15], expected [1 x 16]");
  expect_shape_error([&] { retention::VirRetention<double> m(16, 3); },
                     "VirRetention: dim 16 is not a multiple of heads 3");

  // Weights edited in place to a wrong shape are caught on the next forward.
  enc.blocks()[1].weights().fc1_weight = Matrix<double>::Zero(63, 16);
  const std::vector<double> img(16 * 16 * 3, 0.5);
  expect_shape_error(
      [&] {
        enc.forward(retention::ImageView<double>{img.data(), 16, 16, 3});
      },
      "VirBlock::forward: fc1_weight is [63 x 16], expected [64 x 16]");
  enc.blocks()[1].weights().fc1_weight = Matrix<double>::Zero(64, 16);
  enc.blocks()[0].retention().weights().proj_weight = Matrix<double>::Zero(16, 8);
  expect_shape_error(
      [&] {
        enc.forward(retention::ImageView<double>{img.data(), 16, 16, 3});
      },
      "VirRetention::forward: proj_weight is [16 x 8], expected [16 x 16]");
}

TEST(VirErrors, ChunkStatesAndInput) {
  const ref::Config rc = small_ref(16, 2, 1, 4);
  const retention::VirEncoder<float> enc(to_config(rc));
  const std::vector<float> img(16 * 16 * 3, 0.5f);
  const retention::ImageView<float> view{img.data(), 16, 16, 3};
  expect_shape_error([&] { enc.forward(view, opts(Form::chunkwise, 0)); },
                     "VirEncoder::forward: options.chunk must be >= 1, got 0");
  expect_shape_error([&] { enc.forward(view, opts(Form::parallel, 0, VirOrder::chunk_major)); },
                     "VirEncoder::forward: options.chunk must be >= 1, got 0");
  expect_shape_error(
      [&] { enc.forward_tokens(view, opts(Form::recurrent, -3, VirOrder::chunk_major)); },
      "options.chunk must be >= 1, got -3");
  EXPECT_NO_THROW(enc.forward(view, opts(Form::parallel, 0)));  // chunk unused layer-major parallel

  const retention::VirRetention<float> mhr(16, 2);
  const Matrix<float> x = random_matrix<float>(3, 16, 1);
  expect_shape_error([&] { mhr.forward(x, opts(Form::chunkwise, 0)); },
                     "VirRetention::forward: options.chunk must be >= 1, got 0");
  expect_shape_error([&] { mhr.forward(random_matrix<float>(3, 5, 2)); },
                     "VirRetention::forward: x is [3 x 5], expected [* x 16]");
  std::vector<RetentionState<float>> states(3, RetentionState<float>(8, 8));
  expect_shape_error([&] { mhr.forward(x, VirOptions(), &states); },
                     "VirRetention::forward: states has 3 entries, expected heads = 2");
  states.assign(2, RetentionState<float>(8, 7));
  expect_shape_error([&] { mhr.forward(x, VirOptions(), &states); },
                     "VirRetention::forward: states[h].S is [8 x 7], expected [8 x 8]");
  const retention::VirBlock<float> block(to_config(rc));
  expect_shape_error([&] { block.forward(random_matrix<float>(2, 15, 3)); },
                     "VirBlock::forward: x is [2 x 15], expected [* x 16]");
}

}  // namespace
