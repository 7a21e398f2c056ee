// Speed harness (issue 6): measures the machine (Eigen fp32 GEMM rate, read+write streaming
// bandwidth) and the kernels in the same run, so that every kernel can be reported as a fraction of
// the machine's own limits and against the PyTorch peer (bench/compare runs both).
//
//   bench_speed [google-benchmark flags]         time everything (JSON via --benchmark_out=...)
//   bench_speed --dump_dir=DIR                   write inputs and our outputs as raw float32 files
//                                                for bench/peers/torch_retention.py to verify
//                                                against
//   bench_speed --threads=N ...                  the multi-threaded rows at N threads (default: 2,
//                                                or fewer when OpenMP offers fewer); every
//                                                operator also runs at 1 thread
//
// Built twice: bench_speed, and bench_speed_blas with EIGEN_USE_BLAS (Eigen's products, the MSR
// projections and the machine GEMM among them, go to the system BLAS); the JSON context says
// which ("eigen_use_blas", and "blas_core": the kernel OpenBLAS picked).
//
// Training rows (issue 11): chunkwise forward + multi_head_retention_backward on the same
// buffers, the backward alone, and the backward's extra heap bytes; the Python module's rows
// (issue 12) compare with decode_kept, the step as the module calls it (masks and workspace kept).
//
// Counters: GFLOPS (rate by the FLOP counts below), GBps (bytes moved per second), extra_MiB.
// FLOPs per token per head: parallel T(dk+dv) [the average causal cost: 2 T/2 (dk+dv)],
// chunkwise 2C(dk+dv) + 4 dk dv; decode moves 2 * (dk dv + dk) * sizeof(T) state bytes per head.
#include <retention/backward.hpp>
#include <retention/chunkwise.hpp>
#include <retention/multihead.hpp>
#include <retention/nn/linear.hpp>
#include <retention/parallel.hpp>
#include <retention/recurrent.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <dlfcn.h>
#include <malloc.h>

#if defined(_OPENMP)
#include <omp.h>
#endif

// Operators written in other headers join the comparison once those headers exist.
#if __has_include(<retention/masa.hpp>) && !defined(RETENTION_BENCH_NO_MASA)
#include <retention/masa.hpp>
#include <retention/masa_backward.hpp>
#define RETENTION_BENCH_HAS_MASA 1
#endif
#if __has_include(<retention/layers/msr.hpp>) && !defined(RETENTION_BENCH_NO_MSR)
#include <retention/layers/msr.hpp>
#define RETENTION_BENCH_HAS_MSR 1
#endif

// ---------------------------------------------------------------------------------------------
// Heap accounting: malloc/free are interposed so that the parallel form's and the chunkwise
// backward's extra memory (their work buffers, not inputs or outputs) can be measured as a peak of
// live heap bytes.
// ---------------------------------------------------------------------------------------------
extern "C" void* __libc_malloc(std::size_t);
extern "C" void* __libc_calloc(std::size_t, std::size_t);
extern "C" void* __libc_realloc(void*, std::size_t);
extern "C" void __libc_free(void*);

namespace heap {
std::atomic<long long> live{0};
std::atomic<long long> peak{0};
inline void add(long long n) {
  const long long now = live.fetch_add(n, std::memory_order_relaxed) + n;
  long long p = peak.load(std::memory_order_relaxed);
  while (now > p && !peak.compare_exchange_weak(p, now, std::memory_order_relaxed)) {
  }
}
/// Peak heap bytes above those live now while f runs on a fresh thread, so that the buffers a
/// thread keeps between calls are counted, as on a thread's first call.
template <class F>
double peak_on_fresh_thread(F&& f) {
  const long long base = live.load();
  peak.store(base);
  std::thread(std::forward<F>(f)).join();
  return static_cast<double>(peak.load() - base);
}
}  // namespace heap

extern "C" void* malloc(std::size_t n) {
  void* p = __libc_malloc(n);
  if (p) heap::add(static_cast<long long>(malloc_usable_size(p)));
  return p;
}
extern "C" void* calloc(std::size_t a, std::size_t b) {
  void* p = __libc_calloc(a, b);
  if (p) heap::add(static_cast<long long>(malloc_usable_size(p)));
  return p;
}
extern "C" void* realloc(void* old, std::size_t n) {
  const long long before = old ? static_cast<long long>(malloc_usable_size(old)) : 0;
  void* p = __libc_realloc(old, n);
  if (p)
    heap::add(static_cast<long long>(malloc_usable_size(p)) - before);
  else if (n == 0)
    heap::add(-before);
  return p;
}
extern "C" void free(void* p) {
  if (p) heap::add(-static_cast<long long>(malloc_usable_size(p)));
  __libc_free(p);
}

namespace {

using retention::Index;
using Mat = retention::Matrix<float>;
constexpr Index kHeads = 8, kDim = 128;

std::vector<float> random_buffer(std::size_t n, std::uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(-scale, scale);
  std::vector<float> x(n);
  for (auto& e : x) e = dist(rng);
  return x;
}

int max_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

/// Runs body(thread_index) on `threads` threads at once (OpenMP) or serially.
template <class Body>
void on_threads(int threads, Body body) {
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads)
  body(omp_get_thread_num());
#else
  for (int t = 0; t < threads; ++t) body(t);
#endif
}

// ---------------------------------------------------------------------------------------------
// Machine: GEMM rate, run the way the kernels run their GEMMs (independent single-threaded
// products, one per thread).
// ---------------------------------------------------------------------------------------------
void BM_machine_gemm(benchmark::State& state) {
  const Index m = state.range(0), k = state.range(1), n = state.range(2);
  const int threads = static_cast<int>(state.range(3));
  Eigen::setNbThreads(1);
  std::vector<Mat> A(static_cast<std::size_t>(threads)), B(A.size()), C(A.size());
  for (std::size_t t = 0; t < A.size(); ++t) {
    A[t] = Mat::Random(m, k);
    B[t] = Mat::Random(k, n);
    C[t] = Mat::Zero(m, n);
  }
  // Small shapes repeat so that one timed iteration is long enough to be measured.
  const Index reps = std::max<Index>(1, (1 << 27) / std::max<Index>(1, m * k * n));
  for (auto _ : state) {
    on_threads(threads, [&](int t) {
      const auto ti = static_cast<std::size_t>(t);
      for (Index r = 0; r < reps; ++r) C[ti].noalias() += A[ti] * B[ti];
    });
    benchmark::ClobberMemory();
  }
  const double flops = 2.0 * static_cast<double>(m * k * n) * static_cast<double>(reps) * threads;
  state.counters["GFLOPS"] =
      benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

/// The machine's GEMM rate through this library's Linear (detail/linear_kernel.hpp on AVX2 and
/// AVX-512 processors, Eigen's GEMM otherwise): y = x W^T with W [n, k] in torch's layout, one
/// single-threaded product per thread, as machine/gemm.
void BM_machine_linear_gemm(benchmark::State& state) {
  const Index m = state.range(0), k = state.range(1), n = state.range(2);
  const int threads = static_cast<int>(state.range(3));
  std::vector<Mat> x(static_cast<std::size_t>(threads)), y(x.size());
  std::vector<retention::Linear<float>> w;
  for (std::size_t t = 0; t < x.size(); ++t) {
    x[t] = Mat::Random(m, k);
    y[t] = Mat::Zero(m, n);
    w.emplace_back(k, n, false);
    w.back().set_weight(Mat::Random(n, k));
  }
  for (auto _ : state) {
    on_threads(threads, [&](int t) {
      const auto ti = static_cast<std::size_t>(t);
      w[ti].forward_into(x[ti], y[ti]);
    });
    benchmark::ClobberMemory();
  }
  state.counters["GFLOPS"] =
      benchmark::Counter(2.0 * static_cast<double>(m * k * n) * threads * 1e-9,
                         benchmark::Counter::kIsIterationInvariantRate);
}

/// One projection over all tokens as the MSR layer runs it: y = x W^T with x [m, k] and W [n, k]
/// (torch layout) through Linear, the rows of x split into one static block per thread, each
/// block one single-threaded product.
void BM_machine_projection(benchmark::State& state) {
  const Index m = state.range(0), k = state.range(1), n = state.range(2);
  const int threads = static_cast<int>(state.range(3));
  Eigen::setNbThreads(1);
  const Mat x = Mat::Random(m, k);
  retention::Linear<float> w(k, n, false);
  w.set_weight(Mat::Random(n, k));
  // Touched before the timing: each of its 4 KiB pages costs microseconds to fault in on first use.
  Mat y = Mat::Zero(m, n);
  for (auto _ : state) {
    on_threads(threads, [&](int t) {
      const Index r0 = m * t / threads, r1 = m * (t + 1) / threads;
      w.forward_into(x.middleRows(r0, r1 - r0), y.middleRows(r0, r1 - r0));
    });
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["GFLOPS"] = benchmark::Counter(2.0 * static_cast<double>(m * k * n) * 1e-9,
                                                benchmark::Counter::kIsIterationInvariantRate);
}

/// The machine's fp32 FMA peak: 12 independent chains of packet FMAs per thread (enough to cover
/// the FMA latency on two ports), nothing loaded or stored. No GEMM can exceed this rate.
void BM_machine_fma_peak(benchmark::State& state) {
  using Packet = Eigen::internal::packet_traits<float>::type;
  constexpr int lanes = Eigen::internal::packet_traits<float>::size;
  const int threads = static_cast<int>(state.range(0));
  const Index reps = Index(1) << 21;
  std::vector<float> sink(static_cast<std::size_t>(threads));
  for (auto _ : state) {
    on_threads(threads, [&](int t) {
      using Eigen::internal::pmadd;
      using Eigen::internal::pset1;
      const Packet a = pset1<Packet>(0.9999f), b = pset1<Packet>(1e-6f);
      Packet c0 = pset1<Packet>(1.00f), c1 = pset1<Packet>(1.01f), c2 = pset1<Packet>(1.02f);
      Packet c3 = pset1<Packet>(1.03f), c4 = pset1<Packet>(1.04f), c5 = pset1<Packet>(1.05f);
      Packet c6 = pset1<Packet>(1.06f), c7 = pset1<Packet>(1.07f), c8 = pset1<Packet>(1.08f);
      Packet c9 = pset1<Packet>(1.09f), c10 = pset1<Packet>(1.10f), c11 = pset1<Packet>(1.11f);
      for (Index r = 0; r < reps; ++r) {
        c0 = pmadd(c0, a, b);
        c1 = pmadd(c1, a, b);
        c2 = pmadd(c2, a, b);
        c3 = pmadd(c3, a, b);
        c4 = pmadd(c4, a, b);
        c5 = pmadd(c5, a, b);
        c6 = pmadd(c6, a, b);
        c7 = pmadd(c7, a, b);
        c8 = pmadd(c8, a, b);
        c9 = pmadd(c9, a, b);
        c10 = pmadd(c10, a, b);
        c11 = pmadd(c11, a, b);
      }
      using Eigen::internal::padd;
      const Packet sum = padd(padd(padd(c0, c1), padd(c2, c3)), padd(padd(c4, c5), padd(c6, c7)));
      sink[static_cast<std::size_t>(t)] =
          Eigen::internal::predux(padd(sum, padd(padd(c8, c9), padd(c10, c11))));
    });
    benchmark::DoNotOptimize(sink.data());
  }
  const double flops = 2.0 * lanes * 12.0 * static_cast<double>(reps) * threads;
  state.counters["GFLOPS"] =
      benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

/// The GEMM sequence of one chunk of the chunkwise kernel at chunk C, dk = dv = 128, repeated over
/// independent data per thread: S = Q K^T [C x dk x C], A V [C x C x dv], Q S [C x dk x dv],
/// K^T V [dk x C x dv]. Its rate is the best a chunk-by-chunk kernel built on Eigen's GEMM can
/// reach.
void BM_machine_chunk_gemms(benchmark::State& state) {
  const Index c = state.range(0), d = kDim;
  const int threads = static_cast<int>(state.range(1));
  Eigen::setNbThreads(1);
  struct Work {
    Mat q, k, v, s, a, o, kv;
  };
  std::vector<Work> w(static_cast<std::size_t>(threads));
  for (auto& x : w) {
    x.q = Mat::Random(c, d);
    x.k = Mat::Random(c, d);
    x.v = Mat::Random(c, d);
    x.s = Mat::Random(d, d);
    x.a = Mat::Zero(c, c);
    x.o = Mat::Zero(c, d);
    x.kv = Mat::Zero(d, d);
  }
  const Index reps = 64;
  for (auto _ : state) {
    on_threads(threads, [&](int t) {
      Work& x = w[static_cast<std::size_t>(t)];
      for (Index r = 0; r < reps; ++r) {
        x.a.noalias() = x.q * x.k.transpose();
        x.o.noalias() = x.a * x.v;
        x.o.noalias() += x.q * x.s;
        x.kv.noalias() = x.k.transpose() * x.v;
      }
    });
    benchmark::ClobberMemory();
  }
  const double flops =
      static_cast<double>(2 * c * (2 * c * d + 2 * d * d)) * static_cast<double>(reps) * threads;
  state.counters["GFLOPS"] =
      benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

/// Read+write streaming pass (x = a x + b) over `bytes` in total, split over the threads.
void BM_machine_stream(benchmark::State& state) {
  const auto bytes = static_cast<std::size_t>(state.range(0));
  const int threads = static_cast<int>(state.range(1));
  const std::size_t n = bytes / sizeof(float);
  std::vector<float> x = random_buffer(n, 7);
  const std::size_t per =
      (n + static_cast<std::size_t>(threads) - 1) / static_cast<std::size_t>(threads);
  for (auto _ : state) {
    on_threads(threads, [&](int t) {
      const std::size_t lo = std::min(n, per * static_cast<std::size_t>(t)),
                        hi = std::min(n, lo + per);
      Eigen::Map<Eigen::ArrayXf> a(x.data() + lo, static_cast<Index>(hi - lo));
      a = a * 0.999f + 1e-3f;
    });
    benchmark::ClobberMemory();
  }
  state.counters["GBps"] = benchmark::Counter(2.0 * static_cast<double>(n * sizeof(float)) * 1e-9,
                                              benchmark::Counter::kIsIterationInvariantRate);
}

// ---------------------------------------------------------------------------------------------
// Kernels, through the multi-head entry point over [B, T, H, D] like a model calls them.
// ---------------------------------------------------------------------------------------------
struct Heads {
  Index batch, time, heads, dk, dv;
  std::vector<float> q, k, v, out;
  std::vector<double> gammas;
  Heads(Index b, Index t, Index h, Index dk_, Index dv_, std::uint64_t seed)
      : batch(b), time(t), heads(h), dk(dk_), dv(dv_) {
    const auto nk = static_cast<std::size_t>(b * t * h * dk),
               nv = static_cast<std::size_t>(b * t * h * dv);
    // k scaled by dk^-1/2 as in the MSR layer, so outputs stay O(1).
    q = random_buffer(nk, seed);
    k = random_buffer(nk, seed + 1, 1.0f / std::sqrt(static_cast<float>(dk)));
    v = random_buffer(nv, seed + 2);
    out.assign(nv, 0.0f);
    gammas = retention::retnet_gammas(h);
  }
  // Training: dL/dO (random, like a loss gradient) and the gradients, allocated on first use.
  std::vector<float> d_out, grad_q, grad_k, grad_v;
  retention::MultiHeadShape shape() const { return {batch, time, heads, dk, dv}; }
  void run(retention::Form form, Index chunk, int threads,
           retention::Normalization norm = retention::Normalization::none) {
    retention::MultiHeadOptions<float> opt;
    opt.form = form;
    opt.chunk = chunk;
    opt.threads = threads;
    opt.normalization = norm;
    retention::multi_head_retention(q.data(), k.data(), v.data(), out.data(), shape(), gammas, opt);
  }
  /// multi_head_retention_backward of the same form over the same buffers, into grad_q/k/v.
  void run_backward(retention::Form form, Index chunk, int threads,
                    retention::Normalization norm = retention::Normalization::none) {
    const auto nk = static_cast<std::size_t>(batch * time * heads * dk),
               nv = static_cast<std::size_t>(batch * time * heads * dv);
    if (d_out.size() != nv) {
      d_out = random_buffer(nv, 977);
      grad_q.assign(nk, 0.0f);
      grad_k.assign(nk, 0.0f);
      grad_v.assign(nv, 0.0f);
    }
    retention::MultiHeadBackwardOptions<float> opt;
    opt.form = form;
    opt.chunk = chunk;
    opt.threads = threads;
    opt.normalization = norm;
    const auto in = [&](const std::vector<float>& x, Index d) {
      return retention::heads_view(x.data(), batch, time, heads, d);
    };
    const auto out_view = [&](std::vector<float>& x, Index d) {
      return retention::heads_view(x.data(), batch, time, heads, d);
    };
    retention::multi_head_retention_backward(in(q, dk), in(k, dk), in(v, dv), in(d_out, dv), gammas,
                                             out_view(grad_q, dk), out_view(grad_k, dk),
                                             out_view(grad_v, dv), opt);
  }
};

void BM_chunkwise(benchmark::State& state) {
  const Index T = state.range(0), chunk = state.range(1);
  const int threads = static_cast<int>(state.range(2));
  Heads x(1, T, kHeads, kDim, kDim, 11);
  const Index C = chunk > 0 ? chunk : retention::recommended_chunk(kDim, kDim);
  for (auto _ : state) {
    x.run(retention::Form::chunkwise, chunk, threads);
    benchmark::DoNotOptimize(x.out.data());
  }
  const double flops =
      static_cast<double>(T * kHeads) * static_cast<double>(2 * C * (2 * kDim) + 4 * kDim * kDim);
  state.counters["GFLOPS"] =
      benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["chunk"] = static_cast<double>(C);
}

/// The forward then multi_head_retention_backward in one form (one training step of the
/// operator); range(0) = T, range(1) = threads.
void train_steps(benchmark::State& state, retention::Form form) {
  const Index T = state.range(0);
  const int threads = static_cast<int>(state.range(1));
  Heads x(1, T, kHeads, kDim, kDim, 11);
  // The first call allocates and fills dL/dO and the gradients: outside the timed loop.
  x.run_backward(form, 0, threads);
  for (auto _ : state) {
    x.run(form, 0, threads);
    x.run_backward(form, 0, threads);
    benchmark::DoNotOptimize(x.grad_q.data());
  }
}

void BM_chunkwise_train(benchmark::State& state) {
  train_steps(state, retention::Form::chunkwise);
  state.counters["chunk"] = static_cast<double>(retention::recommended_chunk(kDim, kDim));
}

void BM_parallel_train(benchmark::State& state) { train_steps(state, retention::Form::parallel); }

/// multi_head_retention_backward alone (chunkwise), the forward's outputs not needed.
void BM_chunkwise_backward(benchmark::State& state) {
  const Index T = state.range(0);
  const int threads = static_cast<int>(state.range(1));
  Heads x(1, T, kHeads, kDim, kDim, 11);
  // The first call allocates and fills dL/dO and the gradients: outside the timed loop.
  x.run_backward(retention::Form::chunkwise, 0, threads);
  for (auto _ : state) {
    x.run_backward(retention::Form::chunkwise, 0, threads);
    benchmark::DoNotOptimize(x.grad_q.data());
  }
  state.counters["chunk"] = static_cast<double>(retention::recommended_chunk(kDim, kDim));
}

/// One chunk's micro-kernels alone (C = recommended_chunk, d = 128, float, 1 thread), operands in
/// L1/L2: what the chunkwise forward and backward are made of. Per chunk the forward runs one
/// scores kernel and one outputs+state pass; the backward (backward_chunkwise_fast.hpp) runs two
/// scores kernels (the dK sweep reads the dQ sweep's tiles), two outputs+state passes, and for dV
/// one state term and one outputs pass from it. range(0): 0 scores (K^T and the masked tile), 1
/// outputs, 2 state update, 3 outputs and state update, 4 the dV state term
/// (ReversedStateTermKernel: K^T, R K^T and its transpose), 5 outputs from a formed state term.
void BM_chunk_kernel(benchmark::State& state) {
  namespace rd = retention::detail;
  const int kind = static_cast<int>(state.range(0));
  const Index d = kDim, C = retention::recommended_chunk(kDim, kDim);
  const retention::CausalDecay decay(retention::retnet_gammas(kHeads).front());
  rd::ChunkSweep<float, retention::CausalDecay> sweep(decay, C, 8192);
  const Index Cp = sweep.Cp, lds = rd::padded_state_stride<float>(d);
  Mat q = Mat::Random(C, d), k = Mat::Random(C, d) * 0.1f, v = Mat::Random(C, d), o(C, d);
  Mat kt = Mat::Zero(d, Cp), a = Mat::Zero(C, Cp), s = Mat::Random(d, lds) * 0.01f;
  rd::ReversedStateTerm<float> term(d, d, C, Cp, sweep.qf);
  const Mat p = Mat::Random(C, d);  // a formed state term, for the outputs of kind 5
  rd::ChunkOperands<float> ops{};
  ops.q = q.data();
  ops.k = k.data();
  ops.kt = kt.data();
  ops.d = sweep.D.data();
  ops.a = a.data();
  ops.ld = Cp;
  ops.kw = k.data();
  ops.v = v.data();
  ops.s = s.data();
  ops.qf = sweep.qf.data();
  ops.o = o.data();
  ops.ldq = d;
  ops.ldv = d;
  ops.lds = lds;
  ops.ldo = d;
  ops.rows = C;
  ops.dk = d;
  ops.dv = d;
  ops.beta = 0.5f;  // keeps the repeatedly updated state bounded
  ops.outputs = kind == 1 || kind == 3 || kind == 5;
  ops.update_state = kind == 2 || kind == 3;
  if (kind == 5) ops.o_init = p.data();
  // The scores tile once, so that the outputs read a masked tile as they do in a sweep.
  rd::simd::dispatch<rd::ChunkScoresKernel>(static_cast<const rd::ChunkOperands<float>*>(&ops));
  const auto* cops = static_cast<const rd::ChunkOperands<float>*>(&ops);
  for (auto _ : state) {
    if (kind == 0)
      rd::simd::dispatch<rd::ChunkScoresKernel>(cops);
    else if (kind == 4)
      benchmark::DoNotOptimize(term.form(k.data(), C, s.data(), lds));
    else
      rd::simd::dispatch<rd::ChunkColumnsKernel>(cops);
    benchmark::DoNotOptimize(o.data());
    benchmark::DoNotOptimize(s.data());
  }
  state.counters["chunk"] = static_cast<double>(C);
}

/// Extra heap bytes of one chunkwise_retention_backward_into call of one head (inputs, dO and
/// the gradients excluded), beside the bytes the (T / C) chunk-boundary states would take. The
/// call runs on a thread of its own, so that the buffer a thread keeps for its next call
/// (detail::ThreadScratch) is counted, as it would be on a thread's first call.
void BM_chunkwise_backward_memory(benchmark::State& state) {
  const Index T = state.range(0), C = retention::recommended_chunk(kDim, kDim);
  const std::vector<float> q = random_buffer(static_cast<std::size_t>(T * kDim), 61);
  const std::vector<float> k = random_buffer(static_cast<std::size_t>(T * kDim), 62, 0.1f);
  const std::vector<float> v = random_buffer(static_cast<std::size_t>(T * kDim), 63);
  const std::vector<float> g = random_buffer(static_cast<std::size_t>(T * kDim), 64);
  Mat dq(T, kDim), dk(T, kDim), dv(T, kDim);
  const Eigen::Map<const Mat> Q(q.data(), T, kDim), K(k.data(), T, kDim), V(v.data(), T, kDim),
      G(g.data(), T, kDim);
  const retention::CausalDecay decay(retention::retnet_gammas(kHeads).back());
  double extra = 0;
  for (auto _ : state) {
    extra = heap::peak_on_fresh_thread(
        [&] { retention::chunkwise_retention_backward_into(Q, K, V, decay, C, G, dq, dk, dv); });
    benchmark::DoNotOptimize(dq.data());
  }
  state.counters["extra_MiB"] = extra / (1024.0 * 1024.0);
  state.counters["chunk"] = static_cast<double>(C);
  state.counters["states_MiB"] = static_cast<double>((T + C - 1) / C) *
                                 static_cast<double>(kDim * kDim) * sizeof(float) /
                                 (1024.0 * 1024.0);
}

void BM_parallel(benchmark::State& state) {
  const Index T = state.range(0);
  const int threads = static_cast<int>(state.range(1));
  Heads x(1, T, kHeads, kDim, kDim, 12);
  for (auto _ : state) {
    x.run(retention::Form::parallel, 0, threads);
    benchmark::DoNotOptimize(x.out.data());
  }
  const double flops = static_cast<double>(T * kHeads) * static_cast<double>(T * 2 * kDim);
  state.counters["GFLOPS"] =
      benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

void BM_recurrent(benchmark::State& state) {
  const Index T = state.range(0);
  const int threads = static_cast<int>(state.range(1));
  Heads x(1, T, kHeads, kDim, kDim, 13);
  for (auto _ : state) {
    x.run(retention::Form::recurrent, 0, threads);
    benchmark::DoNotOptimize(x.out.data());
  }
  state.counters["tokens_per_s"] =
      benchmark::Counter(static_cast<double>(T), benchmark::Counter::kIsIterationInvariantRate);
}

/// Extra heap bytes of one parallel_retention call of one head (inputs and output excluded), on
/// a fresh thread, so that the buffers a thread keeps between calls are counted.
void BM_parallel_memory(benchmark::State& state) {
  const Index T = state.range(0);
  const std::vector<float> q = random_buffer(static_cast<std::size_t>(T * kDim), 21);
  const std::vector<float> k = random_buffer(static_cast<std::size_t>(T * kDim), 22, 0.1f);
  const std::vector<float> v = random_buffer(static_cast<std::size_t>(T * kDim), 23);
  Mat out(T, kDim);
  const Eigen::Map<const Mat> Q(q.data(), T, kDim), K(k.data(), T, kDim), V(v.data(), T, kDim);
  const retention::CausalDecay decay(retention::retnet_gammas(kHeads).back());
  double extra = 0;
  for (auto _ : state) {
    extra = heap::peak_on_fresh_thread(
        [&] { retention::parallel_retention_into(Q, K, V, decay, out); });
    benchmark::DoNotOptimize(out.data());
  }
  state.counters["extra_MiB"] = extra / (1024.0 * 1024.0);
}

/// One decoding step of B x H heads at absolute position `position` (the states carry it; their
/// content is a seeded random state of realistic size, the same at every position).
void BM_decode(benchmark::State& state) {
  const Index B = state.range(0), H = state.range(1), position = state.range(2);
  const int threads = static_cast<int>(state.range(3));
  const Index dk = kDim, dv = kDim;
  const auto nk = static_cast<std::size_t>(B * H * dk), nv = static_cast<std::size_t>(B * H * dv);
  const std::vector<float> q = random_buffer(nk, 31), k = random_buffer(nk, 32, 0.05f),
                           v = random_buffer(nv, 33);
  std::vector<float> out(nv);
  const std::vector<double> gammas = retention::retnet_gammas(H);
  std::vector<retention::RetentionState<float>> states(static_cast<std::size_t>(B * H),
                                                       retention::RetentionState<float>(dk, dv));
  std::mt19937_64 rng(34);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  for (auto& s : states) {
    for (Index i = 0; i < s.S.size(); ++i) s.S.data()[i] = dist(rng);
    for (Index i = 0; i < s.z.size(); ++i) s.z(i) = dist(rng);
    s.position = position;
  }
  for (auto _ : state) {
    retention::multi_head_step(q.data(), k.data(), v.data(), out.data(), B, H, dk, dv, gammas,
                               states, retention::Normalization::decay_and_score, threads);
    benchmark::DoNotOptimize(out.data());
  }
  const double bytes = 2.0 * static_cast<double>(B * H * (dk * dv + dk)) * sizeof(float);
  state.counters["GBps"] =
      benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["state_bytes"] = bytes / 2.0;
}

/// The same step as BM_decode the way a decoding loop (and the Python module) runs it: masks and
/// the StepWorkspace built once, the HeadsView overload called per step.
void BM_decode_kept(benchmark::State& state) {
  const Index B = state.range(0), H = state.range(1), position = state.range(2);
  const int threads = static_cast<int>(state.range(3));
  const Index dk = kDim, dv = kDim;
  const auto nk = static_cast<std::size_t>(B * H * dk), nv = static_cast<std::size_t>(B * H * dv);
  const std::vector<float> q = random_buffer(nk, 31), k = random_buffer(nk, 32, 0.05f),
                           v = random_buffer(nv, 33);
  std::vector<float> out(nv);
  const std::vector<retention::CausalDecay> masks =
      retention::causal_masks(retention::retnet_gammas(H));
  std::vector<retention::RetentionState<float>> states(static_cast<std::size_t>(B * H),
                                                       retention::RetentionState<float>(dk, dv));
  std::mt19937_64 rng(34);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  for (auto& s : states) {
    for (Index i = 0; i < s.S.size(); ++i) s.S.data()[i] = dist(rng);
    for (Index i = 0; i < s.z.size(); ++i) s.z(i) = dist(rng);
    s.position = position;
  }
  retention::StepWorkspace<float> ws;
  const auto qv = retention::heads_view(q.data(), B, 1, H, dk),
             kv = retention::heads_view(k.data(), B, 1, H, dk),
             vv = retention::heads_view(v.data(), B, 1, H, dv);
  const auto ov = retention::heads_view(out.data(), B, 1, H, dv);
  for (auto _ : state) {
    retention::multi_head_step(qv, kv, vv, ov, masks, states,
                               retention::Normalization::decay_and_score, threads, &ws);
    benchmark::DoNotOptimize(out.data());
  }
  const double bytes = 2.0 * static_cast<double>(B * H * (dk * dv + dk)) * sizeof(float);
  state.counters["GBps"] =
      benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

#if defined(RETENTION_BENCH_HAS_MASA)
constexpr Index kMasaHeads = 8, kMasaDim = 64;

struct Grid {
  retention::GridHeadsShape shape;
  std::vector<float> q, k, v, out;
  std::vector<double> gammas;
  Grid(Index side, std::uint64_t seed) {
    shape = retention::GridHeadsShape{1, side, side, kMasaHeads, kMasaDim, kMasaDim};
    const auto n = static_cast<std::size_t>(side * side * kMasaHeads * kMasaDim);
    q = random_buffer(n, seed);
    k = random_buffer(n, seed + 1, 1.0f / std::sqrt(static_cast<float>(kMasaDim)));
    v = random_buffer(n, seed + 2);
    out.assign(n, 0.0f);
    gammas = retention::rmt_gammas(kMasaHeads, 2.0, 4.0);
  }
};

void BM_masa(benchmark::State& state) {
  Grid g(state.range(0), 41);
  retention::MasaOptions opt;
  opt.threads = static_cast<int>(state.range(1));
  for (auto _ : state) {
    retention::multi_head_masa(g.q.data(), g.k.data(), g.v.data(), g.out.data(), g.shape, g.gammas,
                               opt);
    benchmark::DoNotOptimize(g.out.data());
  }
}

void BM_masad(benchmark::State& state) {
  Grid g(state.range(0), 41);
  retention::MasaOptions opt;
  opt.threads = static_cast<int>(state.range(1));
  for (auto _ : state) {
    retention::multi_head_masad(g.q.data(), g.k.data(), g.v.data(), g.out.data(), g.shape, g.gammas,
                                opt);
    benchmark::DoNotOptimize(g.out.data());
  }
}

/// One training step of MaSA (range 2 = 0) or MaSAD (1) on the grid: the forward that saves what
/// the backward needs, then the backward from it, dO random (what a training loop runs).
void BM_grid_train(benchmark::State& state) {
  Grid g(state.range(0), 41);
  const bool decomposed = state.range(2) != 0;
  const Index side = state.range(0), N = side * side, H = kMasaHeads, d = kMasaDim;
  const auto n = static_cast<std::size_t>(N * H * d);
  const std::vector<float> dO = random_buffer(n, 45);
  std::vector<float> u(n), lse(static_cast<std::size_t>(N * H)), lse2(lse.size()), dq(n), dk(n),
      dv(n);
  std::vector<retention::ManhattanDecay> masks;
  for (double gamma : g.gammas) masks.emplace_back(gamma, side, side);
  retention::MasaTrainOptions opt;
  opt.threads = static_cast<int>(state.range(1));
  const auto in = [&](const std::vector<float>& x, Index dim) {
    return retention::heads_view(x.data(), 1, N, H, dim);
  };
  const auto out = [&](std::vector<float>& x, Index dim) {
    return retention::heads_view(x.data(), 1, N, H, dim);
  };
  for (auto _ : state) {
    if (decomposed) {
      retention::multi_head_masad_forward_train<float>(in(g.q, d), in(g.k, d), in(g.v, d), masks,
                                                       out(g.out, d), out(u, d), out(lse, 1),
                                                       out(lse2, 1), opt);
      retention::multi_head_masad_backward<float>(
          in(g.q, d), in(g.k, d), in(g.v, d), masks, in(g.out, d), in(u, d), in(lse, 1),
          in(lse2, 1), in(dO, d), out(dq, d), out(dk, d), out(dv, d), opt);
    } else {
      retention::multi_head_masa_forward_train<float>(in(g.q, d), in(g.k, d), in(g.v, d), masks,
                                                      out(g.out, d), out(lse, 1), opt);
      retention::multi_head_masa_backward<float>(in(g.q, d), in(g.k, d), in(g.v, d), masks,
                                                 in(g.out, d), in(lse, 1), in(dO, d), out(dq, d),
                                                 out(dk, d), out(dv, d), opt);
    }
    benchmark::DoNotOptimize(dq.data());
  }
}

/// Extra heap bytes of MaSA's training calls for one head of a side x side grid (d = kMasaDim),
/// each on a fresh thread (so the buffers a thread keeps are counted): masa_forward_train beyond
/// its out and lse, masa_backward beyond its three gradients; beside one [N, N] float matrix, which
/// neither may form.
void BM_masa_train_memory(benchmark::State& state) {
  const Index side = state.range(0), N = side * side, d = kMasaDim;
  const auto n = static_cast<std::size_t>(N * d);
  const std::vector<float> q = random_buffer(n, 71), k = random_buffer(n, 72, 0.125f),
                           v = random_buffer(n, 73), g = random_buffer(n, 74);
  const Eigen::Map<const Mat> Q(q.data(), N, d), K(k.data(), N, d), V(v.data(), N, d),
      G(g.data(), N, d);
  const retention::ManhattanDecay mask(retention::rmt_gammas(kMasaHeads, 2.0, 4.0)[0], side, side);
  const double own = static_cast<double>(N * d) * sizeof(float);
  double forward = 0, backward = 0;
  for (auto _ : state) {
    retention::MasaForward<float> saved;
    forward =
        heap::peak_on_fresh_thread([&] { saved = retention::masa_forward_train(Q, K, V, mask); }) -
        own - static_cast<double>(N) * sizeof(float);
    backward = heap::peak_on_fresh_thread([&] {
                 const auto grads = retention::masa_backward(Q, K, V, mask, G, saved);
                 benchmark::DoNotOptimize(grads.dQ.data());
               }) -
               3 * own;
  }
  const double mib = 1024.0 * 1024.0;
  state.counters["forward_extra_MiB"] = forward / mib;
  state.counters["backward_extra_MiB"] = backward / mib;
  state.counters["nn_MiB"] = static_cast<double>(N) * static_cast<double>(N) * sizeof(float) / mib;
}

/// The plain dense MaSA per head with Eigen GEMMs: S = Q K^T + L as an [N, N] matrix, row softmax,
/// S V. The yardstick the streaming masa kernel is compared with.
void BM_masa_dense_reference(benchmark::State& state) {
  Grid g(state.range(0), 41);
  const int threads = static_cast<int>(state.range(1));
  const Index side = state.range(0), N = side * side, d = kMasaDim, stride = kMasaHeads * kMasaDim;
  Eigen::setNbThreads(1);
  std::vector<Mat> L(static_cast<std::size_t>(kMasaHeads));
  for (Index h = 0; h < kMasaHeads; ++h)
    L[static_cast<std::size_t>(h)] =
        retention::ManhattanDecay(g.gammas[static_cast<std::size_t>(h)], side, side)
            .log_weights<float>(0, N, 0, N);
  using CMap = Eigen::Map<const Mat, 0, Eigen::OuterStride<>>;
  using OMap = Eigen::Map<Mat, 0, Eigen::OuterStride<>>;
  std::vector<Mat> S(static_cast<std::size_t>(threads), Mat(N, N));
  for (auto _ : state) {
    on_threads(threads, [&](int t) {
      Mat& s = S[static_cast<std::size_t>(t)];
      for (Index h = t; h < kMasaHeads; h += threads) {
        const CMap Q(g.q.data() + h * d, N, d, Eigen::OuterStride<>(stride));
        const CMap K(g.k.data() + h * d, N, d, Eigen::OuterStride<>(stride));
        const CMap V(g.v.data() + h * d, N, d, Eigen::OuterStride<>(stride));
        OMap O(g.out.data() + h * d, N, d, Eigen::OuterStride<>(stride));
        s.noalias() = Q * K.transpose();
        s += L[static_cast<std::size_t>(h)];
        for (Index i = 0; i < N; ++i) {
          auto row = s.row(i).array();
          row = (row - row.maxCoeff()).exp();
          row /= row.sum();
        }
        O.noalias() = s * V;
      }
    });
    benchmark::DoNotOptimize(g.out.data());
  }
}
#endif

#if defined(RETENTION_BENCH_HAS_MSR)
/// A MultiScaleRetention layer with seeded random weights (scale in^-1/2, as at initialisation).
retention::MultiScaleRetention<float> make_msr(Index d, Index value_dim, Index heads, int threads,
                                               std::uint64_t seed) {
  retention::MsrConfig cfg;
  cfg.embed_dim = d;
  cfg.value_dim = value_dim;
  cfg.heads = heads;
  cfg.threads = threads;
  retention::MultiScaleRetention<float> layer(cfg);
  const char* names[] = {"q_proj", "k_proj", "v_proj", "g_proj", "out_proj"};
  std::vector<std::vector<float>> storage;
  retention::ParameterMap params;
  for (int p = 0; p < 5; ++p) {
    const Index rows = p == 4 ? d : (p < 2 ? d : value_dim);
    const Index cols = p == 4 ? value_dim : d;
    storage.push_back(random_buffer(static_cast<std::size_t>(rows * cols), seed++,
                                    1.0f / std::sqrt(static_cast<float>(cols))));
    params.add(std::string(names[p]) + ".weight", storage.back().data(), {rows, cols});
  }
  layer.load(params);
  return layer;
}

/// The MSR layer end to end (projections, rotation, retention, norm, gate, output projection).
void BM_msr(benchmark::State& state) {
  const Index T = state.range(0), d = state.range(1), heads = state.range(2);
  const int threads = static_cast<int>(state.range(3));
  const retention::MultiScaleRetention<float> layer = make_msr(d, d, heads, threads, 51);
  const std::vector<float> xs = random_buffer(static_cast<std::size_t>(T * d), 50);
  const Eigen::Map<const Mat> x(xs.data(), T, d);
  for (auto _ : state) {
    Mat y = layer.forward(x, retention::Form::chunkwise, 0);
    benchmark::DoNotOptimize(y.data());
  }
  Eigen::setNbThreads(1);
}
#endif

// ---------------------------------------------------------------------------------------------
// Verification dump: small shapes, inputs and our outputs as raw little-endian float32 files.
// ---------------------------------------------------------------------------------------------
void write_raw(const std::string& path, const float* data, std::size_t n) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(n * sizeof(float)));
  if (!f) {
    std::fprintf(stderr, "bench_speed: cannot write %s\n", path.c_str());
    std::exit(1);
  }
}

int dump(const std::string& dir) {
  // Retention: B = 2, T = 300 (not a multiple of the chunk), H = 4, dk = 32, dv = 48.
  Heads x(2, 300, 4, 32, 48, 101);
  write_raw(dir + "/ret_q.f32", x.q.data(), x.q.size());
  write_raw(dir + "/ret_k.f32", x.k.data(), x.k.size());
  write_raw(dir + "/ret_v.f32", x.v.data(), x.v.size());
  const retention::Form forms[] = {retention::Form::parallel, retention::Form::chunkwise,
                                   retention::Form::recurrent};
  for (auto form : forms) {
    x.run(form, 64, 2);
    write_raw(dir + "/ret_out_" + retention::to_string(form) + ".f32", x.out.data(), x.out.size());
  }
  std::ofstream meta(dir + "/meta.txt");
  meta << "ret 2 300 4 32 48 64\n";
  // Gradients of the same call for a random dO (the peer's autograd must agree with them).
  x.run_backward(retention::Form::chunkwise, 64, 2);
  write_raw(dir + "/ret_dout.f32", x.d_out.data(), x.d_out.size());
  write_raw(dir + "/ret_dq.f32", x.grad_q.data(), x.grad_q.size());
  write_raw(dir + "/ret_dk.f32", x.grad_k.data(), x.grad_k.size());
  write_raw(dir + "/ret_dv.f32", x.grad_v.data(), x.grad_v.size());
  meta << "retgrad 2 300 4 32 48 64\n";
#if defined(RETENTION_BENCH_HAS_MASA)
  {
    Grid g(12, 201);
    g.shape.height = 12;
    g.shape.width = 12;
    write_raw(dir + "/masa_q.f32", g.q.data(), g.q.size());
    write_raw(dir + "/masa_k.f32", g.k.data(), g.k.size());
    write_raw(dir + "/masa_v.f32", g.v.data(), g.v.size());
    retention::multi_head_masa(g.q.data(), g.k.data(), g.v.data(), g.out.data(), g.shape, g.gammas);
    write_raw(dir + "/masa_out_masa.f32", g.out.data(), g.out.size());
    retention::multi_head_masad(g.q.data(), g.k.data(), g.v.data(), g.out.data(), g.shape,
                                g.gammas);
    write_raw(dir + "/masa_out_masad.f32", g.out.data(), g.out.size());
    meta << "masa 12 " << kMasaHeads << ' ' << kMasaDim << "\n";
  }
#endif
#if defined(RETENTION_BENCH_HAS_MSR)
  {
    const Index T = 100, d = 64, heads = 4;
    const retention::MultiScaleRetention<float> layer = make_msr(d, d, heads, 2, 301);
    const std::vector<float> xs = random_buffer(static_cast<std::size_t>(T * d), 300);
    const Eigen::Map<const Mat> xm(xs.data(), T, d);
    const Mat y = layer.forward(xm, retention::Form::chunkwise, 0);
    write_raw(dir + "/msr_x.f32", xs.data(), xs.size());
    write_raw(dir + "/msr_y.f32", y.data(), static_cast<std::size_t>(y.size()));
    const std::pair<const retention::Linear<float>*, const char*> names[] = {
        {&layer.q_proj(), "q"},
        {&layer.k_proj(), "k"},
        {&layer.v_proj(), "v"},
        {&layer.g_proj(), "g"},
        {&layer.out_proj(), "o"}};
    for (const auto& pn : names) {
      const Mat w = pn.first->weight();
      write_raw(dir + "/msr_w" + pn.second + ".f32", w.data(), static_cast<std::size_t>(w.size()));
    }
    meta << "msr " << T << ' ' << d << ' ' << d << ' ' << heads << " 32\n";
  }
#endif
  return 0;
}

/// The kernel OpenBLAS chose at load time (its corename), when an OpenBLAS is linked in.
std::string blas_core() {
  using CoreName = char* (*)();
  void* sym = dlsym(RTLD_DEFAULT, "openblas_get_corename");
  if (sym == nullptr) return "none";
  CoreName fn;
  std::memcpy(&fn, &sym, sizeof fn);  // object to function pointer without a cast warning
  const char* name = fn();
  return name ? name : "unknown";
}

void register_all(int requested_threads) {
  const int tmax = std::max(1, std::min(requested_threads, max_threads()));
  std::vector<int> thread_counts = {1};
  if (tmax > 1) thread_counts.push_back(tmax);
  for (int t : thread_counts) {
    benchmark::RegisterBenchmark("machine/fma_peak", BM_machine_fma_peak)
        ->Args({t})
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark("machine/gemm", BM_machine_gemm)
        ->Args({1024, 1024, 1024, t})
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark("machine/linear_gemm", BM_machine_linear_gemm)
        ->Args({1024, 1024, 1024, t})
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
    for (Index c : {32, 64, 128, 256})
      benchmark::RegisterBenchmark("machine/chunk_gemms", BM_machine_chunk_gemms)
          ->Args({c, t})
          ->UseRealTime();
    // Stream sizes: the decode state (B=8, H=16: 8 MiB + z) and the chunkwise T=8192 data (q, k, v,
    // o: 32 MiB).
    for (Index bytes : {Index(8) << 20, Index(32) << 20})
      benchmark::RegisterBenchmark("machine/stream", BM_machine_stream)
          ->Args({bytes, t})
          ->UseRealTime();
  }
  for (int t : thread_counts) {
    benchmark::RegisterBenchmark("chunkwise", BM_chunkwise)
        ->Args({8192, 0, t})
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark("parallel", BM_parallel)
        ->Args({4096, t})
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark("recurrent", BM_recurrent)
        ->Args({1024, t})
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
    for (Index pos : {100, 100000})
      benchmark::RegisterBenchmark("decode", BM_decode)->Args({8, 16, pos, t})->UseRealTime();
    benchmark::RegisterBenchmark("decode_kept", BM_decode_kept)
        ->Args({8, 16, 100, t})
        ->UseRealTime();
    // T = 1024: a short sequence, where what a call allocates and frees weighs most.
    for (Index T : {8192, 1024})
      benchmark::RegisterBenchmark("chunkwise_train", BM_chunkwise_train)
          ->Args({T, t})
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark("parallel_train", BM_parallel_train)
        ->Args({1024, t})
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark("chunkwise_backward", BM_chunkwise_backward)
        ->Args({8192, t})
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  }
  for (Index c : {32, 64, 128, 256})
    benchmark::RegisterBenchmark("chunkwise", BM_chunkwise)
        ->Args({8192, c, tmax})
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("parallel_memory", BM_parallel_memory)
      ->Args({16384})
      ->Iterations(1)
      ->Unit(benchmark::kMillisecond);
  for (Index kind = 0; kind < 6; ++kind)
    benchmark::RegisterBenchmark("chunk_kernel", BM_chunk_kernel)->Args({kind});
  benchmark::RegisterBenchmark("chunkwise_backward_memory", BM_chunkwise_backward_memory)
      ->Args({8192})
      ->Iterations(1)
      ->Unit(benchmark::kMillisecond);
#if defined(RETENTION_BENCH_HAS_MASA)
  benchmark::RegisterBenchmark("masa_train_memory", BM_masa_train_memory)
      ->Args({56})
      ->Iterations(1)
      ->Unit(benchmark::kMillisecond);
#endif
  // Every operator compared with PyTorch runs at 1 thread and at tmax.
  for (int t : thread_counts) {
#if defined(RETENTION_BENCH_HAS_MASA)
    for (Index side : {28, 56}) {
      benchmark::RegisterBenchmark("masa", BM_masa)
          ->Args({side, t})
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond);
      benchmark::RegisterBenchmark("masad", BM_masad)
          ->Args({side, t})
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond);
      benchmark::RegisterBenchmark("masa_dense_reference", BM_masa_dense_reference)
          ->Args({side, t})
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond);
    }
    // Training steps: MaSA on RMT's smaller grids, MaSAD on its largest.
    benchmark::RegisterBenchmark("masa_train", BM_grid_train)
        ->Args({28, t, 0})
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark("masad_train", BM_grid_train)
        ->Args({56, t, 1})
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
#endif
#if defined(RETENTION_BENCH_HAS_MSR)
    benchmark::RegisterBenchmark("machine/projection", BM_machine_projection)
        ->Args({8192, 1024, 1024, t})
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark("msr", BM_msr)
        ->Args({8192, 1024, 8, t})
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
#endif
  }
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 2;
  int kept = 1;  // our own flags are taken out before Google Benchmark sees the rest
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.rfind("--dump_dir=", 0) == 0) return dump(a.substr(11));
    if (a.rfind("--threads=", 0) == 0) {
      threads = std::max(1, std::atoi(a.c_str() + 10));
      continue;
    }
    argv[kept++] = argv[i];
  }
  argc = kept;
  register_all(threads);
#if defined(EIGEN_USE_BLAS)
  benchmark::AddCustomContext("eigen_use_blas", "yes");
#else
  benchmark::AddCustomContext("eigen_use_blas", "no");
#endif
  benchmark::AddCustomContext("blas_core", blas_core());
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
