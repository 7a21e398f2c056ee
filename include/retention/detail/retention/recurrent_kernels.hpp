// retention::detail: the register-blocked token update of the recurrent form (docs/math.md §2):
// S = gamma S + k^T v and o = q S in one pass over S.
#pragma once

#include <retention/core.hpp>
#include <retention/detail/overlap.hpp>
#include <retention/detail/simd/dispatch.hpp>

#include <cstdint>
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
/// One row's NB vectors at `row`: x = g s + ki v is stored back and acc += qi x (kv and qv may be
/// scalars, broadcast, or vectors whose lanes differ).
template <int W, int NB, class Acc, class KV, class QV>
[[gnu::always_inline]] inline void recurrent_row(Acc* row, Acc g, const KV& kv, const QV& qv,
                                                 const simd::Vec<Acc, W>* vb,
                                                 simd::Vec<Acc, W>* acc) {
#pragma GCC unroll 16
  for (int b = 0; b < NB; ++b) {
    const simd::Vec<Acc, W> x = g * simd::load<W>(row + b * W) + kv * vb[b];
    simd::store(row + b * W, x);
    acc[b] += qv * x;
  }
}

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
  for (Index i = 0; i < dk; ++i) recurrent_row<W, NB>(s0 + i * dv + j0, g, k[i], q[i], vb, acc);
#pragma GCC unroll 16
  for (int b = 0; b < NB; ++b) simd::store(o + j0 + b * W, acc[b]);
}

/// recurrent_block for a state whose rows do not start on a vector boundary (an allocation aligned
/// to less than a vector: Eigen aligns to 16 bytes in a file built without -mavx). S is read as
/// the aligned vectors of its flat row-major array from s0 + p on, p < W: vectors [j0, j0 + NP W)
/// of each row hold columns p + j0 + [0, NP W) of that row, and the row's last vector, which the
/// block ends with, holds its last e = W - p columns and the next row's first p (their k and q
/// blended lane by lane). Row 0's first p columns and the last row's last e go through a copy
/// with the other lanes zero. Each element of S takes the same operations in the same order as in
/// recurrent_block, so the results do not depend on the state's address.
template <int W, int NP, class Acc>
[[gnu::always_inline]] inline void recurrent_block_wrapped(Acc* s0, Index dk, Index dv, Index p,
                                                           Index j0, Acc g, const Acc* q,
                                                           const Acc* k, const Acc* v, Acc* o) {
  using V = simd::Vec<Acc, W>;
  using I = std::conditional_t<sizeof(Acc) == 4, std::int32_t, std::int64_t>;
  using M = simd::Vec<I, W>;
  const Index e = W - p;
  Acc* const a = s0 + p;
  Acc tmp[W];
  I bits[W];
  for (Index l = 0; l < W; ++l) {
    tmp[l] = l < e ? v[dv - e + l] : v[l - e];  // the last vector's columns
    bits[l] = l < e ? I(-1) : I(0);             // its lanes from the row's own tail
  }
  const V vw = simd::load<W>(tmp);
  const M own = simd::load<W>(bits);
  const V zero = simd::splat<W>(Acc(0));
  V vb[NP > 0 ? NP : 1], acc[NP > 0 ? NP : 1];
#pragma GCC unroll 16
  for (int b = 0; b < NP; ++b) {
    vb[b] = simd::load<W>(v + p + j0 + b * W);
    acc[b] = zero;
  }
  V accw = zero;
  // A wrapped vector that lies partly in S: lanes [lo, hi) are w[0, hi - lo) (the lanes of own
  // when `tail`, the others otherwise); the rest take zeros for s, k, q and v and are not written.
  const auto edge = [&](Acc* w, Index lo, Index hi, Acc ki, Acc qi, bool tail) {
    const M in = tail ? own : ~own;
    for (Index l = 0; l < W; ++l) tmp[l] = l >= lo && l < hi ? w[l - lo] : Acc(0);
    const V kb = simd::select(in, simd::splat<W>(ki), zero);
    const V qb = simd::select(in, simd::splat<W>(qi), zero);
    const V vv = simd::select(in, vw, zero);
    recurrent_row<W, 1>(tmp, g, kb, qb, &vv, &accw);
    for (Index l = lo; l < hi; ++l) w[l - lo] = tmp[l];
  };
  // Row 0's first p columns: the last lanes of a vector that starts e elements before S.
  edge(s0, e, W, k[0], q[0], false);
  for (Index i = 0; i + 1 < dk; ++i) {
    Acc* row = a + i * dv + j0;
    recurrent_row<W, NP>(row, g, k[i], q[i], vb, acc);
    const V kb = simd::select(own, simd::splat<W>(k[i]), simd::splat<W>(k[i + 1]));
    const V qb = simd::select(own, simd::splat<W>(q[i]), simd::splat<W>(q[i + 1]));
    recurrent_row<W, 1>(row + NP * W, g, kb, qb, &vw, &accw);
  }
  // The last row: its vectors, then its last e columns in the first lanes of a copy.
  Acc* const last = a + (dk - 1) * dv + j0;
  recurrent_row<W, NP>(last, g, k[dk - 1], q[dk - 1], vb, acc);
  edge(last + NP * W, 0, e, k[dk - 1], q[dk - 1], true);
#pragma GCC unroll 16
  for (int b = 0; b < NP; ++b) simd::store(o + p + j0 + b * W, acc[b]);
  simd::store(tmp, accw);
  for (Index l = 0; l < W; ++l) o[l < e ? dv - e + l : l - e] = tmp[l];
}

/// S = g S + k^T v and o = q S over all columns of S [dk, dv] (row-major): blocks of 8 vectors
/// where the instruction set has 32 vector registers (8 for the block's v, 8 for its
/// accumulators), 4 otherwise, then single vectors, then single columns. A state whose rows all
/// start at the same distance from a vector boundary (dv a multiple of W) is swept in aligned
/// vectors (recurrent_block_wrapped): a vector that straddles two cache lines costs two accesses,
/// and the step only moves S.
struct RecurrentUpdateKernel {
  template <class Isa, class Acc>
  static void run(Acc* s0, Index dk, Index dv, Acc g, const Acc* q, const Acc* k, const Acc* v,
                  Acc* o) {
    constexpr int W = simd::lanes<Acc, Isa>;
    constexpr int NB = Isa::registers >= 32 ? 8 : 4;
    constexpr auto bytes = static_cast<std::uintptr_t>(W * sizeof(Acc));
    const auto off = reinterpret_cast<std::uintptr_t>(s0) % bytes;
    if (W > 1 && off != 0 && off % sizeof(Acc) == 0 && dv % W == 0 && dk >= 1) {
      const Index p = static_cast<Index>((bytes - off) / sizeof(Acc)), vectors = dv / W;
      Acc* const a = s0 + p;
      // Whole blocks up to the one holding the wrapped last vector.
      Index j0 = 0;
      for (; j0 + NB * W < dv; j0 += NB * W)
        recurrent_block<W, NB>(a, dk, dv, j0, g, q, k, v + p, o + p);
      if (vectors % NB == 0) {
        recurrent_block_wrapped<W, NB - 1>(s0, dk, dv, p, j0, g, q, k, v, o);
      } else {
        for (; j0 + W < dv; j0 += W) recurrent_block<W, 1>(a, dk, dv, j0, g, q, k, v + p, o + p);
        recurrent_block_wrapped<W, 0>(s0, dk, dv, p, j0, g, q, k, v, o);
      }
      return;
    }
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
