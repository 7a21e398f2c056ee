// Retention's three forms (SPEC 2) in float, single head and multi-head, with rate counters
// "tokens" (tokens/s) and "GFLOP" (GFLOP/s).
// FLOPs per token per head (issue 2): parallel T (dk + dv), chunkwise 2 C (dk + dv) + 4 dk dv,
// recurrent 4 dk dv. A plain GEMM of the same inner size runs in the same binary, so its GFLOP/s is
// the yardstick for the forms' rates on this machine (compare, do not read bare times).
//
// Single-head rows run one thread (Eigen's own GEMM threading off); the multi-head rows spread
// (batch, head) pairs over `threads` OpenMP threads. CI runs this once with a tiny
// --benchmark_min_time, so inputs are made once per benchmark, with a cheap generator.
#include <retention/chunkwise.hpp>
#include <retention/decay.hpp>
#include <retention/multihead.hpp>
#include <retention/parallel.hpp>
#include <retention/recurrent.hpp>

#include <benchmark/benchmark.h>

#include <cstdint>
#include <vector>

namespace {

using retention::Index;
using Mat = retention::Matrix<float>;

/// Uniform [-1, 1) values from a 64-bit LCG: fast enough for 64 MB buffers.
void fill(float* p, std::size_t n, std::uint64_t seed) {
  std::uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (std::size_t i = 0; i < n; ++i) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    p[i] = static_cast<float>(static_cast<double>(x >> 40) / static_cast<double>(1ull << 23) - 1.0);
  }
}

Mat random_mat(Index rows, Index cols, std::uint64_t seed) {
  Mat m(rows, cols);
  fill(m.data(), static_cast<std::size_t>(m.size()), seed);
  return m;
}

void set_counters(benchmark::State& state, double tokens, double flops) {
  state.counters["tokens"] =
      benchmark::Counter(tokens, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GFLOP"] =
      benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// RetNet head 3: gamma = 1 - 2^-8, a typical mid-range decay.
const retention::CausalDecay kDecay(1.0 - 1.0 / 256);

// Args: T, d (= dk = dv).
void BM_parallel(benchmark::State& state) {
  const Index T = state.range(0), d = state.range(1);
  const Mat Q = random_mat(T, d, 1), K = random_mat(T, d, 2), V = random_mat(T, d, 3);
  Mat out(T, d);
  for (auto _ : state) {
    retention::parallel_retention_into(Q, K, V, kDecay, out);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, static_cast<double>(T),
               static_cast<double>(T) * static_cast<double>(T) * static_cast<double>(2 * d));
}

void BM_recurrent(benchmark::State& state) {
  const Index T = state.range(0), d = state.range(1);
  const Mat Q = random_mat(T, d, 1), K = random_mat(T, d, 2), V = random_mat(T, d, 3);
  Mat out(T, d);
  for (auto _ : state) {
    retention::recurrent_retention_into(Q, K, V, kDecay, out);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, static_cast<double>(T),
               static_cast<double>(T) * 4.0 * static_cast<double>(d * d));
}

// Args: T, d, C.
void BM_chunkwise(benchmark::State& state) {
  const Index T = state.range(0), d = state.range(1), C = state.range(2);
  const Mat Q = random_mat(T, d, 1), K = random_mat(T, d, 2), V = random_mat(T, d, 3);
  Mat out(T, d);
  for (auto _ : state) {
    retention::chunkwise_retention_into(Q, K, V, kDecay, C, out);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const double per_token =
      2.0 * static_cast<double>(C) * static_cast<double>(2 * d) + 4.0 * static_cast<double>(d * d);
  set_counters(state, static_cast<double>(T), static_cast<double>(T) * per_token);
}

// Multi-head chunkwise over [1, T, H, d] buffers, H = 8 RetNet heads. Args: T, d, C, threads.
void BM_multihead_chunkwise(benchmark::State& state) {
  const Index T = state.range(0), d = state.range(1), C = state.range(2), H = 8;
  const int threads = static_cast<int>(state.range(3));
  const retention::MultiHeadShape shape{1, T, H, d, d};
  const std::size_t n = static_cast<std::size_t>(T * H * d);
  std::vector<float> q(n), k(n), v(n), out(n);
  fill(q.data(), n, 1);
  fill(k.data(), n, 2);
  fill(v.data(), n, 3);
  const std::vector<double> gammas = retention::retnet_gammas(H);
  retention::MultiHeadOptions<float> opt;
  opt.form = retention::Form::chunkwise;
  opt.chunk = C;
  opt.normalization = retention::Normalization::decay_and_score;
  opt.threads = threads;
  for (auto _ : state) {
    retention::multi_head_retention(q.data(), k.data(), v.data(), out.data(), shape, gammas, opt);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const double per_token =
      2.0 * static_cast<double>(C) * static_cast<double>(2 * d) + 4.0 * static_cast<double>(d * d);
  set_counters(state, static_cast<double>(T), static_cast<double>(T * H) * per_token);
}

// Yardstick: [M, d] x [d, N] float GEMM, the shape of the parallel form's score blocks. Args: M, d.
void BM_gemm(benchmark::State& state) {
  const Index M = state.range(0), d = state.range(1);
  const Mat A = random_mat(M, d, 1), B = random_mat(d, M, 2);
  Mat Cm(M, M);
  for (auto _ : state) {
    Cm.noalias() = A * B;
    benchmark::DoNotOptimize(Cm.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP"] = benchmark::Counter(2.0 * static_cast<double>(M * M * d) * 1e-9,
                                               benchmark::Counter::kIsIterationInvariantRate);
}

void parallel_args(benchmark::internal::Benchmark* b) {
  for (int64_t d : {64, 128})
    for (int64_t T : {256, 1024, 4096}) b->Args({T, d});
}
void recurrent_args(benchmark::internal::Benchmark* b) {
  for (int64_t d : {64, 128})
    for (int64_t T : {256, 1024, 4096, 16384}) b->Args({T, d});
}
void chunkwise_args(benchmark::internal::Benchmark* b) {
  for (int64_t d : {64, 128})
    for (int64_t T : {256, 1024, 4096, 16384})
      for (int64_t C : {32, 64, 128}) b->Args({T, d, C});
}

BENCHMARK(BM_gemm)
    ->ArgNames({"M", "d"})
    ->Args({1024, 64})
    ->Args({1024, 128})
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_parallel)->ArgNames({"T", "d"})->Apply(parallel_args)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_recurrent)->ArgNames({"T", "d"})->Apply(recurrent_args)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_chunkwise)
    ->ArgNames({"T", "d", "C"})
    ->Apply(chunkwise_args)
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_multihead_chunkwise)
    ->ArgNames({"T", "d", "C", "threads"})
    ->Args({16384, 128, 64, 1})
    ->Args({16384, 128, 64, 2})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace

int main(int argc, char** argv) {
  // Single-head rows measure one core; multi-head rows choose their threads themselves.
  Eigen::setNbThreads(1);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
