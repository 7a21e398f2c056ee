// retention: RMT's Manhattan self-attention (MaSA) and its decomposed form (MaSAD), SPEC section 4.
//
// MaSA streams over key tiles with an online softmax (running row max and row sum), so it holds
// one [query_tile, key_tile] logit tile per thread and never the [N, N] score matrix. MaSAD runs a
// small softmax attention along every grid row, then along every grid column. Neither knows a gamma
// formula: log-weights come from the decay masks of decay.hpp.
#pragma once

#include <retention/common.hpp>
#include <retention/decay.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
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

/// Sizes of a multi-head MaSA / MaSAD call: q and k are row-major [batch, height, width, heads * key_dim],
/// v and the output [batch, height, width, heads * value_dim] (what a Linear over the tokens produces).
struct GridHeadsShape {
  Index batch = 1;
  Index height = 0;
  Index width = 0;
  Index heads = 1;
  Index key_dim = 0;
  Index value_dim = 0;
  /// Distance in elements between consecutive tokens' rows of q and k, and of v; 0 means dense
  /// (heads * key_dim, heads * value_dim). Lets q, k, v be column blocks of one fused [.., q | k | v] buffer.
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
struct MasaWorkspace {
  Matrix<T> logits;  // [query_tile, key_tile], then the tile's probabilities
  Matrix<T> acc;     // [query_tile, dv] unnormalised output
  Vector<T> row_max, row_sum;
};

/// One query tile [n0, n0 + rows) of MaSA, written to out.middleRows(n0, rows).
/// log_y [H, H] and log_x [W, W] are the per-axis log-weights: ln D[n, m] = log_y(y_n, y_m) + log_x(x_n, x_m)
/// (Manhattan = symmetric_H (x) symmetric_W, SPEC 1), which fills a tile row by contiguous runs of x.
template <class T>
void masa_query_tile(const MasaConstRef<T>& Q, const MasaConstRef<T>& K, const MasaConstRef<T>& V,
                     const Matrix<T>& log_y, const Matrix<T>& log_x, Index width, Index key_tile, Index n0,
                     Index rows, MasaWorkspace<T>& ws, MasaMap<T>& out) {
  const Index N = K.rows();
  const T neg_inf = -std::numeric_limits<T>::infinity();
  ws.row_max.head(rows).setConstant(neg_inf);
  ws.row_sum.head(rows).setZero();
  ws.acc.topRows(rows).setZero();
  const auto q_tile = Q.middleRows(n0, rows);
  for (Index m0 = 0; m0 < N; m0 += key_tile) {
    const Index cols = std::min(key_tile, N - m0);
    auto s = ws.logits.topLeftCorner(rows, cols);
    s.noalias() = q_tile * K.middleRows(m0, cols).transpose();
    for (Index i = 0; i < rows; ++i) {
      const Index n = n0 + i, yn = n / width, xn = n % width;
      auto s_row = s.row(i);
      // Add ln D one grid-row run at a time: within a run only x changes.
      for (Index m = m0; m < m0 + cols;) {
        const Index ym = m / width, xa = m % width;
        const Index len = std::min(width - xa, m0 + cols - m);
        s_row.segment(m - m0, len).array() += log_x.row(xn).segment(xa, len).array() + log_y(yn, ym);
        m += len;
      }
      // Online softmax: rescale what was accumulated under the old max. The max is finite
      // (ln D is finite for a Manhattan mask), so exp never sees inf - inf.
      const T m_new = std::max(ws.row_max(i), s_row.maxCoeff());
      if (m_new == neg_inf) {  // every key so far masked out (ln D = -inf): weights 0, not exp(nan)
        s_row.setZero();
        continue;
      }
      const T rescale = std::exp(ws.row_max(i) - m_new);  // exp(-inf) = 0 on the first tile
      s_row.array() = (s_row.array() - m_new).exp();
      ws.row_sum(i) = ws.row_sum(i) * rescale + s_row.sum();
      ws.row_max(i) = m_new;
      if (rescale != T(1)) ws.acc.row(i) *= rescale;
    }
    ws.acc.topRows(rows).noalias() += s * V.middleRows(m0, cols);
  }
  for (Index i = 0; i < rows; ++i) out.row(n0 + i) = ws.acc.row(i) / ws.row_sum(i);
}

template <class T>
void check_masa_options(const char* fn, const MasaOptions& options) {
  check_positive(fn, "query_tile", options.query_tile);
  check_positive(fn, "key_tile", options.key_tile);
}

template <class T>
void masa_into_impl(const MasaConstRef<T>& Q, const MasaConstRef<T>& K, const MasaConstRef<T>& V,
                    const ManhattanDecay& decay, MasaMap<T> out, const MasaOptions& options) {
  const Index N = Q.rows(), dv = V.cols();
  const Index H = decay.height(), W = decay.width();
  const Matrix<T> log_y = decay.row_axis().template log_weights<T>(0, H, 0, H);
  const Matrix<T> log_x = decay.column_axis().template log_weights<T>(0, W, 0, W);
  const Index bq = std::min(options.query_tile, N), bk = std::min(options.key_tile, N);
  const Index tiles = (N + bq - 1) / bq;
  const double work = 2.0 * static_cast<double>(N) * static_cast<double>(N) *
                      static_cast<double>(Q.cols() + dv);
  const int team = masa_team_size(options.threads, tiles, work);
  masa_for_each(
      team, tiles,
      [&]() {
        MasaWorkspace<T> ws;
        ws.logits.resize(bq, bk);
        ws.acc.resize(bq, dv);
        ws.row_max.resize(bq);
        ws.row_sum.resize(bq);
        return ws;
      },
      [&](Index t, MasaWorkspace<T>& ws) {
        const Index n0 = t * bq;
        masa_query_tile<T>(Q, K, V, log_y, log_x, W, bk, n0, std::min(bq, N - n0), ws, out);
      });
}

/// dst = a * b. Eigen's GEMM pays a fixed packing cost per call that dominates MaSAD's per-row products
/// on short axes (measured: 3x slower at 7 x 7 x 32, even at 14); the coefficient-based product wins there.
template <class Dst, class A, class B>
void masad_product(Dst&& dst, const A& a, const B& b) {
  if (a.rows() <= 16)
    dst.noalias() = a.lazyProduct(b);
  else
    dst.noalias() = a * b;
}

/// In-place row softmax of s + log_w (s [r, c], log_w [r, c]), then out = softmax * values.
template <class T, class S, class L, class Vals, class Out>
void masad_softmax_attend(S& s, const L& log_w, const Vals& values, Out&& out) {
  s += log_w;
  for (Index i = 0; i < s.rows(); ++i) {
    auto row = s.row(i);
    const T mx = row.maxCoeff();
    row.array() = (row.array() - mx).exp();
    row /= row.sum();
  }
  masad_product(out, s, values);
}

template <class T>
struct MasadWorkspace {
  Matrix<T> logits;  // [max(H, W), max(H, W)]
};

template <class T>
void masad_into_impl(const MasaConstRef<T>& Q, const MasaConstRef<T>& K, const MasaConstRef<T>& V,
                     double gamma, Index H, Index W, MasaMap<T> out, int threads) {
  const Index dk = Q.cols(), dv = V.cols();
  const SymmetricDecay axis(gamma);
  const Matrix<T> log_x = axis.template log_weights<T>(0, W, 0, W);
  const Matrix<T> log_y = axis.template log_weights<T>(0, H, 0, H);
  // u: the row pass's output, read by the column pass (the one intermediate MaSAD needs).
  Matrix<T> u(H * W, dv);
  const Index side = std::max(H, W);
  const auto make = [&]() {
    MasadWorkspace<T> ws;
    ws.logits.resize(side, side);
    return ws;
  };
  const double work = 2.0 * static_cast<double>(H * W) * static_cast<double>(H + W) *
                      static_cast<double>(dk + dv);
  // Row pass: grid row y holds the contiguous tokens [y W, y W + W).
  masa_for_each(masa_team_size(threads, H, work), H, make, [&](Index y, MasadWorkspace<T>& ws) {
    auto s = ws.logits.topLeftCorner(W, W);
    masad_product(s, Q.middleRows(y * W, W), K.middleRows(y * W, W).transpose());
    masad_softmax_attend<T>(s, log_x, V.middleRows(y * W, W), u.middleRows(y * W, W));
  });
  // Column pass: grid column x is every W-th token; strided maps avoid gathering it.
  masa_for_each(masa_team_size(threads, W, work), W, make, [&](Index x, MasadWorkspace<T>& ws) {
    const MasaConstMap<T> qx(Q.data() + x * Q.outerStride(), H, dk, Eigen::OuterStride<>(W * Q.outerStride()));
    const MasaConstMap<T> kx(K.data() + x * K.outerStride(), H, dk, Eigen::OuterStride<>(W * K.outerStride()));
    const MasaConstMap<T> ux(u.data() + x * dv, H, dv, Eigen::OuterStride<>(W * dv));
    MasaMap<T> ox(out.data() + x * out.outerStride(), H, dv, Eigen::OuterStride<>(W * out.outerStride()));
    auto s = ws.logits.topLeftCorner(H, H);
    masad_product(s, qx, kx.transpose());
    masad_softmax_attend<T>(s, log_y, ux, ox);
  });
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
void check_masa_inputs(const char* fn, const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                       const Eigen::MatrixBase<DV>& V, Index height, Index width) {
  const Index N = height * width;
  check_shape(fn, "Q", Q, N, -1);
  if (Q.cols() < 1) fail(fn, "Q is " + shape_string(Q.rows(), Q.cols()) + ", expected dk >= 1 columns");
  check_shape(fn, "K", K, N, Q.cols());
  check_shape(fn, "V", V, N, -1);
  if (V.cols() < 1) fail(fn, "V is " + shape_string(V.rows(), V.cols()) + ", expected dv >= 1 columns");
}

inline void check_grid_heads(const char* fn, const GridHeadsShape& s, std::size_t gammas) {
  check_positive(fn, "batch", s.batch);
  check_positive(fn, "height", s.height);
  check_positive(fn, "width", s.width);
  check_positive(fn, "heads", s.heads);
  check_positive(fn, "key_dim", s.key_dim);
  check_positive(fn, "value_dim", s.value_dim);
  if (static_cast<Index>(gammas) != s.heads)
    fail(fn, "gammas has " + std::to_string(gammas) + " entries, expected heads = " + std::to_string(s.heads));
  if (s.qk_row_stride != 0 && s.qk_row_stride < s.heads * s.key_dim)
    fail(fn, "qk_row_stride " + std::to_string(s.qk_row_stride) + " is below heads * key_dim");
  if (s.v_row_stride != 0 && s.v_row_stride < s.heads * s.value_dim)
    fail(fn, "v_row_stride " + std::to_string(s.v_row_stride) + " is below heads * value_dim");
}

/// Runs per_head(Q, K, V, out, h) for every (image, head) pair of a [B, H, W, heads * d] buffer,
/// spread over OpenMP threads.
template <class T, class PerHead>
void masa_for_each_head(const T* q, const T* k, const T* v, T* out, const GridHeadsShape& s, int threads,
                        double work_per_head, PerHead per_head) {
  const Index N = s.height * s.width, heads = s.heads, dk = s.key_dim, dv = s.value_dim;
  const Index ldq = s.qk_row_stride > 0 ? s.qk_row_stride : heads * dk;
  const Index ldv = s.v_row_stride > 0 ? s.v_row_stride : heads * dv;
  const Index pairs = s.batch * heads;
  int team = 1;
#if defined(_OPENMP)
  // Waking a team costs microseconds (milliseconds on a loaded machine): not worth it for tiny grids.
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
/// returns O [N, dv]. Streams over [query_tile, key_tile] tiles with an online softmax: no [N, N] matrix.
template <class DQ, class DK, class DV>
Matrix<typename DQ::Scalar> masa(const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                                 const Eigen::MatrixBase<DV>& V, const ManhattanDecay& decay,
                                 const MasaOptions& options = MasaOptions()) {
  using T = typename DQ::Scalar;
  detail::assert_masa_types<DQ, DK, DV>();
  detail::check_masa_inputs("masa", Q, K, V, decay.height(), decay.width());
  detail::check_masa_options<T>("masa", options);
  Matrix<T> out(Q.rows(), V.cols());
  detail::masa_into_impl<T>(Q, K, V, decay, detail::MasaMap<T>(out.data(), out.rows(), out.cols(), Eigen::OuterStride<>(out.cols())),
                            options);
  return out;
}

/// MaSAD of one head (SPEC 4; RMT's decomposed MaSA): a softmax attention along each grid row,
/// u[y, x] = sum_x' softmax_x'(q[y,x] . k[y,x'] + |x - x'| ln gamma) v[y, x'], then along each column,
/// o[y, x] = sum_y' softmax_y'(q[y,x] . k[y',x] + |y - y'| ln gamma) u[y', x], reusing q and k.
/// Q [N, dk], K [N, dk], V [N, dv], N = height * width in raster order; returns O [N, dv].
/// Cost O(N (H + W)) against MaSA's O(N^2).
template <class DQ, class DK, class DV>
Matrix<typename DQ::Scalar> masad(const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                                  const Eigen::MatrixBase<DV>& V, double gamma, Index height, Index width,
                                  const MasaOptions& options = MasaOptions()) {
  using T = typename DQ::Scalar;
  detail::assert_masa_types<DQ, DK, DV>();
  detail::check_gamma("masad", gamma);
  detail::check_positive("masad", "height", height);
  detail::check_positive("masad", "width", width);
  detail::check_masa_inputs("masad", Q, K, V, height, width);
  Matrix<T> out(Q.rows(), V.cols());
  detail::masad_into_impl<T>(Q, K, V, gamma, height, width,
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

/// Multi-head MaSA over a batch of grids: q, k [B, H, W, heads * dk], v [B, H, W, heads * dv] row-major,
/// writes out [B, H, W, heads * dv]; head h uses ManhattanDecay(gammas[h], H, W). Each (image, head)
/// pair runs masa on strided views (no copies of q, k, v); pairs are spread over OpenMP threads.
template <class T>
void multi_head_masa(const T* q, const T* k, const T* v, T* out, const GridHeadsShape& shape,
                     const std::vector<double>& gammas, const MasaOptions& options = MasaOptions()) {
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
                               const ManhattanDecay decay(gammas[static_cast<std::size_t>(h)], shape.height,
                                                          shape.width);
                               detail::masa_into_impl<T>(Q, K, V, decay, O, options);
                             });
}

/// Multi-head MaSAD over a batch of grids, same layout as multi_head_masa; head h uses gammas[h].
template <class T>
void multi_head_masad(const T* q, const T* k, const T* v, T* out, const GridHeadsShape& shape,
                      const std::vector<double>& gammas, const MasaOptions& options = MasaOptions()) {
  detail::assert_scalar<T>();
  const char* fn = "multi_head_masad";
  if (!q || !k || !v || !out) detail::fail(fn, "null buffer pointer");
  detail::check_grid_heads(fn, shape, gammas.size());
  for (double g : gammas) detail::check_gamma(fn, g);
  const double work = 2.0 * static_cast<double>(shape.height * shape.width) *
                      static_cast<double>(shape.height + shape.width) *
                      static_cast<double>(shape.key_dim + shape.value_dim);
  detail::masa_for_each_head(q, k, v, out, shape, options.threads, work,
                             [&](const detail::MasaConstMap<T>& Q, const detail::MasaConstMap<T>& K,
                                 const detail::MasaConstMap<T>& V, detail::MasaMap<T>& O, Index h) {
                               detail::masad_into_impl<T>(Q, K, V, gammas[static_cast<std::size_t>(h)],
                                                          shape.height, shape.width, O, options.threads);
                             });
}

/// Matrix overloads: q, k [B*H*W, heads*dk], v [B*H*W, heads*dv] row-major (dense: the shape's row
/// strides are ignored); returns [B*H*W, heads*dv].
template <class T>
Matrix<T> multi_head_masa(const Matrix<T>& q, const Matrix<T>& k, const Matrix<T>& v, const GridHeadsShape& shape,
                          const std::vector<double>& gammas, const MasaOptions& options = MasaOptions()) {
  const Index rows = shape.batch * shape.height * shape.width;
  detail::check_shape("multi_head_masa", "q", q, rows, shape.heads * shape.key_dim);
  detail::check_shape("multi_head_masa", "k", k, rows, shape.heads * shape.key_dim);
  detail::check_shape("multi_head_masa", "v", v, rows, shape.heads * shape.value_dim);
  Matrix<T> out(rows, shape.heads * shape.value_dim);
  GridHeadsShape dense = shape;
  dense.qk_row_stride = dense.v_row_stride = 0;
  multi_head_masa(q.data(), k.data(), v.data(), out.data(), dense, gammas, options);
  return out;
}

template <class T>
Matrix<T> multi_head_masad(const Matrix<T>& q, const Matrix<T>& k, const Matrix<T>& v,
                           const GridHeadsShape& shape, const std::vector<double>& gammas,
                           const MasaOptions& options = MasaOptions()) {
  const Index rows = shape.batch * shape.height * shape.width;
  detail::check_shape("multi_head_masad", "q", q, rows, shape.heads * shape.key_dim);
  detail::check_shape("multi_head_masad", "k", k, rows, shape.heads * shape.key_dim);
  detail::check_shape("multi_head_masad", "v", v, rows, shape.heads * shape.value_dim);
  Matrix<T> out(rows, shape.heads * shape.value_dim);
  GridHeadsShape dense = shape;
  dense.qk_row_stride = dense.v_row_stride = 0;
  multi_head_masad(q.data(), k.data(), v.data(), out.data(), dense, gammas, options);
  return out;
}

}  // namespace retention
