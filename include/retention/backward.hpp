// retention: gradients of retention (the backward passes, docs/math.md §7) in the parallel,
// chunkwise and recurrent forms, per head and over [B, T, H, D] buffers. Each returns the exact
// derivatives of its forward function (SPEC 2 with its normalisations), so the three forms'
// gradients agree to rounding, and state gradients flow through the initial and final states, so a
// sequence split into segments back-propagates like one call.
#pragma once

#include <retention/chunkwise.hpp>
#include <retention/decay.hpp>
#include <retention/detail/retention/backward_chunkwise.hpp>
#include <retention/detail/retention/backward_kernels.hpp>
#include <retention/detail/retention/backward_parallel.hpp>
#include <retention/detail/retention/backward_recurrent.hpp>
#include <retention/detail/threading.hpp>
#include <retention/heads.hpp>
#include <retention/parallel.hpp>
#include <retention/state.hpp>

#include <string>
#include <vector>

namespace retention {

/// Options of the backward passes: the forward call's options (normalisation, initial state,
/// parallel tile) plus the gradient arriving at the final state.
template <class StateScalar>
struct RetentionBackwardOptions {
  Normalization normalization = Normalization::none;
  /// The initial state the forward call was given (S_init, z_init, position); nullptr = zero
  /// state at position 0. Its position enters the `decay` normaliser.
  const RetentionState<StateScalar>* initial_state = nullptr;
  /// dL/dS_final in S and dL/dz_final in z (position ignored), when the final state feeds later
  /// tokens; nullptr = zero. A later segment's d_initial_state fits here as it is.
  const RetentionState<StateScalar>* final_state_gradient = nullptr;
  /// decay_and_score: treat max(|r_n|, 1) as a constant (torchscale detaches its normaliser). By
  /// default the derivative is exact, including the path through r_n into q_n, every k_m (m <= n)
  /// and z_init.
  bool detach_score_normalizer = false;
  /// Parallel form: query/key block size (extra memory O(T * tile)); 0 = default.
  Index tile = 0;
};

/// Gradients of one head: dQ, dK [T, dk], dV [T, dv], and, when an initial state was given,
/// d_initial_state (S: dL/dS_init [dk, dv], z: dL/dz_init [dk], position: the initial state's);
/// otherwise d_initial_state is empty (0 x 0).
template <class T, class StateScalar = T>
struct RetentionGradients {
  Matrix<T> dQ, dK, dV;
  RetentionState<StateScalar> d_initial_state;
};

namespace detail {

template <class DQ, class DK, class DV, class DG, class Mask, class StateScalar>
void assert_backward_types() {
  assert_retention_types<DQ, DK, DV, Mask, StateScalar>();
  assert_same_scalar<typename DQ::Scalar, typename DG::Scalar>();
}

/// The checks every per-head backward front runs, in this order: the types, the inputs and states,
/// form_checks() (the form's own arguments), the outputs. OQ, OK, OV are the fronts' forwarding
/// types (an output must be a writable dense object).
template <class OQ, class OK, class OV, class Mask, class DQ, class DK, class DV, class DG,
          class StateScalar, class FormChecks>
void check_backward_front(const char* fn, const Eigen::MatrixBase<DQ>& Q,
                          const Eigen::MatrixBase<DK>& K, const Eigen::MatrixBase<DV>& V,
                          const Eigen::MatrixBase<DG>& dO, const OQ& dQ, const OK& dK, const OV& dV,
                          const RetentionBackwardOptions<StateScalar>& options,
                          FormChecks&& form_checks) {
  assert_backward_types<DQ, DK, DV, DG, Mask, StateScalar>();
  assert_dense_output<OQ>();
  assert_dense_output<OK>();
  assert_dense_output<OV>();
  check_backward(fn, Q, K, V, dO, options.normalization, options.initial_state,
                 options.final_state_gradient);
  form_checks();
  check_gradient_outputs(fn, dQ, dK, dV, Q, K, V, dO);
}

/// Calls kernel(Q, K, V, dO, dQ, dK, dV) with the operands as ConstRows / Rows (core.hpp), so
/// that each backward kernel is compiled once per scalar, mask and state type.
template <class DQ, class DK, class DV, class DG, class OQ, class OK, class OV, class Kernel>
void backward_on_rows(const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                      const Eigen::MatrixBase<DV>& V, const Eigen::MatrixBase<DG>& dO, OQ& dQ,
                      OK& dK, OV& dV, Kernel&& kernel) {
  using T = typename DQ::Scalar;
  RowsOutput<T, OQ> oq(dQ);
  RowsOutput<T, OK> ok(dK);
  RowsOutput<T, OV> ov(dV);
  kernel(ConstRows<T>(Q.derived()), ConstRows<T>(K.derived()), ConstRows<T>(V.derived()),
         ConstRows<T>(dO.derived()), oq.rows, ok.rows, ov.rows);
  oq.commit();
  ok.commit();
  ov.commit();
}

template <class StateScalar>
BackwardArgs<StateScalar> backward_args(const RetentionBackwardOptions<StateScalar>& o,
                                        RetentionState<StateScalar>* d_init) {
  BackwardArgs<StateScalar> a;
  a.normalization = o.normalization;
  a.detach_score_normalizer = o.detach_score_normalizer;
  a.init = o.initial_state;
  a.final_grad = o.final_state_gradient;
  a.d_init = o.initial_state ? d_init : nullptr;
  return a;
}

}  // namespace detail

/// Parallel backward into dQ, dK [T, dk] and dV [T, dv] (matrices, Maps or Blocks that share no
/// memory with the inputs or each other: shape_error "...: dQ overlaps K; in-place calls are not
/// supported"). d_initial_state (if not null) receives dL/d(initial state) when
/// options.initial_state is set; it may point to *options.initial_state or
/// *options.final_state_gradient (both are read before it is written).
template <class DQ, class DK, class DV, class DG, class OQ, class OK, class OV, class Mask,
          class StateScalar = typename DQ::Scalar>
void parallel_retention_backward_into(
    const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K, const Eigen::MatrixBase<DV>& V,
    const Mask& decay, const Eigen::MatrixBase<DG>& dO, OQ&& dQ, OK&& dK, OV&& dV,
    const RetentionBackwardOptions<StateScalar>& options = RetentionBackwardOptions<StateScalar>(),
    RetentionState<StateScalar>* d_initial_state = nullptr) {
  const char* fn = "parallel_retention_backward";
  detail::check_backward_front<OQ, OK, OV, Mask>(fn, Q, K, V, dO, dQ, dK, dV, options, [] {});
  if (options.tile < 0)
    detail::fail(fn, "options.tile must be >= 0, got " + std::to_string(options.tile));
  const detail::SerialEigenScope serial_products;  // threads belong over heads, not small tiles
  const detail::DenormalsFlushed flush_guard;
  const Index tile = options.tile > 0 ? options.tile : default_parallel_tile;
  const auto args = detail::backward_args(options, d_initial_state);
  detail::backward_on_rows(
      Q, K, V, dO, dQ, dK, dV,
      [&](const auto& q, const auto& k, const auto& v, const auto& g, auto& dq, auto& dk,
          auto& dv) { detail::parallel_backward(q, k, v, decay, tile, g, dq, dk, dv, args); });
}

/// Chunkwise backward into dQ, dK [T, dk] and dV [T, dv]; chunk >= 1. See
/// parallel_retention_backward_into for d_initial_state.
template <class DQ, class DK, class DV, class DG, class OQ, class OK, class OV, class Mask,
          class StateScalar = typename DQ::Scalar>
void chunkwise_retention_backward_into(
    const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K, const Eigen::MatrixBase<DV>& V,
    const Mask& decay, Index chunk, const Eigen::MatrixBase<DG>& dO, OQ&& dQ, OK&& dK, OV&& dV,
    const RetentionBackwardOptions<StateScalar>& options = RetentionBackwardOptions<StateScalar>(),
    RetentionState<StateScalar>* d_initial_state = nullptr) {
  const char* fn = "chunkwise_retention_backward";
  detail::check_backward_front<OQ, OK, OV, Mask>(
      fn, Q, K, V, dO, dQ, dK, dV, options, [&] { detail::check_positive(fn, "chunk", chunk); });
  const detail::SerialEigenScope serial_products;  // threads belong over heads, not small chunks
  const detail::DenormalsFlushed flush_guard;
  const auto args = detail::backward_args(options, d_initial_state);
  detail::backward_on_rows(
      Q, K, V, dO, dQ, dK, dV,
      [&](const auto& q, const auto& k, const auto& v, const auto& g, auto& dq, auto& dk,
          auto& dv) { detail::chunkwise_backward(q, k, v, decay, chunk, g, dq, dk, dv, args); });
}

/// Recurrent backward into dQ, dK [T, dk] and dV [T, dv]. See parallel_retention_backward_into.
template <class DQ, class DK, class DV, class DG, class OQ, class OK, class OV, class Mask,
          class StateScalar = typename DQ::Scalar>
void recurrent_retention_backward_into(
    const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K, const Eigen::MatrixBase<DV>& V,
    const Mask& decay, const Eigen::MatrixBase<DG>& dO, OQ&& dQ, OK&& dK, OV&& dV,
    const RetentionBackwardOptions<StateScalar>& options = RetentionBackwardOptions<StateScalar>(),
    RetentionState<StateScalar>* d_initial_state = nullptr) {
  const char* fn = "recurrent_retention_backward";
  detail::check_backward_front<OQ, OK, OV, Mask>(fn, Q, K, V, dO, dQ, dK, dV, options, [] {});
  const detail::DenormalsFlushed flush_guard;
  const auto args = detail::backward_args(options, d_initial_state);
  detail::backward_on_rows(
      Q, K, V, dO, dQ, dK, dV,
      [&](const auto& q, const auto& k, const auto& v, const auto& g, auto& dq, auto& dk,
          auto& dv) { detail::recurrent_backward(q, k, v, decay, g, dq, dk, dv, args); });
}

/// Gradients of parallel_retention (docs/math.md §7): Q, K [T, dk], V [T, dv], dO = dL/dO [T, dv]
/// -> dQ, dK, dV (+ d_initial_state). Query and key blocks of `tile` rows; extra memory
/// O(T (tile + d)), never T x T: with Eigen 3.4's own products and finite inputs, the operands
/// packed once (2 T (dk + dv) numbers); otherwise T (2 dk + dv) for contiguous copies when the
/// inputs' rows are spread out (a head of a wider buffer) and T is above two tiles.
template <class DQ, class DK, class DV, class DG, class Mask,
          class StateScalar = typename DQ::Scalar>
RetentionGradients<typename DQ::Scalar, StateScalar> parallel_retention_backward(
    const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K, const Eigen::MatrixBase<DV>& V,
    const Mask& decay, const Eigen::MatrixBase<DG>& dO,
    const RetentionBackwardOptions<StateScalar>& options =
        RetentionBackwardOptions<StateScalar>()) {
  RetentionGradients<typename DQ::Scalar, StateScalar> g;
  g.dQ.resize(Q.rows(), Q.cols());
  g.dK.resize(Q.rows(), Q.cols());
  g.dV.resize(V.rows(), V.cols());
  parallel_retention_backward_into(Q, K, V, decay, dO, g.dQ, g.dK, g.dV, options,
                                   &g.d_initial_state);
  return g;
}

/// Gradients of chunkwise_retention (docs/math.md §7), chunk >= 1: Q, K [T, dk], V [T, dv], dO
/// [T, dv] -> dQ, dK, dV (+ d_initial_state). With a CausalDecay and the state in the inputs' type
/// the three gradients run as retentions on the forward's chunk kernels (dQ in time order, dK and
/// dV in one reversed sweep that shares their state); otherwise a forward sweep over the chunks
/// carries the state (row factors, dQ) and a reverse sweep carries dS and dz (dK, dV). Extra memory
/// O(T + C (C + dk + dv) + dk dv), plus T x C score tiles that the dQ sweep keeps for the dK one
/// where a head is at least 4 C wide (one sixteenth of the chunk-boundary states or less, which
/// are not stored); the calling thread keeps that buffer for its next call when it is 16 MiB or
/// less.
template <class DQ, class DK, class DV, class DG, class Mask,
          class StateScalar = typename DQ::Scalar>
RetentionGradients<typename DQ::Scalar, StateScalar> chunkwise_retention_backward(
    const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K, const Eigen::MatrixBase<DV>& V,
    const Mask& decay, Index chunk, const Eigen::MatrixBase<DG>& dO,
    const RetentionBackwardOptions<StateScalar>& options =
        RetentionBackwardOptions<StateScalar>()) {
  RetentionGradients<typename DQ::Scalar, StateScalar> g;
  g.dQ.resize(Q.rows(), Q.cols());
  g.dK.resize(Q.rows(), Q.cols());
  g.dV.resize(V.rows(), V.cols());
  chunkwise_retention_backward_into(Q, K, V, decay, chunk, dO, g.dQ, g.dK, g.dV, options,
                                    &g.d_initial_state);
  return g;
}

/// Gradients of recurrent_retention (docs/math.md §7): Q, K [T, dk], V [T, dv], dO [T, dv] -> dQ,
/// dK, dV (+ d_initial_state). A reverse-time recurrence over states recomputed from checkpoints
/// every ceil(sqrt(T)) tokens (O(sqrt(T) dk dv) memory).
template <class DQ, class DK, class DV, class DG, class Mask,
          class StateScalar = typename DQ::Scalar>
RetentionGradients<typename DQ::Scalar, StateScalar> recurrent_retention_backward(
    const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K, const Eigen::MatrixBase<DV>& V,
    const Mask& decay, const Eigen::MatrixBase<DG>& dO,
    const RetentionBackwardOptions<StateScalar>& options =
        RetentionBackwardOptions<StateScalar>()) {
  RetentionGradients<typename DQ::Scalar, StateScalar> g;
  g.dQ.resize(Q.rows(), Q.cols());
  g.dK.resize(Q.rows(), Q.cols());
  g.dV.resize(V.rows(), V.cols());
  recurrent_retention_backward_into(Q, K, V, decay, dO, g.dQ, g.dK, g.dV, options,
                                    &g.d_initial_state);
  return g;
}

/// Options of multi_head_retention_backward. States are indexed b * heads + h.
template <class StateScalar>
struct MultiHeadBackwardOptions {
  Form form = Form::chunkwise;
  /// Chunk length of the chunkwise form; 0 = recommended_chunk(key_dim, value_dim).
  Index chunk = 0;
  /// Parallel form's block size; 0 = default.
  Index tile = 0;
  Normalization normalization = Normalization::none;
  bool detach_score_normalizer = false;
  const std::vector<RetentionState<StateScalar>>* initial_states = nullptr;
  const std::vector<RetentionState<StateScalar>>* final_state_gradients = nullptr;
  /// If set, receives dL/d(initial state) of every pair; needs initial_states.
  std::vector<RetentionState<StateScalar>>* initial_state_gradients = nullptr;
  /// Threads over (batch, head) pairs; 0 = OpenMP's default. Ignored without OpenMP.
  int threads = 0;
};

/// Gradients of multi-head retention (docs/math.md §7): q, k [B, T, H, dk], v and d_out = dL/dO
/// [B, T, H, dv] as views (heads_view(p, B, T, H, D), or any strides), head h with masks[h]
/// (e.g. CausalDecay(gammas[h])); writes dq, dk [B, T, H, dk] and dv [B, T, H, dv], which must not
/// share memory with the inputs or each other. Each (batch, head) pair runs the chosen form's
/// backward on strided views (no copies), pairs spread over threads by for_each_head; as in
/// multi_head_retention, the argument order is inputs, outputs, masks, options.
template <class T, class Mask, class StateScalar = T>
void multi_head_retention_backward(const HeadsView<const T>& q, const HeadsView<const T>& k,
                                   const HeadsView<const T>& v, const HeadsView<const T>& d_out,
                                   const HeadsView<T>& dq, const HeadsView<T>& dk,
                                   const HeadsView<T>& dv, const std::vector<Mask>& masks,
                                   const MultiHeadBackwardOptions<StateScalar>& options =
                                       MultiHeadBackwardOptions<StateScalar>()) {
  detail::assert_scalar<T>();
  detail::assert_scalar<StateScalar>();
  static_assert(sizeof(StateScalar) >= sizeof(T),
                "retention: the state scalar must be at least as wide as the inputs' scalar");
  const char* fn = "multi_head_retention_backward";
  detail::check_view(fn, "q", q);
  const Index B = q.batch, T_len = q.time, H = q.heads, Dk = q.dim;
  detail::check_view_shape(fn, "k", k, B, T_len, H, Dk);
  detail::check_view_shape(fn, "v", v, B, T_len, H, -1);
  const Index Dv = v.dim;
  detail::check_view_shape(fn, "d_out", d_out, B, T_len, H, Dv);
  detail::check_view_shape(fn, "dq", dq, B, T_len, H, Dk);
  detail::check_view_shape(fn, "dk", dk, B, T_len, H, Dk);
  detail::check_view_shape(fn, "dv", dv, B, T_len, H, Dv);
  if (static_cast<Index>(masks.size()) != H)
    detail::fail(fn, "masks has " + std::to_string(masks.size()) +
                         " entries, expected heads = " + std::to_string(H));
  if (options.form != Form::parallel && options.form != Form::recurrent &&
      options.form != Form::chunkwise)
    detail::fail(fn, "form is not one of parallel, recurrent, chunkwise (value " +
                         std::to_string(static_cast<int>(options.form)) + ")");
  detail::check_normalization_value(fn, options.normalization);
  if (options.chunk < 0)
    detail::fail(fn, "chunk must be >= 0 (0 = automatic), got " + std::to_string(options.chunk));
  if (options.tile < 0)
    detail::fail(fn, "tile must be >= 0 (0 = default), got " + std::to_string(options.tile));
  detail::check_threads(fn, "threads", options.threads);
  if (options.initial_states)
    detail::check_state_list(fn, "initial_states", *options.initial_states, B * H, Dk, Dv, true);
  if (options.final_state_gradients)
    detail::check_state_list(fn, "final_state_gradients", *options.final_state_gradients, B * H, Dk,
                             Dv, false);
  if (options.initial_state_gradients && !options.initial_states)
    detail::fail(fn, "initial_state_gradients needs initial_states");
  if (options.initial_state_gradients)
    options.initial_state_gradients->assign(static_cast<std::size_t>(B * H),
                                            RetentionState<StateScalar>());
  const Index chunk = options.chunk > 0 ? options.chunk : recommended_chunk(Dk, Dv);
  const Index tile = options.tile > 0 ? options.tile : default_parallel_tile;

  // About 10 products per token of (width x (dk + dv)) and of the state (dk x dv): width = the
  // chunk, or all earlier tokens for the parallel form.
  const double d_sum = static_cast<double>(Dk + Dv), d_prod = static_cast<double>(Dk * Dv);
  const double width =
      static_cast<double>(options.form == Form::parallel ? T_len : std::min(chunk, T_len));
  const double flops = static_cast<double>(T_len) * (10.0 * width * d_sum + 10.0 * d_prod);
  for_each_head(B, H, flops, options.threads, [&](Index b, Index h) {
    const Index pair = b * H + h;
    const Mask& decay = masks[static_cast<std::size_t>(h)];
    RetentionBackwardOptions<StateScalar> o;
    o.normalization = options.normalization;
    o.detach_score_normalizer = options.detach_score_normalizer;
    o.tile = tile;
    if (options.initial_states)
      o.initial_state = &(*options.initial_states)[static_cast<std::size_t>(pair)];
    if (options.final_state_gradients)
      o.final_state_gradient = &(*options.final_state_gradients)[static_cast<std::size_t>(pair)];
    RetentionState<StateScalar>* d_init =
        options.initial_state_gradients
            ? &(*options.initial_state_gradients)[static_cast<std::size_t>(pair)]
            : nullptr;
    const auto Qh = q.head(b, h), Kh = k.head(b, h), Vh = v.head(b, h), Gh = d_out.head(b, h);
    auto dQh = dq.head(b, h);
    auto dKh = dk.head(b, h);
    auto dVh = dv.head(b, h);
    switch (options.form) {
      case Form::parallel:
        parallel_retention_backward_into(Qh, Kh, Vh, decay, Gh, dQh, dKh, dVh, o, d_init);
        break;
      case Form::recurrent:
        recurrent_retention_backward_into(Qh, Kh, Vh, decay, Gh, dQh, dKh, dVh, o, d_init);
        break;
      case Form::chunkwise:
        chunkwise_retention_backward_into(Qh, Kh, Vh, decay, chunk, Gh, dQh, dKh, dVh, o, d_init);
        break;
    }
  });
}

/// multi_head_retention_backward with head h on CausalDecay(gammas[h]) (each gamma checked here).
template <class T, class StateScalar = T>
void multi_head_retention_backward(const HeadsView<const T>& q, const HeadsView<const T>& k,
                                   const HeadsView<const T>& v, const HeadsView<const T>& d_out,
                                   const std::vector<double>& gammas, const HeadsView<T>& dq,
                                   const HeadsView<T>& dk, const HeadsView<T>& dv,
                                   const MultiHeadBackwardOptions<StateScalar>& options =
                                       MultiHeadBackwardOptions<StateScalar>()) {
  for (double g : gammas) detail::check_gamma("multi_head_retention_backward", g);
  std::vector<CausalDecay> masks;
  masks.reserve(gammas.size());
  for (double g : gammas) masks.emplace_back(g);
  multi_head_retention_backward(q, k, v, d_out, dq, dk, dv, masks, options);
}

}  // namespace retention

#if defined(RETENTION_COMPILED)
// Compiled mode: the per-head kernels for CausalDecay in float and double come from the
// retention_compiled library (src/backward_*.cpp); only the fronts above are compiled here.
#include <retention/detail/retention/backward_instances.hpp>
#endif
