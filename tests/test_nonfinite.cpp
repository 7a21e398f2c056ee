// retention-test-links: compiled
// Non-finite inputs propagate forward only (issue 15 #1): with an Inf or a NaN in token t of Q, K
// or V, rows < t of every form are finite and equal to the recurrent form's rows (and to the
// reference on the clean prefix); chunk and tile sizes around t, every normalisation, float and
// double, with and without a (wider) initial state. A non-finite entry of the initial state only
// reaches what depends on it. The parallel form's MXCSR guard keeps FE_INVALID raised inside it.
#include <retention/chunkwise.hpp>
#include <retention/decay.hpp>
#include <retention/parallel.hpp>
#include <retention/recurrent.hpp>

#include "reference/retention_reference.hpp"
#include "support/test_support.hpp"

#include <gtest/gtest.h>

#include <cfenv>
#include <cmath>
#include <iostream>
#include <limits>
#include <string>
#include <vector>

namespace {

namespace ref = retention_reference;
using retention::CausalDecay;
using retention::Index;
using retention::Matrix;
using retention::Normalization;
using retention::RetentionOptions;
using retention::RetentionState;
using retention_test::random_matrix;
using retention_test::relative_error;
using retention_test::ScalarName;
using retention_test::spec_tolerance;

/// One form run on the given inputs.
struct FormRun {
  std::string name;
  Index chunk = 0;  // chunkwise when > 0
  Index tile = -1;  // parallel when >= 0
};

std::vector<FormRun> forms_around(Index t, Index T) {
  std::vector<FormRun> f;
  f.push_back({"recurrent", 0, -1});
  for (Index tile : {Index(0), Index(1), Index(2), Index(3), Index(4), t, t + 1, T})
    if (tile >= 0) f.push_back({"parallel tile " + std::to_string(tile), 0, tile});
  for (Index c : {Index(1), Index(2), Index(3), Index(8), Index(64), t - 1, t, t + 1, T})
    if (c >= 1) f.push_back({"chunkwise chunk " + std::to_string(c), c, -1});
  return f;
}

template <class T, class S>
Matrix<T> run_form(const FormRun& f, const Matrix<T>& Q, const Matrix<T>& K, const Matrix<T>& V,
                   const CausalDecay& decay, const RetentionOptions<S>& base) {
  RetentionOptions<S> o = base;
  if (f.chunk > 0) return retention::chunkwise_retention(Q, K, V, decay, f.chunk, o);
  if (f.tile >= 0) {
    o.tile = f.tile;
    return retention::parallel_retention(Q, K, V, decay, o);
  }
  return retention::recurrent_retention(Q, K, V, decay, o);
}

template <class T>
class NonFinite : public ::testing::Test {};
TYPED_TEST_SUITE(NonFinite, retention_test::ScalarTypes, ScalarName);

/// Rows < t of every form equal the recurrent form's and the clean reference's, and are finite;
/// S is the state's scalar (T, or double for float inputs: the wide-state path).
template <class T, class S>
void check_forward_only(Index len, Index dk, Index dv, bool with_state, double gamma) {
  const CausalDecay decay(gamma);
  const T bad_values[] = {std::numeric_limits<T>::infinity(), -std::numeric_limits<T>::infinity(),
                          std::numeric_limits<T>::quiet_NaN()};
  const Normalization norms[] = {Normalization::none, Normalization::decay,
                                 Normalization::decay_and_score};
  const Matrix<T> Q0 = random_matrix<T>(len, dk, 11), K0 = random_matrix<T>(len, dk, 12);
  const Matrix<T> V0 = random_matrix<T>(len, dv, 13);
  RetentionState<S> init(dk, dv);
  init.S = random_matrix<S>(dk, dv, 14);
  init.z = random_matrix<S>(dk, 1, 15);
  init.position = 3;
  ref::State rinit;
  rinit.S = init.S.template cast<double>();
  rinit.z = init.z.template cast<double>();
  rinit.position = init.position;
  const double tol = 10 * spec_tolerance<T>();
  double worst = 0.0;
  for (Index t : {Index(0), Index(1), Index(5), Index(7), len / 2, len - 1}) {
    for (int which = 0; which < 3; ++which)
      for (T bad : bad_values)
        for (Normalization norm : norms) {
          Matrix<T> Q = Q0, K = K0, V = V0;
          Matrix<T>& X = which == 0 ? Q : (which == 1 ? K : V);
          X(t, (t * 7) % X.cols()) = bad;
          RetentionOptions<S> o;
          o.normalization = norm;
          if (with_state) o.initial_state = &init;
          const Matrix<T> rec = retention::recurrent_retention(Q, K, V, decay, o);
          // The reference on the clean prefix: rows < t depend on nothing else.
          Matrix<double> want;
          if (t > 0)
            want = ref::retention(
                Q0.topRows(t).template cast<double>(), K0.topRows(t).template cast<double>(),
                V0.topRows(t).template cast<double>(), gamma, norm, with_state ? &rinit : nullptr);
          for (const FormRun& f : forms_around(t, len)) {
            const Matrix<T> out = run_form(f, Q, K, V, decay, o);
            const std::string where = f.name + ", bad " +
                                      std::string(which == 0   ? "Q"
                                                  : which == 1 ? "K"
                                                               : "V") +
                                      " at token " + std::to_string(t) + ", value " +
                                      std::to_string(static_cast<double>(bad)) + ", norm " +
                                      retention::to_string(norm);
            ASSERT_EQ(out.rows(), len);
            if (t == 0) continue;
            const auto head = out.topRows(t);
            ASSERT_TRUE(head.allFinite()) << where;
            const double e_rec = relative_error(head, rec.topRows(t));
            const double e_ref = relative_error(head, want);
            worst = std::max(worst, std::max(e_rec, e_ref));
            EXPECT_LE(e_rec, tol) << where;
            EXPECT_LE(e_ref, tol) << where;
          }
          // The recurrent form itself: rows before t match the clean reference.
          if (t > 0) {
            EXPECT_LE(relative_error(rec.topRows(t), want), tol);
          }
        }
  }
  ::testing::Test::RecordProperty("worst_relative_error", std::to_string(worst));
  std::cout << "[nonfinite] worst relative error of rows before the bad token: " << worst << "\n";
}

TYPED_TEST(NonFinite, LaterTokensNeverReachEarlierRows) {
  using T = TypeParam;
  check_forward_only<T, T>(13, 4, 3, false, 0.9);
  check_forward_only<T, T>(13, 4, 3, true, 0.9);
  check_forward_only<T, T>(10, 1, 1, false, 1.0);  // gamma = 1, one-wide heads
}

// float inputs with a double state take the wide-state chunkwise path.
TEST(NonFiniteWide, FloatInputsWithDoubleState) {
  check_forward_only<float, double>(13, 4, 3, true, 0.9);
  check_forward_only<float, double>(13, 4, 3, false, 0.96875);
}

// Across the parallel form's default block (128 rows) and with wide heads (the register-blocked
// chunk kernels with whole packets): the bad token sits right after, at, and right before a block
// or chunk boundary.
TYPED_TEST(NonFinite, AcrossBlockBoundariesOfTheDefaultSizes) {
  using T = TypeParam;
  const Index len = 200, dk = 32, dv = 40;
  const CausalDecay decay(0.96875);
  const Matrix<T> Q0 = random_matrix<T>(len, dk, 21), K0 = random_matrix<T>(len, dk, 22);
  const Matrix<T> V0 = random_matrix<T>(len, dv, 23);
  const double tol = 10 * spec_tolerance<T>();
  for (Index t : {Index(31), Index(32), Index(33), Index(127), Index(128), Index(129)})
    for (int which = 0; which < 3; ++which) {
      Matrix<T> Q = Q0, K = K0, V = V0;
      Matrix<T>& X = which == 0 ? Q : (which == 1 ? K : V);
      X.row(t).setConstant(std::numeric_limits<T>::infinity());
      RetentionOptions<T> o;
      o.normalization = Normalization::decay_and_score;
      const Matrix<T> rec = retention::recurrent_retention(Q, K, V, decay, o);
      const Matrix<T> par = retention::parallel_retention(Q, K, V, decay, o);
      const Matrix<T> chk = retention::chunkwise_retention(Q, K, V, decay, 32, o);
      const Matrix<T> chk64 = retention::chunkwise_retention(Q, K, V, decay, 64, o);
      ASSERT_TRUE(rec.topRows(t).allFinite());
      for (const Matrix<T>* m : {&par, &chk, &chk64}) {
        ASSERT_TRUE(m->topRows(t).allFinite()) << "t " << t << " input " << which;
        EXPECT_LE(relative_error(m->topRows(t), rec.topRows(t)), tol) << t << " " << which;
      }
      // A bad key or value reaches the next token in every form (the state carries it
      // forward); a bad query only its own row.
      if (which != 0) {
        for (const Matrix<T>* m : {&rec, &par, &chk, &chk64})
          EXPECT_FALSE(m->row(t + 1).allFinite()) << t << " " << which;
      } else {
        EXPECT_TRUE(par.bottomRows(len - t - 1).allFinite());
      }
    }
}

// A non-finite entry of the initial state S in column c reaches output column c only (each output
// column reads S[:, c] and V[:, c]); a NaN in z only matters to the score normalisation.
TYPED_TEST(NonFinite, InitialStateEntriesReachOnlyWhatDependsOnThem) {
  using T = TypeParam;
  const Index len = 9, dk = 4, dv = 5, c = 2;
  const CausalDecay decay(0.9);
  const Matrix<T> Q = random_matrix<T>(len, dk, 31), K = random_matrix<T>(len, dk, 32);
  const Matrix<T> V = random_matrix<T>(len, dv, 33);
  RetentionState<T> clean(dk, dv);
  clean.S = random_matrix<T>(dk, dv, 34);
  clean.z = random_matrix<T>(dk, 1, 35);
  RetentionState<T> bad_s = clean, bad_z = clean;
  bad_s.S(1, c) = std::numeric_limits<T>::infinity();
  bad_z.z(3) = std::numeric_limits<T>::quiet_NaN();
  const double tol = 10 * spec_tolerance<T>();
  for (const FormRun& f : forms_around(4, len)) {
    RetentionOptions<T> o;
    o.normalization = Normalization::decay;
    o.initial_state = &clean;
    const Matrix<T> want = run_form(f, Q, K, V, decay, o);
    o.initial_state = &bad_s;
    const Matrix<T> got_s = run_form(f, Q, K, V, decay, o);
    o.initial_state = &bad_z;
    const Matrix<T> got_z = run_form(f, Q, K, V, decay, o);
    for (Index j = 0; j < dv; ++j) {
      if (j == c) {
        EXPECT_FALSE(got_s.col(j).allFinite()) << f.name;
        continue;
      }
      ASSERT_TRUE(got_s.col(j).allFinite()) << f.name << " column " << j;
      EXPECT_LE(relative_error(got_s.col(j), want.col(j)), tol) << f.name;
    }
    ASSERT_TRUE(got_z.allFinite()) << f.name;
    EXPECT_LE(relative_error(got_z, want), tol) << f.name;
  }
}

// The flush-to-zero guard of the parallel form restores FTZ/DAZ only: an FE_INVALID raised inside
// (Inf x 0 of an Inf query against the masked scores) stays raised for the caller, one raised
// before the call is not cleared, and the caller's FTZ/DAZ bits come back whichever they were.
#if defined(__SSE__) && (defined(__GNUC__) || defined(__clang__))
TEST(NonFiniteFlags, ParallelKeepsExceptionFlagsAndRestoresFlushBits) {
  const Index len = 8, d = 4;
  const CausalDecay decay(0.9);
  Matrix<float> Q = random_matrix<float>(len, d, 41);
  const Matrix<float> K = random_matrix<float>(len, d, 42), V = random_matrix<float>(len, d, 43);
  Q(7, 0) = std::numeric_limits<float>::infinity();
  const unsigned flush = 0x8040u;
  const unsigned original = __builtin_ia32_stmxcsr();
  for (bool caller_flushes : {false, true}) {
    __builtin_ia32_ldmxcsr(caller_flushes ? (original | flush) : (original & ~flush));
    std::feclearexcept(FE_ALL_EXCEPT);
    const Matrix<float> out = retention::parallel_retention(Q, K, V, decay);
    const unsigned after = __builtin_ia32_stmxcsr();
    EXPECT_TRUE(std::fetestexcept(FE_INVALID)) << "FE_INVALID was erased";
    EXPECT_EQ(after & flush, caller_flushes ? flush : 0u);
    EXPECT_TRUE(out.topRows(7).allFinite());
    // A flag raised before the call survives it.
    std::feclearexcept(FE_ALL_EXCEPT);
    std::feraiseexcept(FE_DIVBYZERO);
    const Matrix<float> clean = retention::parallel_retention(K, K, V, decay);
    EXPECT_TRUE(std::fetestexcept(FE_DIVBYZERO));
    EXPECT_TRUE(clean.allFinite());
  }
  __builtin_ia32_ldmxcsr(original);
  std::feclearexcept(FE_ALL_EXCEPT);
}
#endif

}  // namespace
