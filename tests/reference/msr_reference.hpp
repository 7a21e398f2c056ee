// Naive double-precision reference of the RetNet MSR layer, straight from SPEC 3 (and the retention
// and normalisation formulas of SPEC 2), with plain loops and no library code beyond the types.
#pragma once

#include <retention/core.hpp>
#include <retention/nn/norms.hpp>  // HeadNorm enum only

#include <algorithm>
#include <cmath>
#include <vector>

namespace msr_reference {

using retention::Index;
using Mat = retention::Matrix<double>;

struct Layer {
  Index embed_dim = 0, value_dim = 0, heads = 1;
  std::vector<double> gammas;  // one per head
  retention::Normalization normalization = retention::Normalization::decay_and_score;
  retention::HeadNorm head_norm = retention::HeadNorm::rms;
  double eps = 1e-6;
  // torch layout [out, in]; biases empty = none.
  Mat wq, wk, wv, wg, wo;
  std::vector<double> bq, bk, bv, bg, bo;
};

/// y = x W^T + b, loops.
inline Mat linear(const Mat& x, const Mat& w, const std::vector<double>& b) {
  Mat y(x.rows(), w.rows());
  for (Index t = 0; t < x.rows(); ++t)
    for (Index o = 0; o < w.rows(); ++o) {
      double s = b.empty() ? 0.0 : b[static_cast<std::size_t>(o)];
      for (Index i = 0; i < x.cols(); ++i) s += x(t, i) * w(o, i);
      y(t, o) = s;
    }
  return y;
}

/// Theta shift of SPEC 3 on every head_dim group of row t, at position first_position + t.
inline void rotate(Mat& x, Index head_dim, Index first_position) {
  const Index half = head_dim / 2;
  for (Index t = 0; t < x.rows(); ++t)
    for (Index h = 0; h < x.cols() / head_dim; ++h)
      for (Index j = 0; j < half; ++j) {
        const double theta =
            half == 1 ? 1.0
                      : std::pow(10000.0, -static_cast<double>(j) / static_cast<double>(half - 1));
        const double angle = static_cast<double>(first_position + t) * theta;
        const Index i = h * head_dim + 2 * j;
        const double a = x(t, i), b = x(t, i + 1);
        x(t, i) = a * std::cos(angle) - b * std::sin(angle);
        x(t, i + 1) = b * std::cos(angle) + a * std::sin(angle);
      }
}

/// The full layer on x [T, d], positions 0..T-1.
inline Mat forward(const Layer& L, const Mat& x) {
  const Index T = x.rows(), H = L.heads, dk = L.embed_dim / H, dv = L.value_dim / H;
  Mat q = linear(x, L.wq, L.bq), k = linear(x, L.wk, L.bk), v = linear(x, L.wv, L.bv),
      g = linear(x, L.wg, L.bg);
  for (Index t = 0; t < T; ++t)
    for (Index c = 0; c < k.cols(); ++c) k(t, c) /= std::sqrt(static_cast<double>(dk));
  rotate(q, dk, 0);
  rotate(k, dk, 0);

  Mat o(T, L.value_dim);
  for (Index h = 0; h < H; ++h) {
    const double gamma = L.gammas[static_cast<std::size_t>(h)];
    for (Index n = 0; n < T; ++n) {
      std::vector<double> row(static_cast<std::size_t>(dv), 0.0);
      double r = 0.0;  // signed score row sum
      for (Index m = 0; m <= n; ++m) {
        double qk = 0.0;
        for (Index i = 0; i < dk; ++i) qk += q(n, h * dk + i) * k(m, h * dk + i);
        const double w = std::pow(gamma, static_cast<double>(n - m)) * qk;
        r += w;
        for (Index c = 0; c < dv; ++c) row[static_cast<std::size_t>(c)] += w * v(m, h * dv + c);
      }
      double scale = 1.0;
      if (L.normalization != retention::Normalization::none) {
        double sum = 0.0;
        for (Index i = 0; i <= n; ++i) sum += std::pow(gamma, static_cast<double>(i));
        const double s = std::sqrt(sum);
        scale = 1.0 / s;
        if (L.normalization == retention::Normalization::decay_and_score)
          scale /= std::max(std::abs(r) / s, 1.0);
      }
      // Per-head norm over dv.
      std::vector<double> y(row.size());
      for (std::size_t c = 0; c < row.size(); ++c) y[c] = row[c] * scale;
      double mean = 0.0;
      if (L.head_norm == retention::HeadNorm::layer) {
        for (double e : y) mean += e;
        mean /= static_cast<double>(dv);
      }
      double ms = 0.0;
      for (double e : y) ms += (e - mean) * (e - mean);
      ms /= static_cast<double>(dv);
      for (Index c = 0; c < dv; ++c)
        o(n, h * dv + c) = (y[static_cast<std::size_t>(c)] - mean) / std::sqrt(ms + L.eps);
    }
  }
  // Gate: silu(g) = g * sigmoid(g).
  for (Index t = 0; t < T; ++t)
    for (Index c = 0; c < L.value_dim; ++c) o(t, c) *= g(t, c) / (1.0 + std::exp(-g(t, c)));
  return linear(o, L.wo, L.bo);
}

}  // namespace msr_reference
