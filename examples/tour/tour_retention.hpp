// Tour section: retention (SPEC 2) in its three forms, one head and eight heads (MSR-style).
#pragma once

#include <retention/retention.hpp>

#include "tour_common.hpp"

#include <algorithm>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

namespace tour {

namespace detail_retention {

inline retention::Matrix<float> random_tokens(retention::Index rows, retention::Index cols,
                                              unsigned seed, float scale) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-scale, scale);
  retention::Matrix<float> m(rows, cols);
  for (retention::Index i = 0; i < m.size(); ++i) m.data()[i] = u(rng);
  return m;
}

/// Worst pairwise relative difference among the outputs.
template <class M>
double worst_pair(const std::vector<M>& outs) {
  double worst = 0.0;
  for (std::size_t a = 0; a < outs.size(); ++a)
    for (std::size_t b = a + 1; b < outs.size(); ++b)
      worst = std::max(worst, rel_diff(outs[a], outs[b]));
  return worst;
}

}  // namespace detail_retention

/// One line for single-head retention (T = 4096, dk = dv = 64, gamma = 1 - 2^-8, chunk 64) and one
/// for multi-head MSR-style retention (8 RetNet heads over [1, 2048, 8, 64], decay_and_score).
inline void tour_retention() {
  using detail_retention::random_tokens;
  using retention::Form;
  using retention::Matrix;
  {
    const retention::Index T = 4096, d = 64;
    const Matrix<float> Q = random_tokens(T, d, 1, 1.0f), K = random_tokens(T, d, 2, 0.125f);
    const Matrix<float> V = random_tokens(T, d, 3, 1.0f);
    const retention::CausalDecay decay(1.0 - 1.0 / 256);
    retention::RetentionOptions<float> opt;
    opt.normalization = retention::Normalization::decay_and_score;
    std::vector<Matrix<float>> outs(3, Matrix<float>(T, d));
    const double tp =
        median_ms([&] { retention::parallel_retention_into(Q, K, V, decay, outs[0], opt); });
    const double tr =
        median_ms([&] { retention::recurrent_retention_into(Q, K, V, decay, outs[1], opt); });
    const double tc =
        median_ms([&] { retention::chunkwise_retention_into(Q, K, V, decay, 64, outs[2], opt); });
    print_line("retention (1 head)", "T=4096 dk=dv=64 C=64",
               {{"parallel", tp}, {"recurrent", tr}, {"chunkwise", tc}},
               detail_retention::worst_pair(outs));
  }
  {
    const retention::MultiHeadShape shape{1, 2048, 8, 64, 64};
    const retention::Index rows = shape.batch * shape.time * shape.heads;
    const Matrix<float> q = random_tokens(rows, shape.key_dim, 4, 1.0f);
    const Matrix<float> k = random_tokens(rows, shape.key_dim, 5, 0.125f);
    const Matrix<float> v = random_tokens(rows, shape.value_dim, 6, 1.0f);
    const std::vector<double> gammas = retention::retnet_gammas(shape.heads);
    std::vector<Matrix<float>> outs(3, Matrix<float>(rows, shape.value_dim));
    std::vector<FormTime> times;
    const Form forms[] = {Form::parallel, Form::recurrent, Form::chunkwise};
    for (int f = 0; f < 3; ++f) {
      retention::MultiHeadOptions<float> opt;
      opt.form = forms[f];
      opt.chunk = 64;
      opt.normalization = retention::Normalization::decay_and_score;
      times.push_back({retention::to_string(forms[f]), median_ms([&] {
                         retention::multi_head_retention(q.data(), k.data(), v.data(),
                                                         outs[static_cast<std::size_t>(f)].data(),
                                                         shape, gammas, opt);
                       })});
    }
    print_line("retention (8 heads, MSR)", "[1,2048,8,64] C=64", times,
               detail_retention::worst_pair(outs));
  }
}

}  // namespace tour
