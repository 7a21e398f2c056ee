// Context-parallel retention over MPI (include/retention/mpi/context_parallel.hpp), run under
// `mpirun -np 1, 2, 3, 4`: every rank holds one segment of a sequence, and what the ranks compute
// together must equal one process on the whole sequence.
//
// The whole sequence is built on every rank from one seed (rank 0 draws it, a broadcast shares
// it), so each rank can compute the single-process result itself; the library never sees more than
// its rank's segment. Checked, typed over float and double, with unequal segment lengths (one of
// length 1, one of length 0 in some cases), mixed forms across ranks, every normalisation:
// - forward outputs against one multi_head_retention over the whole sequence and against the
//   naive double reference of tests/reference (SPEC 2); incoming and final states against one
//   process run up to the segment's start and end; a global initial state on rank 0;
// - gradients dq, dk, dv against one multi_head_retention_backward, with a final-state gradient
//   on the last rank; the incoming-state gradients against one process's backward of the suffix
//   (rank 0: of the whole sequence);
// - the MSR layer: prefill across ranks equals one process's prefill, the last rank's state equals
//   its state, and decoding continues identically;
// - errors: mismatched heads, gammas, scalar types, calls, layer weights, and bad input on one
//   rank throw the same exception on every rank (compared across ranks), after which the group
//   still works; the scan sends ceil(log2 P)-bounded records whose size does not depend on T.
// - segments long enough that gamma^(L-1-m) underflows to 0 for early rows (skipped exactly).
// Tolerances: SPEC 6, 1e-12 relative in double and 1e-5 in float, norm(got - want) / norm(want)
// over the whole sequence (every rank's sums of squares added up).
#include <retention/backward.hpp>
#include <retention/layers/msr.hpp>
#include <retention/mpi/context_parallel.hpp>
#include <retention/multihead.hpp>

#include "reference/retention_reference.hpp"
#include "support/test_support.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <iostream>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace {

namespace ref = retention_reference;
namespace rmpi = retention::mpi;
using retention::Form;
using retention::HeadsView;
using retention::Index;
using retention::Matrix;
using retention::MultiHeadBackwardOptions;
using retention::MultiHeadOptions;
using retention::Normalization;
using retention::RetentionState;
using retention_test::random_matrix;
using retention_test::spec_tolerance;

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
int world_size() {
  int s = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &s);
  return s;
}

/// A fresh seed, the same on every rank.
std::uint64_t shared_seed() {
  unsigned long long seed = 0;
  if (world_rank() == 0)
    seed = (static_cast<unsigned long long>(std::random_device{}()) << 32) ^ std::random_device{}();
  MPI_Bcast(&seed, 1, MPI_UNSIGNED_LONG_LONG, 0, MPI_COMM_WORLD);
  return seed;
}

/// True on every rank iff `ok` is true on every rank.
bool all_ranks(bool ok) {
  int v = ok ? 1 : 0, out = 0;
  MPI_Allreduce(&v, &out, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  return out == 1;
}

/// Segment lengths for P ranks: unequal, with a length-1 segment (and a length-0 one in pattern 2)
/// among the first ranks.
std::vector<Index> segment_lengths(int P, int pattern) {
  static const std::vector<std::vector<Index>> base = {
      {13, 1, 22, 7}, {1, 30, 5, 12}, {9, 0, 14, 3}};
  std::vector<Index> L(static_cast<std::size_t>(P));
  for (int r = 0; r < P; ++r)
    L[static_cast<std::size_t>(r)] =
        base[static_cast<std::size_t>(pattern)][static_cast<std::size_t>(r % 4)] + 2 * (r / 4);
  if (P == 1) L[0] = 17;
  return L;
}

Index offset_of(const std::vector<Index>& L, int r) {
  Index o = 0;
  for (int i = 0; i < r; ++i) o += L[static_cast<std::size_t>(i)];
  return o;
}

/// A [B, T, H, D] buffer seen as HeadsViews of row ranges (strided: the segment is a window of
/// the whole sequence's buffer).
template <class T>
struct Heads {
  Index B, Tlen, H, D;
  std::vector<T> data;
  Heads(Index b, Index t, Index h, Index d)
      : B(b), Tlen(t), H(h), D(d), data(static_cast<std::size_t>(b * t * h * d)) {}
  void randomize(std::uint64_t seed, double scale = 1.0) {
    const Matrix<T> m = random_matrix<T>(1, static_cast<Index>(data.size()), seed, scale);
    std::copy(m.data(), m.data() + m.size(), data.begin());
  }
  template <class P = T>
  HeadsView<P> rows(Index t0, Index n) {
    return HeadsView<P>{data.data() + t0 * H * D, B, n, H, D, Tlen * H * D, H * D, D};
  }
  HeadsView<const T> crows(Index t0, Index n) { return rows<const T>(t0, n); }
  /// Head (b, h) rows [t0, t0 + n) as a double matrix.
  Matrix<double> head(Index b, Index h, Index t0, Index n) const {
    Matrix<double> m(n, D);
    for (Index t = 0; t < n; ++t)
      for (Index j = 0; j < D; ++j)
        m(t, j) = static_cast<double>(
            data[static_cast<std::size_t>(((b * Tlen + t0 + t) * H + h) * D + j)]);
    return m;
  }
};

/// Error of a distributed result against one process's, measured over the whole sequence as
/// SPEC 6 does: norm(got - want) / norm(want) with every rank's sums of squares added up (a window
/// of a single row can be ill-conditioned on its own). NaN or Inf anywhere never passes.
struct Sums {
  double num = 0.0, den = 0.0;
  bool bad = false;
  template <class A, class B>
  void add(const Eigen::MatrixBase<A>& got, const Eigen::MatrixBase<B>& want) {
    if (got.rows() != want.rows() || got.cols() != want.cols()) {
      bad = true;
      return;
    }
    const Matrix<double> g = got.template cast<double>(), w = want.template cast<double>();
    if (!g.allFinite() || !w.allFinite()) bad = true;
    num += (g - w).squaredNorm();
    den += w.squaredNorm();
  }
  /// Collective over MPI_COMM_WORLD.
  double global() const {
    double in[2] = {num, den}, out[2] = {0.0, 0.0};
    int b = bad ? 1 : 0, any = 0;
    MPI_Allreduce(in, out, 2, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    MPI_Allreduce(&b, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    if (any) return std::numeric_limits<double>::infinity();
    return out[1] > 0.0 ? std::sqrt(out[0] / out[1]) : std::sqrt(out[0]);
  }
};

template <class T>
void add_window(Sums& e, const Heads<T>& got, const Heads<T>& want, Index t0, Index n) {
  for (Index b = 0; b < got.B; ++b)
    for (Index h = 0; h < got.H; ++h) e.add(got.head(b, h, t0, n), want.head(b, h, t0, n));
}

template <class T>
void add_states(Sums& e, const std::vector<RetentionState<T>>& got,
                const std::vector<RetentionState<T>>& want) {
  if (got.size() != want.size()) e.bad = true;
  for (std::size_t i = 0; i < std::min(got.size(), want.size()); ++i) {
    if (got[i].position != want[i].position) e.bad = true;
    e.add(got[i].S, want[i].S);
    e.add(got[i].z, want[i].z);
  }
}

template <class T>
std::vector<RetentionState<T>> random_states(Index pairs, Index dk, Index dv, Index position,
                                             std::uint64_t seed) {
  std::vector<RetentionState<T>> s;
  for (Index p = 0; p < pairs; ++p) {
    RetentionState<T> st(dk, dv);
    st.S = random_matrix<T>(dk, dv, seed + 7 * static_cast<std::uint64_t>(p), 0.5);
    st.z = random_matrix<T>(dk, 1, seed + 7 * static_cast<std::uint64_t>(p) + 3, 0.5);
    st.position = position;
    s.push_back(std::move(st));
  }
  return s;
}

/// Single-process multi_head_retention over rows [0, n) of the whole sequence (n may be 0).
template <class T>
std::vector<RetentionState<T>> single_states(Heads<T>& q, Heads<T>& k, Heads<T>& v, Index n,
                                             const std::vector<double>& gammas, Normalization norm,
                                             const std::vector<RetentionState<T>>* init) {
  const Index pairs = q.B * q.H;
  if (n == 0) {
    if (init) return *init;
    return std::vector<RetentionState<T>>(static_cast<std::size_t>(pairs),
                                          RetentionState<T>(q.D, v.D));
  }
  Heads<T> out(q.B, n, q.H, v.D);
  MultiHeadOptions<T> o;
  o.normalization = norm;
  o.initial_states = init;
  std::vector<RetentionState<T>> finals;
  o.final_states = &finals;
  retention::multi_head_retention(q.crows(0, n), k.crows(0, n), v.crows(0, n), out.rows(0, n),
                                  retention::causal_masks(gammas), o);
  return finals;
}

const Normalization kNorms[] = {Normalization::none, Normalization::decay,
                                Normalization::decay_and_score};
const Form kForms[] = {Form::chunkwise, Form::parallel, Form::recurrent};

template <class T>
class ContextParallel : public ::testing::Test {};
TYPED_TEST_SUITE(ContextParallel, retention_test::ScalarTypes, retention_test::ScalarName);

// Forward: outputs, incoming and final states equal one process, for every normalisation, three
// length patterns, with and without a global initial state on rank 0.
TYPED_TEST(ContextParallel, ForwardEqualsOneProcess) {
  using T = TypeParam;
  const int P = world_size(), r = world_rank();
  const std::uint64_t seed = shared_seed();
  SCOPED_TRACE("seed " + std::to_string(seed) + ", P = " + std::to_string(P));
  const Index B = 2, H = 3, dk = 4, dv = 5;
  const std::vector<double> gammas = {0.5, 0.96875, 1.0};
  rmpi::ContextGroup group(MPI_COMM_WORLD);
  double worst_out = 0.0, worst_ref = 0.0, worst_state = 0.0;
  for (int pattern = 0; pattern < 3; ++pattern)
    for (Normalization norm : kNorms)
      for (int with_init = 0; with_init < 2; ++with_init) {
        const std::vector<Index> lengths = segment_lengths(P, pattern);
        const Index total = offset_of(lengths, P), L = lengths[static_cast<std::size_t>(r)],
                    off = offset_of(lengths, r);
        const std::uint64_t s = seed + static_cast<std::uint64_t>(pattern * 100 + with_init * 10) +
                                static_cast<std::uint64_t>(norm);
        Heads<T> q(B, total, H, dk), k(B, total, H, dk), v(B, total, H, dv);
        q.randomize(s + 1);
        k.randomize(s + 2);
        v.randomize(s + 3);
        const Index p0 = with_init ? 1000 : 0;
        const auto init = random_states<T>(B * H, dk, dv, p0, s + 4);
        const auto* init_ptr = with_init ? &init : nullptr;

        // Single process on the whole sequence.
        Heads<T> full(B, total, H, dv);
        MultiHeadOptions<T> o;
        o.normalization = norm;
        o.initial_states = init_ptr;
        retention::multi_head_retention(q.crows(0, total), k.crows(0, total), v.crows(0, total),
                                        full.rows(0, total), retention::causal_masks(gammas), o);

        // This rank's segment, in a form depending on the rank.
        Heads<T> out(B, total, H, dv);
        rmpi::ContextParallelOptions<T> co;
        co.form = kForms[r % 3];
        co.chunk = 4;
        co.normalization = norm;
        co.initial_states = r == 0 ? init_ptr : nullptr;
        std::vector<RetentionState<T>> incoming, finals;
        co.incoming_states = &incoming;
        co.final_states = &finals;
        rmpi::context_parallel_retention<T>(group, q.crows(off, L), k.crows(off, L),
                                            v.crows(off, L), out.rows(off, L), gammas, co);
        Sums out_err;
        add_window(out_err, out, full, off, L);
        worst_out = std::max(worst_out, out_err.global());

        // Naive double reference (independent of the library).
        Sums ref_err;
        if (L > 0)
          for (Index b = 0; b < B; ++b)
            for (Index h = 0; h < H; ++h) {
              ref::State st;
              if (init_ptr) {
                const auto& is = init[static_cast<std::size_t>(b * H + h)];
                st.S = is.S.template cast<double>();
                st.z = is.z.template cast<double>();
                st.position = is.position;
              }
              const Matrix<double> want = ref::retention(
                  q.head(b, h, 0, total), k.head(b, h, 0, total), v.head(b, h, 0, total),
                  gammas[static_cast<std::size_t>(h)], norm, init_ptr ? &st : nullptr);
              ref_err.add(out.head(b, h, off, L), want.middleRows(off, L));
            }
        worst_ref = std::max(worst_ref, ref_err.global());

        // States: incoming = one process up to off, final = up to off + L.
        const auto want_in = single_states(q, k, v, off, gammas, norm, init_ptr);
        const auto want_out = single_states(q, k, v, off + L, gammas, norm, init_ptr);
        auto want_in_pos = want_in;
        for (auto& st : want_in_pos) st.position = p0 + off;
        Sums state_err;
        add_states(state_err, incoming, want_in_pos);
        add_states(state_err, finals, want_out);
        worst_state = std::max(worst_state, state_err.global());
        EXPECT_EQ(group.last_call().position, p0 + off);
      }
  const double tol = spec_tolerance<T>();
  EXPECT_LE(worst_out, tol);
  EXPECT_LE(worst_ref, tol);
  EXPECT_LE(worst_state, tol);
  if (r == 0)
    std::cout << "[ rank 0 ] forward worst relative errors: vs one process " << worst_out
              << ", vs naive reference " << worst_ref << ", states " << worst_state << "\n";
}

// The dense-buffer overload on a copy of the segment (not a window of the whole buffer).
TYPED_TEST(ContextParallel, DenseBuffersEqualOneProcess) {
  using T = TypeParam;
  const int P = world_size(), r = world_rank();
  const std::uint64_t seed = shared_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  const Index B = 1, H = 2, dk = 3, dv = 2;
  const std::vector<double> gammas = {0.75, 0.99};
  const std::vector<Index> lengths = segment_lengths(P, 1);
  const Index total = offset_of(lengths, P), L = lengths[static_cast<std::size_t>(r)],
              off = offset_of(lengths, r);
  Heads<T> q(B, total, H, dk), k(B, total, H, dk), v(B, total, H, dv), full(B, total, H, dv);
  q.randomize(seed + 1);
  k.randomize(seed + 2);
  v.randomize(seed + 3);
  MultiHeadOptions<T> o;
  o.normalization = Normalization::decay_and_score;
  retention::multi_head_retention(q.crows(0, total), k.crows(0, total), v.crows(0, total),
                                  full.rows(0, total), retention::causal_masks(gammas), o);
  auto segment = [&](const Heads<T>& x) {
    return std::vector<T>(x.data.begin() + off * H * x.D, x.data.begin() + (off + L) * H * x.D);
  };
  const std::vector<T> ql = segment(q), kl = segment(k), vl = segment(v);
  std::vector<T> out(static_cast<std::size_t>(L * H * dv));
  rmpi::ContextParallelOptions<T> co;
  co.normalization = Normalization::decay_and_score;
  rmpi::ContextGroup group;
  rmpi::context_parallel_retention(group, ql.data(), kl.data(), vl.data(), out.data(),
                                   retention::MultiHeadShape{B, L, H, dk, dv}, gammas, co);
  const std::vector<T> want = segment(full);
  const Eigen::Map<const Matrix<T>> got_m(out.data(), 1, static_cast<Index>(out.size()));
  const Eigen::Map<const Matrix<T>> want_m(want.data(), 1, static_cast<Index>(want.size()));
  Sums err;
  err.add(got_m, want_m);
  EXPECT_LE(err.global(), spec_tolerance<T>());
}

// Backward: dq, dk, dv equal one process's backward of the whole sequence; incoming-state
// gradients equal one process's backward of the suffix that starts at the segment.
TYPED_TEST(ContextParallel, BackwardEqualsOneProcess) {
  using T = TypeParam;
  const int P = world_size(), r = world_rank();
  const std::uint64_t seed = shared_seed();
  SCOPED_TRACE("seed " + std::to_string(seed) + ", P = " + std::to_string(P));
  const Index B = 2, H = 3, dk = 4, dv = 3;
  const std::vector<double> gammas = {0.5, 0.9375, 1.0};
  rmpi::ContextGroup group(MPI_COMM_WORLD);
  struct Case {
    Normalization norm;
    bool detach;
  };
  const Case cases[] = {{Normalization::none, false},
                        {Normalization::decay, false},
                        {Normalization::decay_and_score, false},
                        {Normalization::decay_and_score, true}};
  double worst_grad = 0.0, worst_state_grad = 0.0;
  for (int pattern = 0; pattern < 3; ++pattern)
    for (const Case& c : cases) {
      const std::vector<Index> lengths = segment_lengths(P, pattern);
      const Index total = offset_of(lengths, P), L = lengths[static_cast<std::size_t>(r)],
                  off = offset_of(lengths, r);
      const std::uint64_t s = seed + static_cast<std::uint64_t>(pattern * 100) +
                              static_cast<std::uint64_t>(c.norm) * 10 + (c.detach ? 5u : 0u);
      Heads<T> q(B, total, H, dk), k(B, total, H, dk), v(B, total, H, dv), g(B, total, H, dv);
      q.randomize(s + 1);
      k.randomize(s + 2);
      v.randomize(s + 3);
      g.randomize(s + 4);
      const Index p0 = pattern == 1 ? 0 : 37;
      const auto init = random_states<T>(B * H, dk, dv, p0, s + 5);
      auto final_grad = random_states<T>(B * H, dk, dv, 0, s + 6);
      const auto masks = retention::causal_masks(gammas);

      // One process: the whole sequence's gradients.
      Heads<T> dq1(B, total, H, dk), dk1(B, total, H, dk), dv1(B, total, H, dv);
      MultiHeadBackwardOptions<T> bo;
      bo.normalization = c.norm;
      bo.detach_score_normalizer = c.detach;
      bo.initial_states = &init;
      bo.final_state_gradients = &final_grad;
      retention::multi_head_retention_backward(
          q.crows(0, total), k.crows(0, total), v.crows(0, total), g.crows(0, total), gammas,
          dq1.rows(0, total), dk1.rows(0, total), dv1.rows(0, total), bo);
      // One process: the gradient of the state at `off`, from the suffix [off, total).
      std::vector<RetentionState<T>> want_d_in;
      {
        const auto at_off = single_states(q, k, v, off, gammas, c.norm, &init);
        const Index n = total - off;
        if (n == 0) {
          want_d_in = final_grad;
        } else {
          Heads<T> a(B, total, H, dk), b2(B, total, H, dk), c3(B, total, H, dv);
          MultiHeadBackwardOptions<T> so = bo;
          so.initial_states = &at_off;
          so.initial_state_gradients = &want_d_in;
          retention::multi_head_retention_backward(
              q.crows(off, n), k.crows(off, n), v.crows(off, n), g.crows(off, n), gammas,
              a.rows(off, n), b2.rows(off, n), c3.rows(off, n), so);
        }
        for (auto& st : want_d_in) st.position = p0 + off;
      }

      // Context parallel: forward (for the incoming states), then backward.
      Heads<T> out(B, total, H, dv);
      rmpi::ContextParallelOptions<T> fo;
      fo.normalization = c.norm;
      fo.initial_states = r == 0 ? &init : nullptr;
      std::vector<RetentionState<T>> incoming;
      fo.incoming_states = &incoming;
      rmpi::context_parallel_retention<T>(group, q.crows(off, L), k.crows(off, L), v.crows(off, L),
                                          out.rows(off, L), gammas, fo);
      Heads<T> dq2(B, total, H, dk), dk2(B, total, H, dk), dv2(B, total, H, dv);
      rmpi::ContextParallelBackwardOptions<T> cb;
      cb.form = kForms[(r + pattern) % 3];
      cb.chunk = 3;
      cb.normalization = c.norm;
      cb.detach_score_normalizer = c.detach;
      cb.incoming_states = &incoming;
      cb.final_state_gradients = r == P - 1 ? &final_grad : nullptr;
      std::vector<RetentionState<T>> d_in;
      cb.incoming_state_gradients = &d_in;
      rmpi::context_parallel_retention_backward<T>(
          group, q.crows(off, L), k.crows(off, L), v.crows(off, L), g.crows(off, L), gammas,
          dq2.rows(off, L), dk2.rows(off, L), dv2.rows(off, L), cb);
      Sums e_dq, e_dk, e_dv, e_state;
      add_window(e_dq, dq2, dq1, off, L);
      add_window(e_dk, dk2, dk1, off, L);
      add_window(e_dv, dv2, dv1, off, L);
      add_states(e_state, d_in, want_d_in);
      worst_grad = std::max({worst_grad, e_dq.global(), e_dk.global(), e_dv.global()});
      worst_state_grad = std::max(worst_state_grad, e_state.global());
    }
  const double tol = spec_tolerance<T>();
  EXPECT_LE(worst_grad, tol);
  EXPECT_LE(worst_state_grad, tol);
  if (r == 0)
    std::cout << "[ rank 0 ] backward worst relative errors: dq/dk/dv " << worst_grad
              << ", incoming-state gradients " << worst_state_grad << "\n";
}

// Segments longer than the horizon where gamma^(L-1-m) underflows in double (gamma = 0.5: about
// 1,080 tokens), where the summaries and the backward's state-gradient terms skip early rows.
TYPED_TEST(ContextParallel, LongSegmentsEqualOneProcess) {
  using T = TypeParam;
  const int P = world_size(), r = world_rank();
  const std::uint64_t seed = shared_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  const Index B = 1, H = 2, dk = 2, dv = 3;
  const std::vector<double> gammas = {0.5, 0.999};
  std::vector<Index> lengths(static_cast<std::size_t>(P));
  for (int i = 0; i < P; ++i) lengths[static_cast<std::size_t>(i)] = 1100 + 150 * ((i + 1) % 3);
  const Index total = offset_of(lengths, P), L = lengths[static_cast<std::size_t>(r)],
              off = offset_of(lengths, r);
  Heads<T> q(B, total, H, dk), k(B, total, H, dk), v(B, total, H, dv), g(B, total, H, dv);
  q.randomize(seed + 1);
  k.randomize(seed + 2);
  v.randomize(seed + 3);
  g.randomize(seed + 4);
  const auto fg = random_states<T>(B * H, dk, dv, 0, seed + 5);
  rmpi::ContextGroup group;

  Heads<T> full(B, total, H, dv), dq1(B, total, H, dk), dk1(B, total, H, dk), dv1(B, total, H, dv);
  MultiHeadOptions<T> o;
  o.normalization = Normalization::decay;
  std::vector<RetentionState<T>> finals1;
  o.final_states = &finals1;
  retention::multi_head_retention(q.crows(0, total), k.crows(0, total), v.crows(0, total),
                                  full.rows(0, total), retention::causal_masks(gammas), o);
  MultiHeadBackwardOptions<T> bo;
  bo.normalization = Normalization::decay;
  bo.final_state_gradients = &fg;
  retention::multi_head_retention_backward(q.crows(0, total), k.crows(0, total), v.crows(0, total),
                                           g.crows(0, total), gammas, dq1.rows(0, total),
                                           dk1.rows(0, total), dv1.rows(0, total), bo);

  Heads<T> out(B, total, H, dv), dq2(B, total, H, dk), dk2(B, total, H, dk), dv2(B, total, H, dv);
  rmpi::ContextParallelOptions<T> co;
  co.normalization = Normalization::decay;
  std::vector<RetentionState<T>> incoming, finals2;
  co.incoming_states = &incoming;
  co.final_states = &finals2;
  rmpi::context_parallel_retention<T>(group, q.crows(off, L), k.crows(off, L), v.crows(off, L),
                                      out.rows(off, L), gammas, co);
  rmpi::ContextParallelBackwardOptions<T> cb;
  cb.normalization = Normalization::decay;
  cb.incoming_states = &incoming;
  cb.final_state_gradients = r == P - 1 ? &fg : nullptr;
  rmpi::context_parallel_retention_backward<T>(
      group, q.crows(off, L), k.crows(off, L), v.crows(off, L), g.crows(off, L), gammas,
      dq2.rows(off, L), dk2.rows(off, L), dv2.rows(off, L), cb);
  Sums e_out, e_state, e_grad;
  add_window(e_out, out, full, off, L);
  if (r == P - 1) add_states(e_state, finals2, finals1);
  add_window(e_grad, dq2, dq1, off, L);
  add_window(e_grad, dk2, dk1, off, L);
  add_window(e_grad, dv2, dv1, off, L);
  const double tol = spec_tolerance<T>();
  EXPECT_LE(e_out.global(), tol);
  EXPECT_LE(e_state.global(), tol);
  EXPECT_LE(e_grad.global(), tol);
}

// The MSR layer: prefill across ranks equals one process's prefill; the last rank's state equals
// one process's and decoding from it continues identically.
TYPED_TEST(ContextParallel, MsrPrefillThenDecodeEqualsOneProcess) {
  using T = TypeParam;
  const int P = world_size(), r = world_rank();
  const std::uint64_t seed = shared_seed();
  SCOPED_TRACE("seed " + std::to_string(seed) + ", P = " + std::to_string(P));
  rmpi::ContextGroup group(MPI_COMM_WORLD);
  double worst_y = 0.0, worst_state = 0.0, worst_step = 0.0;
  int case_index = 0;
  for (Normalization norm : kNorms)
    for (int variant = 0; variant < 2; ++variant, ++case_index) {
      retention::MsrConfig cfg;
      cfg.embed_dim = 16;
      cfg.value_dim = 24;
      cfg.heads = 4;
      cfg.normalization = norm;
      cfg.biases = variant == 1;
      cfg.head_norm = variant == 1 ? retention::HeadNorm::layer : retention::HeadNorm::rms;
      retention::MultiScaleRetention<T> layer(cfg);
      const std::uint64_t s = seed + static_cast<std::uint64_t>(case_index) * 1000;
      layer.init_random(s);
      const std::vector<Index> lengths = segment_lengths(P, variant == 1 ? 2 : 0);
      const Index total = offset_of(lengths, P), L = lengths[static_cast<std::size_t>(r)],
                  off = offset_of(lengths, r);
      const Index prompt = variant == 1 ? 5 : 0;  // tokens consumed before the parallel prefill
      const Matrix<T> x = random_matrix<T>(prompt + total, 16, s + 1);
      const Matrix<T> x_dec = random_matrix<T>(3, 16, s + 2);

      // One process.
      auto s1 = layer.make_state();
      if (prompt > 0) layer.prefill(x.topRows(prompt), s1);
      const Matrix<T> y1 = layer.prefill(x.bottomRows(total), s1, Form::chunkwise, 4);
      Matrix<T> dec1(3, 16);
      auto s1_dec = s1;
      for (Index t = 0; t < 3; ++t) dec1.row(t) = layer.step(x_dec.row(t), s1_dec);

      // Context parallel: every rank consumes the prompt (rank 0's starting state), then its
      // segment.
      auto s2 = layer.make_state();
      if (prompt > 0) layer.prefill(x.topRows(prompt), s2);
      const Matrix<T> x_local = x.middleRows(prompt + off, L);
      const Matrix<T> y2 =
          rmpi::context_parallel_prefill(group, layer, x_local, s2, kForms[(r + 1) % 3], 3);
      Sums e_y, e_state, e_step;
      e_y.add(y2, y1.middleRows(off, L));
      EXPECT_EQ(y2.rows(), L);
      EXPECT_EQ(s2.position, prompt + off + L);
      if (r == P - 1) {
        add_states(e_state, s2.heads, s1.heads);
        Matrix<T> dec2(3, 16);
        for (Index t = 0; t < 3; ++t) dec2.row(t) = layer.step(x_dec.row(t), s2);
        e_step.add(dec2, dec1);
      }
      worst_y = std::max(worst_y, e_y.global());
      worst_state = std::max(worst_state, e_state.global());
      worst_step = std::max(worst_step, e_step.global());
    }
  const double tol = spec_tolerance<T>();
  EXPECT_LE(worst_y, tol);
  EXPECT_LE(worst_state, tol);
  EXPECT_LE(worst_step, tol);
  if (r == P - 1)
    std::cout << "[ rank " << r << " ] MSR worst relative errors: prefill " << worst_y
              << ", final state " << worst_state << ", decoding " << worst_step << "\n";
}

// Traffic: ceil(log2 P) rounds; a rank sends one record per round whose partner exists; the
// record is 1 + B H (1 + dk dv + dk) scalars, independent of the segment lengths.
TYPED_TEST(ContextParallel, ScanTrafficDoesNotGrowWithLength) {
  using T = TypeParam;
  const int P = world_size(), r = world_rank();
  const Index B = 1, H = 2, dk = 3, dv = 4;
  const std::vector<double> gammas = {0.9, 0.99};
  rmpi::ContextGroup group;
  std::vector<std::size_t> sent;
  for (Index L : {Index(2), Index(40)}) {
    Heads<T> q(B, L, H, dk), k(B, L, H, dk), v(B, L, H, dv), out(B, L, H, dv);
    q.randomize(1);
    k.randomize(2);
    v.randomize(3);
    rmpi::context_parallel_retention<T>(group, q.crows(0, L), k.crows(0, L), v.crows(0, L),
                                        out.rows(0, L), gammas);
    const auto& st = group.last_call();
    EXPECT_EQ(st.record_bytes, (1 + B * H * (1 + dk * dv + dk)) * sizeof(T));
    int rounds = 0, sends = 0;
    for (int d = 1; d < P; d *= 2, ++rounds)
      if (r + d < P) ++sends;
    EXPECT_EQ(st.scan_rounds, rounds);
    EXPECT_EQ(st.scan_bytes_sent, static_cast<std::size_t>(sends) * st.record_bytes);
    EXPECT_EQ(st.position, static_cast<Index>(r) * L);
    sent.push_back(st.scan_bytes_sent);
  }
  EXPECT_EQ(sent[0], sent[1]);
}

/// Runs f on every rank, expects it to throw E on every rank with a message containing `needle`,
/// and the same message on every rank (compared by hash).
template <class E, class F>
void expect_same_error_everywhere(F&& f, const std::string& needle) {
  std::string message;
  bool thrown = false;
  try {
    f();
  } catch (const E& e) {
    thrown = true;
    message = e.what();
  } catch (const std::exception& e) {
    message = std::string("wrong exception type: ") + e.what();
  }
  EXPECT_TRUE(thrown) << message;
  EXPECT_NE(message.find(needle), std::string::npos) << "message: " << message;
  const unsigned long long h = std::hash<std::string>{}(message);
  unsigned long long lo = 0, hi = 0;
  MPI_Allreduce(&h, &lo, 1, MPI_UNSIGNED_LONG_LONG, MPI_MIN, MPI_COMM_WORLD);
  MPI_Allreduce(&h, &hi, 1, MPI_UNSIGNED_LONG_LONG, MPI_MAX, MPI_COMM_WORLD);
  EXPECT_EQ(lo, hi) << "ranks threw different messages; this rank's: " << message;
}

/// A small valid forward call on `group`, for checking that the group works after an error.
template <class T>
bool forward_works(rmpi::ContextGroup& group) {
  const Index L = 3 + group.rank();
  Heads<T> q(1, L, 2, 2), k(1, L, 2, 2), v(1, L, 2, 2), out(1, L, 2, 2);
  q.randomize(11);
  k.randomize(12);
  v.randomize(13);
  try {
    rmpi::context_parallel_retention<T>(group, q.crows(0, L), k.crows(0, L), v.crows(0, L),
                                        out.rows(0, L), {0.9, 0.8});
  } catch (const std::exception& e) {
    ADD_FAILURE() << "a valid call after an error threw: " << e.what();
    return false;
  }
  return all_ranks(true);
}

TEST(ContextParallelErrors, MismatchesAndBadInputThrowOnEveryRank) {
  using T = double;
  const int P = world_size(), r = world_rank();
  rmpi::ContextGroup group;
  const Index L = 4;
  Heads<T> q(1, L, 3, 2), k(1, L, 3, 2), v(1, L, 3, 2), out(1, L, 3, 2);
  q.randomize(1);
  k.randomize(2);
  v.randomize(3);
  const std::vector<double> gammas = {0.9, 0.8, 0.7};
  const bool mismatch_rank = r == P - 1 && P > 1;

  // Bad input on the last rank only (k's dim): every rank reports the last rank's message.
  expect_same_error_everywhere<retention::shape_error>(
      [&] {
        HeadsView<const T> kk = k.crows(0, L);
        if (r == P - 1) kk.dim = 1;
        rmpi::context_parallel_retention<T>(group, q.crows(0, L), kk, v.crows(0, L), out.rows(0, L),
                                            gammas);
      },
      "on rank " + std::to_string(P - 1));
  EXPECT_TRUE(forward_works<T>(group));

  // initial_states given on a rank other than 0 (on P = 1 rank 0 passes a wrong-sized list).
  {
    std::vector<RetentionState<T>> bad(P > 1 ? 3 : 1, RetentionState<T>(2, 2));
    expect_same_error_everywhere<retention::shape_error>(
        [&] {
          rmpi::ContextParallelOptions<T> o;
          if (P > 1 ? r == 1 : true) o.initial_states = &bad;
          rmpi::context_parallel_retention<T>(group, q.crows(0, L), k.crows(0, L), v.crows(0, L),
                                              out.rows(0, L), gammas, o);
        },
        P > 1 ? "only rank 0" : "initial_states has 1 states");
  }
  EXPECT_TRUE(forward_works<T>(group));

  if (P > 1) {
    // Heads: the last rank passes 2 heads (and 2 gammas).
    expect_same_error_everywhere<retention::shape_error>(
        [&] {
          HeadsView<const T> qq = q.crows(0, L), kk = k.crows(0, L), vv = v.crows(0, L);
          HeadsView<T> oo = out.rows(0, L);
          std::vector<double> gg = gammas;
          if (mismatch_rank) {
            qq.heads = kk.heads = vv.heads = oo.heads = 2;
            gg.pop_back();
          }
          rmpi::context_parallel_retention<T>(group, qq, kk, vv, oo, gg);
        },
        "ranks disagree on heads (values from 2 to 3");
    // Gammas.
    expect_same_error_everywhere<retention::shape_error>(
        [&] {
          std::vector<double> gg = gammas;
          if (mismatch_rank) gg[1] = 0.85;
          rmpi::context_parallel_retention<T>(group, q.crows(0, L), k.crows(0, L), v.crows(0, L),
                                              out.rows(0, L), gg);
        },
        "ranks disagree on gammas");
    // Normalisation.
    expect_same_error_everywhere<retention::shape_error>(
        [&] {
          rmpi::ContextParallelOptions<T> o;
          if (mismatch_rank) o.normalization = Normalization::decay;
          rmpi::context_parallel_retention<T>(group, q.crows(0, L), k.crows(0, L), v.crows(0, L),
                                              out.rows(0, L), gammas, o);
        },
        "ranks disagree on normalization");
    // Scalar type: the last rank calls the float version.
    expect_same_error_everywhere<retention::shape_error>(
        [&] {
          if (mismatch_rank) {
            Heads<float> qf(1, L, 3, 2), kf(1, L, 3, 2), vf(1, L, 3, 2), of(1, L, 3, 2);
            rmpi::context_parallel_retention<float>(group, qf.crows(0, L), kf.crows(0, L),
                                                    vf.crows(0, L), of.rows(0, L), gammas);
          } else {
            rmpi::context_parallel_retention<T>(group, q.crows(0, L), k.crows(0, L), v.crows(0, L),
                                                out.rows(0, L), gammas);
          }
        },
        "ranks disagree on scalar size (values from 4 to 8");
    // Different calls: the last rank calls the backward.
    expect_same_error_everywhere<retention::shape_error>(
        [&] {
          if (mismatch_rank) {
            std::vector<RetentionState<T>> in(3, RetentionState<T>(2, 2));
            Heads<T> a(1, L, 3, 2), b(1, L, 3, 2), c(1, L, 3, 2);
            rmpi::ContextParallelBackwardOptions<T> o;
            o.incoming_states = &in;
            rmpi::context_parallel_retention_backward<T>(
                group, q.crows(0, L), k.crows(0, L), v.crows(0, L), v.crows(0, L), gammas,
                a.rows(0, L), b.rows(0, L), c.rows(0, L), o);
          } else {
            rmpi::context_parallel_retention<T>(group, q.crows(0, L), k.crows(0, L), v.crows(0, L),
                                                out.rows(0, L), gammas);
          }
        },
        "ranks disagree on the call");
    EXPECT_TRUE(forward_works<T>(group));
  }

  // Backward: the final-state gradient belongs to the last rank; incoming states are required.
  {
    std::vector<RetentionState<T>> in(3, RetentionState<T>(2, 2)), fg = in;
    Heads<T> a(1, L, 3, 2), b(1, L, 3, 2), c(1, L, 3, 2);
    expect_same_error_everywhere<retention::shape_error>(
        [&] {
          rmpi::ContextParallelBackwardOptions<T> o;
          o.incoming_states = &in;
          if (r == 0 && P > 1) o.final_state_gradients = &fg;
          if (P == 1) o.incoming_states = nullptr;
          rmpi::context_parallel_retention_backward<T>(group, q.crows(0, L), k.crows(0, L),
                                                       v.crows(0, L), v.crows(0, L), gammas,
                                                       a.rows(0, L), b.rows(0, L), c.rows(0, L), o);
        },
        P > 1 ? "only the last rank" : "incoming_states is required");
  }
  EXPECT_TRUE(forward_works<T>(group));
}

TEST(ContextParallelErrors, LayerWeightsMustMatch) {
  const int P = world_size(), r = world_rank();
  if (P == 1) GTEST_SKIP() << "needs two ranks";
  rmpi::ContextGroup group;
  retention::MsrConfig cfg;
  cfg.embed_dim = 8;
  cfg.heads = 2;
  retention::MultiScaleRetention<double> layer(cfg);
  layer.init_random(r == P - 1 ? 2 : 1);
  auto state = layer.make_state();
  const Matrix<double> x = random_matrix<double>(3, 8, 5);
  expect_same_error_everywhere<retention::shape_error>(
      [&] { rmpi::context_parallel_prefill(group, layer, x, state); }, "ranks disagree on weights");
}

TEST(ContextParallelErrors, MpiFailuresBecomeExceptions) {
  try {
    rmpi::ContextGroup::throw_mpi("context_parallel_retention", "MPI_Sendrecv (scan)",
                                  MPI_ERR_TRUNCATE);
    ADD_FAILURE() << "throw_mpi returned";
  } catch (const rmpi::mpi_error& e) {
    EXPECT_EQ(e.code(), MPI_ERR_TRUNCATE);
    EXPECT_NE(std::string(e.what()).find("MPI_Sendrecv (scan) failed: "), std::string::npos)
        << e.what();
  }
  // The group's communicator returns errors: a send to a rank that does not exist is reported.
  rmpi::ContextGroup group;
  int dummy = 0;
  const int rc = MPI_Send(&dummy, 1, MPI_INT, group.size() + 5, 0, group.comm());
  EXPECT_NE(rc, MPI_SUCCESS);
}

}  // namespace

/// Prints only failures, prefixed with the rank (ranks other than 0 would repeat rank 0's log).
class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (r.failed())
      std::cerr << "[ rank " << rank_ << " ] " << (r.file_name() ? r.file_name() : "") << ":"
                << r.line_number() << ": " << r.summary() << "\n";
  }

 private:
  int rank_;
};

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  const int rank = world_rank();
  if (rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new RankFailurePrinter(rank));
  }
  int failed = RUN_ALL_TESTS() != 0 ? 1 : 0, any = 0;
  MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (rank == 0 && any && !failed) std::cerr << "a test failed on another rank (see above)\n";
  MPI_Finalize();
  return any;
}
