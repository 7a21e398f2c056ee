// retention: the recurrent form (SPEC 2): S_n = gamma S_{n-1} + k_n^T v_n, o_n = q_n S_n.
// O(1) memory and time per token; the decoding form.
#pragma once

#include <retention/decay.hpp>
#include <retention/detail/retention/common.hpp>
#include <retention/state.hpp>

namespace retention {
namespace detail {

/// Work buffers of the recurrent form, allocated once per call (or once per thread for
/// multi_head_step): the token's v and the output row in the state's type.
template <class Acc>
struct RecurrentBuffers {
  RowVector<Acc> v, o;
  explicit RecurrentBuffers(Index dv) : v(dv), o(dv) {}
};

/// o[j0, j0 + W) = q S[:, j0 + W) after S[:, j0 + W) = g S + k^T v, for one block of W columns:
/// the block's v and its output accumulators stay in registers while the rows of S stream through,
/// so each element of S costs one load, one store and two FMAs. (Accumulating o in memory instead
/// adds a load and a store of o per element, which on AVX-512 made the step 1.5x slower than a
/// plain read+write pass over the same bytes; with registers it runs at 1.0-1.05x of that pass,
/// one head of 128 x 128 per call, 128 heads, measured on this repo's 2-core Sapphire Rapids.)
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
/// written exactly once (the step is bound by moving S, SPEC 2 recurrence S_n = gamma S_{n-1} +
/// k_n^T v_n). Columns go in blocks of 8 SIMD packets where the ISA has 32 vector registers (8 for
/// the block's v, 8 for its accumulators), 4 packets otherwise; one-column blocks take the rest.
/// Each o_j sums over i in order, as the plain loop does. Returns the raw score r = q . z (z
/// updated).
template <class Acc, class DQ, class DK, class DV, class DOut>
Acc recurrent_token(Matrix<Acc>& S, Vector<Acc>& z, Acc g, const Eigen::MatrixBase<DQ>& q,
                    const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v,
                    const Eigen::MatrixBase<DOut>& out_, RecurrentBuffers<Acc>& buf) {
  auto& out = const_cast<Eigen::MatrixBase<DOut>&>(out_);
  using T = typename DOut::Scalar;
  constexpr Index packet = Eigen::internal::packet_traits<Acc>::size;
  constexpr Index wide = packet * (EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32 ? 8 : 4);
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

/// retention_step without checks or allocation: `out` [1, dv] receives the normalised output.
template <class DQ, class DK, class DV, class DOut, class Mask, class Acc>
void step_into(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
               const Eigen::MatrixBase<DV>& v, const Mask& decay, RetentionState<Acc>& state,
               Normalization normalization, const Eigen::MatrixBase<DOut>& out_,
               RecurrentBuffers<Acc>& buf) {
  auto& out = const_cast<Eigen::MatrixBase<DOut>&>(out_);
  const Acc r =
      recurrent_token(state.S, state.z, static_cast<Acc>(decay.step_factor()), q, k, v, out, buf);
  if (normalization != Normalization::none) {
    const Eigen::Matrix<Acc, 1, 1> rv(r);
    normalize_rows(decay, normalization, state.position, out, rv);
  }
  state.position += 1;
}

}  // namespace detail

/// Recurrent retention, writing into `out` [T, dv]. See recurrent_retention.
template <class DQ, class DK, class DV, class DOut, class Mask,
          class StateScalar = typename DQ::Scalar>
void recurrent_retention_into(
    const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K, const Eigen::MatrixBase<DV>& V,
    const Mask& decay, const Eigen::MatrixBase<DOut>& out_,
    const RetentionOptions<StateScalar>& options = RetentionOptions<StateScalar>()) {
  detail::assert_retention_types<DQ, DK, DV, Mask, StateScalar>();
  using Acc = StateScalar;
  const char* fn = "recurrent_retention";
  detail::check_qkv(fn, Q, K, V);
  detail::check_shape(fn, "out", out_, Q.rows(), V.cols());
  auto& out = const_cast<Eigen::MatrixBase<DOut>&>(out_);
  const Index T = Q.rows(), dk = Q.cols(), dv = V.cols();

  Matrix<Acc> S = Matrix<Acc>::Zero(dk, dv);
  Vector<Acc> z = Vector<Acc>::Zero(dk);
  Index p0 = 0;
  if (options.initial_state) {
    detail::check_state(fn, *options.initial_state, dk, dv);
    S = options.initial_state->S;
    z = options.initial_state->z;
    p0 = options.initial_state->position;
  }
  const Acc g = static_cast<Acc>(decay.step_factor());
  detail::RecurrentBuffers<Acc> buf(dv);
  Vector<Acc> r(T);
  for (Index t = 0; t < T; ++t)
    r(t) = detail::recurrent_token(S, z, g, Q.row(t), K.row(t), V.row(t), out.row(t), buf);
  detail::normalize_rows(decay, options.normalization, p0, out, r);
  if (options.final_state) {
    options.final_state->S = std::move(S);
    options.final_state->z = std::move(z);
    options.final_state->position = p0 + T;
  }
}

/// Recurrent retention of one head, SPEC 2: S_n = gamma S_{n-1} + k_n^T v_n, o_n = q_n S_n,
/// then the chosen normalisation. Q [T, dk], K [T, dk], V [T, dv] -> O [T, dv].
template <class DQ, class DK, class DV, class Mask, class StateScalar = typename DQ::Scalar>
Matrix<typename DQ::Scalar> recurrent_retention(
    const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K, const Eigen::MatrixBase<DV>& V,
    const Mask& decay,
    const RetentionOptions<StateScalar>& options = RetentionOptions<StateScalar>()) {
  Matrix<typename DQ::Scalar> out(Q.rows(), V.cols());
  recurrent_retention_into(Q, K, V, decay, out, options);
  return out;
}

/// One decoding step: q, k [1, dk], v [1, dv]; updates `state` in place (position + 1) and returns
/// o [1, dv] = q S (normalised as chosen). Same function as recurrent_retention on one token.
template <class DQ, class DK, class DV, class Mask, class StateScalar>
RowVector<typename DQ::Scalar> retention_step(const Eigen::MatrixBase<DQ>& q,
                                              const Eigen::MatrixBase<DK>& k,
                                              const Eigen::MatrixBase<DV>& v, const Mask& decay,
                                              RetentionState<StateScalar>& state,
                                              Normalization normalization = Normalization::none) {
  detail::assert_retention_types<DQ, DK, DV, Mask, StateScalar>();
  using T = typename DQ::Scalar;
  using Acc = StateScalar;
  const char* fn = "retention_step";
  detail::check_shape(fn, "q", q, 1, -1);
  detail::check_shape(fn, "k", k, 1, q.cols());
  detail::check_shape(fn, "v", v, 1, -1);
  detail::check_state(fn, state, q.cols(), v.cols(), "state");
  detail::RecurrentBuffers<Acc> buf(v.cols());
  RowVector<T> out(v.cols());
  detail::step_into(q, k, v, decay, state, normalization, out, buf);
  return out;
}

}  // namespace retention
