// retention: ViR (Vision Retention Networks, docs/math.md §5): multi-head retention (MHR), the
// pre-norm block and the encoder, each runnable in the parallel, recurrent and chunkwise forms; the
// encoder also chunk-major (each chunk of tokens through every block, one state per block and
// head), which bounds activation memory by the chunk instead of the image. Parameters load by the
// names of the ViR authors' code (anom63931/ViR models/vir.py, docs/math.md §5).
#pragma once

#include <retention/chunkwise.hpp>
#include <retention/core.hpp>
#include <retention/decay.hpp>
#include <retention/detail/threading.hpp>
#include <retention/heads.hpp>
#include <retention/multihead.hpp>
#include <retention/nn/activations.hpp>
#include <retention/nn/layer_norm.hpp>
#include <retention/nn/linear.hpp>
#include <retention/nn/parameters.hpp>
#include <retention/state.hpp>
#include <retention/varlen.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace retention {

/// Order in which the encoder walks (tokens x blocks): every token through one block before the
/// next block (layer-major), or every block for one chunk of tokens before the next chunk
/// (chunk-major; exact because LayerNorm and MLP act per token and retention carries a state).
enum class VirOrder { layer_major, chunk_major };

inline const char* to_string(VirOrder o) {
  switch (o) {
    case VirOrder::layer_major:
      return "layer-major";
    case VirOrder::chunk_major:
      return "chunk-major";
  }
  return "?";
}

/// Run options of VirRetention, VirBlock and VirEncoder (the layers' sizes are a VirConfig).
struct VirOptions {
  Form form = Form::parallel;
  /// Chunkwise form: the kernel's chunk length. Chunk-major order: tokens per chunk (the chunkwise
  /// kernel then sees each chunk whole). 0 = automatic: recommended_chunk(head_dim, head_dim).
  Index chunk = 0;
  /// Encoder only; MHR and a block always see the rows they are given.
  VirOrder order = VirOrder::layer_major;
  /// Threads over heads and over row blocks of the projections and the MLP; 0 = OpenMP's
  /// default; capped by the work (detail/threading.hpp). Row blocks may change a GEMM's blocking,
  /// so results with several threads can differ from one thread's in the last bits.
  int threads = 0;
};

/// Sizes and constants of ViR: the encoder reads every field, a block all but the image fields, an
/// MHR layer embed_dim, heads and gammas.
struct VirConfig {
  /// Training resolution: the learned position embedding covers (image_size / patch_size)^2
  /// patches. Other resolutions (multiples of the patch) resample it bilinearly.
  Index image_size = 224;
  Index patch_size = 16;
  Index in_channels = 3;
  Index embed_dim = 384;
  Index heads = 6;
  Index depth = 12;
  /// MLP hidden width = embed_dim * mlp_ratio (truncated, as timm does); positive and finite.
  double mlp_ratio = 4.0;
  /// docs/math.md §5: the ViR encoder builds every LayerNorm with eps 1e-6 (a bare torch LayerNorm
  /// defaults to 1e-5; a loader of weights trained with 1e-5 must set it here).
  double layer_norm_eps = 1e-6;
  /// Initial value of every layer-scale entry ls1, ls2 (1 = no layer scale).
  double layer_scale_init = 1.0;
  /// Per-head gammas; empty = linspace_gammas(heads) (docs/math.md §1.5).
  std::vector<double> gammas;
  /// Keep every Linear (qkv, out_proj, fc1, fc2, the patch embedding) packed for Eigen's GEMM as
  /// well (Linear::set_packed): products skip packing the weights, at the cost of as much memory
  /// again as those weights. Decoding steps (one row) do not use it.
  bool packed_weights = false;

  Index head_dim() const { return heads > 0 ? embed_dim / heads : 0; }
  /// 0 when mlp_ratio is not positive and finite or the width would not fit in Index (the layers
  /// reject such configs; the float-to-integer cast is only made when it is defined).
  Index mlp_hidden() const {
    const double h = static_cast<double>(embed_dim) * mlp_ratio;
    if (!(h >= 0.0 && h < 9.0e18)) return 0;
    return static_cast<Index>(h);
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

template <class T>
class VirBlock;
template <class T>
class VirEncoder;

namespace detail {

/// Rejects invalid enum values, a negative chunk and a negative thread count before anything runs.
inline void check_vir_options(const char* fn, const VirOptions& o) {
  check_form(fn, o.form);
  if (o.order != VirOrder::layer_major && o.order != VirOrder::chunk_major)
    fail(fn, "options.order is not one of layer_major, chunk_major (value " +
                 std::to_string(static_cast<int>(o.order)) + ")");
  if (o.chunk < 0)
    fail(fn, "options.chunk must be >= 0 (0 = automatic), got " + std::to_string(o.chunk));
  check_threads(fn, "options.threads", o.threads);
}

inline std::vector<double> vir_gammas(const char* fn, Index heads,
                                      const std::vector<double>& given) {
  if (given.empty()) {
    check_schedule_heads(fn, heads);
    return linspace_gammas(heads);
  }
  if (static_cast<Index>(given.size()) != heads)
    fail(fn, "gammas has " + std::to_string(given.size()) +
                 " entries, expected heads = " + std::to_string(heads));
  for (double g : given) check_gamma(fn, g);
  return given;
}

/// Checks the MHR fields (dim, heads, gammas) and the sizes its weights need.
inline void check_vir_retention_sizes(const char* fn, const char* dim_name, const char* heads_name,
                                      Index dim, Index heads) {
  check_positive(fn, dim_name, dim);
  check_positive(fn, heads_name, heads);
  if (dim % heads != 0)
    fail(fn, std::string(dim_name) + " " + std::to_string(dim) + " is not a multiple of " +
                 heads_name + " " + std::to_string(heads));
  checked_product(fn, "3 * dim * dim (qkv weight)", checked_product(fn, "3 * dim", 3, dim), dim);
}

/// Checks the block fields of a config (everything but the image fields) before any size is used.
inline void check_vir_block_config(const char* fn, const VirConfig& c) {
  check_vir_retention_sizes(fn, "config.embed_dim", "config.heads", c.embed_dim, c.heads);
  if (!(c.mlp_ratio > 0.0) || !std::isfinite(c.mlp_ratio)) {
    std::ostringstream s;
    s << "config.mlp_ratio must be positive and finite, got " << c.mlp_ratio;
    fail(fn, s.str());
  }
  if (!(static_cast<double>(c.embed_dim) * c.mlp_ratio < 9.0e18))
    fail(fn, "config.embed_dim * config.mlp_ratio overflows the index type");
  const Index hidden = c.mlp_hidden();
  if (hidden < 1) {
    std::ostringstream s;
    s << "MLP hidden width embed_dim * mlp_ratio = " << c.embed_dim << " * " << c.mlp_ratio
      << " truncates to 0, expected >= 1";
    fail(fn, s.str());
  }
  checked_product(fn, "mlp hidden * embed_dim (fc1 weight)", hidden, c.embed_dim);
  if (!(c.layer_norm_eps >= 0.0) || !std::isfinite(c.layer_norm_eps)) {
    std::ostringstream s;
    s << "config.layer_norm_eps must be >= 0 and finite, got " << c.layer_norm_eps;
    fail(fn, s.str());
  }
  if (!std::isfinite(c.layer_scale_init)) {
    std::ostringstream s;
    s << "config.layer_scale_init must be finite, got " << c.layer_scale_init;
    fail(fn, s.str());
  }
}

/// Every parameter of `own` (the layer's own views: names and shapes) is in `source` with the same
/// shape; checked before a load changes anything, so a failed load leaves the layer as it was.
template <class Source>
void check_parameters(const char* fn, const Source& source, const ParameterMap& own) {
  for (const std::string& name : own.names()) {
    const TensorRef& t = require(fn, source, name);
    const std::vector<Index>& expected = own.find(name)->shape;
    if (t.shape != expected)
      fail(fn, "parameter '" + name + "' has shape " + dims_string(t.shape) + ", expected " +
                   dims_string(expected));
    if (!t.data) fail(fn, "parameter '" + name + "' has no data");
  }
}

/// Reads a vector parameter of n entries with the given torch shape into `out` (resized to n).
template <class T, class Source>
void read_vector(const char* fn, const Source& source, const std::string& name,
                 const std::vector<Index>& shape, Index n, RowVector<T>& out) {
  RowVector<T> v(n);
  read_tensor(fn, name, require(fn, source, name), shape, v.data());
  out.swap(v);
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
  /// A Linear's weight [out, in] filled in row-major order.
  template <class T>
  void fill(Linear<T>& linear, double std_dev) {
    Matrix<T> w(linear.out_features(), linear.in_features());
    fill(w, std_dev);
    linear.set_weight(w);
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

/// ViR multi-head retention (docs/math.md §5): [q | k | v] = x Wqkv^T + b (C -> 3C), q scaled by
/// head_dim^-1/2, per head plain causal retention o_n = sum_{m<=n} gamma_h^(n-m) (q_n . k_m) v_m
/// (+ the carried-in state, docs/math.md §2.3), normalisation none; y = concat_h(o_h) Wout^T + b.
/// Parameters (under a prefix such as "blocks.3.retention."): qkv.weight [3C, C], qkv.bias [3C],
/// out_proj.weight [C, C], out_proj.bias [C].
template <class T>
class VirRetention {
 public:
  using State = RetentionState<T>;

  /// Zero weights (fill them with load()); config.embed_dim = C, a multiple of config.heads;
  /// config.gammas empty = linspace_gammas(heads). The per-head masks are built here, once.
  explicit VirRetention(const VirConfig& config)
      : VirRetention(config.embed_dim, config.heads, config.gammas) {
    set_packed_weights(config.packed_weights);
  }
  /// The same with the three MHR sizes given directly.
  VirRetention(Index dim, Index heads, const std::vector<double>& gammas = {})
      : dim_(checked_dim("VirRetention", dim, heads)),
        heads_(heads),
        gammas_(detail::vir_gammas("VirRetention", heads, gammas)),
        masks_(causal_masks(gammas_)),
        qkv_(dim, 3 * dim, true),
        out_proj_(dim, dim, true) {
    detail::assert_scalar<T>();
  }

  Index dim() const { return dim_; }
  Index heads() const { return heads_; }
  Index head_dim() const { return dim_ / heads_; }
  const std::vector<double>& gammas() const { return gammas_; }
  /// Per-head masks, masks()[h] = CausalDecay(gammas()[h]).
  const std::vector<CausalDecay>& masks() const { return masks_; }
  /// The fused projection: W [3C, C], rows (q | k | v) x heads x head_dim; bias [3C].
  const Linear<T>& qkv() const { return qkv_; }
  /// The output projection: W [C, C], bias [C].
  const Linear<T>& out_proj() const { return out_proj_; }
  /// VirConfig::packed_weights for both projections.
  void set_packed_weights(bool on) {
    qkv_.set_packed(on);
    out_proj_.set_packed(on);
  }

  /// Reads "<prefix>qkv.weight" [3C, C], "<prefix>qkv.bias" [3C], "<prefix>out_proj.weight"
  /// [C, C], "<prefix>out_proj.bias" [C] from any source with find(name) -> const TensorRef*
  /// (ParameterMap, a safetensors file). All are checked before any changes.
  template <class Source>
  void load(const Source& source, const std::string& prefix = "") {
    const char* fn = "VirRetention::load";
    detail::check_parameters(fn, source, parameters(prefix));
    load_checked(fn, source, prefix);
  }

  /// Views of this layer's parameters under their torch names (valid while the layer lives and is
  /// not reloaded), e.g. to export them or to count them.
  ParameterMap parameters(const std::string& prefix = "") const {
    ParameterMap m;
    add_parameters(m, prefix);
    return m;
  }

  /// Zero states for all heads (S [head_dim, head_dim], position 0), index h.
  std::vector<State> zero_states() const {
    return std::vector<State>(static_cast<std::size_t>(heads_), State(head_dim(), head_dim()));
  }

  /// x [T, C] -> y [T, C] in options.form. `states` (optional, one per head): if non-empty, the
  /// state carried in from earlier tokens; replaced by the state after the last row only when the
  /// call succeeds, so that consecutive calls equal one call over the concatenated rows.
  template <class Derived>
  Matrix<T> forward(const Eigen::MatrixBase<Derived>& x, const VirOptions& options = VirOptions(),
                    std::vector<State>* states = nullptr) const {
    detail::assert_same_scalar<T, typename Derived::Scalar>();
    const char* fn = "VirRetention::forward";
    detail::check_shape(fn, "x", x, -1, dim_);
    detail::check_vir_options(fn, options);
    check_rows(fn, x.rows());
    const bool has_initial = check_states(fn, states);
    std::vector<State> finals;
    Matrix<T> y;
    run(x, options, has_initial ? states : nullptr, states ? &finals : nullptr, y);
    if (states) states->swap(finals);
    return y;
  }

  /// One token x_t [1, C] -> [1, C] through the recurrent form, advancing `states` (one per head;
  /// empty = zero states) only if the step succeeds.
  template <class Derived>
  RowVector<T> step(const Eigen::MatrixBase<Derived>& x_t, std::vector<State>& states) const {
    detail::assert_same_scalar<T, typename Derived::Scalar>();
    const char* fn = "VirRetention::step";
    detail::check_shape(fn, "x_t", x_t, 1, dim_);
    const bool has_initial = check_states(fn, &states);
    VirOptions o;
    o.form = Form::recurrent;
    o.threads = 1;
    std::vector<State> finals;
    Matrix<T> y;
    run(x_t, o, has_initial ? &states : nullptr, &finals, y);
    states.swap(finals);
    return y;
  }

  /// Scratch of step_batch(), shared by the whole batch: the fused projection and head outputs of
  /// the batch, the state pointers and the per-thread step buffers. Grows to the largest batch seen
  /// and is then reused while sequences join and leave.
  struct BatchWorkspace {
    Matrix<T> qkv, o;  // [capacity, 3C], [capacity, C]
    std::vector<State*> heads;
    std::vector<const void*> sorted;
    VarlenStepWorkspace<T> step;
  };

  /// Batched decoding: x [B, C] holds one token of each of B sequences; states[b] points to
  /// sequence b's per-head states (heads entries, or empty = zero states: the sequence's first
  /// token), each sequence at its own position; y [B, C] receives the outputs. Equal to B calls of
  /// step(). The pointers must be non-null and distinct, so sequences join and leave between calls
  /// without copies; `work` is reused across calls. threads: over the B * heads state updates and
  /// the projections' row blocks (0 = OpenMP's default, capped by the work). If it throws, no state
  /// changes.
  template <class D, class DOut>
  void step_batch(const Eigen::MatrixBase<D>& x, const std::vector<std::vector<State>*>& states,
                  DOut&& y, BatchWorkspace& work, int threads = 0) const {
    detail::assert_same_scalar<T, typename D::Scalar>();
    detail::assert_same_scalar<T, typename std::decay_t<DOut>::Scalar>();
    const char* fn = "VirRetention::step_batch";
    const Index B = static_cast<Index>(states.size()), C = dim_, hd = head_dim(), width = 3 * C;
    detail::check_positive(fn, "states.size()", B);
    detail::check_shape(fn, "x", x, B, C);
    detail::check_shape(fn, "y", y, B, C);
    detail::check_threads(fn, "threads", threads);
    check_rows(fn, B);
    detail::check_distinct_states(fn, states, "states", work.sorted);
    // Names are built only for a failing state: a valid call makes no strings.
    const auto head_name = [](Index b, Index h) {
      return "states[" + std::to_string(b) + "][" + std::to_string(h) + "]";
    };
    for (Index b = 0; b < B; ++b) {
      const std::vector<State>& s = *states[static_cast<std::size_t>(b)];
      if (s.empty()) continue;
      if (static_cast<Index>(s.size()) != heads_)
        detail::fail(fn, "states[" + std::to_string(b) + "] has " + std::to_string(s.size()) +
                             " entries, expected heads = " + std::to_string(heads_));
      for (Index h = 0; h < heads_; ++h) {
        const State& sh = s[static_cast<std::size_t>(h)];
        if (sh.S.rows() != hd || sh.S.cols() != hd || sh.z.size() != hd || sh.position < 0)
          detail::check_state(fn, sh, hd, hd, head_name(b, h).c_str());
        if (sh.position > std::numeric_limits<Index>::max() - 1)
          detail::fail(fn, head_name(b, h) + ".position would overflow");
      }
    }
    if (work.qkv.rows() < B || work.qkv.cols() != width) work.qkv.resize(B, width);
    if (work.o.rows() < B || work.o.cols() != C) work.o.resize(B, C);
    auto qkv = work.qkv.topRows(B);
    auto o = work.o.topRows(B);
    const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(hd)));
    qkv_.forward_into(x, qkv, threads);
    qkv.leftCols(C) *= scale;
    // Only allocation failures remain possible from here; an empty vector becoming zero states
    // is the same state, so the guarantee holds.
    work.heads.resize(static_cast<std::size_t>(B * heads_));
    for (Index b = 0; b < B; ++b) {
      std::vector<State>& s = *states[static_cast<std::size_t>(b)];
      if (s.empty()) s = zero_states();
      for (Index h = 0; h < heads_; ++h)
        work.heads[static_cast<std::size_t>(b * heads_ + h)] = &s[static_cast<std::size_t>(h)];
    }
    const T* base = qkv.data();
    varlen_step(HeadsView<const T>{base, B, 1, heads_, hd, width, width, hd},
                HeadsView<const T>{base + C, B, 1, heads_, hd, width, width, hd},
                HeadsView<const T>{base + 2 * C, B, 1, heads_, hd, width, width, hd},
                heads_view(o.data(), B, 1, heads_, hd), masks_, work.heads, Normalization::none,
                threads, &work.step);
    out_proj_.forward_into(o, y, threads);
  }

  /// step_batch() returning y [B, C], with a workspace of its own (allocates on every call).
  template <class D>
  Matrix<T> step_batch(const Eigen::MatrixBase<D>& x,
                       const std::vector<std::vector<State>*>& states, int threads = 0) const {
    BatchWorkspace work;
    Matrix<T> y(x.rows(), dim_);
    step_batch(x, states, y, work, threads);
    return y;
  }

 private:
  friend class VirBlock<T>;
  friend class VirEncoder<T>;

  static Index checked_dim(const char* fn, Index dim, Index heads) {
    detail::check_vir_retention_sizes(fn, "dim", "heads", dim, heads);
    return dim;
  }

  /// rows * 3C (the fused buffer) fits in Index.
  void check_rows(const char* fn, Index rows) const {
    detail::checked_product(fn, "rows * 3 * embed_dim", rows, 3 * dim_);
  }

  /// Checks given states; true when there are some (empty = start from zero).
  bool check_states(const char* fn, const std::vector<State>* states) const {
    if (!states || states->empty()) return false;
    if (static_cast<Index>(states->size()) != heads_)
      detail::fail(fn, "states has " + std::to_string(states->size()) +
                           " entries, expected heads = " + std::to_string(heads_));
    for (const auto& s : *states) detail::check_state(fn, s, head_dim(), head_dim(), "states[h]");
    return true;
  }

  void add_parameters(ParameterMap& m, const std::string& prefix) const {
    m.add_dense(prefix + "qkv.weight", qkv_.weight());
    m.add_dense(prefix + "qkv.bias", qkv_.bias());
    m.add_dense(prefix + "out_proj.weight", out_proj_.weight());
    m.add_dense(prefix + "out_proj.bias", out_proj_.bias());
  }

  template <class Source>
  void load_checked(const char* fn, const Source& source, const std::string& prefix) {
    qkv_.load(source, prefix + "qkv.", fn);
    out_proj_.load(source, prefix + "out_proj.", fn);
  }

  void init_random(detail::VirRng& rng, double std_dev) {
    rng.fill(qkv_, std_dev);
    rng.fill(out_proj_, std_dev);
  }

  /// The forward without checks (callers checked x, options and states): one fused projection
  /// into [T, 3C], q scaled in place, three HeadsViews over that buffer (no copies) through
  /// multi_head_retention, then the output projection. Final states go to `finals` (if set).
  template <class Derived>
  void run(const Eigen::MatrixBase<Derived>& x, const VirOptions& options,
           const std::vector<State>* initial, std::vector<State>* finals, Matrix<T>& y) const {
    const Index T_len = x.rows(), C = dim_, hd = head_dim(), width = 3 * dim_;
    if (T_len == 0) {  // nothing to retain: the state passes through unchanged
      y.resize(0, C);
      if (finals) *finals = initial ? *initial : zero_states();
      return;
    }
    Matrix<T> qkv(T_len, width);
    const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(hd)));
    qkv_.forward_into(x, qkv, options.threads);
    qkv.leftCols(C) *= scale;
    Matrix<T> o(T_len, C);
    {
      const T* base = qkv.data();
      const Index seq = T_len * width;
      const HeadsView<const T> q{base, 1, T_len, heads_, hd, seq, width, hd};
      const HeadsView<const T> k{base + C, 1, T_len, heads_, hd, seq, width, hd};
      const HeadsView<const T> v{base + 2 * C, 1, T_len, heads_, hd, seq, width, hd};
      MultiHeadOptions<T> mo;
      mo.form = options.form;
      mo.chunk = options.chunk;
      mo.normalization = Normalization::none;
      mo.initial_states = initial;
      mo.final_states = finals;
      mo.threads = options.threads;
      multi_head_retention(q, k, v, heads_view(o.data(), 1, T_len, heads_, hd), masks_, mo);
    }
    qkv.resize(0, 0);  // released before the projection: peak activation stays ~ 4 [T, C]
    y.resize(T_len, C);
    out_proj_.forward_into(o, y, options.threads);
  }

  Index dim_, heads_;
  std::vector<double> gammas_;
  std::vector<CausalDecay> masks_;
  Linear<T> qkv_, out_proj_;
};

// =================================================================================================
// Block
// =================================================================================================

/// ViR block (docs/math.md §5, pre-norm): x += ls1 (.) MHR(LN1(x)); x += ls2 (.)
/// fc2(GELU(fc1(LN2(x)))), exact erf GELU, affine LayerNorms with eps = config.layer_norm_eps.
/// x [T, C]. Parameters (under a prefix such as "blocks.3."): norm1.{weight,bias} [C],
/// retention.{qkv,out_proj}.*, ls1.gamma [C], norm2.{weight,bias} [C], mlp.fc1.weight [hidden, C],
/// mlp.fc1.bias [hidden], mlp.fc2.weight [C, hidden], mlp.fc2.bias [C], ls2.gamma [C].
template <class T>
class VirBlock {
 public:
  using State = RetentionState<T>;

  /// LayerNorm weights 1 and biases 0, layer scales config.layer_scale_init, all else 0.
  explicit VirBlock(const VirConfig& config)
      : config_(checked_config(config)),
        norm1_(config.embed_dim, config.layer_norm_eps),
        retention_(config),
        norm2_(config.embed_dim, config.layer_norm_eps),
        fc1_(config.embed_dim, config.mlp_hidden(), true),
        fc2_(config.mlp_hidden(), config.embed_dim, true),
        ls1_(RowVector<T>::Constant(config.embed_dim, static_cast<T>(config.layer_scale_init))),
        ls2_(ls1_) {
    detail::assert_scalar<T>();
    fc1_.set_packed(config.packed_weights);
    fc2_.set_packed(config.packed_weights);
  }

  const VirConfig& config() const { return config_; }
  const LayerNorm<T>& norm1() const { return norm1_; }
  const VirRetention<T>& retention() const { return retention_; }
  /// Layer scale after the retention branch [C].
  const RowVector<T>& ls1() const { return ls1_; }
  const LayerNorm<T>& norm2() const { return norm2_; }
  /// MLP: fc1 [hidden, C] + bias, GELU, fc2 [C, hidden] + bias.
  const Linear<T>& fc1() const { return fc1_; }
  const Linear<T>& fc2() const { return fc2_; }
  /// Layer scale after the MLP branch [C].
  const RowVector<T>& ls2() const { return ls2_; }

  /// Reads every parameter of the block under `prefix` (names in the class comment) from any
  /// source with find(name) -> const TensorRef*. All are checked before any changes.
  template <class Source>
  void load(const Source& source, const std::string& prefix = "") {
    const char* fn = "VirBlock::load";
    detail::check_parameters(fn, source, parameters(prefix));
    load_checked(fn, source, prefix);
  }

  /// Views of this block's parameters under their torch names (valid while the block lives and is
  /// not reloaded).
  ParameterMap parameters(const std::string& prefix = "") const {
    ParameterMap m;
    add_parameters(m, prefix);
    return m;
  }

  /// x [T, C] -> [T, C]; `states` as in VirRetention::forward.
  template <class Derived>
  Matrix<T> forward(const Eigen::MatrixBase<Derived>& x, const VirOptions& options = VirOptions(),
                    std::vector<State>* states = nullptr) const {
    detail::assert_same_scalar<T, typename Derived::Scalar>();
    const char* fn = "VirBlock::forward";
    detail::check_shape(fn, "x", x, -1, config_.embed_dim);
    Matrix<T> y = x;
    forward_checked(fn, y, options, states);
    return y;
  }

  /// In place on x [T, C] (no copy of the residual stream). On failure x is unspecified but the
  /// states are unchanged.
  void forward_inplace(Matrix<T>& x, const VirOptions& options = VirOptions(),
                       std::vector<State>* states = nullptr) const {
    const char* fn = "VirBlock::forward_inplace";
    detail::check_shape(fn, "x", x, -1, config_.embed_dim);
    forward_checked(fn, x, options, states);
  }

 private:
  friend class VirEncoder<T>;

  static const VirConfig& checked_config(const VirConfig& c) {
    detail::check_vir_block_config("VirBlock", c);
    detail::vir_gammas("VirBlock", c.heads, c.gammas);
    return c;
  }

  /// The widest buffers of a forward over `rows` rows fit in Index.
  void check_rows(const char* fn, Index rows) const {
    retention_.check_rows(fn, rows);
    detail::checked_product(fn, "rows * mlp hidden", rows, fc1_.out_features());
  }

  void forward_checked(const char* fn, Matrix<T>& x, const VirOptions& options,
                       std::vector<State>* states) const {
    detail::check_vir_options(fn, options);
    check_rows(fn, x.rows());
    const bool has_initial = retention_.check_states(fn, states);
    std::vector<State> finals;
    run(x, options, has_initial ? states : nullptr, states ? &finals : nullptr);
    if (states) states->swap(finals);
  }

  void add_parameters(ParameterMap& m, const std::string& prefix) const {
    m.add_dense(prefix + "norm1.weight", norm1_.weight());
    m.add_dense(prefix + "norm1.bias", norm1_.bias());
    retention_.add_parameters(m, prefix + "retention.");
    m.add_dense(prefix + "ls1.gamma", ls1_);
    m.add_dense(prefix + "norm2.weight", norm2_.weight());
    m.add_dense(prefix + "norm2.bias", norm2_.bias());
    m.add_dense(prefix + "mlp.fc1.weight", fc1_.weight());
    m.add_dense(prefix + "mlp.fc1.bias", fc1_.bias());
    m.add_dense(prefix + "mlp.fc2.weight", fc2_.weight());
    m.add_dense(prefix + "mlp.fc2.bias", fc2_.bias());
    m.add_dense(prefix + "ls2.gamma", ls2_);
  }

  template <class Source>
  void load_checked(const char* fn, const Source& source, const std::string& prefix) {
    const Index C = config_.embed_dim;
    norm1_.load(source, prefix + "norm1.", fn);
    retention_.load_checked(fn, source, prefix + "retention.");
    detail::read_vector(fn, source, prefix + "ls1.gamma", {C}, C, ls1_);
    norm2_.load(source, prefix + "norm2.", fn);
    fc1_.load(source, prefix + "mlp.fc1.", fn);
    fc2_.load(source, prefix + "mlp.fc2.", fn);
    detail::read_vector(fn, source, prefix + "ls2.gamma", {C}, C, ls2_);
  }

  void init_random(detail::VirRng& rng, double std_dev) {
    retention_.init_random(rng, std_dev);
    rng.fill(fc1_, std_dev);
    rng.fill(fc2_, std_dev);
  }

  /// The forward without checks, in place on x; final states to `finals` (if set).
  void run(Matrix<T>& x, const VirOptions& options, const std::vector<State>* initial,
           std::vector<State>* finals) const {
    {
      const Matrix<T> h = norm1_.forward(x);
      Matrix<T> a;
      retention_.run(h, options, initial, finals, a);
      x.array() += a.array().rowwise() * ls1_.array();
    }
    // The MLP acts per row: each row block runs LN2, fc1, GELU, fc2 and the residual on its own.
    // Few rows (a chunk of chunk-major order, a short sequence) are split over the MLP's outputs
    // instead, as Linear::forward_into splits a product (detail::split_columns).
    const Index rows = x.rows(), hidden_n = fc1_.out_features();
    const double dim = static_cast<double>(x.cols()), hidden = static_cast<double>(hidden_n),
                 flops_per_row = 4.0 * dim * hidden + 20.0 * hidden;
    const detail::Team by_columns =
        detail::plan_column_split(options.threads, rows, hidden_n, flops_per_row);
    if (by_columns.size > 1) {
      mlp_by_columns(x, by_columns);
      return;
    }
    detail::for_row_blocks(options.threads, rows, flops_per_row,
                           [&](Index r0, Index n) { mlp_rows(x.middleRows(r0, n)); });
  }

  /// The MLP with fc1 (and GELU) split over hidden units, then fc2 (and the residual) over
  /// outputs, on `team`: two parallel regions, every thread packing only its slice of a weight.
  void mlp_by_columns(Matrix<T>& x, detail::Team team) const {
    const Matrix<T> h = norm2_.forward(x);
    Matrix<T> u(x.rows(), fc1_.out_features());
    detail::for_column_blocks(
        team, u.cols(),
        [&](Index c0, Index n) {
          fc1_.forward_columns_into(h, u, c0, n);
          auto block = u.middleCols(c0, n);
          gelu_inplace(block);
        },
        fc1_.column_align());
    Matrix<T> m(x.rows(), x.cols());
    detail::for_column_blocks(
        team, x.cols(),
        [&](Index c0, Index n) {
          fc2_.forward_columns_into(u, m, c0, n);
          x.middleCols(c0, n).array() +=
              m.middleCols(c0, n).array().rowwise() * ls2_.segment(c0, n).array();
        },
        fc2_.column_align());
  }

  /// x += ls2 (.) fc2(GELU(fc1(LN2(x)))) on a block of rows.
  template <class Rows>
  void mlp_rows(Rows&& x) const {
    Matrix<T> u(x.rows(), fc1_.out_features());
    {
      const Matrix<T> h = norm2_.forward(x);
      fc1_.forward_into(h, u);
    }
    gelu_inplace(u);
    Matrix<T> m(x.rows(), x.cols());
    fc2_.forward_into(u, m);
    x.array() += m.array().rowwise() * ls2_.array();
  }

  VirConfig config_;
  LayerNorm<T> norm1_;
  VirRetention<T> retention_;
  LayerNorm<T> norm2_;
  Linear<T> fc1_, fc2_;
  RowVector<T> ls1_, ls2_;
};

// =================================================================================================
// Encoder
// =================================================================================================

/// ViR encoder (docs/math.md §5): tokens = patch embedding (stride-p p x p convolution = a linear
/// map of each flattened patch) + learned position embedding, then the class token appended at
/// the END (with no position embedding); depth blocks; final LayerNorm; the class token's row is
/// the image feature. Image [H, W, in_channels] -> tokens [N + 1, C], N = (H/p)(W/p), raster order.
/// Parameters (the ViR authors' names, under an optional prefix): patch_embed.proj.weight
/// [C, in_channels, p, p], patch_embed.proj.bias [C], pos_embed [1, G*G, C], cls_token [1, 1, C],
/// blocks.{d}.* (see VirBlock), norm.weight [C], norm.bias [C].
template <class T>
class VirEncoder {
 public:
  /// Deterministic random model: every weight and embedding ~ N(0, 0.02^2) truncated at 2 std,
  /// biases 0, LayerNorms (1, 0), layer scales config.layer_scale_init; same seed, same model.
  /// Every size product of the config is checked before anything is allocated.
  explicit VirEncoder(const VirConfig& config, std::uint64_t seed = 0)
      : config_(checked_config(config)),
        patch_(config.in_channels * config.patch_size * config.patch_size, config.embed_dim, true),
        pos_embed_(Matrix<T>::Zero(config.grid() * config.grid(), config.embed_dim)),
        cls_token_(RowVector<T>::Zero(config.embed_dim)),
        norm_(config.embed_dim, config.layer_norm_eps) {
    detail::assert_scalar<T>();
    patch_.set_packed(config.packed_weights);
    blocks_.reserve(static_cast<std::size_t>(config.depth));
    for (Index d = 0; d < config.depth; ++d) blocks_.emplace_back(config_);
    detail::VirRng rng(seed);
    const double s = 0.02;
    rng.fill(patch_, s);
    rng.fill(pos_embed_, s);
    rng.fill(cls_token_, s);
    for (auto& b : blocks_) b.init_random(rng, s);
  }

  const VirConfig& config() const { return config_; }
  Index depth() const { return config_.depth; }
  const std::vector<VirBlock<T>>& blocks() const { return blocks_; }
  /// Patch embedding as a Linear over flattened patches: W [C, in_channels * p * p] (torch's
  /// [C, in_channels, p, p] flattened), bias [C].
  const Linear<T>& patch_embed() const { return patch_; }
  /// Position embedding of the training grid [G * G, C] (patches only).
  const Matrix<T>& pos_embed() const { return pos_embed_; }
  const RowVector<T>& cls_token() const { return cls_token_; }
  const LayerNorm<T>& norm() const { return norm_; }

  /// Reads every parameter (names in the class comment, each under `prefix`) from any source with
  /// find(name) -> const TensorRef* (ParameterMap, a safetensors file); dtypes convert to T. All
  /// names and shapes are checked before anything changes.
  template <class Source>
  void load(const Source& source, const std::string& prefix = "") {
    const char* fn = "VirEncoder::load";
    detail::check_parameters(fn, source, parameters(prefix));
    const Index C = config_.embed_dim, p = config_.patch_size, G = config_.grid();
    {
      Matrix<T> w(C, config_.in_channels * p * p);
      read_tensor(fn, prefix + "patch_embed.proj.weight",
                  detail::require(fn, source, prefix + "patch_embed.proj.weight"),
                  {C, config_.in_channels, p, p}, w.data());
      RowVector<T> b;
      detail::read_vector(fn, source, prefix + "patch_embed.proj.bias", {C}, C, b);
      patch_.set_weight(w);
      patch_.set_bias(b);
    }
    {
      Matrix<T> pos(G * G, C);
      read_tensor(fn, prefix + "pos_embed", detail::require(fn, source, prefix + "pos_embed"),
                  {1, G * G, C}, pos.data());
      pos_embed_.swap(pos);
    }
    detail::read_vector(fn, source, prefix + "cls_token", {1, 1, C}, C, cls_token_);
    for (std::size_t d = 0; d < blocks_.size(); ++d)
      blocks_[d].load_checked(fn, source, prefix + "blocks." + std::to_string(d) + ".");
    norm_.load(source, prefix + "norm.", fn);
  }

  /// Views of every parameter under its torch name (valid while the encoder lives and is not
  /// reloaded): export them, count them, or load another model from them.
  ParameterMap parameters(const std::string& prefix = "") const {
    const Index C = config_.embed_dim, p = config_.patch_size;
    ParameterMap m;
    m.add(prefix + "patch_embed.proj.weight", patch_.weight().data(),
          {C, config_.in_channels, p, p});
    m.add_dense(prefix + "patch_embed.proj.bias", patch_.bias());
    m.add(prefix + "pos_embed", pos_embed_.data(), {1, pos_embed_.rows(), C});
    m.add(prefix + "cls_token", cls_token_.data(), {1, 1, C});
    for (std::size_t d = 0; d < blocks_.size(); ++d)
      blocks_[d].add_parameters(m, prefix + "blocks." + std::to_string(d) + ".");
    m.add_dense(prefix + "norm.weight", norm_.weight());
    m.add_dense(prefix + "norm.bias", norm_.bias());
    return m;
  }

  /// Number of scalars over all parameters.
  Index parameter_count() const {
    const ParameterMap m = parameters();
    Index n = 0;
    for (const std::string& name : m.names()) n += m.find(name)->numel();
    return n;
  }

  /// Input tokens [count, C], rows [first, first + count) of the sequence: row n < N is patch n
  /// (raster order) = Wp vec(patch n) + bp + pos_n, row N is the class token. Image [H, W,
  /// in_channels].
  template <class P>
  Matrix<T> tokens(const ImageView<P>& image, Index first, Index count) const {
    const char* fn = "VirEncoder::tokens";
    const Grid g = check_image(fn, image);
    if (first < 0 || count < 0 || first > g.tokens() || count > g.tokens() - first) {
      Index end = 0;
      const std::string last =
          detail::add_overflows(first, count, end) ? std::string("overflow") : std::to_string(end);
      detail::fail(fn, "rows [" + std::to_string(first) + ", " + last + ") outside the " +
                           std::to_string(g.tokens()) + " tokens");
    }
    return make_tokens(image, g, first, count, 0);
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
  using State = RetentionState<T>;

  struct Grid {
    Index h, w;
    Index patches() const { return h * w; }
    Index tokens() const { return h * w + 1; }
  };

  /// Checks every field and every size product the encoder allocates, before any allocation.
  static const VirConfig& checked_config(const VirConfig& c) {
    const char* fn = "VirEncoder";
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
    detail::check_vir_block_config(fn, c);
    detail::vir_gammas(fn, c.heads, c.gammas);
    const Index G = c.grid();
    const Index patches = detail::checked_product(fn, "grid * grid (patches)", G, G);
    detail::checked_product(fn, "patches * embed_dim (pos_embed)", patches, c.embed_dim);
    const Index patch_in = detail::checked_product(
        fn, "in_channels * patch_size^2",
        detail::checked_product(fn, "in_channels * patch_size", c.in_channels, c.patch_size),
        c.patch_size);
    detail::checked_product(fn, "embed_dim * in_channels * patch_size^2 (patch_embed)", c.embed_dim,
                            patch_in);
    return c;
  }

  template <class P>
  Grid check_image(const char* fn, const ImageView<P>& im) const {
    const Index p = config_.patch_size;
    const std::string got = "[" + std::to_string(im.height) + " x " + std::to_string(im.width) +
                            " x " + std::to_string(im.channels) + "]";
    if (im.channels != config_.in_channels)
      detail::fail(fn, "image is " + got + ", expected [H x W x " +
                           std::to_string(config_.in_channels) + "]");
    if (im.height < p || im.width < p || im.height % p != 0 || im.width % p != 0)
      detail::fail(fn, "image is " + got +
                           ", expected height and width positive multiples of patch_size " +
                           std::to_string(p));
    if (!im.data) detail::fail(fn, "image data is a null pointer");
    // Pixel offsets and the token count must fit in Index before anything is indexed.
    detail::checked_product(
        fn, "image height * width * channels",
        detail::checked_product(fn, "image height * width", im.height, im.width), im.channels);
    const Grid g{im.height / p, im.width / p};
    Index tokens = 0;
    if (detail::add_overflows(detail::checked_product(fn, "patches", g.h, g.w), 1, tokens))
      detail::fail(fn, "image has too many patches");
    detail::checked_product(fn, "tokens * embed_dim", tokens, config_.embed_dim);
    return g;
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
  Matrix<T> make_tokens(const ImageView<P>& im, const Grid& g, Index first, Index count,
                        int threads) const {
    const Index p = config_.patch_size, ch = config_.in_channels, C = config_.embed_dim;
    const Index N = g.patches(), width = ch * p * p;
    const Index np = std::max<Index>(std::min(first + count, N) - first, 0);
    Matrix<T> x(count, C);
    const double flops_per_row = 2.0 * static_cast<double>(C) * static_cast<double>(width);
    detail::for_row_blocks(threads, np, flops_per_row, [&](Index r0, Index rows) {
      // Row r holds patch first + r0 + r flattened as torch's Conv2d weight [C, ch, p, p] is:
      // index (c * p + ky) * p + kx, pixel (gy p + ky, gx p + kx, c) of the HWC image.
      Matrix<T> patches(rows, width);
      for (Index r = 0; r < rows; ++r) {
        const Index n = first + r0 + r, gy = n / g.w, gx = n % g.w;
        for (Index c = 0; c < ch; ++c)
          for (Index ky = 0; ky < p; ++ky) {
            const P* src = im.data + ((gy * p + ky) * im.width + gx * p) * ch + c;
            T* dst = patches.data() + r * width + (c * p + ky) * p;
            for (Index kx = 0; kx < p; ++kx) dst[kx] = static_cast<T>(src[kx * ch]);
          }
      }
      patch_.forward_into(patches, x.middleRows(r0, rows));
      RowVector<T> pos(C);
      for (Index r = 0; r < rows; ++r) {
        const Index n = first + r0 + r;
        position_row(n / g.w, n % g.w, g, pos);
        x.row(r0 + r) += pos;
      }
    });
    if (np < count) x.row(np) = cls_token_;  // only row N can follow the patches
    return x;
  }

  /// The widest buffers of a forward over `rows` rows (the fused qkv buffer, the MLP) fit.
  void check_rows(const char* fn, Index rows) const { blocks_.front().check_rows(fn, rows); }

  template <class P>
  void run(const char* fn, const ImageView<P>& image, const VirOptions& options, Matrix<T>* all,
           RowVector<T>* feature) const {
    detail::check_vir_options(fn, options);
    const Grid g = check_image(fn, image);
    const Index T_len = g.tokens();
    if (options.order == VirOrder::layer_major) {
      check_rows(fn, T_len);
      Matrix<T> x = make_tokens(image, g, 0, T_len, options.threads);
      for (const auto& b : blocks_) b.run(x, options, nullptr, nullptr);
      if (all) *all = norm_.forward(x);
      if (feature) *feature = norm_.forward(x.bottomRows(1));
      return;
    }
    // Chunk-major: chunk i through all blocks, block d continuing from its own per-head states.
    const Index hd = config_.head_dim();
    const Index chunk = options.chunk > 0 ? options.chunk : recommended_chunk(hd, hd);
    check_rows(fn, std::min(chunk, T_len));
    VirOptions inner = options;
    inner.order = VirOrder::layer_major;
    inner.chunk = chunk;  // the chunkwise kernel sees each chunk whole
    if (all) all->resize(T_len, config_.embed_dim);
    std::vector<std::vector<State>> states(static_cast<std::size_t>(config_.depth));
    std::vector<State> next;
    for (Index i0 = 0; i0 < T_len; i0 += std::min(chunk, T_len - i0)) {
      const Index L = std::min(chunk, T_len - i0);
      Matrix<T> x = make_tokens(image, g, i0, L, options.threads);
      for (std::size_t d = 0; d < blocks_.size(); ++d) {
        blocks_[d].run(x, inner, i0 == 0 ? nullptr : &states[d], &next);
        states[d].swap(next);
      }
      if (all) all->middleRows(i0, L) = norm_.forward(x);
      if (feature && i0 + L == T_len) *feature = norm_.forward(x.bottomRows(1));
    }
  }

  VirConfig config_;
  Linear<T> patch_;         // [C, in_channels * p * p] = torch [C, in_channels, p, p] flattened
  Matrix<T> pos_embed_;     // [G * G, C], patches only
  RowVector<T> cls_token_;  // [C]
  std::vector<VirBlock<T>> blocks_;
  LayerNorm<T> norm_;
};

}  // namespace retention
