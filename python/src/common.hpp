// retention Python module: shared helpers of the binding translation units. NumPy arrays become
// HeadsViews or Eigen maps of their own memory (no copies); every check runs before a kernel does,
// so bad input is a Python exception, never a crash.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <retention/core.hpp>
#include <retention/decay.hpp>
#include <retention/heads.hpp>
#include <retention/multihead.hpp>
#include <retention/state.hpp>

#include <algorithm>
#include <array>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace retention_py {

namespace py = pybind11;
using retention::Index;
template <class T>
using Matrix = retention::Matrix<T>;

/// Which of the two scalar types the kernels are instantiated for an array holds.
enum class Scalar { float32, float64 };

inline const char* scalar_name(Scalar s) { return s == Scalar::float64 ? "float64" : "float32"; }

template <class T>
constexpr Scalar scalar_of() {
  return std::is_same<T, double>::value ? Scalar::float64 : Scalar::float32;
}

[[noreturn]] inline void type_error(const std::string& message) { throw py::type_error(message); }
[[noreturn]] inline void value_error(const std::string& message) { throw py::value_error(message); }

/// `obj` as a NumPy array (TypeError otherwise: a list would be copied, which an output must not
/// be and an input should not silently be).
inline py::array as_array(const char* fn, const char* name, const py::handle& obj) {
  if (!py::isinstance<py::array>(obj))
    type_error(std::string(fn) + ": " + name + " must be a numpy.ndarray (or a torch CPU tensor " +
               "through the retention package), got " + std::string(py::str(obj.get_type())));
  return py::reinterpret_borrow<py::array>(obj);
}

inline std::string shape_of(const py::array& a) {
  std::string s = "[";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + "]";
}

/// float32 or float64 in native byte order; TypeError for every other dtype.
inline Scalar scalar_of(const char* fn, const char* name, const py::array& a) {
  if (py::isinstance<py::array_t<double>>(a)) return Scalar::float64;
  if (py::isinstance<py::array_t<float>>(a)) return Scalar::float32;
  type_error(std::string(fn) + ": " + name + " has dtype " + std::string(py::str(a.dtype())) +
             ", expected float32 or float64");
}

/// Checks an array's dtype against the call's scalar type.
inline void check_scalar(const char* fn, const char* name, const py::array& a, Scalar s) {
  if (scalar_of(fn, name, a) != s)
    type_error(std::string(fn) + ": " + name + " has dtype " + std::string(py::str(a.dtype())) +
               ", expected " + scalar_name(s) + " like the first input");
}

/// Element strides of `a` (byte strides divided by the item size); ValueError for negative or
/// misaligned strides and for an inner dimension that is not contiguous (the kernels read rows of
/// a head as contiguous vectors). Dimensions of extent 1 get stride 0: their stride is arbitrary.
inline std::vector<Index> element_strides(const char* fn, const char* name, const py::array& a) {
  const auto item = static_cast<Index>(a.itemsize());
  if (!(a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_))
    value_error(std::string(fn) + ": " + name + " is not aligned to its item size");
  std::vector<Index> s(static_cast<std::size_t>(a.ndim()));
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    const auto bytes = static_cast<Index>(a.strides(i));
    if (a.shape(i) == 1) {
      s[static_cast<std::size_t>(i)] = 0;
      continue;
    }
    if (bytes < 0 || bytes % item != 0)
      value_error(std::string(fn) + ": " + name + " has a negative or misaligned stride (" +
                  std::to_string(bytes) + " bytes in dimension " + std::to_string(i) +
                  "); make it contiguous first");
    s[static_cast<std::size_t>(i)] = bytes / item;
  }
  if (a.ndim() > 0 && a.shape(a.ndim() - 1) > 1 && s.back() != 1)
    value_error(std::string(fn) + ": " + name + " " + shape_of(a) +
                " is not contiguous in its last dimension (stride " + std::to_string(s.back()) +
                " elements); the kernels need contiguous rows, call .contiguous() / " +
                "numpy.ascontiguousarray first");
  return s;
}

/// True when no two index tuples of (shape, strides) address the same element: sorted by stride,
/// each stride must step over everything the smaller strides span.
inline bool non_overlapping(std::vector<std::pair<Index, Index>> dims /* (stride, extent) */) {
  dims.erase(std::remove_if(dims.begin(), dims.end(),
                            [](const std::pair<Index, Index>& d) { return d.second <= 1; }),
             dims.end());
  std::sort(dims.begin(), dims.end());
  Index span = 1;
  for (const auto& d : dims) {
    if (d.first < span) return false;
    span = d.first * (d.second - 1) + span;
  }
  return true;
}

/// Checks that an output array can be written in place: writeable, and no element aliased.
inline void check_output(const char* fn, const char* name, const py::array& a,
                         const std::vector<Index>& strides) {
  if (!a.writeable())
    value_error(std::string(fn) + ": " + name + " is read-only; outputs are written in place");
  std::vector<std::pair<Index, Index>> dims;
  for (py::ssize_t i = 0; i < a.ndim(); ++i)
    dims.emplace_back(strides[static_cast<std::size_t>(i)], static_cast<Index>(a.shape(i)));
  if (!non_overlapping(dims))
    value_error(std::string(fn) + ": " + name + " " + shape_of(a) +
                " has overlapping elements (a broadcast or expanded array); outputs need their "
                "own memory");
}

/// Shape check of a [B, T, H, D] operand against the expected sizes (negative = any).
inline void expect_dims(const char* fn, const char* name, const py::array& a,
                        std::initializer_list<py::ssize_t> expected, const char* layout) {
  bool ok = a.ndim() == static_cast<py::ssize_t>(expected.size());
  py::ssize_t i = 0;
  for (py::ssize_t e : expected) {
    if (ok && e >= 0 && a.shape(i) != e) ok = false;
    ++i;
  }
  if (!ok) {
    std::string want = "[";
    i = 0;
    for (py::ssize_t e : expected)
      want += (i++ ? ", " : "") + (e >= 0 ? std::to_string(e) : std::string("*"));
    value_error(std::string(fn) + ": " + name + " is " + shape_of(a) + ", expected " + want +
                "] (" + layout + ")");
  }
}

/// A HeadsView of a [B, T, H, D] array (ndim 4), a [B, T, H] array seen with D = 1 (ndim 3, the
/// per-row statistics of MaSA), or, with `step`, a [B, H, D] array seen with T = 1.
template <class T>
retention::HeadsView<T> heads_of(const char* fn, const char* name, const py::array& a, bool output,
                                 bool step = false) {
  const auto s = element_strides(fn, name, a);
  if (output) check_output(fn, name, a, s);
  if (a.size() == 0) value_error(std::string(fn) + ": " + name + " " + shape_of(a) + " is empty");
  retention::HeadsView<T> v;
  v.data = static_cast<T*>(const_cast<void*>(a.data()));
  if (a.ndim() == 4) {
    v.batch = a.shape(0), v.time = a.shape(1), v.heads = a.shape(2), v.dim = a.shape(3);
    v.batch_stride = s[0], v.time_stride = s[1], v.head_stride = s[2];
  } else if (a.ndim() == 3 && step) {
    v.batch = a.shape(0), v.time = 1, v.heads = a.shape(1), v.dim = a.shape(2);
    v.batch_stride = s[0], v.time_stride = 0, v.head_stride = s[1];
  } else if (a.ndim() == 3) {
    v.batch = a.shape(0), v.time = a.shape(1), v.heads = a.shape(2), v.dim = 1;
    v.batch_stride = s[0], v.time_stride = s[1], v.head_stride = s[2];
  } else {
    value_error(
        std::string(fn) + ": " + name + " is " + shape_of(a) + ", expected " +
        (step ? "[batch, heads, dim] or [batch, 1, heads, dim]" : "[batch, time, heads, dim]"));
  }
  return v;
}

/// ValueError when two views share memory (an output must not alias an input or another output).
template <class A, class B>
void check_disjoint(const char* fn, const char* a_name, const retention::HeadsView<A>& a,
                    const char* b_name, const retention::HeadsView<B>& b) {
  const auto x = retention::detail::view_range(a), y = retention::detail::view_range(b);
  if (x.first <= y.second && y.first <= x.second)
    value_error(std::string(fn) + ": " + a_name + " overlaps " + b_name +
                "; outputs need memory of their own");
}

/// A row-major [rows, cols] Eigen map of a 2-D array (inner dimension contiguous).
template <class T>
using RowsMap = Eigen::Map<const Matrix<T>, 0, Eigen::OuterStride<>>;

template <class T>
RowsMap<T> rows_of(const char* fn, const char* name, const py::array& a) {
  if (a.ndim() != 2)
    value_error(std::string(fn) + ": " + name + " is " + shape_of(a) + ", expected [rows, cols]");
  const auto s = element_strides(fn, name, a);
  if (a.size() == 0) value_error(std::string(fn) + ": " + name + " " + shape_of(a) + " is empty");
  const Index cols = a.shape(1);
  return RowsMap<T>(static_cast<const T*>(a.data()), a.shape(0), cols,
                    Eigen::OuterStride<>(a.shape(0) > 1 ? s[0] : cols));
}

/// A NumPy array that owns `m` (moved, not copied), shaped `shape` (default [rows, cols]).
template <class M>
py::array to_numpy(M&& m, std::vector<py::ssize_t> shape = {}) {
  using Plain = std::decay_t<M>;
  using T = typename Plain::Scalar;
  auto* owned = new Plain(std::forward<M>(m));
  py::capsule owner(owned, [](void* p) { delete static_cast<Plain*>(p); });
  if (shape.empty()) {
    if (Plain::IsVectorAtCompileTime)
      shape = {static_cast<py::ssize_t>(owned->size())};
    else
      shape = {static_cast<py::ssize_t>(owned->rows()), static_cast<py::ssize_t>(owned->cols())};
  }
  return py::array_t<T>(shape, owned->data(), owner);
}

/// Form / Normalization from the Python strings (the C++ enumerator names).
retention::Form form_of(const std::string& s);
retention::Normalization normalization_of(const std::string& s);

/// The per-(batch, head) states of a multi-head call, in one of the two scalar types, plus what
/// decoding keeps between steps (the step scratch and the masks of the last gammas).
class States {
 public:
  States(Index batch, Index heads, Index key_dim, Index value_dim, Scalar scalar);

  Scalar scalar() const { return scalar_; }
  Index batch() const { return batch_; }
  Index heads() const { return heads_; }
  Index key_dim() const { return key_dim_; }
  Index value_dim() const { return value_dim_; }

  template <class T>
  std::vector<retention::RetentionState<T>>& get();
  template <class T>
  const std::vector<retention::RetentionState<T>>& get() const;

  /// Masks for `gammas`, rebuilt only when they change (decoding calls this every token).
  const std::vector<retention::CausalDecay>& masks(const std::vector<double>& gammas);

  retention::StepWorkspace<double>* workspace64() { return &ws64_; }
  retention::StepWorkspace<float>* workspace32() { return &ws32_; }

  /// Throws unless this holds states for (batch, heads, dk, dv) of scalar type s.
  void check(const char* fn, const char* name, Index batch, Index heads, Index dk, Index dv,
             Scalar s) const;

 private:
  Scalar scalar_;
  Index batch_, heads_, key_dim_, value_dim_;
  std::vector<retention::RetentionState<double>> s64_;
  std::vector<retention::RetentionState<float>> s32_;
  retention::StepWorkspace<double> ws64_;
  retention::StepWorkspace<float> ws32_;
  std::vector<double> mask_gammas_;
  std::vector<retention::CausalDecay> masks_;
};

template <>
std::vector<retention::RetentionState<double>>& States::get<double>();
template <>
std::vector<retention::RetentionState<float>>& States::get<float>();
template <>
const std::vector<retention::RetentionState<double>>& States::get<double>() const;
template <>
const std::vector<retention::RetentionState<float>>& States::get<float>() const;

void bind_states(py::module_& m);
void bind_retention(py::module_& m);
void bind_masa(py::module_& m);
void bind_layers(py::module_& m);

}  // namespace retention_py
