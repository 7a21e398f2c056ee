// The library's shape (issue: one head loop, one thread rule, nothing internal leaks to users):
// what including retention.hpp defines, what the public headers contain, and that decoding
// allocates nothing after its first step (counted by interposing malloc and friends).
// retention-test-links: compiled
#include <retention/detail/gemm.hpp>
#include <retention/retention.hpp>

#include "support/alloc_counter.hpp"
#include "support/test_support.hpp"

#include <gtest/gtest.h>

#include <array>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace {

using retention::Index;
using retention::Matrix;
using retention::RowVector;

using alloc_counter::allocations_during;
using alloc_counter::bytes_during;

/// Stores p where the program can observe it, so that no compiler elides the allocation behind it
/// (clang may drop a new/delete pair whose memory nothing else sees).
void publish(const void* p) {
  [[maybe_unused]] static const void* volatile sink = nullptr;
  sink = p;
}

TEST(Architecture, AllocationCounterSeesAllocations) {
  // The counter itself must work, or the zero below would prove nothing.
  const long n = allocations_during([] {
    std::vector<int> v(1000);
    Matrix<float> m(30, 30);
    m.setZero();
    publish(v.data());
    publish(m.data());
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

// MsrConfig::keep_buffers: MultiScaleRetention::forward keeps its fused projection and heads'
// outputs for the thread's next call (blocks above 32 MiB that glibc frees go back to the system
// and fault in again). A repeated call allocates little more than the returned output, also after
// a smaller call, and gives the same bits as the first; with keep_buffers off, buffers above 16 MiB
// are allocated on every call, with the same result.
TEST(Architecture, MsrForwardKeepsItsWorkBuffers) {
  const Index T_len = 12000, d = 64, dv = 128;  // projection buffer 12000 x 384 floats: 17.6 MiB
  const long projection_bytes = static_cast<long>(T_len * (2 * d + 2 * dv) * sizeof(float));
  const long output_bytes = static_cast<long>(T_len * d * sizeof(float));
  const Matrix<float> x = retention_test::random_matrix<float>(T_len, d, 3);
  const Matrix<float> small = retention_test::random_matrix<float>(50, d, 4);
  Matrix<float> results[2];
  for (const bool keep : {true, false}) {
    retention::MsrConfig cfg;
    cfg.embed_dim = d;
    cfg.value_dim = dv;
    cfg.heads = 2;
    cfg.threads = 1;
    cfg.keep_buffers = keep;
    retention::MultiScaleRetention<float> layer(cfg);
    layer.init_random(5);
    const Matrix<float> first = layer.forward(x);
    publish(layer.forward(small).data());  // a smaller call in between
    Matrix<float> again;
    const long bytes = bytes_during([&] { again = layer.forward(x); });
    EXPECT_EQ(again, first) << "keep_buffers " << keep;
    if (keep) {
      EXPECT_LT(bytes, output_bytes + (1 << 20)) << "a repeated call allocated " << bytes;
    } else {
      EXPECT_GT(bytes, output_bytes + projection_bytes) << "keep_buffers off allocated " << bytes;
    }
    results[keep ? 0 : 1] = first;
  }
  EXPECT_EQ(results[0], results[1]);
  EXPECT_TRUE(results[0].allFinite());
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

// The chunkwise and parallel forms, forward and backward, keep their working buffers per thread
// (detail::KeptMatrices), and the parallel form's products keep Eigen's packing buffers
// (detail::gemm_into): freed at the end of every call or product, the few hundred KiB went back to
// the system and were faulted in again on the next. A repeated call allocates less than one
// chunk buffer (C x d floats = 16 KiB here), and gives the same bits as the first, also after a
// call of another shape has resized the kept buffers.
void expect_calls_keep_their_buffers(retention::Form form) {
  const Index T = 300, d = 128, C = 32;  // chunkwise: 4 Cp <= d, so the backward keeps score
                                         // tiles too; parallel: 300 keys need heap-sized packing
  const retention::CausalDecay decay(0.97);
  const auto in = [&](Index t, Index dim, std::uint64_t seed) {
    return retention_test::random_matrix<float>(t, dim, seed);
  };
  const Matrix<float> Q = in(T, d, 1), K = in(T, d, 2), V = in(T, d, 3), G = in(T, d, 4);
  retention::RetentionState<float> init(d, d);
  init.S = in(d, d, 5);
  init.z = in(d, 1, 6).col(0).cwiseAbs();
  init.position = 7;
  retention::RetentionState<float> fgrad(d, d);
  fgrad.S = in(d, d, 8);
  struct Result {
    Matrix<float> O, dQ, dK, dV;
    retention::RetentionState<float> final_state, d_init;
  };
  const bool chunkwise = form == retention::Form::chunkwise;
  const auto call = [&](Result& r) {
    for (Matrix<float>* m : {&r.O, &r.dQ, &r.dK, &r.dV}) m->resize(T, d);
    r.final_state = retention::RetentionState<float>(d, d);
    r.d_init = retention::RetentionState<float>(d, d);
    retention::RetentionOptions<float> fo;
    fo.normalization = retention::Normalization::decay_and_score;
    fo.initial_state = &init;
    fo.final_state = &r.final_state;
    retention::RetentionBackwardOptions<float> bo;
    bo.normalization = retention::Normalization::decay_and_score;
    bo.initial_state = &init;
    bo.final_state_gradient = &fgrad;
    const long bytes = bytes_during([&] {
      if (chunkwise) {
        retention::chunkwise_retention_into(Q, K, V, decay, C, r.O, fo);
        retention::chunkwise_retention_backward_into(Q, K, V, decay, C, G, r.dQ, r.dK, r.dV, bo,
                                                     &r.d_init);
      } else {
        retention::parallel_retention_into(Q, K, V, decay, r.O, fo);
        retention::parallel_retention_backward_into(Q, K, V, decay, G, r.dQ, r.dK, r.dV, bo,
                                                    &r.d_init);
      }
    });
    return bytes;
  };
  // Another shape (narrower heads; a chunk or tile longer than the sequence) sizes the kept
  // buffers differently before each measured series.
  const Matrix<float> q2 = in(20, 8, 9), k2 = in(20, 8, 10), v2 = in(20, 4, 11), g2 = in(20, 4, 12);
  const auto other_shape = [&] {
    if (chunkwise) {
      retention::chunkwise_retention(q2, k2, v2, decay, 64);
      retention::chunkwise_retention_backward(q2, k2, v2, decay, 64, g2);
    } else {
      retention::RetentionOptions<float> fo;
      fo.tile = 64;
      retention::parallel_retention(q2, k2, v2, decay, fo);
      retention::RetentionBackwardOptions<float> bo;
      bo.tile = 64;
      retention::parallel_retention_backward(q2, k2, v2, decay, g2, bo);
    }
  };
  Result first, again, after_other;
  other_shape();
  const long first_bytes = call(first);
  const long again_bytes = call(again);
  other_shape();
  call(after_other);

  EXPECT_GT(first_bytes, 300 * 1024) << "the first call sizes the kept buffers";
  EXPECT_LT(again_bytes, 16 * 1024) << "a repeated call allocated " << again_bytes << " bytes";
  for (const Result* r : {&again, &after_other}) {
    EXPECT_EQ(r->O, first.O);
    EXPECT_EQ(r->dQ, first.dQ);
    EXPECT_EQ(r->dK, first.dK);
    EXPECT_EQ(r->dV, first.dV);
    EXPECT_EQ(r->final_state.S, first.final_state.S);
    EXPECT_EQ(r->final_state.z, first.final_state.z);
    EXPECT_EQ(r->d_init.S, first.d_init.S);
    EXPECT_EQ(r->d_init.z, first.d_init.z);
  }
  EXPECT_TRUE(first.dQ.allFinite() && first.dK.allFinite() && first.dV.allFinite());
}

TEST(Architecture, ChunkwiseCallsKeepTheirBuffers) {
  expect_calls_keep_their_buffers(retention::Form::chunkwise);
}

TEST(Architecture, ParallelCallsKeepTheirBuffers) {
  expect_calls_keep_their_buffers(retention::Form::parallel);
}

// detail::gemm_into must give Eigen's own `dst.noalias() (+)= lhs * rhs`, bit for bit, on every
// path of Eigen's dispatch (coefficient-based, matrix-vector, GEMM), every storage order and
// strided blocks, so that moving a product onto it changes no result. Both run as the library
// runs its products: with Eigen's own threading off (SerialEigenScope), since a product that
// Eigen splits over threads is blocked differently.
template <class T>
void expect_gemm_into_is_eigens_product() {
  const retention::detail::SerialEigenScope serial;
  using ColMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;
  std::uint64_t seed = 100;
  for (const auto& [m, n, k] : std::vector<std::array<Index, 3>>{{3, 4, 5},
                                                                 {1, 40, 30},
                                                                 {40, 1, 30},
                                                                 {7, 9, 0},
                                                                 {33, 65, 17},
                                                                 {128, 300, 128},
                                                                 {300, 128, 600},
                                                                 {2, 33, 64},
                                                                 {129, 257, 1}}) {
    const Matrix<T> big_a = retention_test::random_matrix<T>(m + 3, k + 5, ++seed);
    const Matrix<T> big_b = retention_test::random_matrix<T>(k + 4, n + 6, ++seed);
    const Matrix<T> bt = retention_test::random_matrix<T>(n, k, ++seed);
    const ColMatrix cm = retention_test::random_matrix<T>(m, k, ++seed);
    const Matrix<T> start = retention_test::random_matrix<T>(m, n, ++seed);
    const auto a = big_a.block(2, 3, m, k);  // a strided row-major block
    const auto b = big_b.block(1, 4, k, n);
    for (bool accumulate : {false, true}) {
      Matrix<T> want = start, got = start;
      ColMatrix want_c = start, got_c = start;
      if (accumulate) {
        want.noalias() += a * b;
        want_c.noalias() += cm * bt.transpose();
      } else {
        want.noalias() = a * b;
        want_c.noalias() = cm * bt.transpose();
      }
      retention::detail::gemm_into(got, a, b, accumulate);
      retention::detail::gemm_into(got_c, cm, bt.transpose(), accumulate);
      EXPECT_EQ(got, want) << m << " x " << n << " x " << k << " accumulate " << accumulate;
      EXPECT_EQ(got_c, want_c) << m << " x " << n << " x " << k << " accumulate " << accumulate;
      // Into a block of a larger destination (Eigen's coefficient-based products round by the
      // destination's alignment, so the reference is a block at the same place), whose other
      // entries stay as they were.
      Matrix<T> frame = Matrix<T>::Constant(m + 2, n + 3, T(7));
      frame.block(1, 2, m, n) = start;
      Matrix<T> want_frame = frame;
      if (accumulate)
        want_frame.block(1, 2, m, n).noalias() += a * b;
      else
        want_frame.block(1, 2, m, n).noalias() = a * b;
      retention::detail::gemm_into(frame.block(1, 2, m, n), a, b, accumulate);
      EXPECT_EQ(frame, want_frame) << m << " x " << n << " x " << k;
      EXPECT_EQ(frame.col(0), Matrix<T>::Constant(m + 2, 1, T(7)));
      EXPECT_EQ(frame.row(m + 1), Matrix<T>::Constant(1, n + 3, T(7)));
    }
  }
}

TEST(Architecture, GemmIntoIsEigensProductBitForBit) {
  expect_gemm_into_is_eigens_product<float>();
  expect_gemm_into_is_eigens_product<double>();
  // Operands that Eigen's GEMM cannot take as they are (an expression, fixed sizes) keep Eigen's
  // own product.
  const retention::detail::SerialEigenScope serial;
  const Matrix<float> a = retention_test::random_matrix<float>(40, 30, 201);
  const Matrix<float> b = retention_test::random_matrix<float>(30, 50, 202);
  Matrix<float> want(40, 50), got(40, 50);
  want.noalias() = (a.array() * 2.0f).matrix() * b;
  retention::detail::gemm_into(got, (a.array() * 2.0f).matrix(), b);
  EXPECT_EQ(got, want);
  const Eigen::Matrix<float, 8, 8> f8 = Eigen::Matrix<float, 8, 8>::Random();
  Eigen::Matrix<float, 8, 8> want8, got8;
  want8.noalias() = f8 * f8.transpose();
  retention::detail::gemm_into(got8, f8, f8.transpose());
  EXPECT_EQ(got8, want8);
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
