// retention::detail: do two Eigen operands share memory? Used to reject in-place calls (an output
// that aliases an input) before anything is written.
#pragma once

#include <retention/core.hpp>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

namespace retention {
namespace detail {

/// A strided 2-D region of memory: element (i, j) lies at base + i row_stride + j col_stride
/// (bytes), each `elem` bytes wide. known = false for expressions without direct access (they own
/// no memory we can see) and for empty operands: such a region overlaps nothing.
struct MemoryRegion {
  std::intptr_t base = 0;
  Index rows = 0, cols = 0;
  Index row_stride = 0, col_stride = 0, elem = 0;
  bool known = false;
};

template <class Derived>
MemoryRegion memory_region(const Eigen::DenseBase<Derived>& x) {
  MemoryRegion r;
  if constexpr (bool(int(Derived::Flags) & Eigen::DirectAccessBit)) {
    const Derived& d = x.derived();
    if (d.rows() == 0 || d.cols() == 0) return r;
    using Scalar = typename Derived::Scalar;
    const Index elem = static_cast<Index>(sizeof(Scalar));
    r.base = reinterpret_cast<std::intptr_t>(d.data());
    r.rows = d.rows();
    r.cols = d.cols();
    r.row_stride = d.rowStride() * elem;
    r.col_stride = d.colStride() * elem;
    r.elem = elem;
    r.known = true;
  }
  return r;
}

/// The region as `count` runs of `run` contiguous bytes, `stride` bytes apart; false when neither
/// dimension is contiguous (a non-unit inner stride).
struct MemoryRuns {
  Index count = 0, stride = 0, run = 0;
};

inline bool as_runs(const MemoryRegion& r, MemoryRuns& out) {
  if (r.cols == 1 || r.col_stride == r.elem) {
    out = MemoryRuns{r.rows, r.row_stride, r.cols == 1 ? r.elem : r.cols * r.elem};
    return true;
  }
  if (r.rows == 1 || r.row_stride == r.elem) {
    out = MemoryRuns{r.cols, r.col_stride, r.rows == 1 ? r.elem : r.rows * r.elem};
    return true;
  }
  return false;
}

/// [lo, hi] byte range touched by a region.
inline void byte_range(const MemoryRegion& r, std::intptr_t& lo, std::intptr_t& hi) {
  const Index a = (r.rows - 1) * r.row_stride, b = (r.cols - 1) * r.col_stride;
  lo = r.base + std::min<Index>(a, 0) + std::min<Index>(b, 0);
  hi = r.base + std::max<Index>(a, 0) + std::max<Index>(b, 0) + r.elem - 1;
}

/// True when some byte belongs to both regions. Views of one matrix with the same strides
/// (column or row blocks side by side, heads of a [T, H * d] buffer) are compared exactly;
/// regions with different strides whose byte ranges interleave count as overlapping (a
/// conservative answer for layouts no caller of this library produces).
inline bool regions_overlap(const MemoryRegion& a, const MemoryRegion& b) {
  if (!a.known || !b.known) return false;
  std::intptr_t alo = 0, ahi = 0, blo = 0, bhi = 0;
  byte_range(a, alo, ahi);
  byte_range(b, blo, bhi);
  if (ahi < blo || bhi < alo) return false;
  MemoryRuns ra, rb;
  if (!as_runs(a, ra) || !as_runs(b, rb)) return true;
  if (ra.count == 1) ra.stride = rb.stride;
  if (rb.count == 1) rb.stride = ra.stride;
  const Index s = ra.stride;
  if (ra.count == 1 && rb.count == 1) return true;  // two contiguous runs whose ranges meet
  if (s <= 0 || rb.stride != s || ra.run > s || rb.run > s) return true;
  // In a's frame b's run k starts at row q + k, byte r, and may spill into the next row.
  const std::intptr_t delta = b.base - a.base;
  std::intptr_t q = delta / s, r = delta % s;
  if (r < 0) {
    r += s;
    q -= 1;
  }
  auto rows_meet = [&](std::intptr_t first) { return first < ra.count && first + rb.count > 0; };
  if (r < ra.run && rows_meet(q)) return true;
  if (r + rb.run > s && rows_meet(q + 1)) return true;  // spill: bytes [0, r + run - s)
  return false;
}

template <class A, class B>
bool shares_memory(const Eigen::DenseBase<A>& a, const Eigen::DenseBase<B>& b) {
  return regions_overlap(memory_region(a), memory_region(b));
}

/// Throws "<function>: <out_name> overlaps <name>; in-place calls are not supported" when the two
/// operands share memory.
template <class A, class B>
void check_no_overlap(const char* function, const char* out_name, const Eigen::DenseBase<A>& out,
                      const char* name, const Eigen::DenseBase<B>& x) {
  if (shares_memory(out, x))
    fail(function,
         std::string(out_name) + " overlaps " + name + "; in-place calls are not supported");
}

/// Compile-time check that an output parameter taken by forwarding reference is a writable Eigen
/// dense object (a matrix, a Map, a Block or a Ref).
// True for any type derived from Eigen::DenseBase<X> for some X: a Matrix, Map, Block or Ref, and
// also a MatrixBase<X>& or ArrayBase<X>& that a user's own template forwards.
template <class X>
std::true_type derives_from_dense(const Eigen::DenseBase<X>*);
std::false_type derives_from_dense(...);

template <class Out>
constexpr void assert_dense_output() {
  using D = std::decay_t<Out>;
  static_assert(decltype(derives_from_dense(std::declval<const D*>()))::value,
                "retention: the output must be an Eigen dense matrix, Map, Block or Ref");
  static_assert(!std::is_const<std::remove_reference_t<Out>>::value,
                "retention: the output must not be const");
}

}  // namespace detail
}  // namespace retention
