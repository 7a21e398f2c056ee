// retention: row-wise normalisations used by the layers (docs/math.md §3 head norm, docs/math.md §5
// LayerNorm).
#pragma once

#include <retention/core.hpp>
#include <retention/detail/overlap.hpp>

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>

namespace retention {

/// Which per-head norm follows retention in the MSR layer.
enum class HeadNorm { rms, layer };

inline const char* to_string(HeadNorm n) { return n == HeadNorm::rms ? "rms" : "layer"; }

namespace detail {

/// group >= 1 dividing the column count; eps >= 0 and finite (a negative eps could take a root of
/// a negative, an infinite one would zero every row).
inline void check_groups(const char* fn, Index rows, Index cols, Index group, double eps) {
  if (group < 1 || cols % group != 0)
    fail(fn, "x is " + shape_string(rows, cols) + ", columns not a multiple of group " +
                 std::to_string(group));
  if (!(eps >= 0.0) || !std::isfinite(eps))
    fail(fn, "eps must be >= 0 and finite, got " + std::to_string(eps));
}

/// 1 / sqrt(v + eps), or 0 where v + eps == 0: a group with nothing to normalise (all zero, or
/// constant for LayerNorm, at eps = 0) stays 0 instead of becoming 0/0 = NaN. A NaN v stays NaN.
inline double inverse_root(double v, double eps) {
  const double s = v + eps;
  return s == 0.0 ? 0.0 : 1.0 / std::sqrt(s);
}

template <class X>
void layer_norm_groups_impl(X& x, Index group, double eps) {
  using T = typename std::decay_t<X>::Scalar;
  if (x.cols() == 0) return;  // a [2^40 x 0] view is valid and empty
  for (Index t = 0; t < x.rows(); ++t)
    for (Index g = 0; g < x.cols(); g += group) {
      auto seg = x.row(t).segment(g, group);
      const double mean = static_cast<double>(seg.sum()) / static_cast<double>(group);
      seg.array() -= static_cast<T>(mean);
      const double var = static_cast<double>(seg.squaredNorm()) / static_cast<double>(group);
      seg *= static_cast<T>(inverse_root(var, eps));
    }
}

}  // namespace detail

/// RMSNorm without weight, applied in place to each group of `group` columns of each row:
/// x * (mean(x^2) + eps)^(-1/2). [T, k*group]; eps >= 0 and finite. A group with
/// mean(x^2) + eps == 0 (all zero at eps = 0, e.g. a fresh zero-weight layer) stays 0.
template <class Derived>
void rms_norm_groups(Derived&& x, Index group, double eps) {
  detail::assert_dense_output<Derived>();
  detail::check_groups("rms_norm_groups", x.rows(), x.cols(), group, eps);
  using T = typename std::decay_t<Derived>::Scalar;
  if (x.cols() == 0) return;  // a [2^40 x 0] view is valid and empty
  for (Index t = 0; t < x.rows(); ++t)
    for (Index g = 0; g < x.cols(); g += group) {
      auto seg = x.row(t).segment(g, group);
      const double ms = static_cast<double>(seg.squaredNorm()) / static_cast<double>(group);
      seg *= static_cast<T>(detail::inverse_root(ms, eps));
    }
}

/// LayerNorm without affine, in place, per group of `group` columns: (x - mean) / sqrt(var + eps),
/// biased variance (torch GroupNorm / LayerNorm convention); eps >= 0 and finite. A group with
/// var + eps == 0 (constant at eps = 0) becomes 0.
template <class Derived>
void layer_norm_groups(Derived&& x, Index group, double eps) {
  detail::assert_dense_output<Derived>();
  detail::check_groups("layer_norm_groups", x.rows(), x.cols(), group, eps);
  detail::layer_norm_groups_impl(x, group, eps);
}

/// LayerNorm with affine over the full row, out of place: y = (x - mean)/sqrt(var + eps) * w + b.
/// x [T, d], weight and bias vectors of d entries; eps >= 0 and finite (a constant row at eps = 0
/// gives y = b).
template <class Derived, class WDerived, class BDerived>
Matrix<typename Derived::Scalar> layer_norm(const Eigen::MatrixBase<Derived>& x,
                                            const Eigen::MatrixBase<WDerived>& weight,
                                            const Eigen::MatrixBase<BDerived>& bias, double eps) {
  using T = typename Derived::Scalar;
  const char* fn = "layer_norm";
  if (weight.size() != x.cols() || bias.size() != x.cols())
    detail::fail(fn, "weight/bias have " + std::to_string(weight.size()) + "/" +
                         std::to_string(bias.size()) + " entries, expected " +
                         std::to_string(x.cols()));
  if ((weight.rows() != 1 && weight.cols() != 1) || (bias.rows() != 1 && bias.cols() != 1))
    detail::fail(fn, "weight is " + detail::shape_string(weight.rows(), weight.cols()) +
                         " and bias " + detail::shape_string(bias.rows(), bias.cols()) +
                         ", expected vectors of " + std::to_string(x.cols()) + " entries");
  detail::check_groups(fn, x.rows(), x.cols(), std::max<Index>(x.cols(), 1), eps);
  Matrix<T> y = x;
  if (y.cols() > 0) detail::layer_norm_groups_impl(y, y.cols(), eps);
  for (Index t = 0; t < y.rows(); ++t)
    for (Index c = 0; c < y.cols(); ++c)
      y(t, c) = y(t, c) * static_cast<T>(weight(c)) + static_cast<T>(bias(c));
  return y;
}

}  // namespace retention
