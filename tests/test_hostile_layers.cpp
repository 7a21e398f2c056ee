// retention-test-links: compiled
// retention-test-labels: sanitize
// Hostile input at the multi-head, MaSA/MaSAD, nn and layer entry points (issue 15): every case is
// a clear shape_error naming the public function and argument, or a documented result; none is a
// silent wrong answer or a crash. Also built under AddressSanitizer + UBSan (label "sanitize").
#include <retention/retention.hpp>

#include "support/hostile_support.hpp"
#include "support/test_support.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <random>
#include <vector>

namespace {

using retention::Form;
using retention::Index;
using retention::Matrix;
using retention::Normalization;
using retention_hostile::Suite;
using retention_test::random_matrix;

constexpr Index kHuge = Index(1) << 62;
constexpr Index k2p32 = Index(1) << 32;

TEST(HostileLayers, MultiHead) {
  Suite s("multi-head");
  const Index B = 2, T = 5, H = 3, dk = 4, dv = 2;
  const Matrix<double> q = random_matrix<double>(B * T, H * dk, 1),
                       k = random_matrix<double>(B * T, H * dk, 2),
                       v = random_matrix<double>(B * T, H * dv, 3);
  const auto gammas = retention::retnet_gammas(H);
  const retention::MultiHeadShape shape{B, T, H, dk, dv};
  Matrix<double> ref(B * T, H * dv);
  {
    retention::MultiHeadOptions<double> o;
    o.threads = 1;
    retention::multi_head_retention(q.data(), k.data(), v.data(), ref.data(), shape, gammas, o);
  }
  const auto run = [&](retention::MultiHeadOptions<double> o, retention::MultiHeadShape sh) {
    Matrix<double> out(B * T, H * dv);
    retention::multi_head_retention(q.data(), k.data(), v.data(), out.data(), sh, gammas, o);
    return out;
  };
  for (int threads : {0, 1, 2, 7, 1000, 1000000, std::numeric_limits<int>::max()})
    s.result("multi_head_retention", "threads = " + std::to_string(threads), [=] {
      retention::MultiHeadOptions<double> o;
      o.threads = threads;
      return run(o, shape) == ref;
    });
  s.error("multi_head_retention", "threads = -1", "threads", [&] {
    retention::MultiHeadOptions<double> o;
    o.threads = -1;
    run(o, shape);
  });
  s.error("multi_head_retention", "form 7", "form", [&] {
    retention::MultiHeadOptions<double> o;
    o.form = static_cast<Form>(7);
    run(o, shape);
  });
  s.error("multi_head_retention", "normalization 9", "normalization", [&] {
    retention::MultiHeadOptions<double> o;
    o.normalization = static_cast<Normalization>(9);
    run(o, shape);
  });
  s.error_any("multi_head_retention", "batch 2^62, 4 heads", {"overflow"}, [&] {
    retention::MultiHeadShape sh = shape;
    sh.batch = kHuge;
    sh.heads = 4;
    Matrix<double> out(B * T, H * dv);
    retention::multi_head_retention(q.data(), k.data(), v.data(), out.data(), sh,
                                    retention::retnet_gammas(4));
  });
  s.error_any("multi_head_retention", "time 2^62", {"overflow"}, [&] {
    retention::MultiHeadShape sh = shape;
    sh.time = kHuge;
    run({}, sh);
  });
  s.error("multi_head_retention", "out = q (in place)", "out overlaps", [&] {
    Matrix<double> qq = q.leftCols(H * dv);  // a q whose head width is dv
    retention::multi_head_retention(qq.data(), qq.data(), qq.data(), qq.data(),
                                    retention::MultiHeadShape{B, T, H, dv, dv}, gammas);
  });
  s.error("multi_head_retention", "gammas of 2 for 3 heads", "gammas", [&] {
    Matrix<double> out(B * T, H * dv);
    retention::multi_head_retention(q.data(), k.data(), v.data(), out.data(), shape,
                                    std::vector<double>{0.9, 0.8});
  });
  s.error("multi_head_retention", "null q", "null", [&] {
    Matrix<double> out(B * T, H * dv);
    retention::multi_head_retention<double>(nullptr, k.data(), v.data(), out.data(), shape, gammas);
  });
  s.error("multi_head_retention", "negative head stride", "negative stride", [&] {
    Matrix<double> out(B * T, H * dv);
    auto qv = retention::heads_view(q.data(), B, T, H, dk);
    qv.head_stride = -dk;
    retention::multi_head_retention(qv, retention::heads_view(k.data(), B, T, H, dk),
                                    retention::heads_view(v.data(), B, T, H, dv),
                                    retention::heads_view(out.data(), B, T, H, dv),
                                    retention::causal_masks(gammas));
  });
  s.error_any("heads_view", "2^32 x 2^32 x 1 x 4", {"overflow"},
              [&] { retention::heads_view(q.data(), k2p32, k2p32, 1, 4); });
  // Decoding.
  std::vector<retention::RetentionState<double>> states(static_cast<std::size_t>(B * H),
                                                        retention::RetentionState<double>(dk, dv));
  const Matrix<double> qs = random_matrix<double>(B, H * dk, 4),
                       ks = random_matrix<double>(B, H * dk, 5),
                       vs = random_matrix<double>(B, H * dv, 6);
  for (int threads : {0, 1000000})
    s.result("multi_head_step", "threads = " + std::to_string(threads), [&, threads] {
      auto st = states;
      Matrix<double> out(B, H * dv);
      retention::multi_head_step(qs.data(), ks.data(), vs.data(), out.data(), B, H, dk, dv, gammas,
                                 st, Normalization::none, threads);
      return st[0].position == 1 && out.allFinite();
    });
  s.error("multi_head_step", "threads = -5", "threads", [&] {
    auto st = states;
    Matrix<double> out(B, H * dv);
    retention::multi_head_step(qs.data(), ks.data(), vs.data(), out.data(), B, H, dk, dv, gammas,
                               st, Normalization::none, -5);
  });
  s.error("multi_head_step", "state position at INT64_MAX", "position", [&] {
    auto st = states;
    for (auto& x : st) x.position = std::numeric_limits<Index>::max();
    Matrix<double> out(B, H * dv);
    retention::multi_head_step(qs.data(), ks.data(), vs.data(), out.data(), B, H, dk, dv, gammas,
                               st);
  });
  s.error("multi_head_step", "batch * heads overflow", "overflow", [&] {
    auto st = states;
    Matrix<double> out(B, H * dv);
    retention::multi_head_step(qs.data(), ks.data(), vs.data(), out.data(), kHuge, 4, dk, dv,
                               std::vector<double>(4, 0.9), st);
  });
  s.run_and_expect_clean();
}

TEST(HostileLayers, Manhattan) {
  Suite s("manhattan");
  const Matrix<float> q = random_matrix<float>(12, 4, 1);
  const retention::GridHeadsShape ok{1, 3, 4, 2, 2, 2, 0, 0};
  s.error_any("multi_head_masa", "Matrix overload, batch 2^62", {"overflow"}, [&] {
    retention::GridHeadsShape sh = ok;
    sh.batch = kHuge;
    retention::multi_head_masa(q, q, q, sh, {0.9, 0.8});
  });
  s.error_any("multi_head_masad", "Matrix overload, 2^32 x 2^32 grid", {"overflow"}, [&] {
    retention::GridHeadsShape sh = ok;
    sh.height = sh.width = k2p32;
    retention::multi_head_masad(q, q, q, sh, {0.9, 0.8});
  });
  s.error("multi_head_masa", "threads -1", "threads", [&] {
    retention::MasaOptions o;
    o.threads = -1;
    retention::multi_head_masa(q, q, q, ok, {0.9, 0.8}, o);
  });
  s.result("multi_head_masad", "threads 10^6 equals 1", [&] {
    retention::MasaOptions one, many;
    one.threads = 1;
    many.threads = 1000000;
    return retention::multi_head_masad(q, q, q, ok, {0.9, 0.8}, one) ==
           retention::multi_head_masad(q, q, q, ok, {0.9, 0.8}, many);
  });
  s.error("multi_head_masa", "gamma NaN", "gamma", [&] {
    retention::multi_head_masa(q, q, q, ok, {0.9, std::nan("")});
  });
  s.error("masa", "mask grid 3x5 for 12 tokens", "Q",
          [&] { retention::masa(q, q, q, retention::ManhattanDecay(0.9, 3, 5)); });
  s.error_any("masad", "height * width overflow", {"overflow"},
              [&] { retention::masad(q, q, q, 0.9, k2p32, k2p32); });
  s.error("masa", "query_tile 0", "query_tile", [&] {
    retention::MasaOptions o;
    o.query_tile = 0;
    retention::masa(q, q, q, retention::ManhattanDecay(0.9, 3, 4), o);
  });
  s.error("multi_head_masa", "out overlaps q", "overlaps", [&] {
    Matrix<float> buf = random_matrix<float>(12, 4, 2);
    const auto view = retention::heads_view(buf.data(), 1, 12, 2, 2);
    retention::multi_head_masa(view.as_const(), view.as_const(), view.as_const(), view,
                               retention::manhattan_masks({0.9, 0.8}, 3, 4));
  });
  s.error_any("local_context_enhancement", "v [0 x 4], grid 2^32 x 2^32", {"overflow"}, [&] {
    const Matrix<float> v(0, 4), w = Matrix<float>::Zero(4, 25), b = Matrix<float>::Zero(1, 4);
    retention::local_context_enhancement(v, 1, k2p32, k2p32, w, b);
  });
  retention::ManhattanAttentionConfig cfg;
  cfg.embed_dim = 16;
  cfg.heads = 2;
  retention::ManhattanAttention<float> layer(cfg);
  s.error_any("ManhattanAttention::forward", "x [0 x 16], batch 2^62 of 2x2", {"overflow"},
              [&] { layer.forward(Matrix<float>(0, 16), kHuge, 2, 2); });
  s.error("ManhattanAttention::forward", "mode 5", "mode", [&] {
    layer.forward(random_matrix<float>(4, 16, 3), 2, 2, static_cast<retention::RmtMode>(5));
  });
  s.error("ManhattanAttention", "gammas of the wrong count", "gammas", [&] {
    retention::ManhattanAttentionConfig c = cfg;
    c.gammas = {0.5};
    retention::ManhattanAttention<float> l(c);
  });
  s.error("ManhattanAttention", "gamma INF", "gamma", [&] {
    retention::ManhattanAttentionConfig c = cfg;
    c.gammas = {0.5, std::numeric_limits<double>::infinity()};
    retention::ManhattanAttention<float> l(c);
  });
  s.error("ManhattanAttention", "tile threads -2", "threads", [&] {
    retention::ManhattanAttentionConfig c = cfg;
    c.tile.threads = -2;
    retention::ManhattanAttention<float> l(c);
  });
  s.error_any("ManhattanAttention", "value_factor 2^62", {"overflow"}, [&] {
    retention::ManhattanAttentionConfig c = cfg;
    c.value_factor = kHuge;
    retention::ManhattanAttention<float> l(c);
  });
  s.run_and_expect_clean();
}

TEST(HostileLayers, MsrAndNn) {
  Suite s("msr-nn");
  retention::MsrConfig cfg;
  cfg.embed_dim = 8;
  cfg.heads = 2;
  retention::MultiScaleRetention<double> layer(cfg);
  layer.init_random(1);
  const Matrix<double> x = random_matrix<double>(9, 8, 2);
  for (int threads : {0, 1, 1000000})
    s.result("MultiScaleRetention::forward", "threads " + std::to_string(threads), [&, threads] {
      retention::MsrConfig c = cfg;
      c.threads = threads;
      retention::MultiScaleRetention<double> l(c);
      l.init_random(1);
      return (l.forward(x) - layer.forward(x)).norm() <= 1e-13 * layer.forward(x).norm();
    });
  s.error("MultiScaleRetention", "threads -1", "threads", [&] {
    retention::MsrConfig c = cfg;
    c.threads = -1;
    retention::MultiScaleRetention<double> l(c);
  });
  s.error("MultiScaleRetention", "eps NaN", "eps", [&] {
    retention::MsrConfig c = cfg;
    c.eps = std::nan("");
    retention::MultiScaleRetention<double> l(c);
  });
  s.error("MultiScaleRetention", "form 9", "form", [&] {
    retention::MsrConfig c = cfg;
    c.form = static_cast<Form>(9);
    retention::MultiScaleRetention<double> l(c);
  });
  s.error_any("MultiScaleRetention", "embed_dim 2^62", {"overflow"}, [&] {
    retention::MsrConfig c = cfg;
    c.embed_dim = kHuge;
    c.heads = 2;
    retention::MultiScaleRetention<double> l(c);
  });
  s.error("MultiScaleRetention::forward", "form 7", "form",
          [&] { layer.forward(x, static_cast<Form>(7)); });
  s.result("MultiScaleRetention::prefill", "form 7: error, state unchanged", [&] {
    auto st = layer.make_state();
    layer.prefill(x.topRows(3), st);
    const auto before = st;
    try {
      layer.prefill(x, st, static_cast<Form>(7));
      return false;
    } catch (const retention::shape_error&) {
    }
    return st.position == before.position && st.heads[0].S == before.heads[0].S;
  });
  s.error("MultiScaleRetention::step", "state at INT64_MAX", "position", [&] {
    auto st = layer.make_state();
    st.position = std::numeric_limits<Index>::max();
    for (auto& h : st.heads) h.position = st.position;
    layer.step(x.row(0), st);
  });
  s.error("MultiScaleRetention::prefill", "position + T overflows", "overflow", [&] {
    auto st = layer.make_state();
    st.position = std::numeric_limits<Index>::max() - 2;
    for (auto& h : st.heads) h.position = st.position;
    layer.prefill(x, st);
  });
  s.error("MultiScaleRetention::load", "missing parameter", "missing parameter",
          [&] { layer.load(retention::ParameterMap()); });
  s.error("Linear", "out_features -3", "out_features",
          [&] { retention::Linear<float> l(4, -3, true); });
  s.error_any("Linear", "2^40 x 2^40", {"overflow"},
              [&] { retention::Linear<float> l(Index(1) << 40, Index(1) << 40, false); });
  s.error("Linear::forward", "x of the wrong width", "x", [&] {
    retention::Linear<float> l(4, 3, true);
    l.forward(random_matrix<float>(2, 5, 1));
  });
  s.error("ParameterMap::add", "negative shape", "negative", [&] {
    retention::ParameterMap m;
    const float f = 0;
    m.add("w", &f, {2, -1});
  });
  s.error_any("TensorRef", "numel overflow", {"overflow"}, [&] {
    retention::ParameterMap m;
    const float f = 0;
    m.add("w", &f, {k2p32, k2p32, k2p32});
  });
  s.run_and_expect_clean();
}

}  // namespace
