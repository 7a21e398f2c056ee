// Tour section: RMT's Manhattan self-attention. MaSA streams over tiles, so two tile sizes must
// give the same result; MaSAD is a different operator that equals MaSA exactly when q = 0 (SPEC 4).
#pragma once

#include <retention/layers/rmt.hpp>
#include <retention/masa.hpp>

#include "tour_common.hpp"

#include <cstdint>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace tour {

namespace rmt_detail {
inline retention::Matrix<float> random_grid(retention::Index rows, retention::Index cols,
                                            std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  retention::Matrix<float> m(rows, cols);
  for (retention::Index i = 0; i < m.size(); ++i) m.data()[i] = dist(rng);
  return m;
}
}  // namespace rmt_detail

inline void tour_rmt() {
  using retention::Index;
  using Mat = retention::Matrix<float>;
  const Index side = 28, heads = 4, d = 32, N = side * side;
  const std::vector<double> gammas = retention::rmt_gammas(heads, 2.0, 4.0);
  retention::GridHeadsShape shape;
  shape.height = shape.width = side;
  shape.heads = heads;
  shape.key_dim = shape.value_dim = d;
  const Mat q = rmt_detail::random_grid(N, heads * d, 1),
            k = rmt_detail::random_grid(N, heads * d, 2);
  const Mat v = rmt_detail::random_grid(N, heads * d, 3);
  const std::string grid = std::to_string(side) + "x" + std::to_string(side) + " " +
                           std::to_string(heads) + "h d" + std::to_string(d);

  // MaSA: default tiles (64 x 256) against odd tiles (48 x 100) that do not divide N = 784.
  retention::MasaOptions odd;
  odd.query_tile = 48;
  odd.key_tile = 100;
  Mat a, b;
  const double t_masa = median_ms([&] { a = retention::multi_head_masa(q, k, v, shape, gammas); });
  const double t_odd =
      median_ms([&] { b = retention::multi_head_masa(q, k, v, shape, gammas, odd); });
  print_line("RMT MaSA (tiled)", grid + " tiles 64x256 vs 48x100",
             {{"64x256", t_masa}, {"48x100", t_odd}}, rel_diff(b, a));

  // MaSAD vs MaSA: timed on the real q; compared at q = 0, where the two operators coincide.
  Mat c;
  const double t_masad =
      median_ms([&] { c = retention::multi_head_masad(q, k, v, shape, gammas); });
  const Mat zero = Mat::Zero(N, heads * d);
  const Mat a0 = retention::multi_head_masa(zero, k, v, shape, gammas);
  const Mat c0 = retention::multi_head_masad(zero, k, v, shape, gammas);
  print_line("RMT MaSAD vs MaSA", grid + " agreement at q=0",
             {{"masa", t_masa}, {"masad", t_masad}}, rel_diff(c0, a0));

  // The whole layer (C = 128, 4 heads), full against decomposed with q_proj zeroed.
  retention::ManhattanAttentionConfig cfg;
  cfg.embed_dim = heads * d;
  cfg.heads = heads;
  retention::ManhattanAttention<float> layer(cfg);
  layer.init_random(42);
  {
    // The layer's own parameters by the RMT code's names, with q_proj zero.
    const Mat zero_w = Mat::Zero(cfg.embed_dim, cfg.embed_dim);
    const retention::RowVector<float> zero_b = retention::RowVector<float>::Zero(cfg.embed_dim);
    retention::ParameterMap params;
    params.add_dense("q_proj.weight", zero_w);
    params.add_dense("q_proj.bias", zero_b);
    const std::pair<const char*, const retention::Linear<float>*> rest[] = {
        {"k_proj", &layer.k_proj()}, {"v_proj", &layer.v_proj()}, {"out_proj", &layer.out_proj()}};
    for (const auto& [name, l] : rest) {
      params.add_dense(std::string(name) + ".weight", l->weight());
      params.add_dense(std::string(name) + ".bias", l->bias());
    }
    params.add_dense("lepe.conv.weight", layer.lce_weight(), {layer.value_dim(), 1, 5, 5});
    params.add_dense("lepe.conv.bias", layer.lce_bias());
    layer.load(params);
  }
  const Mat x = rmt_detail::random_grid(N, cfg.embed_dim, 4);
  Mat yf, yd;
  const double t_full =
      median_ms([&] { yf = layer.forward(x, side, side, retention::RmtMode::full); });
  const double t_dec =
      median_ms([&] { yd = layer.forward(x, side, side, retention::RmtMode::decomposed); });
  print_line("RMT attention layer", grid + " C128 full vs dec, q=0",
             {{"full", t_full}, {"decomposed", t_dec}}, rel_diff(yd, yf));
}

}  // namespace tour
