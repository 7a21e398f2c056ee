// retention::detail: pieces shared by the three retention backward passes (docs/math.md §7): the
// arguments every form takes, the per-row factors of the normalisations, the checks, and the
// casts between the inputs' type and the state's.
//
// Every form back-propagates through the same decomposition. Row n of the forward output is
// o_n = a_n u_n with u_n = q_n S_n (the un-normalised row, S_n the state after token n, S_init
// included) and a_n = c_n / max(|r_n|, 1) (or c_n, or 1), where r_n = c_n s_n, s_n = q_n . z_n,
// c_n = 1 / sqrt(decay_sum(p0 + n)). So
//   dL/du_n = a_n G_n                                     (the "scaled" upstream gradient Gu)
//   dL/ds_n = gs_n = -c_n^2 (G_n . u_n) / (r_n |r_n|)     where |r_n| > 1 and the normaliser is
//                                                         not detached, else 0.
// s_n = q_n z_n is retention with a value column of ones, so the score path is the state path with
// V augmented by a column of ones and Gu by the column gs: dP = (Gu V^T + gs 1^T) (.) D, and z
// carries its gradient dz next to dS. The backward_*.hpp files implement this per form.
#pragma once

#include <retention/core.hpp>
#include <retention/detail/overlap.hpp>
#include <retention/detail/retention/common.hpp>
#include <retention/state.hpp>

#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

namespace retention {
namespace detail {

/// What a backward kernel needs besides Q, K, V, the mask and dO (checked by the caller).
template <class Acc>
struct BackwardArgs {
  Normalization normalization = Normalization::none;
  /// Treat max(|r_n|, 1) of decay_and_score as a constant (gs = 0).
  bool detach_score_normalizer = false;
  const RetentionState<Acc>* init = nullptr;
  /// dL/dS_final and dL/dz_final; nullptr = zero.
  const RetentionState<Acc>* final_grad = nullptr;
  /// Receives dL/dS_init and dL/dz_init (position copied from init) when set; requires init.
  RetentionState<Acc>* d_init = nullptr;

  Index start_position() const { return init ? init->position : 0; }
  bool score_path() const {
    return normalization == Normalization::decay_and_score && !detach_score_normalizer;
  }
};

/// dL/du_n = a G_n and dL/ds_n = gs for one row (see the top of this file).
struct BackwardRowFactors {
  double a = 1.0;
  double gs = 0.0;
};

/// Row factors at absolute position p, from the raw score s_n = q_n . z_n and g_dot_u = G_n . u_n
/// (only read on the exact decay_and_score path). At |r_n| = 1 exactly, where the derivative does
/// not exist, the clamped branch (gs = 0) is taken, as max(|r|, 1) picks 1 there.
template <class Mask>
BackwardRowFactors backward_row_factors(const Mask& decay, Normalization normalization, bool detach,
                                        Index p, double s, double g_dot_u) {
  BackwardRowFactors f;
  if (normalization == Normalization::none) return f;
  const double c = 1.0 / std::sqrt(decay.decay_sum(p));
  f.a = c;
  if (normalization == Normalization::decay) return f;
  const double r = c * s;
  const double abs_r = std::abs(r);
  if (!(abs_r > 1.0)) return f;
  f.a = c / abs_r;
  // o = c u / |r|: dL/dr = -(G . o) / r = -c (G . u) / (r |r|), and ds = c dr.
  if (!detach) f.gs = -c * c * g_dot_u / (r * abs_r);
  return f;
}

/// Rows of a T buffer as the state type: the buffer itself when the types agree, else a cast copy
/// (the wide-state path, where products with the state run in the state's type).
template <class T, class Acc>
struct AccRows {
  Matrix<Acc> buffer;
  AccRows(Index rows, Index cols) : buffer(rows, cols) {}
  const Matrix<Acc>& of(const Matrix<T>& x, Index rows) {
    buffer.topRows(rows) = x.topRows(rows).template cast<Acc>();
    return buffer;
  }
};
template <class T>
struct AccRows<T, T> {
  AccRows(Index, Index) {}
  const Matrix<T>& of(const Matrix<T>& x, Index) { return x; }
};

/// dst (type T) += lhs * rhs (type Acc): in place when the types agree, through a temporary in
/// Acc otherwise.
template <class Dst, class Lhs, class Rhs>
void add_product(Dst&& dst, const Lhs& lhs, const Rhs& rhs) {
  using T = typename std::decay_t<Dst>::Scalar;
  using Acc = typename Lhs::Scalar;
  if constexpr (std::is_same<T, Acc>::value) {
    dst.noalias() += lhs * rhs;
  } else {
    const Matrix<Acc> p = lhs * rhs;
    dst += p.template cast<T>();
  }
}

/// Checks of a backward call shared by the three forms (the forward's checks plus dO and the
/// final-state gradient).
template <class DQ, class DK, class DV, class DG, class Acc>
void check_backward(const char* fn, const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                    const Eigen::MatrixBase<DV>& V, const Eigen::MatrixBase<DG>& dO,
                    Normalization normalization, const RetentionState<Acc>* init,
                    const RetentionState<Acc>* final_grad) {
  check_qkv(fn, Q, K, V);
  check_shape(fn, "dO", dO, Q.rows(), V.cols());
  check_normalization_value(fn, normalization);
  const Index dk = Q.cols(), dv = V.cols();
  if (init) {
    check_state(fn, *init, dk, dv);
    check_position_range(fn, "initial_state.position", init->position, Q.rows());
  }
  if (final_grad) {
    // A gradient has no position of its own; only S and z are checked.
    if (final_grad->S.rows() != dk || final_grad->S.cols() != dv)
      fail(fn, "final_state_gradient.S is " +
                   shape_string(final_grad->S.rows(), final_grad->S.cols()) + ", expected " +
                   shape_string(dk, dv));
    if (final_grad->z.size() != dk)
      fail(fn, "final_state_gradient.z is " + shape_string(final_grad->z.size(), 1) +
                   ", expected " + shape_string(dk, 1));
  }
}

/// A list of per-pair states (index b * heads + h): `count` of them, each S [dk, dv] and z [dk];
/// positions >= 0 when `positions` (a gradient's position means nothing).
template <class Acc>
void check_state_list(const char* fn, const char* name,
                      const std::vector<RetentionState<Acc>>& list, Index count, Index dk, Index dv,
                      bool positions) {
  if (static_cast<Index>(list.size()) != count)
    fail(fn, std::string(name) + " has " + std::to_string(list.size()) +
                 " states, expected batch * heads = " + std::to_string(count));
  for (std::size_t i = 0; i < list.size(); ++i) {
    const std::string element = std::string(name) + "[" + std::to_string(i) + "]";
    const RetentionState<Acc>& s = list[i];
    if (s.S.rows() != dk || s.S.cols() != dv)
      fail(fn, element + ".S is " + shape_string(s.S.rows(), s.S.cols()) + ", expected " +
                   shape_string(dk, dv));
    if (s.z.size() != dk)
      fail(fn,
           element + ".z is " + shape_string(s.z.size(), 1) + ", expected " + shape_string(dk, 1));
    if (positions && s.position < 0)
      fail(fn, element + ".position is " + std::to_string(s.position) + ", expected >= 0");
  }
}

/// Output shapes of the _into variants, and no output sharing memory with an input or another
/// output (the kernels write dQ before they have read the last of K, for one).
template <class OQ, class OK, class OV, class DQ, class DK, class DV, class DG>
void check_gradient_outputs(const char* fn, const Eigen::MatrixBase<OQ>& dQ,
                            const Eigen::MatrixBase<OK>& dK, const Eigen::MatrixBase<OV>& dV,
                            const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                            const Eigen::MatrixBase<DV>& V, const Eigen::MatrixBase<DG>& dO) {
  check_shape(fn, "dQ", dQ, Q.rows(), Q.cols());
  check_shape(fn, "dK", dK, Q.rows(), Q.cols());
  check_shape(fn, "dV", dV, Q.rows(), V.cols());
  auto inputs = [&](const char* name, const auto& out) {
    check_no_overlap(fn, name, out, "Q", Q);
    check_no_overlap(fn, name, out, "K", K);
    check_no_overlap(fn, name, out, "V", V);
    check_no_overlap(fn, name, out, "dO", dO);
  };
  inputs("dQ", dQ);
  inputs("dK", dK);
  inputs("dV", dV);
  check_no_overlap(fn, "dK", dK, "dQ", dQ);
  check_no_overlap(fn, "dV", dV, "dQ", dQ);
  check_no_overlap(fn, "dV", dV, "dK", dK);
}

}  // namespace detail
}  // namespace retention
