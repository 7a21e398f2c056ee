// retention-test-links: compiled
// State hand-off (SPEC 2): a prefix in one form and the rest from the returned state in any other
// form equals one pass; the final state may alias the initial one; retention_step is the recurrent
// form one token at a time; a double state for float inputs; the state's own checks.
#include <retention/chunkwise.hpp>
#include <retention/decay.hpp>
#include <retention/parallel.hpp>
#include <retention/recurrent.hpp>
#include <retention/state.hpp>

#include "reference/retention_reference.hpp"
#include "support/state_support.hpp"
#include "support/test_support.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <iostream>
#include <string>
#include <vector>

namespace {

using retention_test::to_state;

using retention_test::ScalarName;

namespace ref = retention_reference;
using retention::CausalDecay;
using retention::Form;
using retention::Index;
using retention::Matrix;
using retention::Normalization;
using retention::RetentionOptions;
using retention::RetentionState;
using retention_test::expect_shape_error;
using retention_test::random_matrix;
using retention_test::relative_error;
using retention_test::spec_tolerance;

const Form kForms[] = {Form::parallel, Form::recurrent, Form::chunkwise};
// These tests run thousands of small products: Eigen's own OpenMP GEMM threading only adds
const Normalization kNormalizations[] = {Normalization::none, Normalization::decay,
                                         Normalization::decay_and_score};

/// One call of `form` on rows [begin, begin + len) with state scalar S.
template <class S, class T>
Matrix<T> run_form(Form form, const Matrix<T>& Q, const Matrix<T>& K, const Matrix<T>& V,
                   Index begin, Index len, const CausalDecay& decay, Index chunk,
                   const RetentionOptions<S>& opt) {
  const auto q = Q.middleRows(begin, len);
  const auto k = K.middleRows(begin, len);
  const auto v = V.middleRows(begin, len);
  switch (form) {
    case Form::parallel:
      return retention::parallel_retention(q, k, v, decay, opt);
    case Form::recurrent:
      return retention::recurrent_retention(q, k, v, decay, opt);
    case Form::chunkwise:
      break;
  }
  return retention::chunkwise_retention(q, k, v, decay, chunk, opt);
}

struct Inputs {
  Matrix<double> Q, K, V;
  ref::State init;
};

/// Float-representable inputs (shared by the float and double runs), scaled so that
/// decay_and_score takes both branches.
Inputs make_inputs(Index T, Index dk, Index dv, std::uint64_t seed) {
  Inputs in;
  const double s = std::sqrt(3.0 / std::sqrt(static_cast<double>(dk)));
  in.Q = random_matrix<float>(T, dk, seed, s).cast<double>();
  in.K = random_matrix<float>(T, dk, seed + 1, s).cast<double>();
  in.V = random_matrix<float>(T, dv, seed + 2).cast<double>();
  in.init.S = random_matrix<float>(dk, dv, seed + 3, 2.0).cast<double>();
  in.init.z = random_matrix<float>(dk, 1, seed + 4, 2.0).cast<double>();
  in.init.position = 13;
  return in;
}

template <class T>
class RetentionStateTest : public ::testing::Test {};
TYPED_TEST_SUITE(RetentionStateTest, retention_test::ScalarTypes, ScalarName);

// All 9 (prefix form, rest form) pairs, several split points, every normalisation, with and
// without a state carried into the prefix; positions carry over.
TYPED_TEST(RetentionStateTest, HandOffBetweenAnyTwoFormsEqualsOnePass) {
  using T = TypeParam;
  const Index len = 40, dk = 5, dv = 3, chunk = 7;
  const Inputs in = make_inputs(len, dk, dv, 11);
  const Matrix<T> Q = in.Q.cast<T>(), K = in.K.cast<T>(), V = in.V.cast<T>();
  for (double gamma : {0.9, 1.0 - 1.0 / 256}) {
    const CausalDecay decay(gamma);
    for (bool with_init : {false, true}) {
      const ref::State* init = with_init ? &in.init : nullptr;
      const ref::Raw raw = ref::raw(in.Q, in.K, in.V, gamma, init);
      const RetentionState<T> init_state = to_state<T>(in.init);
      for (Normalization norm : kNormalizations) {
        const Matrix<double> expected = ref::normalize(raw, norm);
        for (Form first : kForms)
          for (Form second : kForms)
            for (Index split : {Index(1), Index(7), Index(20), len - 1}) {
              const std::string what = std::string(retention::to_string(first)) + " then " +
                                       retention::to_string(second) + " at " +
                                       std::to_string(split) + " " + retention::to_string(norm) +
                                       (with_init ? " from a state" : "");
              RetentionState<T> mid, fin;
              RetentionOptions<T> o1;
              o1.normalization = norm;
              o1.initial_state = with_init ? &init_state : nullptr;
              o1.final_state = &mid;
              Matrix<T> out(len, dv);
              out.topRows(split) = run_form<T>(first, Q, K, V, 0, split, decay, chunk, o1);
              EXPECT_EQ(mid.position, (with_init ? in.init.position : 0) + split) << what;
              RetentionOptions<T> o2;
              o2.normalization = norm;
              o2.initial_state = &mid;
              o2.final_state = &fin;
              out.bottomRows(len - split) =
                  run_form<T>(second, Q, K, V, split, len - split, decay, chunk, o2);
              EXPECT_LE(relative_error(out, expected), spec_tolerance<T>()) << what;
              EXPECT_LE(relative_error(fin.S, raw.final_state.S), spec_tolerance<T>()) << what;
              EXPECT_LE(relative_error(fin.z, raw.final_state.z), spec_tolerance<T>()) << what;
              EXPECT_EQ(fin.position, raw.final_state.position) << what;
            }
      }
    }
  }
}

// Three calls in three forms, the middle one a single token (a decode step between prefills).
TYPED_TEST(RetentionStateTest, ThreeSegmentsThroughThreeForms) {
  using T = TypeParam;
  const Index len = 33, dk = 4, dv = 6;
  const Inputs in = make_inputs(len, dk, dv, 21);
  const Matrix<T> Q = in.Q.cast<T>(), K = in.K.cast<T>(), V = in.V.cast<T>();
  const double gamma = 0.96875;
  const CausalDecay decay(gamma);
  const Matrix<double> expected =
      ref::retention(in.Q, in.K, in.V, gamma, Normalization::decay_and_score, &in.init);
  RetentionState<T> st = to_state<T>(in.init);
  RetentionOptions<T> opt;
  opt.normalization = Normalization::decay_and_score;
  opt.initial_state = &st;
  opt.final_state = &st;  // aliasing: each call continues the same state object
  Matrix<T> out(len, dv);
  out.topRows(16) = run_form<T>(Form::chunkwise, Q, K, V, 0, 16, decay, 5, opt);
  out.row(16) = retention::retention_step(Q.row(16), K.row(16), V.row(16), decay, st,
                                          Normalization::decay_and_score);
  out.bottomRows(16) = run_form<T>(Form::parallel, Q, K, V, 17, 16, decay, 5, opt);
  EXPECT_LE(relative_error(out, expected), spec_tolerance<T>());
  EXPECT_EQ(st.position, in.init.position + len);
}

// final_state may point to *initial_state: the result equals the non-aliased call.
TYPED_TEST(RetentionStateTest, FinalStateMayAliasInitialState) {
  using T = TypeParam;
  const Index len = 19, dk = 3, dv = 4;
  const Inputs in = make_inputs(len, dk, dv, 31);
  const Matrix<T> Q = in.Q.cast<T>(), K = in.K.cast<T>(), V = in.V.cast<T>();
  const CausalDecay decay(0.8);
  for (Form form : kForms)
    for (Normalization norm : kNormalizations) {
      const RetentionState<T> init = to_state<T>(in.init);
      RetentionState<T> separate;
      RetentionOptions<T> o1;
      o1.normalization = norm;
      o1.initial_state = &init;
      o1.final_state = &separate;
      const Matrix<T> expected = run_form<T>(form, Q, K, V, 0, len, decay, 4, o1);

      RetentionState<T> shared = init;
      RetentionOptions<T> o2;
      o2.normalization = norm;
      o2.initial_state = &shared;
      o2.final_state = &shared;
      const Matrix<T> out = run_form<T>(form, Q, K, V, 0, len, decay, 4, o2);
      EXPECT_EQ(out, expected) << retention::to_string(form);
      EXPECT_EQ(shared.S, separate.S) << retention::to_string(form);
      EXPECT_EQ(shared.z, separate.z) << retention::to_string(form);
      EXPECT_EQ(shared.position, init.position + len) << retention::to_string(form);
    }
}

// retention_step in a loop is the recurrent form, and decodes correctly after a parallel prefill.
TYPED_TEST(RetentionStateTest, StepLoopEqualsRecurrentAndDecodesAfterPrefill) {
  using T = TypeParam;
  const Index len = 29, dk = 6, dv = 2;
  const Inputs in = make_inputs(len, dk, dv, 41);
  const Matrix<T> Q = in.Q.cast<T>(), K = in.K.cast<T>(), V = in.V.cast<T>();
  for (double gamma : {0.5, 0.9921875, 1.0}) {
    const CausalDecay decay(gamma);
    for (Normalization norm : kNormalizations) {
      const RetentionState<T> init = to_state<T>(in.init);
      RetentionState<T> rec_final;
      RetentionOptions<T> opt;
      opt.normalization = norm;
      opt.initial_state = &init;
      opt.final_state = &rec_final;
      const Matrix<T> rec = retention::recurrent_retention(Q, K, V, decay, opt);

      RetentionState<T> st = init;
      Matrix<T> steps(len, dv);
      for (Index t = 0; t < len; ++t)
        steps.row(t) = retention::retention_step(Q.row(t), K.row(t), V.row(t), decay, st, norm);
      EXPECT_LE(relative_error(steps, rec), spec_tolerance<T>())
          << gamma << " " << retention::to_string(norm);
      EXPECT_LE(relative_error(st.S, rec_final.S), spec_tolerance<T>());
      EXPECT_LE(relative_error(st.z, rec_final.z), spec_tolerance<T>());
      EXPECT_EQ(st.position, rec_final.position);

      // Prefill 20 tokens in parallel, then decode the rest one step at a time.
      const Matrix<double> expected = ref::retention(in.Q, in.K, in.V, gamma, norm, &in.init);
      RetentionState<T> dec;
      RetentionOptions<T> pre;
      pre.normalization = norm;
      pre.initial_state = &init;
      pre.final_state = &dec;
      Matrix<T> out(len, dv);
      out.topRows(20) =
          retention::parallel_retention(Q.topRows(20), K.topRows(20), V.topRows(20), decay, pre);
      for (Index t = 20; t < len; ++t)
        out.row(t) = retention::retention_step(Q.row(t), K.row(t), V.row(t), decay, dec, norm);
      EXPECT_LE(relative_error(out, expected), spec_tolerance<T>())
          << gamma << " " << retention::to_string(norm);
    }
  }
}

// T = 1 and dims of 1 through every form, with a state.
TYPED_TEST(RetentionStateTest, SingleTokenAndUnitDims) {
  using T = TypeParam;
  const Inputs in = make_inputs(1, 1, 1, 51);
  const Matrix<T> Q = in.Q.cast<T>(), K = in.K.cast<T>(), V = in.V.cast<T>();
  for (double gamma : {0.5, 1.0}) {
    const CausalDecay decay(gamma);
    ref::State ref_final;
    const Matrix<double> expected = ref::retention(
        in.Q, in.K, in.V, gamma, Normalization::decay_and_score, &in.init, &ref_final);
    const RetentionState<T> init = to_state<T>(in.init);
    for (Form form : kForms) {
      RetentionState<T> fin;
      RetentionOptions<T> opt;
      opt.normalization = Normalization::decay_and_score;
      opt.initial_state = &init;
      opt.final_state = &fin;
      EXPECT_LE(relative_error(run_form<T>(form, Q, K, V, 0, 1, decay, 3, opt), expected),
                spec_tolerance<T>());
      EXPECT_LE(relative_error(fin.S, ref_final.S), spec_tolerance<T>());
      EXPECT_EQ(fin.position, in.init.position + 1);
    }
  }
}

// A double state for float inputs (SPEC 1's wider accumulator): for a head whose per-step factor
// float cannot apply (gamma = 1 - 2^-24 and 1 - 2^-26), every form with a double state meets 1e-5
// over 3,000 tokens, and states hand off between forms.
TEST(WideState, DoubleStateForFloatInputs) {
  const Index len = 3000, dk = 4, dv = 4;
  const Inputs in = make_inputs(len, dk, dv, 61);
  const Matrix<float> Q = in.Q.cast<float>(), K = in.K.cast<float>(), V = in.V.cast<float>();
  for (double gamma : {1.0 - std::ldexp(1.0, -24), 1.0 - std::ldexp(1.0, -26)}) {
    const CausalDecay decay(gamma);
    ref::State ref_final;
    const Matrix<double> expected =
        ref::retention(in.Q, in.K, in.V, gamma, Normalization::decay, &in.init, &ref_final);
    const RetentionState<double> init = to_state<double>(in.init);
    for (Form form : kForms) {
      RetentionState<double> fin;
      RetentionOptions<double> opt;
      opt.normalization = Normalization::decay;
      opt.initial_state = &init;
      opt.final_state = &fin;
      const Matrix<float> out = run_form<double>(form, Q, K, V, 0, len, decay, 16, opt);
      EXPECT_LE(relative_error(out, expected), 1e-5) << retention::to_string(form) << " " << gamma;
      EXPECT_LE(relative_error(fin.S, ref_final.S), 1e-5) << retention::to_string(form);
      EXPECT_LE(relative_error(fin.z, ref_final.z), 1e-5) << retention::to_string(form);
      // The float state for comparison (not asserted: SPEC 1 allows it to drift).
      RetentionState<float> init_f = to_state<float>(in.init);
      RetentionOptions<float> of;
      of.normalization = Normalization::decay;
      of.initial_state = &init_f;
      std::cout << "[wide state] gamma 1-" << 1.0 - gamma << " " << retention::to_string(form)
                << ": float state "
                << relative_error(run_form<float>(form, Q, K, V, 0, len, decay, 16, of), expected)
                << ", double state " << relative_error(out, expected) << "\n";
    }
    // Hand-off with a double state: recurrent prefix, chunkwise rest.
    RetentionState<double> mid;
    RetentionOptions<double> o1;
    o1.normalization = Normalization::decay;
    o1.initial_state = &init;
    o1.final_state = &mid;
    Matrix<float> out(len, dv);
    out.topRows(1234) = run_form<double>(Form::recurrent, Q, K, V, 0, 1234, decay, 16, o1);
    RetentionOptions<double> o2;
    o2.normalization = Normalization::decay;
    o2.initial_state = &mid;
    out.bottomRows(len - 1234) =
        run_form<double>(Form::chunkwise, Q, K, V, 1234, len - 1234, decay, 64, o2);
    EXPECT_LE(relative_error(out, expected), 1e-5);
  }
}

TEST(RetentionStateBasics, ConstructionResetAndChecks) {
  RetentionState<float> st(3, 5);
  EXPECT_EQ(st.key_dim(), 3);
  EXPECT_EQ(st.value_dim(), 5);
  EXPECT_EQ(st.position, 0);
  EXPECT_EQ(st.bytes(), (3u * 5u + 3u) * sizeof(float));
  EXPECT_TRUE(st.S.isZero(0) && st.z.isZero(0));
  st.S.setConstant(2.0f);
  st.z.setConstant(1.0f);
  st.position = 9;
  st.reset();
  EXPECT_TRUE(st.S.isZero(0) && st.z.isZero(0));
  EXPECT_EQ(st.position, 0);
  EXPECT_EQ(st.key_dim(), 3);
  expect_shape_error([] { RetentionState<double> s(0, 3); },
                     "RetentionState: dk must be >= 1, got 0");
  expect_shape_error([] { RetentionState<double> s(2, 0); },
                     "RetentionState: dv must be >= 1, got 0");
  // Negative sizes are rejected before anything is allocated.
  expect_shape_error([] { RetentionState<double> s(2, -1); },
                     "RetentionState: dv must be >= 1, got -1");
  expect_shape_error([] { RetentionState<float> s(-4, 2); },
                     "RetentionState: dk must be >= 1, got -4");
}

// A final state of any prior shape is overwritten with the right one.
TEST(RetentionStateBasics, FinalStateIsResized) {
  const Matrix<double> Q = random_matrix<double>(5, 3, 71), K = random_matrix<double>(5, 3, 72);
  const Matrix<double> V = random_matrix<double>(5, 2, 73);
  for (Form form : kForms) {
    RetentionState<double> fin(7, 7);
    fin.position = 100;
    RetentionOptions<double> opt;
    opt.final_state = &fin;
    run_form<double>(form, Q, K, V, 0, 5, CausalDecay(0.9), 2, opt);
    EXPECT_EQ(fin.S.rows(), 3);
    EXPECT_EQ(fin.S.cols(), 2);
    EXPECT_EQ(fin.z.size(), 3);
    EXPECT_EQ(fin.position, 5);
  }
}

}  // namespace

// retention_step accepts any 1 x n expression, including rows of column-major matrices, which
// allow no linear access: the step must index them as (0, i).
TEST(RetentionStateBasics, StepTakesRowsOfColumnMajorMatrices) {
  const Eigen::MatrixXd Q = random_matrix<double>(6, 3, 91), K = random_matrix<double>(6, 3, 92);
  const Eigen::MatrixXd V = random_matrix<double>(6, 2, 93);
  const retention::CausalDecay decay(0.875);
  RetentionState<double> st(3, 2);
  Matrix<double> stepped(6, 2);
  for (Index t = 0; t < 6; ++t)
    stepped.row(t) = retention::retention_step(Q.row(t), K.row(t), V.row(t), decay, st);
  const Matrix<double> expected = retention::recurrent_retention(Q, K, V, decay);
  EXPECT_LE(relative_error(stepped, expected), 1e-15);
  EXPECT_EQ(st.position, 6);
}
