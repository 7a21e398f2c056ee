// retention: serving many sequences at once. Packed variable-length prefill (a [total, H, D] buffer
// with sequence offsets cu_seqlens, as flash-linear-attention takes it), the padded-batch path
// (lengths or a [B, T] mask), and one decoding step of B sequences each at its own position with
// its own states, reached through pointers so that sequences join and leave without copies
// (docs/math.md §2).
#pragma once

#include <retention/chunkwise.hpp>
#include <retention/core.hpp>
#include <retention/decay.hpp>
#include <retention/detail/retention/recurrent_kernels.hpp>
#include <retention/detail/threading.hpp>
#include <retention/heads.hpp>
#include <retention/multihead.hpp>
#include <retention/parallel.hpp>
#include <retention/recurrent.hpp>
#include <retention/state.hpp>

#include <algorithm>
#include <functional>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace retention {

/// Options of varlen_retention and padded_retention. States are indexed b * heads + h, one per
/// (sequence, head); each carries its own position.
template <class T>
struct VarlenOptions {
  Form form = Form::chunkwise;
  /// Chunk length of the chunkwise form; 0 = recommended_chunk(key_dim, value_dim).
  Index chunk = 0;
  Normalization normalization = Normalization::none;
  /// States carried in (nullptr = every sequence starts from the zero state at position 0).
  const std::vector<RetentionState<T>>* initial_states = nullptr;
  /// Receives the states after each sequence's last token (an empty sequence passes its initial
  /// state through). May be the same vector as initial_states; written only if the call succeeds.
  std::vector<RetentionState<T>>* final_states = nullptr;
  /// Threads over (sequence, head) pairs; 0 = OpenMP's default, capped by the work.
  int threads = 0;
};

namespace detail {
namespace serving {

/// Rows [start, start + rows) of sequence `batch` of a view.
struct Segment {
  Index batch = 0, start = 0, rows = 0;
};

/// Checks cu_seqlens (B + 1 offsets, cu[0] = 0, non-decreasing, cu[B] = total) and returns one
/// segment per sequence over batch 0 of a packed view.
inline std::vector<Segment> packed_segments(const char* fn, const std::vector<Index>& cu_seqlens,
                                            Index total) {
  if (cu_seqlens.size() < 2)
    fail(fn, "cu_seqlens has " + std::to_string(cu_seqlens.size()) +
                 " entries, expected B + 1 >= 2 (offsets of B >= 1 sequences)");
  if (cu_seqlens.front() != 0)
    fail(fn, "cu_seqlens[0] is " + std::to_string(cu_seqlens.front()) + ", expected 0");
  std::vector<Segment> seg(cu_seqlens.size() - 1);
  for (std::size_t b = 0; b + 1 < cu_seqlens.size(); ++b) {
    if (cu_seqlens[b + 1] < cu_seqlens[b])
      fail(fn, "cu_seqlens decreases at entry " + std::to_string(b + 1) + " (" +
                   std::to_string(cu_seqlens[b]) + " -> " + std::to_string(cu_seqlens[b + 1]) +
                   ")");
    seg[b] = {0, cu_seqlens[b], cu_seqlens[b + 1] - cu_seqlens[b]};
  }
  if (cu_seqlens.back() != total)
    fail(fn, "cu_seqlens ends at " + std::to_string(cu_seqlens.back()) +
                 ", expected the packed token count " + std::to_string(total));
  return seg;
}

/// Checks the sizes of q, k, v, out (any batch and time, out [batch, time, heads, dv]) and masks.
template <class T, class Mask>
void check_views(const char* fn, const HeadsView<const T>& q, const HeadsView<const T>& k,
                 const HeadsView<const T>& v, const HeadsView<T>& out,
                 const std::vector<Mask>& masks) {
  check_view(fn, "q", q);
  check_view_shape(fn, "k", k, q.batch, q.time, q.heads, q.dim);
  check_view_shape(fn, "v", v, q.batch, q.time, q.heads, -1);
  check_view_shape(fn, "out", out, q.batch, q.time, q.heads, v.dim);
  check_no_overlap(fn, out, q, "q");
  check_no_overlap(fn, out, k, "k");
  check_no_overlap(fn, out, v, "v");
  if (static_cast<Index>(masks.size()) != q.heads)
    fail(fn, "masks has " + std::to_string(masks.size()) +
                 " entries, expected heads = " + std::to_string(q.heads));
}

/// Runs every (segment, head) pair through the chosen form on its rows of the views:
/// out rows of the segment = retention(q, k, v rows) from init(b, h) (nullptr = zero state),
/// final state into final_of(b, h) when given. Views are checked by the caller; segments lie in
/// them. An empty segment writes nothing and passes its initial state through.
template <class T, class Mask, class Init, class Final>
void run_segments(const HeadsView<const T>& q, const HeadsView<const T>& k,
                  const HeadsView<const T>& v, const HeadsView<T>& out,
                  const std::vector<Segment>& segments, const std::vector<Mask>& masks, Form form,
                  Index chunk, Normalization normalization, int threads, Init&& init,
                  Final&& final_of) {
  const Index B = static_cast<Index>(segments.size()), H = q.heads, dk = q.dim, dv = v.dim;
  if (chunk == 0) chunk = recommended_chunk(dk, dv);
  Index total = 0;
  for (const Segment& s : segments) total += s.rows;
  const Index mean_rows = std::max<Index>(1, total / std::max<Index>(B, 1));
  for_each_head(B, H, retention_flops(form, mean_rows, dk, dv, chunk), threads,
                [&](Index b, Index h) {
                  const Segment& s = segments[static_cast<std::size_t>(b)];
                  const RetentionState<T>* initial = init(b, h);
                  RetentionState<T>* final_state = final_of(b, h);
                  if (s.rows == 0) {
                    if (final_state) *final_state = initial ? *initial : RetentionState<T>(dk, dv);
                    return;
                  }
                  RetentionOptions<T> opt;
                  opt.normalization = normalization;
                  opt.initial_state = initial;
                  opt.final_state = final_state;
                  const auto Q = q.head(s.batch, h, s.start, s.rows);
                  const auto K = k.head(s.batch, h, s.start, s.rows);
                  const auto V = v.head(s.batch, h, s.start, s.rows);
                  auto O = out.head(s.batch, h, s.start, s.rows);
                  const Mask& mask = masks[static_cast<std::size_t>(h)];
                  switch (form) {
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
}

/// The shared body of varlen_retention and padded_retention after the segments are known.
template <class T, class Mask>
void run_with_options(const char* fn, const HeadsView<const T>& q, const HeadsView<const T>& k,
                      const HeadsView<const T>& v, const HeadsView<T>& out,
                      const std::vector<Segment>& segments, const std::vector<Mask>& masks,
                      const VarlenOptions<T>& options) {
  check_form(fn, options.form);
  check_normalization(fn, options.normalization);
  check_threads(fn, "options.threads", options.threads);
  if (options.chunk < 0)
    fail(fn, "chunk must be >= 0 (0 = automatic), got " + std::to_string(options.chunk));
  const Index B = static_cast<Index>(segments.size()), H = q.heads;
  if (options.initial_states) {
    check_states(fn, *options.initial_states, B, H, q.dim, v.dim, "initial_states");
    for (Index b = 0; b < B; ++b)
      for (Index h = 0; h < H; ++h)
        check_position_range(
            fn, "initial_states position",
            (*options.initial_states)[static_cast<std::size_t>(b * H + h)].position,
            segments[static_cast<std::size_t>(b)].rows);
  }
  // Finals go to fresh storage, swapped in only after every pair succeeded.
  std::vector<RetentionState<T>> finals;
  if (options.final_states) finals.resize(static_cast<std::size_t>(B * H));
  run_segments(
      q, k, v, out, segments, masks, options.form, options.chunk, options.normalization,
      options.threads,
      [&](Index b, Index h) -> const RetentionState<T>* {
        return options.initial_states
                   ? &(*options.initial_states)[static_cast<std::size_t>(b * H + h)]
                   : nullptr;
      },
      [&](Index b, Index h) -> RetentionState<T>* {
        return options.final_states ? &finals[static_cast<std::size_t>(b * H + h)] : nullptr;
      });
  if (options.final_states) options.final_states->swap(finals);
}

}  // namespace serving
}  // namespace detail

/// Packed variable-length retention (docs/math.md §2): B sequences of different lengths stored
/// back to back, q, k [1, total, H, dk], v and out [1, total, H, dv] as HeadsViews of batch 1
/// (e.g. heads_view(p, 1, total, H, D) over a [total, H, D] buffer), sequence b in rows
/// [cu_seqlens[b], cu_seqlens[b + 1]); cu_seqlens has B + 1 entries from 0 to total (empty
/// sequences allowed). Each (sequence, head) pair runs the chosen form from its own initial state
/// (options, index b * H + h) with masks[h]; rows equal running each sequence alone.
template <class T, class Mask>
void varlen_retention(const HeadsView<const T>& q, const HeadsView<const T>& k,
                      const HeadsView<const T>& v, const HeadsView<T>& out,
                      const std::vector<Index>& cu_seqlens, const std::vector<Mask>& masks,
                      const VarlenOptions<T>& options = VarlenOptions<T>()) {
  detail::assert_scalar<T>();
  const char* fn = "varlen_retention";
  detail::serving::check_views(fn, q, k, v, out, masks);
  if (q.batch != 1)
    detail::fail(fn, "q has batch " + std::to_string(q.batch) +
                         ", expected 1 (sequences are packed along time; see cu_seqlens)");
  const auto segments = detail::serving::packed_segments(fn, cu_seqlens, q.time);
  detail::serving::run_with_options(fn, q, k, v, out, segments, masks, options);
}

/// Retention of a right-padded batch: q, k [B, T, H, dk], v and out [B, T, H, dv]; sequence b has
/// lengths[b] in [0, T] valid tokens at rows 0..lengths[b]-1. Valid rows equal running each
/// sequence alone (unpadded); padded rows of out are set to zero; final states are taken at each
/// sequence's last valid token (options as in varlen_retention).
template <class T, class Mask>
void padded_retention(const HeadsView<const T>& q, const HeadsView<const T>& k,
                      const HeadsView<const T>& v, const HeadsView<T>& out,
                      const std::vector<Index>& lengths, const std::vector<Mask>& masks,
                      const VarlenOptions<T>& options = VarlenOptions<T>()) {
  detail::assert_scalar<T>();
  const char* fn = "padded_retention";
  detail::serving::check_views(fn, q, k, v, out, masks);
  if (static_cast<Index>(lengths.size()) != q.batch)
    detail::fail(fn, "lengths has " + std::to_string(lengths.size()) +
                         " entries, expected batch = " + std::to_string(q.batch));
  std::vector<detail::serving::Segment> segments(lengths.size());
  for (std::size_t b = 0; b < lengths.size(); ++b) {
    if (lengths[b] < 0 || lengths[b] > q.time)
      detail::fail(fn, "lengths[" + std::to_string(b) + "] is " + std::to_string(lengths[b]) +
                           ", expected a length in [0, " + std::to_string(q.time) + "]");
    segments[b] = {static_cast<Index>(b), 0, lengths[b]};
  }
  detail::serving::run_with_options(fn, q, k, v, out, segments, masks, options);
  for (const auto& s : segments)
    for (Index h = 0; h < q.heads; ++h) {
      auto o = out.head(s.batch, h);
      o.bottomRows(q.time - s.rows).setZero();
    }
}

/// Retention of a padded batch described by a mask: valid [B, T] (nonzero = a real token), whose
/// valid tokens form one contiguous run per row (right or left padding; a row may be all padding).
/// q, k [B, T, H, dk], v and out [B, T, H, dv]. Valid rows equal each sequence run alone from its
/// initial state (so a left-padded sequence still starts at position 0, or at its state's);
/// padded rows of out are zero; final states are at each sequence's last valid token.
template <class T, class Mask, class DM>
void padded_retention(const HeadsView<const T>& q, const HeadsView<const T>& k,
                      const HeadsView<const T>& v, const HeadsView<T>& out,
                      const Eigen::MatrixBase<DM>& valid, const std::vector<Mask>& masks,
                      const VarlenOptions<T>& options = VarlenOptions<T>()) {
  detail::assert_scalar<T>();
  const char* fn = "padded_retention";
  detail::serving::check_views(fn, q, k, v, out, masks);
  detail::check_shape(fn, "valid", valid, q.batch, q.time);
  std::vector<detail::serving::Segment> segments(static_cast<std::size_t>(q.batch));
  for (Index b = 0; b < q.batch; ++b) {
    Index first = -1, last = -1, count = 0;
    for (Index t = 0; t < q.time; ++t)
      if (valid(b, t) != typename DM::Scalar(0)) {
        if (first < 0) first = t;
        last = t;
        ++count;
      }
    if (count > 0 && last - first + 1 != count)
      detail::fail(fn, "valid row " + std::to_string(b) +
                           " has padding between real tokens (expected one contiguous run of "
                           "valid tokens per sequence: left or right padding)");
    segments[static_cast<std::size_t>(b)] = {b, count > 0 ? first : 0, count};
  }
  detail::serving::run_with_options(fn, q, k, v, out, segments, masks, options);
  for (const auto& s : segments)
    for (Index h = 0; h < q.heads; ++h) {
      auto o = out.head(s.batch, h);
      o.topRows(s.start).setZero();
      o.bottomRows(q.time - s.start - s.rows).setZero();
    }
}

/// Scratch of varlen_step: per-thread rows (a token's q, k, v converted to the state's type) and
/// recurrent buffers, plus room to check the state pointers; sized on first use and kept, so
/// decoding allocates nothing once the batch has reached its largest size.
template <class Acc>
struct VarlenStepWorkspace {
  struct Thread {
    RowVector<Acc> q, k, v;
    detail::RecurrentBuffers<Acc> buf;
    Thread(Index dk, Index dv) : q(dk), k(dk), v(dv), buf(dk, dv) {}
  };
  std::vector<Thread> threads;
  std::vector<const void*> sorted;

  void reserve(int team, Index dk, Index dv, Index pairs) {
    if (static_cast<int>(threads.size()) < team ||
        (!threads.empty() && (threads.front().q.size() != dk || threads.front().v.size() != dv))) {
      threads.clear();
      for (int t = 0; t < team; ++t) threads.emplace_back(dk, dv);
    }
    if (static_cast<Index>(sorted.capacity()) < pairs)
      sorted.reserve(static_cast<std::size_t>(pairs));
  }
};

namespace detail {

template <class S>
struct is_storage_scalar
    : std::integral_constant<bool, std::is_same<S, float>::value ||
                                       std::is_same<S, double>::value ||
                                       std::is_same<S, Eigen::half>::value ||
                                       std::is_same<S, Eigen::bfloat16>::value> {};

/// Throws unless every pointer is non-null and distinct (one state advanced twice in one step would
/// be a data race and a wrong answer). `sorted` is reused scratch.
template <class P>
void check_distinct_states(const char* fn, const std::vector<P*>& states, const char* name,
                           std::vector<const void*>& sorted) {
  sorted.clear();
  for (std::size_t i = 0; i < states.size(); ++i) {
    if (!states[i]) fail(fn, std::string(name) + "[" + std::to_string(i) + "] is null");
    sorted.push_back(states[i]);
  }
  std::sort(sorted.begin(), sorted.end());
  if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end())
    fail(fn, std::string(name) + " holds the same state twice");
}

}  // namespace detail

/// One decoding step of B sequences, each at its own position (docs/math.md §2, recurrent form):
/// q, k [B, 1, H, dk], v [B, 1, H, dv] as HeadsViews of a storage scalar S (float, double,
/// Eigen::half or Eigen::bfloat16), out [B, 1, H, dv] in the state's scalar Acc (float or double,
/// at least as wide as S). states[b * H + h] points to sequence b's head h (any RetentionStates,
/// e.g. inside per-sequence objects, so sequences join and leave the batch without copies); each
/// advances by one token at its own position, which the `decay` normalisation uses. 16-bit inputs
/// are widened exactly to Acc row by row; accumulation and the state stay in Acc. Allocates
/// nothing once `workspace` has served a batch at least this large. The only failures are the
/// checks, made before any state changes.
template <class S, class Acc, class Mask>
void varlen_step(const HeadsView<const S>& q, const HeadsView<const S>& k,
                 const HeadsView<const S>& v, const HeadsView<Acc>& out,
                 const std::vector<Mask>& masks, const std::vector<RetentionState<Acc>*>& states,
                 Normalization normalization = Normalization::none, int threads = 0,
                 VarlenStepWorkspace<Acc>* workspace = nullptr) {
  static_assert(detail::is_storage_scalar<S>::value,
                "retention: varlen_step inputs are float, double, Eigen::half or Eigen::bfloat16");
  detail::assert_scalar<Acc>();
  static_assert(sizeof(Acc) >= sizeof(S),
                "retention: the state scalar must be at least as wide as the inputs' scalar");
  const char* fn = "varlen_step";
  detail::check_step_views(fn, q, k, v, out, masks.size(), normalization, threads);
  const Index B = q.batch, H = q.heads, dk = q.dim, dv = v.dim;
  const Index pairs = B * H;
  if (static_cast<Index>(states.size()) != pairs)
    detail::fail(fn, "states has " + std::to_string(states.size()) +
                         " pointers, expected batch * heads = " + std::to_string(pairs));
  const double work = 8.0 * sizeof(Acc) * static_cast<double>(dk) * static_cast<double>(dv);
  const detail::Team team = detail::plan_team(threads, pairs, work * static_cast<double>(pairs));
  VarlenStepWorkspace<Acc> local;
  VarlenStepWorkspace<Acc>& ws = workspace ? *workspace : local;
  ws.reserve(team.size, dk, dv, pairs);
  detail::check_distinct_states(fn, states, "states", ws.sorted);
  for (Index i = 0; i < pairs; ++i) {
    const RetentionState<Acc>& s = *states[static_cast<std::size_t>(i)];
    if (s.S.rows() != dk || s.S.cols() != dv || s.z.size() != dk || s.position < 0) {
      const std::string name = "states[" + std::to_string(i) + "]";
      detail::check_state(fn, s, dk, dv, name.c_str());
    }
    if (s.position > std::numeric_limits<Index>::max() - 1)
      detail::fail(fn, "states[" + std::to_string(i) + "]: position would overflow");
  }
  detail::parallel_region(team, [&](int t, int n) {
    const Index begin = pairs * t / n, end = pairs * (t + 1) / n;
    auto& th = ws.threads[static_cast<std::size_t>(t)];
    for (Index pair = begin; pair < end; ++pair) {
      const Index b = pair / H, h = pair % H;
      auto ov = out.head(b, h);
      RetentionState<Acc>& state = *states[static_cast<std::size_t>(pair)];
      const Mask& mask = masks[static_cast<std::size_t>(h)];
      if constexpr (std::is_same<S, Acc>::value) {
        detail::step_into(q.head(b, h), k.head(b, h), v.head(b, h), mask, state, normalization, ov,
                          th.buf);
      } else {
        // Widening is exact (every bfloat16, half and float is a float/double), once per token.
        th.q = q.head(b, h).template cast<Acc>();
        th.k = k.head(b, h).template cast<Acc>();
        th.v = v.head(b, h).template cast<Acc>();
        detail::step_into(th.q, th.k, th.v, mask, state, normalization, ov, th.buf);
      }
    }
  });
}

}  // namespace retention
