// retention: the "theta shift" rotation of RetNet (SPEC 3), also used by RMT by raster index (SPEC
// 4).
#pragma once

#include <retention/common.hpp>

#include <cmath>
#include <string>
#include <vector>

namespace retention {

/// Rotation of interleaved pairs (x_{2j}, x_{2j+1}) by angle p * theta_j at absolute position p,
/// theta_j = 10000^(-j / (dk/2 - 1)) for j = 0..dk/2-1 (theta_0 = 1 when dk = 2):
/// (x_{2j} cos - x_{2j+1} sin, x_{2j+1} cos + x_{2j} sin). Because it is a rotation by p * theta,
/// rotated q_n . k_m depends on n - m only (RetNet's xPos-style relative position).
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
    check("ThetaShift::apply", "x", x.rows(), x.cols(), first_position);
    // The same matrix as both operands would rotate twice; a 0-column dummy keeps one code path.
    Matrix<typename Derived::Scalar> none(x.rows(), 0);
    rotate(x, none, first_position);
  }

  /// Rotates x [T, a*head_dim] and y [T, b*head_dim] (e.g. q and k) in place with the same angles,
  /// row t at position first_position + t. Each cos/sin is computed once for both.
  template <class DX, class DY>
  void apply_pair(const Eigen::MatrixBase<DX>& x_, const Eigen::MatrixBase<DY>& y_,
                  Index first_position) const {
    auto& x = const_cast<Eigen::MatrixBase<DX>&>(x_);
    auto& y = const_cast<Eigen::MatrixBase<DY>&>(y_);
    detail::assert_same_scalar<typename DX::Scalar, typename DY::Scalar>();
    check("ThetaShift::apply_pair", "x", x.rows(), x.cols(), first_position);
    check("ThetaShift::apply_pair", "y", y.rows(), y.cols(), first_position);
    if (y.rows() != x.rows())
      detail::fail("ThetaShift::apply_pair", "y is " + detail::shape_string(y.rows(), y.cols()) +
                                                 ", expected [" + std::to_string(x.rows()) +
                                                 " x *] (x is " +
                                                 detail::shape_string(x.rows(), x.cols()) + ")");
    rotate(x, y, first_position);
  }

 private:
  void check(const char* fn, const char* name, Index rows, Index cols, Index first_position) const {
    if (cols % head_dim_ != 0)
      detail::fail(fn, std::string(name) + " is " + detail::shape_string(rows, cols) +
                           ", columns not a multiple of head_dim " + std::to_string(head_dim_));
    if (first_position < 0)
      detail::fail(fn, "first_position must be >= 0, got " + std::to_string(first_position));
  }

  template <class DX, class DY>
  void rotate(DX& x, DY& y, Index first_position) const {
    using T = typename DX::Scalar;
    const Index half = head_dim_ / 2;
    const Index gx = x.cols() / head_dim_, gy = y.cols() / head_dim_;
    const Index rows = x.rows();
    // Rows are independent; long prompts spend real time in sin/cos, so spread rows over threads.
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (rows * half * (gx + gy) > 65536)
#endif
    for (Index t = 0; t < rows; ++t) {
      const double p = static_cast<double>(first_position + t);
      for (Index j = 0; j < half; ++j) {
        const double angle = p * theta_[static_cast<std::size_t>(j)];
        const T c = static_cast<T>(std::cos(angle)), s = static_cast<T>(std::sin(angle));
        for (Index g = 0; g < gx; ++g) {
          const Index i = g * head_dim_ + 2 * j;
          const T a = x(t, i), b = x(t, i + 1);
          x(t, i) = a * c - b * s;
          x(t, i + 1) = b * c + a * s;
        }
        for (Index g = 0; g < gy; ++g) {
          const Index i = g * head_dim_ + 2 * j;
          const T a = y(t, i), b = y(t, i + 1);
          y(t, i) = a * c - b * s;
          y(t, i + 1) = b * c + a * s;
        }
      }
    }
  }

  Index head_dim_;
  std::vector<double> theta_;
};

}  // namespace retention
