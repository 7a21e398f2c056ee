// retention::detail: the register-blocked token update of the recurrent form (docs/math.md §2):
// S = gamma S + k^T v and o = q S in one pass over S.
#pragma once

#include <retention/core.hpp>
#include <retention/detail/overlap.hpp>

#include <type_traits>

namespace retention {
namespace detail {

/// Work buffers of the recurrent form, allocated once per call (or once per thread for
/// multi_head_step): the token's v and the output row in the state's type.
template <class Acc>
struct RecurrentBuffers {
  RowVector<Acc> v, o;
  explicit RecurrentBuffers(Index dv) : v(dv), o(dv) {}
};

/// SIMD packet width of Acc and the column block of the recurrent step: 8 packets where the ISA
/// has 32 vector registers (8 for the block's v, 8 for its accumulators), 4 otherwise.
template <class Acc>
struct RecurrentBlockShape {
  static constexpr Index packet = Eigen::internal::packet_traits<Acc>::size;
  static constexpr Index wide = packet * (EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32 ? 8 : 4);
};

/// o[j0, j0 + W) = q S[:, j0 + W) after S[:, j0 + W) = g S + k^T v, for one block of W columns:
/// the block's v and its output accumulators stay in registers while the rows of S stream through,
/// so each element of S costs one load, one store and two FMAs. (Accumulating o in memory instead
/// would add a load and a store of o per element; see bench/results/design-measurements.md.)
template <Index W, class Acc, class DQ, class DK>
void recurrent_block(Acc* s0, Index dk, Index dv, Index j0, Acc g, const DQ& q, const DK& k,
                     const Acc* v, Acc* o) {
  using Block = Eigen::Array<Acc, W, 1>;
  const Block vb = Eigen::Map<const Block>(v + j0);
  Block acc = Block::Zero();
  for (Index i = 0; i < dk; ++i) {
    Eigen::Map<Block> row(s0 + i * dv + j0);
    const Block x = g * row + static_cast<Acc>(k(0, i)) * vb;
    row = x;
    acc += static_cast<Acc>(q(0, i)) * x;
  }
  Eigen::Map<Block>(o + j0) = acc;
}

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
  constexpr Index packet = RecurrentBlockShape<Acc>::packet;
  constexpr Index wide = RecurrentBlockShape<Acc>::wide;
  const Index dk = S.rows(), dv = S.cols();
  buf.v = v.template cast<Acc>();
  Acc* const o = buf.o.data();
  const Acc* const vp = buf.v.data();
  Acc* const s0 = S.data();  // row-major: row i is s0 + i dv
  Index j0 = 0;
  for (; j0 + wide <= dv; j0 += wide) recurrent_block<wide>(s0, dk, dv, j0, g, q, k, vp, o);
  for (; j0 + packet <= dv; j0 += packet) recurrent_block<packet>(s0, dk, dv, j0, g, q, k, vp, o);
  for (; j0 < dv; ++j0) recurrent_block<1>(s0, dk, dv, j0, g, q, k, vp, o);
  out = buf.o.template cast<T>();
  // z is kept in every form and normalisation so that any later call may use the score norm.
  Acc r(0);
  Acc* __restrict zp = z.data();
  for (Index i = 0; i < dk; ++i) {
    const Acc zi = g * zp[i] + static_cast<Acc>(k(0, i));
    zp[i] = zi;
    r += static_cast<Acc>(q(0, i)) * zi;
  }
  return r;
}

}  // namespace detail
}  // namespace retention
