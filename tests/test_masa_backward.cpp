// retention-test-links: compiled
// MaSA / MaSAD training kernels (SPEC 4, 7): forward_train against the library's forward and the
// naive reference, backward against the naive double reference backward and against central finite
// differences of the reference forward, for both separable masks, odd grids, dims of 1, gamma = 1
// and every tiling; multi-head and threaded calls against single-head calls; bad input.
#include <retention/masa.hpp>
#include <retention/masa_backward.hpp>

#include "reference/masa_backward_reference.hpp"
#include "reference/rmt_reference.hpp"
#include "support/isa_support.hpp"
#include "support/test_support.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace {

using masa_backward_reference::MaskKind;
using retention::Index;
using retention::Matrix;
using retention::Vector;
using retention_test::random_matrix;
using retention_test::relative_error;
using retention_test::spec_tolerance;
using Mat = retention::Matrix<double>;
namespace ref = masa_backward_reference;

template <class T>
class MasaBackwardTest : public ::testing::Test {};
TYPED_TEST_SUITE(MasaBackwardTest, retention_test::ScalarTypes, retention_test::ScalarName);

struct Case {
  Index height, width, dk, dv;
  double gamma;
};

// Odd sides, single rows / columns / token, dims of 1 and ragged dims, gamma = 1.
const std::vector<Case>& cases() {
  static const std::vector<Case> c = {
      {7, 9, 5, 13, 0.9}, {1, 5, 3, 1, 1.0}, {5, 1, 1, 4, 0.75}, {1, 1, 2, 3, 0.9},
      {3, 3, 1, 1, 0.5},  {3, 3, 8, 7, 1.0}, {2, 40, 3, 2, 0.9}, {40, 2, 2, 3, 0.96875},
      {4, 6, 16, 5, 0.8}, {7, 9, 1, 2, 1.0}};
  return c;
}

const MaskKind kinds[] = {MaskKind::manhattan, MaskKind::quadrant_causal};

const char* name(MaskKind k) { return k == MaskKind::manhattan ? "manhattan" : "quadrant"; }

/// Calls f with the library mask of the given kind.
template <class F>
void with_mask(MaskKind kind, double gamma, Index H, Index W, F&& f) {
  if (kind == MaskKind::manhattan)
    f(retention::ManhattanDecay(gamma, H, W));
  else
    f(retention::QuadrantCausalDecay(gamma, H, W));
}

std::vector<retention::MasaTrainOptions> tilings() {
  std::vector<retention::MasaTrainOptions> t(4);
  t[1].query_tile = t[1].key_tile = 1;
  t[2].query_tile = 5;
  t[2].key_tile = 7;
  t[3].query_tile = 16;
  t[3].key_tile = 3;
  return t;
}

/// Worst error seen by a test, printed at its end (for the report, not asserted on).
struct Worst {
  const char* what;
  double value = 0.0;
  explicit Worst(const char* w) : what(w) {}
  double operator()(double e) {
    value = std::max(value, e);
    return e;
  }
  ~Worst() { std::printf("[ worst    ] %s: %.3g\n", what, value); }
};

template <class T>
Mat to_double(const Matrix<T>& m) {
  return m.template cast<double>();
}
template <class T>
Mat to_double(const Vector<T>& v) {
  return v.template cast<double>();
}

/// Q, K (scale 2), V and G of a case from four consecutive seeds after `seed` (advanced), and
/// their double copies for the reference.
template <class T>
struct Inputs {
  Matrix<T> Q, K, V, G;
  Mat Qd, Kd, Vd, Gd;
  Inputs(const Case& c, std::uint64_t& seed) {
    const Index N = c.height * c.width;
    Q = random_matrix<T>(N, c.dk, ++seed, 2.0);
    K = random_matrix<T>(N, c.dk, ++seed, 2.0);
    V = random_matrix<T>(N, c.dv, ++seed);
    G = random_matrix<T>(N, c.dv, ++seed);
    Qd = to_double(Q), Kd = to_double(K), Vd = to_double(V), Gd = to_double(G);
  }
};

/// "<isa> <mask> HxW dk .. dv .." for a failure message.
std::string describe(retention::Isa isa, MaskKind kind, const Case& c) {
  return std::string(retention::to_string(isa)) + " " + name(kind) + " " +
         std::to_string(c.height) + "x" + std::to_string(c.width) + " dk " + std::to_string(c.dk) +
         " dv " + std::to_string(c.dv);
}

TYPED_TEST(MasaBackwardTest, ForwardTrainEqualsLibraryForward) {
  using T = TypeParam;
  Worst worst("forward_train vs masa()/masad()");
  std::uint64_t seed = 10;
  for (const Case& c : cases()) {
    const Index N = c.height * c.width;
    const Matrix<T> Q = random_matrix<T>(N, c.dk, ++seed), K = random_matrix<T>(N, c.dk, ++seed);
    const Matrix<T> V = random_matrix<T>(N, c.dv, ++seed);
    const retention::ManhattanDecay decay(c.gamma, c.height, c.width);
    for (const auto& opt : tilings()) {
      const auto f = retention::masa_forward_train(Q, K, V, decay, opt);
      EXPECT_LE(worst(relative_error(f.out, retention::masa(Q, K, V, decay))), spec_tolerance<T>())
          << c.height << "x" << c.width;
      const auto d = retention::masad_forward_train(Q, K, V, decay, opt);
      const Matrix<T> plain = retention::masad(Q, K, V, c.gamma, c.height, c.width);
      EXPECT_LE(worst(relative_error(d.out, plain)), spec_tolerance<T>())
          << c.height << "x" << c.width;
      // The same line kernels: the training forward's output is masad()'s to the bit.
      EXPECT_TRUE(d.out == plain) << c.height << "x" << c.width;
    }
  }
}

// out, lse (MaSA) and out, u, both lse (MaSAD) against the reference, both masks.
TYPED_TEST(MasaBackwardTest, ForwardTrainMatchesReference) {
  using T = TypeParam;
  Worst worst("forward_train vs reference (out, u, lse)");
  std::uint64_t seed = 100;
  for (const Case& c : cases())
    for (MaskKind kind : kinds) {
      const Index N = c.height * c.width;
      const Matrix<T> Q = random_matrix<T>(N, c.dk, ++seed, 2.0);
      const Matrix<T> K = random_matrix<T>(N, c.dk, ++seed, 2.0);
      const Matrix<T> V = random_matrix<T>(N, c.dv, ++seed);
      const Mat Qd = to_double(Q), Kd = to_double(K), Vd = to_double(V);
      const ref::Attention a = ref::masa(Qd, Kd, Vd, kind, c.gamma, c.height, c.width);
      const ref::Masad d = ref::masad(Qd, Kd, Vd, kind, c.gamma, c.height, c.width);
      with_mask(kind, c.gamma, c.height, c.width, [&](const auto& mask) {
        for (const auto& opt : tilings()) {
          const auto f = retention::masa_forward_train(Q, K, V, mask, opt);
          const auto g = retention::masad_forward_train(Q, K, V, mask, opt);
          EXPECT_LE(worst(relative_error(f.out, a.O)), spec_tolerance<T>()) << name(kind);
          EXPECT_LE(worst(relative_error(to_double(f.lse), a.lse)), spec_tolerance<T>());
          EXPECT_LE(worst(relative_error(g.out, d.O)), spec_tolerance<T>()) << name(kind);
          EXPECT_LE(worst(relative_error(g.u, d.u)), spec_tolerance<T>());
          EXPECT_LE(worst(relative_error(to_double(g.row_lse), d.row_lse)), spec_tolerance<T>());
          EXPECT_LE(worst(relative_error(to_double(g.column_lse), d.column_lse)),
                    spec_tolerance<T>());
        }
      });
    }
}

// The reference's Manhattan forward is the one rmt_reference checks the library against.
TEST(MasaBackwardReference, ManhattanForwardEqualsRmtReference) {
  const Index H = 4, W = 5, N = H * W;
  const Mat Q = random_matrix<double>(N, 3, 1), K = random_matrix<double>(N, 3, 2),
            V = random_matrix<double>(N, 2, 3);
  EXPECT_LE(relative_error(ref::masa(Q, K, V, MaskKind::manhattan, 0.8, H, W).O,
                           rmt_reference::masa(Q, K, V, 0.8, H, W)),
            1e-14);
  EXPECT_LE(relative_error(ref::masad(Q, K, V, MaskKind::manhattan, 0.8, H, W).O,
                           rmt_reference::masad(Q, K, V, 0.8, H, W)),
            1e-14);
}

TYPED_TEST(MasaBackwardTest, BackwardMatchesReference) {
  using T = TypeParam;
  Worst worst_masa("masa_backward vs reference"), worst_masad("masad_backward vs reference");
  std::uint64_t seed = 200;
  for (const Case& c : cases())
    for (MaskKind kind : kinds) {
      const Inputs<T> in(c, seed);
      const Matrix<T>&Q = in.Q, &K = in.K, &V = in.V, &G = in.G;
      const Mat &Qd = in.Qd, &Kd = in.Kd, &Vd = in.Vd, &Gd = in.Gd;
      const ref::Grads a = ref::masa_backward(Qd, Kd, Vd, kind, c.gamma, c.height, c.width, Gd);
      const ref::Grads d = ref::masad_backward(Qd, Kd, Vd, kind, c.gamma, c.height, c.width, Gd);
      with_mask(kind, c.gamma, c.height, c.width, [&](const auto& mask) {
        for (const auto& opt : tilings()) {
          const auto saved = retention::masa_forward_train(Q, K, V, mask, opt);
          const auto ga = retention::masa_backward(Q, K, V, mask, G, saved, opt);
          EXPECT_LE(worst_masa(relative_error(ga.dQ, a.dQ)), spec_tolerance<T>())
              << name(kind) << " " << c.height << "x" << c.width << " dk " << c.dk << " dv " << c.dv
              << " tiles " << opt.query_tile << "/" << opt.key_tile;
          EXPECT_LE(worst_masa(relative_error(ga.dK, a.dK)), spec_tolerance<T>())
              << name(kind) << " " << c.height << "x" << c.width;
          EXPECT_LE(worst_masa(relative_error(ga.dV, a.dV)), spec_tolerance<T>())
              << name(kind) << " " << c.height << "x" << c.width;
          const auto dsaved = retention::masad_forward_train(Q, K, V, mask, opt);
          const auto gd = retention::masad_backward(Q, K, V, mask, G, dsaved, opt);
          EXPECT_LE(worst_masad(relative_error(gd.dQ, d.dQ)), spec_tolerance<T>())
              << name(kind) << " " << c.height << "x" << c.width << " dk " << c.dk << " dv " << c.dv
              << " tiles " << opt.query_tile << "/" << opt.key_tile;
          EXPECT_LE(worst_masad(relative_error(gd.dK, d.dK)), spec_tolerance<T>())
              << name(kind) << " " << c.height << "x" << c.width;
          EXPECT_LE(worst_masad(relative_error(gd.dV, d.dV)), spec_tolerance<T>())
              << name(kind) << " " << c.height << "x" << c.width;
        }
      });
    }
}

// MaSAD's training forward and backward run dispatched line kernels: every instruction-set
// variant against the reference, on lines from 1 token to longer than four vectors of any variant
// (70), odd grids and dims of 1, 17 and 33.
TYPED_TEST(MasaBackwardTest, MasadTrainingEveryIsaMatchesReference) {
  using T = TypeParam;
  const retention_test::IsaScope guard;
  const Case lines[] = {{3, 70, 17, 5, 0.9}, {70, 2, 1, 33, 0.95}, {7, 9, 33, 1, 1.0},
                        {1, 1, 2, 3, 0.8},   {9, 7, 16, 16, 0.75}, {1, 13, 4, 17, 0.9}};
  std::uint64_t seed = 2600;
  for (const Case& c : lines)
    for (MaskKind kind : kinds) {
      const Inputs<T> in(c, seed);
      const Matrix<T>&Q = in.Q, &K = in.K, &V = in.V, &G = in.G;
      const Mat &Qd = in.Qd, &Kd = in.Kd, &Vd = in.Vd, &Gd = in.Gd;
      const ref::Masad f = ref::masad(Qd, Kd, Vd, kind, c.gamma, c.height, c.width);
      const ref::Grads d = ref::masad_backward(Qd, Kd, Vd, kind, c.gamma, c.height, c.width, Gd);
      for (retention::Isa isa : retention_test::isa_variants()) {
        retention::set_active_isa(isa);
        const std::string what = describe(isa, kind, c);
        with_mask(kind, c.gamma, c.height, c.width, [&](const auto& mask) {
          const auto saved = retention::masad_forward_train(Q, K, V, mask);
          EXPECT_LE(relative_error(saved.out, f.O), spec_tolerance<T>()) << what;
          EXPECT_LE(relative_error(saved.u, f.u), spec_tolerance<T>()) << what;
          EXPECT_LE(relative_error(to_double(saved.row_lse), f.row_lse), spec_tolerance<T>())
              << what;
          EXPECT_LE(relative_error(to_double(saved.column_lse), f.column_lse), spec_tolerance<T>())
              << what;
          const auto g = retention::masad_backward(Q, K, V, mask, G, saved);
          EXPECT_LE(relative_error(g.dQ, d.dQ), spec_tolerance<T>()) << what;
          EXPECT_LE(relative_error(g.dK, d.dK), spec_tolerance<T>()) << what;
          EXPECT_LE(relative_error(g.dV, d.dV), spec_tolerance<T>()) << what;
        });
      }
    }
}

// MaSA's training forward and backward above masa_line_tokens (64) run masa()'s dispatched query
// tiles and the dispatched tile backward: every instruction-set variant against the reference, on
// odd grids of 72 to 117 tokens, dims of 1, 17 and 33, tiles that do not divide the grid (and a
// key tile wider than it), both masks (the quadrant-causal one skips tile pairs it removes whole).
// The training forward's output is masa()'s with the same tiles, to the bit.
TYPED_TEST(MasaBackwardTest, MasaTilesEveryIsaMatchesReference) {
  using T = TypeParam;
  const retention_test::IsaScope guard;
  const Case grids[] = {
      {9, 13, 17, 5, 0.9}, {13, 7, 1, 33, 1.0}, {8, 9, 16, 16, 0.75}, {5, 19, 33, 1, 0.96875}};
  std::vector<retention::MasaTrainOptions> tiles(3);
  tiles[1].query_tile = 5;
  tiles[1].key_tile = 7;
  tiles[2].query_tile = 24;
  tiles[2].key_tile = 1000;
  std::uint64_t seed = 2800;
  for (const Case& c : grids)
    for (MaskKind kind : kinds) {
      const Inputs<T> in(c, seed);
      const Matrix<T>&Q = in.Q, &K = in.K, &V = in.V, &G = in.G;
      const Mat &Qd = in.Qd, &Kd = in.Kd, &Vd = in.Vd, &Gd = in.Gd;
      const ref::Attention f = ref::masa(Qd, Kd, Vd, kind, c.gamma, c.height, c.width);
      const ref::Grads d = ref::masa_backward(Qd, Kd, Vd, kind, c.gamma, c.height, c.width, Gd);
      for (retention::Isa isa : retention_test::isa_variants()) {
        retention::set_active_isa(isa);
        for (const auto& opt : tiles) {
          const std::string what = describe(isa, kind, c) + " tiles " +
                                   std::to_string(opt.query_tile) + "/" +
                                   std::to_string(opt.key_tile);
          with_mask(kind, c.gamma, c.height, c.width, [&](const auto& mask) {
            const auto saved = retention::masa_forward_train(Q, K, V, mask, opt);
            EXPECT_LE(relative_error(saved.out, f.O), spec_tolerance<T>()) << what;
            EXPECT_LE(relative_error(to_double(saved.lse), f.lse), spec_tolerance<T>()) << what;
            retention::MasaOptions plain;
            plain.query_tile = opt.query_tile;
            plain.key_tile = opt.key_tile;
            EXPECT_TRUE(saved.out == retention::masa(Q, K, V, mask, plain)) << what;
            const auto g = retention::masa_backward(Q, K, V, mask, G, saved, opt);
            EXPECT_LE(relative_error(g.dQ, d.dQ), spec_tolerance<T>()) << what;
            EXPECT_LE(relative_error(g.dK, d.dK), spec_tolerance<T>()) << what;
            EXPECT_LE(relative_error(g.dV, d.dV), spec_tolerance<T>()) << what;
          });
        }
      }
    }
}

// The line backward checks the inputs it reads, not only the saved state: a NaN value under
// QuadrantCausalDecay with the state saved by a clean forward still reaches only the gradients
// that depend on it (the lines would otherwise meet it as 0 * NaN at every masked pair).
TYPED_TEST(MasaBackwardTest, MasadBackwardChecksInputsBesideSavedState) {
  using T = TypeParam;
  const Index H = 4, W = 5, N = H * W;
  const Matrix<T> Q = random_matrix<T>(N, 3, 2701), K = random_matrix<T>(N, 3, 2702);
  const Matrix<T> V = random_matrix<T>(N, 2, 2703), G = random_matrix<T>(N, 2, 2704);
  const retention::QuadrantCausalDecay mask(0.9, H, W);
  const auto saved = retention::masad_forward_train(Q, K, V, mask);
  const auto clean = retention::masad_backward(Q, K, V, mask, G, saved);
  Matrix<T> bad = V;
  // The last token of the first grid row: along its row only it weighs its own value, and the
  // queries left of it (their rows and columns) never reach it.
  bad(W - 1, 1) = std::numeric_limits<T>::quiet_NaN();
  const auto g = retention::masad_backward(Q, K, bad, mask, G, saved);
  const Matrix<T> got = g.dQ.topRows(W - 1), want = clean.dQ.topRows(W - 1);
  ASSERT_TRUE(got.allFinite()) << got;
  EXPECT_LE(relative_error(got, want), spec_tolerance<T>());
}

// The overloads without saved state run the forward themselves: same gradients.
TYPED_TEST(MasaBackwardTest, RecomputingOverloadsEqualSaved) {
  using T = TypeParam;
  const Index H = 5, W = 7, N = H * W;
  const Matrix<T> Q = random_matrix<T>(N, 6, 301), K = random_matrix<T>(N, 6, 302);
  const Matrix<T> V = random_matrix<T>(N, 3, 303), G = random_matrix<T>(N, 3, 304);
  for (MaskKind kind : kinds)
    with_mask(kind, 0.85, H, W, [&](const auto& mask) {
      const auto a =
          retention::masa_backward(Q, K, V, mask, G, retention::masa_forward_train(Q, K, V, mask));
      const auto b = retention::masa_backward(Q, K, V, mask, G);
      EXPECT_EQ(a.dQ, b.dQ);
      EXPECT_EQ(a.dK, b.dK);
      EXPECT_EQ(a.dV, b.dV);
      const auto c = retention::masad_backward(Q, K, V, mask, G,
                                               retention::masad_forward_train(Q, K, V, mask));
      const auto d = retention::masad_backward(Q, K, V, mask, G);
      EXPECT_EQ(c.dQ, d.dQ);
      EXPECT_EQ(c.dK, d.dK);
      EXPECT_EQ(c.dV, d.dV);
    });
}

/// Central differences of loss = sum(Wt (.) O(Q, K, V)) of the reference forward at a handful of
/// entries of Q, K and V, next to the analytic gradients' entries there.
template <class Forward>
void finite_differences(const Mat& Q, const Mat& K, const Mat& V, const Mat& Wt, Forward forward,
                        const ref::Grads& analytic, std::uint64_t seed, std::vector<double>& fd,
                        std::vector<double>& an) {
  const double h = 1e-6;
  std::mt19937_64 rng(seed);
  const auto loss = [&](const Mat& q, const Mat& k, const Mat& v) {
    return (Wt.array() * forward(q, k, v).array()).sum();
  };
  for (int which = 0; which < 3; ++which) {
    const Mat& X = which == 0 ? Q : which == 1 ? K : V;
    const Mat& dX = which == 0 ? analytic.dQ : which == 1 ? analytic.dK : analytic.dV;
    for (int t = 0; t < 6; ++t) {
      const Index i = static_cast<Index>(rng() % static_cast<std::uint64_t>(X.rows()));
      const Index j = static_cast<Index>(rng() % static_cast<std::uint64_t>(X.cols()));
      Mat plus = X, minus = X;
      plus(i, j) += h;
      minus(i, j) -= h;
      const double lp = which == 0   ? loss(plus, K, V)
                        : which == 1 ? loss(Q, plus, V)
                                     : loss(Q, K, plus);
      const double lm = which == 0   ? loss(minus, K, V)
                        : which == 1 ? loss(Q, minus, V)
                                     : loss(Q, K, minus);
      fd.push_back((lp - lm) / (2 * h));
      an.push_back(dX(i, j));
    }
  }
}

TEST(MasaBackwardFiniteDifferences, MasaAndMasadMatchCentralDifferences) {
  Worst worst("finite differences vs backward (double)");
  std::uint64_t seed = 400;
  for (const Case& c : cases())
    for (MaskKind kind : kinds) {
      const Index N = c.height * c.width;
      const Mat Q = random_matrix<double>(N, c.dk, ++seed),
                K = random_matrix<double>(N, c.dk, ++seed);
      const Mat V = random_matrix<double>(N, c.dv, ++seed);
      const Mat Wt = random_matrix<double>(N, c.dv, ++seed);
      with_mask(kind, c.gamma, c.height, c.width, [&](const auto& mask) {
        const auto ga = retention::masa_backward(Q, K, V, mask, Wt);
        const auto gd = retention::masad_backward(Q, K, V, mask, Wt);
        std::vector<double> fd, an;
        finite_differences(
            Q, K, V, Wt,
            [&](const Mat& q, const Mat& k, const Mat& v) {
              return ref::masa(q, k, v, kind, c.gamma, c.height, c.width).O;
            },
            {ga.dQ, ga.dK, ga.dV}, seed, fd, an);
        EXPECT_LE(worst(relative_error(
                      Eigen::Map<const Eigen::VectorXd>(an.data(), static_cast<Index>(an.size())),
                      Eigen::Map<const Eigen::VectorXd>(fd.data(), static_cast<Index>(fd.size())))),
                  1e-6)
            << "masa " << name(kind) << " " << c.height << "x" << c.width;
        fd.clear();
        an.clear();
        finite_differences(
            Q, K, V, Wt,
            [&](const Mat& q, const Mat& k, const Mat& v) {
              return ref::masad(q, k, v, kind, c.gamma, c.height, c.width).O;
            },
            {gd.dQ, gd.dK, gd.dV}, seed + 7, fd, an);
        EXPECT_LE(worst(relative_error(
                      Eigen::Map<const Eigen::VectorXd>(an.data(), static_cast<Index>(an.size())),
                      Eigen::Map<const Eigen::VectorXd>(fd.data(), static_cast<Index>(fd.size())))),
                  1e-6)
            << "masad " << name(kind) << " " << c.height << "x" << c.width;
      });
    }
}

/// A fused [B * N, heads * (dk + dk + dv)] buffer holding q | k | v, seen as three strided views.
template <class T>
struct FusedQkv {
  Index batch, tokens, heads, dk, dv;
  Matrix<T> buf;
  FusedQkv(Index b, Index n, Index h, Index dk_, Index dv_, std::uint64_t seed)
      : batch(b),
        tokens(n),
        heads(h),
        dk(dk_),
        dv(dv_),
        buf(random_matrix<T>(b * n, h * (2 * dk_ + dv_), seed, 2.0)) {}
  Index ld() const { return buf.cols(); }
  retention::HeadsView<const T> view(Index col0, Index dim) const {
    return {buf.data() + col0, batch, tokens, heads, dim, tokens * ld(), ld(), dim};
  }
  retention::HeadsView<const T> q() const { return view(0, dk); }
  retention::HeadsView<const T> k() const { return view(heads * dk, dk); }
  retention::HeadsView<const T> v() const { return view(2 * heads * dk, dv); }
  Matrix<T> Q(Index b, Index h) const { return buf.block(b * tokens, h * dk, tokens, dk); }
  Matrix<T> K(Index b, Index h) const {
    return buf.block(b * tokens, heads * dk + h * dk, tokens, dk);
  }
  Matrix<T> V(Index b, Index h) const {
    return buf.block(b * tokens, 2 * heads * dk + h * dv, tokens, dv);
  }
};

/// [B * N, heads * dim] dense buffer and its [B, N, heads, dim] view.
template <class T>
struct Dense {
  Index tokens, dim;
  Matrix<T> buf;
  Dense(Index b, Index n, Index h, Index d) : tokens(n), dim(d), buf(b * n, h * d) {
    buf.setConstant(std::numeric_limits<T>::quiet_NaN());  // every element must be written
  }
  retention::HeadsView<T> view() {
    return retention::heads_view(buf.data(), buf.rows() / tokens, tokens, buf.cols() / dim, dim);
  }
  Matrix<T> head(Index b, Index h) const { return buf.block(b * tokens, h * dim, tokens, dim); }
  Vector<T> vec(Index b, Index h) const { return head(b, h).col(0); }
};

/// Multi-head forward_train and backward (saved and recomputing) against the single-head calls,
/// with per-head gammas and masks of either kind; `threads` for the multi-head calls.
template <class T>
void check_multi_head(MaskKind kind, Index batch, Index H, Index W, Index heads, Index dk, Index dv,
                      int threads, const retention::MasaTrainOptions& base, std::uint64_t seed) {
  const Index N = H * W;
  retention::MasaTrainOptions opt = base;
  opt.threads = threads;
  const FusedQkv<T> qkv(batch, N, heads, dk, dv, seed);
  const Matrix<T> g_buf = random_matrix<T>(batch * N, heads * dv, seed + 1);
  const auto d_out = retention::heads_view(g_buf.data(), batch, N, heads, dv);
  std::vector<double> gammas;
  for (Index h = 0; h < heads; ++h)
    gammas.push_back(h == 0 ? 1.0 : 1.0 - 0.1 * static_cast<double>(h));
  const auto run = [&](const auto& masks) {
    Dense<T> out(batch, N, heads, dv), lse(batch, N, heads, 1), dq(batch, N, heads, dk),
        dk_(batch, N, heads, dk), dvv(batch, N, heads, dv), dq2(batch, N, heads, dk),
        dk2(batch, N, heads, dk), dv2(batch, N, heads, dv);
    Dense<T> dout(batch, N, heads, dv), u(batch, N, heads, dv), rl(batch, N, heads, 1),
        cl(batch, N, heads, 1), ddq(batch, N, heads, dk), ddk(batch, N, heads, dk),
        ddv(batch, N, heads, dv), ddq2(batch, N, heads, dk), ddk2(batch, N, heads, dk),
        ddv2(batch, N, heads, dv);
    retention::multi_head_masa_forward_train(qkv.q(), qkv.k(), qkv.v(), masks, out.view(),
                                             lse.view(), opt);
    retention::multi_head_masa_backward(qkv.q(), qkv.k(), qkv.v(), masks, out.view().as_const(),
                                        lse.view().as_const(), d_out, dq.view(), dk_.view(),
                                        dvv.view(), opt);
    retention::multi_head_masa_backward(qkv.q(), qkv.k(), qkv.v(), masks, d_out, dq2.view(),
                                        dk2.view(), dv2.view(), opt);
    retention::multi_head_masad_forward_train(qkv.q(), qkv.k(), qkv.v(), masks, dout.view(),
                                              u.view(), rl.view(), cl.view(), opt);
    retention::multi_head_masad_backward(
        qkv.q(), qkv.k(), qkv.v(), masks, dout.view().as_const(), u.view().as_const(),
        rl.view().as_const(), cl.view().as_const(), d_out, ddq.view(), ddk.view(), ddv.view(), opt);
    retention::multi_head_masad_backward(qkv.q(), qkv.k(), qkv.v(), masks, d_out, ddq2.view(),
                                         ddk2.view(), ddv2.view(), opt);
    retention::MasaTrainOptions single = base;
    single.threads = 1;
    for (Index b = 0; b < batch; ++b)
      for (Index h = 0; h < heads; ++h) {
        const auto& mask = masks[static_cast<std::size_t>(h)];
        const Matrix<T> Q = qkv.Q(b, h), K = qkv.K(b, h), V = qkv.V(b, h);
        const Matrix<T> G = g_buf.block(b * N, h * dv, N, dv);
        const auto f = retention::masa_forward_train(Q, K, V, mask, single);
        const auto g = retention::masa_backward(Q, K, V, mask, G, f, single);
        // The same kernel on the same data: equal to the last bit.
        EXPECT_EQ(out.head(b, h), f.out) << "image " << b << " head " << h;
        EXPECT_EQ(lse.vec(b, h), f.lse);
        EXPECT_EQ(dq.head(b, h), g.dQ);
        EXPECT_EQ(dk_.head(b, h), g.dK);
        EXPECT_EQ(dvv.head(b, h), g.dV);
        EXPECT_EQ(dq2.head(b, h), g.dQ);
        EXPECT_EQ(dk2.head(b, h), g.dK);
        EXPECT_EQ(dv2.head(b, h), g.dV);
        const auto fd = retention::masad_forward_train(Q, K, V, mask, single);
        const auto gd = retention::masad_backward(Q, K, V, mask, G, fd, single);
        EXPECT_EQ(dout.head(b, h), fd.out);
        EXPECT_EQ(u.head(b, h), fd.u);
        EXPECT_EQ(rl.vec(b, h), fd.row_lse);
        EXPECT_EQ(cl.vec(b, h), fd.column_lse);
        EXPECT_EQ(ddq.head(b, h), gd.dQ);
        EXPECT_EQ(ddk.head(b, h), gd.dK);
        EXPECT_EQ(ddv.head(b, h), gd.dV);
        EXPECT_EQ(ddq2.head(b, h), gd.dQ);
        EXPECT_EQ(ddk2.head(b, h), gd.dK);
        EXPECT_EQ(ddv2.head(b, h), gd.dV);
      }
  };
  if (kind == MaskKind::manhattan) {
    std::vector<retention::ManhattanDecay> masks;
    for (double g : gammas) masks.emplace_back(g, H, W);
    run(masks);
  } else {
    std::vector<retention::QuadrantCausalDecay> masks;
    for (double g : gammas) masks.emplace_back(g, H, W);
    run(masks);
  }
}

TYPED_TEST(MasaBackwardTest, MultiHeadEqualsSingleHead) {
  using T = TypeParam;
  retention::MasaTrainOptions opt;
  opt.query_tile = 6;
  opt.key_tile = 10;
  for (MaskKind kind : kinds) {
    check_multi_head<T>(kind, 2, 5, 7, 3, 4, 6, 1, opt, 500);
    check_multi_head<T>(kind, 1, 1, 1, 2, 1, 1, 2, opt, 510);
    check_multi_head<T>(kind, 2, 3, 1, 1, 3, 2, 2, retention::MasaTrainOptions(), 520);
  }
}

// Grids large enough that the thread rule gives a team of 2 (the work per thread is above
// detail::min_flops_per_thread): results still equal the serial single-head calls bit for bit.
TYPED_TEST(MasaBackwardTest, ThreadedMultiHeadEqualsSingleHead) {
  using T = TypeParam;
  check_multi_head<T>(MaskKind::manhattan, 2, 20, 20, 3, 16, 16, 2, retention::MasaTrainOptions(),
                      600);
  check_multi_head<T>(MaskKind::quadrant_causal, 2, 40, 40, 3, 16, 16, 2,
                      retention::MasaTrainOptions(), 610);
}

// Strong decay (ln D far below any logit) and large logits: gradients stay finite and correct.
TYPED_TEST(MasaBackwardTest, StrongDecayAndLargeLogitsStayFinite) {
  using T = TypeParam;
  const Index H = 6, W = 7, N = H * W;
  const Matrix<T> Q = random_matrix<T>(N, 4, 701, 4.0), K = random_matrix<T>(N, 4, 702, 4.0);
  const Matrix<T> V = random_matrix<T>(N, 3, 703), G = random_matrix<T>(N, 3, 704);
  const Mat Qd = to_double(Q), Kd = to_double(K), Vd = to_double(V), Gd = to_double(G);
  for (MaskKind kind : kinds)
    for (double gamma : {1e-300, 1e-3}) {
      with_mask(kind, gamma, H, W, [&](const auto& mask) {
        const auto a = retention::masa_backward(Q, K, V, mask, G);
        const auto d = retention::masad_backward(Q, K, V, mask, G);
        ASSERT_TRUE(a.dQ.allFinite() && a.dK.allFinite() && a.dV.allFinite()) << name(kind);
        ASSERT_TRUE(d.dQ.allFinite() && d.dK.allFinite() && d.dV.allFinite()) << name(kind);
        if (gamma < 1e-100) return;  // the reference's ln D is -inf times 0 there
        const ref::Grads ra = ref::masa_backward(Qd, Kd, Vd, kind, gamma, H, W, Gd);
        const ref::Grads rd = ref::masad_backward(Qd, Kd, Vd, kind, gamma, H, W, Gd);
        // Logits of size ~60 carry float rounding ~1e-5 absolute.
        const double tol = sizeof(T) == sizeof(double) ? 1e-11 : 1e-4;
        EXPECT_LE(relative_error(a.dQ, ra.dQ), tol);
        EXPECT_LE(relative_error(a.dK, ra.dK), tol);
        EXPECT_LE(relative_error(a.dV, ra.dV), tol);
        EXPECT_LE(relative_error(d.dQ, rd.dQ), tol);
        EXPECT_LE(relative_error(d.dK, rd.dK), tol);
        EXPECT_LE(relative_error(d.dV, rd.dV), tol);
      });
    }
}

// Expressions (not only plain matrices) are accepted and give the same gradients.
TYPED_TEST(MasaBackwardTest, AcceptsExpressions) {
  using T = TypeParam;
  const Index H = 3, W = 4, N = H * W;
  const Matrix<T> Q = random_matrix<T>(N, 5, 801), K = random_matrix<T>(N, 5, 802);
  const Matrix<T> V = random_matrix<T>(N, 4, 803), G = random_matrix<T>(N, 2, 804);
  const retention::ManhattanDecay decay(0.9, H, W);
  const Matrix<T> Q2 = Q * T(2), V2 = V.leftCols(2);
  const auto a = retention::masa_backward(Q * T(2), K, V.leftCols(2), decay, G);
  const auto b = retention::masa_backward(Q2, K, V2, decay, G);
  EXPECT_LE(relative_error(a.dQ, b.dQ), spec_tolerance<T>());
  EXPECT_LE(relative_error(a.dV, b.dV), spec_tolerance<T>());
  const auto c = retention::masad_backward(Q * T(2), K, V.leftCols(2), decay, G);
  const auto d = retention::masad_backward(Q2, K, V2, decay, G);
  EXPECT_LE(relative_error(c.dK, d.dK), spec_tolerance<T>());
  EXPECT_LE(relative_error(c.dV, d.dV), spec_tolerance<T>());
}

TYPED_TEST(MasaBackwardTest, ShapeErrors) {
  using T = TypeParam;
  using retention_test::expect_shape_error;
  const Index H = 3, W = 4, N = H * W;
  const Matrix<T> Q = random_matrix<T>(N, 4, 1), K = random_matrix<T>(N, 4, 2),
                  V = random_matrix<T>(N, 3, 3), G = random_matrix<T>(N, 3, 4);
  const retention::ManhattanDecay decay(0.9, H, W);
  const retention::QuadrantCausalDecay quadrant(0.9, H, W);
  expect_shape_error(
      [&] { retention::masa_forward_train(Q, K, V, retention::ManhattanDecay(0.9, 4, 4)); },
      "masa_forward_train: Q is [12 x 4], expected [16 x *]");
  expect_shape_error([&] { retention::masad_forward_train(Q, K.leftCols(3), V, quadrant); },
                     "masad_forward_train: K is [12 x 3], expected [12 x 4]");
  expect_shape_error([&] { retention::masa_backward(Q, K, V, decay, G.leftCols(2)); },
                     "masa_backward: dO is [12 x 2], expected [12 x 3]");
  auto saved = retention::masa_forward_train(Q, K, V, decay);
  saved.lse.conservativeResize(N - 1);
  expect_shape_error([&] { retention::masa_backward(Q, K, V, decay, G, saved); },
                     "masa_backward: saved.lse is [11 x 1], expected [12 x 1]");
  const auto saved_other = retention::masa_forward_train(Q, K, V.leftCols(2), decay);
  expect_shape_error([&] { retention::masa_backward(Q, K, V, decay, G, saved_other); },
                     "masa_backward: saved.out is [12 x 2], expected [12 x 3]");
  auto dsaved = retention::masad_forward_train(Q, K, V, decay);
  dsaved.u.conservativeResize(N, 2);
  expect_shape_error([&] { retention::masad_backward(Q, K, V, decay, G, dsaved); },
                     "masad_backward: saved.u is [12 x 2], expected [12 x 3]");
  dsaved = retention::masad_forward_train(Q, K, V, decay);
  dsaved.column_lse.resize(3);
  expect_shape_error([&] { retention::masad_backward(Q, K, V, decay, G, dsaved); },
                     "masad_backward: saved.column_lse is [3 x 1], expected [12 x 1]");
  expect_shape_error([&] { retention::masad_backward(Q, K, V, decay, G.topRows(5)); },
                     "masad_backward: dO is [5 x 3], expected [12 x 3]");
  retention::MasaTrainOptions opt;
  opt.query_tile = 0;
  expect_shape_error([&] { retention::masa_backward(Q, K, V, decay, G, opt); },
                     "masa_backward: query_tile must be >= 1");
  opt.query_tile = 4;
  opt.key_tile = -2;
  expect_shape_error([&] { retention::masad_forward_train(Q, K, V, decay, opt); },
                     "masad_forward_train: key_tile must be >= 1");
  opt.key_tile = 4;
  opt.threads = -1;
  expect_shape_error([&] { retention::masad_backward(Q, K, V, decay, G, opt); },
                     "masad_backward: threads must be >= 0");

  // Multi-head: mask count, mask grids, view shapes.
  const Index heads = 2;
  const Matrix<T> qb = random_matrix<T>(N, heads * 4, 5), vb = random_matrix<T>(N, heads * 3, 6);
  Matrix<T> ob(N, heads * 3), lb(N, heads), qg(N, heads * 4), kg(N, heads * 4), vg(N, heads * 3);
  const auto q = retention::heads_view(qb.data(), 1, N, heads, 4);
  const auto v = retention::heads_view(vb.data(), 1, N, heads, 3);
  const auto o = retention::heads_view(ob.data(), 1, N, heads, 3);
  const auto l = retention::heads_view(lb.data(), 1, N, heads, 1);
  const auto dq = retention::heads_view(qg.data(), 1, N, heads, 4);
  const auto dk = retention::heads_view(kg.data(), 1, N, heads, 4);
  const auto dv = retention::heads_view(vg.data(), 1, N, heads, 3);
  const std::vector<retention::ManhattanDecay> two = {decay, decay};
  expect_shape_error(
      [&] {
        retention::multi_head_masa_forward_train(
            q, q, v, std::vector<retention::ManhattanDecay>{decay}, o, l);
      },
      "multi_head_masa_forward_train: masks has 1 entries, expected heads = 2");
  expect_shape_error(
      [&] {
        retention::multi_head_masad_backward(
            q, q, v, std::vector<retention::QuadrantCausalDecay>{quadrant, {0.9, 4, 3}}, v, dq, dk,
            dv);
      },
      "multi_head_masad_backward: masks[1] is a 4 x 3 grid, expected 3 x 4 like masks[0]");
  const std::vector<retention::ManhattanDecay> big = {{0.9, 4, 4}, {0.9, 4, 4}};
  expect_shape_error([&] { retention::multi_head_masa_backward(q, q, v, big, v, dq, dk, dv); },
                     "multi_head_masa_backward: q is [1, 12, 2, 4], expected [*, 16, *, *]");
  expect_shape_error(
      [&] {
        retention::multi_head_masa_backward(q, q, v, two, o.as_const(), o.as_const(), v, dq, dk,
                                            dv);
      },
      "multi_head_masa_backward: lse is [1, 12, 2, 3], expected [1, 12, 2, 1]");
  expect_shape_error([&] { retention::multi_head_masad_backward(q, q, v, two, v, dv, dk, dv); },
                     "multi_head_masad_backward: dq is [1, 12, 2, 3], expected [1, 12, 2, 4]");
  expect_shape_error([&] { retention::multi_head_masad_backward(q, v, v, two, v, dq, dk, dv); },
                     "multi_head_masad_backward: k is [1, 12, 2, 3], expected [1, 12, 2, 4]");
}

}  // namespace
