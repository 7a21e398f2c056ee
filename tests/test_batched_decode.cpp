// Serving the MSR layer: batched decoding of 8 sequences at different positions against 8
// single-sequence decodes and against the naive double reference of each whole sequence
// (docs/math.md §3); sequences joining and leaving between steps; packed prefill against
// per-sequence prefill in every form; varlen_step against retention_step; no heap allocation
// after the first batched step; errors leave every state unchanged.
//
// Heap use is counted by interposing malloc and friends (support/alloc_counter.hpp), which sees
// Eigen's allocations, operator new and those of the compiled layers alike.
// retention-test-links: compiled
#include <retention/layers/msr.hpp>
#include <retention/varlen.hpp>

#include "reference/msr_reference.hpp"
#include "support/alloc_counter.hpp"
#include "support/test_support.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

namespace {

using retention::Form;
using retention::Index;
using retention::Matrix;
using retention::MsrConfig;
using retention::MsrState;
using retention::MultiScaleRetention;
using retention::Normalization;
using retention_test::expect_shape_error;
using retention_test::random_matrix;
using retention_test::relative_error;
using retention_test::spec_tolerance;

template <class T>
MultiScaleRetention<T> make_layer(Normalization norm = Normalization::decay_and_score,
                                  std::uint64_t seed = 3) {
  MsrConfig c;
  c.embed_dim = 16;
  c.value_dim = 24;
  c.heads = 4;
  c.normalization = norm;
  c.threads = 1;
  c.gammas = {0.96875, 0.75, 1.0, 0.5};
  MultiScaleRetention<T> layer(c);
  layer.init_random(seed);
  return layer;
}

/// The reference layer with the library layer's weights (read back through its accessors).
template <class T>
msr_reference::Layer reference_of(const MultiScaleRetention<T>& l) {
  msr_reference::Layer r;
  r.embed_dim = l.embed_dim();
  r.value_dim = l.value_dim();
  r.heads = l.heads();
  r.gammas = l.gammas();
  r.normalization = l.config().normalization;
  r.head_norm = l.config().head_norm;
  r.eps = l.config().eps;
  r.wq = l.q_proj().weight().template cast<double>();
  r.wk = l.k_proj().weight().template cast<double>();
  r.wv = l.v_proj().weight().template cast<double>();
  r.wg = l.g_proj().weight().template cast<double>();
  r.wo = l.out_proj().weight().template cast<double>();
  return r;
}

template <class T>
class BatchedDecode : public ::testing::Test {};
TYPED_TEST_SUITE(BatchedDecode, retention_test::ScalarTypes, retention_test::ScalarName);

TYPED_TEST(BatchedDecode, EightSequencesAtDifferentPositionsEqualSingleDecodes) {
  using T = TypeParam;
  for (Normalization norm :
       {Normalization::none, Normalization::decay, Normalization::decay_and_score}) {
    const auto layer = make_layer<T>(norm);
    const auto ref = reference_of(layer);
    const std::vector<Index> prompts{0, 1, 2, 5, 17, 3, 9, 30};
    const Index B = 8, steps = 5, d = layer.embed_dim();
    std::vector<Matrix<T>> xs;
    std::vector<MsrState<T>> batch_states, single_states;
    for (Index b = 0; b < B; ++b) {
      const Index n = prompts[static_cast<std::size_t>(b)];
      xs.push_back(random_matrix<T>(n + steps, d, 100 + static_cast<std::uint64_t>(b)));
      auto s = layer.make_state();
      if (n > 0) layer.prefill(xs.back().topRows(n), s);
      batch_states.push_back(s);
      single_states.push_back(s);
    }
    std::vector<MsrState<T>*> ptrs;
    for (auto& s : batch_states) ptrs.push_back(&s);
    typename MultiScaleRetention<T>::BatchWorkspace work;
    std::vector<Matrix<T>> got(static_cast<std::size_t>(B), Matrix<T>(steps, d));
    for (Index t = 0; t < steps; ++t) {
      Matrix<T> x(B, d), y(B, d);
      for (Index b = 0; b < B; ++b)
        x.row(b) = xs[static_cast<std::size_t>(b)].row(prompts[static_cast<std::size_t>(b)] + t);
      layer.step_batch(x, ptrs, y, work);
      for (Index b = 0; b < B; ++b) {
        const auto bs = static_cast<std::size_t>(b);
        got[bs].row(t) = y.row(b);
        const auto single = layer.step(x.row(b), single_states[bs]);
        EXPECT_LE(relative_error(y.row(b), single), spec_tolerance<T>())
            << retention::to_string(norm) << " seq " << b << " step " << t;
      }
    }
    for (Index b = 0; b < B; ++b) {
      const auto bs = static_cast<std::size_t>(b);
      EXPECT_EQ(batch_states[bs].position, prompts[bs] + steps);
      for (Index h = 0; h < layer.heads(); ++h) {
        const auto hs = static_cast<std::size_t>(h);
        EXPECT_EQ(batch_states[bs].heads[hs].position, prompts[bs] + steps);
        EXPECT_LE(relative_error(batch_states[bs].heads[hs].S, single_states[bs].heads[hs].S),
                  spec_tolerance<T>());
      }
      // Independent check: the reference over the whole sequence, last `steps` rows.
      const Matrix<double> full = msr_reference::forward(ref, xs[bs].template cast<double>());
      EXPECT_LE(relative_error(got[bs], full.bottomRows(steps)), spec_tolerance<T>())
          << retention::to_string(norm) << " seq " << b;
    }
  }
}

TYPED_TEST(BatchedDecode, SequencesJoinAndLeaveBetweenSteps) {
  using T = TypeParam;
  const auto layer = make_layer<T>();
  const Index d = layer.embed_dim();
  // Sequence i joins at step join[i] (after a prompt of prompt[i] tokens) and leaves after
  // len[i] decoded tokens.
  const std::vector<Index> join{0, 0, 2, 3, 3, 6}, len{4, 9, 1, 6, 3, 2}, prompt{3, 0, 7, 1, 12, 2};
  const std::size_t N = join.size();
  std::vector<Matrix<T>> xs;
  std::vector<MsrState<T>> states(N), singles(N);
  for (std::size_t i = 0; i < N; ++i)
    xs.push_back(random_matrix<T>(prompt[i] + len[i], d, 500 + i));
  typename MultiScaleRetention<T>::BatchWorkspace work;
  std::vector<Index> done(N, 0);
  Index batches = 0;
  for (Index step = 0; step < 12; ++step) {
    std::vector<MsrState<T>*> active;
    std::vector<std::size_t> who;
    for (std::size_t i = 0; i < N; ++i) {
      if (step == join[i]) {  // joins: prefill its prompt alone, keep a twin for single decoding
        states[i] = layer.make_state();
        if (prompt[i] > 0) layer.prefill(xs[i].topRows(prompt[i]), states[i]);
        singles[i] = states[i];
      }
      if (step >= join[i] && done[i] < len[i]) {
        active.push_back(&states[i]);
        who.push_back(i);
      }
    }
    if (active.empty()) continue;
    ++batches;
    Matrix<T> x(static_cast<Index>(active.size()), d), y(x.rows(), d);
    for (std::size_t a = 0; a < who.size(); ++a)
      x.row(static_cast<Index>(a)) = xs[who[a]].row(prompt[who[a]] + done[who[a]]);
    layer.step_batch(x, active, y, work);
    for (std::size_t a = 0; a < who.size(); ++a) {
      const std::size_t i = who[a];
      const auto single = layer.step(x.row(static_cast<Index>(a)), singles[i]);
      EXPECT_LE(relative_error(y.row(static_cast<Index>(a)), single), spec_tolerance<T>())
          << "seq " << i << " token " << done[i];
      ++done[i];
    }
  }
  EXPECT_GE(batches, 8);
  for (std::size_t i = 0; i < N; ++i) {
    EXPECT_EQ(done[i], len[i]);
    EXPECT_EQ(states[i].position, prompt[i] + len[i]);
  }
}

TYPED_TEST(BatchedDecode, PackedPrefillEqualsPerSequencePrefill) {
  using T = TypeParam;
  const auto layer = make_layer<T>();
  const Index d = layer.embed_dim();
  const std::vector<Index> lengths{1, 2, 17, 0, 300};
  std::vector<Index> cu{0};
  for (Index n : lengths) cu.push_back(cu.back() + n);
  const Matrix<T> x = random_matrix<T>(cu.back(), d, 77);
  for (Form form : {Form::parallel, Form::recurrent, Form::chunkwise}) {
    std::vector<MsrState<T>> packed(lengths.size()), alone(lengths.size());
    std::vector<MsrState<T>*> ptrs;
    for (std::size_t b = 0; b < lengths.size(); ++b) {
      packed[b] = layer.make_state();
      // Sequences start at different positions: a short earlier prompt for the odd ones.
      if (b % 2 == 1) layer.prefill(random_matrix<T>(4, d, 90 + b), packed[b]);
      alone[b] = packed[b];
      ptrs.push_back(&packed[b]);
    }
    const Matrix<T> y = layer.prefill_packed(x, cu, ptrs, form, 8);
    ASSERT_EQ(y.rows(), cu.back());
    for (std::size_t b = 0; b < lengths.size(); ++b) {
      const Index n = lengths[b];
      EXPECT_EQ(packed[b].position, alone[b].position + n);
      if (n == 0) {
        EXPECT_EQ(packed[b].heads[0].S, alone[b].heads[0].S);
        continue;
      }
      const Matrix<T> expect = layer.prefill(x.middleRows(cu[b], n), alone[b], form, 8);
      EXPECT_LE(relative_error(y.middleRows(cu[b], n), expect), spec_tolerance<T>())
          << retention::to_string(form) << " seq " << b;
      for (std::size_t h = 0; h < packed[b].heads.size(); ++h) {
        EXPECT_LE(relative_error(packed[b].heads[h].S, alone[b].heads[h].S), spec_tolerance<T>());
        EXPECT_LE(relative_error(packed[b].heads[h].z, alone[b].heads[h].z), spec_tolerance<T>());
        EXPECT_EQ(packed[b].heads[h].position, packed[b].position);
      }
    }
  }
}

TEST(BatchedDecodeKernel, VarlenStepEqualsRetentionStepPerSequence) {
  const Index B = 3, H = 2, dk = 4, dv = 5;
  const std::vector<double> gammas{0.9, 0.6};
  const auto masks = retention::causal_masks(gammas);
  for (Normalization norm : {Normalization::decay, Normalization::decay_and_score}) {
    std::vector<retention::RetentionState<double>> states, singles;
    for (Index i = 0; i < B * H; ++i) {
      retention::RetentionState<double> s(dk, dv);
      s.S = random_matrix<double>(dk, dv, 40 + static_cast<std::uint64_t>(i));
      s.z = random_matrix<double>(dk, 1, 60 + static_cast<std::uint64_t>(i));
      s.position = 7 * (i / H);  // one position per sequence
      states.push_back(s);
    }
    singles = states;
    // Pointers in an order unrelated to storage: sequence b uses states of sequence B-1-b.
    std::vector<retention::RetentionState<double>*> ptrs;
    for (Index b = 0; b < B; ++b)
      for (Index h = 0; h < H; ++h)
        ptrs.push_back(&states[static_cast<std::size_t>((B - 1 - b) * H + h)]);
    const Matrix<double> q = random_matrix<double>(B, H * dk, 1),
                         k = random_matrix<double>(B, H * dk, 2);
    const Matrix<double> v = random_matrix<double>(B, H * dv, 3);
    Matrix<double> out(B, H * dv);
    retention::varlen_step(retention::heads_view(q.data(), B, 1, H, dk),
                           retention::heads_view(k.data(), B, 1, H, dk),
                           retention::heads_view(v.data(), B, 1, H, dv),
                           retention::heads_view(out.data(), B, 1, H, dv), masks, ptrs, norm);
    for (Index b = 0; b < B; ++b)
      for (Index h = 0; h < H; ++h) {
        auto& s = singles[static_cast<std::size_t>((B - 1 - b) * H + h)];
        const auto o = retention::retention_step(
            q.block(b, h * dk, 1, dk), k.block(b, h * dk, 1, dk), v.block(b, h * dv, 1, dv),
            masks[static_cast<std::size_t>(h)], s, norm);
        EXPECT_EQ(Matrix<double>(out.block(b, h * dv, 1, dv)), Matrix<double>(o));
        EXPECT_EQ(states[static_cast<std::size_t>((B - 1 - b) * H + h)].S, s.S);
        EXPECT_EQ(states[static_cast<std::size_t>((B - 1 - b) * H + h)].position, s.position);
      }
  }
}

TEST(BatchedDecodeAlloc, NoHeapAllocationAfterTheFirstStep) {
  const auto layer = make_layer<float>();
  const Index d = layer.embed_dim();
  std::vector<MsrState<float>> states;
  for (int b = 0; b < 6; ++b) states.push_back(layer.make_state());
  std::vector<MsrState<float>*> all;
  for (auto& s : states) all.push_back(&s);
  std::vector<MsrState<float>*> some(all.begin() + 1, all.begin() + 4);
  const Matrix<float> x6 = random_matrix<float>(6, d, 8), x3 = random_matrix<float>(3, d, 9);
  const Matrix<Eigen::bfloat16> xb = x3.cast<Eigen::bfloat16>();
  Matrix<float> y6(6, d), y3(3, d);
  MultiScaleRetention<float>::BatchWorkspace work;
  layer.step_batch(x6, all, y6, work);   // sizes the workspace for 6
  layer.step_batch(xb, some, y3, work);  // and its 16-bit input rows
  const long n = alloc_counter::allocations_during([&] {
    for (int t = 0; t < 3; ++t) {
      layer.step_batch(x3, some, y3, work);  // a smaller batch reuses the larger workspace
      layer.step_batch(x6, all, y6, work);
      layer.step_batch(xb, some, y3, work);
    }
  });
  EXPECT_EQ(n, 0) << "heap allocations in step_batch";
  // The counter itself works, or the zero above would prove nothing.
  EXPECT_GT(alloc_counter::allocations_during([&] { y3 = layer.step_batch(x3, some); }), 0);
  EXPECT_TRUE(y6.allFinite());
}

TEST(BatchedDecodeErrors, ChecksLeaveEveryStateUnchanged) {
  const auto layer = make_layer<double>();
  const Index d = layer.embed_dim();
  auto a = layer.make_state(), b = layer.make_state();
  layer.prefill(random_matrix<double>(3, d, 1), a);
  const auto a0 = a;
  const Matrix<double> x2 = random_matrix<double>(2, d, 2);
  Matrix<double> y2(2, d);
  MultiScaleRetention<double>::BatchWorkspace work;
  auto expect_unchanged = [&] {
    EXPECT_EQ(a.position, a0.position);
    EXPECT_EQ(a.heads[1].S, a0.heads[1].S);
    EXPECT_EQ(b.position, 0);
  };
  expect_shape_error(
      [&] {
        layer.step_batch(x2, {&a, nullptr}, y2, work);
      },
      "MultiScaleRetention::step_batch: states[1] is null");
  expect_shape_error(
      [&] {
        layer.step_batch(x2, {&a, &a}, y2, work);
      },
      "states holds the same state twice");
  expect_shape_error(
      [&] {
        layer.step_batch(x2, {&a, &b, &b}, y2, work);
      },
      "x is [2 x 16], expected [3 x 16]");
  expect_shape_error([&] { layer.step_batch(x2, {}, y2, work); }, "states.size() must be >= 1");
  Matrix<double> y3(3, d);
  expect_shape_error(
      [&] {
        layer.step_batch(x2, {&a, &b}, y3, work);
      },
      "out is [3 x 16], expected [2 x 16]");
  auto bad = layer.make_state();
  bad.heads.pop_back();
  expect_shape_error(
      [&] {
        layer.step_batch(x2, {&a, &bad}, y2, work);
      },
      "state.heads has 3 states, expected heads = 4");
  expect_unchanged();
  const Matrix<double> x5 = random_matrix<double>(5, d, 3);
  expect_shape_error(
      [&] {
        layer.prefill_packed(x5, {0, 2, 4}, {&a, &b});
      },
      "MultiScaleRetention::prefill_packed: cu_seqlens ends at 4");
  expect_shape_error(
      [&] {
        layer.prefill_packed(x5, {0, 2, 5}, {&a});
      },
      "states has 1 entries, expected one per sequence of cu_seqlens = 2");
  expect_shape_error(
      [&] {
        layer.prefill_packed(x5, {0, 2, 5}, {&b, &b});
      },
      "states holds the same state twice");
  expect_shape_error(
      [&] {
        layer.prefill_packed(x5, {0, 2, 5}, {&a, &bad});
      },
      "state.heads has 3 states");
  expect_unchanged();
}

}  // namespace
