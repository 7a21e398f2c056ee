// retention: element-wise activations of the layers, in place on any writable Eigen expression
// (a matrix, a block, a Map): exact (erf) GELU for ViR's MLP (docs/math.md §5), SiLU for gates.
#pragma once

#include <retention/core.hpp>

#include <cmath>
#include <type_traits>

namespace retention {

/// Exact GELU in place: x <- x (1 + erf(x / sqrt 2)) / 2 (torch nn.GELU's default, not the tanh
/// approximation). x: any writable dense expression, e.g. `gelu_inplace(u.leftCols(4))`.
template <class Derived>
void gelu_inplace(Derived&& x) {
  using T = typename std::decay_t<Derived>::Scalar;
  detail::assert_scalar<T>();
  const T r = static_cast<T>(0.70710678118654752440);  // 1 / sqrt 2
  x = x.unaryExpr(
      [r](T v) { return static_cast<T>(0.5) * v * (static_cast<T>(1) + std::erf(v * r)); });
}

/// SiLU in place: x <- x / (1 + exp(-x)). For very negative x, exp(-x) = inf gives -0, not NaN;
/// a NaN stays NaN.
template <class Derived>
void silu_inplace(Derived&& x) {
  using T = typename std::decay_t<Derived>::Scalar;
  detail::assert_scalar<T>();
  x = x.unaryExpr([](T v) { return v / (static_cast<T>(1) + std::exp(-v)); });
}

}  // namespace retention
