// retention-test-links: compiled
// Exceptions and failed calls: an exception thrown on any thread reaches the caller, and a failed
// prefill / step / forward leaves every state exactly as it was (strong guarantee). Allocation
// failures are injected by interposing malloc: the n-th allocation of a call fails, for every n
// until the call succeeds. Allocations of the OpenMP runtime itself never fail (libgomp ends the
// process when one does, by design), so that only this library's failure paths are exercised.
#include <retention/retention.hpp>

#include "support/libc_alloc.hpp"
#include "support/test_support.hpp"

#include <gtest/gtest.h>

#include <dlfcn.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <utility>
#include <vector>

namespace {
std::atomic<long> g_countdown{-1};  // < 0: never fail; 0: fail this and every later allocation
/// Whether code at `caller` belongs to the OpenMP runtime (libgomp), whose allocation failures are
/// fatal: a new team or thread may allocate at any parallel region.
bool from_openmp_runtime(void* caller) {
  Dl_info info;
  return dladdr(caller, &info) != 0 && info.dli_fname != nullptr &&
         std::strstr(info.dli_fname, "libgomp") != nullptr;
}
bool fail_now(void* caller) {
  long c = g_countdown.load(std::memory_order_relaxed);
  if (c >= 0 && from_openmp_runtime(caller)) return false;
  while (c >= 0) {
    if (c == 0) return true;
    if (g_countdown.compare_exchange_weak(c, c - 1)) return false;
  }
  return false;
}
}  // namespace

extern "C" {
void* malloc(std::size_t n) {
  return fail_now(__builtin_return_address(0)) ? nullptr : __libc_malloc(n);
}
void* calloc(std::size_t a, std::size_t b) {
  return fail_now(__builtin_return_address(0)) ? nullptr : __libc_calloc(a, b);
}
void* realloc(void* p, std::size_t n) {
  return fail_now(__builtin_return_address(0)) ? nullptr : __libc_realloc(p, n);
}
int posix_memalign(void** out, std::size_t align, std::size_t n) {
  *out = fail_now(__builtin_return_address(0)) ? nullptr : __libc_memalign(align, n);
  return *out ? 0 : 12;
}
void* aligned_alloc(std::size_t align, std::size_t n) {
  return fail_now(__builtin_return_address(0)) ? nullptr : __libc_memalign(align, n);
}
void free(void* p) { __libc_free(p); }
}

namespace {

using retention::Form;
using retention::Index;
using retention::Matrix;

/// Runs call() with its n-th allocation failing, n = 0, 1, ...: each failed run must throw
/// std::bad_alloc and pass check_unchanged(); stops at the first run that succeeds. Returns how
/// many runs failed.
template <class Call, class Check>
int inject_until_success(Call&& call, Check&& check_unchanged) {
  for (int n = 0; n < 10000; ++n) {
    g_countdown.store(n);
    bool threw = false;
    try {
      call();
    } catch (const std::bad_alloc&) {
      threw = true;
    }
    g_countdown.store(-1);
    if (!threw) return n;
    check_unchanged();
  }
  ADD_FAILURE() << "never succeeded";
  return -1;
}

template <class T>
bool same_state(const std::vector<retention::RetentionState<T>>& a,
                const std::vector<retention::RetentionState<T>>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (a[i].position != b[i].position || a[i].S != b[i].S || a[i].z != b[i].z) return false;
  return true;
}

TEST(Exceptions, MsrPrefillIsAllOrNothingUnderAllocationFailure) {
  retention::MsrConfig cfg;
  cfg.embed_dim = 16;
  cfg.value_dim = 32;
  cfg.heads = 2;
  cfg.threads = 1;  // the OpenMP runtime aborts on its own allocation failures
  retention::MultiScaleRetention<double> layer(cfg);
  layer.init_random(3);
  const Matrix<double> x = retention_test::random_matrix<double>(70, 16, 4);
  for (Form form : {Form::parallel, Form::chunkwise, Form::recurrent}) {
    auto state = layer.make_state();
    layer.prefill(x.topRows(10), state, form);
    const auto before = state;
    Matrix<double> y;
    const int failures =
        inject_until_success([&] { y = layer.prefill(x.bottomRows(60), state, form, 16); },
                             [&] {
                               EXPECT_EQ(state.position, before.position);
                               EXPECT_TRUE(same_state(state.heads, before.heads));
                             });
    EXPECT_GT(failures, 3) << retention::to_string(form);
    EXPECT_EQ(state.position, 70);
    // The call that finally succeeded gives what an undisturbed one gives.
    auto fresh = before;
    EXPECT_EQ(y, layer.prefill(x.bottomRows(60), fresh, form, 16));
  }
}

TEST(Exceptions, MultiHeadFinalStatesAreAllOrNothing) {
  const Index B = 2, T = 40, H = 3, dk = 8, dv = 8;
  const Matrix<float> q = retention_test::random_matrix<float>(B * T, H * dk, 5);
  const Matrix<float> k = retention_test::random_matrix<float>(B * T, H * dk, 6);
  const Matrix<float> v = retention_test::random_matrix<float>(B * T, H * dv, 7);
  Matrix<float> out(B * T, H * dv);
  std::vector<retention::RetentionState<float>> states(static_cast<std::size_t>(B * H),
                                                       retention::RetentionState<float>(dk, dv));
  retention::MultiHeadOptions<float> opt;
  opt.threads = 1;
  opt.initial_states = &states;
  opt.final_states = &states;
  const retention::MultiHeadShape shape{B, T, H, dk, dv};
  retention::multi_head_retention(q.data(), k.data(), v.data(), out.data(), shape,
                                  retention::retnet_gammas(H), opt);
  const auto before = states;
  inject_until_success(
      [&] {
        retention::multi_head_retention(q.data(), k.data(), v.data(), out.data(), shape,
                                        retention::retnet_gammas(H), opt);
      },
      [&] { EXPECT_TRUE(same_state(states, before)); });
  EXPECT_EQ(states[0].position, 2 * T);
}

// The chunkwise passes keep their buffers per thread (detail::KeptMatrices): an allocation that
// fails while those are resized must leave them usable, and the next call exact.
/// One head's inputs for a forward and a backward with an initial state and a final-state
/// gradient (seeds seed .. seed + 5).
struct HeadInputs {
  HeadInputs(Index T, Index d, std::uint64_t seed)
      : Q(retention_test::random_matrix<float>(T, d, seed)),
        K(retention_test::random_matrix<float>(T, d, seed + 1)),
        V(retention_test::random_matrix<float>(T, d, seed + 2)),
        G(retention_test::random_matrix<float>(T, d, seed + 3)),
        init(d, d),
        fgrad(d, d) {
    init.S = retention_test::random_matrix<float>(d, d, seed + 4);
    fgrad.S = retention_test::random_matrix<float>(d, d, seed + 5);
  }
  Matrix<float> Q, K, V, G;
  retention::RetentionState<float> init, fgrad;
};

TEST(Exceptions, ChunkwiseBackwardAfterAllocationFailures) {
  const Index C = 16;  // 4 Cp <= d: the score-tile path
  const HeadInputs in(70, 128, 11);
  const Matrix<float>&Q = in.Q, &K = in.K, &V = in.V, &G = in.G;
  const retention::RetentionState<float>&init = in.init, &fgrad = in.fgrad;
  const retention::CausalDecay decay(0.95);
  retention::RetentionBackwardOptions<float> bo;
  bo.normalization = retention::Normalization::decay_and_score;
  bo.initial_state = &init;
  bo.final_state_gradient = &fgrad;
  const auto call = [&](Index chunk) {
    retention::RetentionGradients<float> g =
        retention::chunkwise_retention_backward(Q, K, V, decay, chunk, G, bo);
    retention::RetentionOptions<float> fo;
    fo.initial_state = &init;
    Matrix<float> O = retention::chunkwise_retention(Q, K, V, decay, chunk, fo);
    return std::make_pair(std::move(g), std::move(O));
  };
  const auto expected = call(C);
  // Failures while the kept buffers are sized from another shape (chunk 7) and back.
  for (Index chunk : {Index(7), C}) {
    const int failures = inject_until_success([&] { call(chunk); }, [] {});
    EXPECT_GT(failures, 0) << "chunk " << chunk;
  }
  const auto got = call(C);
  EXPECT_EQ(got.first.dQ, expected.first.dQ);
  EXPECT_EQ(got.first.dK, expected.first.dK);
  EXPECT_EQ(got.first.dV, expected.first.dV);
  EXPECT_EQ(got.first.d_initial_state.S, expected.first.d_initial_state.S);
  EXPECT_EQ(got.second, expected.second);
}

// The parallel form keeps its buffers and Eigen's packing buffers per thread (KeptMatrices,
// detail::gemm_into): the same, with tiles of 50 and the default, over 300 keys (packing buffers
// above Eigen's stack limit), with a final state and the initial state's gradient.
TEST(Exceptions, ParallelBackwardAfterAllocationFailures) {
  const HeadInputs in(300, 128, 21);
  const Matrix<float>&Q = in.Q, &K = in.K, &V = in.V, &G = in.G;
  const retention::RetentionState<float>&init = in.init, &fgrad = in.fgrad;
  const retention::CausalDecay decay(0.95);
  struct Result {
    retention::RetentionGradients<float> g;
    Matrix<float> O;
    retention::RetentionState<float> final_state;
  };
  const auto call = [&](Index tile) {
    retention::RetentionBackwardOptions<float> bo;
    bo.normalization = retention::Normalization::decay_and_score;
    bo.initial_state = &init;
    bo.final_state_gradient = &fgrad;
    bo.tile = tile;
    Result r;
    r.g = retention::parallel_retention_backward(Q, K, V, decay, G, bo);
    retention::RetentionOptions<float> fo;
    fo.initial_state = &init;
    fo.final_state = &r.final_state;
    fo.tile = tile;
    r.O = retention::parallel_retention(Q, K, V, decay, fo);
    return r;
  };
  const Result expected = call(0);
  for (Index tile : {Index(50), Index(0)}) {
    const int failures = inject_until_success([&] { call(tile); }, [] {});
    EXPECT_GT(failures, 0) << "tile " << tile;
  }
  const Result got = call(0);
  EXPECT_EQ(got.g.dQ, expected.g.dQ);
  EXPECT_EQ(got.g.dK, expected.g.dK);
  EXPECT_EQ(got.g.dV, expected.g.dV);
  EXPECT_EQ(got.g.d_initial_state.S, expected.g.d_initial_state.S);
  EXPECT_EQ(got.g.d_initial_state.z, expected.g.d_initial_state.z);
  EXPECT_EQ(got.O, expected.O);
  EXPECT_EQ(got.final_state.S, expected.final_state.S);
  EXPECT_EQ(got.final_state.z, expected.final_state.z);
}

TEST(Exceptions, AnExceptionOnAWorkerThreadReachesTheCaller) {
  for (int threads : {1, 2, 4}) {
    std::atomic<int> ran{0};
    EXPECT_THROW(retention::for_each_head(8, 4, 1e9, threads,
                                          [&](Index b, Index h) {
                                            ran.fetch_add(1);
                                            if (b == 5 && h == 2) throw std::runtime_error("x");
                                          }),
                 std::runtime_error)
        << threads;
    EXPECT_GE(ran.load(), 1);
  }
  // Nothing thrown: every pair runs exactly once.
  std::vector<std::atomic<int>> hits(32);
  retention::for_each_head(8, 4, 1e9, 2,
                           [&](Index b, Index h) { hits[static_cast<std::size_t>(b * 4 + h)]++; });
  for (const auto& h : hits) EXPECT_EQ(h.load(), 1);
}

TEST(Exceptions, ThreadCountsFromZeroToAMillion) {
  const Index B = 2, T = 33, H = 3, dk = 4, dv = 5;
  const Matrix<double> q = retention_test::random_matrix<double>(B * T, H * dk, 8);
  const Matrix<double> k = retention_test::random_matrix<double>(B * T, H * dk, 9);
  const Matrix<double> v = retention_test::random_matrix<double>(B * T, H * dv, 10);
  const retention::MultiHeadShape shape{B, T, H, dk, dv};
  Matrix<double> ref(B * T, H * dv), out(B * T, H * dv);
  retention::MultiHeadOptions<double> opt;
  opt.threads = 1;
  retention::multi_head_retention(q.data(), k.data(), v.data(), ref.data(), shape,
                                  retention::retnet_gammas(H), opt);
  for (int threads : {0, 1, 2, 3, 64, 1000, 1000000}) {
    opt.threads = threads;
    out.setConstant(-1);
    retention::multi_head_retention(q.data(), k.data(), v.data(), out.data(), shape,
                                    retention::retnet_gammas(H), opt);
    EXPECT_EQ(out, ref) << threads;
  }
  opt.threads = -1;
  retention_test::expect_shape_error(
      [&] {
        retention::multi_head_retention(q.data(), k.data(), v.data(), out.data(), shape,
                                        retention::retnet_gammas(H), opt);
      },
      "multi_head_retention: options.threads must be >= 0");
}

// Multi-head MaSAD on a team (work large enough to wake the pool) whose n-th allocation fails, for
// every n until a call succeeds: a share's line buffers, a log tile, the scheduler's counters.
// Every failed call throws std::bad_alloc and returns: a column line waiting for rows that will
// never finish is released. The call that succeeds equals the serial one exactly (each line is
// computed alike on any thread).
TEST(Exceptions, MasadTeamsStopAndReportAFailedLine) {
  retention::GridHeadsShape s;
  s.batch = 2;
  s.height = 24;
  s.width = 40;
  s.heads = 3;
  s.key_dim = s.value_dim = 32;
  s.qk_row_stride = s.v_row_stride = s.heads * 32;
  const Index rows = s.batch * s.height * s.width, cols = s.heads * 32;
  const Matrix<float> q = retention_test::random_matrix<float>(rows, cols, 21);
  const Matrix<float> k = retention_test::random_matrix<float>(rows, cols, 22);
  const Matrix<float> v = retention_test::random_matrix<float>(rows, cols, 23);
  const std::vector<double> gammas = {0.9, 0.7, 1.0};
  retention::MasaOptions options;
  options.threads = 1;
  Matrix<float> ref(rows, cols), out(rows, cols);
  retention::multi_head_masad(q.data(), k.data(), v.data(), ref.data(), s, gammas, options);
  for (int threads : {2, 3}) {
    options.threads = threads;
    // Starts the pool's threads before any allocation fails.
    retention::multi_head_masad(q.data(), k.data(), v.data(), out.data(), s, gammas, options);
    out.setConstant(-1);
    const int failed = inject_until_success(
        [&] {
          retention::multi_head_masad(q.data(), k.data(), v.data(), out.data(), s, gammas, options);
        },
        [] {});
    EXPECT_GE(failed, 1) << threads;
    EXPECT_EQ(out, ref) << threads;
  }
}

}  // namespace
