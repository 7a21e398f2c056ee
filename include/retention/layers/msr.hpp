// retention: the RetNet Multi-Scale Retention layer (docs/math.md §3), torchscale's parameter
// names, any of the three forms, prompt prefill followed by token-by-token decoding; for serving,
// packed prefill of prompts of different lengths and batched decoding of many sequences.
#pragma once

#include <retention/core.hpp>
#include <retention/decay.hpp>
#include <retention/detail/scratch.hpp>
#include <retention/detail/threading.hpp>
#include <retention/heads.hpp>
#include <retention/multihead.hpp>
#include <retention/nn/linear.hpp>
#include <retention/nn/norms.hpp>
#include <retention/nn/parameters.hpp>
#include <retention/nn/rotation.hpp>
#include <retention/state.hpp>
#include <retention/varlen.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
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
  /// Form of forward() and prefill(), and the chunk of the chunkwise form (0 = automatic).
  Form form = Form::chunkwise;
  Index chunk = 0;
  /// Threads; 0 = OpenMP's default, capped by the work (detail/threading.hpp).
  int threads = 0;
  /// Keep the fused projection and the output projection packed for Eigen's GEMM as well
  /// (Linear::set_packed): prefill and forward skip packing the weights, at the cost of as much
  /// memory again as those weights. Decoding steps (one row) do not use it.
  bool packed_weights = false;
  /// forward, forward_batch, prefill and prefill_packed keep their two work buffers (the fused
  /// projection [rows, 2 embed_dim + 2 value_dim] and the heads' outputs [rows, value_dim]) for
  /// the calling thread's next call, growing them to the largest call so far. Blocks of more than
  /// 32 MiB that are freed go back to the system (glibc), and the next call faults their pages in
  /// again (README, Performance). false: buffers above 16 MiB are freed after every call.
  bool keep_buffers = true;
};

/// Decoding state of one sequence through one MSR layer: one RetentionState per head
/// (S [dk, dv], z [dk]) and the absolute position (tokens seen so far). Its size does not grow
/// with the sequence. `work` is scratch for step() (so that step allocates nothing after its
/// first call); it carries no information between tokens.
template <class T>
struct MsrState {
  std::vector<RetentionState<T>> heads;
  Index position = 0;

  struct Workspace {
    RowVector<T> p, o;  // the fused projection [q | k | v | g] of one token, the heads' outputs
    RowVector<T> x, y;  // copies of step_into's x_t and y when they are not contiguous rows
    StepWorkspace<T> step;
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

/// Scratch of MultiScaleRetention::step_batch, shared by the whole batch (the per-sequence
/// MsrState::work is not used there): the batch's fused projection, head outputs, the state
/// pointers and the per-thread step buffers. Grows to the largest batch seen and is then reused,
/// so a decoding loop allocates nothing while sequences join and leave.
template <class T>
struct MsrBatchWorkspace {
  Matrix<T> x, p, o;  // [capacity, d] converted inputs, [capacity, 2d + 2dv], [capacity, dv]
  Matrix<T> y;        // [capacity, d] outputs when the caller's y is not row-major
  std::vector<RetentionState<T>*> heads;
  std::vector<const void*> sorted;
  VarlenStepWorkspace<T> step;
};

/// RetNet Multi-Scale Retention (docs/math.md §3), torchscale's MultiScaleRetention. x [T, d]:
///   q = x Wq^T, k = x Wk^T / sqrt(dk), v = x Wv^T, g = x Wg^T          (weights [out, in])
///   q, k rotated by the theta shift at their absolute positions
///   O_h = retention_h(q_h, k_h, v_h) with gamma_h and the chosen normalisation (§2)
///   y = (silu(g) (.) concat_h norm(O_h)) Wo^T,  norm = RMSNorm or LayerNorm over dv, no affine.
/// One fused projection writes [q | k | v | g] into one buffer; HeadsViews over it go to the
/// multi-head kernels without copies.
template <class T>
class MultiScaleRetention {
 public:
  using Scalar = T;
  using State = MsrState<T>;

  /// A layer with all weights (and biases) zero; load them with load().
  explicit MultiScaleRetention(MsrConfig config);

  const MsrConfig& config() const { return config_; }
  Index embed_dim() const { return config_.embed_dim; }
  Index value_dim() const { return config_.value_dim; }
  Index heads() const { return config_.heads; }
  /// Per-head key dim dk = embed_dim / heads.
  Index key_dim() const { return dk_; }
  /// Per-head value dim dv = value_dim / heads.
  Index head_value_dim() const { return dv_; }
  const std::vector<double>& gammas() const { return config_.gammas; }
  const std::vector<CausalDecay>& masks() const { return masks_; }
  const ThetaShift& rotation() const { return theta_; }
  const Linear<T>& q_proj() const { return q_proj_; }
  const Linear<T>& k_proj() const { return k_proj_; }
  const Linear<T>& v_proj() const { return v_proj_; }
  const Linear<T>& g_proj() const { return g_proj_; }
  const Linear<T>& out_proj() const { return out_proj_; }

  /// Loads every parameter by torchscale's names under `prefix` (e.g. "layers.3.retention."):
  /// q_proj, k_proj, v_proj, g_proj, out_proj (.weight [out, in], and .bias with
  /// MsrConfig::biases), from a ParameterMap or any source with find(name) -> const TensorRef*.
  /// The layer is unchanged unless every parameter loads.
  template <class Source>
  void load(const Source& source, const std::string& prefix = "") {
    const char* fn = "MultiScaleRetention::load";
    Linear<T> q = q_proj_, k = k_proj_, v = v_proj_, g = g_proj_, o = out_proj_;
    q.load(source, prefix + "q_proj.", fn);
    k.load(source, prefix + "k_proj.", fn);
    v.load(source, prefix + "v_proj.", fn);
    g.load(source, prefix + "g_proj.", fn);
    o.load(source, prefix + "out_proj.", fn);
    Linear<T> fused = fused_of(q, k, v, g);
    q_proj_ = std::move(q), k_proj_ = std::move(k), v_proj_ = std::move(v), g_proj_ = std::move(g);
    out_proj_ = std::move(o), fused_ = std::move(fused);
  }

  /// Deterministic initialisation for examples and benchmarks: every weight (and bias) uniform in
  /// [-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn from mt19937_64(seed).
  void init_random(std::uint64_t seed);

  /// Whole-sequence forward, x [T, d] -> y [T, d], positions 0..T-1, in config().form.
  template <class D>
  Matrix<T> forward(const Eigen::MatrixBase<D>& x) const {
    detail::assert_same_scalar<T, typename D::Scalar>();
    return run("MultiScaleRetention::forward", x.derived(), 1, config_.form, config_.chunk,
               nullptr);
  }
  /// forward() in the given form (chunk = chunk length of the chunkwise form, 0 = automatic).
  template <class D>
  Matrix<T> forward(const Eigen::MatrixBase<D>& x, Form form, Index chunk = 0) const {
    detail::assert_same_scalar<T, typename D::Scalar>();
    return run("MultiScaleRetention::forward", x.derived(), 1, form, chunk, nullptr);
  }

  /// Batched forward of B sequences of equal length T stacked sequence-major: x [B*T, d], rows
  /// b*T .. b*T+T-1 are sequence b (a row-major [B, T, d] tensor as is). -> y [B*T, d], each
  /// sequence at positions 0..T-1, identical to B calls of forward().
  template <class D>
  Matrix<T> forward_batch(const Eigen::MatrixBase<D>& x, Index batch, Form form = Form::chunkwise,
                          Index chunk = 0) const {
    detail::assert_same_scalar<T, typename D::Scalar>();
    return run("MultiScaleRetention::forward_batch", x.derived(), batch, form, chunk, nullptr);
  }

  /// A zero decoding state at position 0 (one RetentionState [dk, dv] per head), with its step
  /// scratch sized.
  State make_state() const;

  /// Consumes a prompt x [T, d] in any form, starting at state.position, and returns its output
  /// [T, d]; `state` advances to state.position + T, ready for step() or another prefill. Equal
  /// to the matching rows of forward() over the whole sequence. If it throws, `state` is unchanged.
  template <class D>
  Matrix<T> prefill(const Eigen::MatrixBase<D>& x, State& state, Form form = Form::chunkwise,
                    Index chunk = 0) const {
    detail::assert_same_scalar<T, typename D::Scalar>();
    return prefill_impl(x.derived(), state, form, chunk);
  }

  /// One decoding step: x_t [1, d] at position state.position -> y_t [1, d]; state advances by one.
  /// Recurrent form: S_h <- gamma_h S_h + k_h^T v_h, o_h = q_h S_h (docs/math.md §2).
  template <class D>
  RowVector<T> step(const Eigen::MatrixBase<D>& x_t, State& state) const {
    RowVector<T> y(config_.embed_dim);
    step_into(x_t, state, y);
    return y;
  }

  /// step() writing y_t [1, d] into a caller's buffer; allocates nothing once the state's scratch
  /// is sized (make_state() does it). If it throws (only the checks can), `state` is unchanged.
  template <class D, class DOut>
  void step_into(const Eigen::MatrixBase<D>& x_t, State& state, DOut&& y) const {
    using Out = std::remove_reference_t<DOut>;
    detail::assert_same_scalar<T, typename D::Scalar>();
    detail::assert_same_scalar<T, typename std::decay_t<DOut>::Scalar>();
    static_assert(!std::is_const<Out>::value, "retention: step_into writes into y");
    const char* fn = "MultiScaleRetention::step";
    detail::check_shape(fn, "x_t", x_t, 1, config_.embed_dim);
    detail::check_shape(fn, "out", y, 1, config_.embed_dim);
    // Types whose compile-time shape cannot be one row never get here (check_shape threw).
    if constexpr (can_be_row<D> && can_be_row<Out>) {
      // Contiguous rows go through as they are; strided ones (a row of a column-major matrix)
      // through the state's scratch rows, so that no call allocates once those are sized.
      auto& w = state.work;
      const auto with_input = [&](const InRow& xr) {
        if constexpr (std::is_constructible<OutRow, Out&>::value) {
          step_impl(xr, state, OutRow(y));
        } else {
          w.y.resize(config_.embed_dim);
          step_impl(xr, state, w.y);
          y = w.y;
        }
      };
      if constexpr (contiguous_rows<D>) {
        with_input(x_t.derived());
      } else {
        w.x = x_t;
        with_input(w.x);
      }
    }
  }

  using BatchWorkspace = MsrBatchWorkspace<T>;

  /// Batched decoding (continuous batching): x [B, d] holds one token of each of B sequences, row
  /// b at its own position states[b]->position; y [B, d] receives their outputs and every state
  /// advances by one. Equal to B calls of step(). x may be T, or Eigen::bfloat16 / Eigen::half
  /// (widened exactly to T; weights, accumulation and states stay T). The states are reached
  /// through pointers (distinct, non-null), so sequences join and leave between calls without
  /// copies; `work` is reused across calls and allocates only when the batch outgrows it.
  /// If it throws (only the checks can), no state changes.
  template <class D, class DOut>
  void step_batch(const Eigen::MatrixBase<D>& x, const std::vector<State*>& states, DOut&& y,
                  BatchWorkspace& work) const {
    using S = typename D::Scalar;
    using Out = std::remove_reference_t<DOut>;
    static_assert(std::is_same<S, T>::value || std::is_same<S, Eigen::bfloat16>::value ||
                      std::is_same<S, Eigen::half>::value,
                  "retention: step_batch inputs are the layer's scalar, Eigen::bfloat16 or "
                  "Eigen::half");
    detail::assert_same_scalar<T, typename std::decay_t<DOut>::Scalar>();
    static_assert(!std::is_const<Out>::value, "retention: step_batch writes into y");
    const char* fn = "MultiScaleRetention::step_batch";
    const Index d = config_.embed_dim;
    const Index B = static_cast<Index>(states.size());
    detail::check_positive(fn, "states.size()", B);
    detail::check_shape(fn, "x", x, B, d);
    detail::check_shape(fn, "out", y, B, d);
    const auto with_input = [&](const InRows& xr) {
      if constexpr (std::is_constructible<OutRows, Out&>::value) {
        step_batch_impl(xr, states, OutRows(y), work);
      } else {  // y is column-major or strided: through work.y
        if (work.y.rows() < B || work.y.cols() != d) work.y.resize(B, d);
        step_batch_impl(xr, states, work.y.topRows(B), work);
        y = work.y.topRows(B);
      }
    };
    // Rows of T that a Ref views as they are go straight through; 16-bit, column-major or strided
    // rows are converted into work.x first (widened exactly), which allocates only when the batch
    // outgrows it.
    if constexpr (views_as_rows<D>) {
      with_input(x.derived());
    } else {
      if (work.x.rows() < B || work.x.cols() != d) work.x.resize(B, d);
      auto xt = work.x.topRows(B);
      xt = x.template cast<T>();
      with_input(xt);
    }
  }

  /// step_batch() returning y [B, d], with a workspace of its own (allocates on every call).
  template <class D>
  Matrix<T> step_batch(const Eigen::MatrixBase<D>& x, const std::vector<State*>& states) const {
    BatchWorkspace work;
    Matrix<T> y(x.rows(), config_.embed_dim);
    step_batch(x, states, y, work);
    return y;
  }

  /// Packed prefill of B prompts of different lengths in one call: x [total, d] holds the prompts
  /// back to back, prompt b in rows [cu_seqlens[b], cu_seqlens[b + 1]) (B + 1 offsets from 0 to
  /// total; empty prompts allowed), each starting at its own states[b]->position. Returns y
  /// [total, d], each prompt's rows equal to prefill() of that prompt alone; every state advances
  /// by its prompt's length. If it throws, no state changes.
  template <class D>
  Matrix<T> prefill_packed(const Eigen::MatrixBase<D>& x, const std::vector<Index>& cu_seqlens,
                           const std::vector<State*>& states, Form form = Form::chunkwise,
                           Index chunk = 0) const {
    detail::assert_same_scalar<T, typename D::Scalar>();
    return prefill_packed_impl(x.derived(), cu_seqlens, states, form, chunk);
  }

 private:
  // The heavy work lives in the non-template members below, defined after the class without
  // `inline`: the public member templates only check their arguments' types and shapes and view
  // them through Refs, so that in compiled mode (RETENTION_COMPILED, see the end of this file)
  // `extern template` leaves every heavy instantiation to the library.
  using InRows = Eigen::Ref<const Matrix<T>>;
  using OutRows = Eigen::Ref<Matrix<T>>;
  using InRow = Eigen::Ref<const RowVector<T>>;
  using OutRow = Eigen::Ref<RowVector<T>>;

  /// Whether D's compile-time shape allows one row (a Ref to a row of any other fixed shape does
  /// not compile; such arguments are rejected by check_shape at run time instead).
  template <class D>
  static constexpr bool can_be_row =
      D::RowsAtCompileTime == 1 || D::RowsAtCompileTime == Eigen::Dynamic;
  /// Whether an InRow (contiguous_rows) or an InRows (views_as_rows) views a D as it is, without
  /// a copy: T elements in memory, unit stride along a row, and for InRows row-major storage or a
  /// vector (the compile-time test that Ref itself applies).
  template <class D>
  static constexpr bool contiguous_rows = std::is_same<typename D::Scalar, T>::value &&
                                          (int(D::Flags) & Eigen::DirectAccessBit) != 0 &&
                                          int(D::InnerStrideAtCompileTime) == 1;
  template <class D>
  static constexpr bool views_as_rows = contiguous_rows<D> &&
                                        ((int(D::Flags) & Eigen::RowMajorBit) != 0 ||
                                         D::IsVectorAtCompileTime);

  struct ProjectionScratch {};
  struct OutputsScratch {};
  /// The fused projection p [rows, width] and the heads' outputs o [rows, dv] of one call (fn's),
  /// from buffers the calling thread keeps (MsrConfig::keep_buffers).
  struct WorkBuffers {
    using Rows = Eigen::Map<Matrix<T>, Eigen::AlignedMax>;
    WorkBuffers(const char* fn, Index rows, Index width, Index dv, bool keep)
        : p_buf(detail::checked_product(fn, "rows * (2 embed_dim + 2 value_dim)", rows, width),
                keep_bytes(keep)),
          o_buf(rows * dv, keep_bytes(keep)),
          p(p_buf.data(), rows, width),
          o(o_buf.data(), rows, dv) {}
    static std::size_t keep_bytes(bool keep) {
      return keep ? std::numeric_limits<std::size_t>::max() : detail::scratch_keep_bytes;
    }
    detail::ThreadScratch<T, ProjectionScratch> p_buf;
    detail::ThreadScratch<T, OutputsScratch> o_buf;
    Rows p, o;
  };

  Matrix<T> run(const char* fn, const InRows& x, Index batch, Form form, Index chunk,
                State* state) const;
  Matrix<T> prefill_impl(const InRows& x, State& state, Form form, Index chunk) const;
  void step_impl(const InRow& x_t, State& state, OutRow y) const;
  void step_batch_impl(const InRows& x, const std::vector<State*>& states, OutRows y,
                       BatchWorkspace& work) const;
  Matrix<T> prefill_packed_impl(const InRows& x, const std::vector<Index>& cu_seqlens,
                                const std::vector<State*>& states, Form form, Index chunk) const;

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
    detail::checked_product(fn, "embed_dim * embed_dim", c.embed_dim, c.embed_dim);
    detail::checked_product(fn, "embed_dim * value_dim", c.embed_dim, c.value_dim);
    const Index dk = c.embed_dim / c.heads;
    if (dk % 2 != 0)
      detail::fail(fn, "key dim embed_dim / heads = " + std::to_string(dk) +
                           " is odd; the rotation acts on pairs and needs it even");
    if (!c.gammas.empty() && static_cast<Index>(c.gammas.size()) != c.heads)
      detail::fail(fn, "gammas has " + std::to_string(c.gammas.size()) +
                           " entries, expected heads = " + std::to_string(c.heads) +
                           " (or none for the retnet schedule)");
    for (double g : c.gammas) detail::check_gamma(fn, g);
    if (!(c.eps >= 0.0) || !std::isfinite(c.eps))
      detail::fail(fn, "eps must be >= 0 and finite, got " + std::to_string(c.eps));
    detail::check_form(fn, c.form);
    detail::check_normalization(fn, c.normalization);
    if (c.head_norm != HeadNorm::rms && c.head_norm != HeadNorm::layer)
      detail::fail(fn, "head_norm is not one of rms, layer");
    if (c.chunk < 0)
      detail::fail(fn, "chunk must be >= 0 (0 = automatic), got " + std::to_string(c.chunk));
    detail::check_threads(fn, "threads", c.threads);
    if (c.gammas.empty()) c.gammas = retnet_gammas(c.heads);
    return c;
  }

  Linear<T> fused_of(const Linear<T>& q, const Linear<T>& k, const Linear<T>& v,
                     const Linear<T>& g) const;
  void fuse() { fused_ = fused_of(q_proj_, k_proj_, v_proj_, g_proj_); }

  void check_state(const char* fn, const State& s) const {
    if (static_cast<Index>(s.heads.size()) != config_.heads)
      detail::fail(fn, "state.heads has " + std::to_string(s.heads.size()) +
                           " states, expected heads = " + std::to_string(config_.heads));
    if (s.position < 0)
      detail::fail(fn, "state.position is " + std::to_string(s.position) + ", expected >= 0");
    for (std::size_t h = 0; h < s.heads.size(); ++h) {
      const auto& hs = s.heads[h];
      if (hs.S.rows() != dk_ || hs.S.cols() != dv_ || hs.z.size() != dk_ ||
          hs.position != s.position) {
        const std::string name = "state.heads[" + std::to_string(h) + "]";
        detail::check_state(fn, hs, dk_, dv_, name.c_str());
        detail::fail(fn, name + ".position is " + std::to_string(hs.position) +
                             ", expected state.position = " + std::to_string(s.position));
      }
    }
  }

  void size_workspace(State& s) const {
    auto& w = s.work;
    const Index width = 2 * config_.embed_dim + 2 * config_.value_dim;
    if (w.p.size() != width) w.p.resize(width);
    if (w.o.size() != config_.value_dim) w.o.resize(config_.value_dim);
    // As many buffers as multi_head_step may use threads (it sizes its team the same way).
    w.step.reserve(
        detail::team_size(config_.threads, config_.heads,
                          8.0 * sizeof(T) * static_cast<double>(config_.heads * dk_ * dv_)),
        dk_, dv_);
  }

  /// out = x W^T (+ b) for a Linear, rows split over threads by the thread rule (each block a
  /// single-threaded product); a token or a short prompt runs as one product on this thread.
  template <class D, class DOut>
  void project(const Linear<T>& l, const Eigen::MatrixBase<D>& x, DOut& out) const {
    l.forward_into(x, out, config_.threads, kRowsPerProjectionBlock);
  }

  /// Fewest rows per thread for which the projections split over threads.
  static constexpr Index kRowsPerProjectionBlock = 64;

  /// o <- silu(g) (.) headnorm(o), per row and per head group of dv columns, rows in blocks over
  /// threads (rows are independent).
  template <class DO, class DG>
  void norm_and_gate(DO& o, const DG& g, Index rows) const {
    const Index block = 32, blocks = (rows + block - 1) / block;
    const double work = 20.0 * static_cast<double>(rows) * static_cast<double>(config_.value_dim);
    detail::parallel_tasks(detail::plan_team(config_.threads, blocks, work), blocks, [&](Index ib) {
      const Index r0 = ib * block, n = std::min(block, rows - r0);
      auto ob = o.middleRows(r0, n);
      if (config_.head_norm == HeadNorm::rms)
        rms_norm_groups(ob, dv_, config_.eps);
      else
        layer_norm_groups(ob, dv_, config_.eps);
      // silu(g) = g / (1 + exp(-g)); for very negative g, exp(-g) = inf gives -0, not NaN.
      const auto gb = g.middleRows(r0, n).array();
      ob.array() *= gb / (T(1) + (-gb).exp());
    });
  }

  MsrConfig config_;
  ThetaShift theta_;
  std::vector<CausalDecay> masks_;
  Index dk_ = 0, dv_ = 0;
  Linear<T> q_proj_, k_proj_, v_proj_, g_proj_, out_proj_;
  Linear<T> fused_;  // [q | k / sqrt(dk) | v | g]
};

template <class T>
MultiScaleRetention<T>::MultiScaleRetention(MsrConfig config)
    : config_(validated(std::move(config))),
      theta_(config_.embed_dim / config_.heads),
      masks_(causal_masks(config_.gammas)) {
  detail::assert_scalar<T>();
  dk_ = config_.embed_dim / config_.heads;
  dv_ = config_.value_dim / config_.heads;
  const Index d = config_.embed_dim, dvt = config_.value_dim;
  q_proj_ = Linear<T>(d, d, config_.biases);
  k_proj_ = Linear<T>(d, d, config_.biases);
  v_proj_ = Linear<T>(d, dvt, config_.biases);
  g_proj_ = Linear<T>(d, dvt, config_.biases);
  out_proj_ = Linear<T>(dvt, d, config_.biases);
  out_proj_.set_packed(config_.packed_weights);
  fuse();
}

template <class T>
void MultiScaleRetention<T>::init_random(std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  for (Linear<T>* l : {&q_proj_, &k_proj_, &v_proj_, &g_proj_, &out_proj_}) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(l->in_features()));
    std::uniform_real_distribution<double> dist(-bound, bound);
    Matrix<T> w(l->out_features(), l->in_features());
    for (Index i = 0; i < w.size(); ++i) w.data()[i] = static_cast<T>(dist(rng));
    l->set_weight(w);
    if (l->has_bias()) {
      RowVector<T> b(l->out_features());
      for (Index i = 0; i < b.size(); ++i) b(i) = static_cast<T>(dist(rng));
      l->set_bias(b);
    }
  }
  fuse();
}

template <class T>
MsrState<T> MultiScaleRetention<T>::make_state() const {
  State s;
  s.heads.assign(static_cast<std::size_t>(config_.heads), RetentionState<T>(dk_, dv_));
  s.position = 0;
  size_workspace(s);
  return s;
}

template <class T>
Linear<T> MultiScaleRetention<T>::fused_of(const Linear<T>& q, const Linear<T>& k,
                                           const Linear<T>& v, const Linear<T>& g) const {
  Linear<T> fused = Linear<T>::concat(
      {{&q, 1.0}, {&k, 1.0 / std::sqrt(static_cast<double>(dk_))}, {&v, 1.0}, {&g, 1.0}});
  fused.set_packed(config_.packed_weights);
  return fused;
}

template <class T>
Matrix<T> MultiScaleRetention<T>::prefill_impl(const InRows& x, State& state, Form form,
                                               Index chunk) const {
  const char* fn = "MultiScaleRetention::prefill";
  check_state(fn, state);
  return run(fn, x, 1, form, chunk, &state);
}

template <class T>
void MultiScaleRetention<T>::step_impl(const InRow& x_t, State& state, OutRow y) const {
  const char* fn = "MultiScaleRetention::step";
  const Index d = config_.embed_dim, dvt = config_.value_dim, H = config_.heads;
  check_state(fn, state);
  if (state.position > std::numeric_limits<Index>::max() - 1)
    detail::fail(fn, "state.position would overflow");
  size_workspace(state);
  auto& w = state.work;
  fused_.forward_into(x_t, w.p);
  const Index ld = w.p.size();
  theta_.apply_pair(w.p.middleCols(0, d), w.p.middleCols(d, d), state.position);
  const T* p = w.p.data();
  // One token's heads are small (dk * dv each): the thread rule keeps them on this thread unless
  // the heads together are large.
  multi_head_step(HeadsView<const T>{p, 1, 1, H, dk_, ld, ld, dk_},
                  HeadsView<const T>{p + d, 1, 1, H, dk_, ld, ld, dk_},
                  HeadsView<const T>{p + 2 * d, 1, 1, H, dv_, ld, ld, dv_},
                  heads_view(w.o.data(), 1, 1, H, dv_), masks_, state.heads, config_.normalization,
                  config_.threads, &w.step);
  norm_and_gate(w.o, w.p.middleCols(2 * d + dvt, dvt), 1);
  out_proj_.forward_into(w.o, y);
  state.position += 1;
}

template <class T>
void MultiScaleRetention<T>::step_batch_impl(const InRows& x, const std::vector<State*>& states,
                                             OutRows y, BatchWorkspace& work) const {
  const char* fn = "MultiScaleRetention::step_batch";
  const Index d = config_.embed_dim, dvt = config_.value_dim, H = config_.heads;
  const Index B = static_cast<Index>(states.size());
  detail::check_distinct_states(fn, states, "states", work.sorted);
  for (Index b = 0; b < B; ++b) {
    const State& s = *states[static_cast<std::size_t>(b)];
    check_state(fn, s);
    if (s.position > std::numeric_limits<Index>::max() - 1)
      detail::fail(fn, "states[" + std::to_string(b) + "].position would overflow");
  }
  const Index width = 2 * d + 2 * dvt;
  if (work.p.rows() < B || work.p.cols() != width) work.p.resize(B, width);
  if (work.o.rows() < B || work.o.cols() != dvt) work.o.resize(B, dvt);
  work.heads.resize(static_cast<std::size_t>(B * H));
  auto p = work.p.topRows(B);
  auto o = work.o.topRows(B);
  project(fused_, x, p);
  for (Index b = 0; b < B; ++b) {
    State& s = *states[static_cast<std::size_t>(b)];
    theta_.apply_pair(p.block(b, 0, 1, d), p.block(b, d, 1, d), s.position);
    for (Index h = 0; h < H; ++h)
      work.heads[static_cast<std::size_t>(b * H + h)] = &s.heads[static_cast<std::size_t>(h)];
  }
  const T* base = p.data();
  varlen_step(HeadsView<const T>{base, B, 1, H, dk_, width, width, dk_},
              HeadsView<const T>{base + d, B, 1, H, dk_, width, width, dk_},
              HeadsView<const T>{base + 2 * d, B, 1, H, dv_, width, width, dv_},
              heads_view(o.data(), B, 1, H, dv_), masks_, work.heads, config_.normalization,
              config_.threads, &work.step);
  norm_and_gate(o, p.rightCols(dvt), B);
  project(out_proj_, o, y);
  for (State* s : states) s->position += 1;
}

template <class T>
Matrix<T> MultiScaleRetention<T>::prefill_packed_impl(const InRows& x,
                                                      const std::vector<Index>& cu_seqlens,
                                                      const std::vector<State*>& states, Form form,
                                                      Index chunk) const {
  const char* fn = "MultiScaleRetention::prefill_packed";
  const Index d = config_.embed_dim, dvt = config_.value_dim, H = config_.heads;
  detail::check_shape(fn, "x", x, -1, d);
  detail::check_form(fn, form);
  if (chunk < 0)
    detail::fail(fn, "chunk must be >= 0 (0 = automatic), got " + std::to_string(chunk));
  const Index total = x.rows();
  const auto segments = detail::serving::packed_segments(fn, cu_seqlens, total);
  const Index B = static_cast<Index>(segments.size());
  if (static_cast<Index>(states.size()) != B)
    detail::fail(fn,
                 "states has " + std::to_string(states.size()) +
                     " entries, expected one per sequence of cu_seqlens = " + std::to_string(B));
  std::vector<const void*> sorted;
  detail::check_distinct_states(fn, states, "states", sorted);
  for (Index b = 0; b < B; ++b) {
    const State& s = *states[static_cast<std::size_t>(b)];
    check_state(fn, s);
    detail::check_position_range(fn, "states position", s.position,
                                 segments[static_cast<std::size_t>(b)].rows);
  }
  if (total == 0) return Matrix<T>(0, d);
  const Index width = 2 * d + 2 * dvt;
  WorkBuffers work(fn, total, width, dvt, config_.keep_buffers);
  auto &p = work.p, &o = work.o;
  Matrix<T> y(total, d);
  project(fused_, x, p);
  for (Index b = 0; b < B; ++b) {
    const auto& sg = segments[static_cast<std::size_t>(b)];
    if (sg.rows > 0)
      theta_.apply_pair(p.block(sg.start, 0, sg.rows, d), p.block(sg.start, d, sg.rows, d),
                        states[static_cast<std::size_t>(b)]->position, config_.threads);
  }
  std::vector<RetentionState<T>> finals(static_cast<std::size_t>(B * H));
  const T* base = p.data();
  const Index seq = total * width;
  detail::serving::run_segments(
      HeadsView<const T>{base, 1, total, H, dk_, seq, width, dk_},
      HeadsView<const T>{base + d, 1, total, H, dk_, seq, width, dk_},
      HeadsView<const T>{base + 2 * d, 1, total, H, dv_, seq, width, dv_},
      heads_view(o.data(), 1, total, H, dv_), segments, masks_, form, chunk, config_.normalization,
      config_.threads,
      [&](Index b, Index h) -> const RetentionState<T>* {
        return &states[static_cast<std::size_t>(b)]->heads[static_cast<std::size_t>(h)];
      },
      [&](Index b, Index h) -> RetentionState<T>* {
        return &finals[static_cast<std::size_t>(b * H + h)];
      });
  norm_and_gate(o, p.rightCols(dvt), total);
  project(out_proj_, o, y);
  for (Index b = 0; b < B; ++b) {  // commit only now: nothing below can throw
    State& s = *states[static_cast<std::size_t>(b)];
    for (Index h = 0; h < H; ++h)
      std::swap(s.heads[static_cast<std::size_t>(h)], finals[static_cast<std::size_t>(b * H + h)]);
    s.position += segments[static_cast<std::size_t>(b)].rows;
  }
  return y;
}

template <class T>
Matrix<T> MultiScaleRetention<T>::run(const char* fn, const InRows& x, Index batch, Form form,
                                      Index chunk, State* state) const {
  const Index d = config_.embed_dim, dvt = config_.value_dim, H = config_.heads;
  detail::check_shape(fn, "x", x, -1, d);
  detail::check_positive(fn, "batch", batch);
  detail::check_form(fn, form);
  if (chunk < 0)
    detail::fail(fn, "chunk must be >= 0 (0 = automatic), got " + std::to_string(chunk));
  if (x.rows() % batch != 0)
    detail::fail(fn, "x is " + detail::shape_string(x.rows(), x.cols()) +
                         ", rows not a multiple of batch " + std::to_string(batch));
  const Index rows = x.rows(), T_len = rows / batch;
  if (rows == 0) return Matrix<T>(0, d);
  const Index p0 = state ? state->position : 0;
  if (p0 > std::numeric_limits<Index>::max() - T_len)
    detail::fail(fn, "state.position + T would overflow");
  // One projection into [q | k | v | g]; q and k rotated in place.
  const Index width = 2 * d + 2 * dvt;
  WorkBuffers work(fn, rows, width, dvt, config_.keep_buffers);
  auto &p = work.p, &o = work.o;
  Matrix<T> y(rows, d);
  project(fused_, x, p);
  for (Index b = 0; b < batch; ++b)
    theta_.apply_pair(p.block(b * T_len, 0, T_len, d), p.block(b * T_len, d, T_len, d), p0,
                      config_.threads);

  const Index seq = T_len * width;
  MultiHeadOptions<T> opt;
  opt.form = form;
  opt.chunk = chunk;
  opt.normalization = config_.normalization;
  opt.threads = config_.threads;
  std::vector<RetentionState<T>> finals;
  if (state) {
    opt.initial_states = &state->heads;
    opt.final_states = &finals;
  }
  multi_head_retention(HeadsView<const T>{p.data(), batch, T_len, H, dk_, seq, width, dk_},
                       HeadsView<const T>{p.data() + d, batch, T_len, H, dk_, seq, width, dk_},
                       HeadsView<const T>{p.data() + 2 * d, batch, T_len, H, dv_, seq, width, dv_},
                       heads_view(o.data(), batch, T_len, H, dv_), masks_, opt);
  norm_and_gate(o, p.rightCols(dvt), rows);
  project(out_proj_, o, y);
  if (state) {  // commit only now: nothing below can throw
    state->heads.swap(finals);
    state->position = p0 + T_len;
  }
  return y;
}

#if defined(RETENTION_COMPILED) && !defined(RETENTION_COMPILED_BUILDING)
// Compiled mode: the float and double layers are instantiated once, in the retention_compiled
// library (src/msr_*.cpp); translation units that include this header compile only the wrappers.
extern template class MultiScaleRetention<float>;
extern template class MultiScaleRetention<double>;
#endif

}  // namespace retention
