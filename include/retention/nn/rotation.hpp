// retention: the "theta shift" rotation of RetNet (docs/math.md §3), also used by RMT by raster
// index (docs/math.md §4).
#pragma once

#include <retention/core.hpp>
#include <retention/detail/overlap.hpp>
#include <retention/detail/threading.hpp>

#include <algorithm>
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
  /// Largest head_dim accepted (the angle table holds head_dim / 2 doubles).
  static constexpr Index max_head_dim = Index(1) << 20;

  /// head_dim even, 2 <= head_dim <= max_head_dim.
  explicit ThetaShift(Index head_dim) : head_dim_(head_dim) {
    if (head_dim < 2 || head_dim % 2 != 0)
      detail::fail("ThetaShift", "head_dim must be even and >= 2 (rotation acts on pairs), got " +
                                     std::to_string(head_dim));
    if (head_dim > max_head_dim)
      detail::fail("ThetaShift", "head_dim must be <= " + std::to_string(max_head_dim) + ", got " +
                                     std::to_string(head_dim));
    const Index half = head_dim / 2;
    theta_.resize(static_cast<std::size_t>(half));
    for (Index j = 0; j < half; ++j) {
      const double e = half == 1 ? 0.0 : static_cast<double>(j) / static_cast<double>(half - 1);
      theta_[static_cast<std::size_t>(j)] = std::pow(10000.0, -e);
    }
    // The step table of rotate(), formed once here where it is small: its kSpan x head_dim / 2
    // sin/cos pairs cost as much as rotating over a hundred rows.
    if (half <= kMaxTabledHalf) fill_step_table(step_cos_, step_sin_);
  }

  Index head_dim() const { return head_dim_; }
  /// theta_j, j = 0..head_dim/2-1.
  const std::vector<double>& thetas() const { return theta_; }

  /// Rotates every row of x [T, k*head_dim] (a matrix, Map or Block) in place: row t is at
  /// position first_position + t (first_position >= 0, first_position + T must fit in an Index);
  /// every head_dim-wide group of columns (one head) gets the same rotation. threads: at most
  /// this many threads for long inputs (0 = OpenMP's default, capped by the thread rule).
  template <class Derived>
  void apply(Derived&& x, Index first_position, int threads = 0) const {
    detail::assert_dense_output<Derived>();
    detail::check_threads("ThetaShift::apply", "threads", threads);
    check("ThetaShift::apply", "x", x.rows(), x.cols(), first_position);
    // A 0-column dummy as the second operand keeps one code path.
    Matrix<typename std::decay_t<Derived>::Scalar> none(x.rows(), 0);
    rotate(x, none, first_position, threads);
  }

  /// Rotates x [T, a*head_dim] and y [T, b*head_dim] (e.g. q and k) in place with the same angles,
  /// row t at position first_position + t. Each cos/sin is computed once for both. x and y must
  /// not share memory (the shared part would be rotated twice): shape_error
  /// "ThetaShift::apply_pair: y overlaps x"; disjoint column blocks of one matrix are fine.
  /// threads as for apply.
  template <class DX, class DY>
  void apply_pair(DX&& x, DY&& y, Index first_position, int threads = 0) const {
    detail::assert_dense_output<DX>();
    detail::assert_dense_output<DY>();
    detail::assert_same_scalar<typename std::decay_t<DX>::Scalar,
                               typename std::decay_t<DY>::Scalar>();
    detail::check_threads("ThetaShift::apply_pair", "threads", threads);
    check("ThetaShift::apply_pair", "x", x.rows(), x.cols(), first_position);
    check("ThetaShift::apply_pair", "y", y.rows(), y.cols(), first_position);
    if (y.rows() != x.rows())
      detail::fail("ThetaShift::apply_pair", "y is " + detail::shape_string(y.rows(), y.cols()) +
                                                 ", expected [" + std::to_string(x.rows()) +
                                                 " x *] (x is " +
                                                 detail::shape_string(x.rows(), x.cols()) + ")");
    if (detail::shares_memory(x, y))
      detail::fail("ThetaShift::apply_pair",
                   "y overlaps x; in-place pairs are not supported (rotate one matrix with apply)");
    rotate(x, y, first_position, threads);
  }

 private:
  void check(const char* fn, const char* name, Index rows, Index cols, Index first_position) const {
    if (cols % head_dim_ != 0)
      detail::fail(fn, std::string(name) + " is " + detail::shape_string(rows, cols) +
                           ", columns not a multiple of head_dim " + std::to_string(head_dim_));
    if (first_position < 0)
      detail::fail(fn, "first_position must be >= 0, got " + std::to_string(first_position));
    Index end = 0;
    if (detail::add_overflows(first_position, rows, end))
      detail::fail(fn, "first_position + rows overflows: " + std::to_string(first_position) +
                           " + " + std::to_string(rows));
  }

  /// Rows are rotated in spans of kSpan consecutive positions. The angle of row t0 + l of a span is
  /// (first_position + t0) theta_j + l theta_j, so its cos and sin follow from the span's base pair
  /// and a table of l theta_j by the angle-addition formulas, in double: rows / kSpan +
  /// kSpan sin/cos pairs per frequency instead of one per row (sin/cos of large angles in libm
  /// dominated the rotation). Both angles are formed in double from integers as before; the sums
  /// differ from cos(p theta) computed directly by a few ulps of double.
  static constexpr Index kSpan = 64;
  /// Largest head_dim / 2 whose step table the object keeps (2 x 64 x 512 doubles, 512 KB).
  static constexpr Index kMaxTabledHalf = 512;

  /// cos/sin(l theta_j) at [l * half + j] for l < kSpan, j < half.
  void fill_step_table(std::vector<double>& cos_table, std::vector<double>& sin_table) const {
    const Index half = head_dim_ / 2;
    cos_table.resize(static_cast<std::size_t>(kSpan * half));
    sin_table.resize(static_cast<std::size_t>(kSpan * half));
    for (Index l = 0; l < kSpan; ++l)
      for (Index j = 0; j < half; ++j) {
        const double a = static_cast<double>(l) * theta_[static_cast<std::size_t>(j)];
        cos_table[static_cast<std::size_t>(l * half + j)] = std::cos(a);
        sin_table[static_cast<std::size_t>(l * half + j)] = std::sin(a);
      }
  }

  template <class DX, class DY>
  void rotate(DX& x, DY& y, Index first_position, int threads) const {
    using T = typename std::decay_t<DX>::Scalar;
    const Index half = head_dim_ / 2;
    const Index gx = x.cols() / head_dim_, gy = y.cols() / head_dim_;
    const Index rows = x.rows();
    if (gx == 0 && gy == 0) return;  // nothing to rotate (rows may still be huge)
    if (rows < 2 * kSpan) {
      // Short inputs (a decoding token): one sin/cos pair per row and frequency, no allocation.
      for (Index t = 0; t < rows; ++t) {
        const double p = static_cast<double>(first_position + t);
        for (Index j = 0; j < half; ++j) {
          const double angle = p * theta_[static_cast<std::size_t>(j)];
          const T c = static_cast<T>(std::cos(angle)), s = static_cast<T>(std::sin(angle));
          rotate_pair(x, t, gx, j, c, s);
          rotate_pair(y, t, gy, j, c, s);
        }
      }
      return;
    }
    const Index spans = (rows + kSpan - 1) / kSpan;
    // step_cos/sin[l * half + j] = cos/sin(l theta_j), l < kSpan: the constructor's table, or one
    // formed here for a head_dim too large to keep one.
    std::vector<double> own_cos, own_sin;
    if (step_cos_.empty()) fill_step_table(own_cos, own_sin);
    const std::vector<double>& step_cos = step_cos_.empty() ? own_cos : step_cos_;
    const std::vector<double>& step_sin = step_cos_.empty() ? own_sin : step_sin_;
    // Spans are independent; long prompts spread them over threads (the library's thread rule).
    // A rotated pair costs about as much as 40 flops of a product (its cos and sin are formed
    // per row, and the pairs are strided).
    const double work = 40.0 * static_cast<double>(rows * half * (gx + gy));
    detail::parallel_tasks(detail::plan_team(threads, spans, work), spans, [&](Index sp) {
      std::vector<double> base_cos(static_cast<std::size_t>(half)),
          base_sin(static_cast<std::size_t>(half));
      std::vector<T> c(static_cast<std::size_t>(half)), s(static_cast<std::size_t>(half));
      const Index t0 = sp * kSpan, n = std::min(kSpan, rows - t0);
      const double p0 = static_cast<double>(first_position + t0);
      for (Index j = 0; j < half; ++j) {
        const double a = p0 * theta_[static_cast<std::size_t>(j)];
        base_cos[static_cast<std::size_t>(j)] = std::cos(a);
        base_sin[static_cast<std::size_t>(j)] = std::sin(a);
      }
      for (Index l = 0; l < n; ++l) {
        const Index t = t0 + l;
        for (Index j = 0; j < half; ++j) {
          const auto jj = static_cast<std::size_t>(j), lj = static_cast<std::size_t>(l * half + j);
          c[jj] = static_cast<T>(base_cos[jj] * step_cos[lj] - base_sin[jj] * step_sin[lj]);
          s[jj] = static_cast<T>(base_sin[jj] * step_cos[lj] + base_cos[jj] * step_sin[lj]);
        }
        rotate_row(x, t, gx, c.data(), s.data());
        rotate_row(y, t, gy, c.data(), s.data());
      }
    });
  }

  /// Pair j of every head group of row t rotated by (c, s).
  template <class D, class T>
  void rotate_pair(D& x, Index t, Index groups, Index j, T c, T s) const {
    for (Index g = 0; g < groups; ++g) {
      const Index i = g * head_dim_ + 2 * j;
      const T a = x(t, i), b = x(t, i + 1);
      x(t, i) = a * c - b * s;
      x(t, i + 1) = b * c + a * s;
    }
  }

  /// (x_{2j}, x_{2j+1}) of every head group of row t rotated by (c_j, s_j).
  template <class D, class T>
  void rotate_row(D& x, Index t, Index groups, const T* c, const T* s) const {
    const Index half = head_dim_ / 2;
    for (Index g = 0; g < groups; ++g)
      for (Index j = 0; j < half; ++j) {
        const Index i = g * head_dim_ + 2 * j;
        const T a = x(t, i), b = x(t, i + 1);
        x(t, i) = a * c[j] - b * s[j];
        x(t, i + 1) = b * c[j] + a * s[j];
      }
  }

  Index head_dim_;
  std::vector<double> theta_;
  std::vector<double> step_cos_, step_sin_;  // empty when head_dim / 2 > kMaxTabledHalf
};

}  // namespace retention
