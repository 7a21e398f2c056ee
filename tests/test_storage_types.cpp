// retention-test-links: compiled
// Storage types: Eigen::bfloat16 and Eigen::half inputs and weights with float accumulation and a
// float state.
//
// Tolerance (derived, then checked). A 16-bit storage format with p significant bits (bfloat16:
// 7 stored + 1 implicit = 8; half: 11) rounds a value x to x (1 + e), |e| <= u = 2^-p (bfloat16
// 2^-8 = 3.9e-3, half 2^-11 = 4.9e-4; subnormal halves have an absolute error of at most 2^-25
// instead). Widening to float is exact, so the decode step on 16-bit q, k, v computes exactly
// what the float step computes on the rounded values. Each term of a retention output,
// gamma^(n-m) q_n,i k_m,i v_m,j, is a product of three inputs, so rounding moves it by at most
// ((1 + u)^3 - 1) of its magnitude, and elementwise
//   |o16 - o32| <= ((1 + u)^3 - 1) A + (float rounding of both paths),
//   A_n,j = sum_m gamma^(n-m) sum_i |q_n,i k_m,i v_m,j|  (times the `decay` factor, exact in both),
// with the float rounding bounded here by 1e-5 A. The same bound holds relative to A, not to |o|:
// where the terms cancel, |o| is much smaller than A and its relative error larger.
// Checked here: the 16-bit paths equal the float paths on rounded values bit for bit, and differ
// from the float paths on unrounded values within the bound above (measured worst ratio reported).
// Weights: a layer loading 16-bit weights equals the layer loading the rounded values in float;
// against unrounded float weights the MSR output moves by a few u relative (the projections' inputs
// and weights each carry u; the norm removes the scale; measured and bounded by 8 u here).
#include <retention/layers/msr.hpp>
#include <retention/nn/parameters.hpp>
#include <retention/varlen.hpp>

#include "support/test_support.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace {

using retention::Index;
using retention::Matrix;
using retention::MsrConfig;
using retention::MsrState;
using retention::MultiScaleRetention;
using retention::Normalization;
using retention::RetentionState;
using retention_test::random_matrix;
using retention_test::relative_error;

template <class S>
constexpr double unit_roundoff() {
  return std::is_same<S, Eigen::bfloat16>::value ? std::ldexp(1.0, -8) : std::ldexp(1.0, -11);
}

template <class S>
class StorageTypes : public ::testing::Test {};
using Storage = ::testing::Types<Eigen::bfloat16, Eigen::half>;
struct StorageName {
  template <class S>
  static std::string GetName(int) {
    return std::is_same<S, Eigen::bfloat16>::value ? "bfloat16" : "half";
  }
};
TYPED_TEST_SUITE(StorageTypes, Storage, StorageName);

TYPED_TEST(StorageTypes, DecodeStepWithinTheDerivedBound) {
  using S = TypeParam;
  const double u = unit_roundoff<S>();
  const Index B = 3, H = 2, dk = 8, dv = 6, T = 40;
  const std::vector<double> gammas{0.96875, 0.75};
  const auto masks = retention::causal_masks(gammas);
  // Three decodes of the same B sequences: 16-bit inputs, float on the rounded values, float on
  // the unrounded values.
  std::vector<RetentionState<float>> s16(B * H, RetentionState<float>(dk, dv)), s_rounded = s16,
                                                                                s32 = s16;
  auto ptrs = [&](std::vector<RetentionState<float>>& v) {
    std::vector<RetentionState<float>*> p;
    for (auto& s : v) p.push_back(&s);
    return p;
  };
  const auto p16 = ptrs(s16), p_rounded = ptrs(s_rounded), p32 = ptrs(s32);
  retention::VarlenStepWorkspace<float> work;
  const Matrix<double> q = random_matrix<double>(T * B, H * dk, 1),
                       k = random_matrix<double>(T * B, H * dk, 2, 0.4),
                       v = random_matrix<double>(T * B, H * dv, 3);
  double worst = 0.0;
  for (Index t = 0; t < T; ++t) {
    const Matrix<S> q16 = q.middleRows(t * B, B).cast<float>().cast<S>(),
                    k16 = k.middleRows(t * B, B).cast<float>().cast<S>(),
                    v16 = v.middleRows(t * B, B).cast<float>().cast<S>();
    const Matrix<float> qr = q16.template cast<float>(), kr = k16.template cast<float>(),
                        vr = v16.template cast<float>();
    const Matrix<float> q32 = q.middleRows(t * B, B).cast<float>(),
                        k32 = k.middleRows(t * B, B).cast<float>(),
                        v32 = v.middleRows(t * B, B).cast<float>();
    Matrix<float> o16(B, H * dv), o_rounded(B, H * dv), o32(B, H * dv);
    auto view = [&](const auto& m, Index D) { return retention::heads_view(m.data(), B, 1, H, D); };
    retention::varlen_step(view(q16, dk), view(k16, dk), view(v16, dv),
                           retention::heads_view(o16.data(), B, 1, H, dv), masks, p16,
                           Normalization::decay, 1, &work);
    retention::varlen_step(view(qr, dk), view(kr, dk), view(vr, dv),
                           retention::heads_view(o_rounded.data(), B, 1, H, dv), masks, p_rounded,
                           Normalization::decay);
    retention::varlen_step(view(q32, dk), view(k32, dk), view(v32, dv),
                           retention::heads_view(o32.data(), B, 1, H, dv), masks, p32,
                           Normalization::decay);
    ASSERT_EQ(o16, o_rounded) << "token " << t;  // widening is exact: the same float computation
    // The bound, from the unrounded inputs in double.
    for (Index b = 0; b < B; ++b)
      for (Index h = 0; h < H; ++h) {
        const double g = gammas[static_cast<std::size_t>(h)];
        double decay_sum = 0.0;
        for (Index i = 0; i <= t; ++i) decay_sum += std::pow(g, static_cast<double>(i));
        for (Index j = 0; j < dv; ++j) {
          double A = 0.0;
          for (Index m = 0; m <= t; ++m) {
            double qk = 0.0;
            for (Index i = 0; i < dk; ++i)
              qk += std::abs(q(t * B + b, h * dk + i) * k(m * B + b, h * dk + i));
            A += std::pow(g, static_cast<double>(t - m)) * qk * std::abs(v(m * B + b, h * dv + j));
          }
          A /= std::sqrt(decay_sum);
          const double diff = std::abs(double(o16(b, h * dv + j)) - double(o32(b, h * dv + j)));
          const double bound = (std::pow(1.0 + u, 3) - 1.0) * A + 1e-5 * A;
          EXPECT_LE(diff, bound) << "token " << t << " seq " << b << " head " << h << " col " << j;
          worst = std::max(worst, diff / ((std::pow(1.0 + u, 3) - 1.0) * A));
        }
      }
  }
  for (std::size_t i = 0; i < s16.size(); ++i) EXPECT_EQ(s16[i].S, s_rounded[i].S);
  // Not vacuous: the rounding is visible at a sizeable fraction of the bound.
  EXPECT_GT(worst, 0.02);
  ::testing::Test::RecordProperty("worst_fraction_of_bound", std::to_string(worst));
}

MsrConfig small_config() {
  MsrConfig c;
  c.embed_dim = 16;
  c.value_dim = 32;
  c.heads = 4;
  c.threads = 1;
  return c;
}

TYPED_TEST(StorageTypes, LayerLoadsSixteenBitWeights) {
  using S = TypeParam;
  const double u = unit_roundoff<S>();
  const char* names[] = {"q_proj", "k_proj", "v_proj", "g_proj", "out_proj"};
  const Index shapes[5][2] = {{16, 16}, {16, 16}, {32, 16}, {32, 16}, {16, 32}};
  std::vector<Matrix<double>> exact;
  std::vector<Matrix<S>> stored;
  std::vector<Matrix<float>> rounded, unrounded;
  for (int p = 0; p < 5; ++p) {
    exact.push_back(random_matrix<double>(shapes[p][0], shapes[p][1],
                                          20 + static_cast<std::uint64_t>(p),
                                          1.0 / std::sqrt(double(shapes[p][1]))));
    unrounded.push_back(exact.back().cast<float>());
    stored.push_back(unrounded.back().cast<S>());
    rounded.push_back(stored.back().template cast<float>());
  }
  retention::ParameterMap m16, m_rounded, m32;
  for (int p = 0; p < 5; ++p) {
    const std::string name = std::string("layers.0.retention.") + names[p] + ".weight";
    m16.add_dense(name, stored[static_cast<std::size_t>(p)]);
    m_rounded.add_dense(name, rounded[static_cast<std::size_t>(p)]);
    m32.add_dense(name, unrounded[static_cast<std::size_t>(p)]);
  }
  MultiScaleRetention<float> l16(small_config()), l_rounded(small_config()), l32(small_config());
  l16.load(m16, "layers.0.retention.");
  l_rounded.load(m_rounded, "layers.0.retention.");
  l32.load(m32, "layers.0.retention.");
  const Matrix<float> x = random_matrix<float>(33, 16, 9);
  const Matrix<float> y16 = l16.forward(x);
  EXPECT_EQ(y16, l_rounded.forward(x));
  const double err = relative_error(y16, l32.forward(x));
  EXPECT_LE(err, 8 * u);
  EXPECT_GT(err, 0.0);
  ::testing::Test::RecordProperty("relative_error_in_u", std::to_string(err / u));

  // Batched decoding on 16-bit token rows equals decoding the rounded rows in float.
  std::vector<MsrState<float>> a, b;
  for (int i = 0; i < 4; ++i) a.push_back(l16.make_state());
  b = a;
  std::vector<MsrState<float>*> pa, pb;
  for (int i = 0; i < 4; ++i)
    pa.push_back(&a[static_cast<std::size_t>(i)]), pb.push_back(&b[static_cast<std::size_t>(i)]);
  MultiScaleRetention<float>::BatchWorkspace wa, wb;
  for (Index t = 0; t < 5; ++t) {
    const Matrix<S> x16 = random_matrix<float>(4, 16, 40 + static_cast<std::uint64_t>(t)).cast<S>();
    const Matrix<float> xr = x16.template cast<float>();
    Matrix<float> ya(4, 16), yb(4, 16);
    l16.step_batch(x16, pa, ya, wa);
    l16.step_batch(xr, pb, yb, wb);
    EXPECT_EQ(ya, yb) << "step " << t;
  }
}

}  // namespace
