// retention: named tensors, the one way layers load their parameters (by their PyTorch names).
// A ParameterMap holds views (dtype, shape, pointer) of tensors that live elsewhere: a PyTorch
// state_dict's buffers, a memory-mapped safetensors file (io/safetensors.hpp), or user arrays.
#pragma once

#include <retention/core.hpp>

#include <Eigen/Core>

#include <cstring>
#include <initializer_list>
#include <map>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

namespace retention {

/// Element type of a stored tensor.
enum class DType { float64, float32, float16, bfloat16 };

inline const char* to_string(DType t) {
  switch (t) {
    case DType::float64:
      return "float64";
    case DType::float32:
      return "float32";
    case DType::float16:
      return "float16";
    case DType::bfloat16:
      return "bfloat16";
  }
  return "?";
}

inline std::size_t dtype_size(DType t) {
  return t == DType::float64 ? 8 : t == DType::float32 ? 4 : 2;
}

/// The DType of a C++ scalar (float, double, Eigen::half, Eigen::bfloat16).
template <class S>
constexpr DType dtype_of() {
  static_assert(std::is_same<S, double>::value || std::is_same<S, float>::value ||
                    std::is_same<S, Eigen::half>::value || std::is_same<S, Eigen::bfloat16>::value,
                "retention: tensors are float64, float32, float16 (Eigen::half) or bfloat16");
  return std::is_same<S, double>::value        ? DType::float64
         : std::is_same<S, float>::value       ? DType::float32
         : std::is_same<S, Eigen::half>::value ? DType::float16
                                               : DType::bfloat16;
}

/// A view of one contiguous row-major tensor stored elsewhere (not owned).
struct TensorRef {
  DType dtype = DType::float32;
  std::vector<Index> shape;
  const void* data = nullptr;

  Index numel() const {
    Index n = 1;
    for (Index s : shape) n = detail::checked_product("TensorRef", "numel", n, s);
    return n;
  }
};

namespace detail {

inline std::string dims_string(const std::vector<Index>& dims) {
  std::ostringstream s;
  s << '[';
  for (std::size_t i = 0; i < dims.size(); ++i) s << (i ? ", " : "") << dims[i];
  s << ']';
  return s.str();
}

template <class S, class T>
void convert_elements(const void* src, Index n, T* dst) {
  // Elements are read with memcpy: a tensor inside a file need not be aligned to its type.
  const unsigned char* p = static_cast<const unsigned char*>(src);
  for (Index i = 0; i < n; ++i) {
    S s;
    std::memcpy(&s, p + static_cast<std::size_t>(i) * sizeof(S), sizeof(S));
    if constexpr (std::is_floating_point<S>::value)
      dst[i] = static_cast<T>(s);
    else
      dst[i] = static_cast<T>(static_cast<float>(s));  // 16-bit formats convert exactly to float
  }
}

}  // namespace detail

/// Copies a tensor into `out` (numel values of T, converted from its dtype), after checking its
/// shape against `expected` (entries < 0 match any size). Errors name `fn` and the tensor.
template <class T>
void read_tensor(const char* fn, const std::string& name, const TensorRef& t,
                 const std::vector<Index>& expected, T* out) {
  bool ok = t.shape.size() == expected.size();
  for (std::size_t i = 0; ok && i < expected.size(); ++i)
    ok = expected[i] < 0 || t.shape[i] == expected[i];
  if (!ok)
    detail::fail(fn, "parameter '" + name + "' has shape " + detail::dims_string(t.shape) +
                         ", expected " + detail::dims_string(expected));
  if (!t.data) detail::fail(fn, "parameter '" + name + "' has no data");
  const Index n = t.numel();
  switch (t.dtype) {
    case DType::float64:
      detail::convert_elements<double>(t.data, n, out);
      break;
    case DType::float32:
      detail::convert_elements<float>(t.data, n, out);
      break;
    case DType::float16:
      detail::convert_elements<Eigen::half>(t.data, n, out);
      break;
    case DType::bfloat16:
      detail::convert_elements<Eigen::bfloat16>(t.data, n, out);
      break;
    default:
      detail::fail(fn, "parameter '" + name + "' has an unknown dtype");
  }
}

/// Named tensor views: the source every layer's load() reads. Fill it from any buffers that
/// outlive the load (a state_dict's tensors, a mapped file); nothing is copied until a layer reads.
class ParameterMap {
 public:
  /// Adds (or replaces) a view of `data` with the given shape.
  template <class S>
  void add(const std::string& name, const S* data, std::vector<Index> shape) {
    TensorRef t;
    t.dtype = dtype_of<S>();
    t.shape = std::move(shape);
    t.data = data;
    add(name, std::move(t));
  }
  /// Adds a view of an Eigen matrix or vector (row-major storage, or a vector) under `name`.
  /// `shape` defaults to the matrix's [rows, cols] (a vector's [size]).
  template <class Derived>
  void add_dense(const std::string& name, const Eigen::PlainObjectBase<Derived>& m,
                 std::vector<Index> shape = {}) {
    static_assert(Derived::IsVectorAtCompileTime || Derived::IsRowMajor,
                  "retention: ParameterMap::add_dense needs row-major storage (torch layout)");
    if (shape.empty())
      shape = Derived::IsVectorAtCompileTime ? std::vector<Index>{m.size()}
                                             : std::vector<Index>{m.rows(), m.cols()};
    add(name, m.data(), std::move(shape));
  }
  void add(const std::string& name, TensorRef t) {
    if (t.data == nullptr) detail::fail("ParameterMap::add", "tensor '" + name + "': null data");
    for (Index s : t.shape)
      if (s < 0)
        detail::fail("ParameterMap::add",
                     "tensor '" + name + "': negative size in " + detail::dims_string(t.shape));
    t.numel();  // overflow check
    tensors_[name] = std::move(t);
  }

  /// The tensor called `name`, or nullptr.
  const TensorRef* find(const std::string& name) const {
    const auto it = tensors_.find(name);
    return it == tensors_.end() ? nullptr : &it->second;
  }
  bool contains(const std::string& name) const { return find(name) != nullptr; }
  std::size_t size() const { return tensors_.size(); }
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& kv : tensors_) out.push_back(kv.first);
    return out;
  }

 private:
  std::map<std::string, TensorRef> tensors_;
};

namespace detail {

/// The tensor `prefix + name` of any source with find(name) -> const TensorRef*, or shape_error
/// naming the function and the missing parameter.
template <class Source>
const TensorRef& require(const char* fn, const Source& source, const std::string& full_name) {
  const TensorRef* t = source.find(full_name);
  if (!t) fail(fn, "missing parameter '" + full_name + "'");
  return *t;
}

}  // namespace detail
}  // namespace retention
