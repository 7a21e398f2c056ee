// retention-test-links: compiled
// ViR batched decoding (docs/math.md §5, §2.3): VirRetention::step_batch decodes B sequences in one
// call, each at its own position with its own per-head states. Checked against B single-sequence
// step() calls (outputs and states) and against the naive double reference of MHR over each whole
// sequence (tests/reference/vir_reference.hpp); sequences joining (empty states = first token) and
// leaving between calls with one reused workspace; every bad argument is a shape_error naming the
// function and the argument, and leaves every state unchanged.
#include <retention/layers/vir.hpp>

#include "reference/vir_reference.hpp"
#include "support/test_support.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <iomanip>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace {

using retention::Index;
using retention::Matrix;
using retention::VirRetention;
using retention_test::expect_shape_error;
using retention_test::random_matrix;
using retention_test::relative_error;
using retention_test::spec_tolerance;
namespace ref = vir_reference;

constexpr Index kDim = 24, kHeads = 3;

std::string sci(double x) {
  std::ostringstream s;
  s << std::scientific << std::setprecision(2) << x;
  return s.str();
}

/// Random MHR parameters under "blocks.0.retention." (the reference's prefix "blocks.0."), values
/// representable in T so that the double reference sees the weights the layer holds.
template <class T>
ref::Params random_params(std::uint64_t seed) {
  const std::vector<std::pair<std::string, std::vector<Index>>> shapes = {
      {"blocks.0.retention.qkv.weight", {3 * kDim, kDim}},
      {"blocks.0.retention.qkv.bias", {3 * kDim}},
      {"blocks.0.retention.out_proj.weight", {kDim, kDim}},
      {"blocks.0.retention.out_proj.bias", {kDim}}};
  ref::Params P;
  for (const auto& [name, shape] : shapes) {
    Index n = 1;
    for (Index s : shape) n *= s;
    const Matrix<T> r = random_matrix<T>(1, n, seed++, 0.4);
    std::vector<double> v(static_cast<std::size_t>(n));
    for (Index i = 0; i < n; ++i) v[static_cast<std::size_t>(i)] = static_cast<double>(r(0, i));
    P[name] = ref::Param{shape, v};
  }
  return P;
}

template <class T>
VirRetention<T> make_layer(const ref::Params& P) {
  retention::ParameterMap m;
  for (const auto& [name, p] : P) m.add(name, p.values.data(), p.shape);
  VirRetention<T> layer(kDim, kHeads);
  layer.load(m, "blocks.0.retention.");
  return layer;
}

ref::Config ref_config() {
  ref::Config c;
  c.dim = kDim;
  c.heads = kHeads;
  return c;
}

/// Worst relative error between two per-head state vectors (S and z), +inf on a shape or position
/// mismatch.
template <class T>
double state_error(const std::vector<retention::RetentionState<T>>& a,
                   const std::vector<retention::RetentionState<T>>& b) {
  if (a.size() != b.size()) return 1e300;
  double worst = 0.0;
  for (std::size_t h = 0; h < a.size(); ++h) {
    if (a[h].position != b[h].position) return 1e300;
    worst = std::max(worst, relative_error(a[h].S, b[h].S));
    worst = std::max(worst, relative_error(a[h].z, b[h].z));
  }
  return worst;
}

template <class T>
class VirBatchedStep : public ::testing::Test {};
TYPED_TEST_SUITE(VirBatchedStep, retention_test::ScalarTypes, retention_test::ScalarName);

// 8 sequences with 0..7 earlier tokens (in shuffled order) advance together for 4 calls: every call
// equals 8 step() calls, outputs and states, and each sequence's outputs equal the reference rows
// of its whole sequence; with threads = 1 and 2 (this small work stays on one thread by the thread
// rule; ThreadedBatchEqualsSingleSteps has a team).
TYPED_TEST(VirBatchedStep, DifferentPositionsEqualSingleSteps) {
  using T = TypeParam;
  using State = typename VirRetention<T>::State;
  const double tol = spec_tolerance<T>();
  const ref::Params P = random_params<T>(11);
  const VirRetention<T> layer = make_layer<T>(P);
  const std::vector<Index> history = {3, 0, 7, 1, 5, 2, 6, 4};
  const Index B = static_cast<Index>(history.size()), calls = 4;
  for (int threads : {1, 2}) {
    std::vector<Matrix<T>> xs;
    std::vector<std::vector<State>> batched(static_cast<std::size_t>(B)), single;
    std::vector<Matrix<T>> outputs;  // step() outputs, the whole sequence
    for (Index b = 0; b < B; ++b) {
      const Index len = history[static_cast<std::size_t>(b)] + calls;
      xs.push_back(random_matrix<T>(len, kDim, 100 + static_cast<std::uint64_t>(b)));
      outputs.push_back(Matrix<T>(len, kDim));
      for (Index t = 0; t < history[static_cast<std::size_t>(b)]; ++t)
        outputs.back().row(t) = layer.step(xs.back().row(t), batched[static_cast<std::size_t>(b)]);
    }
    single = batched;
    std::vector<std::vector<State>*> ptrs;
    for (auto& s : batched) ptrs.push_back(&s);
    typename VirRetention<T>::BatchWorkspace work;
    double worst_single = 0.0, worst_state = 0.0;
    for (Index c = 0; c < calls; ++c) {
      Matrix<T> x(B, kDim), y(B, kDim);
      for (Index b = 0; b < B; ++b)
        x.row(b) = xs[static_cast<std::size_t>(b)].row(history[static_cast<std::size_t>(b)] + c);
      layer.step_batch(x, ptrs, y, work, threads);
      for (Index b = 0; b < B; ++b) {
        const auto sb = static_cast<std::size_t>(b);
        const Matrix<T> one = layer.step(x.row(b), single[sb]);
        worst_single = std::max(worst_single, relative_error(y.row(b), one));
        worst_state = std::max(worst_state, state_error(batched[sb], single[sb]));
        outputs[sb].row(history[sb] + c) = y.row(b);
      }
    }
    EXPECT_LE(worst_single, tol) << "threads " << threads;
    EXPECT_LE(worst_state, tol) << "threads " << threads;
    double worst_ref = 0.0;
    for (Index b = 0; b < B; ++b) {
      const auto sb = static_cast<std::size_t>(b);
      EXPECT_EQ(batched[sb][0].position, history[sb] + calls);
      const Matrix<double> expected =
          ref::mhr(xs[sb].template cast<double>(), P, "blocks.0.", ref_config());
      const double err = relative_error(outputs[sb], expected);
      EXPECT_LE(err, tol) << "sequence " << b;
      worst_ref = std::max(worst_ref, err);
    }
    const std::string t = "_threads" + std::to_string(threads);
    ::testing::Test::RecordProperty("rel_err_vs_step" + t, sci(worst_single));
    ::testing::Test::RecordProperty("rel_err_state" + t, sci(worst_state));
    ::testing::Test::RecordProperty("rel_err_vs_reference" + t, sci(worst_ref));
  }
}

// A batch whose membership changes every call, with one reused workspace: sequences join with
// empty states (their first token) or after a single-sequence prefill, and leave when done. Each
// sequence's outputs equal the reference over its tokens; the Matrix-returning overload agrees.
TYPED_TEST(VirBatchedStep, SequencesJoinAndLeave) {
  using T = TypeParam;
  using State = typename VirRetention<T>::State;
  const double tol = spec_tolerance<T>();
  const ref::Params P = random_params<T>(23);
  const VirRetention<T> layer = make_layer<T>(P);
  // Sequence s is in the batch for calls [join, join + len - prefix); tokens before `prefix` run
  // through forward() with states before it joins.
  struct Plan {
    Index join, len, prefix;
  };
  const std::vector<Plan> plans = {{0, 6, 0}, {0, 3, 0}, {1, 7, 2}, {2, 1, 0},
                                   {2, 5, 4}, {4, 4, 0}, {5, 2, 1}, {7, 1, 0}};
  const std::size_t S = plans.size();
  std::vector<Matrix<T>> xs, outs;
  std::vector<std::vector<State>> states(S);
  std::vector<Index> next(S);
  for (std::size_t s = 0; s < S; ++s) {
    xs.push_back(random_matrix<T>(plans[s].len, kDim, 300 + s));
    outs.push_back(Matrix<T>(plans[s].len, kDim));
    next[s] = plans[s].prefix;
    if (plans[s].prefix > 0) {
      retention::VirOptions o;
      o.form = retention::Form::chunkwise;
      o.chunk = 2;
      outs[s].topRows(plans[s].prefix) =
          layer.forward(xs[s].topRows(plans[s].prefix), o, &states[s]);
    }
  }
  typename VirRetention<T>::BatchWorkspace work;
  std::set<Index> sizes_seen;
  for (Index call = 0;; ++call) {
    std::vector<std::vector<State>*> ptrs;
    std::vector<std::size_t> members;
    for (std::size_t s = 0; s < S; ++s)
      if (call >= plans[s].join && next[s] < plans[s].len) {
        ptrs.push_back(&states[s]);
        members.push_back(s);
      }
    if (ptrs.empty()) {
      bool pending = false;
      for (std::size_t s = 0; s < S; ++s) pending = pending || next[s] < plans[s].len;
      if (!pending) break;
      continue;
    }
    const Index B = static_cast<Index>(ptrs.size());
    sizes_seen.insert(B);
    Matrix<T> x(B, kDim), y(B, kDim);
    for (Index b = 0; b < B; ++b)
      x.row(b) =
          xs[members[static_cast<std::size_t>(b)]].row(next[members[static_cast<std::size_t>(b)]]);
    if (call % 2 == 0) {
      layer.step_batch(x, ptrs, y, work);
    } else {
      // The allocating overload, on copies of the states: it must agree with the workspace one.
      std::vector<std::vector<State>> copies;
      for (auto* p : ptrs) copies.push_back(*p);
      std::vector<std::vector<State>*> copy_ptrs;
      for (auto& c : copies) copy_ptrs.push_back(&c);
      const Matrix<T> y2 = layer.step_batch(x, copy_ptrs);
      layer.step_batch(x, ptrs, y, work);
      EXPECT_LE(relative_error(y2, y), tol) << "call " << call;
    }
    for (Index b = 0; b < B; ++b) {
      const std::size_t s = members[static_cast<std::size_t>(b)];
      outs[s].row(next[s]++) = y.row(b);
    }
    ASSERT_LT(call, 100);
  }
  double worst_ref = 0.0;
  EXPECT_GT(sizes_seen.size(), 2u) << "the batch size should change";
  for (std::size_t s = 0; s < S; ++s) {
    const Matrix<double> expected =
        ref::mhr(xs[s].template cast<double>(), P, "blocks.0.", ref_config());
    const double err = relative_error(outs[s], expected);
    EXPECT_LE(err, tol) << "sequence " << s;
    worst_ref = std::max(worst_ref, err);
    ASSERT_EQ(static_cast<Index>(states[s].size()), kHeads);
    EXPECT_EQ(states[s][0].position, plans[s].len);
  }
  ::testing::Test::RecordProperty("rel_err_vs_reference", sci(worst_ref));
}

// B = 1 with a dimension-1 head (dim = heads = 3) and gamma = 1: equal to step().
TYPED_TEST(VirBatchedStep, SingleSequenceHeadDimOneGammaOne) {
  using T = TypeParam;
  VirRetention<T> layer(3, 3, {1.0, 0.5, 0.9});
  const Matrix<T> wqkv = random_matrix<T>(9, 3, 41), wo = random_matrix<T>(3, 3, 42);
  const Matrix<T> bqkv = random_matrix<T>(1, 9, 43), bo = random_matrix<T>(1, 3, 44);
  retention::ParameterMap m;
  m.add("qkv.weight", wqkv.data(), {9, 3});
  m.add("qkv.bias", bqkv.data(), {9});
  m.add("out_proj.weight", wo.data(), {3, 3});
  m.add("out_proj.bias", bo.data(), {3});
  layer.load(m);
  std::vector<typename VirRetention<T>::State> a, b;
  const Matrix<T> x = random_matrix<T>(5, 3, 45);
  for (Index t = 0; t < x.rows(); ++t) {
    const Matrix<T> y = layer.step_batch(x.row(t), {&a});
    const Matrix<T> one = layer.step(x.row(t), b);
    EXPECT_LE(relative_error(y, one), spec_tolerance<T>()) << "t " << t;
  }
  EXPECT_LE(state_error(a, b), spec_tolerance<T>());
}

// Heads of dim 256: the B * heads state updates are enough work for a team of two threads (the
// thread rule, detail/threading.hpp); the result equals single-sequence steps.
TYPED_TEST(VirBatchedStep, ThreadedBatchEqualsSingleSteps) {
  using T = TypeParam;
  using State = typename VirRetention<T>::State;
  const Index C = 512, H = 2, B = 16;
  VirRetention<T> layer(C, H);
  const Matrix<T> wqkv = random_matrix<T>(3 * C, C, 71, 0.05),
                  wo = random_matrix<T>(C, C, 72, 0.05);
  const Matrix<T> bqkv = random_matrix<T>(1, 3 * C, 73), bo = random_matrix<T>(1, C, 74);
  retention::ParameterMap m;
  m.add("qkv.weight", wqkv.data(), {3 * C, C});
  m.add("qkv.bias", bqkv.data(), {3 * C});
  m.add("out_proj.weight", wo.data(), {C, C});
  m.add("out_proj.bias", bo.data(), {C});
  layer.load(m);
  std::vector<std::vector<State>> batched(static_cast<std::size_t>(B)), single;
  for (Index b = 0; b < B; ++b) {
    const Matrix<T> hist = random_matrix<T>(b % 3, C, 80 + static_cast<std::uint64_t>(b));
    for (Index t = 0; t < hist.rows(); ++t)
      layer.step(hist.row(t), batched[static_cast<std::size_t>(b)]);
  }
  single = batched;
  std::vector<std::vector<State>*> ptrs;
  for (auto& s : batched) ptrs.push_back(&s);
  typename VirRetention<T>::BatchWorkspace work;
  double worst = 0.0;
  for (Index call = 0; call < 2; ++call) {
    const Matrix<T> x = random_matrix<T>(B, C, 90 + static_cast<std::uint64_t>(call));
    Matrix<T> y(B, C);
    layer.step_batch(x, ptrs, y, work, 2);
    for (Index b = 0; b < B; ++b) {
      const auto sb = static_cast<std::size_t>(b);
      worst = std::max(worst, relative_error(y.row(b), layer.step(x.row(b), single[sb])));
      worst = std::max(worst, state_error(batched[sb], single[sb]));
    }
  }
  EXPECT_LE(worst, spec_tolerance<T>());
  ::testing::Test::RecordProperty("rel_err_vs_step", sci(worst));
}

// Every bad argument: shape_error naming the function and the argument; no state changes.
TEST(VirBatchedStepErrors, BadArgumentsLeaveStatesUnchanged) {
  using State = VirRetention<double>::State;
  const ref::Params P = random_params<double>(61);
  const VirRetention<double> layer = make_layer<double>(P);
  std::vector<State> s0, s1, fresh;
  const Matrix<double> hist = random_matrix<double>(4, kDim, 62);
  for (Index t = 0; t < 4; ++t) layer.step(hist.row(t), s0);
  layer.step(hist.row(0), s1);
  const std::vector<State> s0_before = s0, s1_before = s1;
  VirRetention<double>::BatchWorkspace work;
  const Matrix<double> x2 = random_matrix<double>(2, kDim, 63);
  Matrix<double> y2(2, kDim);
  const std::string fn = "VirRetention::step_batch";
  auto unchanged = [&](const std::string& what) {
    EXPECT_EQ(state_error(s0, s0_before), 0.0) << what;
    EXPECT_EQ(state_error(s1, s1_before), 0.0) << what;
    EXPECT_TRUE(fresh.empty()) << what;
  };
  expect_shape_error([&] { layer.step_batch(x2, {&s0, &s1, &fresh}, y2, work); }, fn + ": x");
  unchanged("batch mismatch");
  expect_shape_error([&] { layer.step_batch(x2.row(0), {&s0, &s1}); }, fn + ": x");
  unchanged("one row for two states");
  expect_shape_error([&] { layer.step_batch(Matrix<double>(0, kDim), {}); }, "states.size()");
  expect_shape_error([&] { layer.step_batch(x2.leftCols(kDim - 1), {&s0, &s1}); }, "x");
  unchanged("wrong width");
  Matrix<double> y_bad(3, kDim);
  expect_shape_error([&] { layer.step_batch(x2, {&s0, &s1}, y_bad, work); }, fn + ": y");
  unchanged("bad y");
  expect_shape_error([&] { layer.step_batch(x2, {&s0, nullptr}, y2, work); }, "states[1] is null");
  unchanged("null");
  expect_shape_error(
      [&] {
        layer.step_batch(x2, {&s1, &s1}, y2, work);
      },
      "holds the same state twice");
  unchanged("duplicate");
  expect_shape_error([&] { layer.step_batch(x2, {&fresh, &s0}, y2, work, -1); }, "threads");
  unchanged("threads");
  // A sequence with the wrong number of heads, or a head of the wrong shape or position: the
  // other (valid, earlier) sequence must not advance either.
  std::vector<State> two_heads(2, State(kDim / kHeads, kDim / kHeads));
  expect_shape_error(
      [&] {
        layer.step_batch(x2, {&s0, &two_heads}, y2, work);
      },
      "states[1] has 2 entries, expected heads = 3");
  unchanged("head count");
  std::vector<State> bad_shape = s1_before;
  bad_shape[2].S.resize(kDim / kHeads, 3);
  expect_shape_error(
      [&] {
        layer.step_batch(x2, {&fresh, &bad_shape}, y2, work);
      },
      "states[1][2].S");
  std::vector<State> bad_pos = s1_before;
  bad_pos[1].position = -1;
  expect_shape_error(
      [&] {
        layer.step_batch(x2, {&s0, &bad_pos}, y2, work);
      },
      "states[1][1].position");
  unchanged("bad state");
  // After all the failures the workspace and states still serve a correct call.
  layer.step_batch(x2, {&s0, &s1}, y2, work);
  std::vector<State> c0 = s0_before, c1 = s1_before;
  EXPECT_LE(relative_error(y2.row(0), layer.step(x2.row(0), c0)), 1e-12);
  EXPECT_LE(relative_error(y2.row(1), layer.step(x2.row(1), c1)), 1e-12);
}

}  // namespace
