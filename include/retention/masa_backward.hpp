// retention: gradients of RMT's Manhattan self-attention (MaSA) and its decomposed form (MaSAD),
// docs/math.md §4.2, §4.3, §7.5 and §7.6, for any separable 2-D decay mask (ManhattanDecay,
// QuadrantCausalDecay).
//
// Training runs the forward once with *_forward_train, which returns the output together with what
// the backward needs (MaSA: the per-row log-sum-exp; MaSAD: the row pass's output u and both
// passes' log-sum-exps), then *_backward with dL/dO. The backward recomputes the softmax tile by
// tile from the saved log-sum-exp: nothing of size N x N is ever formed. A head whose inputs (q, k,
// v, dO or the saved state) hold an Inf or NaN runs a careful per-row path instead (docs/math.md
// §2.6): a gradient entry that does not depend on the bad entry stays finite and exact.
#pragma once

#include <retention/core.hpp>
#include <retention/decay.hpp>
#include <retention/detail/manhattan/backward_attention.hpp>
#include <retention/detail/manhattan/backward_heads.hpp>
#include <retention/detail/manhattan/backward_log_tiles.hpp>
#include <retention/detail/manhattan/masa_driver.hpp>
#include <retention/detail/manhattan/masad_driver.hpp>
#include <retention/detail/threading.hpp>
#include <retention/heads.hpp>

#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace retention {

/// Tiling and threading of the MaSA / MaSAD training kernels. Any tile sizes >= 1 give the same
/// result up to rounding.
struct MasaTrainOptions {
  /// Queries per tile (rows of a logit tile).
  Index query_tile = 64;
  /// Keys per tile (columns of a logit tile).
  Index key_tile = 128;
  /// Threads over (batch, head) pairs in the multi-head calls (0 = OpenMP's default, 1 = serial);
  /// a single head always runs on the calling thread.
  int threads = 0;
};

/// What masa_forward_train returns: out [N, dv] and the per-row log-sum-exp of the logits,
/// lse[n] = log sum_m exp(q_n . k_m + ln D[n, m]) [N].
template <class T>
struct MasaForward {
  Matrix<T> out;
  Vector<T> lse;
};

/// What masad_forward_train returns: out [N, dv], the row pass's output u [N, dv], and the
/// log-sum-exp of each token's logits in the row pass (row_lse [N]) and the column pass
/// (column_lse [N]).
template <class T>
struct MasadForward {
  Matrix<T> out;
  Matrix<T> u;
  Vector<T> row_lse;
  Vector<T> column_lse;
};

/// dL/dQ [N, dk], dL/dK [N, dk], dL/dV [N, dv].
template <class T>
struct MasaGradients {
  Matrix<T> dQ, dK, dV;
};

namespace detail {

/// A 2-D separable mask: an H x W grid whose ln D is row_axis() (along y) (x) column_axis() (along
/// x) in raster order.
template <class Mask, class = void>
struct is_grid_mask : std::false_type {};
template <class Mask>
struct is_grid_mask<Mask, std::void_t<decltype(std::declval<const Mask&>().height()),
                                      decltype(std::declval<const Mask&>().width()),
                                      decltype(std::declval<const Mask&>().row_axis()),
                                      decltype(std::declval<const Mask&>().column_axis())>>
    : std::true_type {};

template <class Mask>
constexpr void assert_grid_mask() {
  static_assert(is_grid_mask<Mask>::value,
                "retention: the mask must be a separable 2-D decay mask with height(), width(), "
                "row_axis() and column_axis() (ManhattanDecay, QuadrantCausalDecay)");
}

template <class T>
using GradInput = Eigen::Ref<const Matrix<T>, 0, Eigen::OuterStride<>>;

template <class T>
GradConstMap<T> grad_map(const GradInput<T>& r) {
  return GradConstMap<T>(r.data(), r.rows(), r.cols(), Eigen::OuterStride<>(r.outerStride()));
}
template <class T>
GradMap<T> grad_map(Matrix<T>& m) {
  return GradMap<T>(m.data(), m.rows(), m.cols(), Eigen::OuterStride<>(m.cols()));
}
template <class T>
GradVec<T> grad_vec(Vector<T>& v) {
  return GradVec<T>(v.data(), v.size(), Eigen::InnerStride<>(1));
}
template <class T>
GradConstVec<T> grad_vec(const Vector<T>& v) {
  return GradConstVec<T>(v.data(), v.size(), Eigen::InnerStride<>(1));
}

inline void check_train_options(const char* fn, const MasaTrainOptions& options) {
  check_positive(fn, "query_tile", options.query_tile);
  check_positive(fn, "key_tile", options.key_tile);
  check_threads(fn, "threads", options.threads);
}

/// Q [N, dk >= 1], K [N, dk], V [N, dv >= 1] with N = the mask's height * width.
template <class DQ, class DK, class DV, class Mask>
void check_train_inputs(const char* fn, const Eigen::MatrixBase<DQ>& Q,
                        const Eigen::MatrixBase<DK>& K, const Eigen::MatrixBase<DV>& V,
                        const Mask& mask) {
  const Index N = checked_product(fn, "height * width", mask.height(), mask.width());
  check_shape(fn, "Q", Q, N, -1);
  if (Q.cols() < 1)
    fail(fn, "Q is " + shape_string(Q.rows(), Q.cols()) + ", expected dk >= 1 columns");
  check_shape(fn, "K", K, N, Q.cols());
  check_shape(fn, "V", V, N, -1);
  if (V.cols() < 1)
    fail(fn, "V is " + shape_string(V.rows(), V.cols()) + ", expected dv >= 1 columns");
}

template <class DQ, class DK, class DV, class DG>
constexpr void assert_train_types() {
  using T = typename DQ::Scalar;
  assert_scalar<T>();
  assert_same_scalar<T, typename DK::Scalar>();
  assert_same_scalar<T, typename DV::Scalar>();
  assert_same_scalar<T, typename DG::Scalar>();
}

/// Checks the per-head masks of a multi-head call (one per head, one grid) and the input views
/// q, k [B, H W, heads, dk], v [B, H W, heads, dv]; returns the grid's token count H W.
template <class T, class Mask>
Index check_multi_head_inputs(const char* fn, const HeadsView<const T>& q,
                              const HeadsView<const T>& k, const HeadsView<const T>& v,
                              const std::vector<Mask>& masks, const MasaTrainOptions& options) {
  check_train_options(fn, options);
  if (masks.empty()) fail(fn, "masks is empty, expected one mask per head");
  const Index H = masks[0].height(), W = masks[0].width();
  for (std::size_t h = 1; h < masks.size(); ++h)
    if (masks[h].height() != H || masks[h].width() != W)
      fail(fn, "masks[" + std::to_string(h) + "] is a " + std::to_string(masks[h].height()) +
                   " x " + std::to_string(masks[h].width()) + " grid, expected " +
                   std::to_string(H) + " x " + std::to_string(W) + " like masks[0]");
  const Index N = checked_product(fn, "height * width", H, W);
  check_view(fn, "q", q);
  if (static_cast<Index>(masks.size()) != q.heads)
    fail(fn, "masks has " + std::to_string(masks.size()) +
                 " entries, expected heads = " + std::to_string(q.heads));
  check_view_shape(fn, "q", q, -1, N, -1, -1);
  check_view_shape(fn, "k", k, q.batch, N, q.heads, q.dim);
  check_view_shape(fn, "v", v, q.batch, N, q.heads, -1);
  return N;
}

/// Head h of sequence b of a [B, N, heads, 1] view, as a strided vector.
template <class T>
auto head_vector(const HeadsView<T>& view, Index b, Index h) {
  using Map = std::conditional_t<std::is_const<T>::value, GradConstVec<std::remove_const_t<T>>,
                                 GradVec<std::remove_const_t<T>>>;
  const Index stride = view.time > 1 ? view.time_stride : 1;
  return Map(view.data + b * view.batch_stride + h * view.head_stride, view.time,
             Eigen::InnerStride<>(stride));
}

/// Flops of one head's products: `per_pair` flops for each (query, key) pair the head attends.
template <class Mask>
double masa_pair_count(const Mask& mask) {
  const double n = static_cast<double>(mask.height()) * static_cast<double>(mask.width());
  return n * n;
}
template <class Mask>
double masad_pair_count(const Mask& mask) {
  const double n = static_cast<double>(mask.height()) * static_cast<double>(mask.width());
  return n * static_cast<double>(mask.height() + mask.width());
}

/// MaSA forward of one head for training: out = softmax_row(Q K^T + ln D) V and lse [N] by
/// masa()'s own path (masa_head_impl: out is masa()'s for the same tiles, to the bit), on the
/// caller's thread. Inputs holding an Inf or NaN take its careful path (docs/math.md §2.6), which
/// writes lse as well.
template <class T, class Mask>
void masa_forward_head_checked(const GradConstMap<T>& Q, const GradConstMap<T>& K,
                               const GradConstMap<T>& V, const Mask& mask, Index query_tile,
                               Index key_tile, GradMap<T> out, GradVec<T> lse) {
  MasaOptions options;
  options.query_tile = query_tile;
  options.key_tile = key_tile;
  options.threads = 1;
  masa_head_impl<T>(Q, K, V, mask, out, options, lse.data(), lse.innerStride());
}

/// masad_forward_head (whose lines take their careful path themselves); MaSAD's lines are never
/// tiled.
template <class T, class Mask>
void masad_forward_head_checked(const GradConstMap<T>& Q, const GradConstMap<T>& K,
                                const GradConstMap<T>& V, const Mask& mask, Index query_tile,
                                Index key_tile, GradMap<T> out, GradMap<T> u, GradVec<T> row_lse,
                                GradVec<T> column_lse) {
  (void)query_tile, (void)key_tile;
  masad_forward_head<T>(Q, K, V, mask, out, u, row_lse, column_lse);
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// MaSA, one head
// ---------------------------------------------------------------------------------------------

/// MaSA forward for training (docs/math.md §4.2): out = softmax_row(Q K^T + ln D) V [N, dv] and the
/// row log-sum-exp lse [N] the backward needs. Q [N, dk], K [N, dk], V [N, dv], N = H W in raster
/// order; mask is a ManhattanDecay or QuadrantCausalDecay over the H x W grid. Extra memory
/// O(H^2 + W^2 + query_tile (key_tile + dv)), and N (dk + dv) when K and V are rows of a wider
/// buffer (copied to contiguous rows, which the tile products pack faster).
template <class DQ, class DK, class DV, class Mask>
MasaForward<typename DQ::Scalar> masa_forward_train(const Eigen::MatrixBase<DQ>& Q,
                                                    const Eigen::MatrixBase<DK>& K,
                                                    const Eigen::MatrixBase<DV>& V,
                                                    const Mask& mask,
                                                    const MasaTrainOptions& options = {}) {
  using T = typename DQ::Scalar;
  detail::assert_train_types<DQ, DK, DV, DV>();
  detail::assert_grid_mask<Mask>();
  const char* fn = "masa_forward_train";
  detail::check_train_options(fn, options);
  detail::check_train_inputs(fn, Q, K, V, mask);
  const detail::GradInput<T> q(Q), k(K), v(V);
  MasaForward<T> f;
  f.out.resize(Q.rows(), V.cols());
  f.lse.resize(Q.rows());
  detail::masa_forward_head_checked<T>(
      detail::grad_map<T>(q), detail::grad_map<T>(k), detail::grad_map<T>(v), mask,
      options.query_tile, options.key_tile, detail::grad_map(f.out), detail::grad_vec(f.lse));
  return f;
}

/// MaSA backward (docs/math.md §7.5) from the state saved by masa_forward_train: with G = dO [N,
/// dv] and P recomputed tile by tile from saved.lse, dV = P^T G, dS = P (.) (G V^T - rowsum(G (.)
/// O)), dQ = dS K, dK = dS^T Q. Returns dQ, dK [N, dk] and dV [N, dv]. Extra memory: 2 N + H^2 +
/// W^2 + 2 query_tile key_tile values (inputs that are not row-major with unit inner stride are
/// first copied, as everywhere below; rows of a wider buffer, N above two tiles, are copied to
/// contiguous rows as well, N (2 dk + 2 dv) values).
template <class DQ, class DK, class DV, class Mask, class DG>
MasaGradients<typename DQ::Scalar> masa_backward(const Eigen::MatrixBase<DQ>& Q,
                                                 const Eigen::MatrixBase<DK>& K,
                                                 const Eigen::MatrixBase<DV>& V, const Mask& mask,
                                                 const Eigen::MatrixBase<DG>& dO,
                                                 const MasaForward<typename DQ::Scalar>& saved,
                                                 const MasaTrainOptions& options = {}) {
  using T = typename DQ::Scalar;
  detail::assert_train_types<DQ, DK, DV, DG>();
  detail::assert_grid_mask<Mask>();
  const char* fn = "masa_backward";
  detail::check_train_options(fn, options);
  detail::check_train_inputs(fn, Q, K, V, mask);
  const Index N = Q.rows(), dk = Q.cols(), dv = V.cols();
  detail::check_shape(fn, "dO", dO, N, dv);
  detail::check_shape(fn, "saved.out", saved.out, N, dv);
  detail::check_shape(fn, "saved.lse", saved.lse, N, 1);
  const detail::GradInput<T> q(Q), k(K), v(V), g(dO), o(saved.out);
  MasaGradients<T> grads;
  grads.dQ.resize(N, dk);
  grads.dK.resize(N, dk);
  grads.dV.resize(N, dv);
  detail::masa_backward_head<T>(detail::grad_map<T>(q), detail::grad_map<T>(k),
                                detail::grad_map<T>(v), mask, detail::grad_map<T>(o),
                                detail::grad_vec(saved.lse), detail::grad_map<T>(g),
                                options.query_tile, options.key_tile, detail::grad_map(grads.dQ),
                                detail::grad_map(grads.dK), detail::grad_map(grads.dV));
  return grads;
}

/// MaSA backward without saved state: runs masa_forward_train first (shapes as above).
template <class DQ, class DK, class DV, class Mask, class DG>
MasaGradients<typename DQ::Scalar> masa_backward(const Eigen::MatrixBase<DQ>& Q,
                                                 const Eigen::MatrixBase<DK>& K,
                                                 const Eigen::MatrixBase<DV>& V, const Mask& mask,
                                                 const Eigen::MatrixBase<DG>& dO,
                                                 const MasaTrainOptions& options = {}) {
  detail::assert_train_types<DQ, DK, DV, DG>();
  detail::assert_grid_mask<Mask>();
  detail::check_train_options("masa_backward", options);
  detail::check_train_inputs("masa_backward", Q, K, V, mask);
  detail::check_shape("masa_backward", "dO", dO, Q.rows(), V.cols());
  return masa_backward(Q, K, V, mask, dO, masa_forward_train(Q, K, V, mask, options), options);
}

// ---------------------------------------------------------------------------------------------
// MaSAD, one head
// ---------------------------------------------------------------------------------------------

/// MaSAD forward for training (docs/math.md §4.3): the row pass u[y, x] = sum_x' softmax_x'(q[y,x]
/// . k[y,x'] + lnDx[x, x']) v[y, x'], then the column pass o[y, x] = sum_y' softmax_y'(q[y,x] .
/// k[y',x] + lnDy[y, y']) u[y', x]; returns out [N, dv], u [N, dv] and both passes' lse [N].
/// Q [N, dk], K [N, dk], V [N, dv] in raster order; lnDx from mask.column_axis(), lnDy from
/// mask.row_axis(). The lines run through the inference kernels of masad() (the tile sizes of
/// options do not apply), which also write u and the lse rows.
template <class DQ, class DK, class DV, class Mask>
MasadForward<typename DQ::Scalar> masad_forward_train(const Eigen::MatrixBase<DQ>& Q,
                                                      const Eigen::MatrixBase<DK>& K,
                                                      const Eigen::MatrixBase<DV>& V,
                                                      const Mask& mask,
                                                      const MasaTrainOptions& options = {}) {
  using T = typename DQ::Scalar;
  detail::assert_train_types<DQ, DK, DV, DV>();
  detail::assert_grid_mask<Mask>();
  const char* fn = "masad_forward_train";
  detail::check_train_options(fn, options);
  detail::check_train_inputs(fn, Q, K, V, mask);
  const detail::GradInput<T> q(Q), k(K), v(V);
  const Index N = Q.rows();
  MasadForward<T> f;
  f.out.resize(N, V.cols());
  f.u.resize(N, V.cols());
  f.row_lse.resize(N);
  f.column_lse.resize(N);
  detail::masad_forward_head_checked<T>(
      detail::grad_map<T>(q), detail::grad_map<T>(k), detail::grad_map<T>(v), mask,
      options.query_tile, options.key_tile, detail::grad_map(f.out), detail::grad_map(f.u),
      detail::grad_vec(f.row_lse), detail::grad_vec(f.column_lse));
  return f;
}

/// MaSAD backward (docs/math.md §7.6) from the state saved by masad_forward_train: the column pass
/// backward (dQ, dK contributions and dU = dL/du), then the row pass backward through the saved u
/// (dQ, dK contributions and dV). dO [N, dv]; returns dQ, dK [N, dk], dV [N, dv]. Extra memory
/// (dU lives in dV's buffer, so nothing of size N): H^2 + W^2 + 2 query_tile key_tile + about
/// 4 L (dk + dv) values for the packed line groups, L = max(32, H, W) tokens.
template <class DQ, class DK, class DV, class Mask, class DG>
MasaGradients<typename DQ::Scalar> masad_backward(const Eigen::MatrixBase<DQ>& Q,
                                                  const Eigen::MatrixBase<DK>& K,
                                                  const Eigen::MatrixBase<DV>& V, const Mask& mask,
                                                  const Eigen::MatrixBase<DG>& dO,
                                                  const MasadForward<typename DQ::Scalar>& saved,
                                                  const MasaTrainOptions& options = {}) {
  using T = typename DQ::Scalar;
  detail::assert_train_types<DQ, DK, DV, DG>();
  detail::assert_grid_mask<Mask>();
  const char* fn = "masad_backward";
  detail::check_train_options(fn, options);
  detail::check_train_inputs(fn, Q, K, V, mask);
  const Index N = Q.rows(), dk = Q.cols(), dv = V.cols();
  detail::check_shape(fn, "dO", dO, N, dv);
  detail::check_shape(fn, "saved.out", saved.out, N, dv);
  detail::check_shape(fn, "saved.u", saved.u, N, dv);
  detail::check_shape(fn, "saved.row_lse", saved.row_lse, N, 1);
  detail::check_shape(fn, "saved.column_lse", saved.column_lse, N, 1);
  const detail::GradInput<T> q(Q), k(K), v(V), g(dO), o(saved.out), u(saved.u);
  MasaGradients<T> grads;
  grads.dQ.resize(N, dk);
  grads.dK.resize(N, dk);
  grads.dV.resize(N, dv);
  detail::masad_backward_head<T>(detail::grad_map<T>(q), detail::grad_map<T>(k),
                                 detail::grad_map<T>(v), mask, detail::grad_map<T>(o),
                                 detail::grad_map<T>(u), detail::grad_vec(saved.row_lse),
                                 detail::grad_vec(saved.column_lse), detail::grad_map<T>(g),
                                 options.query_tile, options.key_tile, detail::grad_map(grads.dQ),
                                 detail::grad_map(grads.dK), detail::grad_map(grads.dV));
  return grads;
}

/// MaSAD backward without saved state: runs masad_forward_train first (shapes as above).
template <class DQ, class DK, class DV, class Mask, class DG>
MasaGradients<typename DQ::Scalar> masad_backward(const Eigen::MatrixBase<DQ>& Q,
                                                  const Eigen::MatrixBase<DK>& K,
                                                  const Eigen::MatrixBase<DV>& V, const Mask& mask,
                                                  const Eigen::MatrixBase<DG>& dO,
                                                  const MasaTrainOptions& options = {}) {
  detail::assert_train_types<DQ, DK, DV, DG>();
  detail::assert_grid_mask<Mask>();
  detail::check_train_options("masad_backward", options);
  detail::check_train_inputs("masad_backward", Q, K, V, mask);
  detail::check_shape("masad_backward", "dO", dO, Q.rows(), V.cols());
  return masad_backward(Q, K, V, mask, dO, masad_forward_train(Q, K, V, mask, options), options);
}

// ---------------------------------------------------------------------------------------------
// Multi-head forms over [B, H W, heads, d] buffers (heads.hpp); head h uses masks[h] (one grid).
// Inputs are const views (HeadsView::as_const()), outputs and saved state views of T.
// ---------------------------------------------------------------------------------------------

/// Multi-head MaSA forward for training: q, k [B, N, heads, dk], v [B, N, heads, dv]; writes
/// out [B, N, heads, dv] and lse [B, N, heads, 1]. (batch, head) pairs run on for_each_head's team.
template <class T, class Mask>
void multi_head_masa_forward_train(const HeadsView<const T>& q, const HeadsView<const T>& k,
                                   const HeadsView<const T>& v, const std::vector<Mask>& masks,
                                   const HeadsView<T>& out, const HeadsView<T>& lse,
                                   const MasaTrainOptions& options = {}) {
  detail::assert_scalar<T>();
  detail::assert_grid_mask<Mask>();
  const char* fn = "multi_head_masa_forward_train";
  const Index N = detail::check_multi_head_inputs(fn, q, k, v, masks, options);
  detail::check_view_shape(fn, "out", out, q.batch, N, q.heads, v.dim);
  detail::check_view_shape(fn, "lse", lse, q.batch, N, q.heads, 1);
  const double flops = 2.0 * detail::masa_pair_count(masks[0]) * static_cast<double>(q.dim + v.dim);
  for_each_head(q.batch, q.heads, flops, options.threads, [&](Index b, Index h) {
    detail::masa_forward_head_checked<T>(
        q.head(b, h), k.head(b, h), v.head(b, h), masks[static_cast<std::size_t>(h)],
        options.query_tile, options.key_tile, out.head(b, h), detail::head_vector(lse, b, h));
  });
}

/// Multi-head MaSA backward from saved out [B, N, heads, dv] and lse [B, N, heads, 1]:
/// d_out [B, N, heads, dv]; writes dq, dk [B, N, heads, dk] and dv [B, N, heads, dv].
template <class T, class Mask>
void multi_head_masa_backward(const HeadsView<const T>& q, const HeadsView<const T>& k,
                              const HeadsView<const T>& v, const std::vector<Mask>& masks,
                              const HeadsView<const T>& out, const HeadsView<const T>& lse,
                              const HeadsView<const T>& d_out, const HeadsView<T>& dq,
                              const HeadsView<T>& dk, const HeadsView<T>& dv,
                              const MasaTrainOptions& options = {}) {
  detail::assert_scalar<T>();
  detail::assert_grid_mask<Mask>();
  const char* fn = "multi_head_masa_backward";
  const Index N = detail::check_multi_head_inputs(fn, q, k, v, masks, options);
  detail::check_view_shape(fn, "out", out, q.batch, N, q.heads, v.dim);
  detail::check_view_shape(fn, "lse", lse, q.batch, N, q.heads, 1);
  detail::check_view_shape(fn, "d_out", d_out, q.batch, N, q.heads, v.dim);
  detail::check_view_shape(fn, "dq", dq, q.batch, N, q.heads, q.dim);
  detail::check_view_shape(fn, "dk", dk, q.batch, N, q.heads, q.dim);
  detail::check_view_shape(fn, "dv", dv, q.batch, N, q.heads, v.dim);
  const double flops =
      2.0 * detail::masa_pair_count(masks[0]) * static_cast<double>(3 * q.dim + 2 * v.dim);
  for_each_head(q.batch, q.heads, flops, options.threads, [&](Index b, Index h) {
    detail::masa_backward_head<T>(
        q.head(b, h), k.head(b, h), v.head(b, h), masks[static_cast<std::size_t>(h)],
        out.head(b, h), detail::head_vector(lse, b, h), d_out.head(b, h), options.query_tile,
        options.key_tile, dq.head(b, h), dk.head(b, h), dv.head(b, h));
  });
}

/// Multi-head MaSA backward without saved state: each head runs its forward first (an [N, dv]
/// output and an [N] lse per thread). Shapes as above.
template <class T, class Mask>
void multi_head_masa_backward(const HeadsView<const T>& q, const HeadsView<const T>& k,
                              const HeadsView<const T>& v, const std::vector<Mask>& masks,
                              const HeadsView<const T>& d_out, const HeadsView<T>& dq,
                              const HeadsView<T>& dk, const HeadsView<T>& dv,
                              const MasaTrainOptions& options = {}) {
  detail::assert_scalar<T>();
  detail::assert_grid_mask<Mask>();
  const char* fn = "multi_head_masa_backward";
  const Index N = detail::check_multi_head_inputs(fn, q, k, v, masks, options);
  detail::check_view_shape(fn, "d_out", d_out, q.batch, N, q.heads, v.dim);
  detail::check_view_shape(fn, "dq", dq, q.batch, N, q.heads, q.dim);
  detail::check_view_shape(fn, "dk", dk, q.batch, N, q.heads, q.dim);
  detail::check_view_shape(fn, "dv", dv, q.batch, N, q.heads, v.dim);
  const double flops =
      2.0 * detail::masa_pair_count(masks[0]) * static_cast<double>(4 * q.dim + 3 * v.dim);
  for_each_head(q.batch, q.heads, flops, options.threads, [&](Index b, Index h) {
    const Mask& mask = masks[static_cast<std::size_t>(h)];
    Matrix<T> o(N, v.dim);
    Vector<T> l(N);
    detail::masa_forward_head_checked<T>(q.head(b, h), k.head(b, h), v.head(b, h), mask,
                                         options.query_tile, options.key_tile, detail::grad_map(o),
                                         detail::grad_vec(l));
    detail::masa_backward_head<T>(
        q.head(b, h), k.head(b, h), v.head(b, h), mask, detail::grad_const(detail::grad_map(o)),
        detail::grad_vec(static_cast<const Vector<T>&>(l)), d_out.head(b, h), options.query_tile,
        options.key_tile, dq.head(b, h), dk.head(b, h), dv.head(b, h));
  });
}

/// Multi-head MaSAD forward for training: q, k [B, N, heads, dk], v [B, N, heads, dv]; writes
/// out and u [B, N, heads, dv], row_lse and column_lse [B, N, heads, 1].
template <class T, class Mask>
void multi_head_masad_forward_train(const HeadsView<const T>& q, const HeadsView<const T>& k,
                                    const HeadsView<const T>& v, const std::vector<Mask>& masks,
                                    const HeadsView<T>& out, const HeadsView<T>& u,
                                    const HeadsView<T>& row_lse, const HeadsView<T>& column_lse,
                                    const MasaTrainOptions& options = {}) {
  detail::assert_scalar<T>();
  detail::assert_grid_mask<Mask>();
  const char* fn = "multi_head_masad_forward_train";
  const Index N = detail::check_multi_head_inputs(fn, q, k, v, masks, options);
  detail::check_view_shape(fn, "out", out, q.batch, N, q.heads, v.dim);
  detail::check_view_shape(fn, "u", u, q.batch, N, q.heads, v.dim);
  detail::check_view_shape(fn, "row_lse", row_lse, q.batch, N, q.heads, 1);
  detail::check_view_shape(fn, "column_lse", column_lse, q.batch, N, q.heads, 1);
  // The line schedule of multi_head_masad (every head's lines of an image on the team).
  detail::MasadGrid<T> g =
      detail::masad_views_grid<T>(q, k, v, out, masks.front().height(), masks.front().width());
  g.u = u.data, g.ldu = u.time_stride, g.hu = u.head_stride, g.bu = u.batch_stride;
  g.row_lse = {row_lse.data, row_lse.time_stride, row_lse.head_stride, row_lse.batch_stride};
  g.column_lse = {column_lse.data, column_lse.time_stride, column_lse.head_stride,
                  column_lse.batch_stride};
  detail::masad_grid<T>(g, masks, options.threads);
}

/// Multi-head MaSAD backward from the saved out, u [B, N, heads, dv] and row_lse, column_lse
/// [B, N, heads, 1]: d_out [B, N, heads, dv]; writes dq, dk [B, N, heads, dk], dv [B, N, heads,
/// dv].
template <class T, class Mask>
void multi_head_masad_backward(const HeadsView<const T>& q, const HeadsView<const T>& k,
                               const HeadsView<const T>& v, const std::vector<Mask>& masks,
                               const HeadsView<const T>& out, const HeadsView<const T>& u,
                               const HeadsView<const T>& row_lse,
                               const HeadsView<const T>& column_lse,
                               const HeadsView<const T>& d_out, const HeadsView<T>& dq,
                               const HeadsView<T>& dk, const HeadsView<T>& dv,
                               const MasaTrainOptions& options = {}) {
  detail::assert_scalar<T>();
  detail::assert_grid_mask<Mask>();
  const char* fn = "multi_head_masad_backward";
  const Index N = detail::check_multi_head_inputs(fn, q, k, v, masks, options);
  detail::check_view_shape(fn, "out", out, q.batch, N, q.heads, v.dim);
  detail::check_view_shape(fn, "u", u, q.batch, N, q.heads, v.dim);
  detail::check_view_shape(fn, "row_lse", row_lse, q.batch, N, q.heads, 1);
  detail::check_view_shape(fn, "column_lse", column_lse, q.batch, N, q.heads, 1);
  detail::check_view_shape(fn, "d_out", d_out, q.batch, N, q.heads, v.dim);
  detail::check_view_shape(fn, "dq", dq, q.batch, N, q.heads, q.dim);
  detail::check_view_shape(fn, "dk", dk, q.batch, N, q.heads, q.dim);
  detail::check_view_shape(fn, "dv", dv, q.batch, N, q.heads, v.dim);
  const double flops =
      2.0 * detail::masad_pair_count(masks[0]) * static_cast<double>(3 * q.dim + 2 * v.dim);
  const Index H = masks.front().height(), W = masks.front().width(), heads = q.heads;
  // Each head's padded axis tiles, shared by the batch.
  std::vector<Matrix<T>> lx, ly;
  for (const Mask& m : masks) {
    lx.push_back(detail::masad_log_tile<T>(m.column_axis(), W));
    ly.push_back(detail::masad_log_tile<T>(m.row_axis(), H));
  }
  detail::MasadBackwardStrides st;
  st.q = q.time_stride, st.k = k.time_stride, st.v = v.time_stride, st.out = out.time_stride;
  st.u = u.time_stride, st.g = d_out.time_stride, st.row_lse = row_lse.time_stride;
  st.column_lse = column_lse.time_stride;
  st.dq = dq.time_stride, st.dk = dk.time_stride, st.dv = dv.time_stride;
  // Units of work: image b's heads [h0, h1), a line at a time for all of them (as masad()
  // schedules its lines); with a team, as many head groups per image as members.
  const detail::Team team = detail::plan_team(options.threads, q.batch * heads,
                                              flops * static_cast<double>(q.batch * heads));
  const Index wanted = team.size > 1 ? std::min<Index>(heads, team.size) : 1;
  const Index group = (heads + wanted - 1) / wanted, groups = (heads + group - 1) / group;
  detail::for_each_with_workspace(
      team, q.batch * groups,
      [&] { return detail::MasadBackwardWorkspace<T>(std::max(H, W), q.dim, v.dim); },
      [&](Index unit, detail::MasadBackwardWorkspace<T>& ws) {
        const Index b = unit / groups, h0 = (unit % groups) * group;
        const Index h1 = std::min(heads, h0 + group);
        std::vector<detail::MasadBackwardHead<T>> lines;
        for (Index h = h0; h < h1; ++h) {
          const std::size_t hs = static_cast<std::size_t>(h);
          auto dQ = dq.head(b, h), dK = dk.head(b, h);
          dQ.setZero();
          dK.setZero();
          detail::MasadBackwardHead<T> line;
          line.q = q.head(b, h).data(), line.k = k.head(b, h).data(), line.v = v.head(b, h).data();
          line.out = out.head(b, h).data(), line.u = u.head(b, h).data();
          line.g = d_out.head(b, h).data();
          line.row_lse = detail::head_vector(row_lse, b, h).data();
          line.column_lse = detail::head_vector(column_lse, b, h).data();
          line.dq = dQ.data(), line.dk = dK.data(), line.dv = dv.head(b, h).data();
          line.lx = &lx[hs], line.ly = &ly[hs];
          lines.push_back(line);
        }
        const std::unique_ptr<bool[]> failed(new bool[lines.size()]());
        detail::masad_backward_lines<T>(lines.data(), static_cast<Index>(lines.size()), st, H, W,
                                        q.dim, v.dim, ws, failed.get());
        for (Index h = h0; h < h1; ++h)  // a head with an Inf or NaN: its careful path
          if (failed[static_cast<std::size_t>(h - h0)])
            detail::masad_backward_careful<T>(
                q.head(b, h), k.head(b, h), v.head(b, h), masks[static_cast<std::size_t>(h)],
                u.head(b, h), d_out.head(b, h), dq.head(b, h), dk.head(b, h), dv.head(b, h));
      });
}

/// Multi-head MaSAD backward without saved state: each head runs its forward first (out and u
/// [N, dv], two [N] lse per thread). Shapes as above.
template <class T, class Mask>
void multi_head_masad_backward(const HeadsView<const T>& q, const HeadsView<const T>& k,
                               const HeadsView<const T>& v, const std::vector<Mask>& masks,
                               const HeadsView<const T>& d_out, const HeadsView<T>& dq,
                               const HeadsView<T>& dk, const HeadsView<T>& dv,
                               const MasaTrainOptions& options = {}) {
  detail::assert_scalar<T>();
  detail::assert_grid_mask<Mask>();
  const char* fn = "multi_head_masad_backward";
  const Index N = detail::check_multi_head_inputs(fn, q, k, v, masks, options);
  detail::check_view_shape(fn, "d_out", d_out, q.batch, N, q.heads, v.dim);
  detail::check_view_shape(fn, "dq", dq, q.batch, N, q.heads, q.dim);
  detail::check_view_shape(fn, "dk", dk, q.batch, N, q.heads, q.dim);
  detail::check_view_shape(fn, "dv", dv, q.batch, N, q.heads, v.dim);
  const double flops =
      2.0 * detail::masad_pair_count(masks[0]) * static_cast<double>(4 * q.dim + 3 * v.dim);
  for_each_head(q.batch, q.heads, flops, options.threads, [&](Index b, Index h) {
    const Mask& mask = masks[static_cast<std::size_t>(h)];
    Matrix<T> o(N, v.dim), uu(N, v.dim);
    Vector<T> lr(N), lc(N);
    detail::masad_forward_head_checked<T>(
        q.head(b, h), k.head(b, h), v.head(b, h), mask, options.query_tile, options.key_tile,
        detail::grad_map(o), detail::grad_map(uu), detail::grad_vec(lr), detail::grad_vec(lc));
    detail::masad_backward_head<T>(
        q.head(b, h), k.head(b, h), v.head(b, h), mask, detail::grad_const(detail::grad_map(o)),
        detail::grad_const(detail::grad_map(uu)),
        detail::grad_vec(static_cast<const Vector<T>&>(lr)),
        detail::grad_vec(static_cast<const Vector<T>&>(lc)), d_out.head(b, h), options.query_tile,
        options.key_tile, dq.head(b, h), dk.head(b, h), dv.head(b, h));
  });
}

}  // namespace retention

#if defined(RETENTION_COMPILED)
// Compiled mode: the per-head MaSA / MaSAD training kernels for the two grid masks in float and
// double come from the retention_compiled library (src/masa_backward_*.cpp).
#include <retention/detail/manhattan/backward_instances.hpp>
#endif
