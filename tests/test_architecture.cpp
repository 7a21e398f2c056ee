// The library's shape (issue: one head loop, one thread rule, nothing internal leaks to users):
// what including retention.hpp defines, what the public headers contain, and that decoding
// allocates nothing after its first step (counted by interposing malloc and friends).
#include <retention/retention.hpp>

#include "support/test_support.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

// --- Allocation counting: every heap allocation of the process goes through these. -------------
extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
void __libc_free(void*);
}

namespace {
std::atomic<long> g_allocations{0};
std::atomic<bool> g_counting{false};
void count() {
  if (g_counting.load(std::memory_order_relaxed)) g_allocations.fetch_add(1);
}
}  // namespace

extern "C" {
void* malloc(std::size_t n) {
  count();
  return __libc_malloc(n);
}
void* calloc(std::size_t a, std::size_t b) {
  count();
  return __libc_calloc(a, b);
}
void* realloc(void* p, std::size_t n) {
  count();
  return __libc_realloc(p, n);
}
int posix_memalign(void** out, std::size_t align, std::size_t n) {
  count();
  *out = __libc_memalign(align, n);
  return *out ? 0 : 12;  // ENOMEM
}
void* aligned_alloc(std::size_t align, std::size_t n) {
  count();
  return __libc_memalign(align, n);
}
void free(void* p) { __libc_free(p); }
}

namespace {

using retention::Index;
using retention::Matrix;
using retention::RowVector;

/// Allocations made while f runs.
template <class F>
long allocations_during(F&& f) {
  g_allocations.store(0);
  g_counting.store(true);
  f();
  g_counting.store(false);
  return g_allocations.load();
}

TEST(Architecture, AllocationCounterSeesAllocations) {
  // The counter itself must work, or the zero below would prove nothing.
  const long n = allocations_during([] {
    std::vector<int> v(1000);
    Matrix<float> m(30, 30);
    m.setZero();
    EXPECT_EQ(v.size() + static_cast<std::size_t>(m.size()), 1900u);
  });
  EXPECT_GE(n, 2);
}

TEST(Architecture, MsrStepAllocatesNothingAfterTheFirst) {
  for (int threads : {1, 2}) {
    retention::MsrConfig cfg;
    cfg.embed_dim = 64;
    cfg.value_dim = 128;
    cfg.heads = 4;
    cfg.threads = threads;
    retention::MultiScaleRetention<float> layer(cfg);
    layer.init_random(1);
    auto state = layer.make_state();
    const Matrix<float> x = retention_test::random_matrix<float>(101, 64, 2);
    RowVector<float> y(64);
    layer.step_into(x.row(0), state, y);  // the first step may size scratch
    const long n = allocations_during([&] {
      for (Index t = 1; t <= 100; ++t) layer.step_into(x.row(t), state, y);
    });
    EXPECT_EQ(n, 0) << "threads " << threads;
    EXPECT_EQ(state.position, 101);
    EXPECT_TRUE(y.allFinite());
  }
}

TEST(Architecture, MultiHeadStepAllocatesNothingAfterTheFirst) {
  const Index B = 3, H = 4, dk = 16, dv = 24;
  const auto masks = retention::causal_masks(retention::retnet_gammas(H));
  std::vector<retention::RetentionState<double>> states(static_cast<std::size_t>(B * H),
                                                        retention::RetentionState<double>(dk, dv));
  const Matrix<double> q = retention_test::random_matrix<double>(B * H, dk, 3);
  const Matrix<double> k = retention_test::random_matrix<double>(B * H, dk, 4);
  const Matrix<double> v = retention_test::random_matrix<double>(B * H, dv, 5);
  Matrix<double> out(B * H, dv);
  retention::StepWorkspace<double> ws;
  const auto step = [&] {
    retention::multi_head_step(retention::heads_view(q.data(), B, 1, H, dk),
                               retention::heads_view(k.data(), B, 1, H, dk),
                               retention::heads_view(v.data(), B, 1, H, dv),
                               retention::heads_view(out.data(), B, 1, H, dv), masks, states,
                               retention::Normalization::decay_and_score, 0, &ws);
  };
  step();
  const long n = allocations_during([&] {
    for (int t = 0; t < 100; ++t) step();
  });
  EXPECT_EQ(n, 0);
  EXPECT_EQ(states[0].position, 101);
}

// --- Nothing internal reaches a user who includes retention.hpp. ------------------------------
TEST(Architecture, NoInternalMacroReachesUsers) {
#if defined(RETENTION_HAS_MXCSR) || defined(RETENTION_MASAD_FUSED_LINES) || \
    defined(RETENTION_MASAD_UNROLL) || defined(RETENTION_MASAD_PRAGMA)
  ADD_FAILURE() << "an internal RETENTION_ macro is defined after including retention.hpp";
#endif
  SUCCEED();
}

std::string read_file(const std::filesystem::path& p) {
  std::ifstream in(p);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

/// Every header under include/retention, as (path relative to include/retention, text).
std::vector<std::pair<std::string, std::string>> headers() {
  const std::filesystem::path root =
      std::filesystem::path(RETENTION_SOURCE_DIR) / "include" / "retention";
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& e : std::filesystem::recursive_directory_iterator(root))
    if (e.is_regular_file() && e.path().extension() == ".hpp")
      out.emplace_back(std::filesystem::relative(e.path(), root).generic_string(),
                       read_file(e.path()));
  return out;
}

TEST(Architecture, PublicHeadersUseNoEigenInternalsOrIntrinsics) {
  const auto all = headers();
  ASSERT_GT(all.size(), 10u);
  for (const auto& [name, text] : all) {
    if (name.rfind("detail/", 0) == 0) continue;
    for (const char* banned : {"Eigen::internal", "EIGEN_ARCH_", "mmintrin.h", "immintrin.h",
                               "__builtin_ia32", "#define RETENTION_"})
      EXPECT_EQ(text.find(banned), std::string::npos) << name << " contains " << banned;
  }
}

TEST(Architecture, OnePlaceDecidesThreadCounts) {
  for (const auto& [name, text] : headers()) {
    if (name == "detail/threading.hpp") continue;
    for (const char* banned : {"#pragma omp", "omp_get_max_threads", "omp_set_num_threads",
                               "num_threads(", "std::thread"})
      EXPECT_EQ(text.find(banned), std::string::npos) << name << " contains " << banned;
  }
}

TEST(Architecture, NoConstCastOnOutputs) {
  for (const auto& [name, text] : headers())
    EXPECT_EQ(text.find("const_cast"), std::string::npos) << name;
}

}  // namespace
