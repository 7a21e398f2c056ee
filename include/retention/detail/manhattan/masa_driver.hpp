// retention::detail: the MaSA tile driver (docs/math.md §4): for each query tile, logits + ln D by
// the tile kernels, an online softmax over key tiles (running row max and sum), P V accumulated;
// extra memory O(N d + tile), never [N, N]. Any separable 2-D mask (ManhattanDecay,
// QuadrantCausalDecay) supplies ln D through its two axis masks.
#pragma once

#include <retention/core.hpp>
#include <retention/decay.hpp>
#include <retention/detail/manhattan/careful_rows.hpp>
#include <retention/detail/manhattan/tile_kernels.hpp>
#include <retention/detail/scratch.hpp>
#include <retention/detail/simd/dispatch.hpp>
#include <retention/detail/threading.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace retention {

/// Tiling and threading of masa / masad. Any tile sizes >= 1 give the same result up to rounding.
struct MasaOptions {
  /// Queries per tile (rows of the logit tile).
  Index query_tile = 64;
  /// Keys per tile (columns of the logit tile); a tile of logits is query_tile x key_tile values.
  Index key_tile = 256;
  /// Threads for a single-head call made outside a parallel region; 0 = OpenMP's default,
  /// 1 = serial; capped by the work (detail/threading.hpp).
  int threads = 0;
};

namespace detail {

template <class T>
using MasaMap = Eigen::Map<Matrix<T>, 0, Eigen::OuterStride<>>;

/// ln D of a stationary 1-D axis mask (D depends on n - m only, as causal and symmetric masks do)
/// at signed offset s = n - m, read from the axis' own [L, L] log tile.
template <class T>
T axis_log_weight(const Matrix<T>& tile, Index s) {
  return s >= 0 ? tile(s, 0) : tile(0, -s);
}

/// KeptMatrices' tag of MaSA's operands laid out for the tile kernels (slots: Q copied with zero
/// rows past N (whole row blocks), K transposed with zero columns past N (key tiles in whole
/// vectors), V with its columns padded to simd::max_lanes<T> when dv needs it, and the two ln D
/// tables of masa_log_tables). Kept by the thread: allocated per call, they were large enough for
/// the allocator to return them, and every call faulted their pages in again.
struct MasaOperandsScratch {};

/// What every query tile of one MaSA call reads, as plain pointers and sizes (the dispatched
/// kernel takes nothing else).
template <class T>
struct MasaTileJob {
  const T* q = nullptr;  // [N + rows, dk] dense
  const T* kt = nullptr;
  const T* v = nullptr;
  const T* log_x = nullptr;
  const T* log_y = nullptr;
  T* out = nullptr;
  T* lse = nullptr;  // the training forward's log-sum-exp rows, lse_step apart (or nullptr)
  Index dk = 0, dv = 0, ldk = 0, ldv = 0, ldx = 0, ldy = 0, ldo = 0, lse_step = 0;
  Index N = 0, height = 0, width = 0, key_tile = 0;
};

/// Per-thread buffers of MaSA's query tiles.
template <class T>
struct MasaWorkspace {
  Matrix<T> logits;  // [query rows, key columns] padded, then the tile's probabilities
  Matrix<T> acc;     // [query rows, dvp] unnormalised output
  Vector<T> row_max, row_sum, rescale, tile_max;
  std::vector<const T*> lx_rows,
      ly_rows;  // per query row: where its ln D terms start in the tables
};

/// MasaWorkspace's buffers as plain pointers, for the dispatched kernel.
template <class T>
struct MasaTileBuffers {
  T* s = nullptr;
  T* acc = nullptr;
  T* row_max = nullptr;
  T* row_sum = nullptr;
  T* rescale = nullptr;
  T* tile_max = nullptr;
  const T** lx_rows = nullptr;
  const T** ly_rows = nullptr;
  Index lds = 0, lda = 0;
};

/// One query tile [n0, n0 + rows) of MaSA, written to out rows [n0, n0 + rows): for each key tile,
/// logits + ln D by the logit kernel (ln D as its initial value, the tile's row max on the way
/// out), online softmax (running row max and sum), then acc = rescale * acc + P V by the attend
/// kernel; with job->lse, also lse = row max + log(row sum). Called through simd::dispatch once per
/// query tile.
struct MasaQueryTileKernel {
  template <class Isa, class T>
  static void run(const MasaTileJob<T>* job, const MasaTileBuffers<T>* ws, Index n0, Index rows) {
    constexpr Index R = simd::layout_rows, N = simd::lanes<T, Isa>;
    const MasaTileJob<T>& j = *job;
    const Index rows_r = masa_round_up(rows, R), lds = ws->lds, lda = ws->lda;
    T* s = ws->s;
    const T neg_inf = -std::numeric_limits<T>::infinity();
    for (Index i = 0; i < rows_r; ++i) {
      ws->row_max[i] = neg_inf;
      ws->row_sum[i] = T(0);
    }
    for (Index m0 = 0; m0 < j.N; m0 += j.key_tile) {
      const Index cols = std::min(j.key_tile, j.N - m0), a = m0 / j.width, b = m0 % j.width;
      for (Index i = 0; i < rows_r; ++i) {
        // Rows past the tile's end (the kernel works in whole row blocks) reuse the last row's
        // terms.
        const Index n = n0 + std::min(i, rows - 1), yn = n / j.width, xn = n % j.width;
        ws->lx_rows[i] = j.log_x + xn * j.ldx + b;
        ws->ly_rows[i] = j.log_y + (yn - a + j.height - 1) * j.ldy + b;
      }
      masa_logits_isa<Isa>(j.q + n0 * j.dk, j.dk, j.kt + m0, j.ldk, j.dk, ws->lx_rows, ws->ly_rows,
                           s, lds, rows_r, cols, ws->tile_max);
      const Index cols_n = masa_round_up(cols, N);
      for (Index i = 0; i < rows; ++i) {
        T* s_row = s + i * lds;
        // Online softmax: rescale what was accumulated under the old max (folded into the attend
        // kernel's load). The new max is taken first, so exp never overflows; exp(-inf) = 0 on the
        // first tile.
        const T m_new = std::max(ws->row_max[i], ws->tile_max[i]);
        if (m_new == neg_inf) {  // every key so far masked out: weights 0, not NaN
          std::fill(s_row, s_row + cols_n, T(0));
          ws->rescale[i] = T(1);
          continue;
        }
        ws->rescale[i] = std::exp(ws->row_max[i] - m_new);
        ws->row_sum[i] =
            ws->row_sum[i] * ws->rescale[i] + masa_exp_sum_isa<Isa>(s_row, cols_n, m_new);
        ws->row_max[i] = m_new;
      }
      // Rows past the tile's end belong to no query: keep them finite and zero.
      for (Index i = rows; i < rows_r; ++i) {
        std::fill(s + i * lds, s + i * lds + cols, T(0));
        ws->rescale[i] = T(0);
      }
      masa_attend_isa<Isa>(s, lds, j.v + m0 * j.ldv, j.ldv, cols,
                           m0 == 0 ? static_cast<const T*>(nullptr) : ws->rescale, ws->acc, lda,
                           rows_r, j.dv);
    }
    for (Index i = 0; i < rows; ++i) {
      const T* a = ws->acc + i * lda;
      T* o = j.out + (n0 + i) * j.ldo;
      const T sum = ws->row_sum[i];
      for (Index c = 0; c < j.dv; ++c) o[c] = a[c] / sum;
      if (j.lse)
        j.lse[(n0 + i) * j.lse_step] = sum == T(0) ? neg_inf : ws->row_max[i] + std::log(sum);
    }
  }
};

/// The careful path of docs/math.md §2.6 ("masked entries are skipped or selected, never
/// multiplied away"), taken only when some input holds an Inf or NaN: for each query n < rows, a
/// softmax over the keys m < keys whose log-weight log_weight(n, m) is > -inf, in double with
/// std::exp. A masked key is skipped (never a logit -inf + q.k nor a term 0 * v), so a bad key or
/// value reaches only the queries that weigh it; a NaN logit makes its row NaN (the max propagates
/// it), as +-Inf logits give whatever IEEE arithmetic gives, identically for float and double.
/// q [rows, dk], k [keys, dk], v [keys, dv] at row strides ldq, ldk, ldv; out [rows, dv] at ldo
/// may alias v (everything is copied before the first write). With lse != nullptr, also lse[n *
/// lse_step] = log sum_m exp(logit[n, m]). A row whose keys are all masked gets 0 and lse -inf.
/// Never inlined: inlined into MaSAD's line functions, this rare path slowed their finite case.
template <class T, class LogWeight>
EIGEN_DONT_INLINE void masa_careful_rows(const T* q, Index ldq, const T* k, Index ldk, const T* v,
                                         Index ldv, Index rows, Index keys, Index dk, Index dv,
                                         const LogWeight& log_weight, T* out, Index ldo,
                                         T* lse = nullptr, Index lse_step = 0) {
  using A = double;
  using Strided = Eigen::Map<const Matrix<T>, 0, Eigen::OuterStride<>>;
  const Matrix<A> qd = Strided(q, rows, dk, Eigen::OuterStride<>(ldq)).template cast<A>();
  const Matrix<A> kd = Strided(k, keys, dk, Eigen::OuterStride<>(ldk)).template cast<A>();
  const Matrix<A> vd = Strided(v, keys, dv, Eigen::OuterStride<>(ldv)).template cast<A>();
  std::vector<A> logit(static_cast<std::size_t>(keys));
  std::vector<Index> key(static_cast<std::size_t>(keys));
  Eigen::Matrix<A, 1, Eigen::Dynamic> acc(dv);
  for (Index n = 0; n < rows; ++n) {
    A mx;
    const std::size_t seen =
        careful_row_logits(qd, kd, n, keys, log_weight, logit.data(), key.data(), mx);
    T* o = out + n * ldo;
    if (seen == 0) {
      std::fill(o, o + dv, T(0));
      if (lse) lse[n * lse_step] = -std::numeric_limits<T>::infinity();
      continue;
    }
    A sum = 0;
    acc.setZero();
    for (std::size_t i = 0; i < seen; ++i) {
      const A p = std::exp(logit[i] - mx);
      sum += p;
      acc += p * vd.row(key[i]);
    }
    for (Index c = 0; c < dv; ++c) o[c] = static_cast<T>(acc(c) / sum);
    if (lse) lse[n * lse_step] = static_cast<T>(mx + std::log(sum));
  }
}

/// MaSA of one head by the careful path (masa_careful_rows over the whole grid), ln D from the
/// mask's axis tables in double. Shapes as masa_careful_rows with rows = keys = H W.
template <class T, class Mask2D>
void masa_careful(const T* q, Index ldq, const T* k, Index ldk, const T* v, Index ldv, Index dk,
                  Index dv, const Mask2D& mask, T* out, Index ldo, T* lse = nullptr,
                  Index lse_step = 0) {
  const Index H = mask.height(), W = mask.width();
  const Matrix<double> ly = mask.row_axis().template log_weights<double>(0, H, 0, H);
  const Matrix<double> lx = mask.column_axis().template log_weights<double>(0, W, 0, W);
  masa_careful_rows<T>(
      q, ldq, k, ldk, v, ldv, H * W, H * W, dk, dv,
      [&](Index n, Index m) { return ly(n / W, m / W) + lx(n % W, m % W); }, out, ldo, lse,
      lse_step);
}

/// MaSA's ln D tables for key tiles of up to key_tile columns, from the mask's own axis tiles (no
/// gamma formula here). ln D of a key tile starting at m0 = a W + b as two small periodic tables
/// (a separable mask, docs/math.md §1): ln D[n, m0 + j] = log_x(x_n, b + j) + log_y(y_n - a + H -
/// 1, b + j), with log_x[x][c] = ln D_x(x, c mod W)  [W, W + key columns] and log_y[dy + H - 1][c]
/// = ln D_y(dy - floor(c / W))  [2H - 1, W + key columns]: O(H (W + key_tile)) values instead of a
/// [query_tile, key_tile] tile rebuilt for every pair of tiles.
template <class T, class Mask2D>
void masa_log_tables(const Mask2D& decay, Index key_tile, Matrix<T>& log_x, Matrix<T>& log_y) {
  const Index H = decay.height(), W = decay.width();
  const Index span = W + masa_round_up(key_tile, simd::max_lanes<T>);
  const Matrix<T> lx = decay.column_axis().template log_weights<T>(0, W, 0, W);
  const Matrix<T> ly = decay.row_axis().template log_weights<T>(0, H, 0, H);
  log_x.resize(W, span);
  for (Index x = 0; x < W; ++x)
    for (Index c = 0; c < span; ++c) log_x(x, c) = lx(x, c % W);
  log_y.resize(2 * H - 1, span);
  for (Index dy = -(H - 1); dy < H; ++dy)
    for (Index c = 0; c < span; ++c) {
      // Signed row offset dy - c / W; past the grid (c / W >= H) the value is never used
      // unmasked, so it is clamped into the table.
      const Index s = std::max<Index>(std::min<Index>(dy - c / W, H - 1), -(H - 1));
      log_y(dy + H - 1, c) = axis_log_weight(ly, s);
    }
}

/// Whether MaSA's fast kernels may run on Q, K, V: all finite (an O(N d) scan against the
/// O(N^2 d) attention). A bad q only reaches its own row there, but the scan covers it too so that
/// one path, the same for float and double, defines every output that depends on a bad token.
template <class T>
bool masa_inputs_finite(const T* q, Index ldq, const T* k, Index ldk, const T* v, Index ldv,
                        Index N, Index dk, Index dv) {
  return masa_rows_finite(q, ldq, N, dk) && masa_rows_finite(k, ldk, N, dk) &&
         masa_rows_finite(v, ldv, N, dv);
}

/// MaSA of one head by the tiles (masa_careful when an input holds an Inf or NaN); with lse !=
/// nullptr also the rows' log-sum-exp, lse_step apart (the training forward).
template <class T, class Mask2D>
void masa_into_impl(const ConstRows<T>& Q, const ConstRows<T>& K, const ConstRows<T>& V,
                    const Mask2D& decay, MasaMap<T> out, const MasaOptions& options,
                    T* lse = nullptr, Index lse_step = 0) {
  constexpr Index R = simd::layout_rows, P = simd::max_lanes<T>;
  const Index N = Q.rows(), dk = Q.cols(), dv = V.cols();
  const Index H = decay.height(), W = decay.width();
  if (!masa_inputs_finite(Q.data(), Q.outerStride(), K.data(), K.outerStride(), V.data(),
                          V.outerStride(), N, dk, dv)) {
    masa_careful<T>(Q.data(), Q.outerStride(), K.data(), K.outerStride(), V.data(), V.outerStride(),
                    dk, dv, decay, out.data(), out.outerStride(), lse, lse_step);
    return;
  }
  const Index bq = std::min(options.query_tile, N), bk = std::min(options.key_tile, N);
  KeptMatrices<T, MasaOperandsScratch, 5> kept;
  Matrix<T>& log_x = kept.matrix(3, 1, 1);
  Matrix<T>& log_y = kept.matrix(4, 1, 1);
  masa_log_tables<T>(decay, bk, log_x, log_y);
  Matrix<T>& q = kept.matrix(0, N + R, dk);
  masa_copy_rows(Q.data(), Q.outerStride(), N, dk, q.data(), dk);
  q.bottomRows(R).setZero();
  Matrix<T>& kt = kept.matrix(1, dk, N + P);
  transpose_rows(K.data(), K.outerStride(), N, dk, kt.data(), N + P);
  const Index dvp = masa_round_up(dv, P);
  const T* v_data = V.data();  // V is read in place when its rows are whole vectors
  Index ldv = V.outerStride();
  if (dvp != dv) {
    Matrix<T>& v = kept.matrix(2, N, dvp);
    masa_copy_rows(V.data(), V.outerStride(), N, dv, v.data(), dvp);
    v_data = v.data();
    ldv = dvp;
  }
  MasaTileJob<T> job;
  job.q = q.data();
  job.kt = kt.data();
  job.v = v_data;
  job.log_x = log_x.data();
  job.log_y = log_y.data();
  job.out = out.data();
  job.lse = lse;
  job.lse_step = lse_step;
  job.dk = dk;
  job.dv = dv;
  job.ldk = kt.cols();
  job.ldv = ldv;
  job.ldx = log_x.cols();
  job.ldy = log_y.cols();
  job.ldo = out.outerStride();
  job.N = N;
  job.height = H;
  job.width = W;
  job.key_tile = bk;
  const Index tiles = (N + bq - 1) / bq;
  const double work =
      2.0 * static_cast<double>(N) * static_cast<double>(N) * static_cast<double>(dk + dv);
  const Team team = plan_team(options.threads, tiles, work);
  for_each_with_workspace(
      team, tiles,
      [&]() {
        const Index bqr = masa_round_up(bq, R);
        MasaWorkspace<T> ws;
        ws.logits.resize(bqr, masa_round_up(bk, P));
        ws.acc.resize(bqr, dvp);
        ws.row_max.resize(bqr);
        ws.row_sum.resize(bqr);
        ws.rescale.resize(bqr);
        ws.tile_max.resize(bqr);
        ws.lx_rows.resize(static_cast<std::size_t>(bqr));
        ws.ly_rows.resize(static_cast<std::size_t>(bqr));
        return ws;
      },
      [&](Index t, MasaWorkspace<T>& ws) {
        MasaTileBuffers<T> b;
        b.s = ws.logits.data();
        b.acc = ws.acc.data();
        b.row_max = ws.row_max.data();
        b.row_sum = ws.row_sum.data();
        b.rescale = ws.rescale.data();
        b.tile_max = ws.tile_max.data();
        b.lx_rows = ws.lx_rows.data();
        b.ly_rows = ws.ly_rows.data();
        b.lds = ws.logits.cols();
        b.lda = ws.acc.cols();
        const Index n0 = t * bq;
        simd::dispatch<MasaQueryTileKernel>(&job, static_cast<const MasaTileBuffers<T>*>(&b), n0,
                                            std::min(bq, N - n0));
      });
}

}  // namespace detail
}  // namespace retention

#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
