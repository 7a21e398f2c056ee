// retention-test-links: compiled
// In-place calls (issue 15 #2): every _into of the three forms rejects an `out` that shares memory
// with Q, K, V or a state (shape_error "<f>_into: out overlaps V; in-place calls are not
// supported") before writing anything, while disjoint views of one buffer (column blocks, heads
// of a [T, H d] layout) stay allowed, and final_state may alias initial_state. Also retention_step
// (q, k, v over the state) and the memory-overlap predicate itself.
#include <retention/chunkwise.hpp>
#include <retention/decay.hpp>
#include <retention/detail/overlap.hpp>
#include <retention/parallel.hpp>
#include <retention/recurrent.hpp>

#include "reference/retention_reference.hpp"
#include "support/test_support.hpp"

#include <gtest/gtest.h>

#include <functional>
#include <string>

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

const char* const kInto[] = {"parallel_retention_into", "recurrent_retention_into",
                             "chunkwise_retention_into"};

/// Calls the named _into with chunk 2.
template <class DQ, class DK, class DV, class Out, class S>
void call_into(const std::string& f, const DQ& Q, const DK& K, const DV& V, Out&& out,
               const RetentionOptions<S>& o) {
  const CausalDecay decay(0.9);
  if (f == "parallel_retention_into")
    retention::parallel_retention_into(Q, K, V, decay, std::forward<Out>(out), o);
  else if (f == "recurrent_retention_into")
    retention::recurrent_retention_into(Q, K, V, decay, std::forward<Out>(out), o);
  else
    retention::chunkwise_retention_into(Q, K, V, decay, 2, std::forward<Out>(out), o);
}

/// f must throw shape_error with exactly `message`.
void expect_message(const std::function<void()>& f, const std::string& message) {
  try {
    f();
    ADD_FAILURE() << "no exception, expected \"" << message << "\"";
  } catch (const retention::shape_error& e) {
    EXPECT_EQ(std::string(e.what()), message);
  }
}

template <class T>
class Aliasing : public ::testing::Test {};
TYPED_TEST_SUITE(Aliasing, retention_test::ScalarTypes, ScalarName);

TYPED_TEST(Aliasing, OutOverlappingAnInputIsRejectedBeforeAnyWrite) {
  using T = TypeParam;
  const Index len = 6, d = 3;  // square heads: Q, K and V all have out's shape
  for (const std::string f : kInto) {
    Matrix<T> Q = random_matrix<T>(len, d, 1), K = random_matrix<T>(len, d, 2);
    Matrix<T> V = random_matrix<T>(len, d, 3);
    const Matrix<T> Q0 = Q, K0 = K, V0 = V;
    const RetentionOptions<T> o;
    expect_message([&] { call_into(f, Q, K, V, Q, o); },
                   f + ": out overlaps Q; in-place calls are not supported");
    expect_message([&] { call_into(f, Q, K, V, K, o); },
                   f + ": out overlaps K; in-place calls are not supported");
    expect_message([&] { call_into(f, Q, K, V, V, o); },
                   f + ": out overlaps V; in-place calls are not supported");
    // Nothing was written.
    EXPECT_EQ(Q, Q0);
    EXPECT_EQ(K, K0);
    EXPECT_EQ(V, V0);

    // Partial overlaps: a Map over V shifted by one row, a block sharing one column with K.
    Eigen::Map<Matrix<T>> shifted(V.data() + d, len - 1, d);
    expect_message(
        [&] {
          call_into(f, Q.topRows(len - 1), K.topRows(len - 1), V.topRows(len - 1), shifted, o);
        },
        f + ": out overlaps V; in-place calls are not supported");
    Matrix<T> big = random_matrix<T>(len, 2 * d - 1, 4);
    const Matrix<T> big0 = big;
    expect_message([&] { call_into(f, Q, big.leftCols(d), V, big.rightCols(d), o); },
                   f + ": out overlaps K; in-place calls are not supported");
    EXPECT_EQ(big, big0);
  }
}

TYPED_TEST(Aliasing, OutOverlappingAStateIsRejected) {
  using T = TypeParam;
  const Index d = 3, len = d;  // out [T, dv] has the shape of S [dk, dv]
  for (const std::string f : kInto) {
    const Matrix<T> Q = random_matrix<T>(len, d, 1), K = random_matrix<T>(len, d, 2);
    const Matrix<T> V = random_matrix<T>(len, d, 3);
    RetentionState<T> init(d, d), fin(d, d);
    init.S = random_matrix<T>(d, d, 4);
    const RetentionState<T> init0 = init;
    RetentionOptions<T> o;
    o.initial_state = &init;
    expect_message([&] { call_into(f, Q, K, V, Eigen::Map<Matrix<T>>(init.S.data(), d, d), o); },
                   f + ": out overlaps initial_state.S; in-place calls are not supported");
    EXPECT_EQ(init.S, init0.S);
    o.initial_state = nullptr;
    o.final_state = &fin;
    expect_message([&] { call_into(f, Q, K, V, Eigen::Map<Matrix<T>>(fin.S.data(), d, d), o); },
                   f + ": out overlaps final_state.S; in-place calls are not supported");
    EXPECT_EQ(fin.position, 0);

    // out [4 x 1] over z [4] of a state with dk = 4, dv = 1.
    RetentionState<T> narrow(4, 1);
    RetentionOptions<T> on;
    on.initial_state = &narrow;
    const Matrix<T> Q4 = random_matrix<T>(4, 4, 5), K4 = random_matrix<T>(4, 4, 6);
    const Matrix<T> V4 = random_matrix<T>(4, 1, 7);
    expect_message(
        [&] { call_into(f, Q4, K4, V4, Eigen::Map<Matrix<T>>(narrow.z.data(), 4, 1), on); },
        f + ": out overlaps initial_state.z; in-place calls are not supported");
  }
}

// Disjoint views of one buffer are not in-place calls: Q, K, V and out as column blocks of one
// matrix, and heads of a [T, H d] layout through strided Maps.
TYPED_TEST(Aliasing, DisjointViewsOfOneBufferAreAllowed) {
  using T = TypeParam;
  const Index len = 7, dk = 3, dv = 2;
  const double gamma = 0.9;
  for (const std::string f : kInto) {
    Matrix<T> buf = random_matrix<T>(len, 2 * dk + 2 * dv, 5);
    const auto Q = buf.leftCols(dk);
    const auto K = buf.middleCols(dk, dk);
    const auto V = buf.middleCols(2 * dk, dv);
    const Matrix<double> want = ref::retention(
        Matrix<double>(Q.template cast<double>()), Matrix<double>(K.template cast<double>()),
        Matrix<double>(V.template cast<double>()), gamma, Normalization::decay);
    RetentionOptions<T> o;
    o.normalization = Normalization::decay;
    EXPECT_NO_THROW(call_into(f, Q, K, V, buf.rightCols(dv), o)) << f;
    EXPECT_LE(relative_error(buf.rightCols(dv), want), spec_tolerance<T>()) << f;

    // Two heads interleaved in one [T, 2 d] buffer: head 0 is the input, head 1 the output.
    Matrix<T> heads = random_matrix<T>(len, 2 * dk, 6);
    using Strided = Eigen::Map<Matrix<T>, 0, Eigen::OuterStride<>>;
    const Strided h0(heads.data(), len, dk, Eigen::OuterStride<>(2 * dk));
    Strided h1(heads.data() + dk, len, dk, Eigen::OuterStride<>(2 * dk));
    const Matrix<double> h0d = h0.template cast<double>();
    const Matrix<double> want_h = ref::retention(h0d, h0d, h0d, gamma, Normalization::decay);
    EXPECT_NO_THROW(call_into(f, h0, h0, h0, h1, o)) << f;
    EXPECT_LE(relative_error(h1, want_h), spec_tolerance<T>()) << f;
  }
}

// final_state may point to initial_state (documented): the result equals the reference's, for the
// state in the inputs' type and (float) a double state.
template <class T, class S>
void check_state_alias() {
  const Index len = 9, dk = 4, dv = 3;
  const double gamma = 0.9;  // call_into uses CausalDecay(0.9)
  const Matrix<T> Q = random_matrix<T>(len, dk, 7), K = random_matrix<T>(len, dk, 8);
  const Matrix<T> V = random_matrix<T>(len, dv, 9);
  ref::State rinit;
  rinit.S = random_matrix<double>(dk, dv, 10);
  rinit.z = random_matrix<double>(dk, 1, 11);
  rinit.position = 5;
  ref::State rfin;
  const Matrix<double> want = ref::retention(Matrix<double>(Q.template cast<double>()),
                                             Matrix<double>(K.template cast<double>()),
                                             Matrix<double>(V.template cast<double>()), gamma,
                                             Normalization::decay_and_score, &rinit, &rfin);
  const double tol = spec_tolerance<T>();
  for (const std::string f : kInto) {
    RetentionState<S> st(dk, dv);
    st.S = rinit.S.cast<S>();
    st.z = rinit.z.cast<S>();
    st.position = rinit.position;
    RetentionOptions<S> o;
    o.normalization = Normalization::decay_and_score;
    o.initial_state = &st;
    o.final_state = &st;
    Matrix<T> out(len, dv);
    call_into(f, Q, K, V, out, o);
    EXPECT_LE(relative_error(out, want), tol) << f;
    EXPECT_LE(relative_error(st.S, rfin.S), tol) << f;
    EXPECT_LE(relative_error(st.z, rfin.z), tol) << f;
    EXPECT_EQ(st.position, rfin.position) << f;
  }
}

TYPED_TEST(Aliasing, FinalStateMayAliasInitialState) {
  using T = TypeParam;
  check_state_alias<T, T>();
}

TEST(AliasingWide, FinalStateMayAliasInitialStateWithDoubleState) {
  check_state_alias<float, double>();
}

TEST(AliasingStep, InputsOverTheStateAreRejectedAndTheStateKept) {
  const CausalDecay decay(0.9);
  RetentionState<double> st(3, 3);
  st.S = random_matrix<double>(3, 3, 12);
  const RetentionState<double> st0 = st;
  const Matrix<double> x = random_matrix<double>(1, 3, 13);
  const Eigen::Map<const Matrix<double>> row_of_s(st.S.data() + 3, 1, 3);
  const Eigen::Map<const Matrix<double>> z_as_row(st.z.data(), 1, 3);
  expect_message([&] { (void)retention::retention_step(row_of_s, x, x, decay, st); },
                 "retention_step: state.S overlaps q; in-place calls are not supported");
  expect_message([&] { (void)retention::retention_step(x, row_of_s, x, decay, st); },
                 "retention_step: state.S overlaps k; in-place calls are not supported");
  expect_message([&] { (void)retention::retention_step(x, x, z_as_row, decay, st); },
                 "retention_step: state.z overlaps v; in-place calls are not supported");
  EXPECT_EQ(st.S, st0.S);
  EXPECT_EQ(st.z, st0.z);
  EXPECT_EQ(st.position, st0.position);
}

// The predicate behind the checks, on layouts it must tell apart.
TEST(MemoryOverlap, ExactForSameStridesConservativeOtherwise) {
  using retention::detail::shares_memory;
  Matrix<double> m = Matrix<double>::Zero(6, 8);
  EXPECT_TRUE(shares_memory(m, m));
  EXPECT_FALSE(shares_memory(m.leftCols(4), m.rightCols(4)));  // column blocks side by side
  EXPECT_TRUE(shares_memory(m.leftCols(5), m.rightCols(4)));   // share column 4
  EXPECT_FALSE(shares_memory(m.topRows(3), m.bottomRows(3)));  // row blocks
  EXPECT_TRUE(shares_memory(m.topRows(4), m.bottomRows(3)));   // share row 3
  EXPECT_FALSE(shares_memory(m.block(0, 0, 6, 3), m.block(0, 3, 6, 5)));
  EXPECT_TRUE(shares_memory(m.block(2, 2, 2, 2), m.block(3, 3, 2, 2)));
  EXPECT_FALSE(shares_memory(m.block(2, 2, 2, 2), m.block(4, 2, 2, 2)));
  EXPECT_TRUE(shares_memory(m.row(2), m.col(5)));  // one element in common
  EXPECT_FALSE(shares_memory(m.row(2), m.col(5).head(2)));
  EXPECT_TRUE(shares_memory(m, m.transpose()));
  EXPECT_FALSE(shares_memory(m.leftCols(4), m.rightCols(4).transpose()));
  // Two heads interleaved: [T, 2 d] with stride 2 d.
  using Strided = Eigen::Map<Matrix<double>, 0, Eigen::OuterStride<>>;
  const Strided a(m.data(), 6, 4, Eigen::OuterStride<>(8));
  const Strided b(m.data() + 4, 6, 4, Eigen::OuterStride<>(8));
  const Strided c(m.data() + 3, 6, 4, Eigen::OuterStride<>(8));
  EXPECT_FALSE(shares_memory(a, b));
  EXPECT_TRUE(shares_memory(a, c));
  // A column-major view of the same bytes.
  using ColMajor = Eigen::Map<Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic>>;
  EXPECT_TRUE(shares_memory(ColMajor(m.data(), 8, 6), m.bottomRows(1)));
  // Separate allocations, expressions without storage, empty views.
  const Matrix<double> other = Matrix<double>::Zero(6, 8);
  EXPECT_FALSE(shares_memory(m, other));
  EXPECT_FALSE(shares_memory(m, m * 2.0));
  EXPECT_FALSE(shares_memory(m.leftCols(0), m));
  // Different scalar types over the same bytes still share memory.
  const Eigen::Map<const Matrix<float>> as_float(reinterpret_cast<const float*>(m.data()), 6, 16);
  EXPECT_TRUE(shares_memory(as_float, m.row(5)));
  // Non-unit inner strides whose ranges interleave are reported as overlapping (conservative).
  using Inner2 = Eigen::Map<Matrix<double>, 0, Eigen::Stride<Eigen::Dynamic, 2>>;
  const Inner2 even(m.data(), 6, 4, Eigen::Stride<Eigen::Dynamic, 2>(8, 2));
  EXPECT_TRUE(shares_memory(even, m));
}

}  // namespace
