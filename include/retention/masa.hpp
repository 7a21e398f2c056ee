// retention: RMT's Manhattan self-attention (MaSA) and its decomposed form (MaSAD), SPEC section 4.
//
// MaSA streams over key tiles with an online softmax (running row max and row sum), so it holds
// one [query_tile, key_tile] logit tile per thread and never the [N, N] score matrix. MaSAD runs a
// small softmax attention along every grid row, then along every grid column. Neither knows a gamma
// formula: log-weights come from the decay masks of decay.hpp.
#pragma once

#include <retention/core.hpp>
#include <retention/decay.hpp>
#include <retention/detail/manhattan/tile_kernels.hpp>
#include <retention/detail/manhattan/line_kernels.hpp>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace retention {

/// Tiling and threading of masa / masad. Any tile sizes >= 1 give the same result up to rounding.
struct MasaOptions {
  /// Queries per tile (rows of the logit tile).
  Index query_tile = 64;
  /// Keys per tile (columns of the logit tile); a tile of logits is query_tile x key_tile values.
  Index key_tile = 256;
  /// Threads for a single-head call made outside a parallel region; 0 = OpenMP's default,
  /// 1 = serial. Ignored without OpenMP and inside an already parallel region.
  int threads = 0;
};

/// Sizes of a multi-head MaSA / MaSAD call: q and k are row-major [batch, height, width, heads *
/// key_dim], v and the output [batch, height, width, heads * value_dim] (what a Linear over the
/// tokens produces).
struct GridHeadsShape {
  Index batch = 1;
  Index height = 0;
  Index width = 0;
  Index heads = 1;
  Index key_dim = 0;
  Index value_dim = 0;
  /// Distance in elements between consecutive tokens' rows of q and k, and of v; 0 means dense
  /// (heads * key_dim, heads * value_dim). Lets q, k, v be column blocks of one fused [.., q | k |
  /// v] buffer.
  Index qk_row_stride = 0;
  Index v_row_stride = 0;
};

namespace detail {

// Own alias names: multihead.hpp declares similar ones and alias templates cannot be redeclared.
template <class T>
using MasaConstRef = Eigen::Ref<const Matrix<T>, 0, Eigen::OuterStride<>>;
template <class T>
using MasaConstMap = Eigen::Map<const Matrix<T>, 0, Eigen::OuterStride<>>;
template <class T>
using MasaMap = Eigen::Map<Matrix<T>, 0, Eigen::OuterStride<>>;

/// Threads to use for `tasks` independent pieces of `work` flops: 1 inside a parallel region or
/// when the work is too small to pay for waking a team.
inline int masa_team_size(int requested, Index tasks, double work) {
#if defined(_OPENMP)
  if (omp_in_parallel() || tasks < 2 || work < 4.0e5) return 1;
  const int wanted = requested > 0 ? requested : omp_get_max_threads();
  return static_cast<int>(std::max<Index>(1, std::min<Index>(wanted, tasks)));
#else
  (void)requested;
  (void)tasks;
  (void)work;
  return 1;
#endif
}

/// Runs body(task, workspace) for task = 0..tasks-1, each thread with its own workspace made
/// by make(); workspaces are allocated once per thread, never inside the loop.
template <class Make, class Body>
void masa_for_each(int team, Index tasks, Make make, Body body) {
#if defined(_OPENMP)
  if (team > 1) {
#pragma omp parallel num_threads(team)
    {
      auto ws = make();
#pragma omp for schedule(dynamic, 1)
      for (Index t = 0; t < tasks; ++t) body(t, ws);
    }
    return;
  }
#else
  (void)team;
#endif
  auto ws = make();
  for (Index t = 0; t < tasks; ++t) body(t, ws);
}

template <class T>
void check_masa_options(const char* fn, const MasaOptions& options) {
  check_positive(fn, "query_tile", options.query_tile);
  check_positive(fn, "key_tile", options.key_tile);
}

/// Operands of a MaSA call laid out once for the micro-kernels (O(N d) extra, shared by all
/// threads): Q with zero rows past N (query tiles are computed in whole row blocks), K^T with zero
/// columns past N (key tiles in whole SIMD packets), and V with its columns padded to a packet
/// multiple when dv needs it.
template <class T>
struct MasaOperands {
  Matrix<T> q, kt, v;
  const T* v_data = nullptr;
  Index ldv = 0, dvp = 0;
  // ln D of a key tile starting at m0 = a W + b, as two small periodic tables (Manhattan =
  // symmetric_H (x) symmetric_W, SPEC 1): ln D[n, m0 + j] = log_x(x_n, b + j) + log_y(y_n - a + H -
  // 1, b + j), with log_x[x][c] = |x - c mod W| ln gamma  [W, W + key columns] and log_y[dy + H -
  // 1][c] = |dy - floor(c / W)| ln gamma  [2H - 1, W + key columns]. O(H (W + key_tile)) values
  // instead of a [query_tile, key_tile] tile rebuilt for every pair of tiles.
  Matrix<T> log_x, log_y;
};

template <class T>
struct MasaWorkspace {
  Matrix<T> logits;  // [query rows, key columns] padded, then the tile's probabilities
  Matrix<T> acc;     // [query rows, dvp] unnormalised output
  Vector<T> row_max, row_sum, rescale, tile_max;
  std::vector<const T*> lx_rows,
      ly_rows;  // per query row: where its ln D terms start in the tables
};

/// One query tile [n0, n0 + rows) of MaSA, written to out.middleRows(n0, rows): for each key tile,
/// logits
/// + ln D by the micro-kernel (ln D as its initial value, the tile's row max on the way out),
/// online softmax (running row max and sum), then acc = rescale * acc + P V by the attend kernel.
template <class T>
void masa_query_tile(const MasaOperands<T>& ops, Index N, Index dk, Index dv, Index height,
                     Index width, Index key_tile, Index n0, Index rows, MasaWorkspace<T>& ws,
                     MasaMap<T>& out) {
  constexpr Index R = MasaKernelShape<T>::rows, P = MasaKernelShape<T>::width;
  using Pk = Eigen::Array<T, P, 1>;
  const Index rows_r = masa_round_up(rows, R), lds = ws.logits.cols(), lda = ws.acc.cols();
  const Index ldk = ops.kt.cols(), ldx = ops.log_x.cols(), ldy = ops.log_y.cols();
  T* s = ws.logits.data();
  const T neg_inf = -std::numeric_limits<T>::infinity();
  for (Index m0 = 0; m0 < N; m0 += key_tile) {
    const Index cols = std::min(key_tile, N - m0), a = m0 / width, b = m0 % width;
    for (Index i = 0; i < rows_r; ++i) {
      // Rows past the tile's end (the kernel works in whole row blocks) reuse the last row's terms.
      const Index n = n0 + std::min(i, rows - 1), yn = n / width, xn = n % width;
      ws.lx_rows[static_cast<std::size_t>(i)] = ops.log_x.data() + xn * ldx + b;
      ws.ly_rows[static_cast<std::size_t>(i)] = ops.log_y.data() + (yn - a + height - 1) * ldy + b;
    }
    const T* const* lx = ws.lx_rows.data();
    const T* const* ly = ws.ly_rows.data();
    masa_logits_kernel<T>(
        ops.q.data() + n0 * dk, dk, ops.kt.data() + m0, ldk, dk,
        [lx, ly](Index i, Index j0) {
          return Pk(Eigen::Map<const Pk>(lx[i] + j0) + Eigen::Map<const Pk>(ly[i] + j0));
        },
        s, lds, rows_r, cols, ws.tile_max.data());
    const Index cols_p = masa_round_up(cols, P);
    for (Index i = 0; i < rows; ++i) {
      T* s_row = s + i * lds;
      // Online softmax: rescale what was accumulated under the old max (folded into the attend
      // kernel's load). The new max is taken first, so exp never overflows; exp(-inf) = 0 on the
      // first tile.
      const T m_new = std::max(ws.row_max(i), ws.tile_max(i));
      if (m_new == neg_inf) {  // every key so far masked out: weights 0, not NaN
        std::fill(s_row, s_row + cols_p, T(0));
        ws.rescale(i) = T(1);
        continue;
      }
      ws.rescale(i) = std::exp(ws.row_max(i) - m_new);
      ws.row_sum(i) = ws.row_sum(i) * ws.rescale(i) + masa_exp_sum(s_row, cols_p, m_new);
      ws.row_max(i) = m_new;
    }
    // Rows past the tile's end belong to no query: keep them finite and zero.
    for (Index i = rows; i < rows_r; ++i) {
      std::fill(s + i * lds, s + i * lds + cols, T(0));
      ws.rescale(i) = T(0);
    }
    masa_attend_kernel<T>(s, lds, ops.v_data + m0 * ops.ldv, ops.ldv, cols,
                          m0 == 0 ? nullptr : ws.rescale.data(), ws.acc.data(), lda, rows_r,
                          ops.dvp);
  }
  for (Index i = 0; i < rows; ++i)
    out.row(n0 + i) =
        Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>>(ws.acc.data() + i * lda, dv) /
        ws.row_sum(i);
}

template <class T>
void masa_into_impl(const MasaConstRef<T>& Q, const MasaConstRef<T>& K, const MasaConstRef<T>& V,
                    const ManhattanDecay& decay, MasaMap<T> out, const MasaOptions& options) {
  constexpr Index R = MasaKernelShape<T>::rows, P = MasaKernelShape<T>::width;
  const Index N = Q.rows(), dk = Q.cols(), dv = V.cols();
  const Index H = decay.height(), W = decay.width();
  const Index bq = std::min(options.query_tile, N), bk = std::min(options.key_tile, N);
  MasaOperands<T> ops;
  {
    // Both axes' factors come from the decay's own tiles (no gamma formula here); table column c
    // stands for key offset c from the start of a grid row.
    const Index span = W + masa_round_up(bk, P);
    const Matrix<T> lx = decay.column_axis().template log_weights<T>(0, W, 0, W);
    const Matrix<T> ly = decay.row_axis().template log_weights<T>(0, H, 0, H);
    ops.log_x.resize(W, span);
    for (Index x = 0; x < W; ++x)
      for (Index c = 0; c < span; ++c) ops.log_x(x, c) = lx(x, c % W);
    ops.log_y.resize(2 * H - 1, span);
    for (Index dy = -(H - 1); dy < H; ++dy)
      for (Index c = 0; c < span; ++c) {
        // |dy - c / W| read from ly's row |dy|... past the grid (c / W >= H) the value is never
        // used unmasked; clamp into the table.
        const Index d = std::min<Index>(std::abs(dy - c / W), H - 1);
        ops.log_y(dy + H - 1, c) = ly(0, d);
      }
  }
  ops.q.resize(N + R, dk);
  masa_copy_rows(Q.data(), Q.outerStride(), N, dk, ops.q.data(), dk);
  ops.q.bottomRows(R).setZero();
  ops.kt.resize(dk, N + P);
  transpose_rows(K.data(), K.outerStride(), N, dk, ops.kt.data(), N + P);
  ops.dvp = masa_round_up(dv, P);
  if (ops.dvp == dv) {  // V is read in place
    ops.v_data = V.data();
    ops.ldv = V.outerStride();
  } else {
    ops.v.resize(N, ops.dvp);
    masa_copy_rows(V.data(), V.outerStride(), N, dv, ops.v.data(), ops.dvp);
    ops.v_data = ops.v.data();
    ops.ldv = ops.dvp;
  }
  const Index tiles = (N + bq - 1) / bq;
  const double work =
      2.0 * static_cast<double>(N) * static_cast<double>(N) * static_cast<double>(dk + dv);
  const int team = masa_team_size(options.threads, tiles, work);
  masa_for_each(
      team, tiles,
      [&]() {
        const Index bqr = masa_round_up(bq, R);
        MasaWorkspace<T> ws;
        ws.logits.resize(bqr, masa_round_up(bk, P));
        ws.acc.resize(bqr, ops.dvp);
        ws.row_max.resize(bqr);
        ws.row_sum.resize(bqr);
        ws.rescale.resize(bqr);
        ws.tile_max.resize(bqr);
        ws.lx_rows.resize(static_cast<std::size_t>(bqr));
        ws.ly_rows.resize(static_cast<std::size_t>(bqr));
        return ws;
      },
      [&](Index t, MasaWorkspace<T>& ws) {
        const Index n0 = t * bq;
        ws.row_max.setConstant(-std::numeric_limits<T>::infinity());
        ws.row_sum.setZero();
        masa_query_tile<T>(ops, N, dk, dv, H, W, bk, n0, std::min(bq, N - n0), ws, out);
      });
}

/// Per-thread buffers of MaSAD's line attentions, sized for the longest line.
template <class T>
struct MasadWorkspace {
  Matrix<T> q;        // [L rounded to row blocks, dk] the line's queries, zero rows past L
  Matrix<T> kt;       // [dk, L rounded to packets] the line's keys transposed, zero past L
  Matrix<T> v;        // [L, dvp] the line's values, dense and zero-padded to whole packets
  Matrix<T> logits;   // [rows, cols] logits, then probabilities
  Matrix<T> acc;      // [rows, dvp] unnormalised output (lines too long for the fused kernels)
  Vector<T> row_max;  // [rows] logit row maxima
  Vector<T> inv_sum;  // [rows] 1 / softmax row sums
};

/// Line buffers for lines of up to `side` tokens.
template <class T>
MasadWorkspace<T> masad_workspace(Index side, Index dk, Index dv) {
  constexpr Index R = MasaKernelShape<T>::rows, P = MasaKernelShape<T>::width;
  const Index dvp = masa_round_up(dv, P), rows = masa_round_up(side, R);
  MasadWorkspace<T> ws;
  ws.q.resize(rows, dk);
  ws.kt.resize(dk, masa_round_up(side, P));
  ws.v.resize(side, dvp);
  ws.logits.resize(rows, masa_round_up(side, P));
  ws.acc.resize(rows, dvp);
  ws.row_max.resize(rows);
  ws.inv_sum.resize(rows);
  return ws;
}

/// One softmax attention along a line of L tokens (a grid row or a grid column): token j of the
/// line is row j of q, k, v, out at steps q_step, k_step, v_step, out_step elements apart. out[j,
/// :] = sum_j' softmax_j'(q_j . k_j' + log_w[j, j']) v[j', :]; log_w is the line's [L, L] symmetric
/// log-weight tile padded with zeros to the kernels' block sizes.
template <class T>
void masad_line(const T* q, Index q_step, const T* k, Index k_step, Index dk, const T* v,
                Index v_step, Index dv, Index L, const Matrix<T>& log_w, T* out, Index out_step,
                MasadWorkspace<T>& ws) {
  constexpr Index R = MasaKernelShape<T>::rows, P = MasaKernelShape<T>::width;
  const Index Lr = masa_round_up(L, R), Lp = masa_round_up(L, P), dvp = masa_round_up(dv, P);
  const Index lds = ws.logits.cols(), lda = ws.acc.cols(), ldk = ws.kt.cols();
  // The logit kernel reads whole blocks of rows: a line of whole blocks is read in place, a ragged
  // one is copied and padded with zero queries.
  const T* qq = q;
  Index ldq = q_step;
  if (Lr != L) {
    masa_copy_rows(q, q_step, L, dk, ws.q.data(), dk);
    std::fill(ws.q.data() + L * dk, ws.q.data() + Lr * dk, T(0));
    qq = ws.q.data();
    ldq = dk;
  }
  transpose_rows(k, k_step, L, dk, ws.kt.data(), ldk);
  T* s = ws.logits.data();
  // The padded log-weight columns are -inf, so padding logits are -inf: they never win the max and
  // weigh 0.
  using Pk = Eigen::Array<T, P, 1>;
  const T* lw = log_w.data();
  const Index ldl = log_w.cols();
  masa_logits_kernel<T>(
      qq, ldq, ws.kt.data(), ldk, dk,
      [lw, ldl](Index i, Index j0) { return Pk(Eigen::Map<const Pk>(lw + i * ldl + j0)); }, s, lds,
      Lr, L, ws.row_max.data());
  for (Index i = 0; i < L; ++i) {
    const T sum = masa_exp_sum(s + i * lds, Lp, ws.row_max(i));
    ws.inv_sum(i) = sum > T(0) ? T(1) / sum : T(0);  // 0 only if every logit were -inf
  }
  const T* vv = v;
  Index ldv = v_step;
  if (dvp != dv) {
    masa_copy_rows(v, v_step, L, dv, ws.v.data(), dvp);
    vv = ws.v.data();
    ldv = dvp;
  }
  // Rows past L hold finite logits of zero queries; their outputs are computed and dropped.
  masa_attend_kernel<T>(s, lds, vv, ldv, L, nullptr, ws.acc.data(), lda, Lr, dvp);
  for (Index i = 0; i < L; ++i) {
    const T* a = ws.acc.data() + i * lda;
    T* o = out + i * out_step;
    const T f = ws.inv_sum(i);
    for (Index c = 0; c < dv; ++c) o[c] = a[c] * f;
  }
}

/// Whether a line of L tokens goes through the fused kernels.
template <class T>
constexpr bool masad_fused_line(Index L) {
#if defined(RETENTION_MASAD_FUSED_LINES)
  return L <= MasadPacket<T>::max_line;
#else
  (void)L;
  return false;
#endif
}

/// The same line attention as masad_line through the fused kernels of masa_line_kernels.hpp, for
/// lines of at most MasadPacket<T>::max_line tokens. Queries are read in place (each is read once
/// per block of rows) unless the line is not whole row blocks; keys are transposed and values
/// copied into the line buffers first: the kernels sweep them once per block of rows, and read in
/// place at a grid's strides those sweeps would keep evicting each other from L1. The copy of v
/// also lets out alias v.
template <class T>
void masad_line_fused(const T* q, Index q_step, const T* k, Index k_step, Index dk, const T* v,
                      Index v_step, Index dv, Index L, const Matrix<T>& log_w, T* out,
                      Index out_step, MasadWorkspace<T>& ws) {
#if defined(RETENTION_MASAD_FUSED_LINES)
  constexpr Index R = MasaKernelShape<T>::rows, P = MasadPacket<T>::size;
  const Index Lr = masa_round_up(L, R), Lp = masa_round_up(L, P), dvp = masa_round_up(dv, P);
  const T* qq = q;
  Index ldq = q_step;
  if (Lr != L) {
    masa_copy_rows(q, q_step, L, dk, ws.q.data(), dk);
    std::fill(ws.q.data() + L * dk, ws.q.data() + Lr * dk, T(0));
    qq = ws.q.data();
    ldq = dk;
  }
  transpose_rows(k, k_step, L, dk, ws.kt.data(), ws.kt.cols());
  masa_copy_rows(v, v_step, L, dv, ws.v.data(), dvp);
  masad_softmax_line<T>(Lp / P, qq, ldq, dk, ws.kt.data(), ws.kt.cols(), log_w.data(), log_w.cols(),
                        ws.logits.data(), ws.logits.cols(), Lr, ws.inv_sum.data());
  // Rows past L hold finite logits of zero queries; their outputs are computed and dropped.
  masad_attend_line<T>(ws.logits.data(), ws.logits.cols(), ws.v.data(), dvp, L, ws.inv_sum.data(),
                       out, out_step, Lr, L, dv, dvp);
#else
  masad_line<T>(q, q_step, k, k_step, dk, v, v_step, dv, L, log_w, out, out_step, ws);
#endif
}

/// The [L, L] log-weight tile of one MaSAD axis, padded to [L rounded to row blocks, L rounded to
/// packets]: padding columns -inf (they must weigh 0 and never be a row's max), padding rows 0
/// (finite, dropped).
template <class T>
Matrix<T> masad_log_tile(const SymmetricDecay& axis, Index L) {
  Matrix<T> w = Matrix<T>::Zero(masa_round_up(L, MasaKernelShape<T>::rows),
                                masa_round_up(L, MasaKernelShape<T>::width));
  w.rightCols(w.cols() - L).setConstant(-std::numeric_limits<T>::infinity());
  axis.log_weights_into(0, 0, w.topLeftCorner(L, L));
  return w;
}

/// Where the operands of a MaSAD call live: image b's token n = y W + x has its row at q + (b N +
/// n) ldq (likewise k, v, out); head h's columns start at h dk in q and k, at h dv in v and out.
template <class T>
struct MasadGrid {
  const T* q = nullptr;
  const T* k = nullptr;
  const T* v = nullptr;
  T* out = nullptr;
  Index ldq = 0, ldk = 0, ldv = 0, ldo = 0;
  Index batch = 1, height = 0, width = 0, heads = 1, dk = 0, dv = 0;
};

/// Asks for `rows` rows of `cols` elements, `step` elements apart, to be brought into L2 (a line of
/// all heads is larger than L1).
template <class T>
void masad_prefetch_rows(const T* p, Index step, Index rows, Index cols) {
#if defined(__GNUC__) || defined(__clang__)
  constexpr Index line = static_cast<Index>(64 / sizeof(T));
  for (Index i = 0; i < rows; ++i) {
    const T* r = p + i * step;
    for (Index c = 0; c < cols; c += line) __builtin_prefetch(r + c, 0, 2);
    __builtin_prefetch(r + cols - 1, 0, 2);
  }
#else
  (void)p;
  (void)step;
  (void)rows;
  (void)cols;
#endif
}

/// MaSAD of every (image, head) of a grid (SPEC 4): for each image, every head's attention along
/// each grid row, writing u into out, then along each grid column, reading u from out and
/// overwriting it with the result. u lives in out itself: each line attention copies (fused) or
/// reads into its accumulators (tiled) all its values before it writes its own rows, and the lines
/// of one pass touch disjoint rows.
///
/// Threads take whole lines, each line for all heads of a head group in turn (all heads when
/// serial, half of them with a team): a line of a [.., heads * d] buffer is then one contiguous
/// block (a row line) or H blocks of heads * d (a column line), which the
/// hardware prefetchers stream and the TLB covers, where one head's line is a 256-byte piece of
/// every token's row (measured at 56 x 56, 8 heads, d = 64: a head at a time spent about a third
/// of its time waiting on those pieces). Each line's whole block is prefetched in one sequential
/// sweep before its first head: the kernels' own reads, a head at a time, leave the hardware
/// prefetchers too little to follow (the same measurement: 1.60 against 1.80 ms per head).
template <class T>
void masad_grid(const MasadGrid<T>& g, const std::vector<double>& gammas, int threads) {
  const Index H = g.height, W = g.width, N = H * W, heads = g.heads, dk = g.dk, dv = g.dv;
  std::vector<Matrix<T>> log_x, log_y;
  log_x.reserve(static_cast<std::size_t>(heads));
  log_y.reserve(static_cast<std::size_t>(heads));
  for (Index h = 0; h < heads; ++h) {
    const SymmetricDecay axis(gammas[static_cast<std::size_t>(h)]);
    log_x.push_back(masad_log_tile<T>(axis, W));
    log_y.push_back(masad_log_tile<T>(axis, H));
  }
  const auto line = [&](const T* q, Index q_step, const T* k, Index k_step, const T* v,
                        Index v_step, Index L, const Matrix<T>& log_w, T* o, Index o_step,
                        MasadWorkspace<T>& ws) {
    if (masad_fused_line<T>(L))
      masad_line_fused<T>(q, q_step, k, k_step, dk, v, v_step, dv, L, log_w, o, o_step, ws);
    else
      masad_line<T>(q, q_step, k, k_step, dk, v, v_step, dv, L, log_w, o, o_step, ws);
  };
  const double work = 2.0 * static_cast<double>(g.batch * heads * N) * static_cast<double>(H + W) *
                      static_cast<double>(dk + dv);
  const int team = masa_team_size(threads, g.batch * std::max(H, W), work);
  // Units of work: image b's heads [h0, h0 + group). With a team, two groups per image when there
  // are two heads or more, so that a thread that finishes one group's rows goes on to the next
  // group's rows instead of waiting for the last row line of the first (see the schedule below).
  const Index group = team > 1 && heads >= 2 ? (heads + 1) / 2 : heads;
  const Index groups = (heads + group - 1) / group;
  const Index units = g.batch * groups;
  const auto unit_heads = [&](Index u, Index& n_img, Index& h0, Index& h1) {
    n_img = (u / groups) * N;
    h0 = (u % groups) * group;
    h1 = std::min(heads, h0 + group);
  };
  // Grid row y of unit u: tokens [y W, y W + W), consecutive rows.
  const auto row = [&](Index u, Index y, MasadWorkspace<T>& ws) {
    Index n_img = 0, h0 = 0, h1 = 0;
    unit_heads(u, n_img, h0, h1);
    const Index n0 = n_img + y * W;
    masad_prefetch_rows(g.q + n0 * g.ldq + h0 * dk, g.ldq, W, (h1 - h0) * dk);
    masad_prefetch_rows(g.k + n0 * g.ldk + h0 * dk, g.ldk, W, (h1 - h0) * dk);
    masad_prefetch_rows(g.v + n0 * g.ldv + h0 * dv, g.ldv, W, (h1 - h0) * dv);
    for (Index h = h0; h < h1; ++h) {
      const std::size_t hs = static_cast<std::size_t>(h);
      line(g.q + n0 * g.ldq + h * dk, g.ldq, g.k + n0 * g.ldk + h * dk, g.ldk,
           g.v + n0 * g.ldv + h * dv, g.ldv, W, log_x[hs], g.out + n0 * g.ldo + h * dv, g.ldo, ws);
    }
  };
  // Grid column x of unit u: tokens x, x + W, ..., every W-th row; u is read from out.
  const auto column = [&](Index u, Index x, MasadWorkspace<T>& ws) {
    Index n_img = 0, h0 = 0, h1 = 0;
    unit_heads(u, n_img, h0, h1);
    const Index n0 = n_img + x;
    masad_prefetch_rows(g.q + n0 * g.ldq + h0 * dk, W * g.ldq, H, (h1 - h0) * dk);
    masad_prefetch_rows(g.k + n0 * g.ldk + h0 * dk, W * g.ldk, H, (h1 - h0) * dk);
    masad_prefetch_rows<T>(g.out + n0 * g.ldo + h0 * dv, W * g.ldo, H, (h1 - h0) * dv);
    for (Index h = h0; h < h1; ++h) {
      T* o = g.out + n0 * g.ldo + h * dv;
      line(g.q + n0 * g.ldq + h * dk, W * g.ldq, g.k + n0 * g.ldk + h * dk, W * g.ldk, o, W * g.ldo,
           H, log_y[static_cast<std::size_t>(h)], o, W * g.ldo, ws);
    }
  };
  // The schedule: phases rows(0), rows(1), columns(0), rows(2), columns(1), ..., columns(last),
  // each phase H row lines or W column lines. A unit's columns need all of its rows done; placed
  // one phase late, they find them done unless a thread holding one of those rows was held up
  // (on a shared machine, descheduled), and only then wait. A barrier between a rows pass and a
  // columns pass would wait at every call: the measured cost on a loaded 2-core machine was 2.5x.
  const Index phases = 2 * units;
  const auto phase_of = [&](Index p, Index& u, bool& is_row) {
    if (p == 0) {
      u = 0, is_row = true;
    } else if (p == phases - 1) {
      u = units - 1, is_row = false;
    } else {
      is_row = p % 2 == 1;
      u = is_row ? (p + 1) / 2 : p / 2 - 1;
    }
  };
  const auto make = [&] { return masad_workspace<T>(std::max(H, W), dk, dv); };
#if defined(_OPENMP)
  if (team > 1) {
    // Lines are handed out one at a time from one counter over all phases (tasks [0, H) of
    // phase 0, then phase 1, ...); rows_done[u] counts unit u's finished row lines.
    std::vector<Index> start(static_cast<std::size_t>(phases + 1), 0);
    for (Index p = 0; p < phases; ++p) {
      Index u = 0;
      bool is_row = false;
      phase_of(p, u, is_row);
      start[static_cast<std::size_t>(p + 1)] =
          start[static_cast<std::size_t>(p)] + (is_row ? H : W);
    }
    const Index tasks = start.back();
    std::atomic<Index> next{0};
    std::vector<std::atomic<Index>> rows_done(static_cast<std::size_t>(units));
    for (auto& d : rows_done) d.store(0, std::memory_order_relaxed);
#pragma omp parallel num_threads(team)
    {
      MasadWorkspace<T> ws = make();
      Index p = 0;
      for (Index t = next.fetch_add(1, std::memory_order_relaxed); t < tasks;
           t = next.fetch_add(1, std::memory_order_relaxed)) {
        while (start[static_cast<std::size_t>(p + 1)] <= t) ++p;  // tasks are taken in order
        Index u = 0;
        bool is_row = false;
        phase_of(p, u, is_row);
        const Index i = t - start[static_cast<std::size_t>(p)];
        if (is_row) {
          row(u, i, ws);
          rows_done[static_cast<std::size_t>(u)].fetch_add(1, std::memory_order_release);
        } else {
          while (rows_done[static_cast<std::size_t>(u)].load(std::memory_order_acquire) < H)
            std::this_thread::yield();
          column(u, i, ws);
        }
      }
    }
    return;
  }
#else
  (void)team;
#endif
  MasadWorkspace<T> ws = make();
  for (Index p = 0; p < phases; ++p) {
    Index u = 0;
    bool is_row = false;
    phase_of(p, u, is_row);
    if (is_row)
      for (Index y = 0; y < H; ++y) row(u, y, ws);
    else
      for (Index x = 0; x < W; ++x) column(u, x, ws);
  }
}

template <class T>
void masad_into_impl(const MasaConstRef<T>& Q, const MasaConstRef<T>& K, const MasaConstRef<T>& V,
                     double gamma, Index H, Index W, MasaMap<T> out, int threads) {
  MasadGrid<T> g;
  g.q = Q.data();
  g.k = K.data();
  g.v = V.data();
  g.out = out.data();
  g.ldq = Q.outerStride();
  g.ldk = K.outerStride();
  g.ldv = V.outerStride();
  g.ldo = out.outerStride();
  g.batch = 1;
  g.height = H;
  g.width = W;
  g.heads = 1;
  g.dk = Q.cols();
  g.dv = V.cols();
  masad_grid<T>(g, {gamma}, threads);
}

template <class DQ, class DK, class DV>
constexpr void assert_masa_types() {
  using T = typename DQ::Scalar;
  assert_scalar<T>();
  assert_same_scalar<T, typename DK::Scalar>();
  assert_same_scalar<T, typename DV::Scalar>();
}

/// Q [N, dk], K [N, dk], V [N, dv] with N = height * width.
template <class DQ, class DK, class DV>
void check_masa_inputs(const char* fn, const Eigen::MatrixBase<DQ>& Q,
                       const Eigen::MatrixBase<DK>& K, const Eigen::MatrixBase<DV>& V, Index height,
                       Index width) {
  const Index N = height * width;
  check_shape(fn, "Q", Q, N, -1);
  if (Q.cols() < 1)
    fail(fn, "Q is " + shape_string(Q.rows(), Q.cols()) + ", expected dk >= 1 columns");
  check_shape(fn, "K", K, N, Q.cols());
  check_shape(fn, "V", V, N, -1);
  if (V.cols() < 1)
    fail(fn, "V is " + shape_string(V.rows(), V.cols()) + ", expected dv >= 1 columns");
}

inline void check_grid_heads(const char* fn, const GridHeadsShape& s, std::size_t gammas) {
  check_positive(fn, "batch", s.batch);
  check_positive(fn, "height", s.height);
  check_positive(fn, "width", s.width);
  check_positive(fn, "heads", s.heads);
  check_positive(fn, "key_dim", s.key_dim);
  check_positive(fn, "value_dim", s.value_dim);
  if (static_cast<Index>(gammas) != s.heads)
    fail(fn, "gammas has " + std::to_string(gammas) +
                 " entries, expected heads = " + std::to_string(s.heads));
  if (s.qk_row_stride != 0 && s.qk_row_stride < s.heads * s.key_dim)
    fail(fn, "qk_row_stride " + std::to_string(s.qk_row_stride) + " is below heads * key_dim");
  if (s.v_row_stride != 0 && s.v_row_stride < s.heads * s.value_dim)
    fail(fn, "v_row_stride " + std::to_string(s.v_row_stride) + " is below heads * value_dim");
}

/// Runs per_head(Q, K, V, out, h) for every (image, head) pair of a [B, H, W, heads * d] buffer,
/// spread over OpenMP threads.
template <class T, class PerHead>
void masa_for_each_head(const T* q, const T* k, const T* v, T* out, const GridHeadsShape& s,
                        int threads, double work_per_head, PerHead per_head) {
  const Index N = s.height * s.width, heads = s.heads, dk = s.key_dim, dv = s.value_dim;
  const Index ldq = s.qk_row_stride > 0 ? s.qk_row_stride : heads * dk;
  const Index ldv = s.v_row_stride > 0 ? s.v_row_stride : heads * dv;
  const Index pairs = s.batch * heads;
  int team = 1;
#if defined(_OPENMP)
  // Waking a team costs microseconds (milliseconds on a loaded machine): not worth it for tiny
  // grids.
  if (!omp_in_parallel() && pairs > 1 && work_per_head * static_cast<double>(pairs) >= 1.0e6)
    team = static_cast<int>(std::min<Index>(threads > 0 ? threads : omp_get_max_threads(), pairs));
#else
  (void)threads;
  (void)work_per_head;
#endif
  (void)team;
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) num_threads(team) if (team > 1)
#endif
  for (Index pair = 0; pair < pairs; ++pair) {
    const Index b = pair / heads, h = pair % heads;
    const MasaConstMap<T> Q(q + b * N * ldq + h * dk, N, dk, Eigen::OuterStride<>(ldq));
    const MasaConstMap<T> K(k + b * N * ldq + h * dk, N, dk, Eigen::OuterStride<>(ldq));
    const MasaConstMap<T> V(v + b * N * ldv + h * dv, N, dv, Eigen::OuterStride<>(ldv));
    MasaMap<T> O(out + b * N * heads * dv + h * dv, N, dv, Eigen::OuterStride<>(heads * dv));
    per_head(Q, K, V, O, h);
  }
}

}  // namespace detail

/// MaSA of one head (SPEC 4; RMT eq. for MaSA with the decay added as ln D before the softmax):
/// O = softmax_row(Q K^T + L) V, L[n, m] = (|y_n - y_m| + |x_n - x_m|) ln gamma.
/// Q [N, dk], K [N, dk], V [N, dv] with rows in raster order n = y W + x, N = H W = decay.size();
/// returns O [N, dv]. Streams over [query_tile, key_tile] tiles with an online softmax: no [N, N]
/// matrix.
template <class DQ, class DK, class DV>
Matrix<typename DQ::Scalar> masa(const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                                 const Eigen::MatrixBase<DV>& V, const ManhattanDecay& decay,
                                 const MasaOptions& options = MasaOptions()) {
  using T = typename DQ::Scalar;
  detail::assert_masa_types<DQ, DK, DV>();
  detail::check_masa_inputs("masa", Q, K, V, decay.height(), decay.width());
  detail::check_masa_options<T>("masa", options);
  Matrix<T> out(Q.rows(), V.cols());
  detail::masa_into_impl<T>(
      Q, K, V, decay,
      detail::MasaMap<T>(out.data(), out.rows(), out.cols(), Eigen::OuterStride<>(out.cols())),
      options);
  return out;
}

/// MaSAD of one head (SPEC 4; RMT's decomposed MaSA): a softmax attention along each grid row,
/// u[y, x] = sum_x' softmax_x'(q[y,x] . k[y,x'] + |x - x'| ln gamma) v[y, x'], then along each
/// column, o[y, x] = sum_y' softmax_y'(q[y,x] . k[y',x] + |y - y'| ln gamma) u[y', x], reusing q
/// and k. Q [N, dk], K [N, dk], V [N, dv], N = height * width in raster order; returns O [N, dv].
/// Cost O(N (H + W)) against MaSA's O(N^2).
template <class DQ, class DK, class DV>
Matrix<typename DQ::Scalar> masad(const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                                  const Eigen::MatrixBase<DV>& V, double gamma, Index height,
                                  Index width, const MasaOptions& options = MasaOptions()) {
  using T = typename DQ::Scalar;
  detail::assert_masa_types<DQ, DK, DV>();
  detail::check_gamma("masad", gamma);
  detail::check_positive("masad", "height", height);
  detail::check_positive("masad", "width", width);
  detail::check_masa_inputs("masad", Q, K, V, height, width);
  Matrix<T> out(Q.rows(), V.cols());
  detail::masad_into_impl<T>(
      Q, K, V, gamma, height, width,
      detail::MasaMap<T>(out.data(), out.rows(), out.cols(), Eigen::OuterStride<>(out.cols())),
      options.threads);
  return out;
}

/// MaSAD with the gamma and grid of a Manhattan mask (see the gamma overload).
template <class DQ, class DK, class DV>
Matrix<typename DQ::Scalar> masad(const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                                  const Eigen::MatrixBase<DV>& V, const ManhattanDecay& decay,
                                  const MasaOptions& options = MasaOptions()) {
  return masad(Q, K, V, decay.gamma(), decay.height(), decay.width(), options);
}

/// Multi-head MaSA over a batch of grids: q, k [B, H, W, heads * dk], v [B, H, W, heads * dv]
/// row-major, writes out [B, H, W, heads * dv]; head h uses ManhattanDecay(gammas[h], H, W). Each
/// (image, head) pair runs masa on strided views (no copies of q, k, v); pairs are spread over
/// OpenMP threads.
template <class T>
void multi_head_masa(const T* q, const T* k, const T* v, T* out, const GridHeadsShape& shape,
                     const std::vector<double>& gammas,
                     const MasaOptions& options = MasaOptions()) {
  detail::assert_scalar<T>();
  const char* fn = "multi_head_masa";
  if (!q || !k || !v || !out) detail::fail(fn, "null buffer pointer");
  detail::check_grid_heads(fn, shape, gammas.size());
  for (double g : gammas) detail::check_gamma(fn, g);
  detail::check_masa_options<T>(fn, options);
  const double n = static_cast<double>(shape.height * shape.width);
  const double work = 2.0 * n * n * static_cast<double>(shape.key_dim + shape.value_dim);
  detail::masa_for_each_head(q, k, v, out, shape, options.threads, work,
                             [&](const detail::MasaConstMap<T>& Q, const detail::MasaConstMap<T>& K,
                                 const detail::MasaConstMap<T>& V, detail::MasaMap<T>& O, Index h) {
                               const ManhattanDecay decay(gammas[static_cast<std::size_t>(h)],
                                                          shape.height, shape.width);
                               detail::masa_into_impl<T>(Q, K, V, decay, O, options);
                             });
}

/// Multi-head MaSAD over a batch of grids, same layout as multi_head_masa; head h uses gammas[h].
template <class T>
void multi_head_masad(const T* q, const T* k, const T* v, T* out, const GridHeadsShape& shape,
                      const std::vector<double>& gammas,
                      const MasaOptions& options = MasaOptions()) {
  detail::assert_scalar<T>();
  const char* fn = "multi_head_masad";
  if (!q || !k || !v || !out) detail::fail(fn, "null buffer pointer");
  detail::check_grid_heads(fn, shape, gammas.size());
  for (double g : gammas) detail::check_gamma(fn, g);
  const GridHeadsShape& s = shape;
  detail::MasadGrid<T> g;
  g.q = q;
  g.k = k;
  g.v = v;
  g.out = out;
  g.ldq = g.ldk = s.qk_row_stride > 0 ? s.qk_row_stride : s.heads * s.key_dim;
  g.ldv = s.v_row_stride > 0 ? s.v_row_stride : s.heads * s.value_dim;
  g.ldo = s.heads * s.value_dim;
  g.batch = s.batch;
  g.height = s.height;
  g.width = s.width;
  g.heads = s.heads;
  g.dk = s.key_dim;
  g.dv = s.value_dim;
  detail::masad_grid<T>(g, gammas, options.threads);
}

namespace detail {

/// The Matrix overloads of multi_head_masa / multi_head_masad: checks dense [B*H*W, heads*d]
/// operands, then runs `run(q, k, v, out, dense_shape)` on their buffers.
template <class T, class Run>
Matrix<T> multi_head_grid_dense(const char* fn, const Matrix<T>& q, const Matrix<T>& k,
                                const Matrix<T>& v, const GridHeadsShape& shape, Run run) {
  const Index rows = shape.batch * shape.height * shape.width;
  check_shape(fn, "q", q, rows, shape.heads * shape.key_dim);
  check_shape(fn, "k", k, rows, shape.heads * shape.key_dim);
  check_shape(fn, "v", v, rows, shape.heads * shape.value_dim);
  Matrix<T> out(rows, shape.heads * shape.value_dim);
  GridHeadsShape dense = shape;
  dense.qk_row_stride = dense.v_row_stride = 0;
  run(q.data(), k.data(), v.data(), out.data(), dense);
  return out;
}

}  // namespace detail

/// Matrix overloads: q, k [B*H*W, heads*dk], v [B*H*W, heads*dv] row-major (dense: the shape's row
/// strides are ignored); returns [B*H*W, heads*dv].
template <class T>
Matrix<T> multi_head_masa(const Matrix<T>& q, const Matrix<T>& k, const Matrix<T>& v,
                          const GridHeadsShape& shape, const std::vector<double>& gammas,
                          const MasaOptions& options = MasaOptions()) {
  return detail::multi_head_grid_dense(
      "multi_head_masa", q, k, v, shape,
      [&](const T* qp, const T* kp, const T* vp, T* op, const GridHeadsShape& dense) {
        multi_head_masa(qp, kp, vp, op, dense, gammas, options);
      });
}

template <class T>
Matrix<T> multi_head_masad(const Matrix<T>& q, const Matrix<T>& k, const Matrix<T>& v,
                           const GridHeadsShape& shape, const std::vector<double>& gammas,
                           const MasaOptions& options = MasaOptions()) {
  return detail::multi_head_grid_dense(
      "multi_head_masad", q, k, v, shape,
      [&](const T* qp, const T* kp, const T* vp, T* op, const GridHeadsShape& dense) {
        multi_head_masad(qp, kp, vp, op, dense, gammas, options);
      });
}

}  // namespace retention
