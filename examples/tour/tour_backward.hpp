// Tour section: the backward passes (docs/math.md §7). One line per backward: retention in its
// three forms (one head, and eight heads through multi_head_retention_backward), each form's time
// and the forms' worst disagreement over dQ, dK, dV; MaSA and MaSAD, whose one form is checked
// against a central finite difference of the forward along a random direction (in double).
#pragma once

#include <retention/retention.hpp>

#include "tour_common.hpp"

#include <algorithm>
#include <random>
#include <string>
#include <vector>

namespace tour {

namespace detail_backward {

template <class T>
retention::Matrix<T> random_tokens(retention::Index rows, retention::Index cols, unsigned seed,
                                   double scale) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> u(-scale, scale);
  retention::Matrix<T> m(rows, cols);
  for (retention::Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<T>(u(rng));
  return m;
}

/// Worst pairwise relative difference of dQ, dK, dV among the forms' gradients.
template <class G>
double worst_pair(const std::vector<G>& g) {
  double worst = 0.0;
  for (std::size_t a = 0; a < g.size(); ++a)
    for (std::size_t b = a + 1; b < g.size(); ++b)
      worst = std::max({worst, rel_diff(g[a].dQ, g[b].dQ), rel_diff(g[a].dK, g[b].dK),
                        rel_diff(g[a].dV, g[b].dV)});
  return worst;
}

/// |<dQ,R> + <dK,R'> + <dV,R''> - (L(x + hR) - L(x - hR)) / 2h| / |that difference|, L = <G, f(x)>,
/// all in double: how far a backward is from the forward it differentiates.
template <class Forward, class Grads>
double directional_check(const Forward& f, const retention::Matrix<double>& Q,
                         const retention::Matrix<double>& K, const retention::Matrix<double>& V,
                         const retention::Matrix<double>& G, const Grads& g) {
  const retention::Matrix<double> RQ = random_tokens<double>(Q.rows(), Q.cols(), 71, 1.0);
  const retention::Matrix<double> RK = random_tokens<double>(K.rows(), K.cols(), 72, 1.0);
  const retention::Matrix<double> RV = random_tokens<double>(V.rows(), V.cols(), 73, 1.0);
  const double h = 1e-5;
  auto loss = [&](double s) {
    const retention::Matrix<double> o = f(Q + s * RQ, K + s * RK, V + s * RV);
    return (G.array() * o.array()).sum();
  };
  const double fd = (loss(h) - loss(-h)) / (2 * h);
  const double an = (g.dQ.template cast<double>().array() * RQ.array()).sum() +
                    (g.dK.template cast<double>().array() * RK.array()).sum() +
                    (g.dV.template cast<double>().array() * RV.array()).sum();
  return std::abs(an - fd) / std::max(std::abs(fd), 1e-300);
}

}  // namespace detail_backward

/// Retention backward, one head (T = 2048, dk = dv = 64, decay_and_score, chunk 64) and eight
/// heads ([1, 1024, 8, 64]); MaSA and MaSAD backward on a 14 x 14 grid, 4 heads of 32 (as RMT's
/// first stage).
inline void tour_backward() {
  using detail_backward::random_tokens;
  using retention::Form;
  using retention::Index;
  using retention::Matrix;
  {
    const Index T = 2048, d = 64;
    const Matrix<float> Q = random_tokens<float>(T, d, 11, 1.0),
                        K = random_tokens<float>(T, d, 12, 0.125);
    const Matrix<float> V = random_tokens<float>(T, d, 13, 1.0),
                        G = random_tokens<float>(T, d, 14, 1.0);
    const retention::CausalDecay decay(1.0 - 1.0 / 256);
    retention::RetentionBackwardOptions<float> opt;
    opt.normalization = retention::Normalization::decay_and_score;
    std::vector<retention::RetentionGradients<float>> g(3);
    const double tp =
        median_ms([&] { g[0] = retention::parallel_retention_backward(Q, K, V, decay, G, opt); });
    const double tr =
        median_ms([&] { g[1] = retention::recurrent_retention_backward(Q, K, V, decay, G, opt); });
    const double tc = median_ms(
        [&] { g[2] = retention::chunkwise_retention_backward(Q, K, V, decay, 64, G, opt); });
    print_line("retention backward (1 head)", "T=2048 dk=dv=64 C=64",
               {{"parallel", tp}, {"recurrent", tr}, {"chunkwise", tc}},
               detail_backward::worst_pair(g));
  }
  {
    const Index B = 1, T = 1024, H = 8, D = 64, rows = B * T * H;
    const Matrix<float> q = random_tokens<float>(rows, D, 21, 1.0),
                        k = random_tokens<float>(rows, D, 22, 0.125);
    const Matrix<float> v = random_tokens<float>(rows, D, 23, 1.0),
                        g = random_tokens<float>(rows, D, 24, 1.0);
    const std::vector<retention::CausalDecay> masks =
        retention::causal_masks(retention::retnet_gammas(H));
    struct Grads {
      Matrix<float> dQ, dK, dV;
    };
    std::vector<Grads> out(
        3, Grads{Matrix<float>(rows, D), Matrix<float>(rows, D), Matrix<float>(rows, D)});
    std::vector<FormTime> times;
    const Form forms[] = {Form::parallel, Form::recurrent, Form::chunkwise};
    for (std::size_t f = 0; f < 3; ++f) {
      retention::MultiHeadBackwardOptions<float> opt;
      opt.form = forms[f];
      opt.chunk = 64;
      opt.normalization = retention::Normalization::decay_and_score;
      auto view = [&](const Matrix<float>& m) {
        return retention::heads_view(m.data(), B, T, H, D);
      };
      auto out_view = [&](Matrix<float>& m) { return retention::heads_view(m.data(), B, T, H, D); };
      times.push_back({retention::to_string(forms[f]), median_ms([&] {
                         retention::multi_head_retention_backward(
                             view(q), view(k), view(v), view(g), out_view(out[f].dQ),
                             out_view(out[f].dK), out_view(out[f].dV), masks, opt);
                       })});
    }
    print_line("retention backward (8 heads)", "[1,1024,8,64] C=64", times,
               detail_backward::worst_pair(out));
  }
  {
    const Index side = 14, N = side * side, d = 32;
    const retention::ManhattanDecay mask(0.9, side, side);
    const Matrix<double> Qd = random_tokens<double>(N, d, 31, 0.5),
                         Kd = random_tokens<double>(N, d, 32, 0.5);
    const Matrix<double> Vd = random_tokens<double>(N, d, 33, 1.0),
                         Gd = random_tokens<double>(N, d, 34, 1.0);
    const Matrix<float> Q = Qd.cast<float>(), K = Kd.cast<float>(), V = Vd.cast<float>(),
                        G = Gd.cast<float>();
    retention::MasaGradients<float> gm, gd;
    const double tm = median_ms([&] {
      const auto saved = retention::masa_forward_train(Q, K, V, mask);
      gm = retention::masa_backward(Q, K, V, mask, G, saved);
    });
    const double td = median_ms([&] {
      const auto saved = retention::masad_forward_train(Q, K, V, mask);
      gd = retention::masad_backward(Q, K, V, mask, G, saved);
    });
    const auto masa_d = [&](const Matrix<double>& q, const Matrix<double>& k,
                            const Matrix<double>& v) {
      return retention::masa_forward_train(q, k, v, mask).out;
    };
    const auto masad_d = [&](const Matrix<double>& q, const Matrix<double>& k,
                             const Matrix<double>& v) {
      return retention::masad_forward_train(q, k, v, mask).out;
    };
    // The float gradients against the double forward: the check measures float rounding too.
    print_line("MaSA backward (fwd+bwd)", "14x14 grid, 1 head of 32", {{"full", tm}},
               detail_backward::directional_check(masa_d, Qd, Kd, Vd, Gd, gm));
    print_line("MaSAD backward (fwd+bwd)", "14x14 grid, 1 head of 32", {{"decomposed", td}},
               detail_backward::directional_check(masad_d, Qd, Kd, Vd, Gd, gd));
  }
}

}  // namespace tour
