// retention: Linear, the one affine map every layer uses: y = x W^T + b with W in torch's [out, in]
// layout, loadable by name ("<prefix>weight", "<prefix>bias") from any parameter source.
#pragma once

#include <retention/core.hpp>
#include <retention/detail/gemm.hpp>
#include <retention/detail/linear_kernel.hpp>
#include <retention/detail/threading.hpp>
#include <retention/nn/parameters.hpp>

#include <numeric>
#include <string>
#include <utility>
#include <vector>

namespace retention {

template <class T>
class Linear {
 public:
  Linear() = default;
  /// Zero weight [out, in] (and zero bias [out] when `bias`).
  Linear(Index in_features, Index out_features, bool bias)
      : weight_(zero_weight(in_features, out_features)), has_bias_(bias) {
    detail::assert_scalar<T>();
    if (bias) bias_ = RowVector<T>::Zero(out_features);
  }

  Index in_features() const { return weight_.cols(); }
  Index out_features() const { return weight_.rows(); }
  bool has_bias() const { return has_bias_; }
  /// W [out, in] (torch layout).
  const Matrix<T>& weight() const { return weight_; }
  /// b [out]; empty without bias.
  const RowVector<T>& bias() const { return bias_; }

  /// Sets W from any [out, in] matrix expression (converted to T).
  template <class D>
  void set_weight(const Eigen::MatrixBase<D>& w) {
    detail::check_shape("Linear::set_weight", "weight", w, out_features(), in_features());
    weight_ = w.template cast<T>();
    if (packed_on_) pack();
  }

  /// Whether this Linear keeps a packed copy of W (README, Performance): W laid out the way the
  /// products read it, made once, so that products of two or more rows skip that step. It takes
  /// as much memory again as W. Off by default; set_weight and load pack again while it is on.
  /// On processors with AVX2 or AVX-512 (the library's own products, detail/linear_kernel.hpp)
  /// the packed and the unpacked products give the same bits for one row and for four or more,
  /// and agree to rounding for two or three. Elsewhere the copy is in the layout of Eigen's GEMM,
  /// and the products agree to rounding; with a BLAS there is none. The packing is for the
  /// instruction set active when it is made (set_active_isa): under another, products do not use
  /// it.
  void set_packed(bool on) {
    if (on)
      pack();  // may throw std::bad_alloc: then nothing is packed and it stays off
    else
      clear_packed();
    packed_on_ = on;
  }
  bool packed() const { return packed_on_; }
  /// Column splits of the outputs (forward_columns_into) at multiples of this read the packed
  /// copy whole; other splits compute their ragged edges without it.
  Index column_align() const {
    const Index a = detail::column_block_align;
    if (!packed_on_) return a;
    if (!panels_.empty()) return std::lcm(a, detail::linear_panel_width<T>(panels_isa_));
    return std::lcm(a, detail::PackedWeight<T>::granule());
  }
  /// Sets b from any vector expression of out entries (row or column).
  template <class D>
  void set_bias(const Eigen::MatrixBase<D>& b) {
    const char* fn = "Linear::set_bias";
    if (!has_bias_) detail::fail(fn, "this Linear has no bias");
    if (!(b.rows() == 1 || b.cols() == 1) || b.size() != out_features())
      detail::fail(fn, "bias is " + detail::shape_string(b.rows(), b.cols()) + ", expected [1 x " +
                           std::to_string(out_features()) + "]");
    for (Index i = 0; i < b.size(); ++i)
      bias_(i) = static_cast<T>(b.rows() == 1 ? b(0, i) : b(i, 0));
  }

  /// Reads "<prefix>weight" [out, in] and, when the layer has a bias, "<prefix>bias" [out] from a
  /// source with find(name) -> const TensorRef* (ParameterMap, a safetensors file). `fn` names the
  /// public call in errors. Nothing changes unless both are read successfully.
  template <class Source>
  void load(const Source& source, const std::string& prefix, const char* fn = "Linear::load") {
    Matrix<T> w(out_features(), in_features());
    read_tensor(fn, prefix + "weight", detail::require(fn, source, prefix + "weight"),
                {out_features(), in_features()}, w.data());
    RowVector<T> b;
    if (has_bias_) {
      b.resize(out_features());
      read_tensor(fn, prefix + "bias", detail::require(fn, source, prefix + "bias"),
                  {out_features()}, b.data());
    }
    weight_.swap(w);
    if (has_bias_) bias_.swap(b);
    if (packed_on_) pack();
  }

  /// y = x W^T + b into y [rows, out] (y must not overlap x).
  template <class DX, class DY>
  void forward_into(const Eigen::MatrixBase<DX>& x, DY&& y) const {
    if (kernel_product(x.derived(), y, 0, out_features())) return;
    if (!(packed_on_ && product_columns(x.derived(), y, 0, out_features())))
      plain_product(x, y, 0, out_features());
    if (has_bias_) y.rowwise() += bias_;
  }
  /// Outputs [c0, c0 + n) only: y.middleCols(c0, n) = x W[c0 : c0 + n]^T + b[c0 : c0 + n].
  template <class DX, class DY>
  void forward_columns_into(const Eigen::MatrixBase<DX>& x, DY&& y, Index c0, Index n) const {
    if (kernel_product(x.derived(), y, c0, n)) return;
    auto block = y.middleCols(c0, n);
    if (!(packed_on_ && product_columns(x.derived(), y, c0, n))) plain_product(x, block, c0, n);
    if (has_bias_) block.rowwise() += bias_.segment(c0, n);
  }
  /// forward_into on a team of at most `threads` threads (0 = default), sized by the thread rule
  /// from the product's flops; every block's product is single-threaded. Many rows are split
  /// into row blocks (at least min_rows each); few rows (detail::split_columns) into blocks of
  /// outputs instead, so that no thread packs the whole weight.
  template <class DX, class DY>
  void forward_into(const Eigen::MatrixBase<DX>& x, DY&& y, int threads,
                    Index min_rows = 32) const {
    const Index rows = x.rows(), out = out_features();
    const double flops_per_row =
        2.0 * static_cast<double>(in_features()) * static_cast<double>(out);
    const detail::Team by_columns = detail::plan_column_split(threads, rows, out, flops_per_row);
    if (by_columns.size > 1) {
      detail::for_column_blocks(
          by_columns, out, [&](Index c0, Index n) { forward_columns_into(x, y, c0, n); },
          column_align());
      return;
    }
    detail::for_row_blocks(
        threads, rows, flops_per_row,
        [&](Index r0, Index n) { forward_into(x.middleRows(r0, n), y.middleRows(r0, n)); },
        min_rows);
  }
  /// y = x W^T + b; x [rows, in] -> [rows, out].
  template <class DX>
  Matrix<T> forward(const Eigen::MatrixBase<DX>& x) const {
    detail::check_shape("Linear::forward", "x", x, -1, in_features());
    Matrix<T> y(x.rows(), out_features());
    forward_into(x, y);
    return y;
  }

  /// One Linear whose outputs are the given Linears' outputs side by side, each scaled by its
  /// factor (e.g. [q | k dk^-1/2 | v]); all must share in_features and have a bias or not alike.
  static Linear concat(const std::vector<std::pair<const Linear*, double>>& parts) {
    const char* fn = "Linear::concat";
    if (parts.empty()) detail::fail(fn, "no parts");
    Index out = 0;
    const Index in = parts.front().first->in_features();
    const bool bias = parts.front().first->has_bias();
    for (const auto& p : parts) {
      if (p.first->in_features() != in || p.first->has_bias() != bias)
        detail::fail(fn, "parts differ in in_features or bias");
      out += p.first->out_features();
    }
    Linear r(in, out, bias);  // not packed: the caller decides (set_packed)
    Index row = 0;
    for (const auto& p : parts) {
      const Index n = p.first->out_features();
      r.weight_.middleRows(row, n) = p.first->weight_ * static_cast<T>(p.second);
      if (bias) r.bias_.segment(row, n) = p.first->bias_ * static_cast<T>(p.second);
      row += n;
    }
    return r;
  }

 private:
  // Sizes are checked before anything is allocated.
  static Matrix<T> zero_weight(Index in, Index out) {
    detail::check_positive("Linear", "in_features", in);
    detail::check_positive("Linear", "out_features", out);
    detail::checked_product("Linear", "out_features * in_features", out, in);
    return Matrix<T>::Zero(out, in);
  }

  /// Packs W for the products of the active instruction set: panels for LinearProductKernel, or
  /// Eigen's layout (PackedWeight) where Eigen's products run. Nothing changes if it throws.
  void pack() {
    if (detail::linear_kernel_active<T>() && !detail::blas_products<T>) {
      const Isa isa = active_isa();
      Panels p(static_cast<std::size_t>(detail::linear_packed_size(
          out_features(), in_features(), detail::linear_panel_width<T>(isa))));
      detail::linear_pack(weight_.data(), in_features(), out_features(), in_features(), p.data());
      packed_.clear();
      panels_.swap(p);
      panels_isa_ = isa;
    } else {
      packed_.pack(weight_);
      Panels().swap(panels_);
    }
  }
  void clear_packed() {
    packed_.clear();
    Panels().swap(panels_);
  }

  /// y[:, c0 : c0 + n) = x W[c0 : c0 + n)^T + b[c0 : c0 + n) through LinearProductKernel, from the
  /// packed panels when they are for the active instruction set and c0 starts a panel; false
  /// (nothing written) where Eigen's products run instead (detail::linear_kernel_active; a BLAS;
  /// operands that are not row-major with contiguous rows; fewer rows than linear_kernel_min_rows,
  /// or linear_kernel_min_rows_packed from the panels).
  template <class X, class Y>
  bool kernel_product(const X& x, Y& y, Index c0, Index n) const {
    using Out = std::decay_t<Y>;
    if constexpr (detail::PackedWeight<T>::template accepts<X, Out>() &&
                  !detail::blas_products<T>) {
      if (!detail::linear_kernel_active<T>() || n == 0 || in_features() == 0) return false;
      const Isa isa = active_isa();
      const Index pw = detail::linear_panel_width<T>(isa), in = in_features();
      const bool from_panels = !panels_.empty() && panels_isa_ == isa && c0 % pw == 0;
      if (x.rows() <
          (from_panels ? detail::linear_kernel_min_rows_packed : detail::linear_kernel_min_rows))
        return false;
      detail::LinearOperands<T> o{x.data(),
                                  Index(x.outerStride()),
                                  weight_.data() + c0 * in,
                                  in,
                                  from_panels ? panels_.data() : nullptr,
                                  detail::linear_packed_size(out_features(), 1, pw),
                                  c0,
                                  has_bias_ ? bias_.data() + c0 : nullptr,
                                  y.data() + c0,
                                  Index(y.outerStride()),
                                  x.rows(),
                                  in,
                                  n,
                                  nullptr};
      detail::linear_product(o);
      return true;
    } else {
      (void)x, (void)y, (void)c0, (void)n;
      return false;
    }
  }

  /// out = x W[c0 : c0 + n)^T (out has n columns) with Eigen's products. Two or three rows run one
  /// matrix-vector product each, as a single row does: Eigen's GEMM would pack the whole weight
  /// slice for them, which takes several times as long for a large weight (README, Performance).
  template <class DX, class Out>
  void plain_product(const Eigen::MatrixBase<DX>& x, Out&& out, Index c0, Index n) const {
    const auto w = weight_.middleRows(c0, n);
    if (x.rows() >= 2 && x.rows() <= max_rows_per_vector_product) {
      for (Index r = 0; r < x.rows(); ++r) out.row(r).noalias() = x.row(r) * w.transpose();
    } else {
      out.noalias() = x * w.transpose();
    }
  }
  static constexpr Index max_rows_per_vector_product = 3;

  /// y[:, c0 : c0 + n) = x W[c0 : c0 + n)^T without the bias from the packed panels, the ragged
  /// edges of a split that does not fall on packed panels with Eigen's product; false (nothing
  /// written) where the packed product does not apply (see PackedWeight::product).
  template <class X, class Y>
  bool product_columns(const X& x, Y& y, Index c0, Index n) const {
    using Out = std::decay_t<Y>;
    if constexpr (detail::PackedWeight<T>::template accepts<X, Out>()) {
      if (packed_.empty()) return false;
      const Index g = detail::PackedWeight<T>::granule(), c1 = c0 + n, out = out_features();
      const Index a0 = (c0 + g - 1) / g * g, a1 = c1 == out ? out : c1 / g * g;
      if (a1 <= a0) return false;
      if (!packed_.product(x, y, a0, a1 - a0)) return false;
      if (a0 > c0) plain_product(x, y.middleCols(c0, a0 - c0), c0, a0 - c0);
      if (c1 > a1) plain_product(x, y.middleCols(a1, c1 - a1), a1, c1 - a1);
      return true;
    } else {
      (void)x, (void)y, (void)c0, (void)n;
      return false;
    }
  }

  Matrix<T> weight_;
  RowVector<T> bias_;
  bool has_bias_ = false;
  bool packed_on_ = false;
  detail::PackedWeight<T> packed_;
  using Panels = std::vector<T, Eigen::aligned_allocator<T>>;
  Panels panels_;  // for LinearProductKernel on panels_isa_
  Isa panels_isa_ = Isa::baseline;
};

}  // namespace retention
