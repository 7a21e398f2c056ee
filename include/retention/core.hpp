// retention: shared types, error type and scalar checks used by every header.
#pragma once

#include <Eigen/Core>

#include <cmath>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace retention {

using Index = Eigen::Index;

/// Token-major dense matrix: one row per token, [T, d].
template <class T>
using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
/// One row (a token), [1, d].
template <class T>
using RowVector = Eigen::Matrix<T, 1, Eigen::Dynamic>;
/// Column vector, [d, 1].
template <class T>
using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;

/// Which of the three equivalent computations of retention to run.
enum class Form { parallel, recurrent, chunkwise };

/// Output-row rescaling of docs/math.md §2 ("Normalisation").
enum class Normalization { none, decay, decay_and_score };

inline const char* to_string(Form f) {
  switch (f) {
    case Form::parallel:
      return "parallel";
    case Form::recurrent:
      return "recurrent";
    case Form::chunkwise:
      return "chunkwise";
  }
  return "?";
}

inline const char* to_string(Normalization n) {
  switch (n) {
    case Normalization::none:
      return "none";
    case Normalization::decay:
      return "decay";
    case Normalization::decay_and_score:
      return "decay_and_score";
  }
  return "?";
}

/// Thrown for every mismatched shape or out-of-range argument. The message names the function,
/// the argument and (for shapes) both the actual and the expected shape.
class shape_error : public std::invalid_argument {
 public:
  explicit shape_error(const std::string& what) : std::invalid_argument(what) {}
};

namespace detail {

inline std::string shape_string(Index rows, Index cols) {
  std::ostringstream s;
  s << '[' << rows << " x " << cols << ']';
  return s.str();
}

[[noreturn]] inline void fail(const char* function, const std::string& message) {
  throw shape_error(std::string(function) + ": " + message);
}

/// Throws unless `m` is [rows, cols]; a negative expectation means "any".
template <class Derived>
void check_shape(const char* function, const char* name, const Eigen::EigenBase<Derived>& m,
                 Index rows, Index cols) {
  const bool ok = (rows < 0 || m.rows() == rows) && (cols < 0 || m.cols() == cols);
  if (!ok) {
    const std::string expected_rows = rows < 0 ? std::string("*") : std::to_string(rows);
    const std::string expected_cols = cols < 0 ? std::string("*") : std::to_string(cols);
    fail(function, std::string(name) + " is " + shape_string(m.rows(), m.cols()) + ", expected [" +
                       expected_rows + " x " + expected_cols + "]");
  }
}

inline void check_positive(const char* function, const char* name, Index value) {
  if (value < 1) fail(function, std::string(name) + " must be >= 1, got " + std::to_string(value));
}

/// gamma must lie in (0, 1]; NaN is rejected too.
inline void check_gamma(const char* function, double gamma) {
  if (!(gamma > 0.0 && gamma <= 1.0)) {
    std::ostringstream s;
    s << "gamma must be in (0, 1], got " << gamma;
    fail(function, s.str());
  }
}

/// Overflow-checked Index arithmetic for size products: true (and r unspecified) on overflow.
inline bool mul_overflows(Index a, Index b, Index& r) { return __builtin_mul_overflow(a, b, &r); }
inline bool add_overflows(Index a, Index b, Index& r) { return __builtin_add_overflow(a, b, &r); }
/// r = acc + a * b, checked.
inline bool add_mul_overflows(Index acc, Index a, Index b, Index& r) {
  Index p = 0;
  return mul_overflows(a, b, p) || add_overflows(acc, p, r);
}

/// a * b for sizes, or shape_error naming the function and what overflowed.
inline Index checked_product(const char* function, const char* what, Index a, Index b) {
  Index r = 0;
  if (a < 0 || b < 0 || mul_overflows(a, b, r))
    fail(function,
         std::string(what) + " overflows: " + std::to_string(a) + " x " + std::to_string(b));
  return r;
}

template <class T>
struct is_supported_scalar : std::integral_constant<bool, std::is_same<T, float>::value ||
                                                              std::is_same<T, double>::value> {};

template <class T>
constexpr void assert_scalar() {
  static_assert(!std::is_integral<T>::value,
                "retention: integer scalars are not supported; use float or double");
  static_assert(is_supported_scalar<T>::value, "retention: scalar type must be float or double");
}

template <class A, class B>
constexpr void assert_same_scalar() {
  static_assert(std::is_same<A, B>::value,
                "retention: mixed scalar types; cast the inputs to one of float or double");
}

/// True when x holds an Inf or a NaN: x * 0 is 0 for every finite entry and NaN otherwise, so one
/// vectorised sum answers it. O(size), next to nothing beside the products it guards.
template <class Derived>
bool has_nonfinite(const Eigen::MatrixBase<Derived>& x) {
  using T = typename Derived::Scalar;
  if (x.size() == 0) return false;
  return !((x.array() * T(0)).sum() == T(0));
}

/// The one operand type the retention and Manhattan kernels are compiled for: rows of a row-major
/// matrix with unit inner stride and any row stride (a Matrix, a row block of one, one head of a
/// HeadsView). The public fronts take any Eigen expression and pass it on as this type, so that the
/// kernels are instantiated once per scalar and mask (compile time) and every caller runs the same
/// code (the same rounding): an operand with another layout is copied first, O(T d) against the
/// kernels' O(T d (C + d)).
template <class T>
using ConstRows = Eigen::Ref<const Matrix<T>, 0, Eigen::OuterStride<>>;
template <class T>
using Rows = Eigen::Ref<Matrix<T>, 0, Eigen::OuterStride<>>;

/// Whether an output expression binds to Rows<T> as it is.
template <class D, class T>
constexpr bool binds_as_rows = std::is_same<typename D::Scalar, T>::value &&
                               (int(D::Flags) & Eigen::DirectAccessBit) != 0 &&
                               (int(D::Flags) & Eigen::LvalueBit) != 0 &&
                               (int(D::Flags) & Eigen::RowMajorBit) != 0 &&
                               int(D::InnerStrideAtCompileTime) == 1;

/// An output as Rows<T>: the expression itself when it binds, else a temporary that commit()
/// copies back once the kernel has returned.
template <class T, class D, bool Direct = binds_as_rows<std::remove_reference_t<D>, T>>
struct RowsOutput {
  explicit RowsOutput(D& out) : rows(out) {}
  void commit() {}
  Rows<T> rows;
};
template <class T, class D>
struct RowsOutput<T, D, false> {
  explicit RowsOutput(D& out) : target(out), copy(out.rows(), out.cols()), rows(copy) {}
  void commit() { target = copy; }
  D& target;
  Matrix<T> copy;
  Rows<T> rows;
};

}  // namespace detail
}  // namespace retention
