// RMT kernels per head (float, one thread): MaSA (streaming tiles) and MaSAD on square grids.
// Reports images/s and GFLOP/s, and, measured in the same run, the MaSA / MaSAD time ratio next to
// the FLOP ratio HW / (H + W), MaSA against a full-matrix GEMM implementation of the same softmax,
// and MaSA's peak extra memory at 56 x 56 (resident-set high-water mark of a forked child).
#include <retention/masa.hpp>

#include <benchmark/benchmark.h>

#include <malloc.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <ctime>
#include <random>
#include <vector>

namespace {

using retention::Index;
using Mat = retention::Matrix<float>;

Mat random_mat(Index rows, Index cols, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  Mat m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = dist(rng);
  return m;
}

struct Inputs {
  Index side, d;
  Mat q, k, v;
  Inputs(Index side_, Index d_) : side(side_), d(d_) {
    const Index n = side * side;
    q = random_mat(n, d, 1);
    k = random_mat(n, d, 2) / std::sqrt(static_cast<float>(d));
    v = random_mat(n, d, 3);
  }
};

constexpr double kGamma = 1.0 - 1.0 / 32;  // an RMT head (initial_value 2 .. 2 + heads_range)

retention::MasaOptions serial() {
  retention::MasaOptions o;
  o.threads = 1;
  return o;
}

// QK^T and PV: 2 N^2 (dk + dv) for MaSA; each MaSAD pass does the same over rows of W or columns of
// H keys.
double masa_flops(Index side, Index d) {
  const double n = static_cast<double>(side * side);
  return 2.0 * n * n * 2.0 * static_cast<double>(d);
}
double masad_flops(Index side, Index d) {
  const double n = static_cast<double>(side * side);
  return 2.0 * n * (2.0 * static_cast<double>(side)) * 2.0 * static_cast<double>(d);
}

void set_counters(benchmark::State& state, double flops) {
  const double it = static_cast<double>(state.iterations());
  state.counters["images/s"] = benchmark::Counter(it, benchmark::Counter::kIsRate);
  state.counters["GFLOP/s"] = benchmark::Counter(it * flops * 1e-9, benchmark::Counter::kIsRate);
}

void BM_masa(benchmark::State& state) {
  const Inputs in(state.range(0), state.range(1));
  const retention::ManhattanDecay decay(kGamma, in.side, in.side);
  for (auto _ : state)
    benchmark::DoNotOptimize(retention::masa(in.q, in.k, in.v, decay, serial()).data());
  set_counters(state, masa_flops(in.side, in.d));
}

void BM_masad(benchmark::State& state) {
  const Inputs in(state.range(0), state.range(1));
  for (auto _ : state)
    benchmark::DoNotOptimize(
        retention::masad(in.q, in.k, in.v, kGamma, in.side, in.side, serial()).data());
  set_counters(state, masad_flops(in.side, in.d));
}

// The same softmax(QK^T + L) V with the whole [N, N] matrix and L precomputed: three big GEMM-like
// passes, the plain way to compute MaSA when memory is no concern.
Mat full_matrix_masa(const Inputs& in, const Mat& log_d) {
  Mat s = in.q * in.k.transpose();
  s += log_d;
  for (Index i = 0; i < s.rows(); ++i) {
    auto r = s.row(i);
    r.array() = (r.array() - r.maxCoeff()).exp();
    r /= r.sum();
  }
  return s * in.v;
}

// This thread's CPU time: the kernels run on one thread here, and CPU time stays meaningful on a
// shared, loaded machine where wall time mostly measures the other tenants.
template <class F>
double time_ms(F&& f) {
  timespec a{}, b{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &a);
  f();
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &b);
  return static_cast<double>(b.tv_sec - a.tv_sec) * 1e3 +
         static_cast<double>(b.tv_nsec - a.tv_nsec) * 1e-6;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Times MaSA, MaSAD and the full-matrix version alternately in the same run (thread CPU time);
// ratios of medians.
void BM_ratio(benchmark::State& state) {
  const Inputs in(state.range(0), state.range(1));
  const retention::ManhattanDecay decay(kGamma, in.side, in.side);
  const Mat log_d = decay.log_weights<float>(0, in.side * in.side, 0, in.side * in.side);
  std::vector<double> t_masa, t_masad, t_full;
  for (auto _ : state) {
    t_masa.push_back(time_ms([&] {
      benchmark::DoNotOptimize(retention::masa(in.q, in.k, in.v, decay, serial()).data());
    }));
    t_masad.push_back(time_ms([&] {
      benchmark::DoNotOptimize(
          retention::masad(in.q, in.k, in.v, kGamma, in.side, in.side, serial()).data());
    }));
    t_full.push_back(
        time_ms([&] { benchmark::DoNotOptimize(full_matrix_masa(in, log_d).data()); }));
  }
  const double side = static_cast<double>(in.side);
  state.counters["masa_ms"] = median(t_masa);
  state.counters["masad_ms"] = median(t_masad);
  state.counters["full_ms"] = median(t_full);
  state.counters["masa/masad"] = median(t_masa) / median(t_masad);
  state.counters["flop_ratio"] = side * side / (side + side);
  state.counters["masa/full"] = median(t_masa) / median(t_full);
}

// Resident-set high-water mark (KiB) of a forked child that runs f; the inputs are already resident
// in the parent, so the difference to a child running nothing is the extra memory f needs.
template <class F>
long child_peak_kib(F&& f) {
  // Hand freed heap pages back first, so the child's allocations fault in fresh pages that count.
  malloc_trim(0);
  const pid_t pid = fork();
  if (pid == 0) {
    f();
    _exit(0);
  }
  int status = 0;
  rusage usage{};
  wait4(pid, &status, 0, &usage);
  return usage.ru_maxrss;
}

void BM_masa_peak_memory(benchmark::State& state) {
  const Inputs in(state.range(0), state.range(1));
  const retention::ManhattanDecay decay(kGamma, in.side, in.side);
  const Index n = in.side * in.side;
  long base = 0, masa_kib = 0, masad_kib = 0, full_kib = 0;
  for (auto _ : state) {
    base = child_peak_kib([] {});
    masa_kib = child_peak_kib([&] {
      benchmark::DoNotOptimize(retention::masa(in.q, in.k, in.v, decay, serial()).data());
    });
    masad_kib = child_peak_kib([&] {
      benchmark::DoNotOptimize(
          retention::masad(in.q, in.k, in.v, kGamma, in.side, in.side, serial()).data());
    });
    full_kib = child_peak_kib([&] {
      const Mat log_d = decay.log_weights<float>(0, n, 0, n);
      benchmark::DoNotOptimize(full_matrix_masa(in, log_d).data());
    });
  }
  const retention::MasaOptions o;
  state.counters["masa_extra_KiB"] = static_cast<double>(masa_kib - base);
  state.counters["masad_extra_KiB"] = static_cast<double>(masad_kib - base);
  state.counters["full_matrix_extra_KiB"] = static_cast<double>(full_kib - base);
  // What masa allocates: the output [N, dv]; Q copied and K transposed for the micro-kernels (O(N
  // dk) each); the per-axis ln D tables [W + 2H - 1, W + key_tile]; one [query_tile, key_tile]
  // logit tile and [query_tile, dv].
  const double tables = static_cast<double>((in.side + 2 * in.side - 1) * (in.side + o.key_tile));
  state.counters["masa_expected_KiB"] =
      (static_cast<double>(n * in.d + 2 * n * in.d + o.query_tile * o.key_tile +
                           o.query_tile * in.d) +
       tables) *
      4.0 / 1024.0;
  state.counters["NxN_matrix_KiB"] = static_cast<double>(n * n * 4) / 1024.0;
}

void grid_args(benchmark::internal::Benchmark* b, bool with_112) {
  for (int d : {32, 64}) {
    for (int side : {7, 14, 28, 56}) b->Args({side, d});
    if (with_112) b->Args({112, d});
  }
  b->Unit(benchmark::kMicrosecond);
}

BENCHMARK(BM_masa)->Apply([](benchmark::internal::Benchmark* b) { grid_args(b, false); });
BENCHMARK(BM_masad)->Apply([](benchmark::internal::Benchmark* b) { grid_args(b, true); });
BENCHMARK(BM_ratio)
    ->Apply([](benchmark::internal::Benchmark* b) { grid_args(b, false); })
    ->Unit(benchmark::kMillisecond)
    ->MinTime(0.5);
BENCHMARK(BM_masa_peak_memory)
    ->Args({56, 32})
    ->Args({56, 64})
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond);

}  // namespace

int main(int argc, char** argv) {
  // Per-head, single-thread numbers: keep Eigen's own GEMM threading out of the comparison.
  Eigen::setNbThreads(1);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
