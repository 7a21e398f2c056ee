// Naive double-precision evaluation of docs/math.md §5 (ViR: MHR, block, encoder), written straight
// from the formulas with explicit loops: a literal stride-p convolution over the [C, ch, p, p]
// weight, explicit causal decay sums gamma^(n-m), explicit LayerNorm and erf GELU. Parameters are
// addressed by the torch names and shapes of the ViR authors' code (models/vir.py: the output
// projection is retention.out_proj). It shares no code with the library.
#pragma once

#include <retention/core.hpp>

#include <cmath>
#include <map>
#include <string>
#include <vector>

namespace vir_reference {

using retention::Index;
using Mat = retention::Matrix<double>;  // storage only; all arithmetic below is explicit loops

struct Config {
  Index dim = 16;
  Index heads = 2;
  Index depth = 2;
  Index hidden = 64;
  Index patch = 4;
  Index channels = 3;
  Index grid = 4;  // training grid of the position embedding (grid x grid patches)
  double eps = 1e-6;
  std::vector<double> gammas;  // empty = linspace
};

/// name -> (torch shape, values in torch's contiguous order).
struct Param {
  std::vector<Index> shape;
  std::vector<double> values;
};
using Params = std::map<std::string, Param>;

/// SPEC 1 `linspace`: gamma_h = 1 - 2^(-5 - 4h/(H-1)); H = 1 gives 1 - 1/32.
inline std::vector<double> gammas_of(const Config& c) {
  if (!c.gammas.empty()) return c.gammas;
  std::vector<double> g;
  for (Index h = 0; h < c.heads; ++h) {
    const double t = c.heads == 1 ? 0.0 : static_cast<double>(h) / static_cast<double>(c.heads - 1);
    g.push_back(1.0 - std::pow(2.0, -5.0 - 4.0 * t));
  }
  return g;
}

/// The torch names and shapes of the encoder's parameters (and of block d's with prefix blocks.d.).
inline std::vector<std::pair<std::string, std::vector<Index>>> parameter_shapes(const Config& c) {
  const Index C = c.dim;
  std::vector<std::pair<std::string, std::vector<Index>>> s = {
      {"patch_embed.proj.weight", {C, c.channels, c.patch, c.patch}},
      {"patch_embed.proj.bias", {C}},
      {"pos_embed", {1, c.grid * c.grid, C}},
      {"cls_token", {1, 1, C}}};
  for (Index d = 0; d < c.depth; ++d) {
    const std::string p = "blocks." + std::to_string(d) + ".";
    s.push_back({p + "norm1.weight", {C}});
    s.push_back({p + "norm1.bias", {C}});
    s.push_back({p + "retention.qkv.weight", {3 * C, C}});
    s.push_back({p + "retention.qkv.bias", {3 * C}});
    s.push_back({p + "retention.out_proj.weight", {C, C}});
    s.push_back({p + "retention.out_proj.bias", {C}});
    s.push_back({p + "ls1.gamma", {C}});
    s.push_back({p + "norm2.weight", {C}});
    s.push_back({p + "norm2.bias", {C}});
    s.push_back({p + "mlp.fc1.weight", {c.hidden, C}});
    s.push_back({p + "mlp.fc1.bias", {c.hidden}});
    s.push_back({p + "mlp.fc2.weight", {C, c.hidden}});
    s.push_back({p + "mlp.fc2.bias", {C}});
    s.push_back({p + "ls2.gamma", {C}});
  }
  s.push_back({"norm.weight", {C}});
  s.push_back({"norm.bias", {C}});
  return s;
}

inline const std::vector<double>& get(const Params& P, const std::string& name) {
  return P.at(name).values;
}

/// y[t, o] = b[o] + sum_i x[t, i] W[o, i]   (W in torch layout [out, in], flattened).
inline Mat linear(const Mat& x, const std::vector<double>& W, const std::vector<double>& b,
                  Index out) {
  const Index in = x.cols();
  Mat y(x.rows(), out);
  for (Index t = 0; t < x.rows(); ++t)
    for (Index o = 0; o < out; ++o) {
      double s = b[static_cast<std::size_t>(o)];
      for (Index i = 0; i < in; ++i) s += x(t, i) * W[static_cast<std::size_t>(o * in + i)];
      y(t, o) = s;
    }
  return y;
}

/// (x - mean) / sqrt(biased var + eps) * w + b, per row.
inline Mat layer_norm(const Mat& x, const std::vector<double>& w, const std::vector<double>& b,
                      double eps) {
  Mat y(x.rows(), x.cols());
  const double n = static_cast<double>(x.cols());
  for (Index t = 0; t < x.rows(); ++t) {
    double mean = 0.0;
    for (Index i = 0; i < x.cols(); ++i) mean += x(t, i);
    mean /= n;
    double var = 0.0;
    for (Index i = 0; i < x.cols(); ++i) var += (x(t, i) - mean) * (x(t, i) - mean);
    var /= n;
    for (Index i = 0; i < x.cols(); ++i)
      y(t, i) = (x(t, i) - mean) / std::sqrt(var + eps) * w[static_cast<std::size_t>(i)] +
                b[static_cast<std::size_t>(i)];
  }
  return y;
}

inline double gelu(double x) { return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0))); }

/// MHR (SPEC 5): [q|k|v] = x Wqkv^T + b, q *= head_dim^-1/2, per head
/// o_n = sum_{m <= n} gamma_h^(n-m) (q_n . k_m) v_m, y = concat(o) Wout^T + b. `prefix` e.g.
/// "blocks.0.".
inline Mat mhr(const Mat& x, const Params& P, const std::string& prefix, const Config& c) {
  const Index C = c.dim, H = c.heads, hd = C / H, T = x.rows();
  const Mat qkv = linear(x, get(P, prefix + "retention.qkv.weight"),
                         get(P, prefix + "retention.qkv.bias"), 3 * C);
  const std::vector<double> g = gammas_of(c);
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  Mat o = Mat::Zero(T, C);
  for (Index h = 0; h < H; ++h)
    for (Index n = 0; n < T; ++n)
      for (Index m = 0; m <= n; ++m) {
        double qk = 0.0;
        for (Index j = 0; j < hd; ++j) qk += qkv(n, h * hd + j) * scale * qkv(m, C + h * hd + j);
        const double w = std::pow(g[static_cast<std::size_t>(h)], static_cast<double>(n - m)) * qk;
        for (Index j = 0; j < hd; ++j) o(n, h * hd + j) += w * qkv(m, 2 * C + h * hd + j);
      }
  return linear(o, get(P, prefix + "retention.out_proj.weight"),
                get(P, prefix + "retention.out_proj.bias"), C);
}

/// Block (SPEC 5): x += ls1 * MHR(LN1 x); x += ls2 * fc2(GELU(fc1(LN2 x))).
inline Mat block(const Mat& x_in, const Params& P, const std::string& prefix, const Config& c) {
  Mat x = x_in;
  const Index C = c.dim;
  const Mat a =
      mhr(layer_norm(x, get(P, prefix + "norm1.weight"), get(P, prefix + "norm1.bias"), c.eps), P,
          prefix, c);
  const std::vector<double>& ls1 = get(P, prefix + "ls1.gamma");
  for (Index t = 0; t < x.rows(); ++t)
    for (Index i = 0; i < C; ++i) x(t, i) += ls1[static_cast<std::size_t>(i)] * a(t, i);
  Mat u =
      linear(layer_norm(x, get(P, prefix + "norm2.weight"), get(P, prefix + "norm2.bias"), c.eps),
             get(P, prefix + "mlp.fc1.weight"), get(P, prefix + "mlp.fc1.bias"), c.hidden);
  for (Index t = 0; t < u.rows(); ++t)
    for (Index i = 0; i < u.cols(); ++i) u(t, i) = gelu(u(t, i));
  const Mat m = linear(u, get(P, prefix + "mlp.fc2.weight"), get(P, prefix + "mlp.fc2.bias"), C);
  const std::vector<double>& ls2 = get(P, prefix + "ls2.gamma");
  for (Index t = 0; t < x.rows(); ++t)
    for (Index i = 0; i < C; ++i) x(t, i) += ls2[static_cast<std::size_t>(i)] * m(t, i);
  return x;
}

/// torch F.interpolate(bilinear, align_corners=False) source coordinate along one axis.
inline void source_index(Index dst, Index out_size, Index in_size, Index& i0, Index& i1,
                         double& frac) {
  double s = (static_cast<double>(dst) + 0.5) * static_cast<double>(in_size) /
                 static_cast<double>(out_size) -
             0.5;
  if (s < 0.0) s = 0.0;
  i0 = static_cast<Index>(std::floor(s));
  if (i0 > in_size - 1) i0 = in_size - 1;
  i1 = i0 + 1 < in_size ? i0 + 1 : i0;
  frac = s - static_cast<double>(i0);
}

/// Input tokens [N + 1, C]: token (gy, gx) = b + sum_{ci, ky, kx} W[c, ci, ky, kx] img[gy p + ky,
/// gx p + kx, ci]
/// + pos (resampled bilinearly when the grid differs), then the class token (no position) last.
inline Mat tokens(const std::vector<double>& img, Index H, Index W, const Params& P,
                  const Config& c) {
  const Index p = c.patch, ch = c.channels, C = c.dim, gh = H / p, gw = W / p, N = gh * gw,
              G = c.grid;
  const std::vector<double>& cw = get(P, "patch_embed.proj.weight");
  const std::vector<double>& cb = get(P, "patch_embed.proj.bias");
  const std::vector<double>& pos = get(P, "pos_embed");
  const std::vector<double>& cls = get(P, "cls_token");
  Mat x(N + 1, C);
  for (Index gy = 0; gy < gh; ++gy)
    for (Index gx = 0; gx < gw; ++gx)
      for (Index o = 0; o < C; ++o) {
        double s = cb[static_cast<std::size_t>(o)];
        for (Index ci = 0; ci < ch; ++ci)
          for (Index ky = 0; ky < p; ++ky)
            for (Index kx = 0; kx < p; ++kx)
              s += cw[static_cast<std::size_t>(((o * ch + ci) * p + ky) * p + kx)] *
                   img[static_cast<std::size_t>(((gy * p + ky) * W + (gx * p + kx)) * ch + ci)];
        Index y0, y1, x0, x1;
        double fy, fx;
        source_index(gy, gh, G, y0, y1, fy);
        source_index(gx, gw, G, x0, x1, fx);
        auto P_ = [&](Index yy, Index xx) {
          return pos[static_cast<std::size_t>((yy * G + xx) * C + o)];
        };
        s += (1 - fy) * (1 - fx) * P_(y0, x0) + (1 - fy) * fx * P_(y0, x1) +
             fy * (1 - fx) * P_(y1, x0) + fy * fx * P_(y1, x1);
        x(gy * gw + gx, o) = s;
      }
  for (Index o = 0; o < C; ++o) x(N, o) = cls[static_cast<std::size_t>(o)];
  return x;
}

/// Encoder (SPEC 5): tokens, depth blocks, final LayerNorm; all rows [N + 1, C] (row N = feature).
inline Mat encoder(const std::vector<double>& img, Index H, Index W, const Params& P,
                   const Config& c) {
  Mat x = tokens(img, H, W, P, c);
  for (Index d = 0; d < c.depth; ++d) x = block(x, P, "blocks." + std::to_string(d) + ".", c);
  return layer_norm(x, get(P, "norm.weight"), get(P, "norm.bias"), c.eps);
}

}  // namespace vir_reference
