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
  // torchscale's parameter names, loaded through a ParameterMap of views.
  std::vector<Matrix<float>> weights;
  retention::ParameterMap params;
  for (const retention::Linear<float>* l :
       {&layer.q_proj(), &layer.k_proj(), &layer.v_proj(), &layer.g_proj(), &layer.out_proj()})
    weights.push_back(uniform(l->out_features(), l->in_features(),
                              std::sqrt(3.0 / static_cast<double>(l->in_features()))));
  const char* names[] = {"q_proj", "k_proj", "v_proj", "g_proj", "out_proj"};
  for (std::size_t i = 0; i < weights.size(); ++i)
    params.add_dense(std::string(names[i]) + ".weight", weights[i]);
  layer.load(params);
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
