// retention-test-links: compiled
// The cross-form sweep of SPEC 2 / SPEC 6: parallel, recurrent and chunkwise retention against the
// naive double reference and against each other, over T, chunk, (dk, dv), gamma and normalisation.
//
// What runs (every listed value is covered in float AND double):
// - T in {1, 2, 3, 17, 64, 257, 1000} x (dk, dv) in {(1,1), (2,3), (16,16), (64,128)}: one test
// each;
// - inside a test: every normalisation, both scalar types, the parallel and recurrent forms and the
//   chunkwise form for chunk in {1, 3, 16, 64, T, 2T} (duplicates dropped);
// - gammas {0.5, retnet h = 0..31, 1.0} for every T <= 257; T = 1000 runs the subset
//   {0.5, h = 0, 7, 15, 19, 20, 25, 31, 1.0} (with every dims) to keep the binary fast;
// - gammas at even positions of that list start from zero, at odd positions from a random initial
//   state (S, z, position), so both the plain and the carried-in path run everywhere;
// - the final state (S, z, position) of every form is checked against the reference too.
// Tolerances (SPEC 6): 1e-12 double, 1e-5 float. SPEC 1: where a float form multiplies its state by
// a per-step factor f (gamma for the recurrent form, gamma^C for the chunkwise form) that float
// cannot apply faithfully (f not a float, or a float within 2^-20 of 1, see drift_allowance), the
// state drifts by about min(steps, 1/(1 - f)) * 2^-24 relative; only there the float bound widens
// by twice that, and the same case also runs with a double state, which must meet 1e-5.
#include <retention/chunkwise.hpp>
#include <retention/decay.hpp>
#include <retention/parallel.hpp>
#include <retention/recurrent.hpp>

#include "reference/retention_reference.hpp"
#include "support/state_support.hpp"
#include "support/test_support.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iostream>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

namespace {

using retention_test::to_state;

using retention_test::ScalarName;

namespace ref = retention_reference;
using retention::Index;
using retention::Matrix;
using retention::Normalization;
using retention::RetentionOptions;
using retention::RetentionState;
using retention_test::random_matrix;
using retention_test::relative_error;
using retention_test::spec_tolerance;

const Normalization kNormalizations[] = {Normalization::none, Normalization::decay,
                                         Normalization::decay_and_score};

struct Dims {
  Index dk, dv;
};
const Index kTimes[] = {1, 2, 3, 17, 64, 257, 1000};
const Dims kDims[] = {{1, 1}, {2, 3}, {16, 16}, {64, 128}};

std::vector<double> all_gammas() {
  std::vector<double> g{0.5};
  for (double x : retention::retnet_gammas(32)) g.push_back(x);
  g.push_back(1.0);
  return g;
}

std::vector<double> gammas_for(Index T, const Dims& d) {
  const std::vector<double> all = all_gammas();
  (void)d;
  if (T < 1000) return all;
  const std::vector<double> r = retention::retnet_gammas(32);
  return {0.5, r[0], r[7], r[15], r[19], r[20], r[25], r[31], 1.0};
}

std::vector<Index> chunks_for(Index T) {
  std::vector<Index> c{1, 3, 16, 64, T, 2 * T};
  std::sort(c.begin(), c.end());
  c.erase(std::unique(c.begin(), c.end()), c.end());
  return c;
}

/// Worst relative errors seen, for the closing summary (meaningful when the binary runs whole).
struct Worst {
  double vs_reference = 0.0;   // every form vs the reference, cases held to the plain SPEC bound
  double between_forms = 0.0;  // forms against each other, same cases
  double drift_vs_reference = 0.0;  // float only: cases with the widened SPEC 1 bound
  double wide_state = 0.0;          // float inputs with a double state, those same cases
  long cases = 0;
};
Worst g_worst[2];  // [0] float, [1] double
long g_clamped = 0, g_unclamped = 0;

template <class T>
Worst& worst_of() {
  return g_worst[sizeof(T) == sizeof(double) ? 1 : 0];
}

/// Extra float tolerance of SPEC 1 for a state multiplied `steps` times by `factor`. It applies
/// where float cannot apply the factor faithfully: the factor is not a float, or it is a float
/// within 2^-20 of 1 (e.g. 1 - 2^-24, retnet head 19), where rounding f * S to float errs by up to
/// half an ulp of S, a sizeable and systematic fraction of the decay S (1 - f) itself, step after
/// step (measured: 1.03e-5 at T = 1000 for 1 - 2^-24). Elsewhere 0: the plain SPEC 6 bound holds.
double drift_allowance(double factor, Index steps) {
  const bool exact_in_float = static_cast<double>(static_cast<float>(factor)) == factor;
  if (exact_in_float && !(factor < 1.0 && 1.0 - factor <= std::ldexp(1.0, -20))) return 0.0;
  const double memory =
      factor < 1.0 ? 1.0 / (1.0 - factor) : std::numeric_limits<double>::infinity();
  return 2.0 * std::min(static_cast<double>(steps), memory) * std::ldexp(1.0, -24);
}

struct FormResult {
  std::string name;
  Matrix<double> out;
  double tolerance;
  bool widened;
};

/// Runs one form with state scalar S and checks output and final state against the reference.
template <class S, class Run>
Matrix<double> run_and_check(const std::string& what, Run&& run, const Matrix<double>& expected,
                             const ref::State& expected_final, const ref::State* init, double tol,
                             double* err_out) {
  RetentionState<S> init_state;
  if (init) init_state = to_state<S>(*init);
  RetentionState<S> fin;
  RetentionOptions<S> opt;
  opt.initial_state = init ? &init_state : nullptr;
  opt.final_state = &fin;
  const auto out = run(opt);
  const double err = relative_error(out, expected);
  EXPECT_LE(err, tol) << what;
  EXPECT_LE(relative_error(fin.S, expected_final.S), tol) << what << " final S";
  EXPECT_LE(relative_error(fin.z, expected_final.z), tol) << what << " final z";
  EXPECT_EQ(fin.position, expected_final.position) << what;
  *err_out = err;
  return out.template cast<double>();
}

template <class T>
void check_forms(const Matrix<double>& Qd, const Matrix<double>& Kd, const Matrix<double>& Vd,
                 double gamma, const ref::State* init, const ref::Raw& raw, Normalization norm,
                 const std::string& label) {
  const Matrix<T> Q = Qd.cast<T>(), K = Kd.cast<T>(), V = Vd.cast<T>();
  const Index T_len = Q.rows();
  const Matrix<double> expected = ref::normalize(raw, norm);
  const retention::CausalDecay decay(gamma);
  const double base = spec_tolerance<T>();
  const bool is_float = sizeof(T) == sizeof(float);
  Worst& w = worst_of<T>();
  std::vector<FormResult> results;
  double err = 0.0;

  auto record = [&](const std::string& name, Matrix<double> out, double tol) {
    const bool widened = tol > base;
    if (widened)
      w.drift_vs_reference = std::max(w.drift_vs_reference, err);
    else
      w.vs_reference = std::max(w.vs_reference, err);
    results.push_back({name, std::move(out), tol, widened});
  };

  {
    auto run = [&](const RetentionOptions<T>& o) {
      RetentionOptions<T> opt = o;
      opt.normalization = norm;
      return retention::parallel_retention(Q, K, V, decay, opt);
    };
    record("parallel",
           run_and_check<T>(label + " parallel", run, expected, raw.final_state, init, base, &err),
           base);
  }
  {
    const double extra = is_float ? drift_allowance(gamma, T_len) : 0.0;
    auto run = [&](const auto& o) {
      auto opt = o;
      opt.normalization = norm;
      return retention::recurrent_retention(Q, K, V, decay, opt);
    };
    record("recurrent",
           run_and_check<T>(label + " recurrent", run, expected, raw.final_state, init,
                            base + extra, &err),
           base + extra);
    if (extra > 0.0) {
      run_and_check<double>(label + " recurrent, double state", run, expected, raw.final_state,
                            init, base, &err);
      w.wide_state = std::max(w.wide_state, err);
    }
  }
  for (Index chunk : chunks_for(T_len)) {
    const Index C = std::min(chunk, T_len);
    const Index steps = (T_len + C - 1) / C;
    const double extra = is_float ? drift_allowance(ref::gamma_pow(gamma, C), steps) : 0.0;
    auto run = [&](const auto& o) {
      auto opt = o;
      opt.normalization = norm;
      return retention::chunkwise_retention(Q, K, V, decay, chunk, opt);
    };
    const std::string name = "chunkwise C=" + std::to_string(chunk);
    record(name,
           run_and_check<T>(label + " " + name, run, expected, raw.final_state, init, base + extra,
                            &err),
           base + extra);
    if (extra > 0.0) {
      run_and_check<double>(label + " " + name + ", double state", run, expected, raw.final_state,
                            init, base, &err);
      w.wide_state = std::max(w.wide_state, err);
    }
  }

  // The forms against each other: each against the parallel and the recurrent result.
  for (std::size_t a = 0; a < 2; ++a)
    for (std::size_t b = a + 1; b < results.size(); ++b) {
      const double e = relative_error(results[b].out, results[a].out);
      EXPECT_LE(e, results[a].tolerance + results[b].tolerance)
          << label << " " << results[b].name << " vs " << results[a].name;
      if (!results[a].widened && !results[b].widened)
        w.between_forms = std::max(w.between_forms, e);
    }
  ++w.cases;
}

class RetentionFormsSweep : public ::testing::TestWithParam<std::tuple<Index, std::size_t>> {};

TEST_P(RetentionFormsSweep, AllFormsMatchReferenceAndEachOther) {
  const Index T = std::get<0>(GetParam());
  const Dims d = kDims[std::get<1>(GetParam())];
  // Entries uniform in [-s, s] with s^2 ~ 3 / sqrt(dk): the decay-normalised score row sums r_n
  // then have a spread near 1, so decay_and_score both clamps (|r| < 1) and divides (|r| > 1).
  const double s = std::sqrt(3.0 / std::sqrt(static_cast<double>(d.dk)));
  const std::uint64_t seed = static_cast<std::uint64_t>(T * 131 + d.dk * 7 + d.dv);
  // Float-representable values, so that float and double runs share one double reference.
  const Matrix<double> Q = random_matrix<float>(T, d.dk, seed, s).cast<double>();
  const Matrix<double> K = random_matrix<float>(T, d.dk, seed + 1, s).cast<double>();
  const Matrix<double> V = random_matrix<float>(T, d.dv, seed + 2, 1.0).cast<double>();
  ref::State init;
  init.S = random_matrix<float>(d.dk, d.dv, seed + 3, 2.0 * s).cast<double>();
  init.z = random_matrix<float>(d.dk, 1, seed + 4, 2.0 * s).cast<double>();
  init.position = 3 * T + 5;

  long clamped = 0, unclamped = 0;
  const std::vector<double> gammas = gammas_for(T, d);
  for (std::size_t gi = 0; gi < gammas.size(); ++gi) {
    const double gamma = gammas[gi];
    const ref::State* init_ptr = gi % 2 == 1 ? &init : nullptr;
    const ref::Raw raw = ref::raw(Q, K, V, gamma, init_ptr);
    for (Index n = 0; n < T; ++n)
      (std::abs(ref::normalized_score(raw, n)) > 1.0 ? clamped : unclamped) += 1;
    for (Normalization norm : kNormalizations) {
      std::ostringstream os;
      os.precision(17);
      os << "T=" << T << " dk=" << d.dk << " dv=" << d.dv << " gamma=1-" << 1.0 - gamma
         << (init_ptr ? " (initial state)" : "") << " norm=" << retention::to_string(norm);
      const std::string label = os.str();
      check_forms<float>(Q, K, V, gamma, init_ptr, raw, norm, label + " float");
      check_forms<double>(Q, K, V, gamma, init_ptr, raw, norm, label + " double");
      if (HasFailure()) return;  // one broken case is enough to read
    }
  }
  g_clamped += clamped;
  g_unclamped += unclamped;
  if (T >= 17) {
    // Both branches of max(|r_n|, 1) are exercised.
    EXPECT_GT(clamped, T / 4) << "too few rows with |r_n| > 1";
    EXPECT_GT(unclamped, T / 4) << "too few rows with |r_n| < 1";
  }
}

INSTANTIATE_TEST_SUITE_P(Sweep, RetentionFormsSweep,
                         ::testing::Combine(::testing::ValuesIn(kTimes),
                                            ::testing::Values(0, 1, 2, 3)),
                         [](const ::testing::TestParamInfo<std::tuple<Index, std::size_t>>& p) {
                           const Dims d = kDims[std::get<1>(p.param)];
                           return "T" + std::to_string(std::get<0>(p.param)) + "_dk" +
                                  std::to_string(d.dk) + "_dv" + std::to_string(d.dv);
                         });

// The parallel form's query/key blocking: any tile gives the same function.
template <class T>
class ParallelTiles : public ::testing::Test {};
TYPED_TEST_SUITE(ParallelTiles, retention_test::ScalarTypes, ScalarName);

TYPED_TEST(ParallelTiles, AnyTileMatchesReference) {
  using T = TypeParam;
  const Index len = 50, dk = 6, dv = 5;
  const Matrix<T> Q = random_matrix<T>(len, dk, 901, 1.2), K = random_matrix<T>(len, dk, 902, 1.2);
  const Matrix<T> V = random_matrix<T>(len, dv, 903);
  ref::State init;
  init.S = random_matrix<T>(dk, dv, 904).template cast<double>();
  init.z = random_matrix<T>(dk, 1, 905).template cast<double>();
  init.position = 11;
  const RetentionState<T> st = to_state<T>(init);
  for (double gamma : {0.5, 0.96875, 1.0}) {
    const Matrix<double> expected =
        ref::retention(Q.template cast<double>(), K.template cast<double>(),
                       V.template cast<double>(), gamma, Normalization::decay_and_score, &init);
    for (Index tile : {0, 1, 3, 7, 16, 49, 50, 100}) {
      RetentionOptions<T> opt;
      opt.normalization = Normalization::decay_and_score;
      opt.initial_state = &st;
      opt.tile = tile;
      EXPECT_LE(
          relative_error(retention::parallel_retention(Q, K, V, retention::CausalDecay(gamma), opt),
                         expected),
          spec_tolerance<T>())
          << "tile " << tile << " gamma " << gamma;
    }
  }
}

// Sequences longer than the decay's horizon (the distance past which gamma^d is below T's smallest
// normal number), so that query blocks start reading keys at any offset, not only at 0; heads as
// column blocks of one wider buffer (rows spread out) and tiles of any size.
TYPED_TEST(ParallelTiles, BeyondTheHorizonMatchesReference) {
  using T = TypeParam;
  const Index len = 403, dk = 9, dv = 7;
  const Matrix<T> qkv = random_matrix<T>(len, 3 * dk + 2 * dv, 911, 1.1);
  const auto Q = qkv.leftCols(dk);
  const auto K = qkv.middleCols(dk + 3, dk);
  const auto V = qkv.middleCols(2 * dk + 5, dv);
  const Matrix<double> Qd = Q.template cast<double>(), Kd = K.template cast<double>(),
                       Vd = V.template cast<double>();
  ref::State init;
  init.S = random_matrix<T>(dk, dv, 912).template cast<double>();
  init.z = random_matrix<T>(dk, 1, 913).template cast<double>();
  init.position = 5;
  const RetentionState<T> st = to_state<T>(init);
  // Horizons: float 0.5 -> 126, 0.02 -> 23; double 0.02 -> 182.
  for (double gamma : {0.5, 0.02}) {
    for (const Normalization norm :
         {Normalization::none, Normalization::decay, Normalization::decay_and_score}) {
      for (const bool with_state : {false, true}) {
        const Matrix<double> expected =
            ref::retention(Qd, Kd, Vd, gamma, norm, with_state ? &init : nullptr);
        for (Index tile : {0, 5, 33, 64, 130}) {
          RetentionOptions<T> opt;
          opt.normalization = norm;
          opt.initial_state = with_state ? &st : nullptr;
          opt.tile = tile;
          EXPECT_LE(relative_error(
                        retention::parallel_retention(Q, K, V, retention::CausalDecay(gamma), opt),
                        expected),
                    spec_tolerance<T>())
              << "tile " << tile << " gamma " << gamma << " state " << with_state;
        }
      }
    }
  }
}

// Heads wider than one depth block of the products (520 floats or doubles on AVX-512).
TYPED_TEST(ParallelTiles, WideHeadsMatchReference) {
  using T = TypeParam;
  const Index len = 150;
  for (const auto& dims : {std::pair<Index, Index>{1030, 7}, std::pair<Index, Index>{7, 1030}}) {
    const Index dk = dims.first, dv = dims.second;
    const Matrix<T> Q = random_matrix<T>(len, dk, 921), V = random_matrix<T>(len, dv, 923);
    const Matrix<T> K = random_matrix<T>(len, dk, 922, 1.0 / std::sqrt(static_cast<double>(dk)));
    const Matrix<double> expected =
        ref::retention(Q.template cast<double>(), K.template cast<double>(),
                       V.template cast<double>(), 0.9, Normalization::decay_and_score);
    for (Index tile : {0, 40}) {
      RetentionOptions<T> opt;
      opt.normalization = Normalization::decay_and_score;
      opt.tile = tile;
      EXPECT_LE(
          relative_error(retention::parallel_retention(Q, K, V, retention::CausalDecay(0.9), opt),
                         expected),
          spec_tolerance<T>())
          << "dk " << dk << " dv " << dv << " tile " << tile;
    }
  }
}

// Eigen expressions and maps as inputs (DESIGN: any dense expression), and the _into variants.
template <class T>
class RetentionExpressions : public ::testing::Test {};
TYPED_TEST_SUITE(RetentionExpressions, retention_test::ScalarTypes, ScalarName);

TYPED_TEST(RetentionExpressions, BlocksAndIntoVariantsMatchReference) {
  using T = TypeParam;
  const Index len = 23, dk = 4, dv = 3;
  // One [T, dk + dk + dv] buffer; Q, K, V are column blocks of it.
  const Matrix<T> qkv = random_matrix<T>(len, 2 * dk + dv, 77);
  const auto Q = qkv.leftCols(dk);
  const auto K = qkv.middleCols(dk, dk);
  const auto V = qkv.rightCols(dv);
  const double gamma = 0.9;
  const Matrix<double> expected = ref::retention(
      Matrix<double>(Q.template cast<double>()), Matrix<double>(K.template cast<double>()),
      Matrix<double>(V.template cast<double>()), gamma, Normalization::decay);
  const retention::CausalDecay decay(gamma);
  RetentionOptions<T> opt;
  opt.normalization = Normalization::decay;
  Matrix<T> big = Matrix<T>::Zero(len, 2 * dv);
  retention::parallel_retention_into(Q, K, V, decay, big.leftCols(dv), opt);
  retention::chunkwise_retention_into(Q, K, V, decay, 5, big.rightCols(dv), opt);
  EXPECT_LE(relative_error(big.leftCols(dv), expected), spec_tolerance<T>());
  EXPECT_LE(relative_error(big.rightCols(dv), expected), spec_tolerance<T>());
  retention::recurrent_retention_into(Q, K, V, decay, big.leftCols(dv), opt);
  EXPECT_LE(relative_error(big.leftCols(dv), expected), spec_tolerance<T>());
}

// Every operand layout runs the same kernel code: a row-major Matrix, column blocks of a fused
// buffer, column-major matrices and a lazy expression as inputs; a Matrix, a column-major matrix
// and a column block as outputs. The results must be bit-identical across layouts (the fronts hand
// the kernels one operand type, core.hpp ConstRows / Rows) and match the naive double reference.
template <class T>
class RetentionLayouts : public ::testing::Test {};
TYPED_TEST_SUITE(RetentionLayouts, retention_test::ScalarTypes, ScalarName);

TYPED_TEST(RetentionLayouts, EveryLayoutGivesBitIdenticalResults) {
  using T = TypeParam;
  using ColMajor = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
  const Index len = 37, dk = 5, dv = 3;
  const Matrix<T> qkv = random_matrix<T>(len, 2 * dk + dv, 91);
  const Matrix<T> Q = qkv.leftCols(dk), K = qkv.middleCols(dk, dk), V = qkv.rightCols(dv);
  const ColMajor Qc = Q, Kc = K, Vc = V;
  const double gamma = 0.93;
  const retention::CausalDecay decay(gamma);
  const Matrix<double> expected = ref::retention(
      Matrix<double>(Q.template cast<double>()), Matrix<double>(K.template cast<double>()),
      Matrix<double>(V.template cast<double>()), gamma, Normalization::decay_and_score);
  RetentionOptions<T> opt;
  opt.normalization = Normalization::decay_and_score;
  for (int form = 0; form < 3; ++form) {
    const auto run = [&](const auto& q, const auto& k, const auto& v, auto&& out) {
      if (form == 0)
        retention::parallel_retention_into(q, k, v, decay, out, opt);
      else if (form == 1)
        retention::chunkwise_retention_into(q, k, v, decay, 8, out, opt);
      else
        retention::recurrent_retention_into(q, k, v, decay, out, opt);
    };
    Matrix<T> base(len, dv);
    run(Q, K, V, base);
    EXPECT_LE(relative_error(base, expected), spec_tolerance<T>()) << "form " << form;
    Matrix<T> from_blocks(len, dv);
    run(qkv.leftCols(dk), qkv.middleCols(dk, dk), qkv.rightCols(dv), from_blocks);
    Matrix<T> from_col_major(len, dv);
    run(Qc, Kc, Vc, from_col_major);
    Matrix<T> from_lazy(len, dv);
    run(Q * T(1), K.array().matrix(), V + Matrix<T>::Zero(len, dv), from_lazy);
    ColMajor into_col_major(len, dv);
    run(Q, K, V, into_col_major);
    Matrix<T> wide = Matrix<T>::Zero(len, dv + 2);
    run(Q, K, V, wide.middleCols(1, dv));
    EXPECT_TRUE(from_blocks == base) << "form " << form;
    EXPECT_TRUE(from_col_major == base) << "form " << form;
    EXPECT_TRUE(from_lazy == base) << "form " << form;
    EXPECT_TRUE(Matrix<T>(into_col_major) == base) << "form " << form;
    EXPECT_TRUE(Matrix<T>(wide.middleCols(1, dv)) == base) << "form " << form;
    EXPECT_TRUE(wide.col(0).isZero(0) && wide.col(dv + 1).isZero(0)) << "form " << form;
  }
}

// The recurrent step walks the value columns in blocks of 8 (or 4) SIMD packets, then single
// packets, then scalars: widths around every boundary (float packet 16 / block 128, double 8 / 64
// on AVX-512; 4 / 32 and 2 / 16 elsewhere), with the same-type and the double state.
template <class T>
class RecurrentColumnBlocks : public ::testing::Test {};
TYPED_TEST_SUITE(RecurrentColumnBlocks, retention_test::ScalarTypes, ScalarName);

TYPED_TEST(RecurrentColumnBlocks, EveryValueWidthMatchesReference) {
  using T = TypeParam;
  const Index len = 9, dk = 3;
  const double gamma = 0.875;
  const retention::CausalDecay decay(gamma);
  for (Index dv : {1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65, 127, 128, 129, 147, 200, 257}) {
    const Matrix<T> Q = random_matrix<T>(len, dk, 1100 + static_cast<std::uint64_t>(dv));
    const Matrix<T> K = random_matrix<T>(len, dk, 1200 + static_cast<std::uint64_t>(dv));
    const Matrix<T> V = random_matrix<T>(len, dv, 1300 + static_cast<std::uint64_t>(dv));
    ref::State init;
    init.S =
        random_matrix<T>(dk, dv, 1400 + static_cast<std::uint64_t>(dv)).template cast<double>();
    init.z = random_matrix<T>(dk, 1, 1500 + static_cast<std::uint64_t>(dv)).template cast<double>();
    init.position = 4;
    const Matrix<double> expected =
        ref::retention(Q.template cast<double>(), K.template cast<double>(),
                       V.template cast<double>(), gamma, Normalization::decay_and_score, &init);
    const RetentionState<T> st = to_state<T>(init);
    RetentionOptions<T> opt;
    opt.normalization = Normalization::decay_and_score;
    opt.initial_state = &st;
    EXPECT_LE(relative_error(retention::recurrent_retention(Q, K, V, decay, opt), expected),
              spec_tolerance<T>())
        << "dv " << dv;
    const RetentionState<double> wide = to_state<double>(init);
    RetentionOptions<double> wide_opt;
    wide_opt.normalization = Normalization::decay_and_score;
    wide_opt.initial_state = &wide;
    EXPECT_LE(relative_error(retention::recurrent_retention(Q, K, V, decay, wide_opt), expected),
              spec_tolerance<T>())
        << "dv " << dv << ", double state";
  }
}

// Printed after the last test (a global environment's TearDown): the worst errors of the sweep,
// for the closing note. Under ctest each test is its own process, so the numbers cover the tests
// of that process only; run the binary whole for the full sweep.
class SweepSummary : public ::testing::Environment {
 public:
  void TearDown() override {
    const char* names[2] = {"float", "double"};
    for (int i = 0; i < 2; ++i) {
      const Worst& w = g_worst[i];
      if (w.cases == 0) continue;
      std::cout << "[sweep] " << names[i] << ": cases " << w.cases << ", worst vs reference "
                << w.vs_reference << ", worst between forms " << w.between_forms;
      if (i == 0)
        std::cout << ", worst where SPEC 1 drift applies " << w.drift_vs_reference
                  << ", those cases with a double state " << w.wide_state;
      std::cout << "\n";
    }
    if (g_clamped + g_unclamped > 0)
      std::cout << "[sweep] decay_and_score rows with |r| > 1: " << g_clamped
                << ", with |r| <= 1: " << g_unclamped << "\n";
  }
};
[[maybe_unused]] ::testing::Environment* const kSummary =
    ::testing::AddGlobalTestEnvironment(new SweepSummary);

}  // namespace
