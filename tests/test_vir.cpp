// retention-test-links: compiled
// ViR (docs/math.md §5): MHR, block and encoder against the naive double reference; all encoder
// forms and orders against each other; causality of the class token; loading by the ViR authors'
// parameter names (with prefixes) through ParameterMap; every error path, hostile sizes and enum
// values (issue 15), states unchanged by failed calls (also under injected allocation failures);
// the threaded multi-head path equal to one thread.
#include <retention/layers/vir.hpp>

#include "reference/vir_reference.hpp"
#include "support/test_support.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <new>
#include <string>
#include <vector>

namespace {

/// Allocation failure injection: when set to n > 0, the n-th operator new from then on throws
/// std::bad_alloc (Eigen's own buffers use malloc and are not counted).
std::atomic<long> g_new_countdown{0};

void* counted_new(std::size_t n) {
  if (g_new_countdown.load() > 0 && g_new_countdown.fetch_sub(1) == 1) throw std::bad_alloc();
  void* p = std::malloc(n ? n : 1);
  if (!p) throw std::bad_alloc();
  return p;
}

}  // namespace

void* operator new(std::size_t n) { return counted_new(n); }
void* operator new[](std::size_t n) { return counted_new(n); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }

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

/// A ParameterMap over the reference's double arrays (the model converts them to T on load),
/// every name prefixed with `prefix`.
retention::ParameterMap map_of(const ref::Params& P, const std::string& prefix = "") {
  retention::ParameterMap m;
  for (const auto& [name, p] : P) m.add(prefix + name, p.values.data(), p.shape);
  return m;
}

template <class T>
void load_all(retention::VirEncoder<T>& enc, const ref::Params& P) {
  enc.load(map_of(P));
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
retention::VirRetention<T> make_mhr(const ref::Params& P, const std::string& pre, Index C,
                                    Index heads, const std::vector<double>& gammas = {}) {
  retention::VirRetention<T> m(C, heads, gammas);
  m.load(map_of(P), pre + "retention.");
  return m;
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
    const retention::VirRetention<T> mhr = make_mhr<T>(P, "blocks.0.", cs.dim, cs.heads);
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
  const retention::VirRetention<T> mhr = make_mhr<T>(P, "blocks.0.", 4, 2, rc.gammas);
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
  const retention::VirRetention<T> mhr = make_mhr<T>(P, "blocks.0.", 12, 3);
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
    block.load(map_of(P), "blocks.0.");
    const Matrix<T> x = random_matrix<T>(T_len, 16, 41, 2.0);
    const Matrix<double> expected = ref::block(x.template cast<double>(), P, "blocks.0.", rc);
    for (const VirOptions& o :
         {opts(Form::parallel), opts(Form::recurrent), opts(Form::chunkwise, 3)})
      EXPECT_LE(relative_error(block.forward(x, o), expected), spec_tolerance<T>())
          << "T " << T_len << " " << retention::to_string(o.form);
  }
}

// A block on few rows with a team of two splits its projections and its MLP over outputs
// (detail::split_columns) instead of rows: the same function, checked against the reference, and
// equal to one thread's result. 40 rows of 128 wide are enough work for a team (the thread rule)
// and few enough rows for the split over outputs.
TYPED_TEST(Vir, BlockOnFewRowsSplitOverOutputsMatchesReference) {
  using T = TypeParam;
  const Index C = 128, H = 4, rows = 40;
  ASSERT_TRUE(retention::detail::split_columns(rows, 4 * C, 2));
  ref::Config rc = small_ref(C, H, 1);
  const ref::Params P = random_params<T>(rc, 171);
  const Matrix<T> x = random_matrix<T>(rows, C, 172, 2.0);
  const Matrix<double> expected = ref::block(x.template cast<double>(), P, "blocks.0.", rc);
  // Also with packed weights (VirConfig::packed_weights), whose column splits fall on its panels.
  for (const bool packed : {false, true}) {
    retention::VirConfig config = to_config(rc);
    config.packed_weights = packed;
    retention::VirBlock<T> block(config);
    block.load(map_of(P), "blocks.0.");
    EXPECT_EQ(block.fc1().packed(), packed);
    for (Form f : {Form::parallel, Form::chunkwise}) {
      VirOptions o = opts(f, 16);
      o.threads = 1;
      const Matrix<T> one = block.forward(x, o);
      o.threads = 2;
      const Matrix<T> two = block.forward(x, o);
      EXPECT_LE(relative_error(two, expected), spec_tolerance<T>())
          << retention::to_string(f) << (packed ? ", packed" : "");
      EXPECT_LE(relative_error(two, one), 100 * std::numeric_limits<T>::epsilon())
          << retention::to_string(f) << (packed ? ", packed" : "");
    }
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
  for (const bool packed : {false, true}) {
    retention::VirConfig config = to_config(rc);
    config.packed_weights = packed;  // every Linear packed (Linear::set_packed)
    retention::VirEncoder<T> enc(config, 99);
    load_all(enc, P);
    ASSERT_EQ(enc.patch_embed().packed(), packed);
    ASSERT_EQ(enc.blocks().back().retention().qkv().packed(), packed);
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
            << name << " image " << sz.H << "x" << sz.W << (packed ? ", packed" : "");
        const retention::RowVector<T> f = enc.forward(view, o);
        EXPECT_LE(relative_error(f, expected.bottomRows(1)), spec_tolerance<T>()) << name;
      }
      // Input tokens alone (patch embedding with the torch [C, 3, p, p] flattening, position, class
      // last).
      EXPECT_LE(relative_error(enc.tokens(view, 0, tokens), ref::tokens(img, sz.H, sz.W, P, rc)),
                spec_tolerance<T>());
    }
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
    retention::ParameterMap changed = map_of(P);  // every other parameter as in enc
    changed.add("cls_token", cls.data(), {1, 1, 16});
    other.load(changed);
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
  // Names and shapes are exactly the torch ones of the ViR authors' code that the reference lists.
  const retention::ParameterMap params = a.parameters();
  const auto shapes = ref::parameter_shapes(rc);
  ASSERT_EQ(params.size(), shapes.size());
  for (const auto& [name, shape] : shapes) {
    const retention::TensorRef* t = params.find(name);
    ASSERT_NE(t, nullptr) << name;
    EXPECT_EQ(t->shape, shape) << name;
    EXPECT_EQ(t->dtype, retention::DType::float64) << name;
  }
  // Copy every parameter of a into b through float arrays (a float checkpoint into a double model).
  std::vector<std::vector<float>> store;
  store.reserve(params.size());
  retention::ParameterMap floats;
  for (const std::string& name : params.names()) {
    const retention::TensorRef& t = *params.find(name);
    store.emplace_back(static_cast<std::size_t>(t.numel()));
    retention::read_tensor("test", name, t, t.shape, store.back().data());
    floats.add(name, store.back().data(), t.shape);
  }
  b.load(floats);
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

TEST(VirErrors, LoadMissingAndWrongShapes) {
  const ref::Config rc = small_ref(16, 2, 2, 4);
  const ref::Params P = random_params<double>(rc, 101);
  retention::VirEncoder<double> enc(to_config(rc), 3);
  const std::vector<double> img = random_image<double>(16, 16, 3, 102);
  const retention::ImageView<double> view{img.data(), 16, 16, 3};
  const Matrix<double> before = enc.forward_tokens(view);
  const std::vector<double> buf(48 * 17, 0.1);
  auto with = [&](const std::string& name, std::vector<Index> shape) {
    retention::ParameterMap m = map_of(P);
    m.add(name, buf.data(), std::move(shape));
    return m;
  };
  expect_shape_error(
      [&] {
        enc.load(with("blocks.1.retention.qkv.weight", {48, 17}));
      },
      "VirEncoder::load: parameter 'blocks.1.retention.qkv.weight' has shape [48, 17], expected "
      "[48, 16]");
  expect_shape_error(
      [&] {
        enc.load(with("patch_embed.proj.weight", {16, 4, 4, 3}));
      },
      "parameter 'patch_embed.proj.weight' has shape [16, 4, 4, 3], expected [16, "
      "3, 4, 4]");
  expect_shape_error(
      [&] {
        enc.load(with("pos_embed", {16, 16}));
      },
      "parameter 'pos_embed' has shape [16, 16], expected [1, 16, 16]");
  expect_shape_error([&] { enc.load(with("cls_token", {16})); },
                     "parameter 'cls_token' has shape [16], expected [1, 1, 16]");
  expect_shape_error(
      [&] {
        enc.load(with("blocks.0.mlp.fc1.weight", {63, 16}));
      },
      "VirEncoder::load: parameter 'blocks.0.mlp.fc1.weight' has shape [63, 16], "
      "expected [64, 16]");
  expect_shape_error(
      [&] {
        enc.load(with("blocks.1.ls2.gamma", {1, 16}));
      },
      "parameter 'blocks.1.ls2.gamma' has shape [1, 16], expected [16]");
  // A missing parameter, and the old name `proj` (the authors' code says out_proj).
  for (const std::string missing :
       {"blocks.1.mlp.fc2.bias", "norm.weight", "blocks.0.retention.out_proj.weight"}) {
    ref::Params Q = P;
    Q.erase(missing);
    if (missing == "blocks.0.retention.out_proj.weight")
      Q["blocks.0.retention.proj.weight"] = P.at(missing);
    expect_shape_error([&] { enc.load(map_of(Q)); },
                       "VirEncoder::load: missing parameter '" + missing + "'");
  }
  // Nothing changed by the failed loads (all names and shapes are checked before any copy).
  EXPECT_TRUE((enc.forward_tokens(view).array() == before.array()).all());
  // Prefixes reach every name.
  expect_shape_error([&] { enc.load(map_of(P), "model."); },
                     "VirEncoder::load: missing parameter 'model.");
  retention::VirRetention<double> mhr(16, 2);
  expect_shape_error([&] { mhr.load(map_of(P), "blocks.0."); },
                     "VirRetention::load: missing parameter 'blocks.0.");
  retention::VirBlock<double> block(to_config(rc));
  expect_shape_error([&] { block.load(map_of(P), "blocks.2."); },
                     "VirBlock::load: missing parameter 'blocks.2.");
  ref::Params Q = P;
  Q["blocks.1.norm2.bias"].shape = {4, 4};
  expect_shape_error([&] { block.load(map_of(Q), "blocks.1."); },
                     "VirBlock::load: parameter 'blocks.1.norm2.bias' has shape [4, 4], expected "
                     "[16]");

  expect_shape_error([&] { retention::VirRetention<double> m(16, 3); },
                     "VirRetention: dim 16 is not a multiple of heads 3");
}

TYPED_TEST(Vir, LoadByNamesWithPrefixes) {
  using T = TypeParam;
  // A depth-4 checkpoint: block 3 and its retention load from "blocks.3." alone, and the whole
  // encoder from the same names under a prefix ("model."), as in a wrapper module's state_dict.
  const ref::Config rc = small_ref(16, 2, 4, 4);
  const ref::Params P = random_params<T>(rc, 111);
  const retention::ParameterMap map = map_of(P), prefixed = map_of(P, "model.");
  retention::VirBlock<T> block(to_config(rc));
  block.load(map, "blocks.3.");
  const Matrix<T> x = random_matrix<T>(11, 16, 112, 2.0);
  EXPECT_LE(
      relative_error(block.forward(x), ref::block(x.template cast<double>(), P, "blocks.3.", rc)),
      spec_tolerance<T>());
  retention::VirRetention<T> mhr(16, 2);
  mhr.load(prefixed, "model.blocks.3.retention.");
  EXPECT_LE(relative_error(mhr.forward(x), ref::mhr(x.template cast<double>(), P, "blocks.3.", rc)),
            spec_tolerance<T>());
  // The loaded values are the checkpoint's, in torch layout.
  EXPECT_EQ(mhr.out_proj().weight(),
            as_matrix<T>(P.at("blocks.3.retention.out_proj.weight"), 16, 16));
  EXPECT_EQ(block.fc1().weight(), as_matrix<T>(P.at("blocks.3.mlp.fc1.weight"), 64, 16));
  EXPECT_EQ(block.ls2(), as_row<T>(P.at("blocks.3.ls2.gamma")));

  retention::VirEncoder<T> enc(to_config(rc));
  enc.load(prefixed, "model.");
  const std::vector<double> img = random_image<T>(16, 12, 3, 113);
  const std::vector<T> img_t = cast_image<T>(img);
  const retention::ImageView<T> view{img_t.data(), 16, 12, 3};
  EXPECT_LE(relative_error(enc.forward_tokens(view), ref::encoder(img, 16, 12, P, rc)),
            spec_tolerance<T>());
  // Exported parameters carry the prefix too.
  const retention::ParameterMap out = enc.parameters("model.");
  EXPECT_EQ(out.size(), prefixed.size());
  for (const std::string& name : prefixed.names()) EXPECT_TRUE(out.contains(name)) << name;
}

TEST(VirErrors, ChunkStatesAndInput) {
  const ref::Config rc = small_ref(16, 2, 1, 4);
  const retention::VirEncoder<float> enc(to_config(rc));
  const std::vector<float> img(16 * 16 * 3, 0.5f);
  const retention::ImageView<float> view{img.data(), 16, 16, 3};
  // chunk 0 is "automatic" (recommended_chunk) in every form and order; negative is an error.
  expect_shape_error([&] { enc.forward(view, opts(Form::chunkwise, -1)); },
                     "VirEncoder::forward: options.chunk must be >= 0 (0 = automatic), got -1");
  expect_shape_error([&] { enc.forward(view, opts(Form::parallel, -1, VirOrder::chunk_major)); },
                     "VirEncoder::forward: options.chunk must be >= 0 (0 = automatic), got -1");
  expect_shape_error(
      [&] { enc.forward_tokens(view, opts(Form::recurrent, -3, VirOrder::chunk_major)); },
      "VirEncoder::forward_tokens: options.chunk must be >= 0 (0 = automatic), got -3");
  EXPECT_NO_THROW(enc.forward(view, opts(Form::parallel, 0)));
  EXPECT_NO_THROW(enc.forward(view, opts(Form::chunkwise, 0, VirOrder::chunk_major)));

  const retention::VirRetention<float> mhr(16, 2);
  const Matrix<float> x = random_matrix<float>(3, 16, 1);
  expect_shape_error([&] { mhr.forward(x, opts(Form::chunkwise, -2)); },
                     "VirRetention::forward: options.chunk must be >= 0 (0 = automatic), got -2");
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

TYPED_TEST(Vir, AutomaticChunkIsRecommendedChunk) {
  using T = TypeParam;
  const ref::Config rc = small_ref(16, 2, 2, 8);  // 64 patches + class: several automatic chunks
  const ref::Params P = random_params<T>(rc, 121);
  retention::VirEncoder<T> enc(to_config(rc));
  load_all(enc, P);
  const Index c = retention::recommended_chunk(8, 8);
  const std::vector<T> img = cast_image<T>(random_image<T>(32, 32, 3, 122));
  const retention::ImageView<T> view{img.data(), 32, 32, 3};
  for (VirOrder order : {VirOrder::layer_major, VirOrder::chunk_major}) {
    const Matrix<T> automatic = enc.forward_tokens(view, opts(Form::chunkwise, 0, order));
    const Matrix<T> given = enc.forward_tokens(view, opts(Form::chunkwise, c, order));
    EXPECT_TRUE((automatic.array() == given.array()).all()) << retention::to_string(order);
  }
  const retention::VirRetention<T> mhr = make_mhr<T>(P, "blocks.1.", 16, 2);
  const Matrix<T> x = random_matrix<T>(70, 16, 123);
  EXPECT_TRUE((mhr.forward(x, opts(Form::chunkwise, 0)).array() ==
               mhr.forward(x, opts(Form::chunkwise, c)).array())
                  .all());
}

// ------------------------------------------------------------------------------------------------
// Hostile input (issue 15): rejected before anything is allocated or any state changes
// ------------------------------------------------------------------------------------------------

template <class T>
bool same_states(const std::vector<RetentionState<T>>& a, const std::vector<RetentionState<T>>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (a[i].position != b[i].position || !(a[i].S.array() == b[i].S.array()).all() ||
        !(a[i].z.array() == b[i].z.array()).all())
      return false;
  return true;
}

TEST(VirHostile, StepRejectsSeveralRows) {
  const ref::Config rc = small_ref(16, 2, 1);
  const ref::Params P = random_params<double>(rc, 131);
  const retention::VirRetention<double> mhr = make_mhr<double>(P, "blocks.0.", 16, 2);
  std::vector<RetentionState<double>> states;
  mhr.forward(random_matrix<double>(5, 16, 132), opts(Form::recurrent), &states);
  const auto saved = states;
  expect_shape_error([&] { mhr.step(random_matrix<double>(3, 16, 133), states); },
                     "VirRetention::step: x_t is [3 x 16], expected [1 x 16]");
  expect_shape_error([&] { mhr.step(Matrix<double>(0, 16), states); },
                     "VirRetention::step: x_t is [0 x 16], expected [1 x 16]");
  EXPECT_TRUE(same_states(states, saved));
}

TEST(VirHostile, MlpRatioAndConfigValues) {
  const ref::Config rc = small_ref(16, 2, 1, 4);
  for (double ratio :
       {std::nan(""), -1.0, 0.0, std::numeric_limits<double>::infinity(), 1e300, 0.01}) {
    retention::VirConfig c = to_config(rc);
    c.mlp_ratio = ratio;
    EXPECT_EQ(c.mlp_hidden(), 0) << ratio;  // defined for any value, no float-to-int overflow
    expect_shape_error([&] { retention::VirEncoder<float> e(c); }, "VirEncoder: ");
    expect_shape_error([&] { retention::VirBlock<float> b(c); }, "VirBlock: ");
  }
  retention::VirConfig c = to_config(rc);
  c.mlp_ratio = std::nan("");
  expect_shape_error([&] { retention::VirEncoder<float> e(c); },
                     "VirEncoder: config.mlp_ratio must be positive and finite, got nan");
  c = to_config(rc);
  c.layer_norm_eps = -1e-6;
  expect_shape_error([&] { retention::VirBlock<float> b(c); },
                     "VirBlock: config.layer_norm_eps must be >= 0 and finite");
  c = to_config(rc);
  c.layer_scale_init = std::numeric_limits<double>::infinity();
  expect_shape_error([&] { retention::VirEncoder<float> e(c); },
                     "VirEncoder: config.layer_scale_init must be finite");
}

TEST(VirHostile, SizeProductsOverflowBeforeAllocating) {
  const ref::Config rc = small_ref(16, 2, 1, 4);
  retention::VirConfig c = to_config(rc);
  c.image_size = Index(1) << 32;
  c.patch_size = 1;
  expect_shape_error([&] { retention::VirEncoder<float> e(c); },
                     "VirEncoder: grid * grid (patches) overflows");
  c.image_size = Index(1) << 31;  // 2^62 patches fit; times embed_dim does not
  expect_shape_error([&] { retention::VirEncoder<float> e(c); },
                     "VirEncoder: patches * embed_dim (pos_embed) overflows");
  c = to_config(rc);
  c.patch_size = Index(1) << 32;
  c.image_size = c.patch_size;
  expect_shape_error([&] { retention::VirEncoder<float> e(c); },
                     "VirEncoder: in_channels * patch_size");
  c = to_config(rc);
  c.embed_dim = Index(1) << 40;
  c.heads = 1;
  expect_shape_error([&] { retention::VirBlock<float> b(c); }, "VirBlock: 3 * dim * dim");
  expect_shape_error([&] { retention::VirRetention<float> m(Index(1) << 62, 1); },
                     "VirRetention: 3 * dim overflows");

  // Images whose sizes overflow are rejected before a pixel is read (the buffer is tiny).
  const retention::VirEncoder<float> enc(to_config(rc));
  const std::vector<float> px(48, 0.f);
  const Index big = Index(1) << 40;  // multiple of the patch 4
  expect_shape_error(
      [&] {
        enc.forward(retention::ImageView<float>{px.data(), big, big, 3});
      },
      "VirEncoder::forward: image height * width overflows");
  expect_shape_error(
      [&] {
        enc.tokens(retention::ImageView<float>{px.data(), 16, 16, 3}, 1, INT64_MAX);
      },
      "VirEncoder::tokens: rows [1, overflow) outside the 17 tokens");
  expect_shape_error(
      [&] {
        enc.tokens(retention::ImageView<float>{px.data(), 16, 16, 3}, -1, 2);
      },
      "VirEncoder::tokens: rows [-1, 1) outside");
}

TEST(VirHostile, InvalidEnumsAndThreadsBeforeStateChanges) {
  const ref::Config rc = small_ref(16, 2, 1, 4);
  const ref::Params P = random_params<double>(rc, 141);
  const retention::VirRetention<double> mhr = make_mhr<double>(P, "blocks.0.", 16, 2);
  retention::VirBlock<double> block(to_config(rc));
  block.load(map_of(P), "blocks.0.");
  const Matrix<double> x = random_matrix<double>(6, 16, 142);
  std::vector<RetentionState<double>> states, block_states;
  mhr.forward(x, VirOptions(), &states);
  block.forward(x, VirOptions(), &block_states);
  const auto saved = states, block_saved = block_states;
  VirOptions bad;
  bad.form = static_cast<Form>(7);
  expect_shape_error([&] { mhr.forward(x, bad, &states); },
                     "VirRetention::forward: form is not one of parallel, recurrent, chunkwise "
                     "(value 7)");
  expect_shape_error([&] { block.forward(x, bad, &block_states); }, "VirBlock::forward: form");
  bad = VirOptions();
  bad.order = static_cast<VirOrder>(5);
  const retention::VirEncoder<double> enc(to_config(rc));
  const std::vector<double> img(16 * 16 * 3, 0.25);
  const retention::ImageView<double> view{img.data(), 16, 16, 3};
  expect_shape_error([&] { enc.forward(view, bad); },
                     "VirEncoder::forward: options.order is not one of layer_major, chunk_major");
  bad = VirOptions();
  bad.form = static_cast<Form>(-1);
  expect_shape_error([&] { enc.forward_tokens(view, bad); }, "VirEncoder::forward_tokens: form");
  bad = VirOptions();
  bad.threads = -1;
  expect_shape_error([&] { mhr.forward(x, bad, &states); },
                     "VirRetention::forward: options.threads must be >= 0");
  expect_shape_error([&] { block.forward(x, bad, &block_states); },
                     "VirBlock::forward: options.threads must be >= 0");
  expect_shape_error([&] { enc.forward(view, bad); },
                     "VirEncoder::forward: options.threads must be >= 0");
  EXPECT_TRUE(same_states(states, saved));
  EXPECT_TRUE(same_states(block_states, block_saved));
  // Zero rows: an empty output, and the states pass through unchanged.
  EXPECT_EQ(mhr.forward(Matrix<double>(0, 16), VirOptions(), &states).rows(), 0);
  EXPECT_TRUE(same_states(states, saved));
}

TYPED_TEST(Vir, ThreadedHeadsEqualOneThread) {
  using T = TypeParam;
  // Enough work per head that the thread rule starts a team (8 heads of T = 1024 in the parallel
  // and chunkwise forms), so the multi-head path really runs threaded where OpenMP is on.
  const Index C = 256, H = 8, T_len = 1024;
  // Heads are computed alike on any thread; the projections' row blocks may change the GEMM's
  // blocking, so the last bits may differ.
  const double tight = sizeof(T) == sizeof(double) ? 1e-14 : 1e-6;
#if defined(_OPENMP)
  EXPECT_GT(retention::detail::team_size(
                4, H,
                static_cast<double>(H) *
                    retention::detail::retention_flops(Form::chunkwise, T_len, 32, 32, 32)),
            1);
#endif
  ref::Config rc = small_ref(C, H, 1);
  const ref::Params P = random_params<T>(rc, 151);
  const retention::VirRetention<T> mhr = make_mhr<T>(P, "blocks.0.", C, H);
  const Matrix<T> x = random_matrix<T>(T_len, C, 152);
  for (Form f : {Form::parallel, Form::chunkwise, Form::recurrent}) {
    VirOptions o = opts(f, 0);
    o.threads = 1;
    std::vector<RetentionState<T>> s1;
    const Matrix<T> one = mhr.forward(x, o, &s1);
    for (int threads : {0, 2, 4, 1000000}) {
      o.threads = threads;
      std::vector<RetentionState<T>> sn;
      const Matrix<T> many = mhr.forward(x, o, &sn);
      EXPECT_LE(relative_error(many, one), tight)
          << retention::to_string(f) << " threads " << threads;
      ASSERT_EQ(sn.size(), s1.size());
      for (std::size_t h = 0; h < sn.size(); ++h) {
        EXPECT_EQ(sn[h].position, s1[h].position);
        EXPECT_LE(relative_error(sn[h].S, s1[h].S), tight)
            << retention::to_string(f) << " head " << h;
      }
    }
  }
  // And through the encoder (chunk-major keeps several states per block).
  const ref::Config erc = small_ref(32, 4, 2, 6);
  const ref::Params EP = random_params<T>(erc, 153);
  retention::VirEncoder<T> enc(to_config(erc));
  load_all(enc, EP);
  const std::vector<T> img = cast_image<T>(random_image<T>(24, 24, 3, 154));
  const retention::ImageView<T> view{img.data(), 24, 24, 3};
  for (VirOrder order : {VirOrder::layer_major, VirOrder::chunk_major}) {
    VirOptions o = opts(Form::chunkwise, 8, order);
    o.threads = 1;
    const Matrix<T> one = enc.forward_tokens(view, o);
    o.threads = 3;
    EXPECT_LE(relative_error(enc.forward_tokens(view, o), one), tight);
  }
}

TYPED_TEST(Vir, FailedCallsLeaveStatesUnchanged) {
  using T = TypeParam;
  // Every allocation point (operator new) of a forward with states fails in turn: each failure
  // reaches the caller as std::bad_alloc and leaves the states bitwise as they were.
  const ref::Config rc = small_ref(16, 2, 1);
  const ref::Params P = random_params<T>(rc, 161);
  const retention::VirRetention<T> mhr = make_mhr<T>(P, "blocks.0.", 16, 2);
  retention::VirBlock<T> block(to_config(rc));
  block.load(map_of(P), "blocks.0.");
  const Matrix<T> x = random_matrix<T>(9, 16, 162);
  for (Form f : {Form::parallel, Form::recurrent, Form::chunkwise}) {
    for (int which = 0; which < 3; ++which) {
      std::vector<RetentionState<T>> states;
      mhr.forward(random_matrix<T>(4, 16, 163), opts(f), &states);
      const auto saved = states;
      VirOptions o = opts(f, 3);
      o.threads = 1;
      int failures = 0;
      for (long n = 1; n < 1000; ++n) {
        bool failed = false;
        g_new_countdown = n;
        try {
          if (which == 0) mhr.forward(x, o, &states);
          if (which == 1) block.forward(x, o, &states);
          if (which == 2) mhr.step(x.row(0), states);
        } catch (const std::bad_alloc&) {
          failed = true;
        }
        g_new_countdown = 0;
        if (!failed) break;
        ++failures;
        ASSERT_TRUE(same_states(states, saved))
            << retention::to_string(f) << " call " << which << " allocation " << n;
      }
      EXPECT_GT(failures, 0) << retention::to_string(f) << " call " << which;
      EXPECT_FALSE(same_states(states, saved));  // the successful call advanced them
    }
  }
}

TYPED_TEST(Vir, ActivationsInPlaceOnBlocks) {
  using T = TypeParam;
  // gelu_inplace and silu_inplace on a block change that block only, as the formulas in double say.
  const Matrix<T> x = random_matrix<T>(5, 7, 171, 4.0);
  Matrix<T> g = x, s = x;
  retention::gelu_inplace(g.block(1, 2, 3, 4));
  retention::silu_inplace(s.middleCols(3, 2));
  for (Index i = 0; i < 5; ++i)
    for (Index j = 0; j < 7; ++j) {
      const double v = static_cast<double>(x(i, j));
      const bool in_g = i >= 1 && i < 4 && j >= 2 && j < 6, in_s = j >= 3 && j < 5;
      const double eg = in_g ? 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0))) : v;
      const double es = in_s ? v / (1.0 + std::exp(-v)) : v;
      EXPECT_NEAR(static_cast<double>(g(i, j)), eg, 4 * spec_tolerance<T>() * (1 + std::abs(v)));
      EXPECT_NEAR(static_cast<double>(s(i, j)), es, 4 * spec_tolerance<T>() * (1 + std::abs(v)));
    }
  Matrix<T> e(1, 3);
  e << T(-1000), std::numeric_limits<T>::quiet_NaN(), T(1000);
  Matrix<T> es = e;
  retention::silu_inplace(es);
  EXPECT_EQ(es(0, 0), T(0));
  EXPECT_TRUE(std::isnan(es(0, 1)));
  EXPECT_EQ(es(0, 2), T(1000));
  retention::gelu_inplace(e);
  EXPECT_EQ(e(0, 0), T(0));
  EXPECT_TRUE(std::isnan(e(0, 1)));
  EXPECT_EQ(e(0, 2), T(1000));
}

}  // namespace
