// The tour's layers at 1 and 2 threads (the argument), for bench/contention, which runs this
// program on a quiet machine and beside a process that keeps one core busy: threads must never
// make a layer slower, and must pay off when the cores are free.
#include <benchmark/benchmark.h>

#include <retention/retention.hpp>

#include <cmath>
#include <cstddef>
#include <vector>

namespace {

using retention::Index;
using Mat = retention::Matrix<float>;

Mat sine_matrix(Index rows, Index cols, double f) {
  Mat m(rows, cols);
  for (Index i = 0; i < m.size(); ++i)
    m.data()[i] = static_cast<float>(std::sin(f * static_cast<double>(i + 1)));
  return m;
}

/// ViR-S/16 with deterministic random weights (the tour's model), built once; with packed weights
/// (VirConfig::packed_weights) a second copy of the same model.
const retention::VirEncoder<float>& vir_model(bool packed = false) {
  static const retention::VirEncoder<float> model(retention::vir_s16(), 0);
  static const retention::VirEncoder<float> packed_model(
      [] {
        retention::VirConfig c = retention::vir_s16();
        c.packed_weights = true;
        return c;
      }(),
      0);
  return packed ? packed_model : model;
}

/// The tour's "ViR MHR" line: the first block's multi-head retention layer (fused projection, six
/// heads of 64, output projection) on ViR-S/16's 197 tokens of 384, parallel form.
void BM_vir_mhr(benchmark::State& state) {
  const retention::VirRetention<float>& mhr = vir_model().blocks().front().retention();
  const Mat x = sine_matrix(197, 384, 0.37);
  retention::VirOptions o;
  o.threads = static_cast<int>(state.range(0));
  for (auto _ : state) benchmark::DoNotOptimize(mhr.forward(x, o).data());
}

/// The tour's ViR-S/16 encoder at 224 px: parallel form layer by layer (range(1) = 0), or chunk by
/// chunk through every layer (range(1) = 1, chunks of 64 tokens), the two orders the thread rule's
/// issue measured.
void run_vir_encoder(benchmark::State& state, bool packed) {
  const Index size = 224;
  std::vector<float> img(static_cast<std::size_t>(size * size * 3));
  for (std::size_t i = 0; i < img.size(); ++i)
    img[i] = static_cast<float>(std::sin(0.05 * static_cast<double>(i)));
  const retention::ImageView<float> view{img.data(), size, size, 3};
  retention::VirOptions o;
  o.threads = static_cast<int>(state.range(0));
  if (state.range(1)) {
    o.form = retention::Form::chunkwise;
    o.chunk = 64;
    o.order = retention::VirOrder::chunk_major;
  }
  for (auto _ : state) benchmark::DoNotOptimize(vir_model(packed).forward(view, o).data());
}
void BM_vir_encoder(benchmark::State& state) { run_vir_encoder(state, false); }
/// The same with every Linear packed once (VirConfig::packed_weights).
void BM_vir_encoder_packed(benchmark::State& state) { run_vir_encoder(state, true); }

/// The retention kernel of the ViR MHR layer alone (no projections): 197 tokens, 6 heads of 64,
/// chunkwise. About 0.2 ms of work, below what the thread rule gives a second thread.
void BM_vir_mhr_kernel(benchmark::State& state) {
  const Index T = 197, H = 6, d = 64;
  const Mat q = sine_matrix(T, H * d, 0.01), k = sine_matrix(T, H * d, 0.02),
            v = sine_matrix(T, H * d, 0.03);
  Mat out(T, H * d);
  retention::MultiHeadOptions<float> o;
  o.threads = static_cast<int>(state.range(0));
  const auto masks = retention::causal_masks(retention::linspace_gammas(H));
  for (auto _ : state) {
    retention::multi_head_retention(retention::heads_view(q.data(), 1, T, H, d),
                                    retention::heads_view(k.data(), 1, T, H, d),
                                    retention::heads_view(v.data(), 1, T, H, d),
                                    retention::heads_view(out.data(), 1, T, H, d), masks, o);
    benchmark::DoNotOptimize(out.data());
  }
}

/// The RMT attention layer on a 28 x 28 grid, C = 128, 4 heads (MaSA and MaSAD).
void run_rmt_layer(benchmark::State& state, bool packed) {
  retention::ManhattanAttentionConfig cfg;
  cfg.packed_weights = packed;
  cfg.embed_dim = 128;
  cfg.heads = 4;
  cfg.tile.threads = static_cast<int>(state.range(0));
  cfg.mode = state.range(1) ? retention::RmtMode::decomposed : retention::RmtMode::full;
  retention::ManhattanAttention<float> layer(cfg);
  layer.init_random(1);
  const Mat x = sine_matrix(28 * 28, 128, 0.01);
  for (auto _ : state) benchmark::DoNotOptimize(layer.forward(x, 28, 28).data());
}
void BM_rmt_layer(benchmark::State& state) { run_rmt_layer(state, false); }
/// The same with its projections packed once (ManhattanAttentionConfig::packed_weights).
void BM_rmt_layer_packed(benchmark::State& state) { run_rmt_layer(state, true); }

/// The tour's MSR layer: T = 1024, d = 512, value_dim = 1024, 4 heads, chunkwise.
void run_msr_layer(benchmark::State& state, bool packed) {
  retention::MsrConfig cfg;
  cfg.packed_weights = packed;
  cfg.embed_dim = 512;
  cfg.value_dim = 1024;
  cfg.heads = 4;
  cfg.threads = static_cast<int>(state.range(0));
  retention::MultiScaleRetention<float> layer(cfg);
  layer.init_random(2);
  const Mat x = sine_matrix(1024, 512, 0.001);
  for (auto _ : state) benchmark::DoNotOptimize(layer.forward(x).data());
}
void BM_msr_layer(benchmark::State& state) { run_msr_layer(state, false); }
/// The same with its projections packed once (MsrConfig::packed_weights).
void BM_msr_layer_packed(benchmark::State& state) { run_msr_layer(state, true); }

/// Multi-head MaSAD, 56 x 56 grid, 8 heads of 64.
void BM_masad(benchmark::State& state) {
  const Index N = 56 * 56, H = 8, d = 64;
  const Mat q = sine_matrix(N, H * d, 0.01), k = sine_matrix(N, H * d, 0.02),
            v = sine_matrix(N, H * d, 0.03);
  Mat out(N, H * d);
  retention::MasaOptions o;
  o.threads = static_cast<int>(state.range(0));
  const auto masks = retention::manhattan_masks(retention::rmt_gammas(H, 2.0, 4.0), 56, 56);
  for (auto _ : state) {
    retention::multi_head_masad(retention::heads_view(q.data(), 1, N, H, d),
                                retention::heads_view(k.data(), 1, N, H, d),
                                retention::heads_view(v.data(), 1, N, H, d),
                                retention::heads_view(out.data(), 1, N, H, d), masks, o);
    benchmark::DoNotOptimize(out.data());
  }
}

/// Rows with a mode (range(1)): each mode at 1 thread and then at 2, so that the two runs
/// bench/contention compares are back to back.
void threads_by_mode(benchmark::internal::Benchmark* b) {
  for (int mode : {0, 1}) b->Args({1, mode})->Args({2, mode});
}

BENCHMARK(BM_vir_mhr)->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_vir_encoder)->Apply(threads_by_mode)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_vir_encoder_packed)
    ->Apply(threads_by_mode)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_vir_mhr_kernel)->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_rmt_layer)->Apply(threads_by_mode)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_rmt_layer_packed)
    ->Apply(threads_by_mode)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_msr_layer)->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_msr_layer_packed)->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_masad)->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
