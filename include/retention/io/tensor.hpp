// retention/io: dtype enum, non-owning TensorView, the TensorSource name -> tensor interface and
// an in-memory TensorMap. Eigen-only (no JSON): layers load their weights through these types.
#pragma once

#include <retention/core.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace retention {
namespace io {

/// Every error of retention::io: a malformed or unreadable file, a missing tensor, a dtype or shape
/// that does not fit the request. The message names the file (or in-memory source) and the tensor.
class file_error : public std::runtime_error {
 public:
  explicit file_error(const std::string& what) : std::runtime_error(what) {}
};

/// The safetensors element types. Views of any of them can be taken; conversion to Eigen matrices
/// is supported for f64, f32, f16 and bf16 only (is_float_dtype).
enum class DType {
  f64,
  f32,
  f16,
  bf16,
  i64,
  i32,
  i16,
  i8,
  u64,
  u32,
  u16,
  u8,
  boolean,
  f8_e5m2,
  f8_e4m3,
  f8_e8m0
};

/// The dtype's name as spelled in a safetensors header ("F32", "BF16", ...).
inline const char* to_string(DType d) {
  switch (d) {
    case DType::f64:
      return "F64";
    case DType::f32:
      return "F32";
    case DType::f16:
      return "F16";
    case DType::bf16:
      return "BF16";
    case DType::i64:
      return "I64";
    case DType::i32:
      return "I32";
    case DType::i16:
      return "I16";
    case DType::i8:
      return "I8";
    case DType::u64:
      return "U64";
    case DType::u32:
      return "U32";
    case DType::u16:
      return "U16";
    case DType::u8:
      return "U8";
    case DType::boolean:
      return "BOOL";
    case DType::f8_e5m2:
      return "F8_E5M2";
    case DType::f8_e4m3:
      return "F8_E4M3";
    case DType::f8_e8m0:
      return "F8_E8M0";
  }
  return "?";
}

/// Bytes per element.
inline std::size_t dtype_size(DType d) {
  switch (d) {
    case DType::f64:
    case DType::i64:
    case DType::u64:
      return 8;
    case DType::f32:
    case DType::i32:
    case DType::u32:
      return 4;
    case DType::f16:
    case DType::bf16:
    case DType::i16:
    case DType::u16:
      return 2;
    case DType::i8:
    case DType::u8:
    case DType::boolean:
    case DType::f8_e5m2:
    case DType::f8_e4m3:
    case DType::f8_e8m0:
      return 1;
  }
  return 1;
}

/// True for the dtypes that to_matrix / as_matrix accept: F64, F32, F16, BF16.
inline bool is_float_dtype(DType d) {
  return d == DType::f64 || d == DType::f32 || d == DType::f16 || d == DType::bf16;
}

/// Sets `out` from a header name ("F32"); false when the name is not a known dtype.
inline bool parse_dtype(const std::string& name, DType& out) {
  static const DType all[] = {DType::f64,     DType::f32,     DType::f16,     DType::bf16,
                              DType::i64,     DType::i32,     DType::i16,     DType::i8,
                              DType::u64,     DType::u32,     DType::u16,     DType::u8,
                              DType::boolean, DType::f8_e5m2, DType::f8_e4m3, DType::f8_e8m0};
  for (DType d : all)
    if (name == to_string(d)) {
      out = d;
      return true;
    }
  return false;
}

/// The dtype of a C++ scalar: float -> f32, double -> f64, Eigen::half -> f16,
/// Eigen::bfloat16 -> bf16.
template <class T>
struct dtype_of {
  static_assert(sizeof(T) == 0,
                "retention: io tensors hold float, double, Eigen::half or Eigen::bfloat16");
};
template <>
struct dtype_of<double> : std::integral_constant<DType, DType::f64> {};
template <>
struct dtype_of<float> : std::integral_constant<DType, DType::f32> {};
template <>
struct dtype_of<Eigen::half> : std::integral_constant<DType, DType::f16> {};
template <>
struct dtype_of<Eigen::bfloat16> : std::integral_constant<DType, DType::bf16> {};

namespace detail {

/// "<origin>: tensor '<name>': <message>" (the tensor part only when a name is given).
inline std::string io_message(const std::string& origin, const std::string& tensor,
                              const std::string& message) {
  std::string s = origin.empty() ? std::string("<memory>") : origin;
  s += ": ";
  if (!tensor.empty()) s += "tensor '" + tensor + "': ";
  return s + message;
}

[[noreturn]] inline void io_fail(const std::string& origin, const std::string& tensor,
                                 const std::string& message) {
  throw file_error(io_message(origin, tensor, message));
}

inline std::string shape_to_string(const std::vector<Index>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

/// Product of the dims, or false when a dim is negative or the product overflows Index.
inline bool shape_numel(const std::vector<Index>& shape, Index& numel) {
  Index n = 1;
  for (Index d : shape)
    if (d < 0 || retention::detail::mul_overflows(n, d, n)) return false;
  numel = n;
  return true;
}

constexpr bool host_little_endian() {
#if defined(__BYTE_ORDER__) && defined(__ORDER_BIG_ENDIAN__) && \
    __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  return false;
#else
  return true;
#endif
}

/// Reads a little-endian U from possibly unaligned bytes (memcpy: no alignment requirement).
template <class U>
U load_le(const unsigned char* p) {
  static_assert(std::is_trivially_copyable<U>::value, "retention: load_le needs a plain type");
  U u;
  if (host_little_endian()) {
    std::memcpy(&u, p, sizeof(U));
  } else {
    unsigned char b[sizeof(U)];
    for (std::size_t i = 0; i < sizeof(U); ++i) b[i] = p[sizeof(U) - 1 - i];
    std::memcpy(&u, b, sizeof(U));
  }
  return u;
}

/// Writes `u` as little-endian bytes.
template <class U>
void store_le(const U& u, unsigned char* p) {
  static_assert(std::is_trivially_copyable<U>::value, "retention: store_le needs a plain type");
  std::memcpy(p, &u, sizeof(U));
  if (!host_little_endian()) std::reverse(p, p + sizeof(U));
}

/// One element of a float dtype at `p`, converted to T. 16-bit formats widen exactly to float
/// first; narrowing to half/bfloat16 rounds to nearest even (from f64 through float).
template <class T>
T decode_float(DType d, const unsigned char* p) {
  switch (d) {
    case DType::f64:
      return static_cast<T>(load_le<double>(p));
    case DType::f32:
      return static_cast<T>(load_le<float>(p));
    case DType::f16:
      return static_cast<T>(
          static_cast<float>(Eigen::numext::bit_cast<Eigen::half>(load_le<std::uint16_t>(p))));
    case DType::bf16:
      return static_cast<T>(
          static_cast<float>(Eigen::numext::bit_cast<Eigen::bfloat16>(load_le<std::uint16_t>(p))));
    default:
      break;
  }
  return T(0);
}

/// Raw bits of a 16-bit float (for tests and writers that build bit patterns).
inline std::uint16_t bits_of(Eigen::half h) { return Eigen::numext::bit_cast<std::uint16_t>(h); }
inline std::uint16_t bits_of(Eigen::bfloat16 h) {
  return Eigen::numext::bit_cast<std::uint16_t>(h);
}

}  // namespace detail

/// Non-owning view of one tensor: dtype, shape and its row-major little-endian bytes. The bytes
/// belong to whoever produced the view (a SafetensorsReader's mapping, a TensorMap) and must
/// outlive it. name and origin only label error messages.
class TensorView {
 public:
  TensorView() = default;

  /// Checks that every dim is >= 0 and nbytes == numel * dtype_size(dtype); throws file_error.
  TensorView(DType dtype, std::vector<Index> shape, const void* data, std::size_t nbytes,
             std::string name = std::string(), std::string origin = std::string())
      : dtype_(dtype),
        shape_(std::move(shape)),
        data_(static_cast<const unsigned char*>(data)),
        nbytes_(nbytes),
        name_(std::move(name)),
        origin_(std::move(origin)) {
    Index bytes = 0;
    if (!detail::shape_numel(shape_, numel_) ||
        retention::detail::mul_overflows(numel_, static_cast<Index>(dtype_size(dtype_)), bytes))
      fail("shape " + detail::shape_to_string(shape_) + " is negative or too large");
    if (static_cast<std::size_t>(bytes) != nbytes_)
      fail(std::string(to_string(dtype_)) + " " + detail::shape_to_string(shape_) + " needs " +
           std::to_string(bytes) + " bytes, got " + std::to_string(nbytes_));
    if (data_ == nullptr && nbytes_ != 0) fail("null data pointer");
  }

  DType dtype() const { return dtype_; }
  const std::vector<Index>& shape() const { return shape_; }
  Index rank() const { return static_cast<Index>(shape_.size()); }
  /// Number of elements (1 for a rank-0 scalar).
  Index numel() const { return numel_; }
  const unsigned char* data() const { return data_; }
  std::size_t nbytes() const { return nbytes_; }
  const std::string& name() const { return name_; }
  const std::string& origin() const { return origin_; }
  std::string shape_string() const { return detail::shape_to_string(shape_); }

  /// Throws file_error unless the shape is exactly `expected` (e.g. {out, in} for a Linear).
  void expect_shape(const std::vector<Index>& expected) const {
    if (shape_ != expected)
      fail("shape is " + shape_string() + ", expected " + detail::shape_to_string(expected));
  }

  /// True when as_matrix<T>() would succeed: dtype is exactly T, the bytes are aligned for T, the
  /// host is little-endian and the rank is <= 2.
  template <class T>
  bool can_map() const {
    return dtype_ == dtype_of<T>::value && aligned_for<T>() && detail::host_little_endian() &&
           rank() <= 2;
  }

  /// Zero-copy [rows, cols] view (rank 2: the shape; rank 1: [1, n]; rank 0: [1, 1]). Needs
  /// can_map<T>(); otherwise throws file_error (to_matrix<T>() converts and copies instead).
  template <class T>
  Eigen::Map<const Matrix<T>> as_matrix() const {
    return as_matrix<T>(matrix_rows(), matrix_cols());
  }

  /// Zero-copy view reshaped to [rows, cols] (rows * cols == numel), row-major.
  template <class T>
  Eigen::Map<const Matrix<T>> as_matrix(Index rows, Index cols) const {
    check_reshape(rows, cols);
    if (dtype_ != dtype_of<T>::value)
      fail(std::string("as_matrix needs dtype ") + to_string(dtype_of<T>::value) + ", tensor is " +
           to_string(dtype_) + " (use to_matrix to convert)");
    if (!aligned_for<T>())
      fail(std::string("data is not aligned to ") + std::to_string(alignof(T)) +
           " bytes, cannot map it (use to_matrix to copy)");
    if (!detail::host_little_endian()) fail("as_matrix needs a little-endian host (use to_matrix)");
    return Eigen::Map<const Matrix<T>>(reinterpret_cast<const T*>(data_), rows, cols);
  }

  /// Copy converted to T: [rows, cols] as for as_matrix. F64/F32/F16/BF16 only; other dtypes
  /// throw file_error.
  template <class T>
  Matrix<T> to_matrix() const {
    return to_matrix<T>(matrix_rows(), matrix_cols());
  }

  /// Copy converted to T, reshaped to [rows, cols] (rows * cols == numel), row-major.
  template <class T>
  Matrix<T> to_matrix(Index rows, Index cols) const {
    check_reshape(rows, cols);
    Matrix<T> m(rows, cols);
    copy_elements(m.data());
    return m;
  }

  /// Copy of all elements in row-major order as a column vector [numel].
  template <class T>
  Vector<T> to_vector() const {
    Vector<T> v(numel_);
    copy_elements(v.data());
    return v;
  }

  /// Rows of the 2-D interpretation: shape[0] for rank 2, 1 for rank 0 and 1; file_error above 2.
  Index matrix_rows() const {
    check_matrix_rank();
    return rank() == 2 ? shape_[0] : 1;
  }
  /// Columns of the 2-D interpretation: shape[1] for rank 2, n for rank 1, 1 for rank 0.
  Index matrix_cols() const {
    check_matrix_rank();
    return rank() == 0 ? 1 : shape_[shape_.size() - 1];
  }

 private:
  [[noreturn]] void fail(const std::string& message) const {
    detail::io_fail(origin_, name_.empty() ? std::string("<unnamed>") : name_, message);
  }

  template <class T>
  bool aligned_for() const {
    return reinterpret_cast<std::uintptr_t>(data_) % alignof(T) == 0;
  }

  void check_matrix_rank() const {
    if (rank() > 2)
      fail("is rank " + std::to_string(rank()) + " " + shape_string() +
           "; pass (rows, cols) to reshape it into a matrix");
  }

  void check_reshape(Index rows, Index cols) const {
    Index n = 0;
    if (rows < 0 || cols < 0 || retention::detail::mul_overflows(rows, cols, n) || n != numel_)
      fail("cannot view " + shape_string() + " (" + std::to_string(numel_) + " elements) as " +
           retention::detail::shape_string(rows, cols));
  }

  template <class T>
  void copy_elements(T* out) const {
    (void)dtype_of<T>::value;  // T must be one of the four float types
    if (!is_float_dtype(dtype_))
      fail(std::string("dtype ") + to_string(dtype_) +
           " is not supported for conversion (supported: F64, F32, F16, BF16)");
    const std::size_t size = dtype_size(dtype_);
    if (dtype_ == dtype_of<T>::value && detail::host_little_endian()) {
      if (nbytes_ != 0) std::memcpy(out, data_, nbytes_);  // bit-exact, NaN payloads included
      return;
    }
    for (Index i = 0; i < numel_; ++i)
      out[i] = detail::decode_float<T>(dtype_, data_ + static_cast<std::size_t>(i) * size);
  }

  DType dtype_ = DType::f32;
  std::vector<Index> shape_;
  const unsigned char* data_ = nullptr;
  std::size_t nbytes_ = 0;
  Index numel_ = 0;
  std::string name_;
  std::string origin_;
};

class PrefixedSource;

/// A set of named tensors that layers load from: a SafetensorsReader (io/safetensors.hpp), a
/// TensorMap, or a prefixed view of either. Views it returns stay valid while the source lives.
class TensorSource {
 public:
  virtual ~TensorSource() = default;

  /// True when a tensor called `name` exists.
  virtual bool has(const std::string& name) const = 0;
  /// The tensor called `name`; file_error naming the source and the tensor when it is missing.
  virtual TensorView get(const std::string& name) const = 0;
  /// All tensor names, sorted.
  virtual std::vector<std::string> names() const = 0;
  /// What the source is, for messages (a file path, "<memory>").
  virtual std::string description() const = 0;

  /// A view whose names are this source's names with `prefix` in front:
  /// with_prefix("layers.3.retention.").get("q_proj.weight"). It refers to *this (keep it alive).
  virtual PrefixedSource with_prefix(const std::string& prefix) const;

  /// get(name).as_matrix<T>(): zero-copy [rows, cols] map of an exactly-typed, aligned tensor.
  template <class T>
  Eigen::Map<const Matrix<T>> as_matrix(const std::string& name) const {
    return get(name).template as_matrix<T>();
  }
  /// get(name).to_matrix<T>(): converted copy [rows, cols].
  template <class T>
  Matrix<T> to_matrix(const std::string& name) const {
    return get(name).template to_matrix<T>();
  }
  /// get(name) converted to T after checking its shape is exactly `shape` (e.g. {out, in}).
  template <class T>
  Matrix<T> to_matrix(const std::string& name, const std::vector<Index>& shape) const {
    const TensorView v = get(name);
    v.expect_shape(shape);
    return v.template to_matrix<T>();
  }

 protected:
  TensorSource() = default;
  TensorSource(const TensorSource&) = default;
  TensorSource(TensorSource&&) = default;
  TensorSource& operator=(const TensorSource&) = default;
  TensorSource& operator=(TensorSource&&) = default;
};

namespace detail {

/// file_error for a missing tensor, with up to three names that end like the requested one (a
/// wrong prefix is the usual mistake).
[[noreturn]] inline void missing_tensor(const std::string& origin, const std::string& name,
                                        const std::vector<std::string>& available) {
  const std::size_t dot = name.rfind('.');
  const std::string tail = dot == std::string::npos ? name : name.substr(dot);
  std::string hint;
  int shown = 0;
  for (const std::string& n : available) {
    if (shown == 3) break;
    if (n.size() >= tail.size() && n.compare(n.size() - tail.size(), tail.size(), tail) == 0) {
      hint += (shown ? ", '" : "; similar: '") + n + "'";
      ++shown;
    }
  }
  io_fail(origin, name,
          "not found (" + std::to_string(available.size()) + " tensors available" + hint + ")");
}

}  // namespace detail

/// The tensors of `parent` whose names start with `prefix`, seen without it.
class PrefixedSource final : public TensorSource {
 public:
  PrefixedSource(const TensorSource& parent, std::string prefix)
      : parent_(&parent), prefix_(std::move(prefix)) {}

  bool has(const std::string& name) const override { return parent_->has(prefix_ + name); }
  TensorView get(const std::string& name) const override { return parent_->get(prefix_ + name); }
  std::vector<std::string> names() const override {
    std::vector<std::string> out;
    for (const std::string& n : parent_->names())
      if (n.compare(0, prefix_.size(), prefix_) == 0) out.push_back(n.substr(prefix_.size()));
    return out;
  }
  std::string description() const override {
    return parent_->description() + " (prefix '" + prefix_ + "')";
  }
  /// Prefixes compose against the original parent, so chained temporaries do not dangle.
  PrefixedSource with_prefix(const std::string& prefix) const override {
    return PrefixedSource(*parent_, prefix_ + prefix);
  }
  const std::string& prefix() const { return prefix_; }

 private:
  const TensorSource* parent_;
  std::string prefix_;
};

inline PrefixedSource TensorSource::with_prefix(const std::string& prefix) const {
  return PrefixedSource(*this, prefix);
}

/// In-memory name -> tensor map: owns copies of what add() receives, refers to what add_view()
/// receives. Copies of a TensorMap share the owned bytes (they are never modified).
class TensorMap final : public TensorSource {
 public:
  explicit TensorMap(std::string origin = "<memory>") : origin_(std::move(origin)) {}

  /// Copies a dense Eigen matrix or vector of float, double, Eigen::half or Eigen::bfloat16.
  /// Compile-time vectors are stored 1-D [n]; everything else 2-D [rows, cols], row-major.
  template <class Derived>
  TensorMap& add(const std::string& name, const Eigen::MatrixBase<Derived>& m) {
    using T = typename Derived::Scalar;
    const Matrix<T> rm(m.derived());  // row-major copy: safetensors data is row-major
    std::vector<Index> shape;
    if (Derived::IsVectorAtCompileTime)
      shape = {rm.size()};
    else
      shape = {rm.rows(), rm.cols()};
    return add<T>(name, std::move(shape), rm.data());
  }

  /// Copies numel(shape) elements of T from `data` (row-major) as a tensor of dtype_of<T>.
  template <class T>
  TensorMap& add(const std::string& name, std::vector<Index> shape, const T* data) {
    Index numel = 0;
    if (!detail::shape_numel(shape, numel))
      detail::io_fail(origin_, name,
                      "shape " + detail::shape_to_string(shape) + " is negative or too large");
    const std::size_t n = static_cast<std::size_t>(numel);
    auto bytes = std::make_shared<std::vector<unsigned char>>(n * sizeof(T));
    for (std::size_t i = 0; i < n; ++i) detail::store_le(data[i], bytes->data() + i * sizeof(T));
    return insert(name, dtype_of<T>::value, std::move(shape), std::move(bytes));
  }

  /// Copies raw little-endian bytes of any dtype (nbytes must equal numel * dtype_size).
  TensorMap& add_bytes(const std::string& name, DType dtype, std::vector<Index> shape,
                       const void* bytes, std::size_t nbytes) {
    auto owned = std::make_shared<std::vector<unsigned char>>(nbytes);
    if (nbytes) std::memcpy(owned->data(), bytes, nbytes);
    return insert(name, dtype, std::move(shape), std::move(owned));
  }

  /// Refers to `view`'s bytes without copying; they must outlive this map.
  TensorMap& add_view(const std::string& name, const TensorView& view) {
    check_new_name(name);
    entries_[name] = Entry{
        TensorView(view.dtype(), view.shape(), view.data(), view.nbytes(), name, origin_), nullptr};
    return *this;
  }

  /// Removes `name` if present.
  void erase(const std::string& name) { entries_.erase(name); }
  /// Number of tensors.
  std::size_t size() const { return entries_.size(); }

  bool has(const std::string& name) const override { return entries_.count(name) != 0; }
  TensorView get(const std::string& name) const override {
    const auto it = entries_.find(name);
    if (it == entries_.end()) detail::missing_tensor(origin_, name, names());
    return it->second.view;
  }
  std::vector<std::string> names() const override {
    std::vector<std::string> out;
    out.reserve(entries_.size());
    for (const auto& e : entries_) out.push_back(e.first);
    return out;
  }
  std::string description() const override { return origin_; }

 private:
  struct Entry {
    TensorView view;
    std::shared_ptr<const std::vector<unsigned char>> owned;
  };

  void check_new_name(const std::string& name) const {
    // The reserved key would be read back as metadata, not as a tensor.
    if (name == "__metadata__") detail::io_fail(origin_, name, "name is reserved for metadata");
    if (entries_.count(name)) detail::io_fail(origin_, name, "added twice");
  }

  TensorMap& insert(const std::string& name, DType dtype, std::vector<Index> shape,
                    std::shared_ptr<std::vector<unsigned char>> bytes) {
    check_new_name(name);
    TensorView view(dtype, std::move(shape), bytes->data(), bytes->size(), name, origin_);
    entries_[name] = Entry{std::move(view), std::move(bytes)};
    return *this;
  }

  std::string origin_;
  std::map<std::string, Entry> entries_;
};

}  // namespace io
}  // namespace retention
