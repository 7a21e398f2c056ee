// retention-test-links: compiled
// Non-finite inputs in the backward passes (issue 15, docs/math.md §2.6): with an Inf, -Inf or NaN
// in one entry of q, k, v or dO, every gradient entry that mathematically does not depend on it is
// finite and equal to the clean run's, and (for MaSA / MaSAD) every entry that depends on a NaN is
// NaN. Covered: masa_backward, masad_backward (QuadrantCausalDecay, odd 5 x 7 grid), their
// multi-head forms (other pairs untouched), and retention's parallel, chunkwise and recurrent
// backward (causal decay: dQ_n reads tokens <= n, dK_m and dV_m tokens >= m).
//
// The dependency sets come from the math, worked out here entry by entry (not from the code under
// test). For one softmax attention with allowed pairs A (mask weight > 0), logits
// l[n, m] = ln w + q_n . k_m, P = softmax over A(n), dP[n, m] = g_n . v_m, delta_n = sum P dP,
// dZ = P (dP - delta):
//   P row n      depends on q_n and k_m (m in A(n))              ("prow")
//   dZ row n     depends on P row n, g_n and v_m (m in A(n))     ("zrow")
//   o_n[j]       prow(n) or v_m[j] (m in A(n))
//   dq_n[i]      zrow(n) or k_m[i] (m in A(n))
//   dk_m[i]      some n with m in A(n): zrow(n) or q_n[i]
//   dv_m[j]      some n with m in A(n): prow(n) or g_n[j]        (dV never reads V)
// MaSAD (docs/math.md §7.6) chains them: u = row pass forward; the column pass backward (values u,
// upstream dO) gives dQ, dK parts and dU; the row pass backward (values v, upstream dU) gives the
// other dQ, dK parts and dV.
#include <retention/backward.hpp>
#include <retention/decay.hpp>
#include <retention/heads.hpp>
#include <retention/masa_backward.hpp>

#include "reference/masa_backward_reference.hpp"
#include "support/test_support.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace {

using retention::Index;
using retention::Matrix;
using retention_test::random_matrix;
using retention_test::spec_tolerance;
using Flags = Eigen::Array<bool, Eigen::Dynamic, Eigen::Dynamic>;

/// Dependency flags of one softmax attention's output and gradients (see the file comment).
struct Taint {
  Flags o, dq, dk, dv;
};

Taint attention_taint(const Flags& allow, const Flags& q, const Flags& k, const Flags& v,
                      const Flags& g) {
  const Index N = allow.rows(), dk = q.cols(), dv = v.cols();
  std::vector<bool> prow(static_cast<std::size_t>(N), false), zrow(prow);
  for (Index n = 0; n < N; ++n)
    for (Index m = 0; m < N; ++m)
      if (allow(n, m)) {
        const auto nn = static_cast<std::size_t>(n);
        if (q.row(n).any() || k.row(m).any()) prow[nn] = true;
        if (g.row(n).any() || v.row(m).any()) zrow[nn] = true;
      }
  for (std::size_t n = 0; n < prow.size(); ++n) zrow[n] = zrow[n] || prow[n];
  Taint t{Flags::Constant(N, dv, false), Flags::Constant(N, dk, false),
          Flags::Constant(N, dk, false), Flags::Constant(N, dv, false)};
  for (Index n = 0; n < N; ++n) {
    const auto nn = static_cast<std::size_t>(n);
    for (Index m = 0; m < N; ++m) {
      if (!allow(n, m)) continue;
      for (Index j = 0; j < dv; ++j) {
        t.o(n, j) = t.o(n, j) || prow[nn] || v(m, j);
        t.dv(m, j) = t.dv(m, j) || prow[nn] || g(n, j);
      }
      for (Index i = 0; i < dk; ++i) {
        t.dq(n, i) = t.dq(n, i) || zrow[nn] || k(m, i);
        t.dk(m, i) = t.dk(m, i) || zrow[nn] || q(n, i);
      }
    }
  }
  return t;
}

/// Allowed pairs of QuadrantCausalDecay over an H x W grid in raster order, restricted to
/// `same` = 0 (whole grid, MaSA), 1 (same grid row, MaSAD's row pass), 2 (same column).
Flags quadrant_allow(Index H, Index W, int same) {
  const Index N = H * W;
  Flags a(N, N);
  for (Index n = 0; n < N; ++n)
    for (Index m = 0; m < N; ++m) {
      const Index yn = n / W, xn = n % W, ym = m / W, xm = m % W;
      bool ok = ym <= yn && xm <= xn;
      if (same == 1) ok = ok && ym == yn;
      if (same == 2) ok = ok && xm == xn;
      a(n, m) = ok;
    }
  return a;
}

struct GradTaint {
  Flags dq, dk, dv;
};

/// which: 0 q, 1 k, 2 v, 3 dO; the bad entry (cell, col).
GradTaint masa_taint(Index H, Index W, Index dk, Index dv, int which, Index cell, Index col,
                     bool decomposed) {
  const Index N = H * W;
  Flags q = Flags::Constant(N, dk, false), k = q, v = Flags::Constant(N, dv, false), g = v;
  (which == 0 ? q : which == 1 ? k : which == 2 ? v : g)(cell, col) = true;
  if (!decomposed) {
    const Taint t = attention_taint(quadrant_allow(H, W, 0), q, k, v, g);
    return {t.dq, t.dk, t.dv};
  }
  const Flags row = quadrant_allow(H, W, 1), column = quadrant_allow(H, W, 2);
  const Flags u = attention_taint(row, q, k, v, g).o;  // g does not enter the forward
  const Taint c = attention_taint(column, q, k, u, g);
  const Taint r = attention_taint(row, q, k, v, c.dv);
  return {c.dq || r.dq, c.dk || r.dk, r.dv};
}

template <class T>
std::vector<std::pair<T, std::string>> bad_values() {
  return {{std::numeric_limits<T>::infinity(), "Inf"},
          {-std::numeric_limits<T>::infinity(), "-Inf"},
          {std::numeric_limits<T>::quiet_NaN(), "NaN"}};
}

const char* input_name(int which) {
  static const char* names[] = {"q", "k", "v", "dO"};
  return names[which];
}

struct Counts {
  long clean = 0, nan = 0;
};

/// Entries not flagged: finite and, together, within tol (relative norm) of `clean`; flagged ones
/// NaN when the bad value is NaN.
template <class T>
void check_gradient(const Matrix<T>& got, const Matrix<T>& clean, const Flags& depends,
                    bool bad_is_nan, double tol, const std::string& what, Counts& counts) {
  ASSERT_EQ(got.rows(), clean.rows()) << what;
  ASSERT_EQ(got.cols(), clean.cols()) << what;
  double num = 0.0, den = 0.0;
  for (Index i = 0; i < got.rows(); ++i)
    for (Index j = 0; j < got.cols(); ++j) {
      const double a = static_cast<double>(got(i, j)), b = static_cast<double>(clean(i, j));
      if (depends(i, j)) {
        if (bad_is_nan) {
          EXPECT_TRUE(std::isnan(a))
              << what << ": entry (" << i << ", " << j << ") depends on the NaN but is " << a;
          ++counts.nan;
        }
        continue;
      }
      ++counts.clean;
      EXPECT_TRUE(std::isfinite(a)) << what << ": entry (" << i << ", " << j
                                    << ") does not depend on the bad value but is " << a;
      num += (a - b) * (a - b);
      den += b * b;
    }
  if (den > 0.0) {
    EXPECT_LE(std::sqrt(num / den), tol) << what;
  }
}

template <class T>
class NonFiniteGradients : public ::testing::Test {};
TYPED_TEST_SUITE(NonFiniteGradients, retention_test::ScalarTypes, retention_test::ScalarName);

constexpr Index kH = 5, kW = 7, kDk = 4, kDv = 3;
const std::vector<std::pair<Index, Index>> kCells = {{0, 0}, {2, 3}, {4, 6}, {3, 0}};

template <class T>
Matrix<T>& pick(Matrix<T>& Q, Matrix<T>& K, Matrix<T>& V, Matrix<T>& G, int which) {
  return which == 0 ? Q : which == 1 ? K : which == 2 ? V : G;
}

// One head: masa_backward / masad_backward from the saved state of the bad inputs' forward.
TYPED_TEST(NonFiniteGradients, MasaAndMasadQuadrantCausal) {
  using T = TypeParam;
  namespace ref = masa_backward_reference;
  const double tol = 10 * spec_tolerance<T>();
  const Index N = kH * kW;
  const retention::QuadrantCausalDecay mask(0.85, kH, kW);
  const Matrix<T> Q0 = random_matrix<T>(N, kDk, 1601), K0 = random_matrix<T>(N, kDk, 1602);
  const Matrix<T> V0 = random_matrix<T>(N, kDv, 1603), G0 = random_matrix<T>(N, kDv, 1604);
  retention::MasaTrainOptions opt;
  opt.query_tile = 4;  // ragged tiles across grid rows
  opt.key_tile = 9;
  for (const bool decomposed : {false, true}) {
    const std::string op = decomposed ? "masad_backward" : "masa_backward";
    const auto run = [&](const Matrix<T>& Q, const Matrix<T>& K, const Matrix<T>& V,
                         const Matrix<T>& G) {
      return decomposed
                 ? retention::masad_backward(
                       Q, K, V, mask, G, retention::masad_forward_train(Q, K, V, mask, opt), opt)
                 : retention::masa_backward(Q, K, V, mask, G,
                                            retention::masa_forward_train(Q, K, V, mask, opt), opt);
    };
    const auto clean = run(Q0, K0, V0, G0);
    {  // The clean run itself against the independent double reference.
      const auto cast = [](const Matrix<T>& m) {
        return Matrix<double>(m.template cast<double>());
      };
      const ref::Grads r =
          decomposed ? ref::masad_backward(cast(Q0), cast(K0), cast(V0),
                                           ref::MaskKind::quadrant_causal, 0.85, kH, kW, cast(G0))
                     : ref::masa_backward(cast(Q0), cast(K0), cast(V0),
                                          ref::MaskKind::quadrant_causal, 0.85, kH, kW, cast(G0));
      EXPECT_LE(retention_test::relative_error(clean.dQ, r.dQ), tol) << op << " clean dQ";
      EXPECT_LE(retention_test::relative_error(clean.dK, r.dK), tol) << op << " clean dK";
      EXPECT_LE(retention_test::relative_error(clean.dV, r.dV), tol) << op << " clean dV";
    }
    Counts counts;
    for (const auto& [y, x] : kCells)
      for (int which = 0; which < 4; ++which)
        for (const auto& [bad, bad_name] : bad_values<T>()) {
          const Index cell = y * kW + x;
          const Index col = (y + x + which) % (which < 2 ? kDk : kDv);
          Matrix<T> Q = Q0, K = K0, V = V0, G = G0;
          pick(Q, K, V, G, which)(cell, col) = bad;
          const std::string what = op + ", " + input_name(which) + "(" + std::to_string(cell) +
                                   ", " + std::to_string(col) + ") = " + bad_name + " at cell (" +
                                   std::to_string(y) + ", " + std::to_string(x) + ")";
          const GradTaint t = masa_taint(kH, kW, kDk, kDv, which, cell, col, decomposed);
          const auto g = run(Q, K, V, G);
          const bool nan = std::isnan(bad);
          check_gradient<T>(g.dQ, clean.dQ, t.dq, nan, tol, what + ", dQ", counts);
          check_gradient<T>(g.dK, clean.dK, t.dk, nan, tol, what + ", dK", counts);
          check_gradient<T>(g.dV, clean.dV, t.dv, nan, tol, what + ", dV", counts);
        }
    // Both kinds of entry were met (the dependency sets are neither empty nor everything).
    EXPECT_GT(counts.clean, 0) << op;
    EXPECT_GT(counts.nan, 0) << op;
  }
}

// Multi-head, saved-state and forward-inside overloads: a bad value in pair (1, 0) leaves every
// other (batch, head) pair equal to the clean run and pair (1, 0) follows the one-head rule.
TYPED_TEST(NonFiniteGradients, MultiHeadMasaAndMasad) {
  using T = TypeParam;
  const double tol = 10 * spec_tolerance<T>();
  const Index B = 2, heads = 2, N = kH * kW, bad_b = 1, bad_h = 0;
  const std::vector<retention::QuadrantCausalDecay> masks = {{0.9, kH, kW}, {0.7, kH, kW}};
  const Matrix<T> Q0 = random_matrix<T>(B * N, heads * kDk, 1701);
  const Matrix<T> K0 = random_matrix<T>(B * N, heads * kDk, 1702);
  const Matrix<T> V0 = random_matrix<T>(B * N, heads * kDv, 1703);
  const Matrix<T> G0 = random_matrix<T>(B * N, heads * kDv, 1704);
  retention::MasaTrainOptions opt;
  opt.query_tile = 5;
  opt.key_tile = 6;
  opt.threads = 1;
  struct Out {
    Matrix<T> dq, dk, dv;
  };
  const auto view = [&](const Matrix<T>& m, Index dim) {
    return retention::heads_view(m.data(), B, N, heads, dim);
  };
  const auto mview = [&](Matrix<T>& m, Index dim) {
    return retention::heads_view(m.data(), B, N, heads, dim);
  };
  const auto run = [&](const Matrix<T>& Q, const Matrix<T>& K, const Matrix<T>& V,
                       const Matrix<T>& G, bool decomposed, bool saved) {
    Out o{Matrix<T>(B * N, heads * kDk), Matrix<T>(B * N, heads * kDk),
          Matrix<T>(B * N, heads * kDv)};
    const auto q = view(Q, kDk), k = view(K, kDk), v = view(V, kDv), g = view(G, kDv);
    const auto dq = mview(o.dq, kDk), dk = mview(o.dk, kDk), dv = mview(o.dv, kDv);
    Matrix<T> out(B * N, heads * kDv), u(B * N, heads * kDv), l1(B * N, heads), l2(B * N, heads);
    const auto vo = mview(out, kDv), vu = mview(u, kDv), v1 = mview(l1, 1), v2 = mview(l2, 1);
    if (!decomposed && saved) {
      retention::multi_head_masa_forward_train<T>(q, k, v, masks, vo, v1, opt);
      retention::multi_head_masa_backward<T>(q, k, v, masks, view(out, kDv), view(l1, 1), g, dq, dk,
                                             dv, opt);
    } else if (!decomposed) {
      retention::multi_head_masa_backward<T>(q, k, v, masks, g, dq, dk, dv, opt);
    } else if (saved) {
      retention::multi_head_masad_forward_train<T>(q, k, v, masks, vo, vu, v1, v2, opt);
      retention::multi_head_masad_backward<T>(q, k, v, masks, view(out, kDv), view(u, kDv),
                                              view(l1, 1), view(l2, 1), g, dq, dk, dv, opt);
    } else {
      retention::multi_head_masad_backward<T>(q, k, v, masks, g, dq, dk, dv, opt);
    }
    return o;
  };
  Counts counts;
  for (const bool decomposed : {false, true})
    for (const bool saved : {false, true}) {
      const Out clean = run(Q0, K0, V0, G0, decomposed, saved);
      const Index y = 2, x = 4, cell = y * kW + x;
      for (int which = 0; which < 4; ++which) {
        const T bad = std::numeric_limits<T>::quiet_NaN();
        const Index dim = which < 2 ? kDk : kDv, col = 1;
        Matrix<T> Q = Q0, K = K0, V = V0, G = G0;
        pick(Q, K, V, G, which)(bad_b * N + cell, bad_h * dim + col) = bad;
        const Out got = run(Q, K, V, G, decomposed, saved);
        const GradTaint t = masa_taint(kH, kW, kDk, kDv, which, cell, col, decomposed);
        const std::string what =
            std::string(decomposed ? "multi_head_masad_backward" : "multi_head_masa_backward") +
            (saved ? " (saved)" : "") + ", " + input_name(which) + " = NaN";
        for (Index b = 0; b < B; ++b)
          for (Index h = 0; h < heads; ++h) {
            const bool hit = b == bad_b && h == bad_h;
            const auto block = [&](const Matrix<T>& m, Index d) {
              return Matrix<T>(m.block(b * N, h * d, N, d));
            };
            const std::string pair =
                what + ", pair (" + std::to_string(b) + ", " + std::to_string(h) + ")";
            check_gradient<T>(block(got.dq, kDk), block(clean.dq, kDk),
                              hit ? t.dq : Flags::Constant(N, kDk, false), true, tol, pair + " dq",
                              counts);
            check_gradient<T>(block(got.dk, kDk), block(clean.dk, kDk),
                              hit ? t.dk : Flags::Constant(N, kDk, false), true, tol, pair + " dk",
                              counts);
            check_gradient<T>(block(got.dv, kDv), block(clean.dv, kDv),
                              hit ? t.dv : Flags::Constant(N, kDv, false), true, tol, pair + " dv",
                              counts);
          }
      }
    }
  EXPECT_GT(counts.clean, 0);
  EXPECT_GT(counts.nan, 0);
}

// Retention's backward forms, causal decay, normalisation none: a bad token t in q, k, v or dO
// leaves dQ rows n < t and dK, dV rows m > t finite and equal to the clean run (dQ_n reads tokens
// <= n of K, V and dO_n; dK_m, dV_m read tokens >= m). Heads of 128 make the chunkwise backward
// reuse its dQ sweep's score tiles in the dK sweep (at least 4 tile columns a head column).
template <class T>
void check_retention_forms(const std::vector<int>& forms, Index Tn, Index dk, Index dv) {
  const double tol = 10 * spec_tolerance<T>();
  const retention::CausalDecay decay(0.9);
  const Matrix<T> Q0 = random_matrix<T>(Tn, dk, 1801), K0 = random_matrix<T>(Tn, dk, 1802);
  const Matrix<T> V0 = random_matrix<T>(Tn, dv, 1803), G0 = random_matrix<T>(Tn, dv, 1804);
  const char* names[] = {"parallel", "chunkwise(3)", "chunkwise(16)", "recurrent"};
  const auto run = [&](int form, const Matrix<T>& Q, const Matrix<T>& K, const Matrix<T>& V,
                       const Matrix<T>& G) {
    if (form == 0) return retention::parallel_retention_backward(Q, K, V, decay, G);
    if (form == 1) return retention::chunkwise_retention_backward(Q, K, V, decay, 3, G);
    if (form == 2) return retention::chunkwise_retention_backward(Q, K, V, decay, 16, G);
    return retention::recurrent_retention_backward(Q, K, V, decay, G);
  };
  Counts counts;
  for (const int form : forms) {
    const auto clean = run(form, Q0, K0, V0, G0);
    for (const Index t : {Index(0), Index(4), Tn / 2, Tn - 1})
      for (int which = 0; which < 4; ++which)
        for (const auto& [bad, bad_name] : bad_values<T>()) {
          Matrix<T> Q = Q0, K = K0, V = V0, G = G0;
          pick(Q, K, V, G, which)(t, 1) = bad;
          const auto g = run(form, Q, K, V, G);
          const std::string what = std::string(names[form]) + "_retention_backward, " +
                                   input_name(which) + " = " + bad_name + " at token " +
                                   std::to_string(t) + " of " + std::to_string(Tn) + ", dk " +
                                   std::to_string(dk);
          Flags fq(Tn, dk), fk(Tn, dk), fv(Tn, dv);
          for (Index n = 0; n < Tn; ++n) {
            fq.row(n).setConstant(n >= t);
            fk.row(n).setConstant(n <= t);
            fv.row(n).setConstant(n <= t);
          }
          check_gradient<T>(g.dQ, clean.dQ, fq, false, tol, what + ", dQ", counts);
          check_gradient<T>(g.dK, clean.dK, fk, false, tol, what + ", dK", counts);
          check_gradient<T>(g.dV, clean.dV, fv, false, tol, what + ", dV", counts);
        }
  }
  EXPECT_GT(counts.clean, 0);
}

TYPED_TEST(NonFiniteGradients, RetentionChunkwiseAndRecurrentCausal) {
  check_retention_forms<TypeParam>({1, 2, 3}, 9, 4, 3);
  check_retention_forms<TypeParam>({1, 2}, 40, 128, 128);
}

TYPED_TEST(NonFiniteGradients, RetentionParallelCausal) {
  check_retention_forms<TypeParam>({0}, 9, 4, 3);
}

}  // namespace
