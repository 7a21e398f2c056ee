// MaSA and MaSAD on every instruction-set variant this processor runs (retention/isa.hpp): each
// variant against a naive double reference written here from docs/math.md §4 (softmax(Q K^T +
// ln D) V with an explicit [N, N] or per-line mask), and the variants against each other. Grids
// with odd sides, a line longer than any variant's fused line kernels (70), dk / dv of 1, 17, 64,
// one and several heads, ManhattanDecay and QuadrantCausalDecay.
#include <retention/isa.hpp>
#include <retention/masa.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "support/isa_support.hpp"
#include "support/test_support.hpp"

namespace {

using retention::Index;
using retention::Isa;
using retention::Matrix;
using retention_test::random_matrix;
using retention_test::relative_error;
using retention_test::spec_tolerance;
using Mat = Matrix<double>;

/// ln of the 1-D axis weight between positions a (query) and b (key) along one axis: symmetric
/// |a - b| ln gamma (ManhattanDecay), or causal (a - b) ln gamma for b <= a and -inf after
/// (QuadrantCausalDecay, docs/math.md §1).
double axis_log(bool causal, double gamma, Index a, Index b) {
  if (causal && b > a) return -std::numeric_limits<double>::infinity();
  return static_cast<double>(std::abs(a - b)) * std::log(gamma);
}

/// Softmax over the keys of one query with explicit max, exp and sum; masked keys (-inf) skipped.
void attend_row(const std::vector<double>& logit, const std::vector<Index>& key, const Mat& V,
                double* out) {
  double mx = -std::numeric_limits<double>::infinity();
  for (double l : logit) mx = std::max(mx, l);
  double sum = 0.0;
  std::vector<double> p(logit.size());
  for (std::size_t j = 0; j < logit.size(); ++j) sum += (p[j] = std::exp(logit[j] - mx));
  for (Index c = 0; c < V.cols(); ++c) {
    double acc = 0.0;
    for (std::size_t j = 0; j < key.size(); ++j) acc += p[j] * V(key[j], c);
    out[c] = acc / sum;
  }
}

double dot(const Mat& A, Index i, const Mat& B, Index j) {
  double s = 0.0;
  for (Index c = 0; c < A.cols(); ++c) s += A(i, c) * B(j, c);
  return s;
}

/// MaSA: out[n] = softmax_m(q_n . k_m + ln Dy(y_n, y_m) + ln Dx(x_n, x_m)) V over the whole grid.
Mat masa_reference(const Mat& Q, const Mat& K, const Mat& V, bool causal, double gamma, Index H,
                   Index W) {
  const Index N = H * W;
  Mat out(N, V.cols());
  for (Index n = 0; n < N; ++n) {
    std::vector<double> logit;
    std::vector<Index> key;
    for (Index m = 0; m < N; ++m) {
      const double w =
          axis_log(causal, gamma, n / W, m / W) + axis_log(causal, gamma, n % W, m % W);
      if (w == -std::numeric_limits<double>::infinity()) continue;
      logit.push_back(dot(Q, n, K, m) + w);
      key.push_back(m);
    }
    attend_row(logit, key, V, out.row(n).data());
  }
  return out;
}

/// MaSAD: u = softmax attention along each grid row (x axis) of V, then out = along each grid
/// column (y axis) of u.
Mat masad_reference(const Mat& Q, const Mat& K, const Mat& V, bool causal, double gamma, Index H,
                    Index W) {
  const Index N = H * W;
  Mat u(N, V.cols()), out(N, V.cols());
  // Rows of `out` are written through a row-major copy (attend_row writes contiguous values).
  Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> row(1, V.cols());
  for (Index n = 0; n < N; ++n) {
    const Index y = n / W, x = n % W;
    std::vector<double> logit;
    std::vector<Index> key;
    for (Index x2 = 0; x2 < W; ++x2) {
      const double w = axis_log(causal, gamma, x, x2);
      if (w == -std::numeric_limits<double>::infinity()) continue;
      logit.push_back(dot(Q, n, K, y * W + x2) + w);
      key.push_back(y * W + x2);
    }
    attend_row(logit, key, V, row.data());
    u.row(n) = row;
  }
  for (Index n = 0; n < N; ++n) {
    const Index y = n / W, x = n % W;
    std::vector<double> logit;
    std::vector<Index> key;
    for (Index y2 = 0; y2 < H; ++y2) {
      const double w = axis_log(causal, gamma, y, y2);
      if (w == -std::numeric_limits<double>::infinity()) continue;
      logit.push_back(dot(Q, n, K, y2 * W + x) + w);
      key.push_back(y2 * W + x);
    }
    attend_row(logit, key, u, row.data());
    out.row(n) = row;
  }
  return out;
}

struct Case {
  Index height, width, dk, dv;
};

/// Grids with odd sides; 9 x 70 has a line longer than any variant's fused line (64 floats).
std::vector<Case> cases() {
  return {{3, 5, 1, 1},     {3, 5, 17, 64},  {7, 7, 17, 17}, {7, 7, 64, 1},
          {14, 14, 64, 64}, {9, 70, 17, 17}, {9, 70, 1, 64}};
}

template <class T>
class IsaManhattanTest : public ::testing::Test {};
TYPED_TEST_SUITE(IsaManhattanTest, retention_test::ScalarTypes);

/// One head: masa (default tiles and small tiles that cut lines and rows) and masad, each mask,
/// each variant, against the references; and every variant against the baseline variant.
TYPED_TEST(IsaManhattanTest, SingleHeadEveryVariantMatchesReference) {
  using T = TypeParam;
  const retention_test::IsaScope guard;
  const double gamma = 0.9;
  std::uint64_t seed = 1300;
  for (const Case& c : cases()) {
    const Index N = c.height * c.width;
    const Matrix<T> Q = random_matrix<T>(N, c.dk, ++seed),
                    K = random_matrix<T>(N, c.dk, ++seed, 1.0 / std::sqrt(double(c.dk))),
                    V = random_matrix<T>(N, c.dv, ++seed);
    const Mat Qd = Q.template cast<double>(), Kd = K.template cast<double>(),
              Vd = V.template cast<double>();
    for (bool causal : {false, true}) {
      const Mat ref_masa = masa_reference(Qd, Kd, Vd, causal, gamma, c.height, c.width);
      const Mat ref_masad = masad_reference(Qd, Kd, Vd, causal, gamma, c.height, c.width);
      std::vector<Matrix<T>> masa_out, masad_out;
      for (Isa isa : retention_test::isa_variants()) {
        retention::set_active_isa(isa);
        const std::string what = std::string(retention::to_string(isa)) + " " +
                                 std::to_string(c.height) + "x" + std::to_string(c.width) + " dk " +
                                 std::to_string(c.dk) + " dv " + std::to_string(c.dv) +
                                 (causal ? " causal" : " manhattan");
        retention::MasaOptions small;
        small.query_tile = 5;
        small.key_tile = 7;
        Matrix<T> a, b, d;
        if (causal) {
          const retention::QuadrantCausalDecay mask(gamma, c.height, c.width);
          a = retention::masa(Q, K, V, mask);
          b = retention::masa(Q, K, V, mask, small);
          d = retention::masad(Q, K, V, mask);
        } else {
          const retention::ManhattanDecay mask(gamma, c.height, c.width);
          a = retention::masa(Q, K, V, mask);
          b = retention::masa(Q, K, V, mask, small);
          d = retention::masad(Q, K, V, mask);
        }
        EXPECT_LE(relative_error(a, ref_masa), spec_tolerance<T>()) << "masa " << what;
        EXPECT_LE(relative_error(b, ref_masa), spec_tolerance<T>()) << "masa small tiles " << what;
        EXPECT_LE(relative_error(d, ref_masad), spec_tolerance<T>()) << "masad " << what;
        masa_out.push_back(a);
        masad_out.push_back(d);
      }
      // The variants differ only in the order of their roundings.
      for (std::size_t i = 1; i < masa_out.size(); ++i) {
        EXPECT_LE(relative_error(masa_out[i], masa_out[0]), spec_tolerance<T>()) << i;
        EXPECT_LE(relative_error(masad_out[i], masad_out[0]), spec_tolerance<T>()) << i;
      }
    }
  }
}

/// Several heads of a strided [B, N, heads * d] buffer, each with its own gamma, through
/// multi_head_masa / multi_head_masad (serial and with two threads), on every variant: each head
/// against the single-head reference.
TYPED_TEST(IsaManhattanTest, MultiHeadEveryVariantMatchesReference) {
  using T = TypeParam;
  const retention_test::IsaScope guard;
  const Index B = 2, heads = 3;
  const std::vector<double> gammas = {0.5, 0.9, 0.97};
  std::uint64_t seed = 2300;
  for (const Case& c : {Case{7, 7, 17, 17}, Case{3, 5, 1, 64}, Case{9, 70, 17, 1}}) {
    const Index N = c.height * c.width;
    const Matrix<T> q = random_matrix<T>(B * N, heads * c.dk, ++seed),
                    k = random_matrix<T>(B * N, heads * c.dk, ++seed, 0.3),
                    v = random_matrix<T>(B * N, heads * c.dv, ++seed);
    for (bool causal : {false, true}) {
      std::vector<Mat> ref_masa, ref_masad;  // [b * heads + h]
      for (Index b = 0; b < B; ++b)
        for (Index h = 0; h < heads; ++h) {
          const Mat Qd = q.block(b * N, h * c.dk, N, c.dk).template cast<double>();
          const Mat Kd = k.block(b * N, h * c.dk, N, c.dk).template cast<double>();
          const Mat Vd = v.block(b * N, h * c.dv, N, c.dv).template cast<double>();
          const double g = gammas[static_cast<std::size_t>(h)];
          ref_masa.push_back(masa_reference(Qd, Kd, Vd, causal, g, c.height, c.width));
          ref_masad.push_back(masad_reference(Qd, Kd, Vd, causal, g, c.height, c.width));
        }
      for (Isa isa : retention_test::isa_variants()) {
        retention::set_active_isa(isa);
        for (int threads : {1, 2}) {
          retention::MasaOptions o;
          o.threads = threads;
          Matrix<T> out(B * N, heads * c.dv), outd(B * N, heads * c.dv);
          const auto view = [&](const Matrix<T>& m, Index d) {
            return retention::heads_view(m.data(), B, N, heads, d);
          };
          const auto run = [&](const auto& masks) {
            retention::multi_head_masa(view(q, c.dk), view(k, c.dk), view(v, c.dv),
                                       retention::heads_view(out.data(), B, N, heads, c.dv), masks,
                                       o);
            retention::multi_head_masad(view(q, c.dk), view(k, c.dk), view(v, c.dv),
                                        retention::heads_view(outd.data(), B, N, heads, c.dv),
                                        masks, o);
          };
          if (causal) {
            std::vector<retention::QuadrantCausalDecay> masks;
            for (double g : gammas) masks.emplace_back(g, c.height, c.width);
            run(masks);
          } else {
            std::vector<retention::ManhattanDecay> masks;
            for (double g : gammas) masks.emplace_back(g, c.height, c.width);
            run(masks);
          }
          for (Index b = 0; b < B; ++b)
            for (Index h = 0; h < heads; ++h) {
              const std::size_t i = static_cast<std::size_t>(b * heads + h);
              EXPECT_LE(relative_error(out.block(b * N, h * c.dv, N, c.dv), ref_masa[i]),
                        spec_tolerance<T>())
                  << retention::to_string(isa) << " masa b " << b << " h " << h << " threads "
                  << threads << (causal ? " causal" : "");
              EXPECT_LE(relative_error(outd.block(b * N, h * c.dv, N, c.dv), ref_masad[i]),
                        spec_tolerance<T>())
                  << retention::to_string(isa) << " masad b " << b << " h " << h << " threads "
                  << threads << (causal ? " causal" : "");
            }
        }
      }
    }
  }
}

/// The non-finite rule (docs/math.md §2.6) on every variant, on a line longer than the fused
/// kernels take (70) and one they take (9): a NaN in one key reaches exactly the queries that
/// weigh it (all of them with a symmetric mask; those at or after it with a causal one).
TYPED_TEST(IsaManhattanTest, NonFiniteKeyReachesOnlyItsQueriesOnEveryVariant) {
  using T = TypeParam;
  const retention_test::IsaScope guard;
  for (Index W : {Index(70), Index(9)}) {
    const Index d = 17, x0 = W / 2;
    const std::uint64_t seed = static_cast<std::uint64_t>(W);
    const Matrix<T> Q = random_matrix<T>(W, d, 71 + seed), V = random_matrix<T>(W, d, 73 + seed);
    Matrix<T> K = random_matrix<T>(W, d, 72 + seed, 0.3);
    K(x0, 5) = std::numeric_limits<T>::quiet_NaN();
    for (Isa isa : retention_test::isa_variants()) {
      retention::set_active_isa(isa);
      const Matrix<T> sym = retention::masad(Q, K, V, retention::ManhattanDecay(0.9, 1, W));
      EXPECT_TRUE(sym.array().isNaN().all()) << retention::to_string(isa) << " W " << W;
      const Matrix<T> causal = retention::masad(Q, K, V, retention::QuadrantCausalDecay(0.9, 1, W));
      const Mat ref = masad_reference(Q.template cast<double>(), K.template cast<double>(),
                                      V.template cast<double>(), true, 0.9, 1, W);
      for (Index x = 0; x < W; ++x) {
        EXPECT_EQ(causal.row(x).allFinite(), x < x0) << retention::to_string(isa) << " x " << x;
        if (x < x0) {
          EXPECT_LE(relative_error(causal.row(x), ref.row(x)), spec_tolerance<T>())
              << retention::to_string(isa) << " x " << x;
        }
      }
    }
  }
}

/// A MaSAD line's result depends on its inputs only, not on what its line buffers held before: a
/// long line (70, the tile kernels) and a short one (9, the fused kernels), dv = 33 (a ragged last
/// vector on every variant), computed with buffers zero-filled and with buffers full of NaN, are
/// bit for bit the same on every variant. (A check that read the accumulator's padding columns,
/// which the kernels never write, sent lines to the careful path whenever they held a NaN.)
TYPED_TEST(IsaManhattanTest, MasadLineIgnoresWhatItsBuffersHeld) {
  using T = TypeParam;
  const retention_test::IsaScope guard;
  const Index dk = 16, dv = 33;
  for (Index L : {Index(70), Index(9)}) {
    const std::uint64_t seed = static_cast<std::uint64_t>(L);
    const Matrix<T> Q = random_matrix<T>(L, dk, 91 + seed), K = random_matrix<T>(L, dk, 92 + seed);
    const Matrix<T> V = random_matrix<T>(L, dv, 93 + seed);
    const Matrix<T> log_w =
        retention::detail::masad_log_tile<T>(retention::ManhattanDecay(0.9, 1, L).column_axis(), L);
    for (Isa isa : retention_test::isa_variants()) {
      retention::set_active_isa(isa);
      Matrix<T> clean(L, dv), dirty(L, dv);
      auto ws = retention::detail::masad_workspace<T>(L, dk, dv);
      for (Matrix<T>* m : {&ws.q, &ws.kt, &ws.v, &ws.logits, &ws.acc}) m->setZero();
      retention::detail::masad_line<T>(Q.data(), dk, K.data(), dk, dk, V.data(), dv, dv, L, log_w,
                                       clean.data(), dv, ws);
      for (Matrix<T>* m : {&ws.q, &ws.kt, &ws.v, &ws.logits, &ws.acc})
        m->setConstant(std::numeric_limits<T>::quiet_NaN());
      ws.row_max.setConstant(std::numeric_limits<T>::quiet_NaN());
      ws.inv_sum.setConstant(std::numeric_limits<T>::quiet_NaN());
      retention::detail::masad_line<T>(Q.data(), dk, K.data(), dk, dk, V.data(), dv, dv, L, log_w,
                                       dirty.data(), dv, ws);
      EXPECT_TRUE(dirty == clean) << retention::to_string(isa) << " L " << L;
    }
  }
}

}  // namespace
