// Serving: the decode step's cost per token. (1) MSR layer: one batched step of B sequences
// (step_batch) against B single-sequence steps, tokens/s in the same run. (2) The multi-head decode
// kernel (varlen_step) with bfloat16 / half q, k, v against float q, k, v, float state in all
// cases: bytes moved per token (the state S, z read and written once, plus the token's q, k, v and
// the output) and the rate those bytes move at.
#include <retention/layers/msr.hpp>
#include <retention/varlen.hpp>

#include <benchmark/benchmark.h>

#include <random>
#include <vector>

namespace {

using retention::Index;
using retention::Matrix;

template <class T>
Matrix<T> random(Index rows, Index cols, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  Matrix<T> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<T>(dist(rng));
  return m;
}

retention::MultiScaleRetention<float> make_layer(bool packed = false) {
  retention::MsrConfig c;
  c.embed_dim = 256;
  c.value_dim = 512;
  c.heads = 4;
  c.threads = 1;  // one core: the comparison is batching, not threading
  c.packed_weights = packed;
  retention::MultiScaleRetention<float> layer(c);
  layer.init_random(1);
  return layer;
}

/// One batched step of B sequences at different positions (range(1): packed weights).
void BM_MsrDecodeBatch(benchmark::State& st) {
  const auto layer = make_layer(st.range(1) != 0);
  const Index B = st.range(0), d = layer.embed_dim();
  std::vector<retention::MsrState<float>> states;
  for (Index b = 0; b < B; ++b) {
    states.push_back(layer.make_state());
    if (b > 0) layer.prefill(random<float>(b, d, static_cast<unsigned>(b)), states.back());
  }
  std::vector<retention::MsrState<float>*> ptrs;
  for (auto& s : states) ptrs.push_back(&s);
  const Matrix<float> x = random<float>(B, d, 99);
  Matrix<float> y(B, d);
  retention::MultiScaleRetention<float>::BatchWorkspace work;
  for (auto _ : st) {
    layer.step_batch(x, ptrs, y, work);
    benchmark::DoNotOptimize(y.data());
  }
  st.SetItemsProcessed(st.iterations() * B);  // tokens
}
BENCHMARK(BM_MsrDecodeBatch)
    ->ArgsProduct({{1, 4, 16, 64}, {0, 1}})
    ->ArgNames({"B", "packed"})
    ->Unit(benchmark::kMicrosecond);

/// The same B tokens decoded one sequence at a time.
void BM_MsrDecodeOneByOne(benchmark::State& st) {
  const auto layer = make_layer();
  const Index B = st.range(0), d = layer.embed_dim();
  std::vector<retention::MsrState<float>> states;
  for (Index b = 0; b < B; ++b) {
    states.push_back(layer.make_state());
    if (b > 0) layer.prefill(random<float>(b, d, static_cast<unsigned>(b)), states.back());
  }
  const Matrix<float> x = random<float>(B, d, 99);
  retention::RowVector<float> y(d);
  for (auto _ : st) {
    for (Index b = 0; b < B; ++b) layer.step_into(x.row(b), states[static_cast<std::size_t>(b)], y);
    benchmark::DoNotOptimize(y.data());
  }
  st.SetItemsProcessed(st.iterations() * B);
}
BENCHMARK(BM_MsrDecodeOneByOne)->Arg(1)->Arg(4)->Arg(16)->Arg(64)->Unit(benchmark::kMicrosecond);

/// varlen_step over B sequences x H heads of dk = dv = D, inputs of storage type S, float state.
template <class S>
void BM_DecodeStepStorage(benchmark::State& st) {
  const Index B = 16, H = 8, D = st.range(0);
  const auto masks = retention::causal_masks(retention::retnet_gammas(H));
  std::vector<retention::RetentionState<float>> states(static_cast<std::size_t>(B * H),
                                                       retention::RetentionState<float>(D, D));
  std::vector<retention::RetentionState<float>*> ptrs;
  for (auto& s : states) ptrs.push_back(&s);
  const Matrix<S> q = random<S>(B, H * D, 1), k = random<S>(B, H * D, 2),
                  v = random<S>(B, H * D, 3);
  Matrix<float> out(B, H * D);
  retention::VarlenStepWorkspace<float> work;
  for (auto _ : st) {
    retention::varlen_step(
        retention::heads_view(q.data(), B, 1, H, D), retention::heads_view(k.data(), B, 1, H, D),
        retention::heads_view(v.data(), B, 1, H, D), retention::heads_view(out.data(), B, 1, H, D),
        masks, ptrs, retention::Normalization::decay_and_score, 1, &work);
    benchmark::DoNotOptimize(out.data());
  }
  // Per token (one sequence): every head's S [D, D] and z [D] read and written once, its q, k, v
  // read in S's storage type, its output written in float.
  const double per_token = static_cast<double>(H) * (2.0 * 4.0 * static_cast<double>(D * D + D) +
                                                     3.0 * sizeof(S) * static_cast<double>(D) +
                                                     4.0 * static_cast<double>(D));
  const double input_bytes = static_cast<double>(H) * 3.0 * sizeof(S) * static_cast<double>(D);
  st.counters["bytes_per_token"] = per_token;
  st.counters["qkv_bytes_per_token"] = input_bytes;
  st.counters["bytes_per_second"] =
      benchmark::Counter(per_token * static_cast<double>(B) * static_cast<double>(st.iterations()),
                         benchmark::Counter::kIsRate, benchmark::Counter::kIs1024);
  st.SetItemsProcessed(st.iterations() * B);
}
BENCHMARK_TEMPLATE(BM_DecodeStepStorage, float)->Arg(64)->Arg(128)->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_DecodeStepStorage, Eigen::bfloat16)
    ->Arg(64)
    ->Arg(128)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_DecodeStepStorage, Eigen::half)
    ->Arg(64)
    ->Arg(128)
    ->Unit(benchmark::kMicrosecond);

}  // namespace

BENCHMARK_MAIN();
