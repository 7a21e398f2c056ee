// retention: the "theta shift" rotation of RetNet (SPEC 3), also used by RMT by raster index (SPEC 4).
#pragma once

#include <retention/common.hpp>

#include <cmath>
#include <vector>

namespace retention {

/// Rotation of interleaved pairs (x_{2j}, x_{2j+1}) by angle p * theta_j at absolute position p,
/// theta_j = 10000^(-j / (dk/2 - 1)) for j = 0..dk/2-1 (theta_0 = 1 when dk = 2).
/// Angles are formed in double from the integer position, so long positions keep full accuracy.
class ThetaShift {
 public:
  explicit ThetaShift(Index head_dim) : head_dim_(head_dim) {
    if (head_dim < 2 || head_dim % 2 != 0)
      detail::fail("ThetaShift", "head_dim must be even and >= 2 (rotation acts on pairs), got " +
                                     std::to_string(head_dim));
    const Index half = head_dim / 2;
    theta_.resize(static_cast<std::size_t>(half));
    for (Index j = 0; j < half; ++j) {
      const double e = half == 1 ? 0.0 : static_cast<double>(j) / static_cast<double>(half - 1);
      theta_[static_cast<std::size_t>(j)] = std::pow(10000.0, -e);
    }
  }

  Index head_dim() const { return head_dim_; }
  /// theta_j, j = 0..head_dim/2-1.
  const std::vector<double>& thetas() const { return theta_; }

  /// Rotates every row of x [T, k*head_dim] in place: row t is at position first_position + t;
  /// every head_dim-wide group of columns (one head) gets the same rotation.
  template <class Derived>
  void apply(const Eigen::MatrixBase<Derived>& x_, Index first_position) const {
    auto& x = const_cast<Eigen::MatrixBase<Derived>&>(x_);
    using T = typename Derived::Scalar;
    if (x.cols() % head_dim_ != 0)
      detail::fail("ThetaShift::apply", "x has " + std::to_string(x.cols()) +
                                            " columns, not a multiple of head_dim " +
                                            std::to_string(head_dim_));
    const Index half = head_dim_ / 2;
    const Index groups = x.cols() / head_dim_;
    for (Index t = 0; t < x.rows(); ++t) {
      const double p = static_cast<double>(first_position + t);
      for (Index j = 0; j < half; ++j) {
        const double angle = p * theta_[static_cast<std::size_t>(j)];
        const T c = static_cast<T>(std::cos(angle)), s = static_cast<T>(std::sin(angle));
        for (Index g = 0; g < groups; ++g) {
          const Index i = g * head_dim_ + 2 * j;
          const T a = x(t, i), b = x(t, i + 1);
          x(t, i) = a * c - b * s;
          x(t, i + 1) = b * c + a * s;
        }
      }
    }
  }

 private:
  Index head_dim_;
  std::vector<double> theta_;
};

}  // namespace retention
