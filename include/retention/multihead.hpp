// retention: multi-head entry points over the time-major layout [B, T, H, D] (what a Linear
// produces), one head per (batch, head) pair through strided maps (no copies), spread over threads.
#pragma once

#include <retention/chunkwise.hpp>
#include <retention/decay.hpp>
#include <retention/parallel.hpp>
#include <retention/recurrent.hpp>
#include <retention/state.hpp>

#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace retention {

/// Sizes of a multi-head call: buffers are row-major [batch, time, heads, key_dim] for q and k,
/// [batch, time, heads, value_dim] for v and the output.
struct MultiHeadShape {
  Index batch = 1;
  Index time = 0;
  Index heads = 1;
  Index key_dim = 0;
  Index value_dim = 0;
};

/// Options of multi_head_retention. States are indexed b * heads + h.
template <class T>
struct MultiHeadOptions {
  Form form = Form::chunkwise;
  /// Chunk length for the chunkwise form; 0 = recommended_chunk(key_dim, value_dim).
  Index chunk = 0;
  Normalization normalization = Normalization::none;
  const std::vector<RetentionState<T>>* initial_states = nullptr;
  std::vector<RetentionState<T>>* final_states = nullptr;
  /// Threads over (batch, head) pairs; 0 = OpenMP's default. Ignored without OpenMP.
  int threads = 0;
};

namespace detail {

template <class T>
using ConstStridedMap = Eigen::Map<const Matrix<T>, 0, Eigen::OuterStride<>>;
template <class T>
using StridedMap = Eigen::Map<Matrix<T>, 0, Eigen::OuterStride<>>;

inline void check_multihead_shape(const char* fn, const MultiHeadShape& s, std::size_t gammas) {
  check_positive(fn, "batch", s.batch);
  check_positive(fn, "time", s.time);
  check_positive(fn, "heads", s.heads);
  check_positive(fn, "key_dim", s.key_dim);
  check_positive(fn, "value_dim", s.value_dim);
  if (static_cast<Index>(gammas) != s.heads)
    fail(fn, "gammas has " + std::to_string(gammas) +
                 " entries, expected heads = " + std::to_string(s.heads));
}

template <class T>
void check_states(const char* fn, const std::vector<RetentionState<T>>& states,
                  const MultiHeadShape& s, const char* name = "initial_states") {
  if (static_cast<Index>(states.size()) != s.batch * s.heads)
    fail(fn, std::string(name) + " has " + std::to_string(states.size()) +
                 " states, expected batch * heads = " + std::to_string(s.batch * s.heads));
  for (std::size_t i = 0; i < states.size(); ++i) {
    const std::string element = std::string(name) + "[" + std::to_string(i) + "]";
    check_state(fn, states[i], s.key_dim, s.value_dim, element.c_str());
  }
}

inline int thread_count(int requested) {
#if defined(_OPENMP)
  return requested > 0 ? requested : omp_get_max_threads();
#else
  (void)requested;
  return 1;
#endif
}

}  // namespace detail

/// Multi-head retention over [B, T, H, dk] q and k and [B, T, H, dv] v, writing [B, T, H, dv] out.
/// Head h uses CausalDecay(gammas[h]); each (batch, head) pair runs the chosen form on strided
/// views of the buffers. Pairs are spread over OpenMP threads (dynamic schedule) when available;
/// Eigen's own GEMM threading does not nest inside that loop.
template <class T>
void multi_head_retention(const T* q, const T* k, const T* v, T* out, const MultiHeadShape& shape,
                          const std::vector<double>& gammas,
                          const MultiHeadOptions<T>& options = MultiHeadOptions<T>()) {
  detail::assert_scalar<T>();
  const char* fn = "multi_head_retention";
  if (!q || !k || !v || !out) detail::fail(fn, "null buffer pointer");
  detail::check_multihead_shape(fn, shape, gammas.size());
  for (double g : gammas) detail::check_gamma(fn, g);
  if (options.chunk < 0)
    detail::fail(fn, "chunk must be >= 0 (0 = automatic), got " + std::to_string(options.chunk));
  if (options.initial_states) detail::check_states(fn, *options.initial_states, shape);
  const Index B = shape.batch, T_len = shape.time, H = shape.heads, dk = shape.key_dim,
              dv = shape.value_dim;
  const Index chunk = options.chunk > 0 ? options.chunk : recommended_chunk(dk, dv);
  if (options.final_states && options.final_states != options.initial_states)
    options.final_states->assign(static_cast<std::size_t>(B * H), RetentionState<T>(dk, dv));
  const Index pairs = B * H;
  const int threads = detail::thread_count(options.threads);
  (void)threads;

  // One (batch, head) pair per task, handed out dynamically: heads differ in cost (the parallel
  // form skips keys whose decay has underflowed, so fast-decaying heads finish early) and on a
  // shared machine a thread that gets more CPU time takes more pairs. The pairs are few and long,
  // so the dynamic schedule costs nothing measurable.
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
#endif
  for (Index pair = 0; pair < pairs; ++pair) {
    const Index b = pair / H, h = pair % H;
    const detail::ConstStridedMap<T> Q(q + (b * T_len * H + h) * dk, T_len, dk,
                                       Eigen::OuterStride<>(H * dk));
    const detail::ConstStridedMap<T> K(k + (b * T_len * H + h) * dk, T_len, dk,
                                       Eigen::OuterStride<>(H * dk));
    const detail::ConstStridedMap<T> V(v + (b * T_len * H + h) * dv, T_len, dv,
                                       Eigen::OuterStride<>(H * dv));
    detail::StridedMap<T> O(out + (b * T_len * H + h) * dv, T_len, dv,
                            Eigen::OuterStride<>(H * dv));
    const CausalDecay decay(gammas[static_cast<std::size_t>(h)]);
    RetentionOptions<T> opt;
    opt.normalization = options.normalization;
    if (options.initial_states)
      opt.initial_state = &(*options.initial_states)[static_cast<std::size_t>(pair)];
    if (options.final_states)
      opt.final_state = &(*options.final_states)[static_cast<std::size_t>(pair)];
    switch (options.form) {
      case Form::parallel:
        parallel_retention_into(Q, K, V, decay, O, opt);
        break;
      case Form::recurrent:
        recurrent_retention_into(Q, K, V, decay, O, opt);
        break;
      case Form::chunkwise:
        chunkwise_retention_into(Q, K, V, decay, chunk, O, opt);
        break;
    }
  }
}

/// One decoding step for B sequences of H heads: q, k [B, H, dk], v and out [B, H, dv] row-major;
/// states (B * H of them, index b * heads + h) are advanced in place.
template <class T>
void multi_head_step(const T* q, const T* k, const T* v, T* out, Index batch, Index heads,
                     Index key_dim, Index value_dim, const std::vector<double>& gammas,
                     std::vector<RetentionState<T>>& states,
                     Normalization normalization = Normalization::none, int thread_request = 0) {
  detail::assert_scalar<T>();
  const char* fn = "multi_head_step";
  if (!q || !k || !v || !out) detail::fail(fn, "null buffer pointer");
  MultiHeadShape shape{batch, 1, heads, key_dim, value_dim};
  detail::check_multihead_shape(fn, shape, gammas.size());
  for (double g : gammas) detail::check_gamma(fn, g);
  detail::check_states(fn, states, shape, "states");
  const Index pairs = batch * heads;
  const int threads = detail::thread_count(thread_request);
  (void)threads;
  std::vector<CausalDecay> decays;
  decays.reserve(gammas.size());
  for (double g : gammas) decays.emplace_back(g);
    // One pass over each state per step: the step is bound by moving the states, so the work per
    // pair must not allocate; each thread owns one set of buffers and a static, contiguous share of
    // the (batch, head) pairs.
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads)
#endif
  {
    detail::RecurrentBuffers<T> buf(value_dim);
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
    for (Index pair = 0; pair < pairs; ++pair) {
      const Index h = pair % heads;
      const Eigen::Map<const RowVector<T>> qv(q + pair * key_dim, key_dim);
      const Eigen::Map<const RowVector<T>> kv(k + pair * key_dim, key_dim);
      const Eigen::Map<const RowVector<T>> vv(v + pair * value_dim, value_dim);
      Eigen::Map<RowVector<T>> ov(out + pair * value_dim, value_dim);
      detail::step_into(qv, kv, vv, decays[static_cast<std::size_t>(h)],
                        states[static_cast<std::size_t>(pair)], normalization, ov, buf);
    }
  }
}

}  // namespace retention
