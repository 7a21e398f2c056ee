// Naive double-precision MaSA / MaSAD forward and backward (SPEC 4 and 7), written straight from
// the equations with explicit [N, N] matrices, explicit masks (distances computed here, not by the
// library's decay classes) and explicit loops. It shares no code with the library's kernels.
#pragma once

#include <retention/core.hpp>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>

namespace masa_backward_reference {

using retention::Index;
using Mat = retention::Matrix<double>;
using Vec = retention::Vector<double>;

/// The two 2-D masks of SPEC 1: Manhattan (symmetric along each axis) and quadrant-causal (causal
/// along each axis).
enum class MaskKind { manhattan, quadrant_causal };

/// ln of the 1-D factor between positions a (query) and b (key) along one axis.
inline double axis_log(MaskKind kind, double gamma, Index a, Index b) {
  const double lg = std::log(gamma);
  if (kind == MaskKind::manhattan) return static_cast<double>(std::abs(a - b)) * lg;
  if (b > a) return -std::numeric_limits<double>::infinity();
  return static_cast<double>(a - b) * lg;
}

/// ln D over the H x W grid in raster order: axis_log along y plus axis_log along x.
inline Mat grid_log_mask(MaskKind kind, double gamma, Index H, Index W) {
  const Index N = H * W;
  Mat L(N, N);
  for (Index n = 0; n < N; ++n)
    for (Index m = 0; m < N; ++m)
      L(n, m) = axis_log(kind, gamma, n / W, m / W) + axis_log(kind, gamma, n % W, m % W);
  return L;
}

/// MaSAD's row pass as an [N, N] mask: keys in the query's grid row, weighted along x.
inline Mat row_pass_log_mask(MaskKind kind, double gamma, Index H, Index W) {
  const Index N = H * W;
  Mat L = Mat::Constant(N, N, -std::numeric_limits<double>::infinity());
  for (Index n = 0; n < N; ++n)
    for (Index m = 0; m < N; ++m)
      if (n / W == m / W) L(n, m) = axis_log(kind, gamma, n % W, m % W);
  return L;
}

/// MaSAD's column pass as an [N, N] mask: keys in the query's grid column, weighted along y.
inline Mat column_pass_log_mask(MaskKind kind, double gamma, Index H, Index W) {
  const Index N = H * W;
  Mat L = Mat::Constant(N, N, -std::numeric_limits<double>::infinity());
  for (Index n = 0; n < N; ++n)
    for (Index m = 0; m < N; ++m)
      if (n % W == m % W) L(n, m) = axis_log(kind, gamma, n / W, m / W);
  return L;
}

struct Attention {
  Mat P;    // [N, N] softmax_row(Q K^T + L)
  Mat O;    // [N, dv] P V
  Vec lse;  // [N] log sum_m exp(q_n . k_m + L[n, m])
};

/// Dense softmax attention with an additive log mask, every step spelled out.
inline Attention attention(const Mat& Q, const Mat& K, const Mat& V, const Mat& L) {
  const Index N = Q.rows(), M = K.rows();
  Attention a;
  a.P.resize(N, M);
  a.lse.resize(N);
  for (Index n = 0; n < N; ++n) {
    double mx = -std::numeric_limits<double>::infinity();
    for (Index m = 0; m < M; ++m) {
      double s = L(n, m);
      for (Index c = 0; c < Q.cols(); ++c) s += Q(n, c) * K(m, c);
      a.P(n, m) = s;
      mx = std::max(mx, s);
    }
    double sum = 0.0;
    for (Index m = 0; m < M; ++m) sum += (a.P(n, m) = std::exp(a.P(n, m) - mx));
    for (Index m = 0; m < M; ++m) a.P(n, m) /= sum;
    a.lse(n) = mx + std::log(sum);
  }
  a.O = Mat::Zero(N, V.cols());
  for (Index n = 0; n < N; ++n)
    for (Index m = 0; m < M; ++m)
      for (Index c = 0; c < V.cols(); ++c) a.O(n, c) += a.P(n, m) * V(m, c);
  return a;
}

struct Grads {
  Mat dQ, dK, dV;
};

/// SPEC 7 for one softmax attention: dV = P^T G, dP = G V^T, dS = P (.) (dP - rowsum(G (.) O)),
/// dQ = dS K, dK = dS^T Q.
inline Grads attention_backward(const Mat& Q, const Mat& K, const Mat& V, const Mat& L,
                                const Mat& G) {
  const Attention a = attention(Q, K, V, L);
  const Index N = Q.rows(), M = K.rows();
  Grads g;
  g.dV = Mat::Zero(M, V.cols());
  for (Index m = 0; m < M; ++m)
    for (Index n = 0; n < N; ++n)
      for (Index c = 0; c < V.cols(); ++c) g.dV(m, c) += a.P(n, m) * G(n, c);
  Mat dS(N, M);
  for (Index n = 0; n < N; ++n) {
    double rowsum = 0.0;
    for (Index c = 0; c < V.cols(); ++c) rowsum += G(n, c) * a.O(n, c);
    for (Index m = 0; m < M; ++m) {
      double dp = 0.0;
      for (Index c = 0; c < V.cols(); ++c) dp += G(n, c) * V(m, c);
      dS(n, m) = a.P(n, m) * (dp - rowsum);
    }
  }
  g.dQ = Mat::Zero(N, Q.cols());
  g.dK = Mat::Zero(M, Q.cols());
  for (Index n = 0; n < N; ++n)
    for (Index m = 0; m < M; ++m)
      for (Index c = 0; c < Q.cols(); ++c) {
        g.dQ(n, c) += dS(n, m) * K(m, c);
        g.dK(m, c) += dS(n, m) * Q(n, c);
      }
  return g;
}

/// MaSA forward: P, O and lse over the grid.
inline Attention masa(const Mat& Q, const Mat& K, const Mat& V, MaskKind kind, double gamma,
                      Index H, Index W) {
  return attention(Q, K, V, grid_log_mask(kind, gamma, H, W));
}

inline Grads masa_backward(const Mat& Q, const Mat& K, const Mat& V, MaskKind kind, double gamma,
                           Index H, Index W, const Mat& G) {
  return attention_backward(Q, K, V, grid_log_mask(kind, gamma, H, W), G);
}

struct Masad {
  Mat u, O;
  Vec row_lse, column_lse;
};

/// MaSAD forward: the row pass u (along x), then the column pass (along y) on u.
inline Masad masad(const Mat& Q, const Mat& K, const Mat& V, MaskKind kind, double gamma, Index H,
                   Index W) {
  const Attention r = attention(Q, K, V, row_pass_log_mask(kind, gamma, H, W));
  const Attention c = attention(Q, K, r.O, column_pass_log_mask(kind, gamma, H, W));
  return {r.O, c.O, r.lse, c.lse};
}

/// MaSAD backward: the column pass backward gives dQ, dK parts and dU; the row pass backward with
/// dU as its upstream gradient gives the other dQ, dK parts and dV.
inline Grads masad_backward(const Mat& Q, const Mat& K, const Mat& V, MaskKind kind, double gamma,
                            Index H, Index W, const Mat& G) {
  const Mat Lr = row_pass_log_mask(kind, gamma, H, W), Lc = column_pass_log_mask(kind, gamma, H, W);
  const Mat u = attention(Q, K, V, Lr).O;
  const Grads c = attention_backward(Q, K, u, Lc, G);
  const Grads r = attention_backward(Q, K, V, Lr, c.dV);
  return {c.dQ + r.dQ, c.dK + r.dK, r.dV};
}

}  // namespace masa_backward_reference
