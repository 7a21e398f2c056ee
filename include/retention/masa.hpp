// retention: RMT's Manhattan self-attention (MaSA) and its decomposed form (MaSAD), per head and
// over multi-head buffers (docs/math.md §4). Any separable 2-D decay mask works: ManhattanDecay
// (RMT) or QuadrantCausalDecay; kernels read ln D from the mask's two axis masks.
#pragma once

#include <retention/core.hpp>
#include <retention/decay.hpp>
#include <retention/detail/manhattan/masa_driver.hpp>
#include <retention/detail/manhattan/masad_driver.hpp>
#include <retention/heads.hpp>

#include <string>
#include <vector>

namespace retention {

/// Sizes of a dense multi-head MaSA / MaSAD call: q and k are row-major [batch, height, width,
/// heads * key_dim], v and the output [batch, height, width, heads * value_dim].
struct GridHeadsShape {
  Index batch = 1;
  Index height = 0;
  Index width = 0;
  Index heads = 1;
  Index key_dim = 0;
  Index value_dim = 0;
  /// Distance in elements between consecutive tokens' rows of q and k, and of v; 0 means dense
  /// (heads * key_dim, heads * value_dim). Lets q, k, v be column blocks of one fused buffer.
  Index qk_row_stride = 0;
  Index v_row_stride = 0;
};

/// Per-head Manhattan masks on an H x W grid from gammas (each checked once, here).
inline std::vector<ManhattanDecay> manhattan_masks(const std::vector<double>& gammas, Index height,
                                                   Index width) {
  std::vector<ManhattanDecay> masks;
  masks.reserve(gammas.size());
  for (double g : gammas) masks.emplace_back(g, height, width);
  return masks;
}

namespace detail {

template <class DQ, class DK, class DV>
constexpr void assert_masa_types() {
  using T = typename DQ::Scalar;
  assert_scalar<T>();
  assert_same_scalar<T, typename DK::Scalar>();
  assert_same_scalar<T, typename DV::Scalar>();
}

inline void check_masa_options(const char* fn, const MasaOptions& options) {
  check_positive(fn, "query_tile", options.query_tile);
  check_positive(fn, "key_tile", options.key_tile);
  check_threads(fn, "options.threads", options.threads);
}

/// Q [N, dk], K [N, dk], V [N, dv] with N = height * width.
template <class DQ, class DK, class DV>
void check_masa_inputs(const char* fn, const Eigen::MatrixBase<DQ>& Q,
                       const Eigen::MatrixBase<DK>& K, const Eigen::MatrixBase<DV>& V, Index height,
                       Index width) {
  const Index N = checked_product(fn, "height * width", height, width);
  check_shape(fn, "Q", Q, N, -1);
  if (Q.cols() < 1)
    fail(fn, "Q is " + shape_string(Q.rows(), Q.cols()) + ", expected dk >= 1 columns");
  check_shape(fn, "K", K, N, Q.cols());
  check_shape(fn, "V", V, N, -1);
  if (V.cols() < 1)
    fail(fn, "V is " + shape_string(V.rows(), V.cols()) + ", expected dv >= 1 columns");
}

/// Checks a multi-head grid call: views agree, one mask per head, each mask's grid has `time`
/// tokens, out does not overlap the inputs.
template <class T, class Mask2D>
void check_grid_views(const char* fn, const HeadsView<const T>& q, const HeadsView<const T>& k,
                      const HeadsView<const T>& v, const HeadsView<T>& out,
                      const std::vector<Mask2D>& masks) {
  check_view(fn, "q", q);
  check_view_shape(fn, "k", k, q.batch, q.time, q.heads, q.dim);
  check_view_shape(fn, "v", v, q.batch, q.time, q.heads, -1);
  check_view_shape(fn, "out", out, q.batch, q.time, q.heads, v.dim);
  if (static_cast<Index>(masks.size()) != q.heads)
    fail(fn, "masks has " + std::to_string(masks.size()) +
                 " entries, expected heads = " + std::to_string(q.heads));
  for (std::size_t h = 0; h < masks.size(); ++h)
    if (masks[h].size() != q.time)
      fail(fn, "masks[" + std::to_string(h) + "] is a " + std::to_string(masks[h].height()) +
                   " x " + std::to_string(masks[h].width()) + " grid, expected " +
                   std::to_string(q.time) + " tokens");
  check_no_overlap(fn, out, q, "q");
  check_no_overlap(fn, out, k, "k");
  check_no_overlap(fn, out, v, "v");
}

template <class T>
MasaMap<T> dense_map(Matrix<T>& m) {
  return MasaMap<T>(m.data(), m.rows(), m.cols(), Eigen::OuterStride<>(m.cols()));
}

/// Views of a dense [B, H, W, heads * d] call described by a GridHeadsShape.
template <class T>
HeadsView<T> grid_view(const char* fn, T* p, const GridHeadsShape& s, Index dim, Index row_stride) {
  if (!p) fail(fn, "null buffer pointer");
  const Index N = checked_product(fn, "height * width", s.height, s.width);
  const Index dense = checked_product(fn, "heads * dim", s.heads, dim);
  const Index ld = row_stride > 0 ? row_stride : dense;
  if (row_stride != 0 && row_stride < dense)
    fail(fn, "row stride " + std::to_string(row_stride) +
                 " is below heads * dim = " + std::to_string(dense));
  return {p,  s.batch, N, s.heads, dim, checked_product(fn, "height * width * row stride", N, ld),
          ld, dim};
}

inline void check_grid_shape(const char* fn, const GridHeadsShape& s, std::size_t gammas) {
  check_positive(fn, "batch", s.batch);
  check_positive(fn, "height", s.height);
  check_positive(fn, "width", s.width);
  check_positive(fn, "heads", s.heads);
  check_positive(fn, "key_dim", s.key_dim);
  check_positive(fn, "value_dim", s.value_dim);
  if (static_cast<Index>(gammas) != s.heads)
    fail(fn, "gammas has " + std::to_string(gammas) +
                 " entries, expected heads = " + std::to_string(s.heads));
}

}  // namespace detail

/// MaSA of one head (docs/math.md §4): O = softmax_row(Q K^T + ln D) V with D the 2-D mask
/// (ManhattanDecay: ln D[n, m] = (|y_n - y_m| + |x_n - x_m|) ln gamma). Q [N, dk], K [N, dk],
/// V [N, dv], rows in raster order n = y W + x, N = mask.size(); returns O [N, dv]. Streams over
/// [query_tile, key_tile] tiles with an online softmax: no [N, N] matrix.
template <class DQ, class DK, class DV, class Mask2D>
Matrix<typename DQ::Scalar> masa(const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                                 const Eigen::MatrixBase<DV>& V, const Mask2D& mask,
                                 const MasaOptions& options = MasaOptions()) {
  using T = typename DQ::Scalar;
  detail::assert_masa_types<DQ, DK, DV>();
  detail::check_masa_inputs("masa", Q, K, V, mask.height(), mask.width());
  detail::check_masa_options("masa", options);
  Matrix<T> out(Q.rows(), V.cols());
  detail::masa_head_impl<T>(Q, K, V, mask, detail::dense_map(out), options);
  return out;
}

/// MaSAD of one head (docs/math.md §4, RMT's decomposed MaSA): a softmax attention along each grid
/// row with the mask's column axis, u[y, x] = sum_x' softmax_x'(q[y,x] . k[y,x'] + ln Dx(x, x'))
/// v[y, x'], then along each column with its row axis, o[y, x] = sum_y' softmax_y'(q[y,x] .
/// k[y',x] + ln Dy(y, y')) u[y', x]. Q [N, dk], K [N, dk], V [N, dv] -> O [N, dv]. Cost
/// O(N (H + W)) against MaSA's O(N^2).
template <class DQ, class DK, class DV, class Mask2D>
Matrix<typename DQ::Scalar> masad(const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                                  const Eigen::MatrixBase<DV>& V, const Mask2D& mask,
                                  const MasaOptions& options = MasaOptions()) {
  using T = typename DQ::Scalar;
  detail::assert_masa_types<DQ, DK, DV>();
  detail::check_masa_inputs("masad", Q, K, V, mask.height(), mask.width());
  detail::check_threads("masad", "options.threads", options.threads);
  Matrix<T> out(Q.rows(), V.cols());
  detail::masad_into_impl<T>(Q, K, V, mask, detail::dense_map(out), options.threads);
  return out;
}

/// MaSAD with a Manhattan mask of the given gamma on a height x width grid.
template <class DQ, class DK, class DV>
Matrix<typename DQ::Scalar> masad(const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                                  const Eigen::MatrixBase<DV>& V, double gamma, Index height,
                                  Index width, const MasaOptions& options = MasaOptions()) {
  detail::check_gamma("masad", gamma);
  detail::check_positive("masad", "height", height);
  detail::check_positive("masad", "width", width);
  detail::checked_product("masad", "height * width", height, width);
  return masad(Q, K, V, ManhattanDecay(gamma, height, width), options);
}

/// Multi-head MaSA: for every (b, h), out.head(b, h) = masa(q.head(b, h), k.head(b, h),
/// v.head(b, h), masks[h]). Views of N = H W tokens per image (any strides, e.g. column blocks of a
/// fused projection buffer; out must not overlap them); pairs run through for_each_head.
template <class T, class Mask2D>
void multi_head_masa(const HeadsView<const T>& q, const HeadsView<const T>& k,
                     const HeadsView<const T>& v, const HeadsView<T>& out,
                     const std::vector<Mask2D>& masks, const MasaOptions& options = MasaOptions()) {
  detail::assert_scalar<T>();
  const char* fn = "multi_head_masa";
  detail::check_grid_views(fn, q, k, v, out, masks);
  detail::check_masa_options(fn, options);
  const double n = static_cast<double>(q.time);
  const double work = 2.0 * n * n * static_cast<double>(q.dim + v.dim);
  MasaOptions inner = options;
  for_each_head(q.batch, q.heads, work, options.threads, [&](Index b, Index h) {
    detail::masa_head_impl<T>(q.head(b, h), k.head(b, h), v.head(b, h),
                              masks[static_cast<std::size_t>(h)], out.head(b, h), inner);
  });
}

/// Multi-head MaSAD over views as multi_head_masa; lines of all heads are scheduled together.
template <class T, class Mask2D>
void multi_head_masad(const HeadsView<const T>& q, const HeadsView<const T>& k,
                      const HeadsView<const T>& v, const HeadsView<T>& out,
                      const std::vector<Mask2D>& masks,
                      const MasaOptions& options = MasaOptions()) {
  detail::assert_scalar<T>();
  const char* fn = "multi_head_masad";
  detail::check_grid_views(fn, q, k, v, out, masks);
  detail::check_threads(fn, "options.threads", options.threads);
  for (const auto& m : masks)
    if (m.height() != masks.front().height() || m.width() != masks.front().width())
      detail::fail(fn, "masks: every head must use the same grid");
  const detail::MasadGrid<T> g =
      detail::masad_views_grid<T>(q, k, v, out, masks.front().height(), masks.front().width());
  detail::masad_grid<T>(g, masks, options.threads);
}

/// Multi-head MaSA over dense [B, H, W, heads * d] buffers (see GridHeadsShape); head h uses
/// ManhattanDecay(gammas[h], H, W).
template <class T>
void multi_head_masa(const T* q, const T* k, const T* v, T* out, const GridHeadsShape& shape,
                     const std::vector<double>& gammas,
                     const MasaOptions& options = MasaOptions()) {
  const char* fn = "multi_head_masa";
  detail::check_grid_shape(fn, shape, gammas.size());
  for (double g : gammas) detail::check_gamma(fn, g);
  multi_head_masa(detail::grid_view(fn, q, shape, shape.key_dim, shape.qk_row_stride),
                  detail::grid_view(fn, k, shape, shape.key_dim, shape.qk_row_stride),
                  detail::grid_view(fn, v, shape, shape.value_dim, shape.v_row_stride),
                  detail::grid_view(fn, out, shape, shape.value_dim, 0),
                  manhattan_masks(gammas, shape.height, shape.width), options);
}

/// Multi-head MaSAD over dense buffers, as multi_head_masa; head h uses gammas[h].
template <class T>
void multi_head_masad(const T* q, const T* k, const T* v, T* out, const GridHeadsShape& shape,
                      const std::vector<double>& gammas,
                      const MasaOptions& options = MasaOptions()) {
  const char* fn = "multi_head_masad";
  detail::check_grid_shape(fn, shape, gammas.size());
  for (double g : gammas) detail::check_gamma(fn, g);
  multi_head_masad(detail::grid_view(fn, q, shape, shape.key_dim, shape.qk_row_stride),
                   detail::grid_view(fn, k, shape, shape.key_dim, shape.qk_row_stride),
                   detail::grid_view(fn, v, shape, shape.value_dim, shape.v_row_stride),
                   detail::grid_view(fn, out, shape, shape.value_dim, 0),
                   manhattan_masks(gammas, shape.height, shape.width), options);
}

namespace detail {

/// The Matrix overloads of multi_head_masa / multi_head_masad: checks the shape and dense
/// [B*H*W, heads*d] operands before allocating the output.
template <class T, class Run>
Matrix<T> multi_head_grid_dense(const char* fn, const Matrix<T>& q, const Matrix<T>& k,
                                const Matrix<T>& v, const GridHeadsShape& shape, std::size_t gammas,
                                Run run) {
  check_grid_shape(fn, shape, gammas);
  const Index N = checked_product(fn, "height * width", shape.height, shape.width);
  const Index rows = checked_product(fn, "batch * height * width", shape.batch, N);
  const Index qk_cols = checked_product(fn, "heads * key_dim", shape.heads, shape.key_dim);
  const Index v_cols = checked_product(fn, "heads * value_dim", shape.heads, shape.value_dim);
  checked_product(fn, "rows * heads * value_dim", rows, v_cols);
  check_shape(fn, "q", q, rows, qk_cols);
  check_shape(fn, "k", k, rows, qk_cols);
  check_shape(fn, "v", v, rows, v_cols);
  Matrix<T> out(rows, v_cols);
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
      "multi_head_masa", q, k, v, shape, gammas.size(),
      [&](const T* qp, const T* kp, const T* vp, T* op, const GridHeadsShape& dense) {
        multi_head_masa(qp, kp, vp, op, dense, gammas, options);
      });
}

template <class T>
Matrix<T> multi_head_masad(const Matrix<T>& q, const Matrix<T>& k, const Matrix<T>& v,
                           const GridHeadsShape& shape, const std::vector<double>& gammas,
                           const MasaOptions& options = MasaOptions()) {
  return detail::multi_head_grid_dense(
      "multi_head_masad", q, k, v, shape, gammas.size(),
      [&](const T* qp, const T* kp, const T* vp, T* op, const GridHeadsShape& dense) {
        multi_head_masad(qp, kp, vp, op, dense, gammas, options);
      });
}

}  // namespace retention
