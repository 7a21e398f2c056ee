// retention: the RMT attention layer (SPEC 4): q, k, v projections with bias, k scaled by
// dk^(-1/2), rotation by raster index, per-head MaSA or MaSAD, local context enhancement (LCE, a
// depthwise 5 x 5 convolution of the V map) added before the output projection. Weights load in
// torch layout.
#pragma once

#include <retention/core.hpp>
#include <retention/decay.hpp>
#include <retention/masa.hpp>
#include <retention/nn/rotation.hpp>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace retention {

/// Which attention the RMT layer runs: full = MaSA (O(N^2)), decomposed = MaSAD (O(N (H + W))).
enum class RmtMode { full, decomposed };

inline const char* to_string(RmtMode m) { return m == RmtMode::full ? "full" : "decomposed"; }

/// Configuration of ManhattanAttention; the names follow the RMT authors' code.
struct ManhattanAttentionConfig {
  /// C: channels of each token; q and k have C channels, dk = C / heads.
  Index embed_dim = 64;
  Index heads = 4;
  /// v (and LCE) have value_factor * C channels.
  Index value_factor = 1;
  /// gamma_h = 1 - 2^-(initial_value + heads_range * h / heads) (rmt_gammas).
  double initial_value = 2.0;
  double heads_range = 4.0;
  /// Tiling and threading of the MaSA kernel.
  MasaOptions tile;
};

/// Local context enhancement (SPEC 4): depthwise 5 x 5 convolution with padding 2 and bias of each
/// [height, width, C] map in v [batch * height * width, C] (torch cross-correlation, zeros
/// outside): out[y, x, c] = bias[c] + sum_{i,j<5} weight(c, 5 i + j) v[y + i - 2, x + j - 2, c].
/// weight [C, 25] is torch's [C, 1, 5, 5] reshaped; bias [1, C]. Returns [batch * height * width,
/// C].
template <class DV, class DW, class DB>
Matrix<typename DV::Scalar> local_context_enhancement(const Eigen::MatrixBase<DV>& v, Index batch,
                                                      Index height, Index width,
                                                      const Eigen::MatrixBase<DW>& weight,
                                                      const Eigen::MatrixBase<DB>& bias) {
  using T = typename DV::Scalar;
  detail::assert_scalar<T>();
  detail::assert_same_scalar<T, typename DW::Scalar>();
  detail::assert_same_scalar<T, typename DB::Scalar>();
  const char* fn = "local_context_enhancement";
  detail::check_positive(fn, "batch", batch);
  detail::check_positive(fn, "height", height);
  detail::check_positive(fn, "width", width);
  const Index C = v.cols(), N = height * width;
  detail::check_shape(fn, "v", v, batch * N, -1);
  detail::check_shape(fn, "weight", weight, C, 25);
  detail::check_shape(fn, "bias", bias, 1, C);
  // Tap-major copy of the weights, so each tap scales a token's channels with one vector multiply.
  const Matrix<T> taps = weight.transpose();
  Matrix<T> out = bias.replicate(batch * N, 1);
  for (Index b = 0; b < batch; ++b)
    for (Index i = 0; i < 5; ++i)
      for (Index j = 0; j < 5; ++j) {
        const Index dy = i - 2, dx = j - 2;
        // The output x range whose source x + dx stays inside the grid: padding contributes zero.
        const Index x0 = std::max<Index>(0, -dx), x1 = std::min<Index>(width, width - dx);
        if (x1 <= x0) continue;
        const auto tap = taps.row(5 * i + j).array();
        for (Index y = std::max<Index>(0, -dy); y < std::min<Index>(height, height - dy); ++y) {
          const Index dst = b * N + y * width + x0, src = b * N + (y + dy) * width + x0 + dx;
          out.middleRows(dst, x1 - x0).array() +=
              v.middleRows(src, x1 - x0).array().rowwise() * tap;
        }
      }
  return out;
}

/// RMT's attention layer with Manhattan decay (SPEC 4), for one image or a batch of images.
/// x [B * H * W, C] (each image's tokens in raster order) -> y [B * H * W, C]:
/// q = x Wq^T + bq, k = (x Wk^T + bk) dk^(-1/2), v = x Wv^T + bv, q and k rotated by raster index,
/// per head h: O_h = MaSA_h(q, k, v) or MaSAD_h(q, k, v) with gamma_h from rmt_gammas,
/// y = (concat_h O_h + LCE(v)) Wo^T + bo.
template <class T>
class ManhattanAttention {
 public:
  explicit ManhattanAttention(const ManhattanAttentionConfig& config)
      : config_(config), rotation_(checked_head_dim(config)) {
    const Index C = config.embed_dim, Cv = config.value_factor * C;
    gammas_ = rmt_gammas(config.heads, config.initial_value, config.heads_range);
    detail::check_masa_options<T>("ManhattanAttention", config.tile);
    wq_ = Matrix<T>::Zero(C, C);
    wk_ = Matrix<T>::Zero(C, C);
    wv_ = Matrix<T>::Zero(Cv, C);
    wo_ = Matrix<T>::Zero(C, Cv);
    bq_ = RowVector<T>::Zero(C);
    bk_ = RowVector<T>::Zero(C);
    bv_ = RowVector<T>::Zero(Cv);
    bo_ = RowVector<T>::Zero(C);
    lce_w_ = Matrix<T>::Zero(Cv, 25);
    lce_b_ = RowVector<T>::Zero(Cv);
    fuse();
  }

  const ManhattanAttentionConfig& config() const { return config_; }
  Index embed_dim() const { return config_.embed_dim; }
  Index heads() const { return config_.heads; }
  /// dk = C / heads.
  Index head_dim() const { return config_.embed_dim / config_.heads; }
  /// Cv = value_factor * C, the width of v, LCE and the attention output.
  Index value_dim() const { return config_.value_factor * config_.embed_dim; }
  /// dv = Cv / heads.
  Index value_head_dim() const { return value_dim() / config_.heads; }
  /// gamma_h, h = 0..heads-1.
  const std::vector<double>& gammas() const { return gammas_; }

  const Matrix<T>& q_weight() const { return wq_; }
  const Matrix<T>& k_weight() const { return wk_; }
  const Matrix<T>& v_weight() const { return wv_; }
  const Matrix<T>& out_weight() const { return wo_; }
  const Matrix<T>& lce_weight() const { return lce_w_; }

  /// Loads q_proj from torch arrays: weight [C, C] row-major (C * C values), bias [C].
  template <class S>
  void load_q_proj(const S* weight, Index weight_size, const S* bias, Index bias_size) {
    load_raw("ManhattanAttention::load_q_proj", wq_, bq_, weight, weight_size, bias, bias_size);
  }
  /// Loads k_proj: weight [C, C], bias [C] (the dk^(-1/2) scaling is applied in forward, not
  /// stored).
  template <class S>
  void load_k_proj(const S* weight, Index weight_size, const S* bias, Index bias_size) {
    load_raw("ManhattanAttention::load_k_proj", wk_, bk_, weight, weight_size, bias, bias_size);
  }
  /// Loads v_proj: weight [Cv, C], bias [Cv].
  template <class S>
  void load_v_proj(const S* weight, Index weight_size, const S* bias, Index bias_size) {
    load_raw("ManhattanAttention::load_v_proj", wv_, bv_, weight, weight_size, bias, bias_size);
  }
  /// Loads out_proj: weight [C, Cv], bias [C].
  template <class S>
  void load_out_proj(const S* weight, Index weight_size, const S* bias, Index bias_size) {
    load_raw("ManhattanAttention::load_out_proj", wo_, bo_, weight, weight_size, bias, bias_size);
  }
  /// Loads the LCE convolution (torch Conv2d(Cv, Cv, 5, 1, 2, groups=Cv)): weight [Cv, 1, 5, 5],
  /// bias [Cv].
  template <class S>
  void load_lce(const S* weight, Index weight_size, const S* bias, Index bias_size) {
    load_raw("ManhattanAttention::load_lce", lce_w_, lce_b_, weight, weight_size, bias, bias_size);
  }

  /// Eigen overloads: weight [out, in] (LCE: [Cv, 25]) and bias [1, out] or [out, 1].
  template <class W, class B>
  void load_q_proj(const Eigen::MatrixBase<W>& weight, const Eigen::MatrixBase<B>& bias) {
    load_dense("ManhattanAttention::load_q_proj", wq_, bq_, weight, bias);
  }
  template <class W, class B>
  void load_k_proj(const Eigen::MatrixBase<W>& weight, const Eigen::MatrixBase<B>& bias) {
    load_dense("ManhattanAttention::load_k_proj", wk_, bk_, weight, bias);
  }
  template <class W, class B>
  void load_v_proj(const Eigen::MatrixBase<W>& weight, const Eigen::MatrixBase<B>& bias) {
    load_dense("ManhattanAttention::load_v_proj", wv_, bv_, weight, bias);
  }
  template <class W, class B>
  void load_out_proj(const Eigen::MatrixBase<W>& weight, const Eigen::MatrixBase<B>& bias) {
    load_dense("ManhattanAttention::load_out_proj", wo_, bo_, weight, bias);
  }
  template <class W, class B>
  void load_lce(const Eigen::MatrixBase<W>& weight, const Eigen::MatrixBase<B>& bias) {
    load_dense("ManhattanAttention::load_lce", lce_w_, lce_b_, weight, bias);
  }

  /// Deterministic initialisation for examples and benchmarks: every weight and bias uniform in
  /// [-1/sqrt(fan_in), 1/sqrt(fan_in)) (torch's default bound), drawn from mt19937_64(seed).
  void init_random(std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    const auto fill = [&rng](auto& m, Index fan_in) {
      std::uniform_real_distribution<double> dist(-1.0, 1.0);
      const double bound = 1.0 / std::sqrt(static_cast<double>(fan_in));
      for (Index i = 0; i < m.rows(); ++i)
        for (Index j = 0; j < m.cols(); ++j) m(i, j) = static_cast<T>(bound * dist(rng));
    };
    fill(wq_, embed_dim());
    fill(bq_, embed_dim());
    fill(wk_, embed_dim());
    fill(bk_, embed_dim());
    fill(wv_, embed_dim());
    fill(bv_, embed_dim());
    fill(wo_, value_dim());
    fill(bo_, value_dim());
    fill(lce_w_, 25);
    fill(lce_b_, 25);
    fuse();
  }

  /// One image: x [height * width, C] in raster order -> [height * width, C].
  template <class Derived>
  Matrix<T> forward(const Eigen::MatrixBase<Derived>& x, Index height, Index width,
                    RmtMode mode = RmtMode::full) const {
    return forward(x, 1, height, width, mode);
  }

  /// A batch: x [batch * height * width, C], image b in rows [b H W, (b + 1) H W) -> [batch *
  /// height * width, C].
  template <class Derived>
  Matrix<T> forward(const Eigen::MatrixBase<Derived>& x, Index batch, Index height, Index width,
                    RmtMode mode = RmtMode::full) const {
    detail::assert_same_scalar<T, typename Derived::Scalar>();
    const char* fn = "ManhattanAttention::forward";
    detail::check_positive(fn, "batch", batch);
    detail::check_positive(fn, "height", height);
    detail::check_positive(fn, "width", width);
    const Index N = height * width, C = embed_dim(), Cv = value_dim();
    detail::check_shape(fn, "x", x, batch * N, C);
    // One GEMM for [q | k | v]; k's dk^(-1/2) is folded into the fused weights.
    Matrix<T> qkv = x * w_qkv_t_;
    qkv.rowwise() += b_qkv_;
    for (Index b = 0; b < batch; ++b)
      rotation_.apply(qkv.block(b * N, 0, N, 2 * C), 0);  // raster index
    GridHeadsShape shape;
    shape.batch = batch;
    shape.height = height;
    shape.width = width;
    shape.heads = heads();
    shape.key_dim = head_dim();
    shape.value_dim = value_head_dim();
    shape.qk_row_stride = shape.v_row_stride = 2 * C + Cv;
    Matrix<T> mixed(batch * N, Cv);
    const T* base = qkv.data();
    if (mode == RmtMode::full)
      multi_head_masa(base, base + C, base + 2 * C, mixed.data(), shape, gammas_, config_.tile);
    else
      multi_head_masad(base, base + C, base + 2 * C, mixed.data(), shape, gammas_, config_.tile);
    mixed += local_context_enhancement(qkv.rightCols(Cv), batch, height, width, lce_w_, lce_b_);
    Matrix<T> y = mixed * wo_.transpose();
    y.rowwise() += bo_;
    return y;
  }

 private:
  static Index checked_head_dim(const ManhattanAttentionConfig& c) {
    const char* fn = "ManhattanAttention";
    detail::check_positive(fn, "embed_dim", c.embed_dim);
    detail::check_positive(fn, "heads", c.heads);
    detail::check_positive(fn, "value_factor", c.value_factor);
    if (c.embed_dim % c.heads != 0)
      detail::fail(fn, "embed_dim " + std::to_string(c.embed_dim) + " is not divisible by heads " +
                           std::to_string(c.heads));
    const Index dk = c.embed_dim / c.heads;
    if (dk % 2 != 0)
      detail::fail(fn, "head dim " + std::to_string(dk) + " is odd; the rotation acts on pairs");
    return dk;
  }

  template <class S>
  void load_raw(const char* fn, Matrix<T>& w, RowVector<T>& b, const S* weight, Index weight_size,
                const S* bias, Index bias_size) {
    detail::assert_scalar<S>();
    if (!weight || !bias) detail::fail(fn, "null weight or bias pointer");
    if (weight_size != w.size())
      detail::fail(fn, "weight has " + std::to_string(weight_size) + " values, expected " +
                           detail::shape_string(w.rows(), w.cols()) + " = " +
                           std::to_string(w.size()));
    if (bias_size != b.size())
      detail::fail(fn, "bias has " + std::to_string(bias_size) + " values, expected " +
                           std::to_string(b.size()));
    const Eigen::Map<const Matrix<S>> wm(weight, w.rows(), w.cols());
    w = wm.template cast<T>();
    b = Eigen::Map<const RowVector<S>>(bias, b.size()).template cast<T>();
    fuse();
  }

  template <class W, class B>
  void load_dense(const char* fn, Matrix<T>& w, RowVector<T>& b, const Eigen::MatrixBase<W>& weight,
                  const Eigen::MatrixBase<B>& bias) {
    detail::assert_scalar<typename W::Scalar>();
    detail::check_shape(fn, "weight", weight, w.rows(), w.cols());
    if (!((bias.rows() == 1 && bias.cols() == b.size()) ||
          (bias.cols() == 1 && bias.rows() == b.size())))
      detail::fail(fn, "bias is " + detail::shape_string(bias.rows(), bias.cols()) +
                           ", expected [1 x " + std::to_string(b.size()) + "]");
    w = weight.template cast<T>();
    for (Index i = 0; i < b.size(); ++i)
      b(i) = static_cast<T>(bias.rows() == 1 ? bias(0, i) : bias(i, 0));
    fuse();
  }

  /// Rebuilds the fused [C, 2C + Cv] projection (transposed, so x * W is a row-major GEMM) and its
  /// bias.
  void fuse() {
    const Index C = embed_dim(), Cv = value_dim();
    const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(head_dim())));
    w_qkv_t_.resize(C, 2 * C + Cv);
    w_qkv_t_.leftCols(C) = wq_.transpose();
    w_qkv_t_.middleCols(C, C) = wk_.transpose() * scale;
    w_qkv_t_.rightCols(Cv) = wv_.transpose();
    b_qkv_.resize(2 * C + Cv);
    b_qkv_ << bq_, bk_ * scale, bv_;
  }

  ManhattanAttentionConfig config_;
  ThetaShift rotation_;
  std::vector<double> gammas_;
  Matrix<T> wq_, wk_, wv_, wo_, lce_w_;
  RowVector<T> bq_, bk_, bv_, bo_, lce_b_;
  Matrix<T> w_qkv_t_;
  RowVector<T> b_qkv_;
};

}  // namespace retention
