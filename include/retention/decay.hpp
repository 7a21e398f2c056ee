// retention: decay masks, the one place in the library that knows about gamma (docs/math.md §1).
#pragma once

#include <retention/core.hpp>
#include <retention/detail/overlap.hpp>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

namespace retention {

// ---------------------------------------------------------------------------------------------
// Per-head gamma schedules. Values are returned in double; every mask forms ln(gamma) as
// log1p(gamma - 1), which is exact for gammas near 1 (gamma - 1 is exact by Sterbenz's lemma).
// Every schedule checks what it produces: each gamma lies in (0, 1] (gamma = 1, no decay, is
// allowed: retnet_gammas' heads beyond 48 round to it), so a bad argument fails here, naming the
// schedule, and not later inside a mask.
// ---------------------------------------------------------------------------------------------

/// Largest head count a schedule accepts (far beyond any model; keeps the vector allocation sane).
constexpr Index max_schedule_heads = Index(1) << 20;

namespace detail {

inline void check_schedule_heads(const char* function, Index heads) {
  check_positive(function, "heads", heads);
  if (heads > max_schedule_heads)
    fail(function, "heads must be <= " + std::to_string(max_schedule_heads) + ", got " +
                       std::to_string(heads));
}

/// Every produced gamma must lie in (0, 1]; names the function, the head and (`arguments`) the
/// arguments that produced it.
inline void check_schedule_output(const char* function, const std::vector<double>& g,
                                  const std::string& arguments) {
  for (std::size_t h = 0; h < g.size(); ++h)
    if (!(g[h] > 0.0 && g[h] <= 1.0)) {
      std::ostringstream s;
      s << "gamma of head " << h << " is " << g[h] << ", outside (0, 1], from " << arguments;
      fail(function, s.str());
    }
}

}  // namespace detail

/// RetNet eq. 8: gamma_h = 1 - 2^(-5-h), h = 0..heads-1; 1 <= heads <= max_schedule_heads.
/// Heads h >= 48 give gamma = 1 exactly (no decay).
inline std::vector<double> retnet_gammas(Index heads) {
  detail::check_schedule_heads("retnet_gammas", heads);
  std::vector<double> g(static_cast<std::size_t>(heads));
  for (Index h = 0; h < heads; ++h)
    g[static_cast<std::size_t>(h)] = 1.0 - std::ldexp(1.0, -5 - static_cast<int>(h));
  detail::check_schedule_output("retnet_gammas", g, "heads = " + std::to_string(heads));
  return g;
}

/// gamma_h = 1 - exp(linspace(ln first, ln last, heads))_h; heads = 1 gives 1 - first
/// (RetNet language-model runs, ViR). first, last in (0, 1); 1 <= heads <= max_schedule_heads.
inline std::vector<double> linspace_gammas(Index heads, double first = 1.0 / 32,
                                           double last = 1.0 / 512) {
  detail::check_schedule_heads("linspace_gammas", heads);
  if (!(first > 0.0 && first < 1.0) || !(last > 0.0 && last < 1.0)) {
    std::ostringstream s;
    s << "first and last must be in (0, 1), got first = " << first << ", last = " << last;
    detail::fail("linspace_gammas", s.str());
  }
  std::vector<double> g(static_cast<std::size_t>(heads));
  const double a = std::log(first), b = std::log(last);
  for (Index h = 0; h < heads; ++h) {
    const double t = heads == 1 ? 0.0 : static_cast<double>(h) / static_cast<double>(heads - 1);
    g[static_cast<std::size_t>(h)] = 1.0 - std::exp(a + (b - a) * t);
  }
  std::ostringstream args;
  args << "first = " << first << ", last = " << last;
  detail::check_schedule_output("linspace_gammas", g, args.str());
  return g;
}

/// RMT: gamma_h = 1 - 2^-(initial_value + heads_range * h / heads). initial_value > 0 and
/// heads_range >= 0, both finite; an initial_value so small that 2^-initial_value rounds to 1
/// (gamma = 0) is rejected; 1 <= heads <= max_schedule_heads.
inline std::vector<double> rmt_gammas(Index heads, double initial_value, double heads_range) {
  detail::check_schedule_heads("rmt_gammas", heads);
  if (!(initial_value > 0.0) || !(heads_range >= 0.0) || !std::isfinite(initial_value) ||
      !std::isfinite(heads_range)) {
    std::ostringstream s;
    s << "initial_value must be > 0 and heads_range >= 0, both finite, got initial_value = "
      << initial_value << ", heads_range = " << heads_range;
    detail::fail("rmt_gammas", s.str());
  }
  std::vector<double> g(static_cast<std::size_t>(heads));
  for (Index h = 0; h < heads; ++h)
    g[static_cast<std::size_t>(h)] =
        1.0 - std::exp2(-(initial_value +
                          heads_range * static_cast<double>(h) / static_cast<double>(heads)));
  std::ostringstream args;
  args << "initial_value = " << initial_value << ", heads_range = " << heads_range;
  detail::check_schedule_output("rmt_gammas", g, args.str());
  return g;
}

namespace detail {

/// ln(gamma) in double: log1p(gamma - 1) near 1, where it is exact (gamma - 1 is exact by
/// Sterbenz's lemma for gamma >= 1/2) and log(gamma) would lose the decay (docs/math.md §1);
/// log(gamma) below 1/2, where gamma - 1 may round to -1 (gamma = 1e-30) and log1p would give -inf.
inline double log_gamma_of(const char* function, double gamma) {
  check_gamma(function, gamma);
  return gamma >= 0.5 ? std::log1p(gamma - 1.0) : std::log(gamma);
}

/// Shared machinery of every mask: gamma, ln gamma, powers exp(k ln gamma), and tile filling from
/// an integer distance (negative = masked out). Derived supplies (privately, this class is its
/// friend) distance_unchecked(n, m) for positions already validated, distance_bounds(n0, rows, m0,
/// cols, lo, hi) enclosing the distances inside a tile, and position_limit(): positions are
/// 0 <= n < position_limit() (the grid size for 2-D masks, unbounded for 1-D ones).
///
/// Every public member validates its arguments and throws shape_error naming the mask and the
/// member ("ManhattanDecay::weights: ..."): positions must be >= 0 (and inside the grid for 2-D
/// masks), tiles must not overflow Index, powers k >= 0.
template <class Derived>
class DecayMaskBase {
 public:
  double gamma() const { return gamma_; }
  double log_gamma() const { return log_gamma_; }

  /// gamma^k for k >= 0, formed as exp(k ln gamma): never overflows, underflows to exactly 0.
  double factor(Index k) const {
    check_nonnegative("factor", "k", k);
    return raw_factor(k);
  }

  /// The distance of (n, m) that the weight is gamma to; -1 where the mask excludes the pair.
  Index distance(Index n, Index m) const {
    check_pair("distance", n, m);
    return self().distance_unchecked(n, m);
  }

  /// ln D[n, m]; -inf where the mask excludes the pair.
  double log_weight(Index n, Index m) const {
    check_pair("log_weight", n, m);
    return raw_log_weight(n, m);
  }

  /// D[n, m] in [0, 1].
  double weight(Index n, Index m) const {
    check_pair("weight", n, m);
    const Index d = self().distance_unchecked(n, m);
    return d < 0 ? 0.0 : raw_factor(d);
  }

  /// Writes D over the tile [n0, n0 + out.rows()) x [m0, m0 + out.cols()) into `out` (a matrix,
  /// Map or Block).
  template <class Out>
  void weights_into(Index n0, Index m0, Out&& out) const {
    assert_dense_output<Out>();
    check_tile("weights_into", n0, out.rows(), m0, out.cols());
    fill_weights(n0, m0, out);
  }

  /// Writes ln D over the tile into `out` (-inf where masked).
  template <class Out>
  void log_weights_into(Index n0, Index m0, Out&& out) const {
    assert_dense_output<Out>();
    check_tile("log_weights_into", n0, out.rows(), m0, out.cols());
    fill_log_weights(n0, m0, out);
  }

  /// D over [n0, n0 + rows) x [m0, m0 + cols) -> [rows, cols].
  template <class T>
  Matrix<T> weights(Index n0, Index rows, Index m0, Index cols) const {
    check_tile("weights", n0, rows, m0, cols);
    checked_product(name("weights").c_str(), "rows x cols", rows, cols);
    Matrix<T> out(rows, cols);
    fill_weights(n0, m0, out);
    return out;
  }

  /// ln D over [n0, n0 + rows) x [m0, m0 + cols) -> [rows, cols].
  template <class T>
  Matrix<T> log_weights(Index n0, Index rows, Index m0, Index cols) const {
    check_tile("log_weights", n0, rows, m0, cols);
    checked_product(name("log_weights").c_str(), "rows x cols", rows, cols);
    Matrix<T> out(rows, cols);
    fill_log_weights(n0, m0, out);
    return out;
  }

 protected:
  DecayMaskBase(const char* mask_name, double gamma)
      : mask_name_(mask_name), gamma_(gamma), log_gamma_(log_gamma_of(mask_name, gamma)) {}

  /// "Mask::member", the function named in errors.
  std::string name(const char* member) const { return std::string(mask_name_) + "::" + member; }

  void check_nonnegative(const char* member, const char* arg, Index value) const {
    if (value < 0)
      fail(name(member).c_str(), std::string(arg) + " must be >= 0, got " + std::to_string(value));
  }

  double raw_factor(Index k) const {
    return k == 0 ? 1.0 : std::exp(static_cast<double>(k) * log_gamma_);
  }

 private:
  const Derived& self() const { return static_cast<const Derived&>(*this); }

  double raw_log_weight(Index n, Index m) const {
    const Index d = self().distance_unchecked(n, m);
    if (d < 0) return -std::numeric_limits<double>::infinity();
    return d == 0 ? 0.0 : static_cast<double>(d) * log_gamma_;
  }

  void check_position(const char* member, const char* arg, Index p) const {
    const Index limit = self().position_limit();
    if (p < 0 || p >= limit)
      fail(name(member).c_str(), std::string(arg) + " is " + std::to_string(p) +
                                     ", expected a position in [0, " + std::to_string(limit) + ")");
  }

  void check_pair(const char* member, Index n, Index m) const {
    check_position(member, "n", n);
    check_position(member, "m", m);
  }

  /// Tile [n0, n0 + rows) x [m0, m0 + cols): sizes >= 0, offsets >= 0, ends within the positions
  /// (a tile beyond a 2-D grid would index past its distance table).
  void check_tile(const char* member, Index n0, Index rows, Index m0, Index cols) const {
    check_nonnegative(member, "rows", rows);
    check_nonnegative(member, "cols", cols);
    check_nonnegative(member, "n0", n0);
    check_nonnegative(member, "m0", m0);
    const Index limit = self().position_limit();
    Index end = 0;
    if (add_overflows(n0, rows, end) || end > limit)
      fail(name(member).c_str(), "rows [" + std::to_string(n0) + ", " + std::to_string(n0) + " + " +
                                     std::to_string(rows) + ") leave the positions [0, " +
                                     std::to_string(limit) + ")");
    if (add_overflows(m0, cols, end) || end > limit)
      fail(name(member).c_str(), "cols [" + std::to_string(m0) + ", " + std::to_string(m0) + " + " +
                                     std::to_string(cols) + ") leave the positions [0, " +
                                     std::to_string(limit) + ")");
  }

  /// A validated tile: powers from a table when the tile's distances span fewer values than it
  /// has entries (the usual case), else one exp per entry; both give exp(d ln gamma) exactly.
  template <class Out>
  void fill_weights(Index n0, Index m0, Out& out) const {
    using T = typename std::decay_t<Out>::Scalar;
    const Index rows = out.rows(), cols = out.cols();
    if (rows == 0 || cols == 0) return;
    Index lo = 0, hi = 0;
    self().distance_bounds(n0, rows, m0, cols, lo, hi);
    const bool table = hi >= lo && hi - lo < rows + cols + 64;
    std::vector<T> pw;
    if (table) {
      pw.resize(static_cast<std::size_t>(hi - lo + 1));
      for (Index d = lo; d <= hi; ++d)
        pw[static_cast<std::size_t>(d - lo)] = static_cast<T>(raw_factor(d));
    }
    for (Index i = 0; i < rows; ++i)
      for (Index j = 0; j < cols; ++j) {
        const Index d = self().distance_unchecked(n0 + i, m0 + j);
        out(i, j) =
            d < 0 ? T(0)
                  : (table ? pw[static_cast<std::size_t>(d - lo)] : static_cast<T>(raw_factor(d)));
      }
  }

  template <class Out>
  void fill_log_weights(Index n0, Index m0, Out& out) const {
    using T = typename std::decay_t<Out>::Scalar;
    if (out.rows() == 0 || out.cols() == 0) return;  // [2^40 x 0] is valid and empty
    for (Index i = 0; i < out.rows(); ++i)
      for (Index j = 0; j < out.cols(); ++j)
        out(i, j) = static_cast<T>(raw_log_weight(n0 + i, m0 + j));
  }

  const char* mask_name_;
  double gamma_;
  double log_gamma_;
};

}  // namespace detail

/// Causal 1-D decay: D[n, m] = gamma^(n-m) for m <= n, else 0 (RetNet MSR, ViR MHR).
/// Besides tiles it supplies the factors of the recurrent and chunkwise forms (docs/math.md §1).
/// Positions n, m >= 0.
class CausalDecay : public detail::DecayMaskBase<CausalDecay> {
 public:
  static constexpr bool is_causal = true;
  explicit CausalDecay(double gamma) : DecayMaskBase("CausalDecay", gamma) {}

  /// Per-token state decay gamma (recurrent form).
  double step_factor() const { return raw_factor(1); }
  /// State decay over a chunk of length L >= 0: gamma^L.
  double chunk_factor(Index length) const {
    check_nonnegative("chunk_factor", "length", length);
    return raw_factor(length);
  }
  /// q_factors[j] = gamma^(j+1), j = 0..L-1: weight of the carried-in state for row j of a chunk.
  template <class T>
  Vector<T> query_factors(Index length) const {
    check_nonnegative("query_factors", "length", length);
    Vector<T> f(length);
    for (Index j = 0; j < length; ++j) f(j) = static_cast<T>(raw_factor(j + 1));
    return f;
  }
  /// k_factors[l] = gamma^(L-1-l), l = 0..L-1: weight of key l in the state after the chunk.
  template <class T>
  Vector<T> key_factors(Index length) const {
    check_nonnegative("key_factors", "length", length);
    Vector<T> f(length);
    for (Index l = 0; l < length; ++l) f(l) = static_cast<T>(raw_factor(length - 1 - l));
    return f;
  }
  /// Writes the power table out[d] = gamma^d, d = 0..out.size()-1 (into a vector, Map or
  /// segment), and returns the horizon: the first d whose power, rounded to the element type, is
  /// below that type's smallest normal number (out.size() if none). The parallel form skips keys
  /// at or beyond the horizon (docs/math.md §1.3).
  template <class Out>
  Index powers_into(Out&& out) const {
    using T = typename std::decay_t<Out>::Scalar;
    static_assert(std::decay_t<Out>::IsVectorAtCompileTime, "powers_into writes a vector");
    const Index size = out.size();
    Index horizon = size;
    for (Index d = 0; d < size; ++d) {
      out(d) = static_cast<T>(raw_factor(d));
      if (horizon == size && out(d) < std::numeric_limits<T>::min()) horizon = d;
    }
    return horizon;
  }
  /// sum_{i=0}^{p} gamma^i = (1 - gamma^(p+1)) / (1 - gamma), or p + 1 at gamma = 1
  /// (the `decay` normalisation of docs/math.md §2), computed without cancellation through expm1; p
  /// >= 0 (p + 1 is formed in double, so p up to the largest Index is fine).
  double decay_sum(Index p) const {
    check_nonnegative("decay_sum", "p", p);
    const double count = static_cast<double>(p) + 1.0;
    if (log_gamma() == 0.0) return count;
    return std::expm1(count * log_gamma()) / std::expm1(log_gamma());
  }

 private:
  friend class detail::DecayMaskBase<CausalDecay>;
  Index position_limit() const { return std::numeric_limits<Index>::max(); }
  Index distance_unchecked(Index n, Index m) const { return m <= n ? n - m : -1; }
  void distance_bounds(Index n0, Index rows, Index m0, Index cols, Index& lo, Index& hi) const {
    // n - m over the tile, clamped at 0 below (negative = masked, never looked up).
    hi = n0 + rows - 1 - m0;
    lo = std::max<Index>(n0 - (m0 + cols - 1), 0);
  }
};

/// Symmetric 1-D decay: D[n, m] = gamma^|n-m| (one axis of RMT's MaSAD). Positions n, m >= 0.
class SymmetricDecay : public detail::DecayMaskBase<SymmetricDecay> {
 public:
  static constexpr bool is_causal = false;
  explicit SymmetricDecay(double gamma) : DecayMaskBase("SymmetricDecay", gamma) {}

 private:
  friend class detail::DecayMaskBase<SymmetricDecay>;
  Index position_limit() const { return std::numeric_limits<Index>::max(); }
  Index distance_unchecked(Index n, Index m) const { return n >= m ? n - m : m - n; }
  void distance_bounds(Index n0, Index rows, Index m0, Index cols, Index& lo, Index& hi) const {
    const Index n1 = n0 + rows - 1, m1 = m0 + cols - 1;
    hi = std::max(n1 >= m0 ? n1 - m0 : m0 - n1, m1 >= n0 ? m1 - n0 : n0 - m1);
    lo = n1 < m0 ? m0 - n1 : (m1 < n0 ? n0 - m1 : 0);
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
    size_ = detail::checked_product("ManhattanDecay", "height x width", height, width);
  }

  Index height() const { return height_; }
  Index width() const { return width_; }
  /// Number of tokens H * W.
  Index size() const { return size_; }
  /// The factor along y (rows of the grid) and along x (columns).
  SymmetricDecay row_axis() const { return SymmetricDecay(gamma()); }
  SymmetricDecay column_axis() const { return SymmetricDecay(gamma()); }

 private:
  friend class detail::DecayMaskBase<ManhattanDecay>;
  Index position_limit() const { return size_; }
  Index distance_unchecked(Index n, Index m) const {
    const Index dy = n / width_ - m / width_;
    const Index dx = n % width_ - m % width_;
    return std::abs(dy) + std::abs(dx);
  }
  void distance_bounds(Index, Index, Index, Index, Index& lo, Index& hi) const {
    lo = 0;
    hi = height_ - 1 + width_ - 1;
  }

  Index height_, width_, size_ = 0;
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
    size_ = detail::checked_product("QuadrantCausalDecay", "height x width", height, width);
  }

  Index height() const { return height_; }
  Index width() const { return width_; }
  /// Number of tokens H * W.
  Index size() const { return size_; }
  /// The factor along y (rows of the grid) and along x (columns): D = row_axis (x) column_axis.
  CausalDecay row_axis() const { return CausalDecay(gamma()); }
  CausalDecay column_axis() const { return CausalDecay(gamma()); }

 private:
  friend class detail::DecayMaskBase<QuadrantCausalDecay>;
  Index position_limit() const { return size_; }
  Index distance_unchecked(Index n, Index m) const {
    const Index dy = n / width_ - m / width_;
    const Index dx = n % width_ - m % width_;
    return (dy < 0 || dx < 0) ? -1 : dy + dx;
  }
  void distance_bounds(Index, Index, Index, Index, Index& lo, Index& hi) const {
    lo = 0;
    hi = height_ - 1 + width_ - 1;
  }

  Index height_, width_, size_ = 0;
};

}  // namespace retention
