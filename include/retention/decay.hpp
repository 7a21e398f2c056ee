// retention: decay masks, the one place in the library that knows about gamma (SPEC section 1).
#pragma once

#include <retention/core.hpp>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <vector>

namespace retention {

// ---------------------------------------------------------------------------------------------
// Per-head gamma schedules. Values are returned in double; every mask forms ln(gamma) as
// log1p(gamma - 1), which is exact for gammas near 1 (gamma - 1 is exact by Sterbenz's lemma).
// ---------------------------------------------------------------------------------------------

/// RetNet eq. 8: gamma_h = 1 - 2^(-5-h), h = 0..heads-1.
inline std::vector<double> retnet_gammas(Index heads) {
  detail::check_positive("retnet_gammas", "heads", heads);
  std::vector<double> g(static_cast<std::size_t>(heads));
  for (Index h = 0; h < heads; ++h)
    g[static_cast<std::size_t>(h)] = 1.0 - std::ldexp(1.0, -5 - static_cast<int>(h));
  return g;
}

/// gamma_h = 1 - exp(linspace(ln first, ln last, heads))_h; heads = 1 gives 1 - first
/// (RetNet language-model runs, ViR).
inline std::vector<double> linspace_gammas(Index heads, double first = 1.0 / 32,
                                           double last = 1.0 / 512) {
  detail::check_positive("linspace_gammas", "heads", heads);
  if (!(first > 0.0 && first < 1.0) || !(last > 0.0 && last < 1.0))
    detail::fail("linspace_gammas", "first and last must be in (0, 1)");
  std::vector<double> g(static_cast<std::size_t>(heads));
  const double a = std::log(first), b = std::log(last);
  for (Index h = 0; h < heads; ++h) {
    const double t = heads == 1 ? 0.0 : static_cast<double>(h) / static_cast<double>(heads - 1);
    g[static_cast<std::size_t>(h)] = 1.0 - std::exp(a + (b - a) * t);
  }
  return g;
}

/// RMT: gamma_h = 1 - 2^-(initial_value + heads_range * h / heads).
inline std::vector<double> rmt_gammas(Index heads, double initial_value, double heads_range) {
  detail::check_positive("rmt_gammas", "heads", heads);
  if (!(initial_value > 0.0) || !(heads_range >= 0.0))
    detail::fail("rmt_gammas", "initial_value must be > 0 and heads_range >= 0");
  std::vector<double> g(static_cast<std::size_t>(heads));
  for (Index h = 0; h < heads; ++h)
    g[static_cast<std::size_t>(h)] =
        1.0 - std::exp2(-(initial_value +
                          heads_range * static_cast<double>(h) / static_cast<double>(heads)));
  return g;
}

namespace detail {

/// ln(gamma) in double: log1p(gamma - 1) near 1, where it is exact (gamma - 1 is exact by
/// Sterbenz's lemma for gamma >= 1/2) and log(gamma) would lose the decay (SPEC 1); log(gamma)
/// below 1/2, where gamma - 1 may round to -1 (gamma = 1e-30) and log1p would give -inf.
inline double log_gamma_of(const char* function, double gamma) {
  check_gamma(function, gamma);
  return gamma >= 0.5 ? std::log1p(gamma - 1.0) : std::log(gamma);
}

/// Shared machinery of every mask: gamma, ln gamma, powers exp(k ln gamma), and tile filling from
/// an integer distance (negative = masked out). Derived supplies distance(n, m) and
/// max_distance(n0, rows, m0, cols), an upper bound of the distances inside a tile.
template <class Derived>
class DecayMaskBase {
 public:
  double gamma() const { return gamma_; }
  double log_gamma() const { return log_gamma_; }

  /// gamma^k for k >= 0, formed as exp(k ln gamma): never overflows, underflows to exactly 0.
  double factor(Index k) const {
    return k == 0 ? 1.0 : std::exp(static_cast<double>(k) * log_gamma_);
  }

  /// ln D[n, m]; -inf where the mask excludes the pair.
  double log_weight(Index n, Index m) const {
    const Index d = self().distance(n, m);
    if (d < 0) return -std::numeric_limits<double>::infinity();
    return d == 0 ? 0.0 : static_cast<double>(d) * log_gamma_;
  }

  /// D[n, m] in [0, 1].
  double weight(Index n, Index m) const {
    const Index d = self().distance(n, m);
    return d < 0 ? 0.0 : factor(d);
  }

  /// Writes D over the tile [n0, n0 + out.rows()) x [m0, m0 + out.cols()) into `out`.
  template <class OutDerived>
  void weights_into(Index n0, Index m0, const Eigen::MatrixBase<OutDerived>& out_) const {
    auto& out = const_cast<Eigen::MatrixBase<OutDerived>&>(out_);
    using T = typename OutDerived::Scalar;
    const std::vector<T> pw = powers<T>(self().max_distance(n0, out.rows(), m0, out.cols()));
    for (Index i = 0; i < out.rows(); ++i)
      for (Index j = 0; j < out.cols(); ++j) {
        const Index d = self().distance(n0 + i, m0 + j);
        out(i, j) = d < 0 ? T(0) : pw[static_cast<std::size_t>(d)];
      }
  }

  /// Writes ln D over the tile into `out` (-inf where masked).
  template <class OutDerived>
  void log_weights_into(Index n0, Index m0, const Eigen::MatrixBase<OutDerived>& out_) const {
    auto& out = const_cast<Eigen::MatrixBase<OutDerived>&>(out_);
    using T = typename OutDerived::Scalar;
    for (Index i = 0; i < out.rows(); ++i)
      for (Index j = 0; j < out.cols(); ++j) out(i, j) = static_cast<T>(log_weight(n0 + i, m0 + j));
  }

  /// D over [n0, n0 + rows) x [m0, m0 + cols).
  template <class T>
  Matrix<T> weights(Index n0, Index rows, Index m0, Index cols) const {
    Matrix<T> out(rows, cols);
    weights_into(n0, m0, out);
    return out;
  }

  /// ln D over [n0, n0 + rows) x [m0, m0 + cols).
  template <class T>
  Matrix<T> log_weights(Index n0, Index rows, Index m0, Index cols) const {
    Matrix<T> out(rows, cols);
    log_weights_into(n0, m0, out);
    return out;
  }

 protected:
  DecayMaskBase(const char* name, double gamma)
      : gamma_(gamma), log_gamma_(log_gamma_of(name, gamma)) {}

  /// pw[k] = gamma^k for k = 0..k_max, each formed as exp(k ln gamma).
  template <class T>
  std::vector<T> powers(Index k_max) const {
    std::vector<T> pw(static_cast<std::size_t>(std::max<Index>(k_max, 0) + 1));
    for (std::size_t k = 0; k < pw.size(); ++k)
      pw[k] = static_cast<T>(factor(static_cast<Index>(k)));
    return pw;
  }

 private:
  const Derived& self() const { return static_cast<const Derived&>(*this); }
  double gamma_;
  double log_gamma_;
};

}  // namespace detail

/// Causal 1-D decay: D[n, m] = gamma^(n-m) for m <= n, else 0 (RetNet MSR, ViR MHR).
/// Besides tiles it supplies the factors of the recurrent and chunkwise forms (SPEC 1).
class CausalDecay : public detail::DecayMaskBase<CausalDecay> {
 public:
  static constexpr bool is_causal = true;
  explicit CausalDecay(double gamma) : DecayMaskBase("CausalDecay", gamma) {}

  Index distance(Index n, Index m) const { return m <= n ? n - m : -1; }
  Index max_distance(Index n0, Index rows, Index m0, Index /*cols*/) const {
    return std::max<Index>(n0 + rows - 1 - m0, 0);
  }

  /// Per-token state decay gamma (recurrent form).
  double step_factor() const { return factor(1); }
  /// State decay over a chunk of length L: gamma^L.
  double chunk_factor(Index length) const { return factor(length); }
  /// q_factors[j] = gamma^(j+1), j = 0..L-1: weight of the carried-in state for row j of a chunk.
  template <class T>
  Vector<T> query_factors(Index length) const {
    Vector<T> f(length);
    for (Index j = 0; j < length; ++j) f(j) = static_cast<T>(factor(j + 1));
    return f;
  }
  /// k_factors[l] = gamma^(L-1-l), l = 0..L-1: weight of key l in the state after the chunk.
  template <class T>
  Vector<T> key_factors(Index length) const {
    Vector<T> f(length);
    for (Index l = 0; l < length; ++l) f(l) = static_cast<T>(factor(length - 1 - l));
    return f;
  }
  /// sum_{i=0}^{p} gamma^i = (1 - gamma^(p+1)) / (1 - gamma), or p + 1 at gamma = 1
  /// (the `decay` normalisation of SPEC 2), computed without cancellation through expm1.
  double decay_sum(Index p) const {
    if (log_gamma() == 0.0) return static_cast<double>(p + 1);
    return std::expm1(static_cast<double>(p + 1) * log_gamma()) / std::expm1(log_gamma());
  }
};

/// Symmetric 1-D decay: D[n, m] = gamma^|n-m| (one axis of RMT's MaSAD).
class SymmetricDecay : public detail::DecayMaskBase<SymmetricDecay> {
 public:
  static constexpr bool is_causal = false;
  explicit SymmetricDecay(double gamma) : DecayMaskBase("SymmetricDecay", gamma) {}

  Index distance(Index n, Index m) const { return n >= m ? n - m : m - n; }
  Index max_distance(Index n0, Index rows, Index m0, Index cols) const {
    return std::max(std::abs(n0 + rows - 1 - m0), std::abs(m0 + cols - 1 - n0));
  }
};

/// Manhattan 2-D decay on an H x W grid in raster order n = y*W + x:
/// D[n, m] = gamma^(|y_n - y_m| + |x_n - x_m|) (RMT's MaSA). Equals SymmetricDecay_H (x)
/// SymmetricDecay_W.
class ManhattanDecay : public detail::DecayMaskBase<ManhattanDecay> {
 public:
  static constexpr bool is_causal = false;
  ManhattanDecay(double gamma, Index height, Index width)
      : DecayMaskBase("ManhattanDecay", gamma), height_(height), width_(width) {
    detail::check_positive("ManhattanDecay", "height", height);
    detail::check_positive("ManhattanDecay", "width", width);
  }

  Index height() const { return height_; }
  Index width() const { return width_; }
  /// Number of tokens H * W.
  Index size() const { return height_ * width_; }
  /// The factor along y (rows of the grid) and along x (columns).
  SymmetricDecay row_axis() const { return SymmetricDecay(gamma()); }
  SymmetricDecay column_axis() const { return SymmetricDecay(gamma()); }

  Index distance(Index n, Index m) const {
    const Index dy = n / width_ - m / width_;
    const Index dx = n % width_ - m % width_;
    return std::abs(dy) + std::abs(dx);
  }
  Index max_distance(Index, Index, Index, Index) const { return height_ - 1 + width_ - 1; }

 private:
  Index height_, width_;
};

/// Quadrant-causal 2-D decay on an H x W grid: D[n, m] = gamma^((y_n-y_m)+(x_n-x_m)) when
/// y_m <= y_n and x_m <= x_n, else 0. Equals CausalDecay_H (x) CausalDecay_W.
class QuadrantCausalDecay : public detail::DecayMaskBase<QuadrantCausalDecay> {
 public:
  static constexpr bool is_causal = false;  // not causal in raster order as a 1-D sequence
  QuadrantCausalDecay(double gamma, Index height, Index width)
      : DecayMaskBase("QuadrantCausalDecay", gamma), height_(height), width_(width) {
    detail::check_positive("QuadrantCausalDecay", "height", height);
    detail::check_positive("QuadrantCausalDecay", "width", width);
  }

  Index height() const { return height_; }
  Index width() const { return width_; }
  Index size() const { return height_ * width_; }
  /// The factor along y (rows of the grid) and along x (columns): D = row_axis (x) column_axis.
  CausalDecay row_axis() const { return CausalDecay(gamma()); }
  CausalDecay column_axis() const { return CausalDecay(gamma()); }

  Index distance(Index n, Index m) const {
    const Index dy = n / width_ - m / width_;
    const Index dx = n % width_ - m % width_;
    return (dy < 0 || dx < 0) ? -1 : dy + dx;
  }
  Index max_distance(Index, Index, Index, Index) const { return height_ - 1 + width_ - 1; }

 private:
  Index height_, width_;
};

}  // namespace retention
