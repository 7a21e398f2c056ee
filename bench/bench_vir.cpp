// ViR-S/16 encoder (docs/math.md §5) on one image at 224, 448, 896 and 1024 px: the parallel form
// (layer-major) against chunk-major chunkwise with chunks of 64, 128 and 256 tokens. Counters:
// images/s, tokens, and speed relative to the parallel form at the same size measured earlier in
// this run (peak memory is reported by examples/03_vir_image, which measures each configuration in
// a fresh process). Threads: one unless OMP_NUM_THREADS is set (per-core numbers; spin-waiting
// OpenMP threads are meaningless on a shared machine).
#include <benchmark/benchmark.h>

#include <retention/layers/vir.hpp>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <map>
#include <vector>

namespace {

using retention::Index;

int thread_count() {
  const char* env = std::getenv("OMP_NUM_THREADS");
  return env && std::atoi(env) > 0 ? std::atoi(env) : 1;
}

/// Built once and shared: deterministic random ViR-S/16 weights (the position embedding, learned
/// at 224 px, is resampled for the other sizes).
const retention::VirEncoder<float>& model() {
  static const retention::VirEncoder<float> m(retention::vir_s16(), 0);
  return m;
}

const std::vector<float>& image(Index size) {
  static std::map<Index, std::vector<float>> cache;
  std::vector<float>& img = cache[size];
  if (img.empty()) {
    img.resize(static_cast<std::size_t>(size * size * 3));
    for (Index i = 0; i < static_cast<Index>(img.size()); ++i)
      img[static_cast<std::size_t>(i)] =
          static_cast<float>(std::sin(0.001 * static_cast<double>(i)));
  }
  return img;
}

std::map<Index, double> parallel_seconds;  // per size, from the parallel run of this process

void BM_VirEncoder(benchmark::State& state) {
  const Index size = state.range(0), chunk = state.range(1);
  retention::VirOptions o;
  o.threads = thread_count();
  if (chunk == 0) {
    o.form = retention::Form::parallel;
  } else {
    o.form = retention::Form::chunkwise;
    o.order = retention::VirOrder::chunk_major;
    o.chunk = chunk;
  }
  const retention::VirEncoder<float>& m = model();
  const retention::ImageView<float> view{image(size).data(), size, size, 3};
  double total = 0.0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    retention::RowVector<float> f = m.forward(view, o);
    benchmark::DoNotOptimize(f.data());
    total += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  const double per_image = total / static_cast<double>(state.iterations());
  if (chunk == 0) parallel_seconds[size] = per_image;
  state.counters["images/s"] =
      benchmark::Counter(static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
  state.counters["tokens"] = static_cast<double>((size / 16) * (size / 16) + 1);
  const auto p = parallel_seconds.find(size);
  if (p != parallel_seconds.end()) state.counters["speed_vs_parallel"] = p->second / per_image;
  state.SetLabel(chunk == 0 ? "parallel" : "chunk-major chunkwise");
}

// The parallel runs (chunk 0) come first, so each chunk-major run finds its size's parallel time.
BENCHMARK(BM_VirEncoder)
    ->ArgNames({"px", "chunk"})
    ->ArgsProduct({{224, 448, 896, 1024}, {0, 64, 128, 256}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace

int main(int argc, char** argv) {
  Eigen::setNbThreads(thread_count());
  model();  // one-time setup outside every timing
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
