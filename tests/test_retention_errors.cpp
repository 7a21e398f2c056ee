// retention-test-links: compiled
// Every runtime error of the single-head retention kernels (DESIGN: a shape_error naming the
// function, the argument and both shapes), with the whole message checked. Type misuse (integer
// scalars, mixed scalars, a non-causal mask) is a static_assert and cannot be exercised at run
// time.
#include <retention/chunkwise.hpp>
#include <retention/decay.hpp>
#include <retention/parallel.hpp>
#include <retention/recurrent.hpp>

#include "support/test_support.hpp"

#include <gtest/gtest.h>

#include <string>

namespace {

using retention::CausalDecay;
using retention::Index;
using retention::Matrix;
using retention::RetentionOptions;
using retention::RetentionState;
using retention_test::random_matrix;
using Mat = Matrix<double>;

/// Runs f, which must throw retention::shape_error (a std::invalid_argument) with exactly
/// `message`.
template <class F>
void expect_error(F&& f, const std::string& message) {
  try {
    f();
    ADD_FAILURE() << "no exception, expected \"" << message << "\"";
  } catch (const retention::shape_error& e) {
    EXPECT_EQ(std::string(e.what()), message);
    const std::invalid_argument& base = e;  // part of the contract: catchable as invalid_argument
    EXPECT_EQ(std::string(base.what()), message);
  }
}

/// Calls form `name` ("parallel_retention", ...) on the given inputs with default chunk 4.
struct Kernels {
  const CausalDecay decay{0.9};
  template <class Q, class K, class V>
  void call(const std::string& name, const Q& q, const K& k, const V& v,
            const RetentionOptions<double>& o = {}, Index chunk = 4) const {
    if (name == "parallel_retention") (void)retention::parallel_retention(q, k, v, decay, o);
    if (name == "recurrent_retention") (void)retention::recurrent_retention(q, k, v, decay, o);
    if (name == "chunkwise_retention")
      (void)retention::chunkwise_retention(q, k, v, decay, chunk, o);
  }
  template <class Q, class K, class V, class Out>
  void call_into(const std::string& name, const Q& q, const K& k, const V& v, Out& out) const {
    if (name == "parallel_retention") retention::parallel_retention_into(q, k, v, decay, out);
    if (name == "recurrent_retention") retention::recurrent_retention_into(q, k, v, decay, out);
    if (name == "chunkwise_retention") retention::chunkwise_retention_into(q, k, v, decay, 4, out);
  }
};

const char* const kFunctions[] = {"parallel_retention", "recurrent_retention",
                                  "chunkwise_retention"};

TEST(RetentionErrors, InputShapes) {
  const Kernels kern;
  const Mat Q = random_matrix<double>(8, 64, 1), K = random_matrix<double>(8, 64, 2);
  const Mat V = random_matrix<double>(8, 3, 3);
  for (std::string f : kFunctions) {
    expect_error([&] { kern.call(f, Q, random_matrix<double>(7, 64, 4), V); },
                 f + ": K is [7 x 64], expected [8 x 64]");
    expect_error([&] { kern.call(f, Q, random_matrix<double>(8, 63, 4), V); },
                 f + ": K is [8 x 63], expected [8 x 64]");
    expect_error([&] { kern.call(f, Q, K, random_matrix<double>(7, 3, 5)); },
                 f + ": V is [7 x 3], expected [8 x *]");
    expect_error([&] { kern.call(f, Q, K, Mat(8, 0)); },
                 f + ": V is [8 x 0], expected dv >= 1 columns");
    expect_error([&] { kern.call(f, Mat(8, 0), Mat(8, 0), V); },
                 f + ": Q is [8 x 0], expected dk >= 1 columns");
    // Blocks and maps are checked alike.
    expect_error([&] { kern.call(f, Q.topRows(5), K.topRows(6), V.topRows(5)); },
                 f + ": K is [6 x 64], expected [5 x 64]");
  }
}

TEST(RetentionErrors, OutputShapeOfIntoVariants) {
  const Kernels kern;
  const Mat Q = random_matrix<double>(8, 4, 1), K = random_matrix<double>(8, 4, 2);
  const Mat V = random_matrix<double>(8, 3, 3);
  for (std::string f : kFunctions) {
    Mat narrow(8, 2), short_(7, 3);
    expect_error([&] { kern.call_into(f, Q, K, V, narrow); },
                 f + ": out is [8 x 2], expected [8 x 3]");
    expect_error([&] { kern.call_into(f, Q, K, V, short_); },
                 f + ": out is [7 x 3], expected [8 x 3]");
  }
}

TEST(RetentionErrors, ChunkAndTile) {
  const Kernels kern;
  const Mat Q = random_matrix<double>(8, 4, 1), K = random_matrix<double>(8, 4, 2);
  const Mat V = random_matrix<double>(8, 3, 3);
  expect_error([&] { kern.call("chunkwise_retention", Q, K, V, {}, 0); },
               "chunkwise_retention: chunk must be >= 1, got 0");
  expect_error([&] { kern.call("chunkwise_retention", Q, K, V, {}, -3); },
               "chunkwise_retention: chunk must be >= 1, got -3");
  RetentionOptions<double> o;
  o.tile = -1;
  expect_error([&] { kern.call("parallel_retention", Q, K, V, o); },
               "parallel_retention: options.tile must be >= 0, got -1");
}

TEST(RetentionErrors, InitialStateShapeAndPosition) {
  const Kernels kern;
  const Mat Q = random_matrix<double>(8, 4, 1), K = random_matrix<double>(8, 4, 2);
  const Mat V = random_matrix<double>(8, 3, 3);
  for (std::string f : kFunctions) {
    RetentionState<double> bad_s(3, 3);
    bad_s.z = retention::Vector<double>::Zero(4);
    RetentionState<double> bad_s_cols(4, 2);
    RetentionState<double> bad_z(4, 3);
    bad_z.z = retention::Vector<double>::Zero(2);
    RetentionState<double> bad_pos(4, 3);
    bad_pos.position = -1;
    RetentionState<double> empty;  // default-constructed: no S, no z
    RetentionOptions<double> o;
    o.initial_state = &bad_s;
    expect_error([&] { kern.call(f, Q, K, V, o); },
                 f + ": initial_state.S is [3 x 3], expected [4 x 3]");
    o.initial_state = &bad_s_cols;
    expect_error([&] { kern.call(f, Q, K, V, o); },
                 f + ": initial_state.S is [4 x 2], expected [4 x 3]");
    o.initial_state = &bad_z;
    expect_error([&] { kern.call(f, Q, K, V, o); },
                 f + ": initial_state.z is [2 x 1], expected [4 x 1]");
    o.initial_state = &bad_pos;
    expect_error([&] { kern.call(f, Q, K, V, o); },
                 f + ": initial_state.position is -1, expected >= 0");
    o.initial_state = &empty;
    expect_error([&] { kern.call(f, Q, K, V, o); },
                 f + ": initial_state.S is [0 x 0], expected [4 x 3]");
  }
}

TEST(RetentionErrors, RetentionStep) {
  const CausalDecay decay(0.9);
  const Mat q = random_matrix<double>(2, 4, 1), k = random_matrix<double>(2, 4, 2);
  const Mat v = random_matrix<double>(2, 3, 3);
  RetentionState<double> st(4, 3);
  using retention::retention_step;
  expect_error([&] { retention_step(q, k.topRows(1), v.topRows(1), decay, st); },
               "retention_step: q is [2 x 4], expected [1 x *]");
  expect_error([&] { retention_step(q.topRows(1), k, v.topRows(1), decay, st); },
               "retention_step: k is [2 x 4], expected [1 x 4]");
  const Mat k3 = random_matrix<double>(1, 3, 4);
  expect_error([&] { retention_step(q.topRows(1), k3, v.topRows(1), decay, st); },
               "retention_step: k is [1 x 3], expected [1 x 4]");
  expect_error([&] { retention_step(q.topRows(1), k.topRows(1), v, decay, st); },
               "retention_step: v is [2 x 3], expected [1 x *]");
  RetentionState<double> bad_s(4, 2), bad_z(4, 3), bad_pos(4, 3);
  bad_z.z = retention::Vector<double>::Zero(5);
  bad_pos.position = -7;
  expect_error([&] { retention_step(q.topRows(1), k.topRows(1), v.topRows(1), decay, bad_s); },
               "retention_step: state.S is [4 x 2], expected [4 x 3]");
  expect_error([&] { retention_step(q.topRows(1), k.topRows(1), v.topRows(1), decay, bad_z); },
               "retention_step: state.z is [5 x 1], expected [4 x 1]");
  expect_error([&] { retention_step(q.topRows(1), k.topRows(1), v.topRows(1), decay, bad_pos); },
               "retention_step: state.position is -7, expected >= 0");
  // A failed step leaves the state untouched.
  EXPECT_EQ(bad_pos.position, -7);
  EXPECT_TRUE(bad_s.S.isZero(0));
}

TEST(RetentionErrors, FloatInputsWithDoubleStateAreCheckedToo) {
  const Matrix<float> Q = random_matrix<float>(6, 4, 1), K = random_matrix<float>(5, 4, 2);
  const Matrix<float> V = random_matrix<float>(6, 3, 3);
  const CausalDecay decay(0.9);
  RetentionState<double> st(4, 3);
  RetentionOptions<double> o;
  o.initial_state = &st;
  expect_error([&] { (void)retention::chunkwise_retention(Q, K, V, decay, 2, o); },
               "chunkwise_retention: K is [5 x 4], expected [6 x 4]");
  RetentionState<double> wrong(3, 3);
  o.initial_state = &wrong;
  expect_error([&] { (void)retention::recurrent_retention(Q, Q, V, decay, o); },
               "recurrent_retention: initial_state.S is [3 x 3], expected [4 x 3]");
}

}  // namespace
