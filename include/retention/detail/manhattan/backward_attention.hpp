// retention::detail: tiled softmax attention with an additive log-weight mask, forward (saving the
// per-row log-sum-exp) and backward (docs/math.md §7.5), shared by MaSA (a 2-D separable mask over
// the whole grid) and MaSAD (1-D masks along grid lines). Nothing here knows a gamma formula: the
// log-weights come from a LogTile functor fed by the decay masks' own tables.
#pragma once

#include <retention/core.hpp>
#include <retention/detail/manhattan/careful_rows.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace retention {
namespace detail {

template <class T>
using GradConstMap = Eigen::Map<const Matrix<T>, 0, Eigen::OuterStride<>>;
template <class T>
using GradMap = Eigen::Map<Matrix<T>, 0, Eigen::OuterStride<>>;
template <class T>
using GradConstVec = Eigen::Map<const Vector<T>, 0, Eigen::InnerStride<>>;
template <class T>
using GradVec = Eigen::Map<Vector<T>, 0, Eigen::InnerStride<>>;
/// A dense [rows, cols] tile of a workspace buffer.
template <class T>
using GradTile = Eigen::Map<Matrix<T>>;

/// Rows [r0, r0 + rows) of a strided matrix, as a map of the same kind.
template <class T>
GradConstMap<T> grad_rows(const GradConstMap<T>& m, Index r0, Index rows) {
  return GradConstMap<T>(m.data() + r0 * m.outerStride(), rows, m.cols(),
                         Eigen::OuterStride<>(m.outerStride()));
}
template <class T>
GradMap<T> grad_rows(GradMap<T> m, Index r0, Index rows) {
  return GradMap<T>(m.data() + r0 * m.outerStride(), rows, m.cols(),
                    Eigen::OuterStride<>(m.outerStride()));
}

/// Per-thread buffers of the tiled kernels: O(query_tile * (key_tile + dv)), independent of N.
template <class T>
struct AttentionWorkspace {
  Matrix<T> s;                        // [query_tile, key_tile] logits, then probabilities
  Matrix<T> dp;                       // [query_tile, key_tile] dP, then dS (backward)
  Matrix<T> acc;                      // [query_tile, dv] unnormalised output (forward)
  Vector<T> row_max, row_sum, scale;  // [query_tile] online softmax state (forward)

  AttentionWorkspace(Index query_tile, Index key_tile, Index dv)
      : s(query_tile, key_tile),
        dp(query_tile, key_tile),
        acc(query_tile, dv),
        row_max(query_tile),
        row_sum(query_tile),
        scale(query_tile) {}
};

/// out = softmax_row(Q K^T + ln D) V and lse[n] = log sum_m exp(q_n . k_m + ln D[n, m]), streaming
/// over [query_tile, key_tile] tiles with an online softmax (running row max and sum).
/// Q [N, dk], K [M, dk], V [M, dv], out [N, dv], lse [N]. log_tile(n0, m0, tile) writes ln D over
/// the tile (-inf where masked) and returns false when every entry is -inf (the tile is skipped).
/// A row with every key masked gets out = 0 and lse = -inf.
template <class T, class LogTile>
void attention_forward(const GradConstMap<T>& Q, const GradConstMap<T>& K, const GradConstMap<T>& V,
                       const LogTile& log_tile, Index query_tile, Index key_tile, GradMap<T> out,
                       GradVec<T> lse, AttentionWorkspace<T>& ws) {
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  const Index N = Q.rows(), M = K.rows(), dv = V.cols();
  for (Index n0 = 0; n0 < N; n0 += query_tile) {
    const Index rows = std::min(query_tile, N - n0);
    const GradConstMap<T> Qi = grad_rows(Q, n0, rows);
    Eigen::Map<Vector<T>> row_max(ws.row_max.data(), rows), row_sum(ws.row_sum.data(), rows),
        scale(ws.scale.data(), rows);
    GradTile<T> acc(ws.acc.data(), rows, dv);
    row_max.setConstant(neg_inf);
    row_sum.setZero();
    bool first = true;  // acc holds nothing yet: the first product overwrites it
    for (Index m0 = 0; m0 < M; m0 += key_tile) {
      const Index cols = std::min(key_tile, M - m0);
      GradTile<T> S(ws.s.data(), rows, cols);
      if (!log_tile(n0, m0, S)) continue;
      S.noalias() += Qi * grad_rows(K, m0, cols).transpose();
      // Row by row: a contiguous row keeps exp vectorised (a broadcast column would not).
      for (Index i = 0; i < rows; ++i) {
        const T m_new = std::max(row_max(i), S.row(i).maxCoeff());
        // A row whose keys so far are all masked keeps max -inf; exponents are then taken
        // relative to 0 so that exp(-inf - 0) = 0 instead of exp(-inf + inf) = NaN.
        const T ref = m_new == neg_inf ? T(0) : m_new;
        scale(i) = std::exp(row_max(i) - ref);
        row_max(i) = m_new;
        S.row(i) = (S.row(i).array() - ref).exp();
        row_sum(i) = row_sum(i) * scale(i) + S.row(i).sum();
      }
      if (first) {
        acc.noalias() = S * grad_rows(V, m0, cols);
        first = false;
      } else {
        for (Index i = 0; i < rows; ++i) acc.row(i) *= scale(i);
        acc.noalias() += S * grad_rows(V, m0, cols);
      }
    }
    for (Index i = 0; i < rows; ++i) {
      // Exactly 0 only when every key is masked (the row max contributes exp(0) = 1 otherwise); a
      // NaN sum is not such a row and must reach out and lse (docs/math.md §2.6).
      if (row_sum(i) == T(0)) {
        out.row(n0 + i).setZero();
        lse(n0 + i) = neg_inf;
      } else {
        out.row(n0 + i) = acc.row(i) / row_sum(i);
        lse(n0 + i) = row_max(i) + std::log(row_sum(i));
      }
    }
  }
}

/// Backward of attention_forward (docs/math.md §7.5): with P = exp(Q K^T + ln D - lse) recomputed
/// tile by tile and G = dL/dout, ADDS dV += P^T G, dQ += dS K, dK += dS^T Q, where dS = P (.) (G
/// V^T
/// - delta) and delta[n] = rowsum(G (.) out)[n] = sum_m P[n, m] (G V^T)[n, m].
/// `shift` [N] is lse with -inf (a fully masked row) replaced by +inf, so that such a row's P is
/// exp(-inf) = 0; `delta` [N]. Nothing of size N x N is formed.
template <class T, class LogTile>
void attention_backward(const GradConstMap<T>& Q, const GradConstMap<T>& K,
                        const GradConstMap<T>& V, const GradConstMap<T>& G, const Vector<T>& shift,
                        const Vector<T>& delta, const LogTile& log_tile, Index query_tile,
                        Index key_tile, GradMap<T> dQ, GradMap<T> dK, GradMap<T> dV,
                        AttentionWorkspace<T>& ws) {
  const Index N = Q.rows(), M = K.rows();
  // Key tiles outside, query tiles inside: dK and dV of a key tile stay in cache while the query
  // tiles stream past.
  for (Index m0 = 0; m0 < M; m0 += key_tile) {
    const Index cols = std::min(key_tile, M - m0);
    const GradConstMap<T> Kj = grad_rows(K, m0, cols), Vj = grad_rows(V, m0, cols);
    GradMap<T> dKj = grad_rows(dK, m0, cols), dVj = grad_rows(dV, m0, cols);
    for (Index n0 = 0; n0 < N; n0 += query_tile) {
      const Index rows = std::min(query_tile, N - n0);
      GradTile<T> S(ws.s.data(), rows, cols), dS(ws.dp.data(), rows, cols);
      if (!log_tile(n0, m0, S)) continue;
      const GradConstMap<T> Qi = grad_rows(Q, n0, rows), Gi = grad_rows(G, n0, rows);
      S.noalias() += Qi * Kj.transpose();
      // Row by row: a contiguous row keeps exp vectorised (a broadcast column would not).
      for (Index i = 0; i < rows; ++i) S.row(i) = (S.row(i).array() - shift(n0 + i)).exp();
      dVj.noalias() += S.transpose() * Gi;
      dS.noalias() = Gi * Vj.transpose();
      for (Index i = 0; i < rows; ++i)
        dS.row(i) = S.row(i).array() * (dS.row(i).array() - delta(n0 + i));
      grad_rows(dQ, n0, rows).noalias() += dS * Kj;
      dKj.noalias() += dS.transpose() * Qi;
    }
  }
}

/// Whether a saved log-sum-exp holds only finite values or -inf (a fully masked row).
template <class T>
bool grad_lse_usable(const GradConstVec<T>& lse) {
  for (Index n = 0; n < lse.size(); ++n) {
    const T l = lse(n);
    if (std::isnan(l) || l == std::numeric_limits<T>::infinity()) return false;
  }
  return true;
}

/// The careful backward of docs/math.md §2.6, taken only when some input of a head is Inf or NaN:
/// for each query n < rows, the softmax over the keys m whose log_weight(n, m) is > -inf is
/// recomputed in double from q and k (nothing saved is read), then dZ[n, m] = P (dP - delta) with
/// dP = g_n . v_m and delta = sum_m P dP, over those keys only. A masked pair is skipped (never
/// -inf + q.k, 0 * Inf or 0 * NaN), so dQ_n reads only the keys row n weighs, and dK_m, dV_m only
/// the queries that weigh key m; a NaN logit makes its row's P NaN. ADDS into dq [rows, dk], dk
/// [keys, dk], dv [keys, dv] (row strides lddq, lddk, lddv); q [rows, dk], k [keys, dk], v [keys,
/// dv], g [rows, dv] at row strides ldq, ldk, ldv, ldg. The outputs must not overlap the inputs.
/// Never inlined: the rare path stays out of the fast kernels' code.
template <class T, class LogWeight>
EIGEN_DONT_INLINE void attention_backward_careful(const T* q, Index ldq, const T* k, Index ldk,
                                                  const T* v, Index ldv, const T* g, Index ldg,
                                                  Index rows, Index keys, Index dk, Index dv,
                                                  const LogWeight& log_weight, T* dq, Index lddq,
                                                  T* dkey, Index lddk, T* dval, Index lddv) {
  using A = double;
  using Strided = Eigen::Map<const Matrix<T>, 0, Eigen::OuterStride<>>;
  using StridedOut = Eigen::Map<Matrix<T>, 0, Eigen::OuterStride<>>;
  const Matrix<A> qd = Strided(q, rows, dk, Eigen::OuterStride<>(ldq)).template cast<A>();
  const Matrix<A> kd = Strided(k, keys, dk, Eigen::OuterStride<>(ldk)).template cast<A>();
  const Matrix<A> vd = Strided(v, keys, dv, Eigen::OuterStride<>(ldv)).template cast<A>();
  const Matrix<A> gd = Strided(g, rows, dv, Eigen::OuterStride<>(ldg)).template cast<A>();
  Matrix<A> dk_acc = Matrix<A>::Zero(keys, dk), dv_acc = Matrix<A>::Zero(keys, dv);
  Eigen::Matrix<A, 1, Eigen::Dynamic> dq_row(dk);
  std::vector<A> p(static_cast<std::size_t>(keys)), dp(static_cast<std::size_t>(keys));
  std::vector<Index> key(static_cast<std::size_t>(keys));
  StridedOut dQ(dq, rows, dk, Eigen::OuterStride<>(lddq));
  for (Index n = 0; n < rows; ++n) {
    A mx;
    const std::size_t seen =
        careful_row_logits(qd, kd, n, keys, log_weight, p.data(), key.data(), mx);
    if (seen == 0) continue;  // no key: P = 0, nothing to add
    A sum = 0;
    for (std::size_t i = 0; i < seen; ++i) sum += (p[i] = std::exp(p[i] - mx));
    A delta = 0;
    for (std::size_t i = 0; i < seen; ++i) {
      p[i] /= sum;
      dp[i] = gd.row(n).dot(vd.row(key[i]));
      delta += p[i] * dp[i];
    }
    dq_row.setZero();
    for (std::size_t i = 0; i < seen; ++i) {
      const Index m = key[i];
      const A dz = p[i] * (dp[i] - delta);
      dq_row += dz * kd.row(m);
      dk_acc.row(m) += dz * qd.row(n);
      dv_acc.row(m) += p[i] * gd.row(n);
    }
    dQ.row(n) += dq_row.template cast<T>();
  }
  StridedOut(dkey, keys, dk, Eigen::OuterStride<>(lddk)) += dk_acc.template cast<T>();
  StridedOut(dval, keys, dv, Eigen::OuterStride<>(lddv)) += dv_acc.template cast<T>();
}

/// shift and delta of attention_backward for rows [0, N) (both must hold at least N entries):
/// shift = lse (+inf where -inf), delta = rowsum(G (.) out), accumulated in double (it is
/// subtracted from G V^T, where float cancellation would otherwise show).
template <class T>
void attention_row_terms(const GradConstMap<T>& out, const GradConstMap<T>& G,
                         const GradConstVec<T>& lse, Vector<T>& shift, Vector<T>& delta) {
  const Index N = out.rows();
  for (Index n = 0; n < N; ++n) {
    const T l = lse(n);
    shift(n) = l == -std::numeric_limits<T>::infinity() ? std::numeric_limits<T>::infinity() : l;
    // Four sums, so that the adds do not wait for each other.
    const T* o = out.data() + n * out.outerStride();
    const T* g = G.data() + n * G.outerStride();
    double d[4] = {0.0, 0.0, 0.0, 0.0};
    Index c = 0;
    for (; c + 4 <= out.cols(); c += 4)
      for (int r = 0; r < 4; ++r)
        d[r] += static_cast<double>(o[c + r]) * static_cast<double>(g[c + r]);
    for (; c < out.cols(); ++c) d[0] += static_cast<double>(o[c]) * static_cast<double>(g[c]);
    delta(n) = static_cast<T>((d[0] + d[1]) + (d[2] + d[3]));
  }
}

}  // namespace detail
}  // namespace retention
