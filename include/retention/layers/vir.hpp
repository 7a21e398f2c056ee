// retention: ViR (Vision Retention Networks, SPEC 5): multi-head retention (MHR), the pre-norm
// block and the encoder, each runnable in the parallel, recurrent and chunkwise forms, and the
// encoder also chunk-major (each chunk of tokens through every block, one state per block and
// head), which bounds activation memory by the chunk instead of the image. Retention itself is the
// library's kernels.
#pragma once

#include <retention/chunkwise.hpp>
#include <retention/core.hpp>
#include <retention/decay.hpp>
#include <retention/multihead.hpp>
#include <retention/nn/norms.hpp>
#include <retention/parallel.hpp>
#include <retention/recurrent.hpp>
#include <retention/state.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace retention {

/// Order in which the encoder walks (tokens x blocks): every token through one block before the
/// next block (layer-major), or every block for one chunk of tokens before the next chunk
/// (chunk-major; exact because LayerNorm and MLP act per token and retention carries a state).
enum class VirOrder { layer_major, chunk_major };

inline const char* to_string(VirOrder o) {
  return o == VirOrder::layer_major ? "layer-major" : "chunk-major";
}

/// Run options shared by VirRetention, VirBlock and VirEncoder.
struct VirOptions {
  Form form = Form::parallel;
  /// Chunkwise form: the kernel's chunk length. Chunk-major order: tokens per chunk (then the
  /// chunkwise kernel sees each chunk whole). Must be >= 1 whenever it is used.
  Index chunk = 64;
  /// Encoder only; MHR and a block always see the rows they are given.
  VirOrder order = VirOrder::layer_major;
  /// OpenMP threads over heads; 0 = OpenMP's default. Ignored without OpenMP.
  int threads = 0;
};

/// Sizes and constants of a ViR encoder.
struct VirConfig {
  /// Training resolution: the learned position embedding covers (image_size / patch_size)^2
  /// patches. Other resolutions (multiples of the patch) resample it bilinearly.
  Index image_size = 224;
  Index patch_size = 16;
  Index in_channels = 3;
  Index embed_dim = 384;
  Index heads = 6;
  Index depth = 12;
  /// MLP hidden width = embed_dim * mlp_ratio (truncated, as timm does).
  double mlp_ratio = 4.0;
  /// SPEC 5: the ViR encoder builds every LayerNorm (both of each block and the final one) with eps
  /// 1e-6. The issue text's block default 1e-5 is a bare torch LayerNorm's default; SPEC wins, and
  /// a loader of weights trained with 1e-5 must set it here.
  double layer_norm_eps = 1e-6;
  /// Initial value of every layer-scale entry ls1, ls2 (1 = no layer scale).
  double layer_scale_init = 1.0;
  /// Per-head gammas; empty = linspace_gammas(heads) (SPEC 1, ViR).
  std::vector<double> gammas;

  Index head_dim() const { return heads > 0 ? embed_dim / heads : 0; }
  Index mlp_hidden() const {
    return static_cast<Index>(static_cast<double>(embed_dim) * mlp_ratio);
  }
  Index grid() const { return patch_size > 0 ? image_size / patch_size : 0; }
};

/// ViR-S/16: 384 channels, 6 heads, 12 blocks, MLP ratio 4.
inline VirConfig vir_s16(Index image_size = 224) {
  VirConfig c;
  c.image_size = image_size;
  c.patch_size = 16;
  c.embed_dim = 384;
  c.heads = 6;
  c.depth = 12;
  return c;
}

/// ViR-B/16: 768 channels, 12 heads, 12 blocks, MLP ratio 4.
inline VirConfig vir_b16(Index image_size = 224) {
  VirConfig c = vir_s16(image_size);
  c.embed_dim = 768;
  c.heads = 12;
  return c;
}

/// ViR-L/16: 1024 channels, 16 heads, 24 blocks, MLP ratio 4.
inline VirConfig vir_l16(Index image_size = 224) {
  VirConfig c = vir_s16(image_size);
  c.embed_dim = 1024;
  c.heads = 16;
  c.depth = 24;
  return c;
}

/// An image as a row-major [height, width, channels] array (HWC, what image decoders return).
template <class P>
struct ImageView {
  const P* data = nullptr;
  Index height = 0;
  Index width = 0;
  Index channels = 3;
};

/// Weights of the MHR layer, torch layout [out, in]: qkv = Linear(C -> 3C), proj = Linear(C -> C).
template <class T>
struct VirRetentionWeights {
  Matrix<T> qkv_weight;    // [3C, C], rows (q | k | v) x heads x head_dim
  RowVector<T> qkv_bias;   // [3C]
  Matrix<T> proj_weight;   // [C, C]
  RowVector<T> proj_bias;  // [C]
};

/// Weights of a block other than its MHR: two affine LayerNorms, two layer scales, the MLP.
template <class T>
struct VirBlockWeights {
  RowVector<T> norm1_weight, norm1_bias;  // [C]
  RowVector<T> ls1;                       // [C]
  RowVector<T> norm2_weight, norm2_bias;  // [C]
  Matrix<T> fc1_weight;                   // [hidden, C]
  RowVector<T> fc1_bias;                  // [hidden]
  Matrix<T> fc2_weight;                   // [C, hidden]
  RowVector<T> fc2_bias;                  // [C]
  RowVector<T> ls2;                       // [C]
};

/// One named parameter of the encoder: its torch name and shape, and where its values live
/// (contiguous, row-major = torch's contiguous layout).
template <class P>
struct VirParameter {
  std::string name;
  std::vector<Index> shape;
  P* data;
  Index size() const {
    Index n = 1;
    for (Index s : shape) n *= s;
    return n;
  }
};

namespace detail {

inline std::string dims_string(const std::vector<Index>& dims) {
  std::ostringstream s;
  s << '[';
  for (std::size_t i = 0; i < dims.size(); ++i) s << (i ? " x " : "") << dims[i];
  s << ']';
  return s.str();
}

/// Throws unless the vector-like `v` has n entries.
template <class Derived>
void check_vector(const char* fn, const char* name, const Eigen::MatrixBase<Derived>& v, Index n) {
  if (v.size() != n || (v.rows() != 1 && v.cols() != 1))
    fail(fn, std::string(name) + " is " + shape_string(v.rows(), v.cols()) + ", expected " +
                 shape_string(1, n));
}

inline void check_vir_options(const char* fn, const VirOptions& o, bool encoder) {
  const bool uses_chunk =
      o.form == Form::chunkwise || (encoder && o.order == VirOrder::chunk_major);
  if (uses_chunk && o.chunk < 1)
    fail(fn, "options.chunk must be >= 1, got " + std::to_string(o.chunk));
  if (o.threads < 0) fail(fn, "options.threads must be >= 0, got " + std::to_string(o.threads));
}

inline std::vector<double> vir_gammas(const char* fn, Index heads,
                                      const std::vector<double>& given) {
  if (given.empty()) return linspace_gammas(heads);
  if (static_cast<Index>(given.size()) != heads)
    fail(fn, "gammas has " + std::to_string(given.size()) +
                 " entries, expected heads = " + std::to_string(heads));
  for (double g : given) check_gamma(fn, g);
  return given;
}

/// Exact (erf) GELU in place: x * (1 + erf(x / sqrt 2)) / 2.
template <class T>
void gelu_inplace(Matrix<T>& x) {
  const T r = static_cast<T>(0.70710678118654752440);
  x = x.unaryExpr(
      [r](T v) { return static_cast<T>(0.5) * v * (static_cast<T>(1) + std::erf(v * r)); });
}

/// Deterministic pseudo-random numbers (splitmix64), independent of the standard library's
/// distributions so that every platform builds the same "random" model.
class VirRng {
 public:
  explicit VirRng(std::uint64_t seed) : s_(seed * 0x9E3779B97F4A7C15ull + 0x2545F4914F6CDD1Dull) {}
  std::uint64_t next() {
    std::uint64_t z = (s_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  /// Uniform in (0, 1).
  double uniform() {
    return (static_cast<double>(next() >> 11) + 0.5) * (1.0 / 9007199254740992.0);
  }
  /// Normal(0, std^2) truncated to [-2 std, 2 std] (rejection; Box-Muller, both outputs used).
  double trunc_normal(double std_dev) {
    for (;;) {
      double n;
      if (has_spare_) {
        n = spare_;
        has_spare_ = false;
      } else {
        const double r = std::sqrt(-2.0 * std::log(uniform())),
                     a = 6.283185307179586476925 * uniform();
        n = r * std::cos(a);
        spare_ = r * std::sin(a);
        has_spare_ = true;
      }
      if (std::abs(n) <= 2.0) return n * std_dev;
    }
  }
  template <class M>
  void fill(M& m, double std_dev) {
    for (Index i = 0; i < m.size(); ++i)
      m.data()[i] = static_cast<typename M::Scalar>(trunc_normal(std_dev));
  }

 private:
  std::uint64_t s_;
  double spare_ = 0.0;
  bool has_spare_ = false;
};

}  // namespace detail

// =================================================================================================
// MHR
// =================================================================================================

/// ViR multi-head retention (SPEC 5): [q | k | v] = x Wqkv^T + b (C -> 3C), q scaled by
/// head_dim^-1/2, per head plain causal retention o_n = sum_{m<=n} gamma_h^(n-m) (q_n . k_m) v_m (+
/// the carried-in state, SPEC 2), normalisation none, no gate, norm or rotation; y = concat_h(o_h)
/// Wproj^T + b.
template <class T>
class VirRetention {
 public:
  /// Zero weights (fill through weights()); dim = C, heads divides C; gammas empty = linspace.
  VirRetention(Index dim, Index heads, std::vector<double> gammas = {}) : dim_(dim), heads_(heads) {
    detail::assert_scalar<T>();
    const char* fn = "VirRetention";
    detail::check_positive(fn, "dim", dim);
    detail::check_positive(fn, "heads", heads);
    if (dim % heads != 0)
      detail::fail(fn, "dim " + std::to_string(dim) + " is not a multiple of heads " +
                           std::to_string(heads));
    gammas_ = detail::vir_gammas(fn, heads, gammas);
    w_.qkv_weight = Matrix<T>::Zero(3 * dim, dim);
    w_.qkv_bias = RowVector<T>::Zero(3 * dim);
    w_.proj_weight = Matrix<T>::Zero(dim, dim);
    w_.proj_bias = RowVector<T>::Zero(dim);
  }
  /// With the given weights (shapes checked here and on every forward).
  VirRetention(Index dim, Index heads, VirRetentionWeights<T> weights,
               std::vector<double> gammas = {})
      : VirRetention(dim, heads, std::move(gammas)) {
    w_ = std::move(weights);
    check_weights("VirRetention");
  }

  Index dim() const { return dim_; }
  Index heads() const { return heads_; }
  Index head_dim() const { return dim_ / heads_; }
  const std::vector<double>& gammas() const { return gammas_; }
  VirRetentionWeights<T>& weights() { return w_; }
  const VirRetentionWeights<T>& weights() const { return w_; }

  /// Zero states for all heads (S [head_dim, head_dim], position 0), index h.
  std::vector<RetentionState<T>> zero_states() const {
    return std::vector<RetentionState<T>>(static_cast<std::size_t>(heads_),
                                          RetentionState<T>(head_dim(), head_dim()));
  }

  /// x [T, C] -> y [T, C] in options.form. `states` (optional, one per head): if non-empty, the
  /// state carried in from earlier tokens; always replaced by the state after the last row, so that
  /// consecutive calls equal one call over the concatenated rows.
  template <class Derived>
  Matrix<T> forward(const Eigen::MatrixBase<Derived>& x, const VirOptions& options = VirOptions(),
                    std::vector<RetentionState<T>>* states = nullptr) const {
    detail::assert_same_scalar<T, typename Derived::Scalar>();
    const char* fn = "VirRetention::forward";
    check_weights(fn);
    detail::check_shape(fn, "x", x, -1, dim_);
    detail::check_vir_options(fn, options, false);
    const Index hd = head_dim();
    const bool has_initial = states && !states->empty();
    if (has_initial) {
      if (static_cast<Index>(states->size()) != heads_)
        detail::fail(fn, "states has " + std::to_string(states->size()) +
                             " entries, expected heads = " + std::to_string(heads_));
      for (const auto& s : *states) detail::check_state(fn, s, hd, hd, "states[h]");
    }
    const Index T_len = x.rows(), C = dim_;
    if (states && !has_initial) *states = zero_states();

    Matrix<T> qkv(T_len, 3 * C);
    qkv.noalias() = x * w_.qkv_weight.transpose();
    qkv.rowwise() += w_.qkv_bias;
    qkv.leftCols(C) *= static_cast<T>(1.0 / std::sqrt(static_cast<double>(hd)));
    Matrix<T> o(T_len, C);
    const int threads = detail::thread_count(options.threads);
    (void)threads;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(threads)
#endif
    for (Index h = 0; h < heads_; ++h) {
      const CausalDecay decay(gammas_[static_cast<std::size_t>(h)]);
      RetentionOptions<T> ro;
      ro.normalization = Normalization::none;
      if (has_initial) ro.initial_state = &(*states)[static_cast<std::size_t>(h)];
      if (states) ro.final_state = &(*states)[static_cast<std::size_t>(h)];
      const auto Q = qkv.middleCols(h * hd, hd);
      const auto K = qkv.middleCols(C + h * hd, hd);
      const auto V = qkv.middleCols(2 * C + h * hd, hd);
      switch (options.form) {
        case Form::parallel:
          parallel_retention_into(Q, K, V, decay, o.middleCols(h * hd, hd), ro);
          break;
        case Form::recurrent:
          recurrent_retention_into(Q, K, V, decay, o.middleCols(h * hd, hd), ro);
          break;
        case Form::chunkwise:
          chunkwise_retention_into(Q, K, V, decay, options.chunk, o.middleCols(h * hd, hd), ro);
          break;
      }
    }
    qkv.resize(0, 0);  // release before the projection: peak activation stays ~ 4 [T, C]
    Matrix<T> y(T_len, C);
    y.noalias() = o * w_.proj_weight.transpose();
    y.rowwise() += w_.proj_bias;
    return y;
  }

  /// One token x_t [1, C] -> [1, C] through the recurrent form, advancing `states` (one per head).
  template <class Derived>
  RowVector<T> step(const Eigen::MatrixBase<Derived>& x_t,
                    std::vector<RetentionState<T>>& states) const {
    VirOptions o;
    o.form = Form::recurrent;
    o.threads = 1;
    return forward(x_t, o, &states);
  }

 private:
  void check_weights(const char* fn) const {
    const Index C = dim_;
    detail::check_shape(fn, "qkv_weight", w_.qkv_weight, 3 * C, C);
    detail::check_vector(fn, "qkv_bias", w_.qkv_bias, 3 * C);
    detail::check_shape(fn, "proj_weight", w_.proj_weight, C, C);
    detail::check_vector(fn, "proj_bias", w_.proj_bias, C);
  }

  Index dim_, heads_;
  std::vector<double> gammas_;
  VirRetentionWeights<T> w_;
};

// =================================================================================================
// Block
// =================================================================================================

/// ViR block (SPEC 5, pre-norm): x += ls1 (.) MHR(LN1(x)); x += ls2 (.) fc2(GELU(fc1(LN2(x)))),
/// exact erf GELU, affine LayerNorms with eps = config.layer_norm_eps. x [T, C].
template <class T>
class VirBlock {
 public:
  /// LayerNorm weights 1 and biases 0, layer scales config.layer_scale_init, all else 0.
  explicit VirBlock(const VirConfig& config)
      : config_(config), retention_(config.embed_dim, config.heads, config.gammas) {
    detail::assert_scalar<T>();
    const Index C = config.embed_dim, Hd = config.mlp_hidden();
    detail::check_positive("VirBlock", "mlp hidden width", Hd);
    w_.norm1_weight = RowVector<T>::Ones(C);
    w_.norm1_bias = RowVector<T>::Zero(C);
    w_.norm2_weight = RowVector<T>::Ones(C);
    w_.norm2_bias = RowVector<T>::Zero(C);
    w_.ls1 = RowVector<T>::Constant(C, static_cast<T>(config.layer_scale_init));
    w_.ls2 = RowVector<T>::Constant(C, static_cast<T>(config.layer_scale_init));
    w_.fc1_weight = Matrix<T>::Zero(Hd, C);
    w_.fc1_bias = RowVector<T>::Zero(Hd);
    w_.fc2_weight = Matrix<T>::Zero(C, Hd);
    w_.fc2_bias = RowVector<T>::Zero(C);
  }

  const VirConfig& config() const { return config_; }
  VirRetention<T>& retention() { return retention_; }
  const VirRetention<T>& retention() const { return retention_; }
  VirBlockWeights<T>& weights() { return w_; }
  const VirBlockWeights<T>& weights() const { return w_; }

  /// x [T, C] -> [T, C]; `states` as in VirRetention::forward.
  template <class Derived>
  Matrix<T> forward(const Eigen::MatrixBase<Derived>& x, const VirOptions& options = VirOptions(),
                    std::vector<RetentionState<T>>* states = nullptr) const {
    detail::assert_same_scalar<T, typename Derived::Scalar>();
    Matrix<T> y = x;
    forward_inplace(y, options, states);
    return y;
  }

  /// In place on x [T, C] (the encoder's path: no copy of the residual stream).
  void forward_inplace(Matrix<T>& x, const VirOptions& options = VirOptions(),
                       std::vector<RetentionState<T>>* states = nullptr) const {
    const char* fn = "VirBlock::forward";
    check_weights(fn);
    detail::check_shape(fn, "x", x, -1, config_.embed_dim);
    const double eps = config_.layer_norm_eps;
    {
      const Matrix<T> h = layer_norm(x, w_.norm1_weight, w_.norm1_bias, eps);
      const Matrix<T> a = retention_.forward(h, options, states);
      x.array() += a.array().rowwise() * w_.ls1.array();
    }
    {
      Matrix<T> u(x.rows(), w_.fc1_weight.rows());
      {
        const Matrix<T> h = layer_norm(x, w_.norm2_weight, w_.norm2_bias, eps);
        u.noalias() = h * w_.fc1_weight.transpose();
      }
      u.rowwise() += w_.fc1_bias;
      detail::gelu_inplace(u);
      Matrix<T> m(x.rows(), x.cols());
      m.noalias() = u * w_.fc2_weight.transpose();
      m.rowwise() += w_.fc2_bias;
      x.array() += m.array().rowwise() * w_.ls2.array();
    }
  }

 private:
  void check_weights(const char* fn) const {
    const Index C = config_.embed_dim, Hd = config_.mlp_hidden();
    detail::check_vector(fn, "norm1_weight", w_.norm1_weight, C);
    detail::check_vector(fn, "norm1_bias", w_.norm1_bias, C);
    detail::check_vector(fn, "ls1", w_.ls1, C);
    detail::check_vector(fn, "norm2_weight", w_.norm2_weight, C);
    detail::check_vector(fn, "norm2_bias", w_.norm2_bias, C);
    detail::check_shape(fn, "fc1_weight", w_.fc1_weight, Hd, C);
    detail::check_vector(fn, "fc1_bias", w_.fc1_bias, Hd);
    detail::check_shape(fn, "fc2_weight", w_.fc2_weight, C, Hd);
    detail::check_vector(fn, "fc2_bias", w_.fc2_bias, C);
    detail::check_vector(fn, "ls2", w_.ls2, C);
  }

  VirConfig config_;
  VirRetention<T> retention_;
  VirBlockWeights<T> w_;
};

// =================================================================================================
// Encoder
// =================================================================================================

/// ViR encoder (SPEC 5): tokens = patch embedding (stride-p p x p convolution = a linear map of
/// each flattened patch) + learned position embedding, then the class token appended at the END
/// (after the position embedding, so the class token gets none: SPEC 5 adds the position embedding
/// to the patches and appends the class token afterwards); depth blocks; final LayerNorm; the class
/// token's row is the image feature. Image [H, W, in_channels] -> tokens [N + 1, C], N =
/// (H/p)(W/p), raster order.
template <class T>
class VirEncoder {
 public:
  /// Deterministic random model: every weight and embedding ~ N(0, 0.02^2) truncated at 2 std,
  /// biases 0, LayerNorms (1, 0), layer scales config.layer_scale_init; same seed, same model.
  explicit VirEncoder(const VirConfig& config, std::uint64_t seed = 0) : config_(config) {
    detail::assert_scalar<T>();
    check_config();
    const Index C = config.embed_dim, p = config.patch_size, G = config.grid();
    patch_weight_ = Matrix<T>::Zero(C, config.in_channels * p * p);
    patch_bias_ = RowVector<T>::Zero(C);
    pos_embed_ = Matrix<T>::Zero(G * G, C);
    cls_token_ = RowVector<T>::Zero(C);
    norm_weight_ = RowVector<T>::Ones(C);
    norm_bias_ = RowVector<T>::Zero(C);
    blocks_.reserve(static_cast<std::size_t>(config.depth));
    for (Index d = 0; d < config.depth; ++d) blocks_.emplace_back(config_);
    detail::VirRng rng(seed);
    const double s = 0.02;
    rng.fill(patch_weight_, s);
    rng.fill(pos_embed_, s);
    rng.fill(cls_token_, s);
    for (auto& b : blocks_) {
      rng.fill(b.retention().weights().qkv_weight, s);
      rng.fill(b.retention().weights().proj_weight, s);
      rng.fill(b.weights().fc1_weight, s);
      rng.fill(b.weights().fc2_weight, s);
    }
  }

  const VirConfig& config() const { return config_; }
  Index depth() const { return config_.depth; }
  std::vector<VirBlock<T>>& blocks() { return blocks_; }
  const std::vector<VirBlock<T>>& blocks() const { return blocks_; }

  /// Every parameter with its torch name and shape (timm ViT naming; the class token is separate
  /// from pos_embed, which covers the patches only), in a fixed order. Data is row-major, so a
  /// contiguous torch tensor's buffer copies in unchanged, e.g. patch_embed.proj.weight [C, 3, p,
  /// p].
  std::vector<VirParameter<T>> parameters() { return parameter_table<T>(*this); }
  std::vector<VirParameter<const T>> parameters() const { return parameter_table<const T>(*this); }

  /// Number of scalars over all parameters.
  Index parameter_count() const {
    Index n = 0;
    for (const auto& p : parameters()) n += p.size();
    return n;
  }

  /// Copies a torch-layout array into the parameter `name`; `shape` must equal the torch shape
  /// listed by parameters() exactly. S may differ from T (e.g. float checkpoints into a double
  /// model).
  template <class S>
  void load(const std::string& name, const S* data, const std::vector<Index>& shape) {
    const char* fn = "VirEncoder::load";
    if (!data) detail::fail(fn, name + ": null data pointer");
    for (auto& p : parameters()) {
      if (p.name != name) continue;
      if (p.shape != shape)
        detail::fail(fn, name + " is " + detail::dims_string(shape) + ", expected " +
                             detail::dims_string(p.shape));
      const Index n = p.size();
      for (Index i = 0; i < n; ++i) p.data[i] = static_cast<T>(data[i]);
      return;
    }
    detail::fail(fn, "unknown parameter \"" + name + "\"");
  }

  /// Input tokens [count, C], rows [first, first + count) of the sequence: row n < N is patch n
  /// (raster order) = Wp vec(patch n) + bp + pos_n, row N is the class token. Image [H, W,
  /// in_channels].
  template <class P>
  Matrix<T> tokens(const ImageView<P>& image, Index first, Index count) const {
    const char* fn = "VirEncoder::tokens";
    const Grid g = check_image(fn, image);
    if (first < 0 || count < 0 || first + count > g.tokens())
      detail::fail(fn, "rows [" + std::to_string(first) + ", " + std::to_string(first + count) +
                           ") outside the " + std::to_string(g.tokens()) + " tokens");
    return make_tokens(image, g, first, count);
  }

  /// Image [H, W, in_channels] (H, W multiples of patch_size) -> all output tokens [N + 1, C] after
  /// the final LayerNorm; row N is the class token. Chunk-major order keeps the output rows only.
  template <class P>
  Matrix<T> forward_tokens(const ImageView<P>& image,
                           const VirOptions& options = VirOptions()) const {
    Matrix<T> all;
    run("VirEncoder::forward_tokens", image, options, &all, nullptr);
    return all;
  }

  /// Image [H, W, in_channels] -> the image feature [C] = LN(final class-token row). In chunk-major
  /// order activation memory is O(chunk * C) plus depth * heads retention states.
  template <class P>
  RowVector<T> forward(const ImageView<P>& image, const VirOptions& options = VirOptions()) const {
    RowVector<T> feature;
    run("VirEncoder::forward", image, options, nullptr, &feature);
    return feature;
  }

 private:
  struct Grid {
    Index h, w;
    Index patches() const { return h * w; }
    Index tokens() const { return h * w + 1; }
  };

  void check_config() const {
    const char* fn = "VirEncoder";
    const VirConfig& c = config_;
    detail::check_positive(fn, "config.image_size", c.image_size);
    detail::check_positive(fn, "config.patch_size", c.patch_size);
    detail::check_positive(fn, "config.in_channels", c.in_channels);
    detail::check_positive(fn, "config.embed_dim", c.embed_dim);
    detail::check_positive(fn, "config.heads", c.heads);
    detail::check_positive(fn, "config.depth", c.depth);
    if (c.image_size % c.patch_size != 0)
      detail::fail(fn, "config.image_size " + std::to_string(c.image_size) +
                           " is not a multiple of config.patch_size " +
                           std::to_string(c.patch_size));
    if (c.embed_dim % c.heads != 0)
      detail::fail(fn, "config.embed_dim " + std::to_string(c.embed_dim) +
                           " is not a multiple of config.heads " + std::to_string(c.heads));
    if (!(c.layer_norm_eps >= 0.0)) detail::fail(fn, "config.layer_norm_eps must be >= 0");
  }

  template <class P>
  Grid check_image(const char* fn, const ImageView<P>& im) const {
    const Index p = config_.patch_size;
    const std::string got = detail::dims_string({im.height, im.width, im.channels});
    if (im.channels != config_.in_channels)
      detail::fail(fn, "image is " + got + ", expected [H x W x " +
                           std::to_string(config_.in_channels) + "]");
    if (im.height < p || im.width < p || im.height % p != 0 || im.width % p != 0)
      detail::fail(fn, "image is " + got +
                           ", expected height and width positive multiples of patch_size " +
                           std::to_string(p));
    if (!im.data) detail::fail(fn, "image data is a null pointer");
    return Grid{im.height / p, im.width / p};
  }

  /// Position embedding of patch (gy, gx) on a gh x gw grid: the learned row when the grid is the
  /// training grid, else bilinear resampling of the learned G x G grid (torch interpolate,
  /// align_corners = false: src = (dst + 0.5) * G / g - 0.5, clamped at 0).
  void position_row(Index gy, Index gx, const Grid& g, Eigen::Ref<RowVector<T>> out) const {
    const Index G = config_.grid();
    if (g.h == G && g.w == G) {
      out = pos_embed_.row(gy * G + gx);
      return;
    }
    auto axis = [G](Index dst, Index n, Index& i0, Index& i1, double& l1) {
      double src =
          (static_cast<double>(dst) + 0.5) * static_cast<double>(G) / static_cast<double>(n) - 0.5;
      if (src < 0.0) src = 0.0;
      i0 = std::min(static_cast<Index>(src), G - 1);
      i1 = i0 < G - 1 ? i0 + 1 : i0;
      l1 = src - static_cast<double>(i0);
    };
    Index y0, y1, x0, x1;
    double ly, lx;
    axis(gy, g.h, y0, y1, ly);
    axis(gx, g.w, x0, x1, lx);
    const T a = static_cast<T>((1 - ly) * (1 - lx)), b = static_cast<T>((1 - ly) * lx);
    const T c = static_cast<T>(ly * (1 - lx)), d = static_cast<T>(ly * lx);
    out = a * pos_embed_.row(y0 * G + x0) + b * pos_embed_.row(y0 * G + x1) +
          c * pos_embed_.row(y1 * G + x0) + d * pos_embed_.row(y1 * G + x1);
  }

  template <class P>
  Matrix<T> make_tokens(const ImageView<P>& im, const Grid& g, Index first, Index count) const {
    const Index p = config_.patch_size, ch = config_.in_channels, C = config_.embed_dim;
    const Index N = g.patches();
    const Index np = std::max<Index>(std::min(first + count, N) - first, 0);
    Matrix<T> x(count, C);
    if (np > 0) {
      // Row r holds patch first + r flattened as torch's Conv2d weight [C, ch, p, p] is:
      // index (c * p + ky) * p + kx, pixel (gy p + ky, gx p + kx, c) of the HWC image.
      Matrix<T> patches(np, ch * p * p);
      for (Index r = 0; r < np; ++r) {
        const Index n = first + r, gy = n / g.w, gx = n % g.w;
        for (Index c = 0; c < ch; ++c)
          for (Index ky = 0; ky < p; ++ky) {
            const P* src = im.data + ((gy * p + ky) * im.width + gx * p) * ch + c;
            T* dst = patches.data() + r * ch * p * p + (c * p + ky) * p;
            for (Index kx = 0; kx < p; ++kx) dst[kx] = static_cast<T>(src[kx * ch]);
          }
      }
      x.topRows(np).noalias() = patches * patch_weight_.transpose();
      x.topRows(np).rowwise() += patch_bias_;
      RowVector<T> pos(C);
      for (Index r = 0; r < np; ++r) {
        const Index n = first + r;
        position_row(n / g.w, n % g.w, g, pos);
        x.row(r) += pos;
      }
    }
    if (np < count) x.row(np) = cls_token_;  // only row N can follow the patches
    return x;
  }

  void check_weights(const char* fn) const {
    const Index C = config_.embed_dim, p = config_.patch_size, G = config_.grid();
    detail::check_shape(fn, "patch_weight", patch_weight_, C, config_.in_channels * p * p);
    detail::check_vector(fn, "patch_bias", patch_bias_, C);
    detail::check_shape(fn, "pos_embed", pos_embed_, G * G, C);
    detail::check_vector(fn, "cls_token", cls_token_, C);
    detail::check_vector(fn, "norm_weight", norm_weight_, C);
    detail::check_vector(fn, "norm_bias", norm_bias_, C);
    if (static_cast<Index>(blocks_.size()) != config_.depth)
      detail::fail(fn, "blocks has " + std::to_string(blocks_.size()) +
                           " entries, expected depth = " + std::to_string(config_.depth));
  }

  template <class P>
  void run(const char* fn, const ImageView<P>& image, const VirOptions& options, Matrix<T>* all,
           RowVector<T>* feature) const {
    check_weights(fn);
    detail::check_vir_options(fn, options, true);
    const Grid g = check_image(fn, image);
    const Index T_len = g.tokens(), C = config_.embed_dim;
    const double eps = config_.layer_norm_eps;
    if (all) all->resize(T_len, C);

    if (options.order == VirOrder::layer_major) {
      Matrix<T> x = make_tokens(image, g, 0, T_len);
      for (const auto& b : blocks_) b.forward_inplace(x, options, nullptr);
      if (all) *all = layer_norm(x, norm_weight_, norm_bias_, eps);
      if (feature) *feature = layer_norm(x.bottomRows(1), norm_weight_, norm_bias_, eps);
      return;
    }
    // Chunk-major: chunk i through all blocks, block d continuing from its own per-head states.
    VirOptions inner = options;
    inner.order = VirOrder::layer_major;
    std::vector<std::vector<RetentionState<T>>> states(static_cast<std::size_t>(config_.depth));
    for (Index i0 = 0; i0 < T_len; i0 += options.chunk) {
      const Index L = std::min(options.chunk, T_len - i0);
      Matrix<T> x = make_tokens(image, g, i0, L);
      for (Index d = 0; d < config_.depth; ++d)
        blocks_[static_cast<std::size_t>(d)].forward_inplace(x, inner,
                                                             &states[static_cast<std::size_t>(d)]);
      if (all) all->middleRows(i0, L) = layer_norm(x, norm_weight_, norm_bias_, eps);
      if (feature && i0 + L == T_len)
        *feature = layer_norm(x.bottomRows(1), norm_weight_, norm_bias_, eps);
    }
  }

  template <class P, class Self>
  static std::vector<VirParameter<P>> parameter_table(Self& self) {
    const VirConfig& c = self.config_;
    const Index C = c.embed_dim, p = c.patch_size, G = c.grid(), Hd = c.mlp_hidden();
    std::vector<VirParameter<P>> t;
    t.push_back({"patch_embed.proj.weight", {C, c.in_channels, p, p}, self.patch_weight_.data()});
    t.push_back({"patch_embed.proj.bias", {C}, self.patch_bias_.data()});
    t.push_back({"pos_embed", {1, G * G, C}, self.pos_embed_.data()});
    t.push_back({"cls_token", {1, 1, C}, self.cls_token_.data()});
    for (std::size_t d = 0; d < self.blocks_.size(); ++d) {
      auto& b = self.blocks_[d];
      auto& w = b.weights();
      auto& r = b.retention().weights();
      const std::string pre = "blocks." + std::to_string(d) + ".";
      t.push_back({pre + "norm1.weight", {C}, w.norm1_weight.data()});
      t.push_back({pre + "norm1.bias", {C}, w.norm1_bias.data()});
      t.push_back({pre + "retention.qkv.weight", {3 * C, C}, r.qkv_weight.data()});
      t.push_back({pre + "retention.qkv.bias", {3 * C}, r.qkv_bias.data()});
      t.push_back({pre + "retention.proj.weight", {C, C}, r.proj_weight.data()});
      t.push_back({pre + "retention.proj.bias", {C}, r.proj_bias.data()});
      t.push_back({pre + "ls1.gamma", {C}, w.ls1.data()});
      t.push_back({pre + "norm2.weight", {C}, w.norm2_weight.data()});
      t.push_back({pre + "norm2.bias", {C}, w.norm2_bias.data()});
      t.push_back({pre + "mlp.fc1.weight", {Hd, C}, w.fc1_weight.data()});
      t.push_back({pre + "mlp.fc1.bias", {Hd}, w.fc1_bias.data()});
      t.push_back({pre + "mlp.fc2.weight", {C, Hd}, w.fc2_weight.data()});
      t.push_back({pre + "mlp.fc2.bias", {C}, w.fc2_bias.data()});
      t.push_back({pre + "ls2.gamma", {C}, w.ls2.data()});
    }
    t.push_back({"norm.weight", {C}, self.norm_weight_.data()});
    t.push_back({"norm.bias", {C}, self.norm_bias_.data()});
    return t;
  }

  VirConfig config_;
  Matrix<T> patch_weight_;   // [C, in_channels * p * p] = torch [C, in_channels, p, p] flattened
  RowVector<T> patch_bias_;  // [C]
  Matrix<T> pos_embed_;      // [G * G, C], patches only
  RowVector<T> cls_token_;   // [C]
  std::vector<VirBlock<T>> blocks_;
  RowVector<T> norm_weight_, norm_bias_;  // [C]
};

}  // namespace retention
