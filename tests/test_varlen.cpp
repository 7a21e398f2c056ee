// retention-test-links: compiled
// Packed variable-length retention (cu_seqlens) and the padded-batch paths (lengths, mask): every
// sequence's rows and final states against the naive double reference of each sequence alone
// (docs/math.md §2), in every form and normalisation, lengths {1, 2, 17, 300} mixed, with initial
// states; against the same form run on each sequence alone (identical); empty sequences; errors.
#include <retention/varlen.hpp>

#include "reference/retention_reference.hpp"
#include "support/state_support.hpp"
#include "support/test_support.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

namespace {

using retention::CausalDecay;
using retention::Form;
using retention::HeadsView;
using retention::Index;
using retention::Matrix;
using retention::Normalization;
using retention::RetentionState;
using retention::VarlenOptions;
using retention_test::expect_shape_error;
using retention_test::random_matrix;
using retention_test::relative_error;
using retention_test::spec_tolerance;
namespace ref = retention_reference;

template <class T>
class VarlenTest : public ::testing::Test {};
TYPED_TEST_SUITE(VarlenTest, retention_test::ScalarTypes, retention_test::ScalarName);

/// A packed problem: q, k [total, H*dk], v [total, H*dv] (row-major [total, H, D]), offsets,
/// random initial states (B*H) at random positions.
template <class T>
struct Packed {
  Index H, dk, dv, total;
  std::vector<Index> cu;
  Matrix<T> q, k, v;
  std::vector<double> gammas;
  std::vector<RetentionState<T>> init;
  std::vector<ref::State> init_ref;
};

template <class T>
Packed<T> make_packed(const std::vector<Index>& lengths, Index H, Index dk, Index dv,
                      std::uint64_t seed) {
  Packed<T> p;
  p.H = H, p.dk = dk, p.dv = dv;
  p.cu = {0};
  for (Index n : lengths) p.cu.push_back(p.cu.back() + n);
  p.total = p.cu.back();
  p.q = random_matrix<T>(p.total, H * dk, seed);
  p.k = random_matrix<T>(p.total, H * dk, seed + 1, 0.5);
  p.v = random_matrix<T>(p.total, H * dv, seed + 2);
  p.gammas = {0.96875, 0.5, 1.0};
  p.gammas.resize(static_cast<std::size_t>(H), 0.9);
  const Index B = static_cast<Index>(lengths.size());
  for (Index i = 0; i < B * H; ++i) {
    ref::State s;
    s.S = random_matrix<double>(dk, dv, seed + 10 + static_cast<std::uint64_t>(i))
              .template cast<T>()
              .template cast<double>();
    s.z = random_matrix<double>(dk, 1, seed + 100 + static_cast<std::uint64_t>(i))
              .template cast<T>()
              .template cast<double>();
    s.position = 3 * i + 1;
    p.init_ref.push_back(s);
    p.init.push_back(retention_test::to_state<T>(s));
  }
  return p;
}

template <class T>
HeadsView<const T> packed_view(const Matrix<T>& m, Index H, Index D) {
  return retention::heads_view(m.data(), 1, m.rows(), H, D);
}

TYPED_TEST(VarlenTest, PackedEqualsEachSequenceAloneInEveryForm) {
  using T = TypeParam;
  const std::vector<Index> lengths{17, 1, 300, 2};
  const Index H = 3, dk = 6, dv = 5;
  const auto p = make_packed<T>(lengths, H, dk, dv, 7);
  const auto masks = retention::causal_masks(p.gammas);
  for (Form form : {Form::parallel, Form::recurrent, Form::chunkwise})
    for (Normalization norm :
         {Normalization::none, Normalization::decay, Normalization::decay_and_score}) {
      Matrix<T> out(p.total, H * dv);
      std::vector<RetentionState<T>> finals;
      VarlenOptions<T> opt;
      opt.form = form;
      opt.chunk = 16;
      opt.normalization = norm;
      opt.initial_states = &p.init;
      opt.final_states = &finals;
      retention::varlen_retention(
          packed_view(p.q, H, dk), packed_view(p.k, H, dk), packed_view(p.v, H, dv),
          retention::heads_view(out.data(), 1, p.total, H, dv), p.cu, masks, opt);
      ASSERT_EQ(finals.size(), lengths.size() * 3u);
      for (std::size_t b = 0; b < lengths.size(); ++b)
        for (Index h = 0; h < H; ++h) {
          const Index r0 = p.cu[b], n = lengths[b];
          const auto pair = static_cast<std::size_t>(static_cast<Index>(b) * H + h);
          const Matrix<double> Q = p.q.block(r0, h * dk, n, dk).template cast<double>();
          const Matrix<double> K = p.k.block(r0, h * dk, n, dk).template cast<double>();
          const Matrix<double> V = p.v.block(r0, h * dv, n, dv).template cast<double>();
          ref::State fin;
          const Matrix<double> expect = ref::retention(
              Q, K, V, p.gammas[static_cast<std::size_t>(h)], norm, &p.init_ref[pair], &fin);
          const std::string where = std::string(retention::to_string(form)) + " " +
                                    retention::to_string(norm) + " seq " + std::to_string(b) +
                                    " head " + std::to_string(h);
          EXPECT_LE(relative_error(out.block(r0, h * dv, n, dv), expect), spec_tolerance<T>())
              << where;
          EXPECT_LE(relative_error(finals[pair].S, fin.S), spec_tolerance<T>()) << where;
          EXPECT_LE(relative_error(finals[pair].z, fin.z), spec_tolerance<T>()) << where;
          EXPECT_EQ(finals[pair].position, fin.position) << where;

          // The same form on the sequence alone computes the same thing in the same order.
          retention::RetentionOptions<T> one;
          one.normalization = norm;
          one.initial_state = &p.init[pair];
          Matrix<T> alone(n, dv);
          const auto q1 = p.q.block(r0, h * dk, n, dk), k1 = p.k.block(r0, h * dk, n, dk);
          const auto v1 = p.v.block(r0, h * dv, n, dv);
          if (form == Form::parallel)
            retention::parallel_retention_into(q1, k1, v1, masks[static_cast<std::size_t>(h)],
                                               alone, one);
          else if (form == Form::recurrent)
            retention::recurrent_retention_into(q1, k1, v1, masks[static_cast<std::size_t>(h)],
                                                alone, one);
          else
            retention::chunkwise_retention_into(q1, k1, v1, masks[static_cast<std::size_t>(h)], 16,
                                                alone, one);
          EXPECT_EQ(Matrix<T>(out.block(r0, h * dv, n, dv)), alone) << where;
        }
    }
}

TYPED_TEST(VarlenTest, EmptySequencesPassTheirStateThrough) {
  using T = TypeParam;
  const std::vector<Index> lengths{0, 5, 0};
  const Index H = 2, dk = 4, dv = 3;
  const auto p = make_packed<T>(lengths, H, dk, dv, 31);
  const auto masks = retention::causal_masks(p.gammas);
  Matrix<T> out(p.total, H * dv);
  // Final states written over the initial ones (the documented in-place use).
  std::vector<RetentionState<T>> states = p.init;
  VarlenOptions<T> opt;
  opt.normalization = Normalization::decay;
  opt.initial_states = &states;
  opt.final_states = &states;
  retention::varlen_retention(
      packed_view(p.q, H, dk), packed_view(p.k, H, dk), packed_view(p.v, H, dv),
      retention::heads_view(out.data(), 1, p.total, H, dv), p.cu, masks, opt);
  for (Index h = 0; h < H; ++h) {
    for (Index b : {0, 2}) {
      const auto i = static_cast<std::size_t>(b * H + h);
      EXPECT_EQ(states[i].S, p.init[i].S);
      EXPECT_EQ(states[i].z, p.init[i].z);
      EXPECT_EQ(states[i].position, p.init[i].position);
    }
    const auto i = static_cast<std::size_t>(H + h);
    ref::State fin;
    const Matrix<double> expect = ref::retention(
        p.q.block(0, h * dk, 5, dk).template cast<double>(),
        p.k.block(0, h * dk, 5, dk).template cast<double>(),
        p.v.block(0, h * dv, 5, dv).template cast<double>(), p.gammas[static_cast<std::size_t>(h)],
        Normalization::decay, &p.init_ref[i], &fin);
    EXPECT_LE(relative_error(out.middleCols(h * dv, dv), expect), spec_tolerance<T>());
    EXPECT_LE(relative_error(states[i].S, fin.S), spec_tolerance<T>());
    EXPECT_EQ(states[i].position, p.init[i].position + 5);
  }
}

/// A right- or left-padded copy of a packed problem: [B, Tmax, H, D] with garbage in the padding.
template <class T>
Matrix<T> pad(const Matrix<T>& packed, const std::vector<Index>& cu, Index Tmax,
              const std::vector<Index>& starts) {
  const Index B = static_cast<Index>(cu.size()) - 1;
  Matrix<T> out = random_matrix<T>(B * Tmax, packed.cols(), 999, 50.0);  // padding: large junk
  for (Index b = 0; b < B; ++b) {
    const auto bs = static_cast<std::size_t>(b);
    const Index n = cu[bs + 1] - cu[bs];
    out.middleRows(b * Tmax + starts[bs], n) = packed.middleRows(cu[bs], n);
  }
  return out;
}

TYPED_TEST(VarlenTest, PaddedByLengthsOrMaskEqualsUnpadded) {
  using T = TypeParam;
  const std::vector<Index> lengths{2, 17, 1, 0, 9};
  const Index H = 2, dk = 4, dv = 6, Tmax = 19, B = static_cast<Index>(lengths.size());
  const auto p = make_packed<T>(lengths, H, dk, dv, 55);
  const auto masks = retention::causal_masks(p.gammas);
  for (Form form : {Form::parallel, Form::recurrent, Form::chunkwise}) {
    VarlenOptions<T> opt;
    opt.form = form;
    opt.chunk = 4;
    opt.normalization = Normalization::decay_and_score;
    opt.initial_states = &p.init;
    std::vector<RetentionState<T>> fin_packed, fin_right, fin_left;
    Matrix<T> packed_out(p.total, H * dv);
    opt.final_states = &fin_packed;
    retention::varlen_retention(
        packed_view(p.q, H, dk), packed_view(p.k, H, dk), packed_view(p.v, H, dv),
        retention::heads_view(packed_out.data(), 1, p.total, H, dv), p.cu, masks, opt);
    for (bool left : {false, true}) {
      std::vector<Index> starts(lengths.size(), 0);
      Matrix<double> valid = Matrix<double>::Zero(B, Tmax);
      for (std::size_t b = 0; b < lengths.size(); ++b) {
        if (left) starts[b] = Tmax - lengths[b] - static_cast<Index>(b % 2);
        valid.row(static_cast<Index>(b)).segment(starts[b], lengths[b]).setOnes();
      }
      const Matrix<T> q = pad(p.q, p.cu, Tmax, starts), k = pad(p.k, p.cu, Tmax, starts);
      const Matrix<T> v = pad(p.v, p.cu, Tmax, starts);
      Matrix<T> out = Matrix<T>::Constant(B * Tmax, H * dv, T(7));
      auto& finals = left ? fin_left : fin_right;
      opt.final_states = &finals;
      const auto qv = retention::heads_view(q.data(), B, Tmax, H, dk);
      const auto kv = retention::heads_view(k.data(), B, Tmax, H, dk);
      const auto vv = retention::heads_view(v.data(), B, Tmax, H, dv);
      const auto ov = retention::heads_view(out.data(), B, Tmax, H, dv);
      if (left)
        retention::padded_retention(qv, kv, vv, ov, valid, masks, opt);
      else
        retention::padded_retention(qv, kv, vv, ov, lengths, masks, opt);
      for (Index b = 0; b < B; ++b) {
        const auto bs = static_cast<std::size_t>(b);
        const Index n = lengths[bs], s = starts[bs];
        EXPECT_EQ(Matrix<T>(out.middleRows(b * Tmax + s, n)),
                  Matrix<T>(packed_out.middleRows(p.cu[bs], n)))
            << "seq " << b << (left ? " left" : " right");
        EXPECT_TRUE(out.middleRows(b * Tmax, s).isZero(0));
        EXPECT_TRUE(out.middleRows(b * Tmax + s + n, Tmax - s - n).isZero(0));
      }
      ASSERT_EQ(finals.size(), fin_packed.size());
      for (std::size_t i = 0; i < finals.size(); ++i) {
        EXPECT_EQ(finals[i].S, fin_packed[i].S);
        EXPECT_EQ(finals[i].z, fin_packed[i].z);
        EXPECT_EQ(finals[i].position, fin_packed[i].position);
      }
    }
  }
}

TEST(VarlenErrors, OffsetsViewsAndMasks) {
  const Index H = 2, D = 4;
  Matrix<double> q = random_matrix<double>(6, H * D, 1), out(6, H * D);
  const auto qv = retention::heads_view(q.data(), 1, 6, H, D).as_const();
  const auto ov = retention::heads_view(out.data(), 1, 6, H, D);
  const auto masks = retention::causal_masks({0.9, 0.8});
  auto run = [&](const std::vector<Index>& cu) {
    retention::varlen_retention(qv, qv, qv, ov, cu, masks);
  };
  run({0, 2, 6});
  expect_shape_error([&] { run({0}); }, "varlen_retention: cu_seqlens has 1 entries");
  expect_shape_error([&] { run({1, 6}); }, "cu_seqlens[0] is 1, expected 0");
  expect_shape_error([&] { run({0, 4, 3, 6}); }, "cu_seqlens decreases at entry 2 (4 -> 3)");
  expect_shape_error(
      [&] {
        run({0, 2, 5});
      },
      "cu_seqlens ends at 5, expected the packed token count 6");
  expect_shape_error(
      [&] {
        retention::varlen_retention(qv, qv, qv, ov, {0, 6}, retention::causal_masks({0.9}));
      },
      "masks has 1 entries, expected heads = 2");
  const auto q2 = retention::heads_view(q.data(), 2, 3, H, D).as_const();
  const auto o2 = retention::heads_view(out.data(), 2, 3, H, D);
  expect_shape_error(
      [&] {
        retention::varlen_retention(q2, q2, q2, o2, {0, 6}, masks);
      },
      "q has batch 2, expected 1");
  std::vector<RetentionState<double>> few(3, RetentionState<double>(D, D));
  retention::VarlenOptions<double> opt;
  opt.initial_states = &few;
  expect_shape_error(
      [&] {
        retention::varlen_retention(qv, qv, qv, ov, {0, 6}, masks, opt);
      },
      "initial_states has 3 states, expected batch * heads = 2");
  const auto in_place = retention::heads_view(q.data(), 1, 6, H, D);
  expect_shape_error(
      [&] {
        retention::varlen_retention(qv, qv, qv, in_place, {0, 6}, masks);
      },
      "out overlaps q");
  expect_shape_error(
      [&] {
        retention::padded_retention(q2, q2, q2, o2, std::vector<Index>{3, 4}, masks);
      },
      "padded_retention: lengths[1] is 4, expected a length in [0, 3]");
  expect_shape_error(
      [&] { retention::padded_retention(q2, q2, q2, o2, std::vector<Index>{3}, masks); },
      "lengths has 1 entries, expected batch = 2");
  Matrix<int> holes(2, 3);
  holes << 1, 0, 1, 1, 1, 1;
  expect_shape_error([&] { retention::padded_retention(q2, q2, q2, o2, holes, masks); },
                     "valid row 0 has padding between real tokens");
  expect_shape_error(
      [&] { retention::padded_retention(q2, q2, q2, o2, Matrix<int>::Ones(2, 2), masks); },
      "valid is [2 x 2], expected [2 x 3]");
}

}  // namespace
