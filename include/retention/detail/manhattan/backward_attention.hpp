// retention::detail: what the MaSA and MaSAD backward kernels share (docs/math.md §7.5): the
// strided maps they take, the checks of a saved log-sum-exp, each row's shift and delta, and the
// careful backward for inputs that hold an Inf or NaN. Nothing here knows a gamma formula: the
// log-weights come from the decay masks' own tables.
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
