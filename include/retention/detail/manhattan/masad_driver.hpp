// retention::detail: the MaSAD driver (docs/math.md §4): a softmax attention along every grid row
// (into u), then along every grid column (reading u), per head, with the line kernels; lines are
// scheduled over threads so that a unit's column lines start as soon as its own rows are done.
#pragma once

#include <retention/core.hpp>
#include <retention/decay.hpp>
#include <retention/detail/manhattan/backward_log_tiles.hpp>
#include <retention/detail/manhattan/line_kernels.hpp>
#include <retention/detail/manhattan/masa_driver.hpp>
#include <retention/detail/manhattan/tile_kernels.hpp>
#include <retention/detail/simd/dispatch.hpp>
#include <retention/detail/simd/transpose.hpp>
#include <retention/detail/threading.hpp>
#include <retention/heads.hpp>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace retention {
namespace detail {

/// Per-thread buffers of MaSAD's line attentions, sized for the longest line in the layout of
/// simd::layout_rows (so that every instruction set's kernels fit them).
template <class T>
struct MasadWorkspace {
  Matrix<T> q;        // [L rounded to row blocks, dk] the line's queries, zero rows past L
  Matrix<T> kt;       // [dk, L rounded to the layout width] the line's keys transposed, 0 past L
  Matrix<T> v;        // [L, dvp] the line's values, dense and zero-padded to the layout width
  Matrix<T> logits;   // [rows, cols] logits, then probabilities
  Matrix<T> acc;      // [rows, dvp] unnormalised output (lines too long for the fused kernels)
  Vector<T> row_max;  // [rows] logit row maxima
  Vector<T> inv_sum;  // [rows] 1 / softmax row sums
  Vector<T> lse;      // [rows] log-sum-exp of the logit rows (the training forward)
  std::vector<const T*> lw_rows;  // [rows] where each row's log-weights start
};

/// Line buffers for lines of up to `side` tokens.
template <class T>
MasadWorkspace<T> masad_workspace(Index side, Index dk, Index dv) {
  constexpr Index R = simd::layout_rows, P = simd::max_lanes<T>;
  const Index dvp = masa_round_up(dv, P), rows = masa_round_up(side, R);
  MasadWorkspace<T> ws;
  ws.q.resize(rows, dk);
  ws.kt.resize(dk, masa_round_up(side, P));
  ws.v.resize(side, dvp);
  ws.logits.resize(rows, masa_round_up(side, P));
  ws.acc.resize(rows, dvp);
  ws.row_max.resize(rows);
  ws.inv_sum.resize(rows);
  ws.lse.resize(rows);
  ws.lw_rows.resize(static_cast<std::size_t>(rows));
  return ws;
}

/// MasadWorkspace's buffers as plain pointers and strides, for the dispatched line kernel.
template <class T>
struct MasadLineBuffers {
  T* q = nullptr;
  T* kt = nullptr;
  T* v = nullptr;
  T* logits = nullptr;
  T* acc = nullptr;
  T* row_max = nullptr;
  T* inv_sum = nullptr;
  T* lse = nullptr;
  const T** lw_rows = nullptr;
  Index ldkt = 0, ldv = 0, lds = 0, lda = 0;

  explicit MasadLineBuffers(MasadWorkspace<T>& ws)
      : q(ws.q.data()),
        kt(ws.kt.data()),
        v(ws.v.data()),
        logits(ws.logits.data()),
        acc(ws.acc.data()),
        row_max(ws.row_max.data()),
        inv_sum(ws.inv_sum.data()),
        lse(ws.lse.data()),
        lw_rows(ws.lw_rows.data()),
        ldkt(ws.kt.cols()),
        ldv(ws.v.cols()),
        lds(ws.logits.cols()),
        lda(ws.acc.cols()) {}
};

/// One line of MaSAD (what masad_line computes) where it fits the fused kernels of
/// line_kernels.hpp (L <= masad_line_vectors * N), by the tile kernels otherwise; called
/// through simd::dispatch once per line, so the choice uses the active instruction set's width.
/// With want_lse, also ws->lse[i] = log sum_j exp(logit[i, j]) for i < L (the training forward's).
/// Returns false when some output is not finite: out is then to be redone by masad_line_careful
/// with the values at *careful_v (row stride *careful_ldv), which are v itself or, when the kernel
/// copied v before writing out (which may alias v), that copy.
///
/// Fused: queries are read in place (each is read once per block of rows) unless the line is not
/// whole row blocks; keys are transposed and values copied into the line buffers first: the kernels
/// sweep them once per block of rows, and read in place at a grid's strides those sweeps would keep
/// evicting each other from L1. The copy of v also lets out alias v.
struct MasadLineKernel {
  template <class Isa, class T>
  static bool run(const T* q, Index q_step, const T* k, Index k_step, Index dk, const T* v,
                  Index v_step, Index dv, Index L, const T* lw, Index ldl, T* out, Index out_step,
                  const MasadLineBuffers<T>* ws, bool want_lse, const T** careful_v,
                  Index* careful_ldv) {
    constexpr Index R = simd::layout_rows, N = simd::lanes<T, Isa>;
    const Index Lr = masa_round_up(L, R), Ln = masa_round_up(L, N);
    *careful_v = v;
    *careful_ldv = v_step;
    // The logit kernels read whole blocks of rows: a line of whole blocks is read in place, a
    // ragged one is copied and padded with zero queries.
    const T* qq = q;
    Index ldq = q_step;
    if (Lr != L) {
      masa_copy_rows(q, q_step, L, dk, ws->q, dk);
      std::fill(ws->q + L * dk, ws->q + Lr * dk, T(0));
      qq = ws->q;
      ldq = dk;
    }
    transpose_rows_isa<Isa>(k, k_step, L, dk, ws->kt, ws->ldkt);
    T* s = ws->logits;
    if (L <= masad_line_vectors * N) {
      masa_copy_rows(v, v_step, L, dv, ws->v, ws->ldv);
      *careful_v = ws->v;  // out may overwrite v (the column pass): the careful path reads the copy
      *careful_ldv = ws->ldv;
      simd::call<Isa, MasadSoftmaxLine>(
          Index(Ln / N), qq, ldq, dk, static_cast<const T*>(ws->kt), ws->ldkt, lw, ldl, s, ws->lds,
          Lr, ws->inv_sum, want_lse ? ws->row_max : nullptr, want_lse ? ws->lse : nullptr);
      if (want_lse)  // the kernel left each row's max and sum
        for (Index i = 0; i < L; ++i) ws->lse[i] = ws->row_max[i] + std::log(ws->lse[i]);
      // Rows past L hold finite logits of zero queries; their outputs are computed and dropped.
      return simd::call<Isa, MasadAttendLine>(
          static_cast<const T*>(s), ws->lds, static_cast<const T*>(ws->v), ws->ldv, L,
          static_cast<const T*>(ws->inv_sum), out, out_step, Lr, L, dv);
    }
    // Long lines: the tile kernels, logits through the row pointers of the log-weight tile. The
    // padded log-weight columns are -inf, so padding logits are -inf: they never win the max and
    // weigh 0.
    for (Index i = 0; i < Lr; ++i) ws->lw_rows[i] = lw + i * ldl;
    masa_logits_isa<Isa>(qq, ldq, ws->kt, ws->ldkt, dk, ws->lw_rows,
                         static_cast<const T* const*>(nullptr), s, ws->lds, Lr, L, ws->row_max);
    for (Index i = 0; i < L; ++i) {
      const T sum = masa_exp_sum_isa<Isa>(s + i * ws->lds, Ln, ws->row_max[i]);
      if (want_lse) ws->lse[i] = ws->row_max[i] + std::log(sum);
      ws->inv_sum[i] = sum == T(0) ? T(0) : T(1) / sum;  // 0 only if every logit were -inf
    }
    const T* vv = v;
    Index ldv = v_step;
    if (masa_round_up(dv, N) != dv) {
      masa_copy_rows(v, v_step, L, dv, ws->v, ws->ldv);
      vv = ws->v;
      ldv = ws->ldv;
    }
    // Rows past L hold finite logits of zero queries; their outputs are computed and dropped.
    masa_attend_isa<Isa>(s, ws->lds, vv, ldv, L, static_cast<const T*>(nullptr), ws->acc, ws->lda,
                         Lr, dv);
    // Checked before out is written: out may be v itself (the column pass), which the careful
    // path then still reads. Only what the attend kernel wrote: acc's columns past dv rounded up
    // to this variant's vectors hold whatever the buffer held.
    if (!masa_all_finite_isa<Isa>(ws->inv_sum, L)) return false;
    const Index dvn = masa_round_up(dv, N);
    for (Index i = 0; i < L; ++i)
      if (!masa_all_finite_isa<Isa>(ws->acc + i * ws->lda, dvn)) return false;
    for (Index i = 0; i < L; ++i) {
      const T* a = ws->acc + i * ws->lda;
      T* o = out + i * out_step;
      const T f = ws->inv_sum[i];
      for (Index c = 0; c < dv; ++c) o[c] = a[c] * f;
    }
    return true;
  }
};

/// The careful path of one line (docs/math.md §2.6): masa_careful_rows with the line's [L, L]
/// log-weights lw (row stride ldl). The fast kernels meet a masked key as -inf + q.k and p * v
/// with p = exp(-inf) = 0: with finite inputs a weight of 0, and with a non-finite key, value or
/// query either still that (a logit -inf, a finite v) or a non-finite output in the row (a NaN
/// logit gives a NaN exp, as every kernel exp keeps NaN, hence a NaN row sum; p * Inf is NaN or
/// Inf). So a line whose outputs all come out finite is exact for every row that does not depend on
/// a bad token, and a line with any non-finite output is redone here: no scan of the inputs on the
/// fast path. (In the column pass the values are the row pass's u.)
template <class T>
void masad_line_careful(const T* q, Index q_step, const T* k, Index k_step, Index dk, const T* v,
                        Index v_step, Index dv, Index L, const T* lw, Index ldl, T* out,
                        Index out_step, T* lse = nullptr, Index lse_step = 0) {
  masa_careful_rows<T>(
      q, q_step, k, k_step, v, v_step, L, L, dk, dv,
      [lw, ldl](Index i, Index j) { return lw[i * ldl + j]; }, out, out_step, lse, lse_step);
}

/// One softmax attention along a line of L tokens (a grid row or a grid column): token j of the
/// line is row j of q, k, v, out at steps q_step, k_step, v_step, out_step elements apart. out[j,
/// :] = sum_j' softmax_j'(q_j . k_j' + log_w[j, j']) v[j', :]; log_w is the line's [L, L]
/// log-weight tile padded as masad_log_tile pads it. out may alias v. With lse != nullptr, also
/// lse[j lse_step] = log sum_j' exp(q_j . k_j' + log_w[j, j']). One dispatched kernel call; a line
/// with a non-finite output is redone on the careful path (docs/math.md §2.6).
template <class T>
void masad_line(const T* q, Index q_step, const T* k, Index k_step, Index dk, const T* v,
                Index v_step, Index dv, Index L, const Matrix<T>& log_w, T* out, Index out_step,
                MasadWorkspace<T>& ws, T* lse = nullptr, Index lse_step = 0) {
  const MasadLineBuffers<T> b(ws);
  const T* careful_v = v;
  Index careful_ldv = v_step;
  if (!simd::dispatch<MasadLineKernel>(q, q_step, k, k_step, dk, v, v_step, dv, L, log_w.data(),
                                       log_w.cols(), out, out_step, &b, lse != nullptr, &careful_v,
                                       &careful_ldv)) {
    masad_line_careful<T>(q, q_step, k, k_step, dk, careful_v, careful_ldv, dv, L, log_w.data(),
                          log_w.cols(), out, out_step, lse, lse_step);
    return;
  }
  if (lse)
    for (Index i = 0; i < L; ++i) lse[i * lse_step] = ws.lse(i);
}

/// The [L, L] log-weight tile of one MaSAD axis, padded to [L rounded to row blocks, L rounded to
/// the layout width]: padding columns -inf (they must weigh 0 and never be a row's max), padding
/// rows 0 (finite, dropped).
template <class T, class Axis>
Matrix<T> masad_log_tile(const Axis& axis, Index L) {
  Matrix<T> w =
      Matrix<T>::Zero(masa_round_up(L, simd::layout_rows), masa_round_up(L, simd::max_lanes<T>));
  w.rightCols(w.cols() - L).setConstant(-std::numeric_limits<T>::infinity());
  axis.log_weights_into(0, 0, w.topLeftCorner(L, L));
  return w;
}

/// Per-token values of a MaSAD call (the training forward's log-sum-exp): token n of head h of
/// image b at data + b image + n token + h head; data == nullptr: none.
template <class T>
struct MasadTokenValues {
  T* data = nullptr;
  Index token = 0, head = 0, image = 0;
  T* at(Index b, Index n, Index h) const {
    return data ? data + b * image + n * token + h * head : nullptr;
  }
};

/// Where the operands of a MaSAD call live: head h of image b's token n = y W + x starts at
/// q + b bq + n ldq + h hq (likewise k, v, out).
template <class T>
struct MasadGrid {
  const T* q = nullptr;
  const T* k = nullptr;
  const T* v = nullptr;
  T* out = nullptr;
  Index ldq = 0, ldk = 0, ldv = 0, ldo = 0;  // between consecutive tokens
  Index hq = 0, hk = 0, hv = 0, ho = 0;      // between consecutive heads
  Index bq = 0, bk = 0, bv = 0, bo = 0;      // between consecutive images
  Index batch = 1, height = 0, width = 0, heads = 1, dk = 0, dv = 0;
  // The training forward's extras: the row pass's output u in a buffer of its own (nullptr: in
  // out, overwritten by the column pass) and each pass's log-sum-exp.
  T* u = nullptr;
  Index ldu = 0, hu = 0, bu = 0;
  MasadTokenValues<T> row_lse, column_lse;
};

/// Asks for `rows` rows of `cols` elements, `step` elements apart, to be brought into L2 (a line of
/// all heads is larger than L1).
template <class T>
void masad_prefetch_rows(const T* p, Index step, Index rows, Index cols) {
  // Compilers without a prefetch get an empty simd::prefetch_l2, and the loop goes with it.
  constexpr Index line = static_cast<Index>(64 / sizeof(T));
  for (Index i = 0; i < rows; ++i) {
    const T* r = p + i * step;
    for (Index c = 0; c < cols; c += line) simd::prefetch_l2(r + c);
    simd::prefetch_l2(r + cols - 1);
  }
}

/// MaSAD of every (image, head) of a grid (docs/math.md §4): for each image, every head's attention
/// along each grid row, writing u into out, then along each grid column, reading u from out and
/// overwriting it with the result. u lives in out itself (unless g.u gives it a buffer of its
/// own): each line attention copies (fused) or reads into its accumulators (tiled) all its values
/// before it writes its own rows, and the lines of one pass touch disjoint rows.
///
/// Threads take whole lines, each line for all heads of a head group in turn (all heads when
/// serial, half of them with a team): a line of a [.., heads * d] buffer is then one contiguous
/// block (a row line) or H blocks of heads * d (a column line), which the
/// hardware prefetchers stream and the TLB covers, where one head's line is a 256-byte piece of
/// every token's row. Each line's whole block is prefetched in one sequential sweep before its
/// first head: the kernels' own reads, a head at a time, leave the hardware prefetchers too little
/// to follow.
template <class T, class Mask2D>
void masad_grid(const MasadGrid<T>& g, const std::vector<Mask2D>& masks, int threads) {
  const Index H = g.height, W = g.width, N = H * W, heads = g.heads, dk = g.dk, dv = g.dv;
  std::vector<Matrix<T>> log_x, log_y;
  log_x.reserve(static_cast<std::size_t>(heads));
  log_y.reserve(static_cast<std::size_t>(heads));
  for (Index h = 0; h < heads; ++h) {
    const Mask2D& mask = masks[static_cast<std::size_t>(h)];
    log_x.push_back(masad_log_tile<T>(mask.column_axis(), W));
    log_y.push_back(masad_log_tile<T>(mask.row_axis(), H));
  }
  const auto line = [&](const T* q, Index q_step, const T* k, Index k_step, const T* v,
                        Index v_step, Index L, const Matrix<T>& log_w, T* o, Index o_step,
                        MasadWorkspace<T>& ws, T* lse, Index lse_step) {
    masad_line<T>(q, q_step, k, k_step, dk, v, v_step, dv, L, log_w, o, o_step, ws, lse, lse_step);
  };
  // Where the row pass writes u and the column pass reads it.
  T* const u_base = g.u ? g.u : g.out;
  const Index ldu = g.u ? g.ldu : g.ldo, hu = g.u ? g.hu : g.ho, bu = g.u ? g.bu : g.bo;

  const double work = 2.0 * static_cast<double>(g.batch * heads * N) * static_cast<double>(H + W) *
                      static_cast<double>(dk + dv);
  const Team team = plan_team(threads, g.batch * std::max(H, W), work);
  // Units of work: image b's heads [h0, h0 + group). With a team, as many groups per image as
  // team members (at most one per head), so that every member has units of its own even for one
  // image (see the schedule below).
  const Index wanted = team.size > 1 ? std::min<Index>(heads, team.size) : 1;
  const Index group = (heads + wanted - 1) / wanted;
  const Index groups = (heads + group - 1) / group;
  const Index units = g.batch * groups;
  const auto unit_heads = [&](Index u, Index& b, Index& h0, Index& h1) {
    b = u / groups;
    h0 = (u % groups) * group;
    h1 = std::min(heads, h0 + group);
  };
  // Span in elements of heads [h0, h1) of one token's row (for the prefetcher).
  const auto span = [](Index h0, Index h1, Index head_stride, Index d) {
    return (h1 - h0 - 1) * head_stride + d;
  };
  // Grid row y of unit u: tokens [y W, y W + W), consecutive rows.
  const auto row = [&](Index u, Index y, MasadWorkspace<T>& ws) {
    Index b = 0, h0 = 0, h1 = 0;
    unit_heads(u, b, h0, h1);
    const T* q = g.q + b * g.bq + y * W * g.ldq;
    const T* k = g.k + b * g.bk + y * W * g.ldk;
    const T* v = g.v + b * g.bv + y * W * g.ldv;
    T* o = u_base + b * bu + y * W * ldu;
    masad_prefetch_rows(q + h0 * g.hq, g.ldq, W, span(h0, h1, g.hq, dk));
    masad_prefetch_rows(k + h0 * g.hk, g.ldk, W, span(h0, h1, g.hk, dk));
    masad_prefetch_rows(v + h0 * g.hv, g.ldv, W, span(h0, h1, g.hv, dv));
    for (Index h = h0; h < h1; ++h)
      line(q + h * g.hq, g.ldq, k + h * g.hk, g.ldk, v + h * g.hv, g.ldv, W,
           log_x[static_cast<std::size_t>(h)], o + h * hu, ldu, ws, g.row_lse.at(b, y * W, h),
           g.row_lse.token);
  };
  // Grid column x of unit u: tokens x, x + W, ..., every W-th row, whose values are the row
  // pass's u.
  const auto column = [&](Index u, Index x, MasadWorkspace<T>& ws) {
    Index b = 0, h0 = 0, h1 = 0;
    unit_heads(u, b, h0, h1);
    const T* q = g.q + b * g.bq + x * g.ldq;
    const T* k = g.k + b * g.bk + x * g.ldk;
    T* o = g.out + b * g.bo + x * g.ldo;
    const T* uu = u_base + b * bu + x * ldu;
    masad_prefetch_rows(q + h0 * g.hq, W * g.ldq, H, span(h0, h1, g.hq, dk));
    masad_prefetch_rows(k + h0 * g.hk, W * g.ldk, H, span(h0, h1, g.hk, dk));
    masad_prefetch_rows<T>(uu + h0 * hu, W * ldu, H, span(h0, h1, hu, dv));
    for (Index h = h0; h < h1; ++h)
      line(q + h * g.hq, W * g.ldq, k + h * g.hk, W * g.ldk, uu + h * hu, W * ldu, H,
           log_y[static_cast<std::size_t>(h)], o + h * g.ho, W * g.ldo, ws,
           g.column_lse.at(b, x, h), W * g.column_lse.token);
  };
  // A unit's lines: its H row lines, then its W column lines, which read what all of its rows
  // wrote.
  const auto make = [&] { return masad_workspace<T>(std::max(H, W), dk, dv); };
  if (team.size > 1) {
    // Each unit hands out its lines one at a time from a counter of its own (rows first). Share s
    // starts at unit s * units / team and goes round the units from there: each thread works
    // through units of its own, whose q, k, v and u then stay with one core and whose columns
    // rarely wait, and a thread that runs out takes the lines left in the others (on a shared
    // machine, those of a member that was descheduled). A column line whose unit still has rows
    // in flight blocks on a condition variable (never spins: the thread it waits for may be the
    // one that needs this core).
    const Index lines = H + W;
    struct UnitCounters {
      std::atomic<Index> next{0};       // the unit's next line to hand out
      std::atomic<Index> rows_done{0};  // its finished row lines
    };
    const std::unique_ptr<UnitCounters[]> counters(
        new UnitCounters[static_cast<std::size_t>(units)]);
    std::mutex mutex;
    std::condition_variable rows_finished;
    std::atomic<bool> failed{false};  // a failed line releases every waiter
    parallel_region(team, [&](int share, int shares) {
      try {
        std::optional<MasadWorkspace<T>> ws;  // made for the first line this share takes
        const Index first = units * share / shares;
        for (Index step = 0; step < units; ++step) {
          const Index u = (first + step) % units;
          UnitCounters& unit = counters[static_cast<std::size_t>(u)];
          std::atomic<Index>& next = unit.next;
          std::atomic<Index>& rows_done = unit.rows_done;
          for (Index t = next.fetch_add(1, std::memory_order_relaxed); t < lines;
               t = next.fetch_add(1, std::memory_order_relaxed)) {
            if (failed.load(std::memory_order_relaxed)) return;
            if (!ws) ws.emplace(make());
            if (t < H) {
              row(u, t, *ws);
              if (rows_done.fetch_add(1, std::memory_order_acq_rel) + 1 == H) {
                // Taking the mutex orders this against a waiter between its check and its wait.
                { const std::lock_guard<std::mutex> lock(mutex); }
                rows_finished.notify_all();
              }
            } else {
              if (rows_done.load(std::memory_order_acquire) != H) {
                std::unique_lock<std::mutex> lock(mutex);
                rows_finished.wait(lock, [&] {
                  return failed.load(std::memory_order_relaxed) ||
                         rows_done.load(std::memory_order_acquire) == H;
                });
              }
              if (failed.load(std::memory_order_relaxed)) return;
              column(u, t - H, *ws);
            }
          }
        }
      } catch (...) {
        failed.store(true, std::memory_order_relaxed);
        { const std::lock_guard<std::mutex> lock(mutex); }
        rows_finished.notify_all();
        throw;
      }
    });
    return;
  }
  MasadWorkspace<T> ws = make();
  for (Index u = 0; u < units; ++u) {
    for (Index y = 0; y < H; ++y) row(u, y, ws);
    for (Index x = 0; x < W; ++x) column(u, x, ws);
  }
}

/// Grids of up to this many tokens (RMT's last stage, 7 x 7) run MaSA as one line of MaSAD's
/// kernels over the whole [N, N] log-weight tile: their products are too small for the tiled
/// path's Eigen GEMMs, and the line kernels are dispatched on the instruction set.
constexpr Index masa_line_tokens = 64;

/// ln D of the whole grid padded as masad_log_tile pads a line's: [N rounded to row blocks, N
/// rounded to the layout width], padding columns -inf, padding rows 0.
template <class T, class Mask>
Matrix<T> masa_line_log_tile(const Mask& mask) {
  const Index N = mask.height() * mask.width();
  Matrix<T> w =
      Matrix<T>::Zero(masa_round_up(N, simd::layout_rows), masa_round_up(N, simd::max_lanes<T>));
  w.rightCols(w.cols() - N).setConstant(-std::numeric_limits<T>::infinity());
  const GridLogTile<T> grid(mask);
  grid(0, 0, w.topLeftCorner(N, N));
  return w;
}

/// MaSA of one head (masa()'s work): a grid of at most masa_line_tokens tokens with finite inputs
/// as one line of the line kernels, everything else by masa_into_impl's tiles. With lse !=
/// nullptr also the rows' log-sum-exp, lse_step apart (the training forward).
template <class T, class Mask2D>
void masa_head_impl(const ConstRows<T>& Q, const ConstRows<T>& K, const ConstRows<T>& V,
                    const Mask2D& mask, MasaMap<T> out, const MasaOptions& options,
                    T* lse = nullptr, Index lse_step = 0) {
  const Index N = Q.rows(), dk = Q.cols(), dv = V.cols();
  if (N > masa_line_tokens ||
      !masa_inputs_finite(Q.data(), Q.outerStride(), K.data(), K.outerStride(), V.data(),
                          V.outerStride(), N, dk, dv)) {
    masa_into_impl<T>(Q, K, V, mask, out, options, lse, lse_step);
    return;
  }
  const Matrix<T> lw = masa_line_log_tile<T>(mask);
  MasadWorkspace<T> ws = masad_workspace<T>(N, dk, dv);
  masad_line<T>(Q.data(), Q.outerStride(), K.data(), K.outerStride(), dk, V.data(), V.outerStride(),
                dv, N, lw, out.data(), out.outerStride(), ws, lse, lse_step);
}

/// The MasadGrid of views q, k [B, H W, heads, dk] and v, out [B, H W, heads, dv] (any strides).
template <class T>
MasadGrid<T> masad_views_grid(const HeadsView<const T>& q, const HeadsView<const T>& k,
                              const HeadsView<const T>& v, const HeadsView<T>& out, Index H,
                              Index W) {
  MasadGrid<T> g;
  g.q = q.data, g.k = k.data, g.v = v.data, g.out = out.data;
  g.ldq = q.time_stride, g.ldk = k.time_stride, g.ldv = v.time_stride, g.ldo = out.time_stride;
  g.hq = q.head_stride, g.hk = k.head_stride, g.hv = v.head_stride, g.ho = out.head_stride;
  g.bq = q.batch_stride, g.bk = k.batch_stride, g.bv = v.batch_stride, g.bo = out.batch_stride;
  g.batch = q.batch, g.height = H, g.width = W, g.heads = q.heads, g.dk = q.dim, g.dv = v.dim;
  return g;
}

/// The MasadGrid of one head's rows Q, K [N, dk], V, out [N, dv] (their own row strides).
template <class T, class QM, class KM, class VM, class OM>
MasadGrid<T> masad_head_grid(const QM& Q, const KM& K, const VM& V, OM& out, Index H, Index W) {
  return masad_views_grid<T>(
      HeadsView<const T>{Q.data(), 1, H * W, 1, Q.cols(), 0, Q.outerStride(), 0},
      HeadsView<const T>{K.data(), 1, H * W, 1, K.cols(), 0, K.outerStride(), 0},
      HeadsView<const T>{V.data(), 1, H * W, 1, V.cols(), 0, V.outerStride(), 0},
      HeadsView<T>{out.data(), 1, H * W, 1, out.cols(), 0, out.outerStride(), 0}, H, W);
}

template <class T, class Mask2D>
void masad_into_impl(const ConstRows<T>& Q, const ConstRows<T>& K, const ConstRows<T>& V,
                     const Mask2D& mask, MasaMap<T> out, int threads) {
  masad_grid<T>(masad_head_grid<T>(Q, K, V, out, mask.height(), mask.width()),
                std::vector<Mask2D>{mask}, threads);
}

}  // namespace detail
}  // namespace retention

#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
