// MaSA and MaSAD (SPEC 4) against the naive double reference, against each other at q = 0, across
// tile sizes, through the multi-head entry points, and on bad input.
#include <retention/masa.hpp>

#include "reference/rmt_reference.hpp"
#include "support/test_support.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

using retention::Index;
using retention::Matrix;
using retention_test::random_matrix;
using retention_test::relative_error;
using retention_test::spec_tolerance;
using Mat = retention::Matrix<double>;

template <class T>
class MasaTest : public ::testing::Test {};
TYPED_TEST_SUITE(MasaTest, retention_test::ScalarTypes, retention_test::ScalarName);

struct Grid {
  Index height, width, dk, dv;
  double gamma;
};

const std::vector<Grid>& grids() {
  static const std::vector<Grid> g = {
      {1, 1, 4, 3, 0.9},    {1, 7, 8, 5, 0.75},    {5, 3, 6, 6, 0.96875}, {7, 1, 2, 3, 0.5},
      {8, 8, 16, 8, 0.875}, {13, 11, 8, 12, 0.99}, {6, 9, 4, 4, 1.0}};
  return g;
}

TYPED_TEST(MasaTest, MasaMatchesReference) {
  using T = TypeParam;
  std::uint64_t seed = 10;
  for (const Grid& g : grids()) {
    const Index N = g.height * g.width;
    const Matrix<T> Q = random_matrix<T>(N, g.dk, ++seed), K = random_matrix<T>(N, g.dk, ++seed);
    const Matrix<T> V = random_matrix<T>(N, g.dv, ++seed);
    const Mat ref = rmt_reference::masa(Q.template cast<double>(), K.template cast<double>(),
                                        V.template cast<double>(), g.gamma, g.height, g.width);
    const retention::ManhattanDecay decay(g.gamma, g.height, g.width);
    EXPECT_LE(relative_error(retention::masa(Q, K, V, decay), ref), spec_tolerance<T>())
        << g.height << "x" << g.width << " gamma " << g.gamma;
  }
}

TYPED_TEST(MasaTest, MasadMatchesReference) {
  using T = TypeParam;
  std::uint64_t seed = 100;
  for (const Grid& g : grids()) {
    const Index N = g.height * g.width;
    const Matrix<T> Q = random_matrix<T>(N, g.dk, ++seed), K = random_matrix<T>(N, g.dk, ++seed);
    const Matrix<T> V = random_matrix<T>(N, g.dv, ++seed);
    const Mat ref = rmt_reference::masad(Q.template cast<double>(), K.template cast<double>(),
                                         V.template cast<double>(), g.gamma, g.height, g.width);
    EXPECT_LE(relative_error(retention::masad(Q, K, V, g.gamma, g.height, g.width), ref),
              spec_tolerance<T>())
        << g.height << "x" << g.width << " gamma " << g.gamma;
    const retention::ManhattanDecay decay(g.gamma, g.height, g.width);
    EXPECT_LE(relative_error(retention::masad(Q, K, V, decay), ref), spec_tolerance<T>());
  }
}

// With all content logits zero the softmax weights factor over the two axes, so MaSA == MaSAD (SPEC
// 4).
TYPED_TEST(MasaTest, ZeroQueryMasaEqualsMasad) {
  using T = TypeParam;
  const Index shapes[][2] = {{1, 1}, {1, 7}, {5, 3}, {16, 16}, {7, 1}};
  std::uint64_t seed = 200;
  for (const auto& s : shapes) {
    const Index H = s[0], W = s[1], N = H * W;
    for (double gamma : {0.5, 0.875, 0.99, 1.0}) {
      const Matrix<T> Q = Matrix<T>::Zero(N, 8);
      const Matrix<T> K = random_matrix<T>(N, 8, ++seed), V = random_matrix<T>(N, 5, ++seed);
      const Matrix<T> a = retention::masa(Q, K, V, retention::ManhattanDecay(gamma, H, W));
      const Matrix<T> b = retention::masad(Q, K, V, gamma, H, W);
      EXPECT_LE(relative_error(a, b), spec_tolerance<T>()) << H << "x" << W << " gamma " << gamma;
    }
  }
}

TYPED_TEST(MasaTest, SoftmaxRowsSumToOne) {
  using T = TypeParam;
  const Index H = 9, W = 12, N = H * W;
  const Matrix<T> Q = random_matrix<T>(N, 16, 301, 3.0), K = random_matrix<T>(N, 16, 302, 3.0);
  const Matrix<T> ones = Matrix<T>::Ones(N, 1);
  const Matrix<T> a = retention::masa(Q, K, ones, retention::ManhattanDecay(0.8, H, W));
  const Matrix<T> b = retention::masad(Q, K, ones, 0.8, H, W);
  const double tol = 8 * std::numeric_limits<T>::epsilon();
  EXPECT_LE((a.array() - T(1)).abs().maxCoeff(), tol);
  EXPECT_LE((b.array() - T(1)).abs().maxCoeff(), tol);
}

// Streaming MaSA equals the untiled reference for every tile size, including tiles that do not
// divide N and tiles larger than N.
TYPED_TEST(MasaTest, EveryTileSizeMatchesFullReference) {
  using T = TypeParam;
  const Index H = 5, W = 7, N = H * W;
  const Matrix<T> Q = random_matrix<T>(N, 6, 401, 2.0), K = random_matrix<T>(N, 6, 402, 2.0);
  const Matrix<T> V = random_matrix<T>(N, 4, 403);
  const retention::ManhattanDecay decay(0.7, H, W);
  const Mat ref = rmt_reference::masa_full(Q.template cast<double>(), K.template cast<double>(),
                                           V.template cast<double>(), 0.7, H, W);
  retention::MasaOptions opt;
  for (Index bq = 1; bq <= N + 2; ++bq)
    for (Index bk : {Index(1), Index(2), Index(6), Index(7), Index(16), N - 1, N, N + 5}) {
      opt.query_tile = bq;
      opt.key_tile = bk;
      EXPECT_LE(relative_error(retention::masa(Q, K, V, decay, opt), ref), spec_tolerance<T>())
          << "query_tile " << bq << " key_tile " << bk;
    }
  for (Index bk = 1; bk <= N + 2; ++bk)
    for (Index bq : {Index(1), Index(3), N}) {
      opt.query_tile = bq;
      opt.key_tile = bk;
      EXPECT_LE(relative_error(retention::masa(Q, K, V, decay, opt), ref), spec_tolerance<T>())
          << "query_tile " << bq << " key_tile " << bk;
    }
}

// Large logits and strong decay: the running max keeps exp finite; far pairs underflow to 0, never
// NaN.
TYPED_TEST(MasaTest, LargeLogitsStayFinite) {
  using T = TypeParam;
  const Index H = 10, W = 10, N = H * W;
  const Matrix<T> Q = random_matrix<T>(N, 8, 501, 20.0), K = random_matrix<T>(N, 8, 502, 20.0);
  const Matrix<T> V = random_matrix<T>(N, 3, 503);
  const Mat Qd = Q.template cast<double>(), Kd = K.template cast<double>(),
            Vd = V.template cast<double>();
  retention::MasaOptions opt;
  opt.key_tile = 7;
  // A gamma so small that ln D may come back -inf off the diagonal: whole key tiles are then masked
  // out.
  ASSERT_TRUE(retention::masa(Q, K, V, retention::ManhattanDecay(1e-300, H, W), opt).allFinite());
  ASSERT_TRUE(retention::masad(Q, K, V, 1e-300, H, W).allFinite());
  for (double gamma : {1e-3, 0.01, 0.75}) {
    const Matrix<T> a = retention::masa(Q, K, V, retention::ManhattanDecay(gamma, H, W), opt);
    const Matrix<T> b = retention::masad(Q, K, V, gamma, H, W);
    ASSERT_TRUE(a.allFinite());
    ASSERT_TRUE(b.allFinite());
    // Logits near 3000 in float carry absolute rounding ~1e-4, so float gets a looser bound here.
    const double tol = sizeof(T) == sizeof(double) ? 1e-10 : 2e-2;
    EXPECT_LE(relative_error(a, rmt_reference::masa(Qd, Kd, Vd, gamma, H, W)), tol) << gamma;
    EXPECT_LE(relative_error(b, rmt_reference::masad(Qd, Kd, Vd, gamma, H, W)), tol) << gamma;
  }
}

// 112 x 112 at gamma = 0.75: ln D reaches 222 ln 0.75 = -64, so most decays underflow in float.
TYPED_TEST(MasaTest, LargeGridNoNaNAndAgreesWithReference) {
  using T = TypeParam;
  const Index H = 112, W = 112, N = H * W;
  const Matrix<T> Q = random_matrix<T>(N, 8, 601), K = random_matrix<T>(N, 8, 602);
  const Matrix<T> V = random_matrix<T>(N, 4, 603);
  const Matrix<T> a = retention::masa(Q, K, V, retention::ManhattanDecay(0.75, H, W));
  const Matrix<T> b = retention::masad(Q, K, V, 0.75, H, W);
  ASSERT_TRUE(a.allFinite());
  ASSERT_TRUE(b.allFinite());
  // A sample of rows (corners, edges, centre, scattered) keeps the naive O(N) per row reference
  // fast.
  std::vector<Index> rows = {0, W - 1, N - W, N - 1, (H / 2) * W + W / 2, W, 2 * W - 1};
  for (Index r = 17; r < N; r += 997) rows.push_back(r);
  const Mat Qd = Q.template cast<double>(), Kd = K.template cast<double>(),
            Vd = V.template cast<double>();
  const Mat ref = rmt_reference::masa_rows(Qd, Kd, Vd, 0.75, H, W, rows);
  Matrix<T> got(static_cast<Index>(rows.size()), V.cols());
  for (std::size_t i = 0; i < rows.size(); ++i) got.row(static_cast<Index>(i)) = a.row(rows[i]);
  EXPECT_LE(relative_error(got, ref), spec_tolerance<T>());
  EXPECT_LE(relative_error(b, rmt_reference::masad(Qd, Kd, Vd, 0.75, H, W)), spec_tolerance<T>());
}

// The multi-head entry points read strided heads out of [B, H, W, heads * d] and equal per-head
// calls.
TYPED_TEST(MasaTest, MultiHeadEqualsPerHead) {
  using T = TypeParam;
  retention::GridHeadsShape s;
  s.batch = 2;
  s.height = 6;
  s.width = 5;
  s.heads = 3;
  s.key_dim = 4;
  s.value_dim = 6;
  const Index N = s.height * s.width, rows = s.batch * N;
  const std::vector<double> gammas = {0.5, 0.875, 0.96875};
  const Matrix<T> q = random_matrix<T>(rows, s.heads * s.key_dim, 701, 2.0);
  const Matrix<T> k = random_matrix<T>(rows, s.heads * s.key_dim, 702, 2.0);
  const Matrix<T> v = random_matrix<T>(rows, s.heads * s.value_dim, 703);
  retention::MasaOptions opt;
  opt.query_tile = 7;
  opt.key_tile = 11;
  const Matrix<T> full = retention::multi_head_masa(q, k, v, s, gammas, opt);
  const Matrix<T> dec = retention::multi_head_masad(q, k, v, s, gammas, opt);
  for (Index b = 0; b < s.batch; ++b)
    for (Index h = 0; h < s.heads; ++h) {
      const Matrix<T> Q = q.block(b * N, h * s.key_dim, N, s.key_dim);
      const Matrix<T> K = k.block(b * N, h * s.key_dim, N, s.key_dim);
      const Matrix<T> V = v.block(b * N, h * s.value_dim, N, s.value_dim);
      const double g = gammas[static_cast<std::size_t>(h)];
      const Matrix<T> a = retention::masa(Q, K, V, retention::ManhattanDecay(g, s.height, s.width));
      const Matrix<T> d = retention::masad(Q, K, V, g, s.height, s.width);
      EXPECT_LE(relative_error(full.block(b * N, h * s.value_dim, N, s.value_dim), a),
                spec_tolerance<T>());
      EXPECT_LE(relative_error(dec.block(b * N, h * s.value_dim, N, s.value_dim), d),
                spec_tolerance<T>());
    }
}

// MaSAD's fused line kernels take lines of up to four SIMD packets (64 floats or 32 doubles with
// AVX-512, 32 / 16 with AVX2) and fall back to the tiled kernels above that. Lines just below, at
// and just above one packet, two packets and that limit, on either axis, with dk and dv that are
// not whole packets (dv = 70 runs the value columns as a block of 4 packets then a ragged one),
// all equal the reference.
TYPED_TEST(MasaTest, MasadLinesAroundPacketBoundaries) {
  using T = TypeParam;
  struct Case {
    Index height, width, dk, dv;
  };
  const Case cases[] = {{1, 64, 5, 17},  {64, 1, 3, 20}, {15, 17, 1, 1},  {16, 33, 19, 70},
                        {33, 16, 8, 37}, {31, 65, 4, 9}, {65, 31, 6, 16}, {56, 56, 16, 32},
                        {7, 8, 33, 3},   {1, 1, 2, 70},  {2, 63, 5, 5},   {63, 2, 5, 64}};
  std::uint64_t seed = 900;
  for (const Case& c : cases) {
    const Index N = c.height * c.width;
    const Matrix<T> Q = random_matrix<T>(N, c.dk, ++seed, 2.0);
    const Matrix<T> K = random_matrix<T>(N, c.dk, ++seed, 2.0);
    const Matrix<T> V = random_matrix<T>(N, c.dv, ++seed);
    for (double gamma : {0.75, 1.0}) {
      const Mat ref = rmt_reference::masad(Q.template cast<double>(), K.template cast<double>(),
                                           V.template cast<double>(), gamma, c.height, c.width);
      const Matrix<T> got = retention::masad(Q, K, V, gamma, c.height, c.width);
      ASSERT_TRUE(got.allFinite()) << c.height << "x" << c.width;
      EXPECT_LE(relative_error(got, ref), spec_tolerance<T>())
          << c.height << "x" << c.width << " dk " << c.dk << " dv " << c.dv << " gamma " << gamma;
    }
  }
}

// A single head split over threads (its column lines wait for its row lines), a single-head
// multi-head call, and several heads over threads (a head group per team member and image, each
// member starting on units of its own and then taking what the others left) all equal the serial
// single-head result, on grids whose lines take the fused kernels in float and the tiled ones in
// double (with AVX-512), with heads read from a fused [q | k | v] buffer. An odd head count makes
// the two groups unequal; three threads make one group per head.
TYPED_TEST(MasaTest, MasadThreadedAndMultiHeadEqualSerial) {
  using T = TypeParam;
  const Index H = 24, W = 40, N = H * W, dk = 12, dv = 20;
  retention::MasaOptions serial, two, three;
  serial.threads = 1;
  two.threads = 2;
  three.threads = 3;
  for (Index heads : {Index(1), Index(3)}) {
    retention::GridHeadsShape s;
    s.batch = 2;
    s.height = H;
    s.width = W;
    s.heads = heads;
    s.key_dim = dk;
    s.value_dim = dv;
    s.qk_row_stride = s.v_row_stride = heads * (2 * dk + dv);
    if (heads == 1) s.batch = 1;
    const Index rows = s.batch * N, ld = s.qk_row_stride;
    const Matrix<T> qkv = random_matrix<T>(rows, ld, 950 + static_cast<std::uint64_t>(heads), 2.0);
    const std::vector<double> gammas = {0.9, 0.6, 1.0};
    const std::vector<double> g(gammas.begin(), gammas.begin() + heads);
    Matrix<T> out(rows, heads * dv), out3(rows, heads * dv);
    const T* q = qkv.data();
    const T* k = q + heads * dk;
    const T* v = k + heads * dk;
    retention::multi_head_masad(q, k, v, out.data(), s, g, two);
    retention::multi_head_masad(q, k, v, out3.data(), s, g, three);
    for (Index b = 0; b < s.batch; ++b)
      for (Index h = 0; h < heads; ++h) {
        const Matrix<T> Q = qkv.block(b * N, h * dk, N, dk);
        const Matrix<T> K = qkv.block(b * N, heads * dk + h * dk, N, dk);
        const Matrix<T> V = qkv.block(b * N, 2 * heads * dk + h * dv, N, dv);
        const double gamma = g[static_cast<std::size_t>(h)];
        const Matrix<T> ref = retention::masad(Q, K, V, gamma, H, W, serial);
        EXPECT_LE(relative_error(retention::masad(Q, K, V, gamma, H, W, two), ref),
                  spec_tolerance<T>());
        EXPECT_LE(relative_error(out.block(b * N, h * dv, N, dv), ref), spec_tolerance<T>())
            << "heads " << heads << " image " << b << " head " << h;
        EXPECT_LE(relative_error(out3.block(b * N, h * dv, N, dv), ref), spec_tolerance<T>())
            << "3 threads, heads " << heads << " image " << b << " head " << h;
        EXPECT_LE(relative_error(ref, rmt_reference::masad(Q.template cast<double>(),
                                                           K.template cast<double>(),
                                                           V.template cast<double>(), gamma, H, W)),
                  spec_tolerance<T>());
      }
  }
}

// Expressions (not only plain matrices) are accepted as inputs.
TYPED_TEST(MasaTest, AcceptsExpressions) {
  using T = TypeParam;
  const Index H = 4, W = 3, N = H * W;
  const Matrix<T> Q = random_matrix<T>(N, 6, 801), K = random_matrix<T>(N, 6, 802);
  const Matrix<T> V = random_matrix<T>(N, 2, 803);
  const retention::ManhattanDecay decay(0.9, H, W);
  const Matrix<T> Q2 = Q * T(2);
  EXPECT_LE(relative_error(retention::masa(Q * T(2), K, V.leftCols(2), decay),
                           retention::masa(Q2, K, V, decay)),
            spec_tolerance<T>());
  EXPECT_LE(relative_error(retention::masad(Q * T(2), K, V, 0.9, H, W),
                           retention::masad(Q2, K, V, 0.9, H, W)),
            spec_tolerance<T>());
}

TYPED_TEST(MasaTest, ShapeErrors) {
  using T = TypeParam;
  using retention_test::expect_shape_error;
  const Matrix<T> Q = random_matrix<T>(12, 4, 1), K = random_matrix<T>(12, 4, 2),
                  V = random_matrix<T>(12, 3, 3);
  const retention::ManhattanDecay decay(0.9, 3, 4);
  const Matrix<T> Q11 = random_matrix<T>(11, 4, 4);
  expect_shape_error([&] { retention::masa(Q11, K, V, decay); },
                     "masa: Q is [11 x 4], expected [12 x *]");
  expect_shape_error([&] { retention::masa(Q, random_matrix<T>(12, 5, 5), V, decay); },
                     "masa: K is [12 x 5], expected [12 x 4]");
  expect_shape_error([&] { retention::masa(Q, K, random_matrix<T>(10, 3, 6), decay); },
                     "masa: V is [10 x 3], expected [12 x *]");
  retention::MasaOptions opt;
  opt.query_tile = 0;
  expect_shape_error([&] { retention::masa(Q, K, V, decay, opt); },
                     "masa: query_tile must be >= 1");
  opt.query_tile = 4;
  opt.key_tile = -1;
  expect_shape_error([&] { retention::masa(Q, K, V, decay, opt); }, "masa: key_tile must be >= 1");
  expect_shape_error([&] { retention::masad(Q11, K, V, 0.9, 3, 4); },
                     "masad: Q is [11 x 4], expected [12 x *]");
  expect_shape_error([&] { retention::masad(Q, K, V, 0.9, 4, 4); },
                     "masad: Q is [12 x 4], expected [16 x *]");
  expect_shape_error([&] { retention::masad(Q, K, V, 0.0, 3, 4); },
                     "masad: gamma must be in (0, 1]");
  expect_shape_error([&] { retention::masad(Q, K, V, 1.5, 3, 4); },
                     "masad: gamma must be in (0, 1]");
  expect_shape_error([&] { retention::masad(Q, K, V, std::nan(""), 3, 4); },
                     "masad: gamma must be in (0, 1]");
  expect_shape_error([&] { retention::masad(Q, K, V, 0.9, 0, 4); }, "masad: height must be >= 1");
  expect_shape_error([&] { retention::ManhattanDecay(-0.5, 3, 4); }, "gamma must be in (0, 1]");

  retention::GridHeadsShape s;
  s.height = 3;
  s.width = 4;
  s.heads = 2;
  s.key_dim = 2;
  s.value_dim = 3;
  const Matrix<T> q = random_matrix<T>(12, 4, 7), v = random_matrix<T>(12, 6, 8);
  expect_shape_error([&] { retention::multi_head_masa(q, q, v, s, {0.9}); },
                     "multi_head_masa: gammas has 1 entries, expected heads = 2");
  expect_shape_error(
      [&] {
        retention::multi_head_masad(q, q, v, s, {0.9, 2.0});
      },
      "multi_head_masad: gamma must be in (0, 1]");
  expect_shape_error(
      [&] {
        retention::multi_head_masa(q, q, Q, s, {0.9, 0.8});
      },
      "multi_head_masa: v is [12 x 4], expected [12 x 6]");
}

// --- Masks compose: MaSA and MaSAD with the quadrant-causal mask (causal along y and x) --------
namespace quadrant_reference {

/// ln D[n, m] of the quadrant-causal mask straight from its definition: (dy + dx) ln gamma when the
/// key is not below or right of the query, else -inf.
double log_weight(Index n, Index m, Index W, double gamma) {
  const Index dy = n / W - m / W, dx = n % W - m % W;
  if (dy < 0 || dx < 0) return -std::numeric_limits<double>::infinity();
  return static_cast<double>(dy + dx) * std::log(gamma);
}

/// softmax over the allowed keys of (q . k + ln D), times v, in double.
Mat attend(const Mat& Q, const Mat& K, const Mat& V, const std::vector<Index>& keys, Index n,
           const std::vector<double>& log_w) {
  double mx = -std::numeric_limits<double>::infinity();
  std::vector<double> s(keys.size());
  for (std::size_t j = 0; j < keys.size(); ++j) {
    s[j] = Q.row(n).dot(K.row(keys[j])) + log_w[j];
    mx = std::max(mx, s[j]);
  }
  Mat out = Mat::Zero(1, V.cols());
  double sum = 0;
  for (std::size_t j = 0; j < keys.size(); ++j) {
    const double e = std::exp(s[j] - mx);
    sum += e;
    out += e * V.row(keys[j]);
  }
  return out / sum;
}

Mat masa(const Mat& Q, const Mat& K, const Mat& V, double gamma, Index H, Index W) {
  const Index N = H * W;
  Mat O(N, V.cols());
  std::vector<Index> keys(static_cast<std::size_t>(N));
  for (Index m = 0; m < N; ++m) keys[static_cast<std::size_t>(m)] = m;
  for (Index n = 0; n < N; ++n) {
    std::vector<double> lw(static_cast<std::size_t>(N));
    for (Index m = 0; m < N; ++m) lw[static_cast<std::size_t>(m)] = log_weight(n, m, W, gamma);
    O.row(n) = attend(Q, K, V, keys, n, lw);
  }
  return O;
}

/// Row pass along x (keys x' <= x of the same row), then column pass along y on its output.
Mat masad(const Mat& Q, const Mat& K, const Mat& V, double gamma, Index H, Index W) {
  const double lg = std::log(gamma);
  Mat U(H * W, V.cols()), O(H * W, V.cols());
  for (Index y = 0; y < H; ++y)
    for (Index x = 0; x < W; ++x) {
      std::vector<Index> keys;
      std::vector<double> lw;
      for (Index x2 = 0; x2 <= x; ++x2) {
        keys.push_back(y * W + x2);
        lw.push_back(static_cast<double>(x - x2) * lg);
      }
      U.row(y * W + x) = attend(Q, K, V, keys, y * W + x, lw);
    }
  for (Index y = 0; y < H; ++y)
    for (Index x = 0; x < W; ++x) {
      std::vector<Index> keys;
      std::vector<double> lw;
      for (Index y2 = 0; y2 <= y; ++y2) {
        keys.push_back(y2 * W + x);
        lw.push_back(static_cast<double>(y - y2) * lg);
      }
      O.row(y * W + x) = attend(Q, K, U, keys, y * W + x, lw);
    }
  return O;
}

}  // namespace quadrant_reference

TYPED_TEST(MasaTest, QuadrantCausalMaskInMasaAndMasad) {
  using T = TypeParam;
  std::uint64_t seed = 9000;
  for (const Grid& g : grids()) {
    const Index N = g.height * g.width;
    const Matrix<T> Q = random_matrix<T>(N, g.dk, ++seed), K = random_matrix<T>(N, g.dk, ++seed),
                    V = random_matrix<T>(N, g.dv, ++seed);
    const Mat Qd = Q.template cast<double>(), Kd = K.template cast<double>(),
              Vd = V.template cast<double>();
    const retention::QuadrantCausalDecay mask(g.gamma, g.height, g.width);
    for (Index tile : {Index(3), Index(64)}) {
      retention::MasaOptions o;
      o.query_tile = tile;
      o.key_tile = tile + 2;
      EXPECT_LE(relative_error(retention::masa(Q, K, V, mask, o),
                               quadrant_reference::masa(Qd, Kd, Vd, g.gamma, g.height, g.width)),
                spec_tolerance<T>())
          << g.height << "x" << g.width << " tile " << tile;
    }
    EXPECT_LE(relative_error(retention::masad(Q, K, V, mask),
                             quadrant_reference::masad(Qd, Kd, Vd, g.gamma, g.height, g.width)),
              spec_tolerance<T>())
        << g.height << "x" << g.width;
    // Multi-head, threaded: heads of a strided buffer equal single-head calls.
    const Index heads = 3;
    const Matrix<T> q = random_matrix<T>(2 * N, heads * g.dk, ++seed),
                    k = random_matrix<T>(2 * N, heads * g.dk, ++seed),
                    v = random_matrix<T>(2 * N, heads * g.dv, ++seed);
    Matrix<T> out(2 * N, heads * g.dv), outd(2 * N, heads * g.dv);
    const std::vector<retention::QuadrantCausalDecay> masks(static_cast<std::size_t>(heads), mask);
    retention::MasaOptions o;
    o.threads = 2;
    const auto view = [&](const Matrix<T>& m, Index d) {
      return retention::heads_view(m.data(), Index(2), N, heads, d);
    };
    retention::multi_head_masa(view(q, g.dk), view(k, g.dk), view(v, g.dv),
                               retention::heads_view(out.data(), Index(2), N, heads, g.dv), masks,
                               o);
    retention::multi_head_masad(view(q, g.dk), view(k, g.dk), view(v, g.dv),
                                retention::heads_view(outd.data(), Index(2), N, heads, g.dv), masks,
                                o);
    for (Index b = 0; b < 2; ++b)
      for (Index h = 0; h < heads; ++h) {
        const auto blk = [&](const Matrix<T>& m, Index d) {
          return Matrix<T>(m.block(b * N, h * d, N, d));
        };
        EXPECT_LE(relative_error(blk(out, g.dv),
                                 retention::masa(blk(q, g.dk), blk(k, g.dk), blk(v, g.dv), mask)),
                  spec_tolerance<T>());
        EXPECT_LE(relative_error(blk(outd, g.dv),
                                 retention::masad(blk(q, g.dk), blk(k, g.dk), blk(v, g.dv), mask)),
                  spec_tolerance<T>());
      }
  }
}

}  // namespace
