// retention: multi-head retention and decoding over HeadsView buffers ([B, T, H, D] or any strided
// layout, no copies), one (batch, head) pair per task through for_each_head (docs/math.md §2).
#pragma once

#include <retention/chunkwise.hpp>
#include <retention/decay.hpp>
#include <retention/heads.hpp>
#include <retention/parallel.hpp>
#include <retention/recurrent.hpp>
#include <retention/state.hpp>

#include <algorithm>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace retention {

/// Sizes of a dense multi-head call: q and k are row-major [batch, time, heads, key_dim], v and the
/// output [batch, time, heads, value_dim].
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
  /// Receives the states after the last token; may be the same vector as initial_states (then it
  /// is updated only if the whole call succeeds).
  std::vector<RetentionState<T>>* final_states = nullptr;
  /// Threads over (batch, head) pairs; 0 = OpenMP's default, capped by the work (detail/threading).
  int threads = 0;
};

/// Per-head causal masks from gammas (each checked once, here).
inline std::vector<CausalDecay> causal_masks(const std::vector<double>& gammas) {
  std::vector<CausalDecay> masks;
  masks.reserve(gammas.size());
  for (double g : gammas) masks.emplace_back(g);
  return masks;
}

namespace detail {

template <class T>
void check_states(const char* fn, const std::vector<RetentionState<T>>& states, Index batch,
                  Index heads, Index dk, Index dv, const char* name) {
  const Index expected = checked_product(fn, "batch * heads", batch, heads);
  if (static_cast<Index>(states.size()) != expected)
    fail(fn, std::string(name) + " has " + std::to_string(states.size()) +
                 " states, expected batch * heads = " + std::to_string(expected));
  for (std::size_t i = 0; i < states.size(); ++i) {
    const auto& s = states[i];
    if (s.S.rows() == dk && s.S.cols() == dv && s.z.size() == dk && s.position >= 0) continue;
    const std::string element = std::string(name) + "[" + std::to_string(i) + "]";
    check_state(fn, s, dk, dv, element.c_str());
  }
}

/// Throws unless batch * time * heads * dim fits in Index (before any view is made).
inline void check_dense_sizes(const char* fn, Index batch, Index time, Index heads, Index dim) {
  const Index row = checked_product(fn, "heads * dim", heads, dim);
  checked_product(fn, "batch * time * heads * dim", batch,
                  checked_product(fn, "time * heads * dim", time, row));
}

inline void check_form(const char* fn, Form form) {
  if (form != Form::parallel && form != Form::recurrent && form != Form::chunkwise)
    fail(fn, "form is not one of parallel, recurrent, chunkwise (value " +
                 std::to_string(static_cast<int>(form)) + ")");
}

inline void check_normalization(const char* fn, Normalization n) {
  if (n != Normalization::none && n != Normalization::decay && n != Normalization::decay_and_score)
    fail(fn, "normalization is not one of none, decay, decay_and_score (value " +
                 std::to_string(static_cast<int>(n)) + ")");
}

/// Rough flops of one head of a retention form, for the thread rule.
inline double retention_flops(Form form, Index T_len, Index dk, Index dv, Index chunk) {
  const double t = static_cast<double>(T_len), k = static_cast<double>(dk),
               v = static_cast<double>(dv);
  switch (form) {
    case Form::parallel:
      return t * t * (k + v);
    case Form::chunkwise:
      return 2.0 * t * (static_cast<double>(std::min(chunk, T_len)) * (k + v) + 2.0 * k * v);
    case Form::recurrent:
    default:
      return 4.0 * t * k * v;
  }
}

/// The checks of one decoding step over [B, 1, H, D] views (multi_head_step, varlen_step): q's
/// view, time 1, k, v and out of matching shapes, out overlapping no input, one mask per head, the
/// normalisation and the thread count.
template <class S, class O>
void check_step_views(const char* fn, const HeadsView<const S>& q, const HeadsView<const S>& k,
                      const HeadsView<const S>& v, const HeadsView<O>& out, std::size_t masks,
                      Normalization normalization, int threads) {
  check_view(fn, "q", q);
  const Index B = q.batch, H = q.heads, dk = q.dim, dv = v.dim;
  if (q.time != 1) fail(fn, "q has time " + std::to_string(q.time) + ", expected 1");
  check_view_shape(fn, "k", k, B, 1, H, dk);
  check_view_shape(fn, "v", v, B, 1, H, -1);
  check_view_shape(fn, "out", out, B, 1, H, dv);
  check_no_overlap(fn, out, q, "q");
  check_no_overlap(fn, out, k, "k");
  check_no_overlap(fn, out, v, "v");
  if (static_cast<Index>(masks) != H)
    fail(fn,
         "masks has " + std::to_string(masks) + " entries, expected heads = " + std::to_string(H));
  check_normalization(fn, normalization);
  check_threads(fn, "threads", threads);
}

}  // namespace detail

/// Multi-head retention: for every (b, h), out.head(b, h) = retention(q.head(b, h), k.head(b, h),
/// v.head(b, h)) with masks[h], in the chosen form (docs/math.md §2). q, k [B, T, H, dk], v and out
/// [B, T, H, dv] as HeadsViews (any strides; out must not overlap the inputs). States are indexed
/// b * H + h. If any head fails, the exception reaches the caller and final_states is unchanged.
template <class T, class Mask>
void multi_head_retention(const HeadsView<const T>& q, const HeadsView<const T>& k,
                          const HeadsView<const T>& v, const HeadsView<T>& out,
                          const std::vector<Mask>& masks,
                          const MultiHeadOptions<T>& options = MultiHeadOptions<T>()) {
  detail::assert_scalar<T>();
  const char* fn = "multi_head_retention";
  detail::check_view(fn, "q", q);
  const Index B = q.batch, T_len = q.time, H = q.heads, dk = q.dim, dv = v.dim;
  detail::check_view_shape(fn, "k", k, B, T_len, H, dk);
  detail::check_view_shape(fn, "v", v, B, T_len, H, -1);
  detail::check_view_shape(fn, "out", out, B, T_len, H, dv);
  detail::check_no_overlap(fn, out, q, "q");
  detail::check_no_overlap(fn, out, k, "k");
  detail::check_no_overlap(fn, out, v, "v");
  if (static_cast<Index>(masks.size()) != H)
    detail::fail(fn, "masks has " + std::to_string(masks.size()) +
                         " entries, expected heads = " + std::to_string(H));
  detail::check_form(fn, options.form);
  detail::check_normalization(fn, options.normalization);
  detail::check_threads(fn, "options.threads", options.threads);
  if (options.chunk < 0)
    detail::fail(fn, "chunk must be >= 0 (0 = automatic), got " + std::to_string(options.chunk));
  if (options.initial_states)
    detail::check_states(fn, *options.initial_states, B, H, dk, dv, "initial_states");
  const Index chunk = options.chunk > 0 ? options.chunk : recommended_chunk(dk, dv);
  const Index pairs = B * H;

  // Final states go to fresh storage and replace the caller's only after every head succeeded
  // (strong exception guarantee; the caller's vector may also be the initial states).
  std::vector<RetentionState<T>> finals;
  if (options.final_states) finals.resize(static_cast<std::size_t>(pairs));

  for_each_head(B, H, detail::retention_flops(options.form, T_len, dk, dv, chunk), options.threads,
                [&](Index b, Index h) {
                  const std::size_t pair = static_cast<std::size_t>(b * H + h);
                  RetentionOptions<T> opt;
                  opt.normalization = options.normalization;
                  if (options.initial_states) opt.initial_state = &(*options.initial_states)[pair];
                  if (options.final_states) opt.final_state = &finals[pair];
                  const auto Q = q.head(b, h);
                  const auto K = k.head(b, h);
                  const auto V = v.head(b, h);
                  auto O = out.head(b, h);
                  const Mask& mask = masks[static_cast<std::size_t>(h)];
                  switch (options.form) {
                    case Form::parallel:
                      parallel_retention_into(Q, K, V, mask, O, opt);
                      break;
                    case Form::recurrent:
                      recurrent_retention_into(Q, K, V, mask, O, opt);
                      break;
                    case Form::chunkwise:
                      chunkwise_retention_into(Q, K, V, mask, chunk, O, opt);
                      break;
                  }
                });
  if (options.final_states) options.final_states->swap(finals);
}

/// Multi-head retention over dense [B, T, H, D] buffers (see MultiHeadShape); head h uses
/// CausalDecay(gammas[h]).
template <class T>
void multi_head_retention(const T* q, const T* k, const T* v, T* out, const MultiHeadShape& shape,
                          const std::vector<double>& gammas,
                          const MultiHeadOptions<T>& options = MultiHeadOptions<T>()) {
  const char* fn = "multi_head_retention";
  if (!q || !k || !v || !out) detail::fail(fn, "null buffer pointer");
  const Index B = shape.batch, T_len = shape.time, H = shape.heads;
  for (const auto& s :
       {std::make_pair("batch", B), std::make_pair("time", T_len), std::make_pair("heads", H),
        std::make_pair("key_dim", shape.key_dim), std::make_pair("value_dim", shape.value_dim)})
    detail::check_positive(fn, s.first, s.second);
  if (static_cast<Index>(gammas.size()) != H)
    detail::fail(fn, "gammas has " + std::to_string(gammas.size()) +
                         " entries, expected heads = " + std::to_string(H));
  for (double g : gammas) detail::check_gamma(fn, g);
  detail::check_dense_sizes(fn, B, T_len, H, std::max(shape.key_dim, shape.value_dim));
  multi_head_retention(
      heads_view(q, B, T_len, H, shape.key_dim), heads_view(k, B, T_len, H, shape.key_dim),
      heads_view(v, B, T_len, H, shape.value_dim), heads_view(out, B, T_len, H, shape.value_dim),
      causal_masks(gammas), options);
}

/// Scratch of multi_head_step: one set of row buffers per thread, allocated on first use and kept,
/// so that decoding allocates nothing after its first step.
template <class T>
struct StepWorkspace {
  std::vector<detail::RecurrentBuffers<T>> buffers;
  void reserve(int team, Index key_dim, Index value_dim) {
    if (static_cast<int>(buffers.size()) < team ||
        (!buffers.empty() &&
         (buffers.front().q.size() != key_dim || buffers.front().v.size() != value_dim))) {
      buffers.clear();
      for (int t = 0; t < team; ++t) buffers.emplace_back(key_dim, value_dim);
    }
  }
};

/// One decoding step of B sequences of H heads: q, k [B, 1, H, dk], v and out [B, 1, H, dv] as
/// HeadsViews (time 1); states (B * H, index b * H + h) advance in place. Allocates nothing when
/// `workspace` is given and has been used before with the same sizes. The only failures are the
/// checks made before any state changes.
template <class T, class Mask>
void multi_head_step(const HeadsView<const T>& q, const HeadsView<const T>& k,
                     const HeadsView<const T>& v, const HeadsView<T>& out,
                     const std::vector<Mask>& masks, std::vector<RetentionState<T>>& states,
                     Normalization normalization = Normalization::none, int threads = 0,
                     StepWorkspace<T>* workspace = nullptr) {
  detail::assert_scalar<T>();
  const char* fn = "multi_head_step";
  detail::check_step_views(fn, q, k, v, out, masks.size(), normalization, threads);
  const Index B = q.batch, H = q.heads, dk = q.dim, dv = v.dim;
  detail::check_states(fn, states, B, H, dk, dv, "states");
  for (const auto& s : states)
    if (s.position > std::numeric_limits<Index>::max() - 1)
      detail::fail(fn, "states: position would overflow");
  const Index pairs = B * H;
  // The step is bound by moving the states (each of dk * dv values read and written once); a byte
  // moved costs about what 4 flops of a GEMM do, which puts it on the thread rule's scale.
  const double work = 8.0 * sizeof(T) * static_cast<double>(dk) * static_cast<double>(dv);
  const detail::Team team = detail::plan_team(threads, pairs, work * static_cast<double>(pairs));
  StepWorkspace<T> local;
  StepWorkspace<T>& ws = workspace ? *workspace : local;
  ws.reserve(team.size, dk, dv);
  // Contiguous static shares: each thread streams its own states.
  detail::parallel_region(team, [&](int t, int n) {
    const Index begin = pairs * t / n, end = pairs * (t + 1) / n;
    auto& buf = ws.buffers[static_cast<std::size_t>(t)];
    for (Index pair = begin; pair < end; ++pair) {
      const Index b = pair / H, h = pair % H;
      const auto qv = q.head(b, h);
      const auto kv = k.head(b, h);
      const auto vv = v.head(b, h);
      auto ov = out.head(b, h);
      detail::step_into(qv, kv, vv, masks[static_cast<std::size_t>(h)],
                        states[static_cast<std::size_t>(pair)], normalization, ov, buf);
    }
  });
}

/// multi_head_step over dense buffers: q, k [B, H, dk], v and out [B, H, dv] row-major; head h
/// uses CausalDecay(gammas[h]) (builds the masks on every call: decoding loops should keep masks
/// and a StepWorkspace and call the HeadsView overload).
template <class T>
void multi_head_step(const T* q, const T* k, const T* v, T* out, Index batch, Index heads,
                     Index key_dim, Index value_dim, const std::vector<double>& gammas,
                     std::vector<RetentionState<T>>& states,
                     Normalization normalization = Normalization::none, int threads = 0) {
  const char* fn = "multi_head_step";
  if (!q || !k || !v || !out) detail::fail(fn, "null buffer pointer");
  for (const auto& s : {std::make_pair("batch", batch), std::make_pair("heads", heads),
                        std::make_pair("key_dim", key_dim), std::make_pair("value_dim", value_dim)})
    detail::check_positive(fn, s.first, s.second);
  if (static_cast<Index>(gammas.size()) != heads)
    detail::fail(fn, "gammas has " + std::to_string(gammas.size()) +
                         " entries, expected heads = " + std::to_string(heads));
  for (double g : gammas) detail::check_gamma(fn, g);
  detail::check_dense_sizes(fn, batch, 1, heads, std::max(key_dim, value_dim));
  multi_head_step(heads_view(q, batch, 1, heads, key_dim), heads_view(k, batch, 1, heads, key_dim),
                  heads_view(v, batch, 1, heads, value_dim),
                  heads_view(out, batch, 1, heads, value_dim), causal_masks(gammas), states,
                  normalization, threads);
}

}  // namespace retention
