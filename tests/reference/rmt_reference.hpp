// Naive double-precision evaluation of SPEC section 4 (RMT: MaSA, MaSAD, LCE, the attention layer),
// written straight from the formulas with explicit loops, explicit masks and an explicit full
// softmax. It shares no code with the library's kernels.
#pragma once

#include <retention/core.hpp>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <vector>

namespace rmt_reference {

using retention::Index;
using Mat = retention::Matrix<double>;

/// Softmax of `logits` (explicit: max, exp, sum) applied to the rows of `values` listed in `keys`.
inline std::vector<double> attend(const std::vector<double>& logits, const Mat& values,
                                  const std::vector<Index>& keys) {
  double mx = -std::numeric_limits<double>::infinity();
  for (double l : logits) mx = std::max(mx, l);
  std::vector<double> p(logits.size());
  double sum = 0.0;
  for (std::size_t j = 0; j < logits.size(); ++j) {
    p[j] = std::exp(logits[j] - mx);
    sum += p[j];
  }
  std::vector<double> out(static_cast<std::size_t>(values.cols()), 0.0);
  for (std::size_t j = 0; j < keys.size(); ++j)
    for (Index c = 0; c < values.cols(); ++c)
      out[static_cast<std::size_t>(c)] += p[j] / sum * values(keys[j], c);
  return out;
}

/// ln D for the Manhattan mask on an H x W grid, the full [N, N] matrix (small grids only).
inline Mat manhattan_log_mask(double gamma, Index H, Index W) {
  const Index N = H * W;
  Mat L(N, N);
  for (Index n = 0; n < N; ++n)
    for (Index m = 0; m < N; ++m) {
      const Index dist = std::abs(n / W - m / W) + std::abs(n % W - m % W);
      L(n, m) = static_cast<double>(dist) * std::log(gamma);
    }
  return L;
}

/// MaSA with the whole [N, N] logit matrix and the explicit mask: A = softmax_row(Q K^T + L), O = A
/// V.
inline Mat masa_full(const Mat& Q, const Mat& K, const Mat& V, double gamma, Index H, Index W) {
  const Index N = H * W;
  const Mat L = manhattan_log_mask(gamma, H, W);
  Mat A(N, N);
  for (Index n = 0; n < N; ++n) {
    double mx = -std::numeric_limits<double>::infinity();
    for (Index m = 0; m < N; ++m) {
      double dot = 0.0;
      for (Index c = 0; c < Q.cols(); ++c) dot += Q(n, c) * K(m, c);
      A(n, m) = dot + L(n, m);
      mx = std::max(mx, A(n, m));
    }
    double sum = 0.0;
    for (Index m = 0; m < N; ++m) sum += (A(n, m) = std::exp(A(n, m) - mx));
    for (Index m = 0; m < N; ++m) A(n, m) /= sum;
  }
  Mat O = Mat::Zero(N, V.cols());
  for (Index n = 0; n < N; ++n)
    for (Index m = 0; m < N; ++m)
      for (Index c = 0; c < V.cols(); ++c) O(n, c) += A(n, m) * V(m, c);
  return O;
}

/// MaSA rows `rows` of softmax_row(Q K^T + L) V, each with its own explicit mask row.
inline Mat masa_rows(const Mat& Q, const Mat& K, const Mat& V, double gamma, Index H, Index W,
                     const std::vector<Index>& rows) {
  const Index N = H * W;
  std::vector<Index> keys(static_cast<std::size_t>(N));
  for (Index m = 0; m < N; ++m) keys[static_cast<std::size_t>(m)] = m;
  Mat out(static_cast<Index>(rows.size()), V.cols());
  for (std::size_t r = 0; r < rows.size(); ++r) {
    const Index n = rows[r];
    std::vector<double> logits(static_cast<std::size_t>(N));
    for (Index m = 0; m < N; ++m) {
      double dot = 0.0;
      for (Index c = 0; c < Q.cols(); ++c) dot += Q(n, c) * K(m, c);
      const Index dist = std::abs(n / W - m / W) + std::abs(n % W - m % W);
      logits[static_cast<std::size_t>(m)] = dot + static_cast<double>(dist) * std::log(gamma);
    }
    const std::vector<double> o = attend(logits, V, keys);
    for (Index c = 0; c < V.cols(); ++c)
      out(static_cast<Index>(r), c) = o[static_cast<std::size_t>(c)];
  }
  return out;
}

/// MaSA of every row.
inline Mat masa(const Mat& Q, const Mat& K, const Mat& V, double gamma, Index H, Index W) {
  std::vector<Index> rows(static_cast<std::size_t>(H * W));
  for (Index n = 0; n < H * W; ++n) rows[static_cast<std::size_t>(n)] = n;
  return masa_rows(Q, K, V, gamma, H, W, rows);
}

/// MaSAD: softmax along each grid row (keys in the same row), then along each column on the result.
inline Mat masad(const Mat& Q, const Mat& K, const Mat& V, double gamma, Index H, Index W) {
  const double lg = std::log(gamma);
  Mat u(H * W, V.cols());
  for (Index y = 0; y < H; ++y)
    for (Index x = 0; x < W; ++x) {
      const Index n = y * W + x;
      std::vector<double> logits;
      std::vector<Index> keys;
      for (Index x2 = 0; x2 < W; ++x2) {
        const Index m = y * W + x2;
        double dot = 0.0;
        for (Index c = 0; c < Q.cols(); ++c) dot += Q(n, c) * K(m, c);
        logits.push_back(dot + static_cast<double>(std::abs(x - x2)) * lg);
        keys.push_back(m);
      }
      const std::vector<double> o = attend(logits, V, keys);
      for (Index c = 0; c < V.cols(); ++c) u(n, c) = o[static_cast<std::size_t>(c)];
    }
  Mat out(H * W, V.cols());
  for (Index y = 0; y < H; ++y)
    for (Index x = 0; x < W; ++x) {
      const Index n = y * W + x;
      std::vector<double> logits;
      std::vector<Index> keys;
      for (Index y2 = 0; y2 < H; ++y2) {
        const Index m = y2 * W + x;
        double dot = 0.0;
        for (Index c = 0; c < Q.cols(); ++c) dot += Q(n, c) * K(m, c);
        logits.push_back(dot + static_cast<double>(std::abs(y - y2)) * lg);
        keys.push_back(m);
      }
      const std::vector<double> o = attend(logits, u, keys);
      for (Index c = 0; c < V.cols(); ++c) out(n, c) = o[static_cast<std::size_t>(c)];
    }
  return out;
}

/// Depthwise 5 x 5 convolution, padding 2, with bias, of the map v [H*W, C] (torch
/// cross-correlation): out[y, x, c] = b[c] + sum_{i, j < 5} w[c, i, j] v[y + i - 2, x + j - 2, c],
/// zero outside the grid. weight is torch's [C, 1, 5, 5] flattened: w[c, i, j] = weight[c * 25 + i
/// * 5 + j].
inline Mat lce(const Mat& v, Index H, Index W, const std::vector<double>& weight,
               const std::vector<double>& bias) {
  const Index C = v.cols();
  Mat out(H * W, C);
  for (Index y = 0; y < H; ++y)
    for (Index x = 0; x < W; ++x)
      for (Index c = 0; c < C; ++c) {
        double acc = bias[static_cast<std::size_t>(c)];
        for (Index i = 0; i < 5; ++i)
          for (Index j = 0; j < 5; ++j) {
            const Index yy = y + i - 2, xx = x + j - 2;
            if (yy < 0 || yy >= H || xx < 0 || xx >= W) continue;
            acc += weight[static_cast<std::size_t>(c * 25 + i * 5 + j)] * v(yy * W + xx, c);
          }
        out(y * W + x, c) = acc;
      }
  return out;
}

/// y = x W^T + b, W [out, in] (torch layout).
inline Mat linear(const Mat& x, const Mat& w, const std::vector<double>& b) {
  Mat y(x.rows(), w.rows());
  for (Index t = 0; t < x.rows(); ++t)
    for (Index o = 0; o < w.rows(); ++o) {
      double acc = b[static_cast<std::size_t>(o)];
      for (Index i = 0; i < w.cols(); ++i) acc += x(t, i) * w(o, i);
      y(t, o) = acc;
    }
  return y;
}

/// Theta shift by raster index: in each head_dim group, pair (2j, 2j+1) of row n rotated by n *
/// theta_j, theta_j = 10000^(-j / (head_dim/2 - 1)), theta_0 = 1 when head_dim = 2.
inline Mat rotate(const Mat& x, Index head_dim) {
  Mat y = x;
  const Index half = head_dim / 2;
  for (Index n = 0; n < x.rows(); ++n)
    for (Index g = 0; g < x.cols() / head_dim; ++g)
      for (Index j = 0; j < half; ++j) {
        const double theta =
            half == 1 ? 1.0
                      : std::pow(10000.0, -static_cast<double>(j) / static_cast<double>(half - 1));
        const double a = static_cast<double>(n) * theta;
        const Index i = g * head_dim + 2 * j;
        y(n, i) = x(n, i) * std::cos(a) - x(n, i + 1) * std::sin(a);
        y(n, i + 1) = x(n, i + 1) * std::cos(a) + x(n, i) * std::sin(a);
      }
  return y;
}

/// Weights of the RMT attention layer, torch layout.
struct LayerParams {
  Index heads = 1;
  std::vector<double> gammas;
  Mat wq, wk, wv, wo;  // [C, C], [C, C], [Cv, C], [C, Cv]
  std::vector<double> bq, bk, bv, bo;
  std::vector<double> lce_weight, lce_bias;  // [Cv, 1, 5, 5] flattened, [Cv]
};

/// The RMT attention layer on one image x [H*W, C] (SPEC 4): q, k, v projections, k / sqrt(dk),
/// rotation by raster index, per-head MaSA (decomposed = false) or MaSAD, plus LCE(v), output
/// projection.
inline Mat layer(const Mat& x, Index H, Index W, const LayerParams& p, bool decomposed) {
  const Index C = p.wq.rows(), Cv = p.wv.rows();
  const Index dk = C / p.heads, dv = Cv / p.heads;
  Mat q = linear(x, p.wq, p.bq);
  Mat k = linear(x, p.wk, p.bk);
  const Mat v = linear(x, p.wv, p.bv);
  k *= 1.0 / std::sqrt(static_cast<double>(dk));
  q = rotate(q, dk);
  k = rotate(k, dk);
  Mat attn(H * W, Cv);
  for (Index h = 0; h < p.heads; ++h) {
    const Mat qh = q.middleCols(h * dk, dk), kh = k.middleCols(h * dk, dk),
              vh = v.middleCols(h * dv, dv);
    const double g = p.gammas[static_cast<std::size_t>(h)];
    attn.middleCols(h * dv, dv) =
        decomposed ? masad(qh, kh, vh, g, H, W) : masa(qh, kh, vh, g, H, W);
  }
  const Mat mixed = attn + lce(v, H, W, p.lce_weight, p.lce_bias);
  return linear(mixed, p.wo, p.bo);
}

}  // namespace rmt_reference
