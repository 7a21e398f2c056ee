// retention: the recurrent form (docs/math.md §2): S_n = gamma S_{n-1} + k_n^T v_n, o_n = q_n S_n.
// O(1) memory and time per token; the decoding form.
#pragma once

#include <retention/decay.hpp>
#include <retention/detail/retention/common.hpp>
#include <retention/detail/retention/recurrent_kernels.hpp>
#include <retention/state.hpp>

#include <type_traits>

namespace retention {
namespace detail {

/// retention_step without checks or allocation: `out` [1, dv] receives the normalised output.
/// The caller has checked shapes, aliasing and that state.position + 1 does not overflow.
template <class DQ, class DK, class DV, class DOut, class Mask, class Acc>
void step_into(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
               const Eigen::MatrixBase<DV>& v, const Mask& decay, RetentionState<Acc>& state,
               Normalization normalization, DOut&& out, RecurrentBuffers<Acc>& buf) {
  assert_dense_output<DOut>();
  const Acc r =
      recurrent_token(state.S, state.z, static_cast<Acc>(decay.step_factor()), q, k, v, out, buf);
  if (normalization != Normalization::none) {
    const Eigen::Matrix<Acc, 1, 1> rv(r);
    normalize_rows(decay, normalization, state.position, out, rv);
  }
  state.position += 1;
}

template <class DQ, class DK, class DV, class DOut, class Mask, class StateScalar>
void recurrent_retention_rows(const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                              const Eigen::MatrixBase<DV>& V, const Mask& decay, DOut& out,
                              const RetentionOptions<StateScalar>& options) {
  using Acc = StateScalar;
  const Index T = Q.rows(), dk = Q.cols(), dv = V.cols();
  Matrix<Acc> S = Matrix<Acc>::Zero(dk, dv);
  Vector<Acc> z = Vector<Acc>::Zero(dk);
  Index p0 = 0;
  if (options.initial_state) {
    S = options.initial_state->S;
    z = options.initial_state->z;
    p0 = options.initial_state->position;
  }
  const Acc g = static_cast<Acc>(decay.step_factor());
  RecurrentBuffers<Acc> buf(dk, dv);
  Vector<Acc> r(T);
  for (Index t = 0; t < T; ++t)
    r(t) = recurrent_token(S, z, g, Q.row(t), K.row(t), V.row(t), out.row(t), buf);
  normalize_rows(decay, options.normalization, p0, out, r);
  if (options.final_state) {
    options.final_state->S = std::move(S);
    options.final_state->z = std::move(z);
    options.final_state->position = p0 + T;
  }
}

/// recurrent_retention_rows on the kernels' operand type (forward_on_rows).
template <class DQ, class DK, class DV, class DOut, class Mask, class StateScalar>
void recurrent_retention_impl(const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                              const Eigen::MatrixBase<DV>& V, const Mask& decay, DOut& out,
                              const RetentionOptions<StateScalar>& options) {
  forward_on_rows(Q, K, V, out, [&](const auto& q, const auto& k, const auto& v, auto& o) {
    recurrent_retention_rows(q, k, v, decay, o, options);
  });
}

/// Checks of recurrent_retention and recurrent_retention_into (shape errors name
/// "recurrent_retention").
template <class DQ, class DK, class DV, class StateScalar>
void check_recurrent(const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                     const Eigen::MatrixBase<DV>& V, const RetentionOptions<StateScalar>& options) {
  const char* fn = "recurrent_retention";
  check_qkv(fn, Q, K, V);
  check_normalization_value(fn, options.normalization);
  if (options.initial_state) {
    check_state(fn, *options.initial_state, Q.cols(), V.cols());
    check_position_range(fn, "initial_state.position", options.initial_state->position, Q.rows());
  }
}

}  // namespace detail

/// Recurrent retention, writing into `out` [T, dv] (a matrix, Map or Block). See
/// recurrent_retention. `out` must not share memory with Q, K, V or the states: an in-place call
/// throws shape_error ("recurrent_retention_into: out overlaps K; in-place calls are not
/// supported"); detected for every operand with direct access (matrices, Maps, Blocks), not for
/// lazy expressions over out's memory. options.final_state may point to *options.initial_state.
template <class DQ, class DK, class DV, class DOut, class Mask,
          class StateScalar = typename DQ::Scalar>
void recurrent_retention_into(
    const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K, const Eigen::MatrixBase<DV>& V,
    const Mask& decay, DOut&& out,
    const RetentionOptions<StateScalar>& options = RetentionOptions<StateScalar>()) {
  detail::assert_retention_types<DQ, DK, DV, Mask, StateScalar>();
  detail::assert_dense_output<DOut>();
  detail::check_qkv("recurrent_retention", Q, K, V);
  detail::check_shape("recurrent_retention", "out", out, Q.rows(), V.cols());
  detail::check_recurrent(Q, K, V, options);
  detail::check_retention_aliasing("recurrent_retention_into", out, Q, K, V, options.initial_state,
                                   options.final_state);
  detail::recurrent_retention_impl(Q, K, V, decay, out, options);
}

/// Recurrent retention of one head, docs/math.md §2: S_n = gamma S_{n-1} + k_n^T v_n, o_n = q_n
/// S_n, then the chosen normalisation. Q [T, dk], K [T, dk], V [T, dv] -> O [T, dv]. An Inf or NaN
/// in a token reaches its own row and later ones only.
template <class DQ, class DK, class DV, class Mask, class StateScalar = typename DQ::Scalar>
Matrix<typename DQ::Scalar> recurrent_retention(
    const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K, const Eigen::MatrixBase<DV>& V,
    const Mask& decay,
    const RetentionOptions<StateScalar>& options = RetentionOptions<StateScalar>()) {
  detail::assert_retention_types<DQ, DK, DV, Mask, StateScalar>();
  detail::check_recurrent(Q, K, V, options);
  Matrix<typename DQ::Scalar> out(Q.rows(), V.cols());
  detail::recurrent_retention_impl(Q, K, V, decay, out, options);
  return out;
}

/// One decoding step: q, k [1, dk], v [1, dv] with dk, dv >= 1; updates `state` in place
/// (position + 1) and returns o [1, dv] = q S (normalised as chosen). Same function as
/// recurrent_retention on one token. q, k and v must not share memory with state.S or state.z
/// (shape_error); on any error the state is left unchanged.
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
  if (q.cols() < 1)
    detail::fail(fn,
                 "q is " + detail::shape_string(q.rows(), q.cols()) + ", expected dk >= 1 columns");
  detail::check_shape(fn, "k", k, 1, q.cols());
  detail::check_shape(fn, "v", v, 1, -1);
  if (v.cols() < 1)
    detail::fail(fn,
                 "v is " + detail::shape_string(v.rows(), v.cols()) + ", expected dv >= 1 columns");
  detail::check_state(fn, state, q.cols(), v.cols(), "state");
  detail::check_normalization_value(fn, normalization);
  detail::check_position_range(fn, "state.position", state.position, 1);
  detail::check_no_overlap(fn, "state.S", state.S, "q", q);
  detail::check_no_overlap(fn, "state.S", state.S, "k", k);
  detail::check_no_overlap(fn, "state.S", state.S, "v", v);
  detail::check_no_overlap(fn, "state.z", state.z, "q", q);
  detail::check_no_overlap(fn, "state.z", state.z, "k", k);
  detail::check_no_overlap(fn, "state.z", state.z, "v", v);
  detail::RecurrentBuffers<Acc> buf(q.cols(), v.cols());
  RowVector<T> out(v.cols());
  detail::step_into(q, k, v, decay, state, normalization, out, buf);
  return out;
}

}  // namespace retention

#if defined(RETENTION_COMPILED)
// Compiled mode: the per-head forward kernels for CausalDecay in float and double come from the
// retention_compiled library (src/forward_*.cpp); only the fronts above are compiled here.
#include <retention/detail/retention/forward_instances.hpp>
#endif
