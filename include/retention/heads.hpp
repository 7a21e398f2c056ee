// retention: HeadsView, a strided view of many heads in one buffer, and for_each_head, the one
// loop over (batch, head) pairs with the one thread rule (docs/math.md, "Layouts").
#pragma once

#include <retention/core.hpp>
#include <retention/detail/threading.hpp>

#include <string>
#include <type_traits>
#include <utility>

namespace retention {

/// A view of `heads` heads of `dim` columns over `time` rows for each of `batch` sequences, in one
/// buffer: element (b, t, h, j) is data[b * batch_stride + t * time_stride + h * head_stride + j].
/// The usual [B, T, H, D] layout (what a Linear produces) is `heads_view(p, B, T, H, D)`; a fused
/// [rows, q|k|v] projection buffer gives three views of the same buffer with a wider time stride.
/// T may be const (inputs) or not (outputs). The view owns nothing.
template <class T>
struct HeadsView {
  using Scalar = std::remove_const_t<T>;
  using HeadMap =
      Eigen::Map<std::conditional_t<std::is_const<T>::value, const Matrix<Scalar>, Matrix<Scalar>>,
                 0, Eigen::OuterStride<>>;

  T* data = nullptr;
  Index batch = 0, time = 0, heads = 0, dim = 0;
  Index batch_stride = 0, time_stride = 0, head_stride = 0;

  /// Head h of sequence b as a [time, dim] matrix with outer stride time_stride (no copy).
  HeadMap head(Index b, Index h) const {
    return HeadMap(data + b * batch_stride + h * head_stride, time, dim,
                   Eigen::OuterStride<>(time_stride));
  }
  /// Rows [t0, t0 + rows) of head h of sequence b.
  HeadMap head(Index b, Index h, Index t0, Index rows) const {
    return HeadMap(data + b * batch_stride + t0 * time_stride + h * head_stride, rows, dim,
                   Eigen::OuterStride<>(time_stride));
  }
  /// The same buffer seen as const.
  HeadsView<const Scalar> as_const() const {
    return {data, batch, time, heads, dim, batch_stride, time_stride, head_stride};
  }
};

/// A dense row-major [batch, time, heads, dim] view.
template <class T>
HeadsView<T> heads_view(T* data, Index batch, Index time, Index heads, Index dim) {
  const char* fn = "heads_view";
  const Index row = detail::checked_product(fn, "heads * dim", heads, dim);
  const Index seq = detail::checked_product(fn, "time * heads * dim", time, row);
  detail::checked_product(fn, "batch * time * heads * dim", batch, seq);
  return {data, batch, time, heads, dim, seq, row, dim};
}

namespace detail {

/// Checks a view's sizes and that every element it names fits in Index arithmetic.
template <class T>
void check_view(const char* fn, const char* name, const HeadsView<T>& v) {
  // Messages are built only on failure: decoding checks its views on every token.
  if (!v.data) fail(fn, std::string(name) + ": null buffer pointer");
  const std::pair<const char*, Index> sizes[] = {
      {"batch", v.batch}, {"time", v.time}, {"heads", v.heads}, {"dim", v.dim}};
  for (const auto& s : sizes)
    if (s.second < 1)
      fail(fn,
           std::string(name) + "." + s.first + " must be >= 1, got " + std::to_string(s.second));
  if (v.batch_stride < 0 || v.time_stride < 0 || v.head_stride < 0)
    fail(fn, std::string(name) + ": negative stride");
  // The last element's offset must be representable.
  Index last = 0;
  const bool overflow = mul_overflows(v.batch - 1, v.batch_stride, last) ||
                        add_mul_overflows(last, v.time - 1, v.time_stride, last) ||
                        add_mul_overflows(last, v.heads - 1, v.head_stride, last) ||
                        add_overflows(last, v.dim, last);
  if (overflow)
    fail(fn, std::string(name) + ": sizes and strides overflow the index type (batch " +
                 std::to_string(v.batch) + ", time " + std::to_string(v.time) + ", heads " +
                 std::to_string(v.heads) + ", dim " + std::to_string(v.dim) + ")");
}

/// Throws unless `v` has the given batch, time and heads (negative = any) and dim.
template <class T>
void check_view_shape(const char* fn, const char* name, const HeadsView<T>& v, Index batch,
                      Index time, Index heads, Index dim) {
  check_view(fn, name, v);
  const bool ok = (batch < 0 || v.batch == batch) && (time < 0 || v.time == time) &&
                  (heads < 0 || v.heads == heads) && (dim < 0 || v.dim == dim);
  if (!ok) {
    auto s = [](Index x) { return x < 0 ? std::string("*") : std::to_string(x); };
    fail(fn, std::string(name) + " is [" + s(v.batch) + ", " + s(v.time) + ", " + s(v.heads) +
                 ", " + s(v.dim) + "], expected [" + s(batch) + ", " + s(time) + ", " + s(heads) +
                 ", " + s(dim) + "]");
  }
}

/// [first, last] byte range a view touches.
template <class T>
std::pair<const char*, const char*> view_range(const HeadsView<T>& v) {
  const Index last = (v.batch - 1) * v.batch_stride + (v.time - 1) * v.time_stride +
                     (v.heads - 1) * v.head_stride + v.dim - 1;
  const char* p = reinterpret_cast<const char*>(v.data);
  return {p, p + (last + 1) * static_cast<Index>(sizeof(T)) - 1};
}

/// Throws if the output view's memory range meets an input's (in-place calls are not supported).
template <class T, class U>
void check_no_overlap(const char* fn, const HeadsView<T>& out, const HeadsView<U>& in,
                      const char* in_name) {
  const auto a = view_range(out), b = view_range(in);
  if (a.first <= b.second && b.first <= a.second)
    fail(fn, std::string("out overlaps ") + in_name + "; in-place calls are not supported");
}

}  // namespace detail

/// Runs body(b, h) for every (batch, head) pair, spread over a team sized by
/// detail::team_size(threads, pairs, flops_per_pair) (the one thread rule, detail/threading.hpp).
/// An exception thrown by any body reaches the caller (the first one; the other pairs still run).
template <class Body>
void for_each_head(Index batch, Index heads, double flops_per_pair, int threads, Body&& body) {
  const Index pairs = batch * heads;
  detail::parallel_tasks(
      detail::plan_team(threads, pairs, flops_per_pair * static_cast<double>(pairs)), pairs,
      [&](Index pair) { body(pair / heads, pair % heads); });
}

}  // namespace retention
