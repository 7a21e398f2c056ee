// retention: element-wise activations of the layers, in place on any writable Eigen expression
// (a matrix, a block, a Map): exact (erf) GELU for ViR's MLP (docs/math.md §5), SiLU for gates.
#pragma once

#include <retention/core.hpp>

#include <unsupported/Eigen/SpecialFunctions>

#include <cmath>
#include <type_traits>

namespace retention {

/// Exact GELU in place: x <- x (1 + erf(x / sqrt 2)) / 2 (torch nn.GELU's default, not the tanh
/// approximation). x: any writable dense expression, e.g. `gelu_inplace(u.leftCols(4))`.
/// erf is Eigen's: in double the C library's; in float a vectorised rational approximation, so
/// that the MLP's activation does not cost as much as its products (docs/math.md §5 states its
/// error).
template <class Derived>
void gelu_inplace(Derived&& x) {
  using T = typename std::decay_t<Derived>::Scalar;
  detail::assert_scalar<T>();
  const T r = static_cast<T>(0.70710678118654752440);  // 1 / sqrt 2
  auto a = x.array();
  a = static_cast<T>(0.5) * a * (static_cast<T>(1) + (a * r).erf());
}

/// SiLU in place: x <- x / (1 + exp(-x)). For very negative x, exp(-x) = inf gives -0, not NaN;
/// a NaN stays NaN.
template <class Derived>
void silu_inplace(Derived&& x) {
  using T = typename std::decay_t<Derived>::Scalar;
  detail::assert_scalar<T>();
  auto a = x.array();
  a = a / (static_cast<T>(1) + (-a).exp());
}

}  // namespace retention
