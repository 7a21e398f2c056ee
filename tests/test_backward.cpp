// retention-test-links: compiled
// Gradients of retention (SPEC 7): the three backward forms against central finite differences of
// the double reference forward, against the naive double reference backward, and against each
// other over a sweep of T, chunk, (dk, dv), gamma, normalisation, initial state, final-state
// gradient and the detached score normaliser.
//
// Sweep (every listed value in float AND double): the cases of kCases below (T from 1 to 1000,
// dims from (1, 1) to (128, 128)); in each case gammas {0.5, retnet h = 0..23, 1.0} (a subset for
// the larger cases), gamma number i runs with (initial state, final-state gradient) = (i % 2,
// (i / 2) % 2), and every normalisation (decay_and_score exact and detached; the larger cases
// alternate two of the four per gamma); forms: parallel
// (default tile 128 and, below T = 300, tile 5), recurrent, chunkwise for chunk in {1, 3, 16, 64,
// T - 1, T, 2T} ({1, 3, 16, 64, 96} at T = 1000).
// Tolerances (SPEC 6 / 7): 1e-12 double, 1e-5 float, relative per gradient block. Float forms that
// multiply a state by a factor float cannot apply faithfully (SPEC 1) get the drift allowance of
// test_retention_forms.cpp, and then run again with a double state, which must meet 1e-5.
//
// decay_and_score has no derivative where |r_n| = 1; test inputs keep every |r_n| at least 1e-4
// away from 1 (rows closer are scaled by 1.01, see keep_off_kink), so that float and double take
// the same branch. dz_init on the exact score path is judged relative to the size of its terms
// (see grad_error).
#include <retention/backward.hpp>
#include <retention/chunkwise.hpp>
#include <retention/decay.hpp>
#include <retention/parallel.hpp>
#include <retention/recurrent.hpp>

#include "reference/backward_reference.hpp"
#include "reference/retention_reference.hpp"
#include "support/state_support.hpp"
#include "support/test_support.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iostream>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace {

namespace ref = retention_reference;
using retention::CausalDecay;
using retention::Index;
using retention::Matrix;
using retention::Normalization;
using retention::RetentionBackwardOptions;
using retention::RetentionGradients;
using retention::RetentionState;
using retention_test::random_matrix;
using retention_test::relative_error;
using retention_test::spec_tolerance;
using retention_test::to_state;
using Mat = Matrix<double>;

/// A normalisation as the backward sees it: decay_and_score exact or detached.
struct NormConfig {
  Normalization norm;
  bool detach;
  const char* name;
};
const NormConfig kNorms[] = {{Normalization::none, false, "none"},
                             {Normalization::decay, false, "decay"},
                             {Normalization::decay_and_score, false, "score"},
                             {Normalization::decay_and_score, true, "score-detached"}};

/// Q with every |r_n| at least 1e-4 away from 1 (ref::keep_scores_off_kink), rounded to float so
/// that float and double runs share the inputs.
Mat keep_off_kink(const Mat& Q, const Mat& K, const Mat& V, double gamma, const ref::State* init) {
  return ref::keep_scores_off_kink(Q, K, V, gamma, init).cast<float>().cast<double>();
}

/// Float-representable random inputs of one case.
struct Inputs {
  Mat Q, K, V, G;
  ref::State init, fgrad;
};

Inputs make_inputs(Index T, Index dk, Index dv, std::uint64_t seed) {
  // Q, K entries in [-s, s] with s^2 ~ 3 / sqrt(dk): |r_n| then spreads around 1, so the score
  // normaliser both clamps and divides (as in test_retention_forms.cpp).
  const double s = std::sqrt(3.0 / std::sqrt(static_cast<double>(dk)));
  auto rnd = [&](Index r, Index c, std::uint64_t k, double scale) {
    return Mat(random_matrix<float>(r, c, seed * 16 + k, scale).cast<double>());
  };
  Inputs in;
  in.Q = rnd(T, dk, 1, s);
  in.K = rnd(T, dk, 2, s);
  in.V = rnd(T, dv, 3, 1.0);
  in.G = rnd(T, dv, 4, 1.0);
  in.init.S = rnd(dk, dv, 5, 2.0 * s);
  in.init.z = rnd(dk, 1, 6, 2.0 * s);
  in.init.position = 2 * T + 3;
  in.fgrad.S = rnd(dk, dv, 7, 1.0);
  in.fgrad.z = rnd(dk, 1, 8, 1.0);
  return in;
}

/// Gradients of one run in double, for comparisons.
struct Grads {
  Mat dQ, dK, dV, dS0;
  Mat dz0;
};

template <class T, class S>
Grads to_double(const RetentionGradients<T, S>& g) {
  return {g.dQ.template cast<double>(), g.dK.template cast<double>(), g.dV.template cast<double>(),
          g.d_initial_state.S.template cast<double>(),
          Mat(g.d_initial_state.z.template cast<double>())};
}

Grads to_grads(const ref::Gradients& g) { return {g.dQ, g.dK, g.dV, g.dS0, Mat(g.dz0)}; }

/// Largest relative error over the gradient blocks (+inf on a NaN, or a block of another shape).
/// dz_init's error is taken relative to max(norm(b.dz0), dz0_scale): dz_init depends on the inputs
/// only through gs_n, whose factor G_n . u_n may cancel, so its rounding error is relative to the
/// size of its terms (ref::dz_init_term_scale), not to its value (measured: 3e-5 in float, 5e-13
/// in double at T = 2, dk = 16, where dz_init is one or two terms).
double grad_error(const Grads& a, const Grads& b, double dz0_scale = 0.0) {
  double e = std::max(
      {relative_error(a.dQ, b.dQ), relative_error(a.dK, b.dK), relative_error(a.dV, b.dV)});
  if (b.dS0.size() > 0 || a.dS0.size() > 0) {
    e = std::max(e, relative_error(a.dS0, b.dS0));
    const double ez = relative_error(a.dz0, b.dz0);
    const double bn = b.dz0.norm();
    e = std::max(e, dz0_scale > bn && bn > 0.0 ? ez * bn / dz0_scale : ez);
  }
  return e;
}

/// ref::dz_init_term_scale for the inputs of one case.
double dz0_condition_scale(const Mat& Q, const Inputs& in, double gamma, const ref::State* init,
                           const ref::State* fgrad) {
  return ref::dz_init_term_scale(Q, in.K, in.V, in.G, gamma, init, fgrad);
}

/// A form of the backward, run on the inputs converted to T with state scalar S.
enum class FormKind { parallel, parallel_small_tile, recurrent, chunkwise };

template <class T, class S>
Grads run_form(FormKind kind, Index chunk, const Inputs& in, const Mat& Q, double gamma,
               bool with_init, bool with_fgrad, const NormConfig& nc) {
  const Matrix<T> Qt = Q.cast<T>(), Kt = in.K.cast<T>(), Vt = in.V.cast<T>(), Gt = in.G.cast<T>();
  const RetentionState<S> init = to_state<S>(in.init);
  RetentionState<S> fgrad = to_state<S>(in.fgrad);
  fgrad.position = 0;
  RetentionBackwardOptions<S> opt;
  opt.normalization = nc.norm;
  opt.detach_score_normalizer = nc.detach;
  opt.initial_state = with_init ? &init : nullptr;
  opt.final_state_gradient = with_fgrad ? &fgrad : nullptr;
  const CausalDecay decay(gamma);
  switch (kind) {
    case FormKind::parallel:
      return to_double(retention::parallel_retention_backward(Qt, Kt, Vt, decay, Gt, opt));
    case FormKind::parallel_small_tile:
      opt.tile = 5;
      return to_double(retention::parallel_retention_backward(Qt, Kt, Vt, decay, Gt, opt));
    case FormKind::recurrent:
      return to_double(retention::recurrent_retention_backward(Qt, Kt, Vt, decay, Gt, opt));
    case FormKind::chunkwise:
      return to_double(retention::chunkwise_retention_backward(Qt, Kt, Vt, decay, chunk, Gt, opt));
  }
  return {};
}

// ---------------------------------------------------------------------------------------------
// Finite differences: L = sum(W .* O) + sum(WS .* S_final) + wz . z_final with random W, WS, wz;
// central differences (step 1e-6) of the double reference forward at a handful of random entries
// of Q, K, V, S_init and z_init, against every form's backward and the reference backward.
// ---------------------------------------------------------------------------------------------

TEST(BackwardFiniteDifferences, EveryFormMatchesCentralDifferences) {
  const Index T = 13, dk = 3, dv = 4;
  const double h = 1e-6;
  const FormKind kinds[] = {FormKind::parallel, FormKind::parallel_small_tile, FormKind::recurrent,
                            FormKind::chunkwise};
  double worst = 0.0;
  long rows_clamped = 0, rows_divided = 0;
  std::uint64_t seed = 500;
  for (double gamma : {0.8, 0.96875, 1.0})
    for (const NormConfig& nc : kNorms) {
      if (nc.detach) continue;  // a detached normaliser is not the derivative of the forward
      for (int with_init = 0; with_init < 2; ++with_init) {
        Inputs in = make_inputs(T, dk, dv, ++seed);
        const ref::State* init = with_init ? &in.init : nullptr;
        const Mat Q = keep_off_kink(in.Q, in.K, in.V, gamma, init);
        const ref::Raw raw = ref::raw(Q, in.K, in.V, gamma, init);
        for (Index n = 0; n < T; ++n)
          (std::abs(ref::normalized_score(raw, n)) > 1.0 ? rows_divided : rows_clamped) += 1;

        // Central differences at 5 random entries of each of Q, K, V (and S_init, z_init).
        std::mt19937_64 rng(seed);
        Mat Qp = Q, Kp = in.K, Vp = in.V;
        ref::State ip = in.init;
        auto loss = [&]() {
          return ref::retention_loss(Qp, Kp, Vp, gamma, nc.norm, with_init ? &ip : nullptr, in.G,
                                     &in.fgrad);
        };
        auto fd = [&](double& x) {
          const double x0 = x;
          x = x0 + h;
          const double up = loss();
          x = x0 - h;
          const double down = loss();
          x = x0;
          return (up - down) / (2.0 * h);
        };
        struct Probe {
          int which;  // 0 Q, 1 K, 2 V, 3 S0, 4 z0
          Index r, c;
          double value;
        };
        std::vector<Probe> probes;
        auto pick = [&](int which, Mat& m) {
          for (int p = 0; p < 5; ++p) {
            const Index r = static_cast<Index>(rng() % static_cast<std::uint64_t>(m.rows()));
            const Index c = static_cast<Index>(rng() % static_cast<std::uint64_t>(m.cols()));
            probes.push_back({which, r, c, fd(m(r, c))});
          }
        };
        pick(0, Qp);
        pick(1, Kp);
        pick(2, Vp);
        if (with_init) {
          pick(3, ip.S);
          for (int p = 0; p < 5; ++p) {
            const Index r = static_cast<Index>(rng() % static_cast<std::uint64_t>(dk));
            const double z0 = ip.z(r);
            ip.z(r) = z0 + h;
            const double up = loss();
            ip.z(r) = z0 - h;
            const double down = loss();
            ip.z(r) = z0;
            probes.push_back({4, r, 0, (up - down) / (2.0 * h)});
          }
        }

        auto check = [&](const Grads& g, const std::string& what) {
          Eigen::VectorXd got(static_cast<Index>(probes.size())),
              want(static_cast<Index>(probes.size()));
          for (std::size_t p = 0; p < probes.size(); ++p) {
            const Probe& pr = probes[p];
            const Mat* m[] = {&g.dQ, &g.dK, &g.dV, &g.dS0, &g.dz0};
            got(static_cast<Index>(p)) = (*m[pr.which])(pr.r, pr.c);
            want(static_cast<Index>(p)) = pr.value;
          }
          const double err = relative_error(got, want);
          worst = std::max(worst, err);
          EXPECT_LE(err, 1e-6) << what << " gamma " << gamma << " norm " << nc.name
                               << (with_init ? " with initial state" : "");
        };
        check(to_grads(ref::retention_backward(Q, in.K, in.V, gamma, nc.norm, init, in.G, &in.fgrad,
                                               false)),
              "reference");
        for (FormKind kind : kinds)
          check(run_form<double, double>(kind, 4, in, Q, gamma, with_init, true, nc),
                "form " + std::to_string(static_cast<int>(kind)));
      }
    }
  // Both branches of max(|r|, 1) ran.
  EXPECT_GT(rows_clamped, 20);
  EXPECT_GT(rows_divided, 20);
  std::cout << "[fd] worst relative error against central differences " << worst << "\n";
}

// The detached normaliser: the gradient of o_n = c_n u_n / m_n with m_n held fixed equals the
// finite difference of that function with m_n frozen at its value, which the reference gives by
// construction; here the exact and detached gradients must also differ where some |r_n| > 1.
TEST(BackwardFiniteDifferences, DetachedNormaliserDropsOnlyTheScorePath) {
  const Index T = 20, dk = 4, dv = 3;
  const double gamma = 0.9;
  const Inputs in = make_inputs(T, dk, dv, 77);
  const Mat Q = keep_off_kink(in.Q, in.K, in.V, gamma, &in.init);
  const NormConfig exact = kNorms[2], detached = kNorms[3];
  const Grads ge =
      run_form<double, double>(FormKind::chunkwise, 6, in, Q, gamma, true, true, exact);
  const Grads gd =
      run_form<double, double>(FormKind::chunkwise, 6, in, Q, gamma, true, true, detached);
  // dV does not see the score path (r_n does not depend on V); dQ, dK and dz_init do.
  EXPECT_LE(relative_error(gd.dV, ge.dV), 1e-14);
  EXPECT_GT(relative_error(gd.dQ, ge.dQ), 1e-3);
  EXPECT_GT(relative_error(gd.dK, ge.dK), 1e-3);
  EXPECT_GT(relative_error(gd.dz0, ge.dz0), 1e-3);
  // Detached: frozen m_n = max(|r_n|, 1) from the forward, central differences of
  // sum(G .* (c u / m)) + final-state terms with m fixed.
  const ref::Raw raw0 = ref::raw(Q, in.K, in.V, gamma, &in.init);
  Eigen::VectorXd scale(T);
  for (Index n = 0; n < T; ++n)
    scale(n) = 1.0 / (std::sqrt(raw0.decay_sum(n)) *
                      std::max(std::abs(ref::normalized_score(raw0, n)), 1.0));
  Mat Kp = in.K;
  auto frozen_loss = [&]() {
    ref::State fin;
    const Mat O = ref::retention(Q, Kp, in.V, gamma, Normalization::none, &in.init, &fin);
    double L = 0.0;
    for (Index n = 0; n < T; ++n) L += scale(n) * O.row(n).dot(in.G.row(n));
    L += (fin.S.array() * in.fgrad.S.array()).sum() + fin.z.dot(in.fgrad.z);
    return L;
  };
  for (Index r : {0, 7, 19})
    for (Index c : {0, 3}) {
      const double x0 = Kp(r, c), h = 1e-6;
      Kp(r, c) = x0 + h;
      const double up = frozen_loss();
      Kp(r, c) = x0 - h;
      const double down = frozen_loss();
      Kp(r, c) = x0;
      const double want = (up - down) / (2 * h);
      EXPECT_NEAR(gd.dK(r, c), want, 1e-6 * std::max(1.0, std::abs(want))) << r << "," << c;
    }
}

// ---------------------------------------------------------------------------------------------
// The sweep: reference and cross-form agreement.
// ---------------------------------------------------------------------------------------------

struct Case {
  Index T, dk, dv;
  int gammas;  // 0: all 26, 1: 10, 2: 4
  bool all_norms;
};
const Case kCases[] = {
    {1, 1, 1, 0, true},       {1, 2, 3, 0, true},       {1, 128, 128, 2, true},
    {2, 1, 1, 0, true},       {2, 16, 16, 0, true},     {17, 1, 1, 0, true},
    {17, 2, 3, 0, true},      {17, 16, 16, 0, true},    {17, 128, 128, 2, false},
    {64, 3, 2, 0, true},      {64, 16, 16, 1, true},    {64, 64, 128, 2, false},
    {64, 128, 128, 2, false}, {257, 2, 3, 1, false},    {257, 16, 16, 2, false},
    {1000, 4, 4, 2, false},   {150, 1030, 5, 2, false}, {150, 5, 1030, 2, false}};

std::vector<double> gamma_set(int which) {
  const std::vector<double> r = retention::retnet_gammas(24);
  if (which == 0) {
    std::vector<double> g{0.5};
    g.insert(g.end(), r.begin(), r.end());
    g.push_back(1.0);
    return g;
  }
  if (which == 1) return {0.5, r[0], r[3], r[8], r[15], r[19], r[20], r[22], r[23], 1.0};
  return {0.5, r[4], r[20], 1.0};
}

std::vector<Index> chunks_for(Index T) {
  // One chunk over a long sequence is a T x T tile, too slow for this binary at T = 1000; a
  // ragged 96 stands in for it there.
  if (T > 300) return {1, 3, 16, 64, 96};
  std::vector<Index> c{1, 3, 16, 64, std::max<Index>(T - 1, 1), T, 2 * T};
  std::sort(c.begin(), c.end());
  c.erase(std::unique(c.begin(), c.end()), c.end());
  return c;
}

/// Extra float tolerance (SPEC 1) for a state multiplied `steps` times by `factor`, as in
/// test_retention_forms.cpp: where float cannot apply the factor faithfully the state drifts by
/// about min(steps, 1 / (1 - factor)) 2^-24 relative.
double drift_allowance(double factor, Index steps) {
  const bool exact_in_float = static_cast<double>(static_cast<float>(factor)) == factor;
  if (exact_in_float && !(factor < 1.0 && 1.0 - factor <= std::ldexp(1.0, -20))) return 0.0;
  const double memory =
      factor < 1.0 ? 1.0 / (1.0 - factor) : std::numeric_limits<double>::infinity();
  return 2.0 * std::min(static_cast<double>(steps), memory) * std::ldexp(1.0, -24);
}

struct Worst {
  double vs_reference = 0.0, between_forms = 0.0, drift = 0.0, wide_state = 0.0;
  long runs = 0;
};
Worst g_worst[2];  // [0] float, [1] double

template <class T>
void check_all_forms(const Inputs& in, const Mat& Q, double gamma, bool with_init, bool with_fgrad,
                     const NormConfig& nc, const Grads& expected, double dz0_scale,
                     const std::string& label) {
  const bool is_float = sizeof(T) == sizeof(float);
  const double base = spec_tolerance<T>();
  Worst& w = g_worst[is_float ? 0 : 1];
  const Index T_len = Q.rows();
  struct Result {
    std::string name;
    Grads g;
    double tol;
  };
  std::vector<Result> results;
  auto run = [&](FormKind kind, Index chunk, double extra, const std::string& name) {
    Grads g = run_form<T, T>(kind, chunk, in, Q, gamma, with_init, with_fgrad, nc);
    const double err = grad_error(g, expected, dz0_scale);
    EXPECT_LE(err, base + extra) << label << " " << name;
    (extra > 0.0 ? w.drift : w.vs_reference) =
        std::max(extra > 0.0 ? w.drift : w.vs_reference, err);
    ++w.runs;
    if (extra > 0.0) {
      // The same with a double state meets the plain bound.
      const Grads gw = run_form<T, double>(kind, chunk, in, Q, gamma, with_init, with_fgrad, nc);
      const double ew = grad_error(gw, expected, dz0_scale);
      EXPECT_LE(ew, base) << label << " " << name << ", double state";
      w.wide_state = std::max(w.wide_state, ew);
    }
    results.push_back({name, std::move(g), base + extra});
  };
  run(FormKind::parallel, 0, 0.0, "parallel");
  if (T_len > 5 && T_len < 300) run(FormKind::parallel_small_tile, 0, 0.0, "parallel tile 5");
  run(FormKind::recurrent, 0, is_float ? drift_allowance(gamma, T_len) : 0.0, "recurrent");
  for (Index chunk : chunks_for(T_len)) {
    const Index C = std::min(chunk, T_len);
    const double extra =
        is_float ? drift_allowance(ref::gamma_pow(gamma, C), (T_len + C - 1) / C) : 0.0;
    run(FormKind::chunkwise, chunk, extra, "chunkwise C=" + std::to_string(chunk));
  }
  // Forms against each other (against the parallel form's result).
  for (std::size_t b = 1; b < results.size(); ++b) {
    const double e = grad_error(results[b].g, results[0].g, dz0_scale);
    EXPECT_LE(e, results[0].tol + results[b].tol)
        << label << " " << results[b].name << " vs parallel";
    if (results[b].tol == base) w.between_forms = std::max(w.between_forms, e);
  }
}

class BackwardSweep : public ::testing::TestWithParam<std::size_t> {};

TEST_P(BackwardSweep, FormsMatchReferenceAndEachOther) {
  const Case c = kCases[GetParam()];
  const Inputs in = make_inputs(c.T, c.dk, c.dv, 1000 + GetParam());
  const std::vector<double> gammas = gamma_set(c.gammas);
  for (std::size_t gi = 0; gi < gammas.size(); ++gi) {
    const double gamma = gammas[gi];
    const bool with_init = gi % 2 == 1, with_fgrad = (gi / 2) % 2 == 1;
    const ref::State* init = with_init ? &in.init : nullptr;
    const Mat Q = keep_off_kink(in.Q, in.K, in.V, gamma, init);
    for (std::size_t ni = 0; ni < 4; ++ni) {
      if (!c.all_norms && ni % 2 != gi % 2) continue;  // half the normalisations per gamma
      const NormConfig& nc = kNorms[ni];
      const Grads expected = to_grads(ref::retention_backward(
          Q, in.K, in.V, gamma, nc.norm, init, in.G, with_fgrad ? &in.fgrad : nullptr, nc.detach));
      std::ostringstream os;
      os.precision(17);
      os << "T=" << c.T << " dk=" << c.dk << " dv=" << c.dv << " gamma=1-" << 1.0 - gamma
         << " norm=" << nc.name << (with_init ? " init" : "") << (with_fgrad ? " dS_final" : "");
      const double dz0_scale =
          nc.norm == Normalization::decay_and_score && !nc.detach
              ? dz0_condition_scale(Q, in, gamma, init, with_fgrad ? &in.fgrad : nullptr)
              : 0.0;
      check_all_forms<float>(in, Q, gamma, with_init, with_fgrad, nc, expected, dz0_scale,
                             os.str() + " float");
      check_all_forms<double>(in, Q, gamma, with_init, with_fgrad, nc, expected, dz0_scale,
                              os.str() + " double");
      if (HasFailure()) return;  // one broken case is enough to read
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Sweep, BackwardSweep,
                         ::testing::Range<std::size_t>(0, sizeof(kCases) / sizeof(kCases[0])),
                         [](const ::testing::TestParamInfo<std::size_t>& p) {
                           const Case& c = kCases[p.param];
                           return "T" + std::to_string(c.T) + "_dk" + std::to_string(c.dk) + "_dv" +
                                  std::to_string(c.dv);
                         });

// Any dense expression works as input and output (column blocks of one buffer, _into variants).
TEST(BackwardExpressions, BlocksAndIntoVariants) {
  const Index T = 19, dk = 3, dv = 2;
  const Matrix<double> qkvg = random_matrix<double>(T, 2 * dk + 2 * dv, 31);
  const double gamma = 0.9;
  const Mat Q = qkvg.leftCols(dk), K = qkvg.middleCols(dk, dk), V = qkvg.middleCols(2 * dk, dv),
            G = qkvg.rightCols(dv);
  const ref::Gradients want =
      ref::retention_backward(Q, K, V, gamma, Normalization::decay, nullptr, G, nullptr, false);
  RetentionBackwardOptions<double> opt;
  opt.normalization = Normalization::decay;
  const CausalDecay decay(gamma);
  Matrix<double> out = Matrix<double>::Zero(T, 2 * dk + dv + 1);
  auto dQ = out.leftCols(dk);
  auto dK = out.middleCols(dk, dk);
  auto dV = out.middleCols(2 * dk, dv);
  retention::chunkwise_retention_backward_into(qkvg.leftCols(dk), qkvg.middleCols(dk, dk),
                                               qkvg.middleCols(2 * dk, dv), decay, 4,
                                               qkvg.rightCols(dv), dQ, dK, dV, opt);
  EXPECT_LE(relative_error(dQ, want.dQ), 1e-12);
  EXPECT_LE(relative_error(dK, want.dK), 1e-12);
  EXPECT_LE(relative_error(dV, want.dV), 1e-12);
  EXPECT_EQ(out.col(2 * dk + dv).norm(), 0.0);  // nothing written outside the blocks
  retention::parallel_retention_backward_into(qkvg.leftCols(dk), qkvg.middleCols(dk, dk),
                                              qkvg.middleCols(2 * dk, dv), decay,
                                              qkvg.rightCols(dv), dQ, dK, dV, opt);
  EXPECT_LE(relative_error(dK, want.dK), 1e-12);
  retention::recurrent_retention_backward_into(qkvg.leftCols(dk), qkvg.middleCols(dk, dk),
                                               qkvg.middleCols(2 * dk, dv), decay,
                                               qkvg.rightCols(dv), dQ, dK, dV, opt);
  EXPECT_LE(relative_error(dV, want.dV), 1e-12);
  // Without an initial state there is no initial-state gradient.
  const auto g = retention::parallel_retention_backward(Q, K, V, decay, G, opt);
  EXPECT_EQ(g.d_initial_state.S.size(), 0);
  EXPECT_EQ(g.d_initial_state.z.size(), 0);
}

// Column-major inputs and outputs run the same kernels as row-major ones (core.hpp ConstRows /
// Rows): bit-identical gradients in every form, float inputs, decay_and_score.
TEST(BackwardExpressions, ColumnMajorOperandsGiveBitIdenticalGradients) {
  using ColMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic>;
  const Index T = 29, dk = 4, dv = 3;
  const Matrix<float> Q = random_matrix<float>(T, dk, 41), K = random_matrix<float>(T, dk, 42),
                      V = random_matrix<float>(T, dv, 43), G = random_matrix<float>(T, dv, 44);
  const ColMajor Qc = Q, Kc = K, Vc = V, Gc = G;
  RetentionBackwardOptions<float> opt;
  opt.normalization = Normalization::decay_and_score;
  const CausalDecay decay(0.95);
  for (int form = 0; form < 3; ++form) {
    const auto run = [&](const auto& q, const auto& k, const auto& v, const auto& g, auto& dq,
                         auto& dk_, auto& dv_) {
      if (form == 0)
        retention::parallel_retention_backward_into(q, k, v, decay, g, dq, dk_, dv_, opt);
      else if (form == 1)
        retention::chunkwise_retention_backward_into(q, k, v, decay, 8, g, dq, dk_, dv_, opt);
      else
        retention::recurrent_retention_backward_into(q, k, v, decay, g, dq, dk_, dv_, opt);
    };
    Matrix<float> dQ(T, dk), dK(T, dk), dV(T, dv);
    run(Q, K, V, G, dQ, dK, dV);
    ColMajor cQ(T, dk), cK(T, dk), cV(T, dv);
    run(Qc, Kc, Vc, Gc, cQ, cK, cV);
    EXPECT_TRUE(Matrix<float>(cQ) == dQ) << "form " << form;
    EXPECT_TRUE(Matrix<float>(cK) == dK) << "form " << form;
    EXPECT_TRUE(Matrix<float>(cV) == dV) << "form " << form;
    EXPECT_TRUE(dQ.allFinite() && dK.allFinite() && dV.allFinite()) << "form " << form;
  }
}

// Long sequences with fast decay: factors underflow to 0 far from the diagonal (float, gamma = 0.9:
// beyond about 830 tokens; 0.5: beyond 126), where the parallel form skips keys; never NaN.
TEST(BackwardLongSequence, FastDecayStaysFinite) {
  const Index T = 1500, dk = 4, dv = 4;
  const Inputs in = make_inputs(T, dk, dv, 4242);
  for (double gamma : {0.5, 0.9}) {
    const Mat Q = keep_off_kink(in.Q, in.K, in.V, gamma, &in.init);
    const Grads p =
        run_form<float, float>(FormKind::parallel, 0, in, Q, gamma, true, true, kNorms[2]);
    const Grads c =
        run_form<float, float>(FormKind::chunkwise, 64, in, Q, gamma, true, true, kNorms[2]);
    const Grads r =
        run_form<float, float>(FormKind::recurrent, 0, in, Q, gamma, true, true, kNorms[2]);
    EXPECT_TRUE(p.dQ.allFinite() && p.dK.allFinite() && p.dV.allFinite());
    const double scale = dz0_condition_scale(Q, in, gamma, &in.init, &in.fgrad);
    EXPECT_LE(grad_error(c, p, scale), 1e-5) << gamma;
    EXPECT_LE(grad_error(r, p, scale), 1e-5) << gamma;
  }
}

// Float inputs with a double state (SPEC 1's wider accumulator) in every form, at a head whose
// per-step factor float cannot apply (1 - 2^-26 rounds to 1 in float): the double reference's
// gradients to the plain float tolerance.
TEST(BackwardWideState, FloatInputsDoubleStateEveryForm) {
  const Index T = 300, dk = 6, dv = 5;
  const Inputs in = make_inputs(T, dk, dv, 9090);
  const double gamma = 1.0 - std::ldexp(1.0, -26);
  const Mat Q = keep_off_kink(in.Q, in.K, in.V, gamma, &in.init);
  for (const NormConfig& nc : kNorms) {
    const Grads want = to_grads(ref::retention_backward(Q, in.K, in.V, gamma, nc.norm, &in.init,
                                                        in.G, &in.fgrad, nc.detach));
    const double scale = nc.norm == Normalization::decay_and_score && !nc.detach
                             ? dz0_condition_scale(Q, in, gamma, &in.init, &in.fgrad)
                             : 0.0;
    for (FormKind kind : {FormKind::parallel, FormKind::recurrent, FormKind::chunkwise}) {
      const Grads g = run_form<float, double>(kind, 16, in, Q, gamma, true, true, nc);
      EXPECT_LE(grad_error(g, want, scale), 1e-5) << nc.name << " form " << static_cast<int>(kind);
    }
  }
}

class SweepSummary : public ::testing::Environment {
 public:
  void TearDown() override {
    const char* names[2] = {"float", "double"};
    for (int i = 0; i < 2; ++i) {
      const Worst& w = g_worst[i];
      if (w.runs == 0) continue;
      std::cout << "[sweep] " << names[i] << ": runs " << w.runs << ", worst vs reference "
                << w.vs_reference << ", worst between forms " << w.between_forms;
      if (i == 0)
        std::cout << ", worst where SPEC 1 drift applies " << w.drift
                  << ", those with a double state " << w.wide_state;
      std::cout << "\n";
    }
  }
};
[[maybe_unused]] ::testing::Environment* const kSummary =
    ::testing::AddGlobalTestEnvironment(new SweepSummary);

}  // namespace
