// retention::detail: the register-blocked token update of the recurrent form (docs/math.md §2):
// S = gamma S + k^T v and o = q S in one pass over S.
#pragma once

#include <retention/core.hpp>
#include <retention/detail/overlap.hpp>
#include <retention/detail/simd/dispatch.hpp>

#include <type_traits>

#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace retention {
namespace detail {

/// Work buffers of the recurrent form, allocated once per call (or once per thread for
/// multi_head_step): the token's q, k, v and the output row in the state's type.
template <class Acc>
struct RecurrentBuffers {
  RowVector<Acc> q, k, v, o;
  RecurrentBuffers(Index dk, Index dv) : q(dk), k(dk), v(dv), o(dv) {}
};

/// o[j0, j0 + W) = q S[:, j0 + W) after S[:, j0 + W) = g S + k^T v, for one block of W columns
/// (W lanes per vector, NB vectors): the block's v and its output accumulators stay in registers
/// while the rows of S stream through, so each element of S costs one load, one store and two
/// FMAs. (Accumulating o in memory instead would add a load and a store of o per element; see
/// bench/results/design-measurements.md.)
template <int W, int NB, class Acc>
[[gnu::always_inline]] inline void recurrent_block(Acc* s0, Index dk, Index dv, Index j0, Acc g,
                                                   const Acc* q, const Acc* k, const Acc* v,
                                                   Acc* o) {
  using V = simd::Vec<Acc, W>;
  V vb[NB], acc[NB];
#pragma GCC unroll 16
  for (int b = 0; b < NB; ++b) {
    vb[b] = simd::load<W>(v + j0 + b * W);
    acc[b] = simd::splat<W>(Acc(0));
  }
  for (Index i = 0; i < dk; ++i) {
    Acc* row = s0 + i * dv + j0;
    const Acc ki = k[i], qi = q[i];
#pragma GCC unroll 16
    for (int b = 0; b < NB; ++b) {
      const V x = g * simd::load<W>(row + b * W) + ki * vb[b];
      simd::store(row + b * W, x);
      acc[b] += qi * x;
    }
  }
#pragma GCC unroll 16
  for (int b = 0; b < NB; ++b) simd::store(o + j0 + b * W, acc[b]);
}

/// S = g S + k^T v and o = q S over all columns of S [dk, dv] (row-major): blocks of 8 vectors
/// where the instruction set has 32 vector registers (8 for the block's v, 8 for its
/// accumulators), 4 otherwise, then single vectors, then single columns.
struct RecurrentUpdateKernel {
  template <class Isa, class Acc>
  static void run(Acc* s0, Index dk, Index dv, Acc g, const Acc* q, const Acc* k, const Acc* v,
                  Acc* o) {
    constexpr int W = simd::lanes<Acc, Isa>;
    constexpr int NB = Isa::registers >= 32 ? 8 : 4;
    Index j0 = 0;
    for (; j0 + NB * W <= dv; j0 += NB * W) recurrent_block<W, NB>(s0, dk, dv, j0, g, q, k, v, o);
    for (; j0 + W <= dv; j0 += W) recurrent_block<W, 1>(s0, dk, dv, j0, g, q, k, v, o);
    for (; j0 < dv; ++j0) recurrent_block<1, 1>(s0, dk, dv, j0, g, q, k, v, o);
  }
};

/// One token through the state in a single pass over S: each element of S is decayed, updated with
/// k_i v_j and accumulated into o_j = sum_i q_i S_ij while it is in a register, so S is read and
/// written exactly once (the step is bound by moving S, docs/math.md §2 recurrence S_n = gamma
/// S_{n-1} + k_n^T v_n). Columns go in blocks of RecurrentBlockShape::wide, then single packets;
/// one-column blocks take the rest. Each o_j sums over i in order, as the plain loop does. Writes
/// `out` [1, dv] (which must not alias q, k, v, S or z) and returns the raw score r = q . z (z
/// updated).
template <class Acc, class DQ, class DK, class DV, class DOut>
Acc recurrent_token(Matrix<Acc>& S, Vector<Acc>& z, Acc g, const Eigen::MatrixBase<DQ>& q,
                    const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v, DOut&& out,
                    RecurrentBuffers<Acc>& buf) {
  assert_dense_output<DOut>();
  using T = typename std::decay_t<DOut>::Scalar;
  const Index dk = S.rows(), dv = S.cols();
  buf.q = q.template cast<Acc>();
  buf.k = k.template cast<Acc>();
  buf.v = v.template cast<Acc>();
  // S is row-major: row i starts at S.data() + i dv.
  simd::dispatch<RecurrentUpdateKernel>(S.data(), dk, dv, g, static_cast<const Acc*>(buf.q.data()),
                                        static_cast<const Acc*>(buf.k.data()),
                                        static_cast<const Acc*>(buf.v.data()), buf.o.data());
  out = buf.o.template cast<T>();
  // z is kept in every form and normalisation so that any later call may use the score norm.
  Acc r(0);
  Acc* __restrict zp = z.data();
  const Acc* const qp = buf.q.data();
  const Acc* const kp = buf.k.data();
  for (Index i = 0; i < dk; ++i) {
    const Acc zi = g * zp[i] + kp[i];
    zp[i] = zi;
    r += qp[i] * zi;
  }
  return r;
}

}  // namespace detail
}  // namespace retention

#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
