// retention-test-links: compiled
// Multi-head entry points over the time-major layout [B, T, H, D]: per-head gammas, states in and
// out, thread-count independence, the decoding step, and every error.
#include <retention/multihead.hpp>

#include "reference/retention_reference.hpp"
#include "support/test_support.hpp"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace {

using retention_test::ScalarName;

namespace ref = retention_reference;
using retention::CausalDecay;
using retention::Form;
using retention::Index;
using retention::Matrix;
using retention::MultiHeadOptions;
using retention::MultiHeadShape;
using retention::Normalization;
using retention::RetentionOptions;
using retention::RetentionState;
using retention_test::expect_shape_error;
using retention_test::random_matrix;
using retention_test::relative_error;
using retention_test::spec_tolerance;

const Form kForms[] = {Form::parallel, Form::recurrent, Form::chunkwise};

/// A [B, T, H, D] buffer stored as a [B*T*H, D] matrix (row-major, so its data() is the buffer).
template <class T>
Matrix<T> buffer(const MultiHeadShape& s, Index d, std::uint64_t seed, double scale = 1.0) {
  return random_matrix<T>(s.batch * s.time * s.heads, d, seed, scale);
}

/// The [T, D] slice of (batch b, head h), copied out of a [B, T, H, D] buffer.
template <class T>
Matrix<T> slice(const Matrix<T>& buf, const MultiHeadShape& s, Index b, Index h) {
  Matrix<T> out(s.time, buf.cols());
  for (Index t = 0; t < s.time; ++t) out.row(t) = buf.row((b * s.time + t) * s.heads + h);
  return out;
}

template <class T>
std::vector<RetentionState<T>> random_states(const MultiHeadShape& s, std::uint64_t seed) {
  std::vector<RetentionState<T>> st;
  for (Index i = 0; i < s.batch * s.heads; ++i) {
    RetentionState<T> x;
    x.S = random_matrix<T>(s.key_dim, s.value_dim, seed + 2 * static_cast<std::uint64_t>(i));
    x.z = random_matrix<T>(s.key_dim, 1, seed + 2 * static_cast<std::uint64_t>(i) + 1);
    x.position = 5 + i;
    st.push_back(x);
  }
  return st;
}

template <class T>
class MultiHead : public ::testing::Test {};
TYPED_TEST_SUITE(MultiHead, retention_test::ScalarTypes, ScalarName);

TYPED_TEST(MultiHead, EqualsPerHeadCallsAndReferenceWithStates) {
  using T = TypeParam;
  const MultiHeadShape s{2, 37, 4, 6, 5};
  const std::vector<double> gammas = {0.5, 0.96875, 1.0 - 1.0 / 4096, 1.0};
  const Matrix<T> q = buffer<T>(s, s.key_dim, 1, 1.3), k = buffer<T>(s, s.key_dim, 2, 1.3);
  const Matrix<T> v = buffer<T>(s, s.value_dim, 3);
  const std::vector<RetentionState<T>> init = random_states<T>(s, 100);
  for (Form form : kForms)
    for (Normalization norm : {Normalization::none, Normalization::decay_and_score}) {
      Matrix<T> out = Matrix<T>::Constant(q.rows(), s.value_dim, T(-7));
      std::vector<RetentionState<T>> fin;
      MultiHeadOptions<T> opt;
      opt.form = form;
      opt.chunk = 8;
      opt.normalization = norm;
      opt.initial_states = &init;
      opt.final_states = &fin;
      retention::multi_head_retention(q.data(), k.data(), v.data(), out.data(), s, gammas, opt);
      ASSERT_EQ(fin.size(), static_cast<std::size_t>(s.batch * s.heads));
      for (Index b = 0; b < s.batch; ++b)
        for (Index h = 0; h < s.heads; ++h) {
          const std::size_t pair = static_cast<std::size_t>(b * s.heads + h);
          const std::string what = std::string(retention::to_string(form)) +
                                   " b=" + std::to_string(b) + " h=" + std::to_string(h) + " " +
                                   retention::to_string(norm);
          const Matrix<T> Q = slice(q, s, b, h), K = slice(k, s, b, h), V = slice(v, s, b, h);
          const CausalDecay decay(gammas[static_cast<std::size_t>(h)]);
          RetentionState<T> single_final;
          RetentionOptions<T> o;
          o.normalization = norm;
          o.initial_state = &init[pair];
          o.final_state = &single_final;
          Matrix<T> single;
          switch (form) {
            case Form::parallel:
              single = retention::parallel_retention(Q, K, V, decay, o);
              break;
            case Form::recurrent:
              single = retention::recurrent_retention(Q, K, V, decay, o);
              break;
            case Form::chunkwise:
              single = retention::chunkwise_retention(Q, K, V, decay, 8, o);
              break;
          }
          const Matrix<T> got = slice(out, s, b, h);
          // Same kernel on a strided view and on a copy: equal to rounding.
          EXPECT_LE(relative_error(got, single), 4 * std::numeric_limits<T>::epsilon()) << what;
          ref::State ri;
          ri.S = init[pair].S.template cast<double>();
          ri.z = init[pair].z.template cast<double>();
          ri.position = init[pair].position;
          ref::State rf;
          const Matrix<double> expected = ref::retention(
              Q.template cast<double>(), K.template cast<double>(), V.template cast<double>(),
              gammas[static_cast<std::size_t>(h)], norm, &ri, &rf);
          EXPECT_LE(relative_error(got, expected), spec_tolerance<T>()) << what;
          EXPECT_LE(relative_error(fin[pair].S, rf.S), spec_tolerance<T>()) << what;
          EXPECT_LE(relative_error(fin[pair].z, rf.z), spec_tolerance<T>()) << what;
          EXPECT_EQ(fin[pair].position, ri.position + s.time) << what;
        }
    }
}

// Buffers of B = 1, H = 1, dims of 1, T = 1, and the automatic chunk (0).
TYPED_TEST(MultiHead, DegenerateShapesAndAutomaticChunk) {
  using T = TypeParam;
  for (const MultiHeadShape s : {MultiHeadShape{1, 1, 1, 1, 1}, MultiHeadShape{1, 70, 1, 2, 1},
                                 MultiHeadShape{3, 2, 2, 1, 3}}) {
    const std::vector<double> gammas = retention::retnet_gammas(s.heads);
    const Matrix<T> q = buffer<T>(s, s.key_dim, 11), k = buffer<T>(s, s.key_dim, 12);
    const Matrix<T> v = buffer<T>(s, s.value_dim, 13);
    for (Form form : kForms) {
      Matrix<T> out(q.rows(), s.value_dim);
      MultiHeadOptions<T> opt;
      opt.form = form;
      opt.normalization = Normalization::decay;
      retention::multi_head_retention(q.data(), k.data(), v.data(), out.data(), s, gammas, opt);
      for (Index b = 0; b < s.batch; ++b)
        for (Index h = 0; h < s.heads; ++h) {
          const Matrix<double> expected = ref::retention(
              slice(q, s, b, h).template cast<double>(), slice(k, s, b, h).template cast<double>(),
              slice(v, s, b, h).template cast<double>(), gammas[static_cast<std::size_t>(h)],
              Normalization::decay);
          EXPECT_LE(relative_error(slice(out, s, b, h), expected), spec_tolerance<T>())
              << retention::to_string(form) << " T=" << s.time;
        }
    }
  }
}

// The final states may be the initial states (continue in place); a second call then continues.
TYPED_TEST(MultiHead, StatesContinueInPlace) {
  using T = TypeParam;
  const MultiHeadShape whole{2, 30, 3, 4, 4};
  const MultiHeadShape first{2, 18, 3, 4, 4}, rest{2, 12, 3, 4, 4};
  const std::vector<double> gammas = {0.9, 0.99, 1.0};
  const Matrix<T> q = buffer<T>(whole, 4, 21), k = buffer<T>(whole, 4, 22),
                  v = buffer<T>(whole, 4, 23);
  Matrix<T> expected(q.rows(), 4);
  MultiHeadOptions<T> opt;
  opt.normalization = Normalization::decay_and_score;
  retention::multi_head_retention(q.data(), k.data(), v.data(), expected.data(), whole, gammas,
                                  opt);

  // Split each batch's rows: [B, T, H, D] -> [B, 18, H, D] and [B, 12, H, D] buffers.
  auto part = [&](const Matrix<T>& buf, Index t0, Index len) {
    Matrix<T> out(whole.batch * len * whole.heads, buf.cols());
    for (Index b = 0; b < whole.batch; ++b)
      out.middleRows(b * len * whole.heads, len * whole.heads) =
          buf.middleRows((b * whole.time + t0) * whole.heads, len * whole.heads);
    return out;
  };
  std::vector<RetentionState<T>> states(6, RetentionState<T>(4, 4));
  MultiHeadOptions<T> o = opt;
  o.initial_states = &states;
  o.final_states = &states;
  o.form = Form::parallel;
  const Matrix<T> q1 = part(q, 0, 18), k1 = part(k, 0, 18), v1 = part(v, 0, 18);
  const Matrix<T> q2 = part(q, 18, 12), k2 = part(k, 18, 12), v2 = part(v, 18, 12);
  Matrix<T> out1(q1.rows(), 4), out2(q2.rows(), 4);
  retention::multi_head_retention(q1.data(), k1.data(), v1.data(), out1.data(), first, gammas, o);
  o.form = Form::recurrent;
  retention::multi_head_retention(q2.data(), k2.data(), v2.data(), out2.data(), rest, gammas, o);
  EXPECT_LE(relative_error(out1, part(expected, 0, 18)), spec_tolerance<T>());
  EXPECT_LE(relative_error(out2, part(expected, 18, 12)), spec_tolerance<T>());
  for (const auto& st : states) EXPECT_EQ(st.position, 30);
}

// (batch, head) pairs are independent: 1 and 2 threads give bit-identical results.
TYPED_TEST(MultiHead, ThreadCountDoesNotChangeResults) {
  using T = TypeParam;
  const MultiHeadShape s{2, 100, 3, 8, 8};
  const std::vector<double> gammas = retention::retnet_gammas(3);
  const Matrix<T> q = buffer<T>(s, 8, 31), k = buffer<T>(s, 8, 32), v = buffer<T>(s, 8, 33);
  for (Form form : kForms) {
    Matrix<T> out1(q.rows(), 8), out2(q.rows(), 8);
    std::vector<RetentionState<T>> f1, f2;
    MultiHeadOptions<T> opt;
    opt.form = form;
    opt.normalization = Normalization::decay_and_score;
    opt.threads = 1;
    opt.final_states = &f1;
    retention::multi_head_retention(q.data(), k.data(), v.data(), out1.data(), s, gammas, opt);
    opt.threads = 2;
    opt.final_states = &f2;
    retention::multi_head_retention(q.data(), k.data(), v.data(), out2.data(), s, gammas, opt);
    EXPECT_TRUE(out1 == out2) << retention::to_string(form);
    for (std::size_t i = 0; i < f1.size(); ++i)
      EXPECT_TRUE(f1[i].S == f2[i].S && f1[i].z == f2[i].z);
  }
}

// multi_head_step over [B, H, D] equals retention_step per head and the recurrent multi-head form.
TYPED_TEST(MultiHead, StepEqualsPerHeadStepAndSequence) {
  using T = TypeParam;
  const MultiHeadShape s{2, 9, 3, 5, 4};
  const std::vector<double> gammas = {0.75, 0.96875, 1.0};
  const Matrix<T> q = buffer<T>(s, 5, 41), k = buffer<T>(s, 5, 42), v = buffer<T>(s, 4, 43);
  const std::vector<RetentionState<T>> init = random_states<T>(s, 300);
  Matrix<T> seq(q.rows(), 4);
  MultiHeadOptions<T> opt;
  opt.form = Form::recurrent;
  opt.normalization = Normalization::decay_and_score;
  opt.initial_states = &init;
  retention::multi_head_retention(q.data(), k.data(), v.data(), seq.data(), s, gammas, opt);

  std::vector<RetentionState<T>> states = init, single = init;
  for (Index t = 0; t < s.time; ++t) {
    // Gather token t of every batch into [B, H, D] step buffers.
    Matrix<T> qt(s.batch * s.heads, 5), kt(s.batch * s.heads, 5), vt(s.batch * s.heads, 4),
        ot(s.batch * s.heads, 4);
    for (Index b = 0; b < s.batch; ++b) {
      qt.middleRows(b * s.heads, s.heads) = q.middleRows((b * s.time + t) * s.heads, s.heads);
      kt.middleRows(b * s.heads, s.heads) = k.middleRows((b * s.time + t) * s.heads, s.heads);
      vt.middleRows(b * s.heads, s.heads) = v.middleRows((b * s.time + t) * s.heads, s.heads);
    }
    retention::multi_head_step(qt.data(), kt.data(), vt.data(), ot.data(), s.batch, s.heads, 5, 4,
                               gammas, states, Normalization::decay_and_score, 2);
    for (Index b = 0; b < s.batch; ++b)
      for (Index h = 0; h < s.heads; ++h) {
        const Index pair = b * s.heads + h;
        const retention::RowVector<T> o = retention::retention_step(
            qt.row(pair), kt.row(pair), vt.row(pair),
            CausalDecay(gammas[static_cast<std::size_t>(h)]),
            single[static_cast<std::size_t>(pair)], Normalization::decay_and_score);
        EXPECT_TRUE(ot.row(pair) == o) << "t=" << t << " pair " << pair;
        EXPECT_LE(relative_error(ot.row(pair), seq.row((b * s.time + t) * s.heads + h)),
                  spec_tolerance<T>());
      }
  }
  for (std::size_t i = 0; i < states.size(); ++i)
    EXPECT_EQ(states[i].position, init[i].position + s.time);
}

TEST(MultiHeadErrors, MultiHeadRetention) {
  const MultiHeadShape s{2, 5, 3, 4, 2};
  const std::vector<double> g = {0.9, 0.9, 0.9};
  const Matrix<float> q = buffer<float>(s, 4, 1), k = buffer<float>(s, 4, 2),
                      v = buffer<float>(s, 2, 3);
  Matrix<float> out(q.rows(), 2);
  const float* Q = q.data();
  const float* K = k.data();
  const float* V = v.data();
  float* O = out.data();
  auto call = [&](const float* a, const float* b, const float* c, float* d,
                  const MultiHeadShape& sh, const std::vector<double>& gammas,
                  const MultiHeadOptions<float>& opt) {
    retention::multi_head_retention(a, b, c, d, sh, gammas, opt);
  };
  const MultiHeadOptions<float> def;
  const std::string fn = "multi_head_retention: ";
  expect_shape_error([&] { call(nullptr, K, V, O, s, g, def); }, fn + "null buffer pointer");
  expect_shape_error([&] { call(Q, nullptr, V, O, s, g, def); }, fn + "null buffer pointer");
  expect_shape_error([&] { call(Q, K, nullptr, O, s, g, def); }, fn + "null buffer pointer");
  expect_shape_error([&] { call(Q, K, V, nullptr, s, g, def); }, fn + "null buffer pointer");
  const char* fields[] = {"batch", "time", "heads", "key_dim", "value_dim"};
  for (int f = 0; f < 5; ++f)
    for (Index bad : {Index(0), Index(-2)}) {
      MultiHeadShape sh = s;
      Index* field[] = {&sh.batch, &sh.time, &sh.heads, &sh.key_dim, &sh.value_dim};
      *field[f] = bad;
      expect_shape_error([&] { call(Q, K, V, O, sh, g, def); },
                         fn + fields[f] + " must be >= 1, got " + std::to_string(bad));
    }
  expect_shape_error(
      [&] {
        call(Q, K, V, O, s, {0.9, 0.9}, def);
      },
      fn + "gammas has 2 entries, expected heads = 3");
  expect_shape_error(
      [&] {
        call(Q, K, V, O, s, {0.9, 1.5, 0.9}, def);
      },
      fn + "gamma must be in (0, 1], got 1.5");
  MultiHeadOptions<float> neg;
  neg.chunk = -1;
  expect_shape_error([&] { call(Q, K, V, O, s, g, neg); },
                     fn + "chunk must be >= 0 (0 = automatic), got -1");
  std::vector<RetentionState<float>> five(5, RetentionState<float>(4, 2));
  MultiHeadOptions<float> st;
  st.initial_states = &five;
  expect_shape_error([&] { call(Q, K, V, O, s, g, st); },
                     fn + "initial_states has 5 states, expected batch * heads = 6");
  std::vector<RetentionState<float>> six(6, RetentionState<float>(4, 2));
  six[4] = RetentionState<float>(4, 3);
  st.initial_states = &six;
  expect_shape_error([&] { call(Q, K, V, O, s, g, st); },
                     fn + "initial_states[4].S is [4 x 3], expected [4 x 2]");
  six[4] = RetentionState<float>(4, 2);
  six[4].z.resize(3);
  expect_shape_error([&] { call(Q, K, V, O, s, g, st); },
                     fn + "initial_states[4].z is [3 x 1], expected [4 x 1]");
}

TEST(MultiHeadErrors, MultiHeadStep) {
  const std::vector<double> g = {0.9, 0.8};
  const Matrix<double> q = random_matrix<double>(2, 3, 1), k = random_matrix<double>(2, 3, 2);
  const Matrix<double> v = random_matrix<double>(2, 2, 3);
  Matrix<double> out(2, 2);
  std::vector<RetentionState<double>> st(2, RetentionState<double>(3, 2));
  const std::string fn = "multi_head_step: ";
  using retention::multi_head_step;
  expect_shape_error(
      [&] { multi_head_step<double>(nullptr, k.data(), v.data(), out.data(), 1, 2, 3, 2, g, st); },
      fn + "null buffer pointer");
  expect_shape_error(
      [&] { multi_head_step<double>(q.data(), k.data(), v.data(), nullptr, 1, 2, 3, 2, g, st); },
      fn + "null buffer pointer");
  expect_shape_error(
      [&] { multi_head_step(q.data(), k.data(), v.data(), out.data(), 0, 2, 3, 2, g, st); },
      fn + "batch must be >= 1, got 0");
  expect_shape_error(
      [&] { multi_head_step(q.data(), k.data(), v.data(), out.data(), 1, -1, 3, 2, g, st); },
      fn + "heads must be >= 1, got -1");
  expect_shape_error(
      [&] { multi_head_step(q.data(), k.data(), v.data(), out.data(), 1, 2, 0, 2, g, st); },
      fn + "key_dim must be >= 1, got 0");
  expect_shape_error(
      [&] { multi_head_step(q.data(), k.data(), v.data(), out.data(), 1, 2, 3, 0, g, st); },
      fn + "value_dim must be >= 1, got 0");
  expect_shape_error(
      [&] { multi_head_step(q.data(), k.data(), v.data(), out.data(), 1, 2, 3, 2, {0.9}, st); },
      fn + "gammas has 1 entries, expected heads = 2");
  expect_shape_error(
      [&] {
        multi_head_step(q.data(), k.data(), v.data(), out.data(), 1, 2, 3, 2, {0.9, 0.0}, st);
      },
      fn + "gamma must be in (0, 1], got 0");
  std::vector<RetentionState<double>> three(3, RetentionState<double>(3, 2));
  expect_shape_error(
      [&] { multi_head_step(q.data(), k.data(), v.data(), out.data(), 1, 2, 3, 2, g, three); },
      fn + "states has 3 states, expected batch * heads = 2");
  std::vector<RetentionState<double>> wrong(2, RetentionState<double>(2, 2));
  expect_shape_error(
      [&] { multi_head_step(q.data(), k.data(), v.data(), out.data(), 1, 2, 3, 2, g, wrong); },
      fn + "states[0].S is [2 x 2], expected [3 x 2]");
  // The states are untouched by a rejected call.
  for (const auto& x : st) EXPECT_EQ(x.position, 0);
}

}  // namespace
