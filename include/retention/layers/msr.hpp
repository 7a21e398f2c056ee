// retention: the RetNet Multi-Scale Retention layer (SPEC 3), loadable with torchscale's weights,
// in any of the three forms, with prompt prefill followed by token-by-token decoding.
#pragma once

#include <retention/core.hpp>
#include <retention/decay.hpp>
#include <retention/multihead.hpp>
#include <retention/nn/norms.hpp>
#include <retention/state.hpp>
#include <retention/nn/rotation.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <string>
#include <vector>

namespace retention {

/// Configuration of MultiScaleRetention. Key dim per head dk = embed_dim / heads (must be even:
/// the rotation acts on pairs), value dim per head dv = value_dim / heads.
struct MsrConfig {
  Index embed_dim = 0;
  /// Total value width (torchscale's value_dim, usually 2 * embed_dim); 0 = embed_dim.
  Index value_dim = 0;
  Index heads = 1;
  /// Per-head gammas in (0, 1]; empty = retnet_gammas(heads), gamma_h = 1 - 2^(-5-h).
  std::vector<double> gammas;
  Normalization normalization = Normalization::decay_and_score;
  /// Per-head norm over dv: RMSNorm (torchscale) or LayerNorm (the paper's GroupNorm), no affine.
  HeadNorm head_norm = HeadNorm::rms;
  double eps = 1e-6;
  /// Biases on the five projections (the paper's first version); torchscale has none.
  bool biases = false;
  /// Threads over heads in the multi-head kernel; 0 = OpenMP's default.
  int threads = 0;
};

/// The five projections of the layer, named as in torchscale's state dict ("q_proj.weight", ...).
enum class MsrProjection { q_proj, k_proj, v_proj, g_proj, out_proj };

inline const char* to_string(MsrProjection p) {
  switch (p) {
    case MsrProjection::q_proj:
      return "q_proj";
    case MsrProjection::k_proj:
      return "k_proj";
    case MsrProjection::v_proj:
      return "v_proj";
    case MsrProjection::g_proj:
      return "g_proj";
    case MsrProjection::out_proj:
      return "out_proj";
  }
  return "?";
}

/// Decoding state of one sequence through one MSR layer: one RetentionState per head
/// (S [dk, dv], z [dk]) and the absolute position (tokens seen so far). Its size does not grow
/// with the sequence. `work` is scratch for step() (so step allocates nothing of its own); it
/// carries no information between tokens.
template <class T>
struct MsrState {
  std::vector<RetentionState<T>> heads;
  Index position = 0;

  struct Workspace {
    RowVector<T> q, k, v, g, o;
  } work;

  /// Bytes of the recurrent state proper (all heads' S and z), constant over the sequence.
  std::size_t bytes() const {
    std::size_t b = 0;
    for (const auto& h : heads) b += h.bytes();
    return b;
  }
  /// Back to the empty prefix (position 0, zero S and z).
  void reset() {
    for (auto& h : heads) h.reset();
    position = 0;
  }
};

/// RetNet Multi-Scale Retention (SPEC 3), torchscale's current MultiScaleRetention. x [T, d]:
///   q = x Wq^T, k = x Wk^T / sqrt(dk), v = x Wv^T, g = x Wg^T          (weights [out, in])
///   q, k rotated by the theta shift at their absolute positions
///   O_h = retention_h(q_h, k_h, v_h) with gamma_h and the chosen normalisation (SPEC 2)
///   y = (silu(g) (.) concat_h norm(O_h)) Wo^T,  norm = RMSNorm or LayerNorm over dv, no affine.
/// Retention itself runs in the library's multi-head kernels on the projection buffers, which
/// already have the [T, H, D] layout, without copies.
template <class T>
class MultiScaleRetention {
 public:
  using Scalar = T;
  using State = MsrState<T>;

  /// A layer with all weights (and biases) zero; load them with load()/load_bias().
  explicit MultiScaleRetention(MsrConfig config)
      : config_(validated(std::move(config))), theta_(config_.embed_dim / config_.heads) {
    detail::assert_scalar<T>();
    dk_ = config_.embed_dim / config_.heads;
    dv_ = config_.value_dim / config_.heads;
    scaling_ = 1.0 / std::sqrt(static_cast<double>(dk_));
    for (int p = 0; p < 5; ++p) {
      const MsrProjection which = static_cast<MsrProjection>(p);
      weights_[p] = Matrix<T>::Zero(out_dim(which), in_dim(which));
      if (config_.biases) biases_[p] = RowVector<T>::Zero(out_dim(which));
    }
  }

  const MsrConfig& config() const { return config_; }
  Index embed_dim() const { return config_.embed_dim; }
  Index value_dim() const { return config_.value_dim; }
  Index heads() const { return config_.heads; }
  /// Per-head key dim dk = embed_dim / heads.
  Index key_dim() const { return dk_; }
  /// Per-head value dim dv = value_dim / heads.
  Index head_value_dim() const { return dv_; }
  const std::vector<double>& gammas() const { return config_.gammas; }
  const ThetaShift& rotation() const { return theta_; }

  /// Expected weight shape [out, in] in torch layout: q, k [d, d]; v, g [value_dim, d]; out [d,
  /// value_dim].
  Index out_dim(MsrProjection p) const {
    return (p == MsrProjection::v_proj || p == MsrProjection::g_proj) ? config_.value_dim
                                                                      : config_.embed_dim;
  }
  Index in_dim(MsrProjection p) const {
    return p == MsrProjection::out_proj ? config_.value_dim : config_.embed_dim;
  }

  /// Loads a torch-layout weight [out, in] from a raw row-major array of `size` values
  /// (e.g. a float32 tensor's data). The size must be exactly out * in.
  template <class S>
  void load(MsrProjection which, const S* data, std::size_t size) {
    const char* fn = "MultiScaleRetention::load";
    const Index rows = out_dim(which), cols = in_dim(which);
    const std::string name = std::string(to_string(which)) + ".weight";
    if (!data) detail::fail(fn, name + ": null pointer");
    if (size != static_cast<std::size_t>(rows * cols))
      detail::fail(fn, name + " has " + std::to_string(size) + " values, expected " +
                           detail::shape_string(rows, cols) + " = " + std::to_string(rows * cols));
    weights_[index(which)] = Eigen::Map<const Matrix<S>>(data, rows, cols).template cast<T>();
  }

  /// Loads a torch-layout weight [out, in] from any Eigen matrix.
  template <class D>
  void load(MsrProjection which, const Eigen::MatrixBase<D>& w) {
    const std::string name = std::string(to_string(which)) + ".weight";
    detail::check_shape("MultiScaleRetention::load", name.c_str(), w, out_dim(which),
                        in_dim(which));
    weights_[index(which)] = w.template cast<T>();
  }

  /// Loads a bias [out] from a raw array (only with MsrConfig::biases).
  template <class S>
  void load_bias(MsrProjection which, const S* data, std::size_t size) {
    const char* fn = "MultiScaleRetention::load_bias";
    const std::string name = std::string(to_string(which)) + ".bias";
    check_biases_enabled(fn, name);
    if (!data) detail::fail(fn, name + ": null pointer");
    const Index n = out_dim(which);
    if (size != static_cast<std::size_t>(n))
      detail::fail(fn, name + " has " + std::to_string(size) + " values, expected " +
                           detail::shape_string(n, 1) + " = " + std::to_string(n));
    biases_[index(which)] = Eigen::Map<const RowVector<S>>(data, n).template cast<T>();
  }

  /// Loads a bias [out] (a row or a column vector) from any Eigen matrix (only with
  /// MsrConfig::biases).
  template <class D>
  void load_bias(MsrProjection which, const Eigen::MatrixBase<D>& b) {
    const char* fn = "MultiScaleRetention::load_bias";
    const std::string name = std::string(to_string(which)) + ".bias";
    check_biases_enabled(fn, name);
    const Index n = out_dim(which);
    if (!((b.rows() == 1 && b.cols() == n) || (b.cols() == 1 && b.rows() == n)))
      detail::fail(fn, name + " is " + detail::shape_string(b.rows(), b.cols()) + ", expected " +
                           detail::shape_string(n, 1) + " or " + detail::shape_string(1, n));
    if (b.rows() == 1)
      biases_[index(which)] = b.row(0).template cast<T>();
    else
      biases_[index(which)] = b.col(0).transpose().template cast<T>();
  }

  /// The stored weight [out, in] (torch layout, k unscaled).
  const Matrix<T>& weight(MsrProjection which) const { return weights_[index(which)]; }
  /// The stored bias [1, out]; empty when biases are off.
  const RowVector<T>& bias(MsrProjection which) const { return biases_[index(which)]; }

  /// Whole-sequence forward, x [T, d] -> y [T, d], positions 0..T-1, in the given form
  /// (chunk = chunk length of the chunkwise form, 0 = the library's recommendation).
  template <class D>
  Matrix<T> forward(const Eigen::MatrixBase<D>& x, Form form = Form::chunkwise,
                    Index chunk = 0) const {
    return run("MultiScaleRetention::forward", x, 1, form, chunk, nullptr);
  }

  /// Batched forward of B sequences of equal length T stacked sequence-major: x [B*T, d], rows
  /// b*T .. b*T+T-1 are sequence b (a row-major [B, T, d] tensor as is). -> y [B*T, d], each
  /// sequence at positions 0..T-1, identical to B calls of forward().
  template <class D>
  Matrix<T> forward_batch(const Eigen::MatrixBase<D>& x, Index batch, Form form = Form::chunkwise,
                          Index chunk = 0) const {
    return run("MultiScaleRetention::forward_batch", x, batch, form, chunk, nullptr);
  }

  /// A zero decoding state at position 0 (one RetentionState [dk, dv] per head).
  State make_state() const {
    State s;
    s.heads.assign(static_cast<std::size_t>(config_.heads), RetentionState<T>(dk_, dv_));
    s.position = 0;
    size_workspace(s);
    return s;
  }

  /// Consumes a prompt x [T, d] in any form, starting at state.position, and returns its output
  /// [T, d]; `state` is advanced to state.position + T, ready for step() or another prefill.
  /// Equal to the matching rows of forward() over the whole sequence.
  template <class D>
  Matrix<T> prefill(const Eigen::MatrixBase<D>& x, State& state, Form form = Form::chunkwise,
                    Index chunk = 0) const {
    const char* fn = "MultiScaleRetention::prefill";
    check_state(fn, state);
    return run(fn, x, 1, form, chunk, &state);
  }

  /// One decoding step: x_t [1, d] at position state.position -> y_t [1, d]; state advances by one.
  /// Recurrent form: S_h <- gamma_h S_h + k_h^T v_h, o_h = q_h S_h (SPEC 2).
  template <class D>
  RowVector<T> step(const Eigen::MatrixBase<D>& x_t, State& state) const {
    RowVector<T> y(config_.embed_dim);
    step_into(x_t, state, y);
    return y;
  }

  /// step() writing y_t [1, d] into a caller's buffer (no allocation when state came from
  /// make_state()).
  template <class D, class DOut>
  void step_into(const Eigen::MatrixBase<D>& x_t, State& state,
                 const Eigen::MatrixBase<DOut>& y_) const {
    detail::assert_same_scalar<T, typename D::Scalar>();
    detail::assert_same_scalar<T, typename DOut::Scalar>();
    const char* fn = "MultiScaleRetention::step";
    const Index d = config_.embed_dim;
    detail::check_shape(fn, "x_t", x_t, 1, d);
    detail::check_shape(fn, "out", y_, 1, d);
    check_state(fn, state);
    auto& y = const_cast<Eigen::MatrixBase<DOut>&>(y_);
    size_workspace(state);
    auto& w = state.work;
    project(x_t, MsrProjection::q_proj, w.q);
    project(x_t, MsrProjection::k_proj, w.k);
    w.k *= static_cast<T>(scaling_);
    project(x_t, MsrProjection::v_proj, w.v);
    project(x_t, MsrProjection::g_proj, w.g);
    theta_.apply_pair(w.q, w.k, state.position);
    // One token's heads are small (dk * dv each): waking threads costs more than it saves unless
    // the heads together are large, and on a busy machine a barrier per layer per token hurts most.
    const int threads = config_.heads * dk_ * dv_ >= (Index(1) << 20) ? config_.threads : 1;
    multi_head_step(w.q.data(), w.k.data(), w.v.data(), w.o.data(), 1, config_.heads, dk_, dv_,
                    config_.gammas, state.heads, config_.normalization, threads);
    norm_and_gate(w.o, w.g);
    y.noalias() = w.o * weights_[index(MsrProjection::out_proj)].transpose();
    if (config_.biases) y += biases_[index(MsrProjection::out_proj)];
    state.position += 1;
  }

 private:
  /// The config with defaults filled in (value_dim, gammas), after checking every field.
  static MsrConfig validated(MsrConfig c) {
    const char* fn = "MultiScaleRetention";
    detail::check_positive(fn, "embed_dim", c.embed_dim);
    detail::check_positive(fn, "heads", c.heads);
    if (c.value_dim < 0)
      detail::fail(fn,
                   "value_dim must be >= 0 (0 = embed_dim), got " + std::to_string(c.value_dim));
    if (c.value_dim == 0) c.value_dim = c.embed_dim;
    if (c.embed_dim % c.heads != 0)
      detail::fail(fn, "embed_dim " + std::to_string(c.embed_dim) + " is not divisible by heads " +
                           std::to_string(c.heads));
    if (c.value_dim % c.heads != 0)
      detail::fail(fn, "value_dim " + std::to_string(c.value_dim) + " is not divisible by heads " +
                           std::to_string(c.heads));
    const Index dk = c.embed_dim / c.heads;
    if (dk % 2 != 0)
      detail::fail(fn, "key dim embed_dim / heads = " + std::to_string(dk) +
                           " is odd; the rotation acts on pairs and needs it even");
    if (!c.gammas.empty() && static_cast<Index>(c.gammas.size()) != c.heads)
      detail::fail(fn, "gammas has " + std::to_string(c.gammas.size()) +
                           " entries, expected heads = " + std::to_string(c.heads) +
                           " (or none for the retnet schedule)");
    for (double g : c.gammas) detail::check_gamma(fn, g);
    if (!(c.eps >= 0.0)) detail::fail(fn, "eps must be >= 0, got " + std::to_string(c.eps));
    if (c.gammas.empty()) c.gammas = retnet_gammas(c.heads);
    return c;
  }

  static int index(MsrProjection p) { return static_cast<int>(p); }

  void check_biases_enabled(const char* fn, const std::string& name) const {
    if (!config_.biases)
      detail::fail(fn, name + ": biases are off in this layer (MsrConfig::biases = false)");
  }

  void check_state(const char* fn, const State& s) const {
    if (static_cast<Index>(s.heads.size()) != config_.heads)
      detail::fail(fn, "state.heads has " + std::to_string(s.heads.size()) +
                           " states, expected heads = " + std::to_string(config_.heads));
    if (s.position < 0)
      detail::fail(fn, "state.position is " + std::to_string(s.position) + ", expected >= 0");
    for (std::size_t h = 0; h < s.heads.size(); ++h) {
      const std::string name = "state.heads[" + std::to_string(h) + "]";
      detail::check_state(fn, s.heads[h], dk_, dv_, name.c_str());
      if (s.heads[h].position != s.position)
        detail::fail(fn, name + ".position is " + std::to_string(s.heads[h].position) +
                             ", expected state.position = " + std::to_string(s.position));
    }
  }

  void size_workspace(State& s) const {
    auto& w = s.work;
    if (w.q.size() != config_.embed_dim) w.q.resize(config_.embed_dim);
    if (w.k.size() != config_.embed_dim) w.k.resize(config_.embed_dim);
    if (w.v.size() != config_.value_dim) w.v.resize(config_.value_dim);
    if (w.g.size() != config_.value_dim) w.g.resize(config_.value_dim);
    if (w.o.size() != config_.value_dim) w.o.resize(config_.value_dim);
  }

  /// out = x W^T (+ b), W read in its stored layout. Long inputs split their rows into one static
  /// block per thread, each a single-threaded GEMM: measured at T = 8192, d = 1024 on 2 threads,
  /// that is 0.89x the time of one Eigen GEMM threaded internally (no team synchronisation inside
  /// the product, and each thread packs only its own rows). A token (GEMV) or a short prompt runs
  /// as one product, and so does a call made from inside a parallel region.
  template <class D, class DOut>
  void project(const Eigen::MatrixBase<D>& x, MsrProjection which, DOut& out) const {
    const Matrix<T>& w = weights_[index(which)];
    const Index rows = x.rows();
    int threads = 1;
#if defined(_OPENMP)
    if (!omp_in_parallel())
      threads = static_cast<int>(
          std::min<Index>(detail::thread_count(config_.threads), rows / kRowsPerProjectionBlock));
#endif
    if (threads > 1) {
      // Inside the region Eigen runs each product on its calling thread (it does not nest).
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads)
#endif
      {
#if defined(_OPENMP)
        const Index t = omp_get_thread_num(), n = omp_get_num_threads();
#else
        const Index t = 0, n = 1;
#endif
        const Index r0 = rows * t / n, r1 = rows * (t + 1) / n;
        out.middleRows(r0, r1 - r0).noalias() = x.middleRows(r0, r1 - r0) * w.transpose();
      }
    } else {
      out.noalias() = x * w.transpose();
    }
    if (config_.biases) out.rowwise() += biases_[index(which)];
  }

  /// Fewest rows per thread for which the projections split over threads.
  static constexpr Index kRowsPerProjectionBlock = 64;

  /// o <- silu(g) (.) headnorm(o), per row and per head group of dv columns. Rows are independent,
  /// so long inputs spread blocks of rows over threads (exp and the norms are not free at T = 8k).
  template <class DO, class DG>
  void norm_and_gate(DO& o, const DG& g) const {
    const Index rows = o.rows(), block = 32;
    const Index blocks = (rows + block - 1) / block;
    const int threads = detail::thread_count(config_.threads);
    (void)threads;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(threads) if (blocks > 1)
#endif
    for (Index ib = 0; ib < blocks; ++ib) {
      const Index r0 = ib * block, n = std::min(block, rows - r0);
      auto ob = o.middleRows(r0, n);
      if (config_.head_norm == HeadNorm::rms)
        rms_norm_groups(ob, dv_, config_.eps);
      else
        layer_norm_groups(ob, dv_, config_.eps);
      // silu(g) = g * sigmoid(g) = g / (1 + exp(-g)); for very negative g, exp(-g) = inf gives -0,
      // not NaN.
      ob.array() *= g.middleRows(r0, n).array() / (T(1) + (-g.middleRows(r0, n).array()).exp());
    }
  }

  template <class D>
  Matrix<T> run(const char* fn, const Eigen::MatrixBase<D>& x_in, Index batch, Form form,
                Index chunk, State* state) const {
    detail::assert_same_scalar<T, typename D::Scalar>();
    const Index d = config_.embed_dim, dvt = config_.value_dim;
    detail::check_shape(fn, "x", x_in, -1, d);
    detail::check_positive(fn, "batch", batch);
    if (chunk < 0)
      detail::fail(fn, "chunk must be >= 0 (0 = automatic), got " + std::to_string(chunk));
    if (x_in.rows() % batch != 0)
      detail::fail(fn, "x is " + detail::shape_string(x_in.rows(), x_in.cols()) +
                           ", rows not a multiple of batch " + std::to_string(batch));
    const Index rows = x_in.rows(), T_len = rows / batch;
    if (rows == 0) return Matrix<T>(0, d);
    // A plain row-major view of x (copied only if x is an expression or strided).
    const Eigen::Ref<const Matrix<T>> x(x_in);
    const Index p0 = state ? state->position : 0;

    // Projections: four GEMMs whose outputs are the [B, T, H, D] buffers of the kernel.
    Matrix<T> q(rows, d), k(rows, d), v(rows, dvt), g(rows, dvt), o(rows, dvt);
    project(x, MsrProjection::q_proj, q);
    project(x, MsrProjection::k_proj, k);
    k *= static_cast<T>(scaling_);
    project(x, MsrProjection::v_proj, v);
    project(x, MsrProjection::g_proj, g);
    for (Index b = 0; b < batch; ++b)
      theta_.apply_pair(q.middleRows(b * T_len, T_len), k.middleRows(b * T_len, T_len), p0);

    MultiHeadShape shape;
    shape.batch = batch;
    shape.time = T_len;
    shape.heads = config_.heads;
    shape.key_dim = dk_;
    shape.value_dim = dv_;
    MultiHeadOptions<T> opt;
    opt.form = form;
    opt.chunk = chunk;
    opt.normalization = config_.normalization;
    opt.threads = config_.threads;
    if (state) {
      // The kernels read the initial state before writing the final one, so they may alias.
      opt.initial_states = &state->heads;
      opt.final_states = &state->heads;
    }
    multi_head_retention(q.data(), k.data(), v.data(), o.data(), shape, config_.gammas, opt);
    if (state) state->position = p0 + T_len;

    norm_and_gate(o, g);
    // q is no longer needed and has y's shape [rows, d]: writing y into it saves a fresh
    // rows x d allocation (and its first-touch page faults, 32 MiB at T = 8192, d = 1024).
    project(o, MsrProjection::out_proj, q);
    return q;
  }

  MsrConfig config_;
  ThetaShift theta_;
  Index dk_ = 0, dv_ = 0;
  double scaling_ = 1.0;
  Matrix<T> weights_[5];
  RowVector<T> biases_[5];
};

}  // namespace retention
