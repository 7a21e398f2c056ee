// retention: row-wise normalisations used by the layers (SPEC 3 head norm, SPEC 5 LayerNorm).
#pragma once

#include <retention/core.hpp>

#include <cmath>
#include <string>

namespace retention {

/// Which per-head norm follows retention in the MSR layer.
enum class HeadNorm { rms, layer };

inline const char* to_string(HeadNorm n) { return n == HeadNorm::rms ? "rms" : "layer"; }

namespace detail {

/// group >= 1 dividing the column count, eps >= 0 (a negative eps could take a root of a negative).
inline void check_groups(const char* fn, Index rows, Index cols, Index group, double eps) {
  if (group < 1 || cols % group != 0)
    fail(fn, "x is " + shape_string(rows, cols) + ", columns not a multiple of group " +
                 std::to_string(group));
  if (!(eps >= 0.0)) fail(fn, "eps must be >= 0, got " + std::to_string(eps));
}

}  // namespace detail

/// RMSNorm without weight, applied in place to each group of `group` columns of each row:
/// x * (mean(x^2) + eps)^(-1/2). [T, k*group].
template <class Derived>
void rms_norm_groups(const Eigen::MatrixBase<Derived>& x_, Index group, double eps) {
  auto& x = const_cast<Eigen::MatrixBase<Derived>&>(x_);
  using T = typename Derived::Scalar;
  detail::check_groups("rms_norm_groups", x.rows(), x.cols(), group, eps);
  for (Index t = 0; t < x.rows(); ++t)
    for (Index g = 0; g < x.cols(); g += group) {
      auto seg = x.row(t).segment(g, group);
      const double ms = static_cast<double>(seg.squaredNorm()) / static_cast<double>(group);
      seg *= static_cast<T>(1.0 / std::sqrt(ms + eps));
    }
}

/// LayerNorm without affine, in place, per group of `group` columns: (x - mean) / sqrt(var + eps),
/// biased variance (torch GroupNorm / LayerNorm convention).
template <class Derived>
void layer_norm_groups(const Eigen::MatrixBase<Derived>& x_, Index group, double eps) {
  auto& x = const_cast<Eigen::MatrixBase<Derived>&>(x_);
  using T = typename Derived::Scalar;
  detail::check_groups("layer_norm_groups", x.rows(), x.cols(), group, eps);
  for (Index t = 0; t < x.rows(); ++t)
    for (Index g = 0; g < x.cols(); g += group) {
      auto seg = x.row(t).segment(g, group);
      const double mean = static_cast<double>(seg.sum()) / static_cast<double>(group);
      seg.array() -= static_cast<T>(mean);
      const double var = static_cast<double>(seg.squaredNorm()) / static_cast<double>(group);
      seg *= static_cast<T>(1.0 / std::sqrt(var + eps));
    }
}

/// LayerNorm with affine over the full row, out of place: y = (x - mean)/sqrt(var + eps) * w + b.
/// x [T, d], weight and bias [d].
template <class Derived, class WDerived, class BDerived>
Matrix<typename Derived::Scalar> layer_norm(const Eigen::MatrixBase<Derived>& x,
                                            const Eigen::MatrixBase<WDerived>& weight,
                                            const Eigen::MatrixBase<BDerived>& bias, double eps) {
  using T = typename Derived::Scalar;
  detail::check_shape("layer_norm", "weight", weight, -1, -1);
  if (weight.size() != x.cols() || bias.size() != x.cols())
    detail::fail("layer_norm", "weight/bias have " + std::to_string(weight.size()) + "/" +
                                   std::to_string(bias.size()) + " entries, expected " +
                                   std::to_string(x.cols()));
  Matrix<T> y = x;
  layer_norm_groups(y, y.cols(), eps);
  for (Index t = 0; t < y.rows(); ++t)
    for (Index c = 0; c < y.cols(); ++c) y(t, c) = y(t, c) * weight(c) + bias(c);
  return y;
}

}  // namespace retention
