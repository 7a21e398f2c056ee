// retention-test-links: compiled
// Gradients of retention (SPEC 7), beyond one call of one head: a sequence split into two segments
// with the state handed over back-propagates like one call (every pair of forms); the multi-head
// backward over [B, T, H, D] views equals per-head calls and does not depend on the thread count;
// every shape error of the backward entry points.
#include <retention/backward.hpp>
#include <retention/parallel.hpp>

#include "reference/backward_reference.hpp"
#include "reference/retention_reference.hpp"
#include "support/state_support.hpp"
#include "support/test_support.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace {

namespace ref = retention_reference;
using retention::CausalDecay;
using retention::Form;
using retention::HeadsView;
using retention::Index;
using retention::Matrix;
using retention::MultiHeadBackwardOptions;
using retention::Normalization;
using retention::RetentionBackwardOptions;
using retention::RetentionGradients;
using retention::RetentionOptions;
using retention::RetentionState;
using retention_test::random_matrix;
using retention_test::relative_error;
using retention_test::ScalarName;
using retention_test::spec_tolerance;
using retention_test::to_state;
using Mat = Matrix<double>;

const Form kForms[] = {Form::parallel, Form::recurrent, Form::chunkwise};

/// One causal mask per head.
std::vector<CausalDecay> masks(const std::vector<double>& gammas) {
  std::vector<CausalDecay> m;
  for (double g : gammas) m.emplace_back(g);
  return m;
}

/// One form's backward of one head, chunk 6 / tile 5 so that the segments have several blocks.
template <class T, class S>
RetentionGradients<T, S> backward(Form form, const Matrix<T>& Q, const Matrix<T>& K,
                                  const Matrix<T>& V, const CausalDecay& decay, const Matrix<T>& G,
                                  RetentionBackwardOptions<S> opt) {
  switch (form) {
    case Form::parallel:
      opt.tile = 5;
      return retention::parallel_retention_backward(Q, K, V, decay, G, opt);
    case Form::recurrent:
      return retention::recurrent_retention_backward(Q, K, V, decay, G, opt);
    case Form::chunkwise:
      break;
  }
  return retention::chunkwise_retention_backward(Q, K, V, decay, 6, G, opt);
}

// ---------------------------------------------------------------------------------------------
// Two segments: forward segment 1 to its final state; back-propagate segment 2 from that state
// with its part of dO (and the final-state gradient of the whole); its d_initial_state is segment
// 1's final-state gradient. The pieces must equal the one-call gradients of the reference.
// ---------------------------------------------------------------------------------------------

template <class T>
class BackwardSegments : public ::testing::Test {};
TYPED_TEST_SUITE(BackwardSegments, retention_test::ScalarTypes, ScalarName);

TYPED_TEST(BackwardSegments, TwoSegmentsWithStateHandOffEqualOneCall) {
  using T = TypeParam;
  const Index len = 40, split = 17, dk = 5, dv = 4;
  const double s = std::sqrt(3.0 / std::sqrt(static_cast<double>(dk)));
  const Mat Q0 = random_matrix<float>(len, dk, 11, s).cast<double>();
  const Mat K = random_matrix<float>(len, dk, 12, s).cast<double>();
  const Mat V = random_matrix<float>(len, dv, 13).cast<double>();
  const Mat G = random_matrix<float>(len, dv, 14).cast<double>();
  ref::State init, fgrad;
  init.S = random_matrix<float>(dk, dv, 15, 2 * s).cast<double>();
  init.z = random_matrix<float>(dk, 1, 16, 2 * s).cast<double>();
  init.position = 9;
  fgrad.S = random_matrix<float>(dk, dv, 17).cast<double>();
  fgrad.z = random_matrix<float>(dk, 1, 18).cast<double>();
  const double tol = spec_tolerance<T>();
  double worst = 0.0;
  for (double gamma : {0.9, 1.0})
    for (int variant = 0; variant < 4; ++variant) {
      const bool with_init = variant % 2 == 1, with_fgrad = variant / 2 == 1;
      const ref::State* ip = with_init ? &init : nullptr;
      const Mat Q = ref::keep_scores_off_kink(Q0, K, V, gamma, ip).cast<float>().cast<double>();
      for (Normalization norm :
           {Normalization::none, Normalization::decay, Normalization::decay_and_score})
        for (bool detach : {false, true}) {
          if (detach && norm != Normalization::decay_and_score) continue;
          const ref::Gradients want = ref::retention_backward(
              Q, K, V, gamma, norm, ip, G, with_fgrad ? &fgrad : nullptr, detach);
          const double dz_scale =
              norm == Normalization::decay_and_score && !detach
                  ? ref::dz_init_term_scale(Q, K, V, G, gamma, ip, with_fgrad ? &fgrad : nullptr)
                  : 0.0;
          const Matrix<T> Qt = Q.cast<T>(), Kt = K.cast<T>(), Vt = V.cast<T>(), Gt = G.cast<T>();
          const RetentionState<T> init_t = to_state<T>(init), fgrad_t = to_state<T>(fgrad);
          const CausalDecay decay(gamma);
          // Segment 1 forward, to the state handed over.
          RetentionState<T> mid;
          RetentionOptions<T> fo;
          fo.normalization = norm;
          fo.initial_state = with_init ? &init_t : nullptr;
          fo.final_state = &mid;
          retention::parallel_retention(Qt.topRows(split), Kt.topRows(split), Vt.topRows(split),
                                        decay, fo);
          for (Form f1 : kForms)
            for (Form f2 : kForms) {
              const std::string label = std::string("gamma ") + std::to_string(gamma) +
                                        " variant " + std::to_string(variant) + " norm " +
                                        retention::to_string(norm) + (detach ? " detached " : " ") +
                                        retention::to_string(f1) + "+" + retention::to_string(f2);
              RetentionBackwardOptions<T> o2;
              o2.normalization = norm;
              o2.detach_score_normalizer = detach;
              o2.initial_state = &mid;
              o2.final_state_gradient = with_fgrad ? &fgrad_t : nullptr;
              const Index rest = len - split;
              const auto g2 = backward<T>(
                  f2, Matrix<T>(Qt.bottomRows(rest)), Matrix<T>(Kt.bottomRows(rest)),
                  Matrix<T>(Vt.bottomRows(rest)), decay, Matrix<T>(Gt.bottomRows(rest)), o2);
              ASSERT_EQ(g2.d_initial_state.S.rows(), dk) << label;
              RetentionBackwardOptions<T> o1 = o2;
              o1.initial_state = with_init ? &init_t : nullptr;
              o1.final_state_gradient = &g2.d_initial_state;
              const auto g1 = backward<T>(
                  f1, Matrix<T>(Qt.topRows(split)), Matrix<T>(Kt.topRows(split)),
                  Matrix<T>(Vt.topRows(split)), decay, Matrix<T>(Gt.topRows(split)), o1);
              Mat dQ(len, dk), dK(len, dk), dV(len, dv);
              dQ << g1.dQ.template cast<double>(), g2.dQ.template cast<double>();
              dK << g1.dK.template cast<double>(), g2.dK.template cast<double>();
              dV << g1.dV.template cast<double>(), g2.dV.template cast<double>();
              const double e = std::max({relative_error(dQ, want.dQ), relative_error(dK, want.dK),
                                         relative_error(dV, want.dV)});
              EXPECT_LE(e, tol) << label;
              worst = std::max(worst, e);
              if (with_init) {
                EXPECT_LE(relative_error(g1.d_initial_state.S, want.dS0), tol) << label;
                // dz_init relative to the size of its terms (ref::dz_init_term_scale); absolute
                // where it is zero (no score path, no final-state gradient).
                const double dz_err =
                    (g1.d_initial_state.z.template cast<double>() - want.dz0).norm();
                const double dz_den = std::max(want.dz0.norm(), dz_scale);
                const double ez = dz_den > 0.0 ? dz_err / dz_den : dz_err;
                EXPECT_LE(ez, tol) << label;
                EXPECT_EQ(g1.d_initial_state.position, init.position) << label;
              } else {
                EXPECT_EQ(g1.d_initial_state.S.size(), 0) << label;
              }
              if (this->HasFailure()) return;
            }
        }
    }
  std::cout << "[segments] worst relative error " << worst << "\n";
}

// ---------------------------------------------------------------------------------------------
// Multi-head backward.
// ---------------------------------------------------------------------------------------------

/// q, k, v and d_out as views into one fused [B, T, H*dk | H*dk | H*dv | H*dv] buffer (a time
/// stride wider than H D), gradients into a plain [B, T, H, D] layout each.
template <class T>
struct HeadBuffers {
  Index B, len, H, dk, dv, width;
  Matrix<T> fused;  // [B * T, width]
  Matrix<T> dq, dkb, dvb;
  HeadBuffers(Index b, Index t, Index h, Index k, Index v, std::uint64_t seed, double s)
      : B(b), len(t), H(h), dk(k), dv(v), width(2 * h * k + 2 * h * v) {
    fused = random_matrix<T>(B * len, width, seed, s);
    dq = Matrix<T>::Constant(B * len * H, dk, T(7));
    dkb = Matrix<T>::Constant(B * len * H, dk, T(7));
    dvb = Matrix<T>::Constant(B * len * H, dv, T(7));
  }
  HeadsView<const T> view(Index offset, Index dim) const {
    return {fused.data() + offset, B, len, H, dim, len * width, width, dim};
  }
  HeadsView<const T> q() const { return view(0, dk); }
  HeadsView<const T> k() const { return view(H * dk, dk); }
  HeadsView<const T> v() const { return view(2 * H * dk, dv); }
  HeadsView<const T> g() const { return view(2 * H * dk + H * dv, dv); }
  HeadsView<T> out(Matrix<T>& m, Index dim) {
    return retention::heads_view(m.data(), B, len, H, dim);
  }
};

template <class T>
Matrix<T> slice(const HeadsView<const T>& v, Index b, Index h) {
  return v.head(b, h);
}

template <class T>
std::vector<RetentionState<T>> random_states(Index n, Index dk, Index dv, std::uint64_t seed,
                                             Index position) {
  std::vector<RetentionState<T>> st;
  for (Index i = 0; i < n; ++i) {
    RetentionState<T> x(dk, dv);
    x.S = random_matrix<T>(dk, dv, seed + 2 * static_cast<std::uint64_t>(i));
    x.z = random_matrix<T>(dk, 1, seed + 2 * static_cast<std::uint64_t>(i) + 1);
    x.position = position + i;
    st.push_back(x);
  }
  return st;
}

template <class T>
class BackwardMultiHead : public ::testing::Test {};
TYPED_TEST_SUITE(BackwardMultiHead, retention_test::ScalarTypes, ScalarName);

TYPED_TEST(BackwardMultiHead, EqualsPerHeadCalls) {
  using T = TypeParam;
  HeadBuffers<T> buf(2, 37, 3, 5, 4, 21, 1.1);
  const std::vector<double> gammas = {0.5, 0.96875, 1.0};
  const Index pairs = buf.B * buf.H;
  const auto init = random_states<T>(pairs, buf.dk, buf.dv, 300, 5);
  const auto fgrad = random_states<T>(pairs, buf.dk, buf.dv, 400, 0);
  for (Form form : kForms)
    for (Normalization norm : {Normalization::none, Normalization::decay_and_score}) {
      std::vector<RetentionState<T>> dinit;
      MultiHeadBackwardOptions<T> opt;
      opt.form = form;
      opt.chunk = 8;
      opt.tile = 16;
      opt.normalization = norm;
      opt.initial_states = &init;
      opt.final_state_gradients = &fgrad;
      opt.initial_state_gradients = &dinit;
      opt.threads = 1;
      retention::multi_head_retention_backward(buf.q(), buf.k(), buf.v(), buf.g(),
                                               buf.out(buf.dq, buf.dk), buf.out(buf.dkb, buf.dk),
                                               buf.out(buf.dvb, buf.dv), masks(gammas), opt);
      ASSERT_EQ(static_cast<Index>(dinit.size()), pairs);
      const auto dq = retention::heads_view<const T>(buf.dq.data(), buf.B, buf.len, buf.H, buf.dk);
      const auto dkv =
          retention::heads_view<const T>(buf.dkb.data(), buf.B, buf.len, buf.H, buf.dk);
      const auto dvv =
          retention::heads_view<const T>(buf.dvb.data(), buf.B, buf.len, buf.H, buf.dv);
      for (Index b = 0; b < buf.B; ++b)
        for (Index h = 0; h < buf.H; ++h) {
          const Index pair = b * buf.H + h;
          RetentionBackwardOptions<T> o;
          o.normalization = norm;
          o.initial_state = &init[static_cast<std::size_t>(pair)];
          o.final_state_gradient = &fgrad[static_cast<std::size_t>(pair)];
          o.tile = 16;
          const CausalDecay decay(gammas[static_cast<std::size_t>(h)]);
          const Matrix<T> Q = slice(buf.q(), b, h), K = slice(buf.k(), b, h),
                          V = slice(buf.v(), b, h), G = slice(buf.g(), b, h);
          RetentionGradients<T> want;
          switch (form) {
            case Form::parallel:
              want = retention::parallel_retention_backward(Q, K, V, decay, G, o);
              break;
            case Form::recurrent:
              want = retention::recurrent_retention_backward(Q, K, V, decay, G, o);
              break;
            case Form::chunkwise:
              want = retention::chunkwise_retention_backward(Q, K, V, decay, 8, G, o);
              break;
          }
          const std::string label = std::string(retention::to_string(form)) + " " +
                                    retention::to_string(norm) + " pair " + std::to_string(pair);
          // Same code on strided views of the buffers: equal to rounding of the products.
          const double tol = sizeof(T) == sizeof(double) ? 1e-14 : 1e-6;
          EXPECT_LE(relative_error(slice(dq, b, h), want.dQ), tol) << label;
          EXPECT_LE(relative_error(slice(dkv, b, h), want.dK), tol) << label;
          EXPECT_LE(relative_error(slice(dvv, b, h), want.dV), tol) << label;
          const auto& di = dinit[static_cast<std::size_t>(pair)];
          EXPECT_LE(relative_error(di.S, want.d_initial_state.S), tol) << label;
          EXPECT_LE(relative_error(di.z, want.d_initial_state.z), tol) << label;
        }
    }
}

// The threaded path (2 threads over 8 pairs, enough work for a team of 2) equals one thread
// bit for bit: each pair runs the same single-threaded code.
TYPED_TEST(BackwardMultiHead, ThreadCountDoesNotChangeTheResult) {
  using T = TypeParam;
  HeadBuffers<T> one(2, 300, 4, 32, 32, 51, 0.5), two(2, 300, 4, 32, 32, 51, 0.5);
  const std::vector<double> gammas = retention::retnet_gammas(4);
  for (Form form : kForms) {
    MultiHeadBackwardOptions<T> opt;
    opt.form = form;
    opt.normalization = Normalization::decay_and_score;
    opt.threads = 1;
    retention::multi_head_retention_backward(one.q(), one.k(), one.v(), one.g(),
                                             one.out(one.dq, 32), one.out(one.dkb, 32),
                                             one.out(one.dvb, 32), masks(gammas), opt);
    opt.threads = 2;
    retention::multi_head_retention_backward(two.q(), two.k(), two.v(), two.g(),
                                             two.out(two.dq, 32), two.out(two.dkb, 32),
                                             two.out(two.dvb, 32), masks(gammas), opt);
    EXPECT_TRUE(one.dq == two.dq) << retention::to_string(form);
    EXPECT_TRUE(one.dkb == two.dkb) << retention::to_string(form);
    EXPECT_TRUE(one.dvb == two.dvb) << retention::to_string(form);
    EXPECT_TRUE(one.dq.allFinite() && (one.dq.array() != T(7)).any());
  }
}

// Float inputs with a double state (the SPEC 1 wider accumulator), as per-head calls.
// The parallel forms copy a head's rows out of a wider buffer when many blocks read them (T above
// two tiles): a head of [1, T, 3, d] gives the bytes of the same head stored alone in the forward
// and the same gradients to rounding, with states, every normalisation, gammas up to 1; and both
// match the naive double reference. T = 70 with tile 8 takes the copies, tile 64 does not.
TYPED_TEST(BackwardMultiHead, ParallelFormsOnStridedRowsEqualContiguousOnes) {
  using T = TypeParam;
  using Strided = Eigen::Map<const Matrix<T>, 0, Eigen::OuterStride<>>;
  using StridedOut = Eigen::Map<Matrix<T>, 0, Eigen::OuterStride<>>;
  const Index len = 70, H = 3, dk = 5, dv = 4, width = H * std::max(dk, dv);
  const Matrix<T> q = random_matrix<T>(len, width, 71, 1.2),
                  k = random_matrix<T>(len, width, 72, 1.2);
  const Matrix<T> v = random_matrix<T>(len, width, 73), g = random_matrix<T>(len, width, 74);
  ref::State init_d, fgrad_d;
  init_d.S = random_matrix<double>(dk, dv, 75);
  init_d.z = random_matrix<double>(dk, 1, 76);
  init_d.position = 9;
  fgrad_d.S = random_matrix<double>(dk, dv, 77);
  fgrad_d.z = random_matrix<double>(dk, 1, 78);
  const RetentionState<T> init = to_state<T>(init_d), fgrad = to_state<T>(fgrad_d);
  const Index h = 1;  // a middle head: rows start inside the buffer's rows
  for (const double gamma : {0.5, 0.96875, 1.0}) {
    // The head's queries kept off the score normaliser's kink |r_n| = 1, where the derivative is
    // not defined (ref::keep_scores_off_kink), written back into the buffer.
    Matrix<T> qg = q;
    qg.middleCols(h * dk, dk) =
        ref::keep_scores_off_kink(q.middleCols(h * dk, dk).template cast<double>(),
                                  k.middleCols(h * dk, dk).template cast<double>(),
                                  v.middleCols(h * dv, dv).template cast<double>(), gamma, &init_d)
            .template cast<T>();
    for (Normalization norm :
         {Normalization::none, Normalization::decay, Normalization::decay_and_score})
      for (const Index tile : {Index(8), Index(64)}) {
        const Strided Q(qg.data() + h * dk, len, dk, Eigen::OuterStride<>(width));
        const Strided K(k.data() + h * dk, len, dk, Eigen::OuterStride<>(width));
        const Strided V(v.data() + h * dv, len, dv, Eigen::OuterStride<>(width));
        const Strided G(g.data() + h * dv, len, dv, Eigen::OuterStride<>(width));
        const Matrix<T> Qc = Q, Kc = K, Vc = V, Gc = G;
        const CausalDecay decay(gamma);
        const std::string label = "gamma " + std::to_string(gamma) + " " +
                                  retention::to_string(norm) + " tile " + std::to_string(tile);

        RetentionState<T> fin_s, fin_c;
        RetentionOptions<T> fo;
        fo.normalization = norm;
        fo.initial_state = &init;
        fo.tile = tile;
        Matrix<T> out_buf = Matrix<T>::Constant(len, width, T(-3));
        StridedOut O(out_buf.data() + h * dv, len, dv, Eigen::OuterStride<>(width));
        fo.final_state = &fin_s;
        retention::parallel_retention_into(Q, K, V, decay, O, fo);
        fo.final_state = &fin_c;
        const Matrix<T> Oc = retention::parallel_retention(Qc, Kc, Vc, decay, fo);
        EXPECT_TRUE(Matrix<T>(O) == Oc) << label;
        EXPECT_TRUE(fin_s.S == fin_c.S && fin_s.z == fin_c.z) << label;
        ref::State want_fin;
        const Mat want =
            ref::retention(Qc.template cast<double>(), Kc.template cast<double>(),
                           Vc.template cast<double>(), gamma, norm, &init_d, &want_fin);
        EXPECT_LE(relative_error(Oc, want), spec_tolerance<T>()) << label;
        EXPECT_LE(relative_error(fin_c.S, want_fin.S), spec_tolerance<T>()) << label;

        RetentionBackwardOptions<T> bo;
        bo.normalization = norm;
        bo.initial_state = &init;
        bo.final_state_gradient = &fgrad;
        bo.tile = tile;
        Matrix<T> dq_buf = Matrix<T>::Constant(len, width, T(-3)), dk_buf = dq_buf, dv_buf = dq_buf;
        StridedOut dQ(dq_buf.data() + h * dk, len, dk, Eigen::OuterStride<>(width));
        StridedOut dK(dk_buf.data() + h * dk, len, dk, Eigen::OuterStride<>(width));
        StridedOut dV(dv_buf.data() + h * dv, len, dv, Eigen::OuterStride<>(width));
        RetentionState<T> dinit_s;
        retention::parallel_retention_backward_into(Q, K, V, decay, G, dQ, dK, dV, bo, &dinit_s);
        const RetentionGradients<T> gc =
            retention::parallel_retention_backward(Qc, Kc, Vc, decay, Gc, bo);
        // The backward writes its gradients' rows in place, and Eigen's small products round by
        // the destination's alignment: equal to rounding (as EqualsPerHeadCalls).
        const double tol = sizeof(T) == sizeof(double) ? 1e-14 : 1e-6;
        EXPECT_LE(relative_error(dQ, gc.dQ), tol) << label;
        EXPECT_LE(relative_error(dK, gc.dK), tol) << label;
        EXPECT_LE(relative_error(dV, gc.dV), tol) << label;
        EXPECT_LE(relative_error(dinit_s.S, gc.d_initial_state.S), tol) << label;
        EXPECT_LE(relative_error(dinit_s.z, gc.d_initial_state.z), tol) << label;
        // Nothing outside the head's columns was written.
        for (Index c = 0; c < width; ++c) {
          if (c >= h * dv && c < (h + 1) * dv) continue;
          EXPECT_TRUE((out_buf.col(c).array() == T(-3)).all()) << label << " column " << c;
        }
        const ref::Gradients want_g = ref::retention_backward(
            Qc.template cast<double>(), Kc.template cast<double>(), Vc.template cast<double>(),
            gamma, norm, &init_d, Gc.template cast<double>(), &fgrad_d, false);
        EXPECT_LE(relative_error(gc.dQ, want_g.dQ), 10 * spec_tolerance<T>()) << label;
        EXPECT_LE(relative_error(gc.dK, want_g.dK), 10 * spec_tolerance<T>()) << label;
        EXPECT_LE(relative_error(gc.dV, want_g.dV), 10 * spec_tolerance<T>()) << label;
        EXPECT_LE(relative_error(gc.d_initial_state.S, want_g.dS0), 10 * spec_tolerance<T>())
            << label;
      }
  }
}

TEST(BackwardMultiHeadWideState, FloatInputsDoubleState) {
  HeadBuffers<float> buf(1, 29, 2, 3, 4, 61, 1.0);
  const std::vector<double> gammas = {1.0 - std::ldexp(1.0, -26), 0.75};
  const auto init = random_states<double>(2, 3, 4, 500, 1000);
  std::vector<RetentionState<double>> dinit;
  MultiHeadBackwardOptions<double> opt;
  opt.form = Form::recurrent;
  opt.normalization = Normalization::decay;
  opt.initial_states = &init;
  opt.initial_state_gradients = &dinit;
  retention::multi_head_retention_backward(buf.q(), buf.k(), buf.v(), buf.g(), buf.out(buf.dq, 3),
                                           buf.out(buf.dkb, 3), buf.out(buf.dvb, 4), masks(gammas),
                                           opt);
  const auto dq = retention::heads_view<const float>(buf.dq.data(), 1, 29, 2, 3);
  for (Index h = 0; h < 2; ++h) {
    RetentionBackwardOptions<double> o;
    o.normalization = Normalization::decay;
    o.initial_state = &init[static_cast<std::size_t>(h)];
    const Matrix<float> Q = slice(buf.q(), 0, h), K = slice(buf.k(), 0, h),
                        V = slice(buf.v(), 0, h), G = slice(buf.g(), 0, h);
    const auto want = retention::recurrent_retention_backward(
        Q, K, V, CausalDecay(gammas[static_cast<std::size_t>(h)]), G, o);
    EXPECT_LE(relative_error(slice(dq, 0, h), want.dQ), 1e-6);
    EXPECT_LE(relative_error(dinit[static_cast<std::size_t>(h)].S, want.d_initial_state.S), 1e-14);
    // Against the double reference: the double state keeps the decay of a head 2^-26 from 1.
    ref::State ri;
    ri.S = init[static_cast<std::size_t>(h)].S;
    ri.z = init[static_cast<std::size_t>(h)].z;
    ri.position = init[static_cast<std::size_t>(h)].position;
    const auto r = ref::retention_backward(
        Q.cast<double>(), K.cast<double>(), V.cast<double>(), gammas[static_cast<std::size_t>(h)],
        Normalization::decay, &ri, G.cast<double>(), nullptr, false);
    EXPECT_LE(relative_error(want.dK, r.dK), 1e-5);
    EXPECT_LE(relative_error(want.d_initial_state.S, r.dS0), 1e-5);
  }
}

// ---------------------------------------------------------------------------------------------
// Shape errors: a retention::shape_error naming the function, the argument and the shapes.
// ---------------------------------------------------------------------------------------------

template <class F>
void expect_error(F&& f, const std::string& message) {
  try {
    f();
    ADD_FAILURE() << "no exception, expected \"" << message << "\"";
  } catch (const retention::shape_error& e) {
    EXPECT_EQ(std::string(e.what()), message);
  }
}

TEST(BackwardErrors, PerHeadShapes) {
  const Mat Q = random_matrix<double>(5, 3, 1), K = random_matrix<double>(5, 3, 2),
            V = random_matrix<double>(5, 2, 3), G = random_matrix<double>(5, 2, 4);
  const CausalDecay decay(0.9);
  const Mat G_bad = random_matrix<double>(4, 2, 5), K_bad = random_matrix<double>(5, 4, 6);
  RetentionBackwardOptions<double> opt;
  expect_error([&] { retention::parallel_retention_backward(Q, K, V, decay, G_bad, opt); },
               "parallel_retention_backward: dO is [4 x 2], expected [5 x 2]");
  expect_error([&] { retention::chunkwise_retention_backward(Q, K, V, decay, 2, G_bad, opt); },
               "chunkwise_retention_backward: dO is [4 x 2], expected [5 x 2]");
  expect_error([&] { retention::recurrent_retention_backward(Q, K_bad, V, decay, G, opt); },
               "recurrent_retention_backward: K is [5 x 4], expected [5 x 3]");
  expect_error([&] { retention::chunkwise_retention_backward(Q, K, V, decay, 0, G, opt); },
               "chunkwise_retention_backward: chunk must be >= 1, got 0");
  opt.tile = -1;
  expect_error([&] { retention::parallel_retention_backward(Q, K, V, decay, G, opt); },
               "parallel_retention_backward: options.tile must be >= 0, got -1");
  opt.tile = 0;

  RetentionState<double> bad_S(2, 2), bad_z(3, 2), good(3, 2);
  bad_z.z.resize(2);
  opt.final_state_gradient = &bad_S;
  expect_error([&] { retention::chunkwise_retention_backward(Q, K, V, decay, 2, G, opt); },
               "chunkwise_retention_backward: final_state_gradient.S is [2 x 2], expected [3 x 2]");
  opt.final_state_gradient = &bad_z;
  expect_error([&] { retention::recurrent_retention_backward(Q, K, V, decay, G, opt); },
               "recurrent_retention_backward: final_state_gradient.z is [2 x 1], expected [3 x 1]");
  opt.final_state_gradient = &good;
  opt.initial_state = &bad_S;
  expect_error([&] { retention::parallel_retention_backward(Q, K, V, decay, G, opt); },
               "parallel_retention_backward: initial_state.S is [2 x 2], expected [3 x 2]");
  good.position = -1;
  opt.initial_state = &good;
  expect_error([&] { retention::parallel_retention_backward(Q, K, V, decay, G, opt); },
               "parallel_retention_backward: initial_state.position is -1, expected >= 0");

  // Outputs of the _into variants.
  RetentionBackwardOptions<double> plain;
  Mat dQ(5, 3), dK(5, 3), dV(5, 2), bad(4, 3);
  expect_error(
      [&] {
        retention::chunkwise_retention_backward_into(Q, K, V, decay, 2, G, bad, dK, dV, plain);
      },
      "chunkwise_retention_backward: dQ is [4 x 3], expected [5 x 3]");
  expect_error(
      [&] { retention::parallel_retention_backward_into(Q, K, V, decay, G, dQ, bad, dV, plain); },
      "parallel_retention_backward: dK is [4 x 3], expected [5 x 3]");
  expect_error(
      [&] { retention::recurrent_retention_backward_into(Q, K, V, decay, G, dQ, dK, bad, plain); },
      "recurrent_retention_backward: dV is [4 x 3], expected [5 x 2]");

  // In-place calls: an output sharing memory with an input or another output.
  Mat QK(5, 6);
  QK << Q, K;
  expect_error(
      [&] {
        retention::chunkwise_retention_backward_into(QK.leftCols(3), QK.rightCols(3), V, decay, 2,
                                                     G, QK.rightCols(3), dK, dV, plain);
      },
      "chunkwise_retention_backward: dQ overlaps K; in-place calls are not supported");
  Mat GG = G;
  expect_error(
      [&] { retention::parallel_retention_backward_into(Q, K, V, decay, GG, dQ, dK, GG, plain); },
      "parallel_retention_backward: dV overlaps dO; in-place calls are not supported");
  expect_error(
      [&] { retention::recurrent_retention_backward_into(Q, K, V, decay, G, dQ, dQ, dV, plain); },
      "recurrent_retention_backward: dK overlaps dQ; in-place calls are not supported");
  // Side by side in one buffer is fine.
  Mat both(5, 6);
  retention::recurrent_retention_backward_into(Q, K, V, decay, G, both.leftCols(3),
                                               both.rightCols(3), dV, plain);
  const auto g = retention::recurrent_retention_backward(Q, K, V, decay, G, plain);
  EXPECT_EQ(both.leftCols(3), g.dQ);
  EXPECT_EQ(both.rightCols(3), g.dK);

  // A normalisation outside the enum, and a position that overflows with T.
  RetentionBackwardOptions<double> odd;
  odd.normalization = static_cast<Normalization>(7);
  expect_error([&] { retention::parallel_retention_backward(Q, K, V, decay, G, odd); },
               "parallel_retention_backward: normalization is not one of none, decay, "
               "decay_and_score (value 7)");
  RetentionState<double> far(3, 2);
  far.position = std::numeric_limits<Index>::max() - 2;
  RetentionBackwardOptions<double> late;
  late.initial_state = &far;
  expect_error([&] { retention::chunkwise_retention_backward(Q, K, V, decay, 2, G, late); },
               "chunkwise_retention_backward: initial_state.position + 5 overflows "
               "(initial_state.position is " +
                   std::to_string(far.position) + ")");
}

TEST(BackwardErrors, MultiHeadShapes) {
  const Index B = 2, len = 5, H = 3, dk = 4, dv = 2;
  const Mat q = random_matrix<double>(B * len * H, dk, 1),
            k = random_matrix<double>(B * len * H, dk, 2);
  const Mat v = random_matrix<double>(B * len * H, dv, 3),
            g = random_matrix<double>(B * len * H, dv, 4);
  Mat dq(B * len * H, dk), dkm(B * len * H, dk), dvm(B * len * H, dv);
  auto qv = retention::heads_view<const double>(q.data(), B, len, H, dk);
  auto kv = retention::heads_view<const double>(k.data(), B, len, H, dk);
  auto vv = retention::heads_view<const double>(v.data(), B, len, H, dv);
  auto gv = retention::heads_view<const double>(g.data(), B, len, H, dv);
  auto dqv = retention::heads_view(dq.data(), B, len, H, dk);
  auto dkv = retention::heads_view(dkm.data(), B, len, H, dk);
  auto dvv = retention::heads_view(dvm.data(), B, len, H, dv);
  const std::vector<double> gammas = {0.9, 0.8, 0.7};
  const char* fn = "multi_head_retention_backward: ";
  auto call = [&](const std::vector<double>& gm, const MultiHeadBackwardOptions<double>& o,
                  HeadsView<const double> kk, HeadsView<const double> gg) {
    retention::multi_head_retention_backward(qv, kk, vv, gg, dqv, dkv, dvv, masks(gm), o);
  };
  MultiHeadBackwardOptions<double> opt;
  call(gammas, opt, kv, gv);  // valid
  expect_error(
      [&] {
        call({0.9, 0.8}, opt, kv, gv);
      },
      std::string(fn) + "masks has 2 entries, expected heads = 3");
  opt.form = static_cast<Form>(5);
  expect_error([&] { call(gammas, opt, kv, gv); },
               std::string(fn) + "form is not one of parallel, recurrent, chunkwise (value 5)");
  opt.form = Form::chunkwise;
  auto k_bad = kv;
  k_bad.dim = 3;
  expect_error([&] { call(gammas, opt, k_bad, gv); },
               std::string(fn) + "k is [2, 5, 3, 3], expected [2, 5, 3, 4]");
  auto g_bad = gv;
  g_bad.time = 4;
  expect_error([&] { call(gammas, opt, kv, g_bad); },
               std::string(fn) + "d_out is [2, 4, 3, 2], expected [2, 5, 3, 2]");
  std::vector<RetentionState<double>> dinit;
  opt.initial_state_gradients = &dinit;
  expect_error([&] { call(gammas, opt, kv, gv); },
               std::string(fn) + "initial_state_gradients needs initial_states");
  opt.initial_state_gradients = nullptr;
  const auto few = random_states<double>(5, dk, dv, 9, 0);
  opt.final_state_gradients = &few;
  expect_error([&] { call(gammas, opt, kv, gv); },
               std::string(fn) + "final_state_gradients has 5 states, expected batch * heads = 6");
  auto wrong = random_states<double>(6, dk, dv, 9, 0);
  wrong[4].S.resize(dk, dv + 1);
  opt.final_state_gradients = &wrong;
  expect_error([&] { call(gammas, opt, kv, gv); },
               std::string(fn) + "final_state_gradients[4].S is [4 x 3], expected [4 x 2]");
  opt.final_state_gradients = nullptr;
  opt.initial_states = &wrong;
  expect_error([&] { call(gammas, opt, kv, gv); },
               std::string(fn) + "initial_states[4].S is [4 x 3], expected [4 x 2]");
  opt.initial_states = nullptr;
  opt.threads = -1;
  expect_error([&] { call(gammas, opt, kv, gv); },
               std::string(fn) + "threads must be >= 0 (0 = default), got -1");
  opt.threads = 0;
  opt.chunk = -2;
  expect_error([&] { call(gammas, opt, kv, gv); },
               std::string(fn) + "chunk must be >= 0 (0 = automatic), got -2");
}

}  // namespace
