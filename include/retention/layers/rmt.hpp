// retention: the RMT attention layer (docs/math.md §4): q, k, v projections with bias, k scaled by
// dk^(-1/2), rotation by raster index, per-head MaSA or MaSAD, local context enhancement (LCE, a
// depthwise 5 x 5 convolution of the V map) added before the output projection. Parameters load by
// the RMT code's names.
#pragma once

#include <retention/core.hpp>
#include <retention/decay.hpp>
#include <retention/detail/manhattan/lce_kernel.hpp>
#include <retention/heads.hpp>
#include <retention/masa.hpp>
#include <retention/nn/linear.hpp>
#include <retention/nn/parameters.hpp>
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
  /// gamma_h = 1 - 2^-(initial_value + heads_range * h / heads) (rmt_gammas), unless `gammas`
  /// is given (one per head) or load() reads a checkpoint's decay buffer.
  double initial_value = 2.0;
  double heads_range = 4.0;
  std::vector<double> gammas;
  /// MaSA (full) or MaSAD (decomposed) when forward() is not told.
  RmtMode mode = RmtMode::full;
  /// Tiling and threading of the kernels (threads: 0 = OpenMP's default, capped by the work).
  MasaOptions tile;
  /// Keep the fused q|k|v projection and the output projection packed for Eigen's GEMM as well
  /// (Linear::set_packed): every forward skips packing them, at the cost of as much memory again
  /// as those weights.
  bool packed_weights = false;
};

namespace detail {

/// LCE of v's image rows [first, first + count) (image row r = b * height + y) into out's token
/// rows, assigned or, with add, added: out[y, x, :] (+)= bias + sum_{i,j<5} taps(5 i + j) (.)
/// v[y + i - 2, x + j - 2, :], the taps in that order. One image row at a time (LceRowKernel), so
/// its sum (width x C) stays in L1 while the 25 taps pass over it; `row` is its buffer [width, C].
template <class DB, class T, class DOut>
void lce_image_rows(const ConstRows<T>& v, Index height, Index width, const Matrix<T>& taps,
                    const Eigen::MatrixBase<DB>& bias, Index first, Index count, bool add,
                    Matrix<T>& row, DOut& out) {
  const Index N = height * width;
  for (Index r = first; r < first + count; ++r) {
    const Index b = r / height, y = r % height;
    row.rowwise() = bias.row(0);
    simd::dispatch<LceRowKernel>(v.data() + b * N * v.outerStride(), Index(v.outerStride()), height,
                                 width, y, taps.data(), Index(taps.cols()), Index(row.cols()),
                                 row.data(), Index(row.cols()));
    auto dst = out.middleRows(b * N + y * width, width);
    if (add)
      dst += row;
    else
      dst = row;
  }
}

/// LCE over all batch * height image rows into out (assigned or added), image rows spread over a
/// team sized by the thread rule.
template <class DV, class DB, class T, class DOut>
void lce_into(const Eigen::MatrixBase<DV>& v, Index batch, Index height, Index width,
              const Matrix<T>& taps, const Eigen::MatrixBase<DB>& bias, bool add, int threads,
              DOut& out) {
  // As the kernels' other fronts do: a view with contiguous rows as it is, anything else copied
  // once (O(N C) against the convolution's 25 N C).
  const ConstRows<T> rows(v.derived());
  const Index C = v.cols();
  const double flops_per_image_row = 50.0 * static_cast<double>(width) * static_cast<double>(C);
  for_row_blocks(
      threads, batch * height, flops_per_image_row,
      [&](Index first, Index count) {
        Matrix<T> row(width, C);
        lce_image_rows(rows, height, width, taps, bias, first, count, add, row, out);
      },
      1);
}

}  // namespace detail

/// Local context enhancement (docs/math.md §4): depthwise 5 x 5 convolution with padding 2 and bias
/// of each [height, width, C] map in v [batch * height * width, C] (torch cross-correlation, zeros
/// outside): out[y, x, c] = bias[c] + sum_{i,j<5} weight(c, 5 i + j) v[y + i - 2, x + j - 2, c].
/// weight [C, 25] is torch's [C, 1, 5, 5] reshaped; bias [1, C]. Returns [batch * height * width,
/// C]. threads: 0 = OpenMP's default, capped by the work (image rows are the tasks).
template <class DV, class DW, class DB>
Matrix<typename DV::Scalar> local_context_enhancement(const Eigen::MatrixBase<DV>& v, Index batch,
                                                      Index height, Index width,
                                                      const Eigen::MatrixBase<DW>& weight,
                                                      const Eigen::MatrixBase<DB>& bias,
                                                      int threads = 0) {
  using T = typename DV::Scalar;
  detail::assert_scalar<T>();
  detail::assert_same_scalar<T, typename DW::Scalar>();
  detail::assert_same_scalar<T, typename DB::Scalar>();
  const char* fn = "local_context_enhancement";
  detail::check_positive(fn, "batch", batch);
  detail::check_positive(fn, "height", height);
  detail::check_positive(fn, "width", width);
  detail::check_threads(fn, "threads", threads);
  const Index C = v.cols(), N = detail::checked_product(fn, "height * width", height, width);
  const Index rows = detail::checked_product(fn, "batch * height * width", batch, N);
  detail::check_shape(fn, "v", v, rows, -1);
  detail::check_shape(fn, "weight", weight, C, 25);
  detail::check_shape(fn, "bias", bias, 1, C);
  // Tap-major copy of the weights, so each tap scales a token's channels with one vector multiply.
  const Matrix<T> taps = weight.transpose();
  Matrix<T> out(rows, C);
  detail::lce_into(v, batch, height, width, taps, bias, false, threads, out);
  return out;
}

/// RMT's attention layer with Manhattan decay (docs/math.md §4), for one image or a batch.
/// x [B * H * W, C] (each image's tokens in raster order) -> y [B * H * W, C]:
/// q = x Wq^T + bq, k = (x Wk^T + bk) dk^(-1/2), v = x Wv^T + bv, q and k rotated by raster index,
/// per head h: O_h = MaSA_h(q, k, v) or MaSAD_h(q, k, v) with gamma_h,
/// y = (concat_h O_h + LCE(v)) Wo^T + bo.
template <class T>
class ManhattanAttention {
 public:
  explicit ManhattanAttention(const ManhattanAttentionConfig& config);

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
  const Linear<T>& q_proj() const { return q_proj_; }
  const Linear<T>& k_proj() const { return k_proj_; }
  const Linear<T>& v_proj() const { return v_proj_; }
  const Linear<T>& out_proj() const { return out_proj_; }
  /// LCE depthwise kernel [Cv, 25] (torch's [Cv, 1, 5, 5]) and bias [Cv].
  const Matrix<T>& lce_weight() const { return lce_w_; }
  const RowVector<T>& lce_bias() const { return lce_b_; }

  /// Sets the per-head gammas (one per head, each in (0, 1]).
  void set_gammas(const std::vector<double>& gammas);

  /// Loads every parameter by the RMT code's names under `prefix` (e.g.
  /// "layers.0.blocks.1.retention."): q_proj, k_proj, v_proj, out_proj (.weight [out, in],
  /// .bias [out]) and lepe.conv (.weight [Cv, 1, 5, 5], .bias [Cv]). When `decay_name` is given
  /// (RMT keeps it per stage, e.g. "layers.0.Relpos.decay"), that [heads] tensor holds ln gamma_h
  /// and sets the gammas. The layer is unchanged unless everything loads.
  template <class Source>
  void load(const Source& source, const std::string& prefix = "",
            const std::string& decay_name = "") {
    const char* fn = "ManhattanAttention::load";
    Linear<T> q = q_proj_, k = k_proj_, v = v_proj_, o = out_proj_;
    q.load(source, prefix + "q_proj.", fn);
    k.load(source, prefix + "k_proj.", fn);
    v.load(source, prefix + "v_proj.", fn);
    o.load(source, prefix + "out_proj.", fn);
    const Index Cv = value_dim();
    Matrix<T> lw(Cv, 25);
    RowVector<T> lb(Cv);
    read_tensor(fn, prefix + "lepe.conv.weight",
                detail::require(fn, source, prefix + "lepe.conv.weight"), {Cv, 1, 5, 5}, lw.data());
    read_tensor(fn, prefix + "lepe.conv.bias",
                detail::require(fn, source, prefix + "lepe.conv.bias"), {Cv}, lb.data());
    std::vector<double> gammas = gammas_;
    if (!decay_name.empty()) {
      std::vector<double> log_gamma(static_cast<std::size_t>(config_.heads));
      read_tensor(fn, decay_name, detail::require(fn, source, decay_name), {config_.heads},
                  log_gamma.data());
      for (std::size_t h = 0; h < log_gamma.size(); ++h) {
        gammas[h] = std::exp(log_gamma[h]);
        if (!(gammas[h] > 0.0 && gammas[h] <= 1.0))
          detail::fail(fn, "parameter '" + decay_name + "'[" + std::to_string(h) +
                               "] = " + std::to_string(log_gamma[h]) +
                               " is not ln gamma of a gamma in (0, 1]");
      }
    }
    q_proj_ = std::move(q), k_proj_ = std::move(k), v_proj_ = std::move(v);
    out_proj_ = std::move(o), lce_w_.swap(lw), lce_b_.swap(lb), gammas_.swap(gammas);
    fuse();
  }

  /// Deterministic initialisation for examples and benchmarks: every weight and bias uniform in
  /// [-1/sqrt(fan_in), 1/sqrt(fan_in)) (torch's default bound), drawn from mt19937_64(seed).
  void init_random(std::uint64_t seed);

  /// One image: x [height * width, C] in raster order -> [height * width, C], in config().mode.
  template <class Derived>
  Matrix<T> forward(const Eigen::MatrixBase<Derived>& x, Index height, Index width) const {
    return forward(x, 1, height, width, config_.mode);
  }
  /// One image in the given mode.
  template <class Derived>
  Matrix<T> forward(const Eigen::MatrixBase<Derived>& x, Index height, Index width,
                    RmtMode mode) const {
    return forward(x, 1, height, width, mode);
  }

  /// A batch: x [batch * height * width, C], image b in rows [b H W, (b + 1) H W) -> [batch *
  /// height * width, C], in config().mode.
  template <class Derived>
  Matrix<T> forward(const Eigen::MatrixBase<Derived>& x, Index batch, Index height,
                    Index width) const {
    return forward(x, batch, height, width, config_.mode);
  }
  /// A batch in the given mode.
  template <class Derived>
  Matrix<T> forward(const Eigen::MatrixBase<Derived>& x, Index batch, Index height, Index width,
                    RmtMode mode) const {
    detail::assert_same_scalar<T, typename Derived::Scalar>();
    return forward_impl(x.derived(), batch, height, width, mode);
  }

 private:
  static Index checked_head_dim(const ManhattanAttentionConfig& c) {
    const char* fn = "ManhattanAttention";
    detail::check_positive(fn, "embed_dim", c.embed_dim);
    detail::check_positive(fn, "heads", c.heads);
    detail::check_positive(fn, "value_factor", c.value_factor);
    detail::checked_product(fn, "value_factor * embed_dim", c.value_factor, c.embed_dim);
    detail::checked_product(fn, "embed_dim * value_factor * embed_dim", c.embed_dim,
                            c.value_factor * c.embed_dim);
    if (c.embed_dim % c.heads != 0)
      detail::fail(fn, "embed_dim " + std::to_string(c.embed_dim) + " is not divisible by heads " +
                           std::to_string(c.heads));
    const Index dk = c.embed_dim / c.heads;
    if (dk % 2 != 0)
      detail::fail(fn, "head dim " + std::to_string(dk) + " is odd; the rotation acts on pairs");
    return dk;
  }

  /// The fused [q | k dk^-1/2 | v] projection.
  void fuse();

  // The work of every forward(): x as a row-major view (a copy only when x is an expression,
  // column-major or strided). Defined after the class without `inline`, as are the constructor,
  // set_gammas, init_random and fuse, so that compiled mode (RETENTION_COMPILED, see the end of
  // this file) leaves their instantiation to the library.
  Matrix<T> forward_impl(const Eigen::Ref<const Matrix<T>>& x, Index batch, Index height,
                         Index width, RmtMode mode) const;

  ManhattanAttentionConfig config_;
  ThetaShift rotation_;
  std::vector<double> gammas_;
  Linear<T> q_proj_, k_proj_, v_proj_, out_proj_, fused_;
  Matrix<T> lce_w_;
  RowVector<T> lce_b_;
};

template <class T>
ManhattanAttention<T>::ManhattanAttention(const ManhattanAttentionConfig& config)
    : config_(config), rotation_(checked_head_dim(config)) {
  const char* fn = "ManhattanAttention";
  detail::check_masa_options(fn, config.tile);
  if (config.mode != RmtMode::full && config.mode != RmtMode::decomposed)
    detail::fail(fn, "mode is not one of full, decomposed");
  if (config.gammas.empty())
    gammas_ = rmt_gammas(config.heads, config.initial_value, config.heads_range);
  else
    set_gammas(config.gammas);
  const Index C = config.embed_dim, Cv = value_dim();
  q_proj_ = Linear<T>(C, C, true);
  k_proj_ = Linear<T>(C, C, true);
  v_proj_ = Linear<T>(C, Cv, true);
  out_proj_ = Linear<T>(Cv, C, true);
  out_proj_.set_packed(config.packed_weights);
  lce_w_ = Matrix<T>::Zero(Cv, 25);
  lce_b_ = RowVector<T>::Zero(Cv);
  fuse();
}

template <class T>
void ManhattanAttention<T>::set_gammas(const std::vector<double>& gammas) {
  const char* fn = "ManhattanAttention::set_gammas";
  if (static_cast<Index>(gammas.size()) != config_.heads)
    detail::fail(fn, "gammas has " + std::to_string(gammas.size()) +
                         " entries, expected heads = " + std::to_string(config_.heads));
  for (double g : gammas) detail::check_gamma(fn, g);
  gammas_ = gammas;
}

template <class T>
void ManhattanAttention<T>::init_random(std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  const auto fill = [&rng](auto& m, Index fan_in) {
    std::uniform_real_distribution<double> dist(-1.0, 1.0);
    const double bound = 1.0 / std::sqrt(static_cast<double>(fan_in));
    for (Index i = 0; i < m.rows(); ++i)
      for (Index j = 0; j < m.cols(); ++j) m(i, j) = static_cast<T>(bound * dist(rng));
  };
  for (Linear<T>* l : {&q_proj_, &k_proj_, &v_proj_, &out_proj_}) {
    Matrix<T> w(l->out_features(), l->in_features());
    RowVector<T> b(l->out_features());
    fill(w, l->in_features());
    fill(b, l->in_features());
    l->set_weight(w);
    l->set_bias(b);
  }
  fill(lce_w_, 25);
  fill(lce_b_, 25);
  fuse();
}

template <class T>
void ManhattanAttention<T>::fuse() {
  fused_ = Linear<T>::concat({{&q_proj_, 1.0},
                              {&k_proj_, 1.0 / std::sqrt(static_cast<double>(head_dim()))},
                              {&v_proj_, 1.0}});
  fused_.set_packed(config_.packed_weights);
}

template <class T>
Matrix<T> ManhattanAttention<T>::forward_impl(const Eigen::Ref<const Matrix<T>>& x, Index batch,
                                              Index height, Index width, RmtMode mode) const {
  const char* fn = "ManhattanAttention::forward";
  detail::check_positive(fn, "batch", batch);
  detail::check_positive(fn, "height", height);
  detail::check_positive(fn, "width", width);
  if (mode != RmtMode::full && mode != RmtMode::decomposed)
    detail::fail(fn, "mode is not one of full, decomposed");
  const Index N = detail::checked_product(fn, "height * width", height, width);
  const Index rows = detail::checked_product(fn, "batch * height * width", batch, N);
  const Index C = embed_dim(), Cv = value_dim(), H = heads(), width3 = 2 * C + Cv;
  detail::checked_product(fn, "rows * (2 C + Cv)", rows, width3);
  detail::check_shape(fn, "x", x, rows, C);
  // One projection into [q | k dk^-1/2 | v], q and k rotated in place by raster index.
  Matrix<T> qkv(rows, width3);
  const int threads = config_.tile.threads;
  fused_.forward_into(x, qkv, threads);
  for (Index b = 0; b < batch; ++b) rotation_.apply(qkv.block(b * N, 0, N, 2 * C), 0, threads);
  std::vector<ManhattanDecay> masks;
  masks.reserve(static_cast<std::size_t>(H));
  for (double g : gammas_) masks.emplace_back(g, height, width);
  const Index dk = head_dim(), dv = value_head_dim(), seq = N * width3;
  const T* base = qkv.data();
  const HeadsView<const T> q{base, batch, N, H, dk, seq, width3, dk};
  const HeadsView<const T> k{base + C, batch, N, H, dk, seq, width3, dk};
  const HeadsView<const T> v{base + 2 * C, batch, N, H, dv, seq, width3, dv};
  Matrix<T> mixed(rows, Cv);
  const HeadsView<T> out = heads_view(mixed.data(), batch, N, H, dv);
  if (mode == RmtMode::full)
    multi_head_masa(q, k, v, out, masks, config_.tile);
  else
    multi_head_masad(q, k, v, out, masks, config_.tile);
  const Matrix<T> taps = lce_w_.transpose();  // [25, Cv]: one row per tap
  detail::lce_into(qkv.rightCols(Cv), batch, height, width, taps, lce_b_, true, threads, mixed);
  Matrix<T> y(rows, C);
  out_proj_.forward_into(mixed, y, threads);
  return y;
}

#if defined(RETENTION_COMPILED) && !defined(RETENTION_COMPILED_BUILDING)
// Compiled mode: the float and double layers are instantiated once, in the retention_compiled
// library (src/rmt_*.cpp); translation units that include this header compile only the wrappers.
extern template class ManhattanAttention<float>;
extern template class ManhattanAttention<double>;
#endif

}  // namespace retention
