// A small RetNet language model from the public headers: prefill a prompt chunkwise, then decode
// greedily one token at a time with a constant-size state.
//
// Model: token embedding, L layers of [x += MSR(RMSNorm(x)); x += SwiGLU(RMSNorm(x))], final
// RMSNorm, output projection tied to the embedding. d = 512, H = 4 (dk = 128), value dim 1024 (dv =
// 256), FFN width 1024, L = 4, vocabulary 4096, deterministic pseudo-random weights N(0, 1/fan_in).
//
// It prints prefill throughput, decode throughput over the first and the last 100 tokens (the cost
// per token does not grow with the sequence), the decoding state's size (constant), the peak
// resident memory, and checks the last decoded token's logits against a parallel forward over the
// whole final sequence.
#include <retention/retention.hpp>

#include <sys/resource.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

namespace {

using retention::Form;
using retention::Index;
using retention::Matrix;
using retention::MsrConfig;
using retention::MultiScaleRetention;
using retention::RowVector;
using Clock = std::chrono::steady_clock;

constexpr Index kDim = 512, kHeads = 4, kValueDim = 1024, kFfn = 1024, kLayers = 4, kVocab = 4096;
constexpr Index kPrompt = 2048, kDecode = 1024, kWindow = 100;
constexpr double kNormEps = 1e-6;

/// N(0, std) matrix from a seeded generator: the same weights on every run and machine.
Matrix<float> normal_matrix(Index rows, Index cols, double std, std::mt19937_64& rng) {
  std::normal_distribution<float> dist(0.0f, static_cast<float>(std));
  Matrix<float> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = dist(rng);
  return m;
}

/// x <- RMSNorm(x) (.) w, per row (the model's pre-norms; the MSR head norm has no weight).
template <class D>
void rms_norm(Eigen::MatrixBase<D>& x, const RowVector<float>& w) {
  retention::rms_norm_groups(x, x.cols(), kNormEps);
  x.array().rowwise() *= w.array();
}

/// a <- silu(a) (.) g, silu(a) = a / (1 + exp(-a)).
template <class DA, class DG>
void swiglu_gate(DA& a, const DG& g) {
  a.array() = a.array() / (1.0f + (-a.array()).exp()) * g.array();
}

struct Block {
  MultiScaleRetention<float> msr;
  RowVector<float> norm1, norm2;
  Matrix<float> w1, w3, w2;  // SwiGLU: (silu(h W1^T) (.) h W3^T) W2^T, torch layout [out, in]
};

struct Model {
  Matrix<float> embed;  // [vocab, d], also the output projection (tied)
  std::vector<Block> blocks;
  RowVector<float> final_norm;

  explicit Model(std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    embed = normal_matrix(kVocab, kDim, 1.0 / std::sqrt(double(kDim)), rng);
    MsrConfig cfg;
    cfg.embed_dim = kDim;
    cfg.value_dim = kValueDim;
    cfg.heads = kHeads;
    for (Index l = 0; l < kLayers; ++l) {
      Block b{MultiScaleRetention<float>(cfg), {}, {}, {}, {}, {}};
      // torchscale's names ("q_proj.weight", ...) through a ParameterMap of views.
      std::vector<Matrix<float>> weights;
      retention::ParameterMap params;
      const char* names[] = {"q_proj", "k_proj", "v_proj", "g_proj", "out_proj"};
      for (const retention::Linear<float>* p : {&b.msr.q_proj(), &b.msr.k_proj(), &b.msr.v_proj(),
                                                &b.msr.g_proj(), &b.msr.out_proj()}) {
        const Index in = p->in_features();
        weights.push_back(normal_matrix(p->out_features(), in, 1.0 / std::sqrt(double(in)), rng));
      }
      for (std::size_t i = 0; i < weights.size(); ++i)
        params.add_dense(std::string(names[i]) + ".weight", weights[i]);
      b.msr.load(params);
      b.norm1 = RowVector<float>::Ones(kDim) + 0.1f * normal_matrix(1, kDim, 1.0, rng);
      b.norm2 = RowVector<float>::Ones(kDim) + 0.1f * normal_matrix(1, kDim, 1.0, rng);
      b.w1 = normal_matrix(kFfn, kDim, 1.0 / std::sqrt(double(kDim)), rng);
      b.w3 = normal_matrix(kFfn, kDim, 1.0 / std::sqrt(double(kDim)), rng);
      b.w2 = normal_matrix(kDim, kFfn, 1.0 / std::sqrt(double(kFfn)), rng);
      blocks.push_back(std::move(b));
    }
    final_norm = RowVector<float>::Ones(kDim) + 0.1f * normal_matrix(1, kDim, 1.0, rng);
  }

  std::vector<MultiScaleRetention<float>::State> make_states() const {
    std::vector<MultiScaleRetention<float>::State> s;
    for (const auto& b : blocks) s.push_back(b.msr.make_state());
    return s;
  }

  /// Logits [1, vocab] of the last of `tokens`, all tokens through the layers in `form`. With
  /// `states`, continues from them and leaves them after the last token (prefill).
  RowVector<float> forward_last(const std::vector<int>& tokens, Form form,
                                std::vector<MultiScaleRetention<float>::State>* states) const {
    const Index T = static_cast<Index>(tokens.size());
    Matrix<float> x(T, kDim);
    for (Index t = 0; t < T; ++t) x.row(t) = embed.row(tokens[static_cast<std::size_t>(t)]);
    Matrix<float> h, a, g;
    for (std::size_t l = 0; l < blocks.size(); ++l) {
      const Block& b = blocks[l];
      h = x;
      rms_norm(h, b.norm1);
      x += states ? b.msr.prefill(h, (*states)[l], form) : b.msr.forward(h, form);
      h = x;
      rms_norm(h, b.norm2);
      a.noalias() = h * b.w1.transpose();
      g.noalias() = h * b.w3.transpose();
      swiglu_gate(a, g);
      x.noalias() += a * b.w2.transpose();
    }
    RowVector<float> last = x.row(T - 1);
    rms_norm(last, final_norm);
    return last * embed.transpose();
  }

  /// Buffers of one decoding step, allocated once.
  struct StepBuffers {
    RowVector<float> x{kDim}, h{kDim}, y{kDim}, a{kFfn}, g{kFfn}, logits{kVocab};
  };

  /// One token through every layer with step(): logits [1, vocab] into buf.logits.
  void step(int token, std::vector<MultiScaleRetention<float>::State>& states,
            StepBuffers& buf) const {
    buf.x = embed.row(token);
    for (std::size_t l = 0; l < blocks.size(); ++l) {
      const Block& b = blocks[l];
      buf.h = buf.x;
      rms_norm(buf.h, b.norm1);
      b.msr.step_into(buf.h, states[l], buf.y);
      buf.x += buf.y;
      buf.h = buf.x;
      rms_norm(buf.h, b.norm2);
      buf.a.noalias() = buf.h * b.w1.transpose();
      buf.g.noalias() = buf.h * b.w3.transpose();
      swiglu_gate(buf.a, buf.g);
      buf.x.noalias() += buf.a * b.w2.transpose();
    }
    buf.h = buf.x;
    rms_norm(buf.h, final_norm);
    buf.logits.noalias() = buf.h * embed.transpose();
  }
};

int argmax(const RowVector<float>& v) {
  Index i = 0;
  v.maxCoeff(&i);
  return static_cast<int>(i);
}

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

/// CPU seconds of the calling thread: the decode step runs on this thread alone, so this is its
/// cost per token even when other programs compete for the cores (wall time then is not).
double thread_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

double sum(const std::vector<double>& v) {
  double s = 0;
  for (double e : v) s += e;
  return s;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main() {
  std::printf(
      "02_generate: RetNet LM d=%ld H=%ld value_dim=%ld ffn=%ld layers=%ld vocab=%ld (float32)\n",
      long(kDim), long(kHeads), long(kValueDim), long(kFfn), long(kLayers), long(kVocab));
  const auto t_init = Clock::now();
  const Model model(2024);
  std::printf("weights: deterministic N(0, 1/fan_in), built in %.2f s\n", seconds_since(t_init));

  // A pseudo-random prompt.
  std::mt19937_64 rng(7);
  std::uniform_int_distribution<int> tok(0, int(kVocab) - 1);
  std::vector<int> tokens(static_cast<std::size_t>(kPrompt));
  for (auto& t : tokens) t = tok(rng);

  // Prefill: the whole prompt chunkwise, leaving one state per layer.
  auto states = model.make_states();
  auto t0 = Clock::now();
  const RowVector<float> prompt_logits = model.forward_last(tokens, Form::chunkwise, &states);
  const double prefill_s = seconds_since(t0);
  std::size_t state_bytes = 0;
  for (const auto& s : states) state_bytes += s.bytes();
  std::printf("prefill  %ld tokens chunkwise: %.2f s, %.0f tokens/s\n", long(kPrompt), prefill_s,
              double(kPrompt) / prefill_s);

  // Greedy decode: each step feeds the previous argmax and yields the next logits.
  Model::StepBuffers buf;
  std::vector<double> wall(static_cast<std::size_t>(kDecode)),
      cpu(static_cast<std::size_t>(kDecode));
  int next = argmax(prompt_logits);
  for (Index i = 0; i < kDecode; ++i) {
    tokens.push_back(next);
    const double c0 = thread_cpu_seconds();
    t0 = Clock::now();
    model.step(next, states, buf);
    wall[static_cast<std::size_t>(i)] = seconds_since(t0);
    cpu[static_cast<std::size_t>(i)] = thread_cpu_seconds() - c0;
    next = argmax(buf.logits);
  }
  std::size_t state_bytes_end = 0;
  for (const auto& s : states) state_bytes_end += s.bytes();
  auto window = [](const std::vector<double>& v, bool at_end) {
    return at_end ? std::vector<double>(v.end() - kWindow, v.end())
                  : std::vector<double>(v.begin(), v.begin() + kWindow);
  };
  const std::vector<double> wall_first = window(wall, false), wall_last = window(wall, true);
  const std::vector<double> cpu_first = window(cpu, false), cpu_last = window(cpu, true);
  auto min_of = [](const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); };
  // Other programs on the machine only ever add time, so the fastest token of a window is the
  // steadiest estimate of what a token costs; mean wall-clock throughput is printed as measured.
  std::printf(
      "decode   %ld tokens with step (wall clock; CPU time of the decoding thread: median, "
      "fastest):\n",
      long(kDecode));
  std::printf(
      "  first %ld tokens (positions %ld..%ld): %6.1f tokens/s  [CPU %.3f ms/token, fastest %.3f "
      "ms]\n",
      long(kWindow), long(kPrompt), long(kPrompt + kWindow - 1), double(kWindow) / sum(wall_first),
      1e3 * median(cpu_first), 1e3 * min_of(cpu_first));
  std::printf(
      "  last  %ld tokens (positions %ld..%ld): %6.1f tokens/s  [CPU %.3f ms/token, fastest %.3f "
      "ms]\n",
      long(kWindow), long(kPrompt + kDecode - kWindow), long(kPrompt + kDecode - 1),
      double(kWindow) / sum(wall_last), 1e3 * median(cpu_last), 1e3 * min_of(cpu_last));
  std::printf(
      "  cost per token, last / first: %.3f wall (mean), %.3f CPU (median), %.3f CPU (fastest)\n",
      sum(wall_last) / sum(wall_first), median(cpu_last) / median(cpu_first),
      min_of(cpu_last) / min_of(cpu_first));
  std::printf(
      "state: %zu bytes after prefill, %zu bytes after %ld more tokens (%ld layers x %ld heads x "
      "(dk*dv + dk) floats)\n",
      state_bytes, state_bytes_end, long(kDecode), long(kLayers), long(kHeads));
  std::printf("first generated tokens:");
  for (std::size_t i = 0; i < 12; ++i)
    std::printf(" %d", tokens[static_cast<std::size_t>(kPrompt) + i]);
  std::printf("\n");

  // Check: the logits after the last decoded token against one parallel forward over everything.
  t0 = Clock::now();
  const RowVector<float> ref = model.forward_last(tokens, Form::parallel, nullptr);
  const double check_s = seconds_since(t0);
  const double max_ref = double(ref.cwiseAbs().maxCoeff());
  const double max_diff = double((buf.logits - ref).cwiseAbs().maxCoeff());
  const double rel = max_diff / max_ref;
  const bool ok = std::isfinite(rel) && rel <= 1e-4 && buf.logits.allFinite();
  std::printf(
      "check: logits of the last decoded token vs parallel forward over all %zu tokens (%.2f s): "
      "max |diff| / max |logit| = %.2e (%s, limit 1e-4)\n",
      tokens.size(), check_s, rel, ok ? "ok" : "FAILED");

  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  std::printf("peak resident memory: %.1f MiB\n", double(usage.ru_maxrss) / 1024.0);
  return ok ? 0 : 1;
}
