// Shared test helpers: seeded random inputs and error measures. No expected values live here.
#pragma once

#include <retention/core.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>

namespace retention_test {

using retention::Index;

/// Deterministic uniform [-scale, scale) matrix; each (seed) gives fresh, non-trivial values.
template <class T>
retention::Matrix<T> random_matrix(Index rows, Index cols, std::uint64_t seed, double scale = 1.0) {
  std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull + 12345u);
  std::uniform_real_distribution<double> dist(-scale, scale);
  retention::Matrix<T> m(rows, cols);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) m(i, j) = static_cast<T>(dist(rng));
  return m;
}

/// norm(a - b) / norm(b) in double; +inf when a has a NaN/Inf or shapes differ, so it never passes.
template <class A, class B>
double relative_error(const Eigen::MatrixBase<A>& a, const Eigen::MatrixBase<B>& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return std::numeric_limits<double>::infinity();
  const auto ad = a.template cast<double>().eval();
  const auto bd = b.template cast<double>().eval();
  if (!ad.allFinite() || !bd.allFinite()) return std::numeric_limits<double>::infinity();
  const double den = bd.norm();
  const double num = (ad - bd).norm();
  if (den == 0.0) return num;
  return num / den;
}

/// SPEC 6 tolerance for the scalar type: 1e-12 in double, 1e-5 in float.
template <class T>
constexpr double spec_tolerance() {
  return sizeof(T) == sizeof(double) ? 1e-12 : 1e-5;
}

/// Runs `f` and checks it throws retention::shape_error whose message contains `needle`.
template <class F>
void expect_shape_error(F&& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "expected retention::shape_error containing \"" << needle << "\"";
  } catch (const retention::shape_error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
        << "message \"" << e.what() << "\" does not contain \"" << needle << "\"";
  }
}

using ScalarTypes = ::testing::Types<float, double>;

/// Names typed tests by scalar ("float", "double"); passing it as TYPED_TEST_SUITE's third argument
/// also keeps clang's -Wpedantic quiet about an empty variadic macro argument.
struct ScalarName {
  template <class T>
  static std::string GetName(int) {
    return sizeof(T) == sizeof(float) ? "float" : "double";
  }
};

}  // namespace retention_test
