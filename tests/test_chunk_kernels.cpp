// retention-test-links: compiled
// The chunkwise form's register-blocked kernels (detail/chunk_kernels.hpp) against the naive double
// reference: every ragged width the column dispatch has (whole blocks, single packets, halving
// tails down to one lane), key widths that are not a multiple of the row block, chunks longer than
// a few packets (causal skipping of score blocks), short last chunks, and every input layout the
// kernel meets (strided rows as in the multi-head layout, column-major inputs, expressions,
// outputs that are blocks of wider or column-major matrices).
#include <retention/chunkwise.hpp>
#include <retention/decay.hpp>
#include <retention/state.hpp>

#include "reference/retention_reference.hpp"
#include "support/state_support.hpp"
#include "support/test_support.hpp"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace {

using retention_test::to_state;

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

const Normalization kNormalizations[] = {Normalization::none, Normalization::decay,
                                         Normalization::decay_and_score};

template <class T>
class ChunkKernelTest : public ::testing::Test {};
TYPED_TEST_SUITE(ChunkKernelTest, retention_test::ScalarTypes, ScalarName);

/// A random case: inputs, a random initial state at a non-zero position, and the reference.
struct Case {
  Matrix<double> Q, K, V;
  ref::State init;
  Case(Index T_len, Index dk, Index dv, std::uint64_t seed) {
    Q = random_matrix<double>(T_len, dk, seed);
    K = random_matrix<double>(T_len, dk, seed + 1, 1.0 / std::sqrt(static_cast<double>(dk)));
    V = random_matrix<double>(T_len, dv, seed + 2);
    init.S = random_matrix<double>(dk, dv, seed + 3);
    init.z = random_matrix<double>(dk, 1, seed + 4);
    init.position = 5;
  }
};

/// Runs chunkwise_retention on row-major copies and checks output and final state against the
/// reference, with and without the initial state.
template <class T>
void check_case(Index T_len, Index dk, Index dv, Index chunk, double gamma,
                Normalization normalization, std::uint64_t seed) {
  const Case c(T_len, dk, dv, seed);
  const CausalDecay decay(gamma);
  const std::string what = "T=" + std::to_string(T_len) + " dk=" + std::to_string(dk) +
                           " dv=" + std::to_string(dv) + " chunk=" + std::to_string(chunk) +
                           " gamma=" + std::to_string(gamma) +
                           " norm=" + std::to_string(static_cast<int>(normalization));
  const Matrix<T> Q = c.Q.cast<T>(), K = c.K.cast<T>(), V = c.V.cast<T>();
  for (bool with_state : {false, true}) {
    ref::State ref_final;
    const Matrix<double> expected = ref::retention(c.Q, c.K, c.V, gamma, normalization,
                                                   with_state ? &c.init : nullptr, &ref_final);
    RetentionState<T> init = to_state<T>(c.init), fin;
    RetentionOptions<T> opt;
    opt.normalization = normalization;
    opt.initial_state = with_state ? &init : nullptr;
    opt.final_state = &fin;
    const Matrix<T> out = retention::chunkwise_retention(Q, K, V, decay, chunk, opt);
    EXPECT_LE(relative_error(out, expected), spec_tolerance<T>())
        << what << " state " << with_state;
    EXPECT_LE(relative_error(fin.S, ref_final.S), spec_tolerance<T>()) << what;
    EXPECT_LE(relative_error(fin.z, ref_final.z), spec_tolerance<T>()) << what;
    EXPECT_EQ(fin.position, ref_final.position) << what;
  }
}

// Every value width from 1 to two blocks of packets and one past (float: 16 lanes a packet, blocks
// of 2): whole blocks, single packets and each halving tail, with key widths that leave a remainder
// of the 8-row blocks of the state update.
TYPED_TEST(ChunkKernelTest, EveryValueWidth) {
  using T = TypeParam;
  std::uint64_t seed = 100;
  for (Index dv = 1; dv <= 33; ++dv)
    for (Index dk : {1, 9})
      check_case<T>(23, dk, dv, 7, 0.96875, kNormalizations[dv % 3], seed += 10);
  for (Index dv : {47, 63, 65, 129})
    check_case<T>(23, 17, dv, 7, 0.9, kNormalizations[dv % 3], seed += 10);
}

// Key widths around the transpose's packet blocks and the row blocks of the state update.
TYPED_TEST(ChunkKernelTest, EveryKeyWidth) {
  using T = TypeParam;
  std::uint64_t seed = 200;
  for (Index dk : {1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 129})
    check_case<T>(29, dk, 5, 9, 0.98, kNormalizations[dk % 3], seed += 10);
}

// Chunks of several packets of keys (score blocks skipped above the diagonal), a last chunk of
// one token and of a few, chunk longer than T, T = 1, and gamma = 1 (no decay at all).
TYPED_TEST(ChunkKernelTest, ChunkLengthsAndEdges) {
  using T = TypeParam;
  std::uint64_t seed = 300;
  for (Index chunk : {1, 2, 8, 33, 64, 100})
    for (Normalization n : kNormalizations) check_case<T>(129, 20, 24, chunk, 0.99, n, seed += 10);
  for (Index T_len : {1, 2, 17})
    check_case<T>(T_len, 3, 18, 64, 0.9, Normalization::decay_and_score, seed += 10);
  check_case<T>(70, 16, 16, 32, 1.0, Normalization::decay, seed += 10);
  check_case<T>(70, 16, 16, 32, 1.0, Normalization::none, seed += 10);
}

// Strided rows (the multi-head layout), column-major inputs, an expression as input, and outputs
// that are a block of a wider row-major matrix or a column-major matrix all give the result of
// plain row-major matrices.
TYPED_TEST(ChunkKernelTest, InputAndOutputLayouts) {
  using T = TypeParam;
  const Index T_len = 45, dk = 12, dv = 20, chunk = 16, heads = 3;
  const double gamma = 0.95;
  const CausalDecay decay(gamma);
  const Case c(T_len, dk, dv, 400);
  const Matrix<double> expected =
      ref::retention(c.Q, c.K, c.V, gamma, Normalization::decay_and_score, &c.init);
  RetentionState<T> init = to_state<T>(c.init);
  RetentionOptions<T> opt;
  opt.normalization = Normalization::decay_and_score;
  opt.initial_state = &init;

  // Head 1 of 3 in [T, H, D] buffers, as multi_head_retention sees it.
  Matrix<T> q_buf = random_matrix<T>(T_len, heads * dk, 401);
  Matrix<T> k_buf = random_matrix<T>(T_len, heads * dk, 402);
  Matrix<T> v_buf = random_matrix<T>(T_len, heads * dv, 403);
  q_buf.middleCols(dk, dk) = c.Q.cast<T>();
  k_buf.middleCols(dk, dk) = c.K.cast<T>();
  v_buf.middleCols(dv, dv) = c.V.cast<T>();
  using Strided = Eigen::Map<const Matrix<T>, 0, Eigen::OuterStride<>>;
  const Strided Qs(q_buf.data() + dk, T_len, dk, Eigen::OuterStride<>(heads * dk));
  const Strided Ks(k_buf.data() + dk, T_len, dk, Eigen::OuterStride<>(heads * dk));
  const Strided Vs(v_buf.data() + dv, T_len, dv, Eigen::OuterStride<>(heads * dv));
  Matrix<T> wide = Matrix<T>::Constant(T_len, heads * dv, T(7));
  retention::chunkwise_retention_into(Qs, Ks, Vs, decay, chunk, wide.middleCols(dv, dv), opt);
  EXPECT_LE(relative_error(wide.middleCols(dv, dv), expected), spec_tolerance<T>());
  // The neighbouring heads' columns are untouched.
  EXPECT_TRUE((wide.leftCols(dv).array() == T(7)).all());
  EXPECT_TRUE((wide.rightCols(dv).array() == T(7)).all());

  // Column-major inputs and output.
  using ColMajor = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
  const ColMajor Qc = c.Q.cast<T>(), Kc = c.K.cast<T>(), Vc = c.V.cast<T>();
  ColMajor out_c(T_len, dv);
  retention::chunkwise_retention_into(Qc, Kc, Vc, decay, chunk, out_c, opt);
  EXPECT_LE(relative_error(out_c, expected), spec_tolerance<T>());

  // An expression as input (no storage of its own).
  const Matrix<T> Q2 = (c.Q * 2.0).cast<T>();
  const Matrix<T> out_e = retention::chunkwise_retention(
      (Q2.array() * T(0.5)).matrix(), c.K.cast<T>(), c.V.cast<T>(), decay, chunk, opt);
  EXPECT_LE(relative_error(out_e, expected), spec_tolerance<T>());
}

// A state carried chunk call by chunk call (final state aliasing the initial one) equals one pass,
// including calls shorter than a chunk.
TYPED_TEST(ChunkKernelTest, ContinuedCallsEqualOnePass) {
  using T = TypeParam;
  const Index T_len = 90, dk = 18, dv = 34;
  const double gamma = 0.97;
  const CausalDecay decay(gamma);
  const Case c(T_len, dk, dv, 500);
  ref::State ref_final;
  const Matrix<double> expected =
      ref::retention(c.Q, c.K, c.V, gamma, Normalization::decay, &c.init, &ref_final);
  const Matrix<T> Q = c.Q.cast<T>(), K = c.K.cast<T>(), V = c.V.cast<T>();
  RetentionState<T> st = to_state<T>(c.init);
  RetentionOptions<T> opt;
  opt.normalization = Normalization::decay;
  opt.initial_state = &st;
  opt.final_state = &st;
  Matrix<T> out(T_len, dv);
  const Index cuts[] = {0, 3, 4, 40, 41, 90};
  for (int s = 0; s + 1 < 6; ++s) {
    const Index b = cuts[s], len = cuts[s + 1] - cuts[s];
    out.middleRows(b, len) = retention::chunkwise_retention(
        Q.middleRows(b, len), K.middleRows(b, len), V.middleRows(b, len), decay, 16, opt);
  }
  EXPECT_LE(relative_error(out, expected), spec_tolerance<T>());
  EXPECT_LE(relative_error(st.S, ref_final.S), spec_tolerance<T>());
  EXPECT_LE(relative_error(st.z, ref_final.z), spec_tolerance<T>());
  EXPECT_EQ(st.position, ref_final.position);
}

// Long fast-decaying sequence in float: the intra-chunk mask at a large chunk passes through the
// denormal range to exactly 0, and nothing turns into NaN or Inf.
TYPED_TEST(ChunkKernelTest, LongChunkStaysFinite) {
  using T = TypeParam;
  check_case<T>(600, 4, 6, 512, 0.8, Normalization::decay_and_score, 600);
}

}  // namespace
