// Tour section: the RetNet Multi-Scale Retention layer (SPEC 3) in its three forms.
#pragma once

#include <retention/layers/msr.hpp>

#include "tour/tour_common.hpp"

#include <algorithm>
#include <cmath>
#include <random>
#include <string>

namespace tour {

/// One line: the whole MSR layer (projections, rotation, retention, head norm, gate, output) at
/// T = 1024, d = 512, H = 4, value dim 1024, each form's time and the worst disagreement between
/// forms.
inline void tour_msr() {
  using retention::Form;
  using retention::Index;
  using retention::Matrix;
  const Index T = 1024, d = 512, heads = 4, value_dim = 1024;
  retention::MsrConfig cfg;
  cfg.embed_dim = d;
  cfg.value_dim = value_dim;
  cfg.heads = heads;
  retention::MultiScaleRetention<float> layer(cfg);

  std::mt19937_64 rng(3);
  auto uniform = [&rng](Index rows, Index cols, double scale) {
    std::uniform_real_distribution<float> dist(-static_cast<float>(scale),
                                               static_cast<float>(scale));
    Matrix<float> m(rows, cols);
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = dist(rng);
    return m;
  };
  for (retention::MsrProjection p :
       {retention::MsrProjection::q_proj, retention::MsrProjection::k_proj,
        retention::MsrProjection::v_proj, retention::MsrProjection::g_proj,
        retention::MsrProjection::out_proj})
    layer.load(p, uniform(layer.out_dim(p), layer.in_dim(p),
                          std::sqrt(3.0 / static_cast<double>(layer.in_dim(p)))));
  const Matrix<float> x = uniform(T, d, 1.0);

  Matrix<float> y_par, y_rec, y_chunk;
  const double t_par = median_ms([&] { y_par = layer.forward(x, Form::parallel); });
  const double t_rec = median_ms([&] { y_rec = layer.forward(x, Form::recurrent); });
  const double t_chunk = median_ms([&] { y_chunk = layer.forward(x, Form::chunkwise); });
  double worst = rel_diff(y_rec, y_par);
  worst = std::max(worst, rel_diff(y_chunk, y_par));
  worst = std::max(worst, rel_diff(y_chunk, y_rec));
  print_line("MSR layer (RetNet)", "T=1024 d=512 H=4 v=1024",
             {{"parallel", t_par}, {"recurrent", t_rec}, {"chunkwise", t_chunk}}, worst);
}

}  // namespace tour
