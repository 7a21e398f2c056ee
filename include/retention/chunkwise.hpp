// retention: the chunkwise form (docs/math.md §2): parallel inside a chunk, recurrent across
// chunks.
#pragma once

#include <retention/decay.hpp>
#include <retention/detail/retention/chunkwise_forward.hpp>
#include <retention/detail/retention/common.hpp>
#include <retention/state.hpp>

namespace retention {

/// Chunk size used when the caller passes none (chunk = 0 in the multi-head API).
/// Per token and head the chunkwise form costs 2C(dk+dv) (intra-chunk) + 4 dk dv (state) FLOPs, so
/// a smaller C does less work, while GEMMs shorter than about 32 rows lose their efficiency:
/// 32 up to dk + dv = 256, and 64 for wider heads, where the 4 dk dv state work per token
/// dominates and longer products pay. The measurements behind the choice are in
/// bench/results/design-measurements.md.
inline Index recommended_chunk(Index key_dim, Index value_dim) {
  return key_dim + value_dim <= 256 ? 32 : 64;
}

namespace detail {

/// Checks of chunkwise_retention and chunkwise_retention_into (shape errors name
/// "chunkwise_retention").
template <class DQ, class DK, class DV, class StateScalar>
void check_chunkwise(const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                     const Eigen::MatrixBase<DV>& V, Index chunk,
                     const RetentionOptions<StateScalar>& options) {
  const char* fn = "chunkwise_retention";
  check_qkv(fn, Q, K, V);
  check_positive(fn, "chunk", chunk);
  check_normalization_value(fn, options.normalization);
  if (options.initial_state) {
    check_state(fn, *options.initial_state, Q.cols(), V.cols());
    check_position_range(fn, "initial_state.position", options.initial_state->position, Q.rows());
  }
}

}  // namespace detail

/// Chunkwise retention, writing into `out` [T, dv] (a matrix, Map or Block). See
/// chunkwise_retention. `out` must not share memory with Q, K, V or the states: an in-place call
/// throws shape_error ("chunkwise_retention_into: out overlaps Q; in-place calls are not
/// supported"); detected for every operand with direct access (matrices, Maps, Blocks), not for
/// lazy expressions over out's memory. options.final_state may point to *options.initial_state.
template <class DQ, class DK, class DV, class DOut, class Mask,
          class StateScalar = typename DQ::Scalar>
void chunkwise_retention_into(
    const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K, const Eigen::MatrixBase<DV>& V,
    const Mask& decay, Index chunk, DOut&& out,
    const RetentionOptions<StateScalar>& options = RetentionOptions<StateScalar>()) {
  detail::assert_retention_types<DQ, DK, DV, Mask, StateScalar>();
  detail::assert_dense_output<DOut>();
  detail::check_qkv("chunkwise_retention", Q, K, V);
  detail::check_positive("chunkwise_retention", "chunk", chunk);
  detail::check_shape("chunkwise_retention", "out", out, Q.rows(), V.cols());
  detail::check_chunkwise(Q, K, V, chunk, options);
  detail::check_retention_aliasing("chunkwise_retention_into", out, Q, K, V, options.initial_state,
                                   options.final_state);
  detail::chunkwise_retention_impl(Q, K, V, decay, chunk, out, options);
}

/// Chunkwise retention of one head, docs/math.md §2, chunk length `chunk` >= 1 (need not divide T,
/// may exceed it): O_i = (Q_i K_i^T (.) D_L) V_i + diag(gamma^(j+1)) Q_i S_prev, S_next = gamma^L
/// S_prev + K_i^T diag(gamma^(L-1-l)) V_i. Q [T, dk], K [T, dk], V [T, dv] -> [T, dv]. An Inf or
/// NaN in a token reaches its own row and later ones only.
template <class DQ, class DK, class DV, class Mask, class StateScalar = typename DQ::Scalar>
Matrix<typename DQ::Scalar> chunkwise_retention(
    const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K, const Eigen::MatrixBase<DV>& V,
    const Mask& decay, Index chunk,
    const RetentionOptions<StateScalar>& options = RetentionOptions<StateScalar>()) {
  detail::assert_retention_types<DQ, DK, DV, Mask, StateScalar>();
  detail::check_chunkwise(Q, K, V, chunk, options);
  Matrix<typename DQ::Scalar> out(Q.rows(), V.cols());
  detail::chunkwise_retention_impl(Q, K, V, decay, chunk, out, options);
  return out;
}

}  // namespace retention

#if defined(RETENTION_COMPILED)
// Compiled mode: the per-head forward kernels for CausalDecay in float and double come from the
// retention_compiled library (src/forward_*.cpp); only the fronts above are compiled here.
#include <retention/detail/retention/forward_instances.hpp>
#endif
