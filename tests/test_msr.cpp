// The RetNet MSR layer (SPEC 3): against the naive double reference, forms against each other at
// eps = 1e-6 and eps = 0 for every normalisation, prefill + step against one forward, batch against
// per-sequence, weight loading, and every shape error.
#include <retention/layers/msr.hpp>

#include "reference/msr_reference.hpp"
#include "support/test_support.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

namespace {

using retention::Form;
using retention::HeadNorm;
using retention::Index;
using retention::Matrix;
using retention::MsrConfig;
using retention::MultiScaleRetention;
using retention::Normalization;
using retention::ParameterMap;
using retention_test::expect_shape_error;
using retention_test::random_matrix;
using retention_test::relative_error;
using retention_test::spec_tolerance;
using Mat = retention::Matrix<double>;

const char* const kProjections[] = {"q_proj", "k_proj", "v_proj", "g_proj", "out_proj"};

/// [out, in] of projection p (torchscale layout).
template <class Layer>
std::pair<Index, Index> projection_shape(const Layer& l, int p) {
  const Index d = l.embed_dim(), dv = l.value_dim();
  if (p == 0 || p == 1) return {d, d};
  if (p == 2 || p == 3) return {dv, d};
  return {d, dv};
}

/// A layer of scalar T and the matching reference with the same (T-rounded) random weights,
/// scaled ~1/sqrt(fan_in) so activations stay O(1).
template <class T>
struct Pair {
  MultiScaleRetention<T> layer;
  msr_reference::Layer ref;
};

template <class T>
Pair<T> make_layer_pair(const MsrConfig& cfg, std::uint64_t seed) {
  MultiScaleRetention<T> layer(cfg);
  msr_reference::Layer ref;
  ref.embed_dim = layer.embed_dim();
  ref.value_dim = layer.value_dim();
  ref.heads = layer.heads();
  ref.gammas = layer.gammas();
  ref.normalization = cfg.normalization;
  ref.head_norm = cfg.head_norm;
  ref.eps = cfg.eps;
  Mat* ws[] = {&ref.wq, &ref.wk, &ref.wv, &ref.wg, &ref.wo};
  std::vector<double>* bs[] = {&ref.bq, &ref.bk, &ref.bv, &ref.bg, &ref.bo};
  std::vector<Matrix<T>> storage;  // the map holds views: keep the tensors alive while loading
  storage.reserve(10);
  ParameterMap params;
  for (int p = 0; p < 5; ++p) {
    const auto [out, in] = projection_shape(layer, p);
    storage.push_back(random_matrix<T>(out, in, seed * 10 + static_cast<std::uint64_t>(p),
                                       1.7 / std::sqrt(double(in))));
    params.add_dense(std::string(kProjections[p]) + ".weight", storage.back());
    *ws[p] = storage.back().template cast<double>();
    if (cfg.biases) {
      storage.push_back(
          random_matrix<T>(1, out, seed * 10 + 5 + static_cast<std::uint64_t>(p), 0.3));
      params.add_dense(std::string(kProjections[p]) + ".bias", storage.back(), {out});
      bs[p]->assign(storage.back().data(), storage.back().data() + out);
    }
  }
  layer.load(params);
  return Pair<T>{std::move(layer), std::move(ref)};
}

MsrConfig config(Index d, Index value_dim, Index heads,
                 Normalization norm = Normalization::decay_and_score,
                 HeadNorm head_norm = HeadNorm::rms, double eps = 1e-6, bool biases = false,
                 std::vector<double> gammas = {}) {
  MsrConfig c;
  c.embed_dim = d;
  c.value_dim = value_dim;
  c.heads = heads;
  c.normalization = norm;
  c.head_norm = head_norm;
  c.eps = eps;
  c.biases = biases;
  c.gammas = std::move(gammas);
  return c;
}

struct FormRun {
  Form form;
  Index chunk;
};
const std::vector<FormRun> kForms = {{Form::parallel, 0},  {Form::recurrent, 0},
                                     {Form::chunkwise, 1}, {Form::chunkwise, 4},
                                     {Form::chunkwise, 0}, {Form::chunkwise, 1000}};

template <class T>
class MsrTest : public ::testing::Test {};
TYPED_TEST_SUITE(MsrTest, retention_test::ScalarTypes);

TYPED_TEST(MsrTest, MatchesReferenceInEveryForm) {
  using T = TypeParam;
  struct Case {
    MsrConfig cfg;
    Index T_len;
  };
  const std::vector<Case> cases = {
      {config(8, 16, 2), 9},
      {config(4, 4, 2), 1},  // dk = 2, T = 1
      {config(12, 6, 3, Normalization::decay, HeadNorm::layer, 1e-6, true), 33},
      {config(16, 32, 4, Normalization::none, HeadNorm::rms, 0.0), 20},
      {config(2, 1, 1), 5},  // d = 2, dk = 2, dv = 1
      {config(6, 12, 3, Normalization::decay_and_score, HeadNorm::rms, 1e-6, false,
              {1.0, 0.9, 0.5}),
       17},
      {config(32, 64, 2, Normalization::decay_and_score, HeadNorm::layer, 0.0), 70},
      // 300 rows: the projections split into per-thread row blocks, the rotation uses spans.
      {config(16, 32, 4, Normalization::decay_and_score, HeadNorm::rms, 1e-6, true), 300},
  };
  std::uint64_t seed = 1;
  for (const bool packed : {false, true})  // MsrConfig::packed_weights
    for (auto c : cases) {
      c.cfg.packed_weights = packed;
      const Pair<T> p = make_layer_pair<T>(c.cfg, seed++);
      const Matrix<T> x = random_matrix<T>(c.T_len, c.cfg.embed_dim, seed++);
      const Mat ref = msr_reference::forward(p.ref, x.template cast<double>());
      for (const auto& f : kForms) {
        const Matrix<T> y = p.layer.forward(x, f.form, f.chunk);
        EXPECT_LE(relative_error(y, ref), 2 * spec_tolerance<T>())
            << "d=" << c.cfg.embed_dim << " H=" << c.cfg.heads << " T=" << c.T_len << " form "
            << retention::to_string(f.form) << " chunk " << f.chunk << (packed ? " packed" : "");
      }
    }
}

// The library's normalisation factors are computable in every form, so the forms agree before
// the head norm too: at eps = 1e-6 as well as at eps = 0, for every normalisation and head norm.
TEST(MsrForms, AgreeForEveryNormalisationAtBothEps) {
  const Index T_len = 45;
  std::uint64_t seed = 100;
  for (Normalization norm :
       {Normalization::none, Normalization::decay, Normalization::decay_and_score})
    for (double eps : {1e-6, 0.0})
      for (HeadNorm hn : {HeadNorm::rms, HeadNorm::layer}) {
        const Pair<double> p = make_layer_pair<double>(config(16, 24, 4, norm, hn, eps), seed++);
        // Inputs scaled up so that score sums exceed 1 and decay_and_score's max(|r|, 1) is active.
        const Mat x = random_matrix<double>(T_len, 16, seed++, 3.0);
        const Mat base = p.layer.forward(x, Form::parallel);
        ASSERT_TRUE(base.allFinite());
        for (const auto& f : kForms) {
          const Mat y = p.layer.forward(x, f.form, f.chunk);
          EXPECT_LE(relative_error(y, base), 1e-12)
              << retention::to_string(norm) << " eps " << eps << " " << retention::to_string(hn)
              << " " << retention::to_string(f.form) << " chunk " << f.chunk;
        }
        if (eps == 0.0) {
          const Mat ref = msr_reference::forward(p.ref, x);
          EXPECT_LE(relative_error(base, ref), 1e-12) << retention::to_string(norm);
        }
      }
}

TYPED_TEST(MsrTest, PrefillThenStepEqualsForward) {
  using T = TypeParam;
  const Index T_len = 23;
  const Pair<T> p = make_layer_pair<T>(config(12, 18, 3), 7);
  const Matrix<T> x = random_matrix<T>(T_len, 12, 8, 2.0);
  const Matrix<T> full = p.layer.forward(x, Form::parallel);
  for (const auto& f :
       {FormRun{Form::parallel, 0}, FormRun{Form::recurrent, 0}, FormRun{Form::chunkwise, 4}})
    for (Index k : {Index(1), Index(5), Index(16), T_len - 1, T_len}) {
      auto state = p.layer.make_state();
      Matrix<T> y(T_len, 12);
      y.topRows(k) = p.layer.prefill(x.topRows(k), state, f.form, f.chunk);
      EXPECT_EQ(state.position, k);
      for (Index t = k; t < T_len; ++t) y.row(t) = p.layer.step(x.row(t), state);
      EXPECT_EQ(state.position, T_len);
      EXPECT_LE(relative_error(y, full), spec_tolerance<T>())
          << retention::to_string(f.form) << " k=" << k;
    }
}

// Two prefills in different forms, then steps: positions, rotation and the decay normalisation all
// continue from the state.
TYPED_TEST(MsrTest, PrefillsInDifferentFormsChain) {
  using T = TypeParam;
  const Index T_len = 30;
  const Pair<T> p = make_layer_pair<T>(config(8, 8, 2, Normalization::decay), 9);
  const Matrix<T> x = random_matrix<T>(T_len, 8, 10);
  const Matrix<T> full = p.layer.forward(x, Form::recurrent);
  const Form forms[] = {Form::parallel, Form::recurrent, Form::chunkwise};
  for (Form a : forms)
    for (Form b : forms) {
      auto state = p.layer.make_state();
      Matrix<T> y(T_len, 8);
      y.topRows(7) = p.layer.prefill(x.topRows(7), state, a, 3);
      y.middleRows(7, 13) = p.layer.prefill(x.middleRows(7, 13), state, b, 5);
      for (Index t = 20; t < T_len; ++t) y.row(t) = p.layer.step(x.row(t), state);
      EXPECT_LE(relative_error(y, full), spec_tolerance<T>())
          << retention::to_string(a) << " then " << retention::to_string(b);
    }
}

TYPED_TEST(MsrTest, BatchEqualsPerSequence) {
  using T = TypeParam;
  const Index B = 3, T_len = 11, d = 8;
  const Pair<T> p = make_layer_pair<T>(
      config(d, 16, 2, Normalization::decay_and_score, HeadNorm::layer, 1e-6, true), 11);
  const Matrix<T> x = random_matrix<T>(B * T_len, d, 12);
  for (const auto& f : kForms) {
    const Matrix<T> y = p.layer.forward_batch(x, B, f.form, f.chunk);
    ASSERT_EQ(y.rows(), B * T_len);
    for (Index b = 0; b < B; ++b) {
      const Matrix<T> xb = x.middleRows(b * T_len, T_len);
      const Matrix<T> yb = p.layer.forward(xb, f.form, f.chunk);
      EXPECT_LE(relative_error(y.middleRows(b * T_len, T_len), yb), spec_tolerance<T>())
          << retention::to_string(f.form) << " sequence " << b;
    }
  }
  EXPECT_LE(
      relative_error(p.layer.forward_batch(x.topRows(T_len), 1), p.layer.forward(x.topRows(T_len))),
      0.0);
}

// Long float sequences: decay factors underflow to 0 far from the diagonal, never to NaN, and the
// forms still agree.
TEST(MsrForms, LongFloatSequenceStaysFiniteAndAgrees) {
  const Index T_len = 3000;
  const Pair<float> p = make_layer_pair<float>(
      config(8, 8, 2, Normalization::decay_and_score, HeadNorm::rms, 1e-6, false, {0.5, 0.96875}),
      13);
  const Matrix<float> x = random_matrix<float>(T_len, 8, 14);
  const Matrix<float> a = p.layer.forward(x, Form::parallel);
  const Matrix<float> b = p.layer.forward(x, Form::chunkwise, 64);
  const Matrix<float> c = p.layer.forward(x, Form::recurrent);
  ASSERT_TRUE(a.allFinite());
  EXPECT_LE(relative_error(b, a), 1e-5);
  EXPECT_LE(relative_error(c, a), 1e-5);
}

TEST(MsrLoad, RawPointerEqualsEigenAndDefaults) {
  MsrConfig c;
  c.embed_dim = 8;
  c.heads = 2;
  MultiScaleRetention<double> layer(c);
  EXPECT_EQ(layer.value_dim(), 8);
  EXPECT_EQ(layer.key_dim(), 4);
  EXPECT_EQ(layer.head_value_dim(), 4);
  EXPECT_EQ(layer.gammas(), retention::retnet_gammas(2));
  EXPECT_EQ(layer.config().normalization, Normalization::decay_and_score);
  EXPECT_EQ(layer.config().head_norm, HeadNorm::rms);
  EXPECT_EQ(layer.config().eps, 1e-6);
  // float32 tensors into a double layer, under a prefix, by torchscale's names.
  std::vector<Matrix<float>> ws;
  ParameterMap params;
  for (int p = 0; p < 5; ++p) {
    const auto [out, in] = projection_shape(layer, p);
    ws.push_back(random_matrix<float>(out, in, 20 + static_cast<std::uint64_t>(p)));
  }
  for (int p = 0; p < 5; ++p)
    params.add_dense(std::string("layers.3.retention.") + kProjections[p] + ".weight",
                     ws[static_cast<std::size_t>(p)]);
  layer.load(params, "layers.3.retention.");
  EXPECT_EQ(layer.q_proj().weight(), ws[0].cast<double>());
  EXPECT_EQ(layer.k_proj().weight(), ws[1].cast<double>());
  EXPECT_EQ(layer.v_proj().weight(), ws[2].cast<double>());
  EXPECT_EQ(layer.g_proj().weight(), ws[3].cast<double>());
  EXPECT_EQ(layer.out_proj().weight(), ws[4].cast<double>());
  MsrConfig cb = c;
  cb.biases = true;
  MultiScaleRetention<float> lb(cb);
  const Matrix<float> b = random_matrix<float>(8, 1, 21);
  for (int p = 0; p < 5; ++p) {
    params.add_dense(std::string(kProjections[p]) + ".weight", ws[static_cast<std::size_t>(p)]);
    params.add(std::string(kProjections[p]) + ".bias", b.data(), {8});
  }
  lb.load(params);
  EXPECT_EQ(lb.out_proj().bias(), b.transpose());
  EXPECT_EQ(lb.q_proj().bias(), b.transpose());
}

TEST(MsrState, SizeIsConstantAndResets) {
  const Pair<double> p = make_layer_pair<double>(config(8, 12, 2), 30);
  auto s = p.layer.make_state();
  ASSERT_EQ(s.heads.size(), 2u);
  const std::size_t bytes = s.bytes();
  EXPECT_EQ(bytes, 2u * (4u * 6u + 4u) * sizeof(double));
  const Mat x = random_matrix<double>(40, 8, 31);
  p.layer.prefill(x, s);
  for (Index t = 0; t < 10; ++t) p.layer.step(x.row(t), s);
  EXPECT_EQ(s.bytes(), bytes);
  EXPECT_EQ(s.position, 50);
  s.reset();
  EXPECT_EQ(s.position, 0);
  const Mat y0 = p.layer.prefill(x.topRows(3), s, Form::recurrent);
  EXPECT_LE(relative_error(y0, p.layer.forward(x.topRows(3))), 1e-12);
}

TEST(MsrErrors, Config) {
  auto make = [](MsrConfig c) { return [c] { MultiScaleRetention<double> l(c); }; };
  expect_shape_error(make(config(6, 6, 2)),
                     "MultiScaleRetention: key dim embed_dim / heads = 3 is odd");
  expect_shape_error(make(config(3, 3, 1)), "key dim embed_dim / heads = 3 is odd");
  expect_shape_error(make(config(10, 10, 4)), "embed_dim 10 is not divisible by heads 4");
  expect_shape_error(make(config(8, 10, 4)), "value_dim 10 is not divisible by heads 4");
  expect_shape_error(make(config(8, 8, 2, Normalization::none, HeadNorm::rms, 1e-6, false, {0.9})),
                     "gammas has 1 entries, expected heads = 2");
  expect_shape_error(
      make(config(8, 8, 2, Normalization::none, HeadNorm::rms, 1e-6, false, {0.9, 1.5})),
      "gamma must be in (0, 1], got 1.5");
  expect_shape_error(
      make(config(8, 8, 2, Normalization::none, HeadNorm::rms, 1e-6, false, {0.0, 0.5})),
      "gamma must be in (0, 1], got 0");
  expect_shape_error(make(config(8, 8, 2, Normalization::none, HeadNorm::rms, -1.0)),
                     "eps must be >= 0");
  expect_shape_error(make(config(0, 8, 2)), "embed_dim must be >= 1, got 0");
  expect_shape_error(make(config(8, 8, 0)), "heads must be >= 1, got 0");
  expect_shape_error(make(config(8, -2, 2)), "value_dim must be >= 0");
}

TEST(MsrErrors, Weights) {
  MultiScaleRetention<float> layer(config(8, 12, 2));
  const Matrix<float> bad = random_matrix<float>(8, 7, 40);
  const Matrix<float> w88 = random_matrix<float>(8, 8, 41), w12 = random_matrix<float>(12, 8, 42),
                      wo = random_matrix<float>(8, 12, 43);
  ParameterMap good;
  good.add_dense("q_proj.weight", w88);
  good.add_dense("k_proj.weight", w88);
  good.add_dense("v_proj.weight", w12);
  good.add_dense("g_proj.weight", w12);
  good.add_dense("out_proj.weight", wo);
  const auto with = [&](const std::string& name, const Matrix<float>& m) {
    ParameterMap p = good;
    p.add_dense(name, m);
    return p;
  };
  for (const char* name : kProjections) {
    const ParameterMap p = with(std::string(name) + ".weight", bad);
    expect_shape_error([&] { layer.load(p); }, "MultiScaleRetention::load: parameter '" +
                                                   std::string(name) +
                                                   ".weight' has shape [8, 7], expected");
  }
  expect_shape_error([&] { layer.load(good, "layers.0."); },
                     "MultiScaleRetention::load: missing parameter 'layers.0.q_proj.weight'");
  // A failed load leaves the layer as it was.
  const Matrix<float> before = layer.v_proj().weight();
  const ParameterMap half = with("out_proj.weight", bad);
  expect_shape_error([&] { layer.load(half); }, "out_proj.weight");
  EXPECT_EQ(layer.v_proj().weight(), before);
  MsrConfig cb = config(8, 12, 2);
  cb.biases = true;
  MultiScaleRetention<float> lb(cb);
  expect_shape_error([&] { lb.load(good); },
                     "MultiScaleRetention::load: missing parameter 'q_proj.bias'");
  ParameterMap biased = good;
  for (const char* name : kProjections) biased.add(std::string(name) + ".bias", bad.data(), {8});
  expect_shape_error([&] { lb.load(biased); },
                     "parameter 'v_proj.bias' has shape [8], expected [12]");
}

TEST(MsrErrors, InputsAndState) {
  const Pair<double> p = make_layer_pair<double>(config(8, 12, 2), 50);
  const auto& layer = p.layer;
  const Mat x = random_matrix<double>(6, 8, 51);
  const Mat x7 = random_matrix<double>(6, 7, 52);
  expect_shape_error([&] { layer.forward(x7); },
                     "MultiScaleRetention::forward: x is [6 x 7], expected [* x 8]");
  expect_shape_error([&] { layer.forward(x, Form::chunkwise, -1); }, "chunk must be >= 0");
  expect_shape_error(
      [&] { layer.forward_batch(x, 4); },
      "MultiScaleRetention::forward_batch: x is [6 x 8], rows not a multiple of batch 4");
  expect_shape_error([&] { layer.forward_batch(x, 0); }, "batch must be >= 1, got 0");
  EXPECT_EQ(layer.forward(x.topRows(0)).rows(), 0);

  auto s = layer.make_state();
  expect_shape_error([&] { layer.step(x.topRows(2), s); },
                     "MultiScaleRetention::step: x_t is [2 x 8], expected [1 x 8]");
  expect_shape_error([&] { layer.step(x7.row(0), s); }, "x_t is [1 x 7], expected [1 x 8]");
  expect_shape_error([&] { layer.prefill(x7, s); },
                     "MultiScaleRetention::prefill: x is [6 x 7], expected [* x 8]");
  EXPECT_EQ(s.position, 0);  // a rejected call leaves the state alone

  auto few = s;
  few.heads.pop_back();
  expect_shape_error([&] { layer.step(x.row(0), few); },
                     "state.heads has 1 states, expected heads = 2");
  expect_shape_error([&] { layer.prefill(x, few); },
                     "MultiScaleRetention::prefill: state.heads has 1 states");
  auto wrong_s = s;
  wrong_s.heads[1] = retention::RetentionState<double>(4, 5);
  expect_shape_error([&] { layer.step(x.row(0), wrong_s); },
                     "state.heads[1].S is [4 x 5], expected [4 x 6]");
  auto wrong_z = s;
  wrong_z.heads[0].z.resize(3);
  expect_shape_error([&] { layer.step(x.row(0), wrong_z); },
                     "state.heads[0].z is [3 x 1], expected [4 x 1]");
  auto wrong_pos = s;
  wrong_pos.position = 3;
  expect_shape_error([&] { layer.step(x.row(0), wrong_pos); },
                     "state.heads[0].position is 0, expected state.position = 3");
  auto neg = s;
  neg.position = -1;
  expect_shape_error([&] { layer.step(x.row(0), neg); }, "state.position is -1, expected >= 0");
  // A state from a layer with other sizes.
  MultiScaleRetention<double> other(config(8, 8, 2));
  auto s_other = other.make_state();
  expect_shape_error([&] { layer.step(x.row(0), s_other); },
                     "state.heads[0].S is [4 x 4], expected [4 x 6]");
}

}  // namespace
