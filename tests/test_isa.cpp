// retention-test-links: compiled
// Run-time instruction-set dispatch (retention/isa.hpp, detail/simd/): every variant the processor
// runs (baseline, AVX2, AVX-512) computes the retention kernels to the same contracts, checked
// against naive double references written from the math; the vector exp against std::exp; the
// in-register transpose against a plain copy; outputs written through non-temporal stores against
// the same outputs written through the caches.
#include <retention/backward.hpp>
#include <retention/chunkwise.hpp>
#include <retention/detail/retention/recurrent_kernels.hpp>
#include <retention/isa.hpp>
#include <retention/multihead.hpp>
#include <retention/nn/linear.hpp>
#include <retention/recurrent.hpp>

#include "reference/backward_reference.hpp"
#include "reference/retention_reference.hpp"
#include "support/isa_support.hpp"
#include "support/test_support.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace {

using retention::Index;
using retention::Isa;
using retention::Normalization;
using retention_test::relative_error;
using Md = retention::Matrix<double>;

using retention_test::IsaScope;

/// The variants this processor runs.
std::vector<Isa> variants() { return retention_test::isa_variants(); }

TEST(Isa, ChoiceIsSupportedAndSettable) {
  EXPECT_LE(retention::active_isa(), retention::cpu_isa());
  for (Isa isa : variants()) {
    IsaScope scope(isa);
    EXPECT_EQ(retention::active_isa(), isa);
  }
  if (retention::cpu_isa() != Isa::avx512) {
    retention_test::expect_shape_error([] { retention::set_active_isa(Isa::avx512); },
                                       "set_active_isa");
  }
  retention_test::expect_shape_error([] { retention::set_active_isa(static_cast<Isa>(7)); },
                                     "set_active_isa");
  EXPECT_STREQ(retention::to_string(Isa::avx2), "avx2");
}

// --- The vector exp and transpose, through the same dispatch as the kernels. -----------------
struct ExpKernel {
  template <class IsaTag, class T>
  static void run(T* x, Index n) {
    namespace simd = retention::detail::simd;
    constexpr int N = simd::lanes<T, IsaTag>;
    Index i = 0;
    for (; i + N <= n; i += N) {
      const simd::Vec<T, N> v = simd::load<N>(x + i);
      simd::Vec<T, N> e;
      simd::exp_nonpositive<N, T>(e, v);
      simd::store(x + i, e);
    }
    for (; i < n; ++i) {
      simd::Vec<T, 1> e;
      simd::exp_nonpositive<1, T>(e, x[i]);
      x[i] = e;
    }
  }
};

template <class T>
void check_exp(Isa isa) {
  IsaScope scope(isa);
  const double lowest = sizeof(T) == 4 ? -87.0 : -708.0;
  std::mt19937_64 rng(42u + static_cast<unsigned>(isa));
  std::uniform_real_distribution<double> wide(1.1 * lowest, 0.0), narrow(-2.0, 0.0);
  std::vector<double> x;
  for (int i = 0; i < 20000; ++i) x.push_back(i % 2 ? wide(rng) : narrow(rng));
  const double specials[] = {0.0,          -0.0,         -1e-30,
                             -0.34657359,  -0.5,         lowest,
                             lowest - 0.5, 1.2 * lowest, -std::numeric_limits<double>::infinity()};
  x.insert(x.end(), std::begin(specials), std::end(specials));
  x.push_back(std::numeric_limits<double>::quiet_NaN());
  std::vector<T> y(x.begin(), x.end());
  retention::detail::simd::dispatch<ExpKernel>(y.data(), static_cast<Index>(y.size()));
  const double ulp = std::numeric_limits<T>::epsilon() / 2;
  double worst = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double xi = static_cast<double>(static_cast<T>(x[i]));
    if (std::isnan(xi)) {
      EXPECT_TRUE(std::isnan(y[i])) << "exp(NaN)";
      continue;
    }
    const double ref = std::exp(xi);
    if (xi >= lowest) {
      worst = std::max(worst, std::abs(static_cast<double>(y[i]) - ref) / ref);
    } else {
      // Below the normal range: 0 or a tiny normal value, never more than the smallest normal's
      // neighbourhood.
      EXPECT_GE(y[i], T(0)) << xi;
      EXPECT_LE(static_cast<double>(y[i]), 4 * static_cast<double>(std::numeric_limits<T>::min()))
          << xi;
    }
  }
  EXPECT_EQ(y[x.size() - 2], T(0)) << "exp(-inf)";
  EXPECT_LE(worst, 4 * ulp) << retention::to_string(isa) << ": worst " << worst / ulp << " ulp";
}

TEST(Isa, ExpNonpositiveEveryVariant) {
  for (Isa isa : variants()) {
    check_exp<float>(isa);
    check_exp<double>(isa);
  }
}

template <class T>
void check_transpose(Isa isa) {
  IsaScope scope(isa);
  for (Index rows : {1, 3, 4, 8, 15, 16, 17, 33})
    for (Index dk : {1, 5, 16, 17, 64}) {
      const Index ldx = dk + 3, ld = (rows + 15) / 16 * 16 + 16;
      const auto x =
          retention_test::random_matrix<T>(rows, ldx, static_cast<std::uint64_t>(rows * 100 + dk));
      retention::Matrix<T> kt = retention::Matrix<T>::Constant(dk, ld, T(7));
      retention::detail::transpose_rows(x.data(), ldx, rows, dk, kt.data(), ld);
      for (Index c = 0; c < dk; ++c)
        for (Index j = 0; j < ld; ++j)
          ASSERT_EQ(kt(c, j), j < rows ? x(j, c) : T(0))
              << retention::to_string(isa) << " rows " << rows << " dk " << dk << " at " << c << ","
              << j;
    }
}

TEST(Isa, TransposeRowsEveryVariant) {
  for (Isa isa : variants()) {
    check_transpose<float>(isa);
    check_transpose<double>(isa);
  }
}

// --- Retention forms on every variant against the naive double reference. --------------------
template <class T>
class IsaRetention : public ::testing::Test {};
TYPED_TEST_SUITE(IsaRetention, retention_test::ScalarTypes, retention_test::ScalarName);

struct Shape {
  Index T_len, dk, dv, chunk;
};

// The last shape's heads are wide enough for the chunkwise backward to keep its score tiles.
const Shape kShapes[] = {{1, 4, 4, 32},     {5, 1, 1, 2},     {37, 17, 33, 8},
                         {64, 16, 16, 64},  {100, 33, 7, 32}, {130, 64, 64, 64},
                         {70, 8, 129, 200}, {45, 3, 48, 1},   {75, 128, 96, 16}};

TYPED_TEST(IsaRetention, ChunkwiseRecurrentAndStepMatchReference) {
  using T = TypeParam;
  const double tol = retention_test::spec_tolerance<T>();
  std::uint64_t seed = 1000;
  for (Isa isa : variants()) {
    IsaScope scope(isa);
    for (const Shape& s : kShapes)
      for (Normalization norm :
           {Normalization::none, Normalization::decay, Normalization::decay_and_score})
        for (double gamma : {0.9, 1.0}) {
          const auto Q = retention_test::random_matrix<T>(s.T_len, s.dk, ++seed);
          const auto K = retention_test::random_matrix<T>(s.T_len, s.dk, ++seed);
          const auto V = retention_test::random_matrix<T>(s.T_len, s.dv, ++seed);
          retention::RetentionState<T> init(s.dk, s.dv);
          init.S = retention_test::random_matrix<T>(s.dk, s.dv, ++seed);
          init.z = retention_test::random_matrix<T>(s.dk, 1, ++seed);
          init.position = 3;
          retention_reference::State ref_init{init.S.template cast<double>(),
                                              init.z.template cast<double>(), 3};
          retention_reference::State ref_final;
          const Md expected = retention_reference::retention(
              Q.template cast<double>(), K.template cast<double>(), V.template cast<double>(),
              gamma, norm, &ref_init, &ref_final);
          const retention::CausalDecay decay(gamma);
          retention::RetentionState<T> final_state(s.dk, s.dv);
          retention::RetentionOptions<T> options;
          options.normalization = norm;
          options.initial_state = &init;
          options.final_state = &final_state;
          const auto what = [&] {
            return std::string(retention::to_string(isa)) + " T=" + std::to_string(s.T_len) +
                   " dk=" + std::to_string(s.dk) + " dv=" + std::to_string(s.dv) +
                   " C=" + std::to_string(s.chunk) + " " + retention::to_string(norm) +
                   " gamma=" + std::to_string(gamma);
          };
          const auto chunked = retention::chunkwise_retention(Q, K, V, decay, s.chunk, options);
          EXPECT_LE(relative_error(chunked, expected), tol) << "chunkwise " << what();
          EXPECT_LE(relative_error(final_state.S, ref_final.S), tol) << "chunkwise S " << what();
          EXPECT_LE(relative_error(final_state.z, ref_final.z), tol) << "chunkwise z " << what();
          const auto recurrent = retention::recurrent_retention(Q, K, V, decay, options);
          EXPECT_LE(relative_error(recurrent, expected), tol) << "recurrent " << what();
          // Decoding token by token from the same initial state.
          retention::RetentionState<T> state = init;
          retention::Matrix<T> stepped(s.T_len, s.dv);
          for (Index t = 0; t < s.T_len; ++t)
            stepped.row(t) =
                retention::retention_step(Q.row(t), K.row(t), V.row(t), decay, state, norm);
          EXPECT_LE(relative_error(stepped, expected), tol) << "step " << what();
          EXPECT_LE(relative_error(state.S, ref_final.S), tol) << "step S " << what();
        }
  }
}

TYPED_TEST(IsaRetention, ChunkwiseBackwardMatchesReference) {
  using T = TypeParam;
  // Float gradients pass through more rounding steps than outputs (SPEC 6 gives 1e-4 there).
  const double tol = sizeof(T) == 4 ? 1e-4 : 1e-11;
  std::uint64_t seed = 5000;
  for (Isa isa : variants()) {
    IsaScope scope(isa);
    for (const Shape& s : kShapes)
      for (Normalization norm : {Normalization::none, Normalization::decay_and_score}) {
        const auto Q = retention_test::random_matrix<T>(s.T_len, s.dk, ++seed);
        const auto K = retention_test::random_matrix<T>(s.T_len, s.dk, ++seed);
        const auto V = retention_test::random_matrix<T>(s.T_len, s.dv, ++seed);
        const auto G = retention_test::random_matrix<T>(s.T_len, s.dv, ++seed);
        retention::RetentionState<T> init(s.dk, s.dv);
        init.S = retention_test::random_matrix<T>(s.dk, s.dv, ++seed);
        init.z = retention_test::random_matrix<T>(s.dk, 1, ++seed);
        init.position = 2;
        retention_reference::State ref_init{init.S.template cast<double>(),
                                            init.z.template cast<double>(), 2};
        const double gamma = 0.93;
        const auto ref = retention_reference::retention_backward(
            Q.template cast<double>(), K.template cast<double>(), V.template cast<double>(), gamma,
            norm, &ref_init, G.template cast<double>(), nullptr, false);
        retention::RetentionBackwardOptions<T> options;
        options.normalization = norm;
        options.initial_state = &init;
        const auto g = retention::chunkwise_retention_backward(
            Q, K, V, retention::CausalDecay(gamma), s.chunk, G, options);
        const std::string what = std::string(retention::to_string(isa)) +
                                 " T=" + std::to_string(s.T_len) + " dk=" + std::to_string(s.dk) +
                                 " dv=" + std::to_string(s.dv) + " C=" + std::to_string(s.chunk) +
                                 " " + retention::to_string(norm);
        EXPECT_LE(relative_error(g.dQ, ref.dQ), tol) << "dQ " << what;
        EXPECT_LE(relative_error(g.dK, ref.dK), tol) << "dK " << what;
        EXPECT_LE(relative_error(g.dV, ref.dV), tol) << "dV " << what;
        EXPECT_LE(relative_error(g.d_initial_state.S, ref.dS0), tol) << "dS0 " << what;
      }
  }
}

/// The variants agree with each other to rounding on one multi-head call (4 heads of 64).
TEST(Isa, VariantsAgreeOnMultiHeadChunkwise) {
  const Index B = 2, T_len = 96, H = 4, d = 64;
  const auto q = retention_test::random_matrix<float>(B * T_len * H, d, 1);
  const auto k = retention_test::random_matrix<float>(B * T_len * H, d, 2);
  const auto v = retention_test::random_matrix<float>(B * T_len * H, d, 3);
  const retention::MultiHeadShape shape{B, T_len, H, d, d};
  const auto gammas = retention::retnet_gammas(H);
  std::vector<retention::Matrix<float>> outs;
  for (Isa isa : variants()) {
    IsaScope scope(isa);
    retention::Matrix<float> o(B * T_len * H, d);
    retention::MultiHeadOptions<float> options;
    options.chunk = 32;
    options.normalization = Normalization::decay_and_score;
    retention::multi_head_retention(q.data(), k.data(), v.data(), o.data(), shape, gammas, options);
    outs.push_back(o);
  }
  for (std::size_t i = 1; i < outs.size(); ++i)
    EXPECT_LE(relative_error(outs[i], outs[0]), 2e-6) << retention::to_string(variants()[i]);
}

// --- The decode step's kernel at every alignment of the state. --------------------------------
// A state allocated by a file built without -mavx (Eigen aligns to 16 bytes there) starts inside
// a vector; the kernel then sweeps it in aligned vectors that straddle rows. Each state here is a
// vector of exactly its own size starting `offset` elements into its allocation, so that a read or
// write outside it shows under the sanitizers.
template <class T>
void check_step_alignments(Isa isa) {
  IsaScope scope(isa);
  namespace rd = retention::detail;
  std::uint64_t seed = 70000;
  for (Index dk : {1, 2, 5, 64})
    for (Index dv : {1, 3, 4, 8, 16, 20, 48, 64, 128, 192})
      for (double gamma : {0.97, 1.0}) {
        const auto S0 = retention_test::random_matrix<double>(dk, dv, ++seed);
        const auto q = retention_test::random_matrix<double>(3, dk, ++seed);
        const auto k = retention_test::random_matrix<double>(3, dk, ++seed);
        const auto v = retention_test::random_matrix<double>(3, dv, ++seed);
        // Naive double reference: S = gamma S + k^T v, o = q S, three tokens.
        Md S = S0, o_ref(1, dv);
        for (Index t = 0; t < 3; ++t) {
          o_ref.setZero();
          for (Index i = 0; i < dk; ++i)
            for (Index j = 0; j < dv; ++j) {
              S(i, j) = gamma * S(i, j) + k(t, i) * v(t, j);
              o_ref(0, j) += q(t, i) * S(i, j);
            }
        }
        std::vector<T> S_first, o_first;
        for (Index offset = 0; offset < 16; ++offset) {
          std::vector<T> buffer(static_cast<std::size_t>(offset + dk * dv));
          T* s = buffer.data() + offset;
          for (Index i = 0; i < dk * dv; ++i) s[i] = static_cast<T>(S0(i / dv, i % dv));
          std::vector<T> qt(static_cast<std::size_t>(dk)), kt(qt.size()),
              vt(static_cast<std::size_t>(dv)), o(vt.size());
          for (Index t = 0; t < 3; ++t) {
            for (Index i = 0; i < dk; ++i) {
              qt[static_cast<std::size_t>(i)] = static_cast<T>(q(t, i));
              kt[static_cast<std::size_t>(i)] = static_cast<T>(k(t, i));
            }
            for (Index j = 0; j < dv; ++j)
              vt[static_cast<std::size_t>(j)] = static_cast<T>(v(t, j));
            rd::simd::dispatch<rd::RecurrentUpdateKernel>(
                s, dk, dv, static_cast<T>(gamma), static_cast<const T*>(qt.data()),
                static_cast<const T*>(kt.data()), static_cast<const T*>(vt.data()), o.data());
          }
          const std::string what = std::string(retention::to_string(isa)) +
                                   " dk=" + std::to_string(dk) + " dv=" + std::to_string(dv) +
                                   " gamma=" + std::to_string(gamma) +
                                   " offset=" + std::to_string(offset);
          Md S_got(dk, dv), o_got(1, dv);
          for (Index i = 0; i < dk * dv; ++i) S_got(i / dv, i % dv) = static_cast<double>(s[i]);
          for (Index j = 0; j < dv; ++j)
            o_got(0, j) = static_cast<double>(o[static_cast<std::size_t>(j)]);
          const double tol = retention_test::spec_tolerance<T>();
          EXPECT_LE(relative_error(S_got, S), tol) << "S " << what;
          EXPECT_LE(relative_error(o_got, o_ref), tol) << "o " << what;
          if (offset == 0) {
            S_first.assign(s, s + dk * dv);
            o_first = o;
          } else {
            // The same operations on every element, in the same order, whatever the address.
            ASSERT_TRUE(S_first == std::vector<T>(s, s + dk * dv)) << "S values " << what;
            ASSERT_TRUE(o_first == o) << "o values " << what;
          }
        }
      }
}

TEST(Isa, DecodeStepAtEveryStateAlignment) {
  for (Isa isa : variants()) {
    check_step_alignments<float>(isa);
    check_step_alignments<double>(isa);
  }
}

/// Outputs spanning more than detail::stream_output_min_bytes are written through non-temporal
/// stores (StreamRowsKernel); they must hold the same bits as the cached stores give. One
/// multi-head chunkwise forward and backward over [1, 2048, 8, 128] floats (8 MiB an output),
/// once with 64-byte-aligned rows and once with every row 16 bytes past a line boundary (whole
/// lines in the middle, partial lines at the ends), against each head run alone on contiguous
/// copies (1 MiB, cached stores), in every variant; head 0 also against a naive double recurrence.
TEST(Isa, StreamedOutputsEqualCachedOnes) {
  using Mf = retention::Matrix<float>;
  const Index T_len = 2048, H = 8, d = 128, chunk = 32, n = T_len * H * d;
  const auto gammas = retention::retnet_gammas(H);
  const Mf q = retention_test::random_matrix<float>(T_len, H * d, 11);
  const Mf k = retention_test::random_matrix<float>(T_len, H * d, 12, 1.0 / std::sqrt(128.0));
  const Mf v = retention_test::random_matrix<float>(T_len, H * d, 13);
  const Mf g = retention_test::random_matrix<float>(T_len, H * d, 14);
  // Each output in a buffer of its own, starting `offset` floats past a 64-byte boundary.
  struct Out {
    std::vector<float> storage;
    float* p;
    Out(Index size, Index offset) : storage(static_cast<std::size_t>(size + 32), -1.0f) {
      auto a = reinterpret_cast<std::uintptr_t>(storage.data());
      const auto skip = static_cast<Index>(((64 - a % 64) % 64) / sizeof(float));
      p = storage.data() + skip + offset;
    }
  };
  const auto view = [&](const float* x) { return retention::heads_view(x, 1, T_len, H, d); };
  const auto out_view = [&](float* x) { return retention::heads_view(x, 1, T_len, H, d); };
  for (Isa isa : variants()) {
    IsaScope scope(isa);
    for (Index offset : {Index(0), Index(4)}) {
      const std::string what = std::string(retention::to_string(isa)) + " row offset " +
                               std::to_string(offset * 4) + " bytes";
      Out o(n, offset), dq(n, offset), dk(n, offset), dv(n, offset);
      using Strided = Eigen::Map<Mf, 0, Eigen::OuterStride<>>;
      const Strided o_map(o.p, T_len, d, Eigen::OuterStride<>(H * d));
      ASSERT_TRUE(retention::detail::streams_chunk_rows<float>(o_map)) << what;
      for (Normalization norm : {Normalization::none, Normalization::decay_and_score}) {
        retention::MultiHeadOptions<float> fo;
        fo.chunk = chunk;
        fo.normalization = norm;
        retention::multi_head_retention(view(q.data()), view(k.data()), view(v.data()),
                                        out_view(o.p), retention::causal_masks(gammas), fo);
        retention::MultiHeadBackwardOptions<float> bo;
        bo.chunk = chunk;
        bo.normalization = norm;
        retention::multi_head_retention_backward(
            view(q.data()), view(k.data()), view(v.data()), view(g.data()), out_view(dq.p),
            out_view(dk.p), out_view(dv.p), retention::causal_masks(gammas), bo);
        for (Index h = 0; h < H; ++h) {
          const Mf qh = q.middleCols(h * d, d), kh = k.middleCols(h * d, d),
                   vh = v.middleCols(h * d, d), gh = g.middleCols(h * d, d);
          const retention::CausalDecay decay(gammas[static_cast<std::size_t>(h)]);
          retention::RetentionOptions<float> ro;
          ro.normalization = norm;
          const Mf expected = retention::chunkwise_retention(qh, kh, vh, decay, chunk, ro);
          retention::RetentionBackwardOptions<float> rbo;
          rbo.normalization = norm;
          const auto grads =
              retention::chunkwise_retention_backward(qh, kh, vh, decay, chunk, gh, rbo);
          const auto head = [&](const Out& x) {
            return Mf(Strided(x.p + h * d, T_len, d, Eigen::OuterStride<>(H * d)));
          };
          const std::string at =
              what + " " + retention::to_string(norm) + " head " + std::to_string(h);
          EXPECT_EQ((head(o) - expected).cwiseAbs().maxCoeff(), 0.0f) << "out " << at;
          EXPECT_EQ((head(dq) - grads.dQ).cwiseAbs().maxCoeff(), 0.0f) << "dq " << at;
          EXPECT_EQ((head(dk) - grads.dK).cwiseAbs().maxCoeff(), 0.0f) << "dk " << at;
          EXPECT_EQ((head(dv) - grads.dV).cwiseAbs().maxCoeff(), 0.0f) << "dv " << at;
          if (h == 0 && norm == Normalization::none) {
            // S_t = gamma S_(t-1) + k_t^T v_t, o_t = q_t S_t, in double.
            const double gamma = gammas[0];
            Md S = Md::Zero(d, d), naive(T_len, d);
            for (Index t = 0; t < T_len; ++t) {
              S = gamma * S + kh.row(t).transpose().cast<double>() * vh.row(t).cast<double>();
              naive.row(t) = qh.row(t).cast<double>() * S;
            }
            EXPECT_LE(relative_error(head(o), naive), 1e-5) << "naive " << at;
          }
        }
        // Nothing outside the outputs was written.
        for (const Out* x : {&o, &dq, &dk, &dv}) {
          const Index before = x->p - x->storage.data();
          for (Index i = 0; i < before; ++i)
            ASSERT_EQ(x->storage[static_cast<std::size_t>(i)], -1.0f) << what;
          for (Index i = before + n; i < Index(x->storage.size()); ++i)
            ASSERT_EQ(x->storage[static_cast<std::size_t>(i)], -1.0f) << what;
        }
      }
    }
  }
}

}  // namespace

// --- Linear's products (detail/linear_kernel.hpp) ------------------------------------------------
// Every variant, float and double: y = x W^T + b against the sum written out in double, each
// entry within (in + 1) eps of the sum of its terms' magnitudes; shapes across every block edge of
// the kernel (row blocks, 4..1-row tails, the 128-row passes, ragged panels, the 256-input depth
// blocks, the 512-output packed blocks), x and y blocks of larger matrices, plain and packed
// weights; nothing outside the output block is written. Where the kernel runs on both (AVX2,
// AVX-512; 4 rows or more), a packed weight and column splits that start inside a panel give the
// same bits as the plain product.
template <class T>
void check_linear_variant(Isa isa) {
  IsaScope scope(isa);
  const bool kernel = retention::detail::linear_kernel_active<T>();
  std::uint64_t seed = 500;
  for (const Index rows : {Index(1), Index(3), Index(4), Index(7), Index(8), Index(13), Index(130)})
    for (const Index in : {Index(1), Index(17), Index(256), Index(300), Index(513)})
      for (const Index out : {Index(1), Index(9), Index(32), Index(33), Index(520)}) {
        const bool bias = (rows + in + out) % 2 == 0;
        retention::Linear<T> plain(in, out, bias);
        plain.set_weight(retention_test::random_matrix<double>(out, in, ++seed));
        if (bias) plain.set_bias(retention_test::random_matrix<double>(1, out, ++seed));
        retention::Linear<T> packed = plain;
        packed.set_packed(true);
        // x and y as blocks of larger matrices: row strides other than their widths.
        const retention::Matrix<T> xs = retention_test::random_matrix<T>(rows + 1, in + 5, ++seed);
        const auto x = xs.block(1, 2, rows, in);
        retention::Matrix<T> ys = retention::Matrix<T>::Constant(rows + 2, out + 3, T(7));
        auto y = ys.block(1, 1, rows, out);
        plain.forward_into(x, y);
        retention::Matrix<T> y_packed(rows, out);
        packed.forward_into(x, y_packed);
        const std::string where = std::string(retention::to_string(isa)) + " " +
                                  std::to_string(rows) + " x " + std::to_string(in) + " -> " +
                                  std::to_string(out);
        double worst = 0.0, worst_packed = 0.0;
        for (Index r = 0; r < rows; ++r)
          for (Index o = 0; o < out; ++o) {
            double sum = bias ? static_cast<double>(plain.bias()(o)) : 0.0;
            double magnitude = std::abs(sum);
            for (Index i = 0; i < in; ++i) {
              const double term =
                  static_cast<double>(x(r, i)) * static_cast<double>(plain.weight()(o, i));
              sum += term;
              magnitude += std::abs(term);
            }
            magnitude = std::max(magnitude, std::numeric_limits<double>::min());
            worst = std::max(worst, std::abs(static_cast<double>(y(r, o)) - sum) / magnitude);
            worst_packed = std::max(
                worst_packed, std::abs(static_cast<double>(y_packed(r, o)) - sum) / magnitude);
          }
        const double bound = static_cast<double>(in + 1) * std::numeric_limits<T>::epsilon();
        EXPECT_LE(worst, bound) << where;
        EXPECT_LE(worst_packed, bound) << where << ", packed";
        retention::Matrix<T> outside = ys;
        outside.block(1, 1, rows, out).setConstant(T(7));
        EXPECT_TRUE((outside.array() == T(7)).all()) << where;
        if (!kernel || rows < retention::detail::linear_kernel_min_rows) continue;
        const retention::Matrix<T> want = y;
        EXPECT_TRUE(y_packed == want) << where << ", packed";
        for (const retention::Linear<T>* l : {&plain, &packed}) {
          retention::Matrix<T> y3 = retention::Matrix<T>::Zero(rows, out);
          const Index c0 = out / 3;  // inside a panel for 33 and 520 outputs
          l->forward_columns_into(x, y3, 0, c0);
          l->forward_columns_into(x, y3, c0, out - c0);
          EXPECT_TRUE(y3 == want) << where << ", split at " << c0
                                  << (l == &packed ? ", packed" : "");
        }
      }
}

TEST(Isa, LinearEveryVariant) {
  for (Isa isa : variants()) {
    check_linear_variant<float>(isa);
    check_linear_variant<double>(isa);
  }
}
