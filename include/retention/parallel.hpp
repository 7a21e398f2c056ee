// retention: the parallel form (docs/math.md §2): O = (Q K^T (.) D) V + diag(gamma^(n+1)) Q S_init,
// computed block by block so that extra memory is O(T * tile), never T x T, plus K and V packed
// once for all blocks (T (dk + dv) numbers).
#pragma once

#include <retention/decay.hpp>
#include <retention/detail/retention/common.hpp>
#include <retention/detail/retention/parallel_forward.hpp>
#include <retention/state.hpp>

namespace retention {
namespace detail {

/// Checks of parallel_retention and parallel_retention_into (shape errors name
/// "parallel_retention").
template <class DQ, class DK, class DV, class StateScalar>
void check_parallel(const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                    const Eigen::MatrixBase<DV>& V, const RetentionOptions<StateScalar>& options) {
  const char* fn = "parallel_retention";
  check_qkv(fn, Q, K, V);
  if (options.tile < 0) fail(fn, "options.tile must be >= 0, got " + std::to_string(options.tile));
  check_normalization_value(fn, options.normalization);
  if (options.initial_state) {
    check_state(fn, *options.initial_state, Q.cols(), V.cols());
    check_position_range(fn, "initial_state.position", options.initial_state->position, Q.rows());
  }
}

}  // namespace detail

/// Parallel retention, writing into `out` [T, dv] (a matrix, Map or Block). See
/// parallel_retention. `out` must not share memory with Q, K, V or the states: an in-place call
/// throws shape_error ("parallel_retention_into: out overlaps V; in-place calls are not
/// supported"); detected for every operand with direct access (matrices, Maps, Blocks), not for
/// lazy expressions over out's memory. options.final_state may point to *options.initial_state.
template <class DQ, class DK, class DV, class DOut, class Mask,
          class StateScalar = typename DQ::Scalar>
void parallel_retention_into(
    const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K, const Eigen::MatrixBase<DV>& V,
    const Mask& decay, DOut&& out,
    const RetentionOptions<StateScalar>& options = RetentionOptions<StateScalar>()) {
  detail::assert_retention_types<DQ, DK, DV, Mask, StateScalar>();
  detail::assert_dense_output<DOut>();
  detail::check_parallel(Q, K, V, options);
  detail::check_shape("parallel_retention", "out", out, Q.rows(), V.cols());
  detail::check_retention_aliasing("parallel_retention_into", out, Q, K, V, options.initial_state,
                                   options.final_state);
  detail::parallel_retention_impl(Q, K, V, decay, out, options);
}

/// Parallel retention of one head, docs/math.md §2: O = (Q K^T (.) D) V + diag(gamma^(n+1)) Q
/// S_init, then the chosen normalisation. Q [T, dk], K [T, dk], V [T, dv] -> O [T, dv]; extra
/// memory O(T * tile), plus T (dk + dv) for K and V packed once for all query blocks (with Eigen
/// 3.4's own products; with a BLAS, a contiguous copy of them when their rows are spread out and T
/// is above two tiles). Row n depends on tokens <= n only, for any input values: an Inf or NaN
/// reaches its own row and later ones (as in the recurrent form), never earlier rows.
template <class DQ, class DK, class DV, class Mask, class StateScalar = typename DQ::Scalar>
Matrix<typename DQ::Scalar> parallel_retention(
    const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K, const Eigen::MatrixBase<DV>& V,
    const Mask& decay,
    const RetentionOptions<StateScalar>& options = RetentionOptions<StateScalar>()) {
  detail::assert_retention_types<DQ, DK, DV, Mask, StateScalar>();
  detail::check_parallel(Q, K, V, options);
  Matrix<typename DQ::Scalar> out(Q.rows(), V.cols());
  detail::parallel_retention_impl(Q, K, V, decay, out, options);
  return out;
}

}  // namespace retention

#if defined(RETENTION_COMPILED)
// Compiled mode: the per-head forward kernels for CausalDecay in float and double come from the
// retention_compiled library (src/forward_*.cpp); only the fronts above are compiled here.
#include <retention/detail/retention/forward_instances.hpp>
#endif
