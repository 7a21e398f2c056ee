// retention: LayerNorm with affine parameters (torch nn.LayerNorm), owning its weight and bias and
// loadable by name ("<prefix>weight", "<prefix>bias"); the arithmetic is nn/norms.hpp's layer_norm.
#pragma once

#include <retention/core.hpp>
#include <retention/nn/norms.hpp>
#include <retention/nn/parameters.hpp>

#include <cmath>
#include <sstream>
#include <string>

namespace retention {

template <class T>
class LayerNorm {
 public:
  LayerNorm() = default;
  /// Weight 1 and bias 0 over `dim` channels; eps >= 0 and finite.
  LayerNorm(Index dim, double eps) : eps_(eps) {
    detail::assert_scalar<T>();
    const char* fn = "LayerNorm";
    detail::check_positive(fn, "dim", dim);
    if (!(eps >= 0.0) || !std::isfinite(eps)) {
      std::ostringstream s;
      s << "eps must be >= 0 and finite, got " << eps;
      detail::fail(fn, s.str());
    }
    weight_ = RowVector<T>::Ones(dim);
    bias_ = RowVector<T>::Zero(dim);
  }

  Index dim() const { return weight_.size(); }
  double eps() const { return eps_; }
  /// Weight [dim].
  const RowVector<T>& weight() const { return weight_; }
  /// Bias [dim].
  const RowVector<T>& bias() const { return bias_; }

  /// Sets weight and bias from vectors of dim entries (row or column), converted to T.
  template <class DW, class DB>
  void set(const Eigen::MatrixBase<DW>& weight, const Eigen::MatrixBase<DB>& bias) {
    const char* fn = "LayerNorm::set";
    check_vector(fn, "weight", weight);
    check_vector(fn, "bias", bias);
    RowVector<T> w(dim()), b(dim());
    for (Index i = 0; i < dim(); ++i) {
      w(i) = static_cast<T>(weight.rows() == 1 ? weight(0, i) : weight(i, 0));
      b(i) = static_cast<T>(bias.rows() == 1 ? bias(0, i) : bias(i, 0));
    }
    weight_.swap(w);
    bias_.swap(b);
  }

  /// Reads "<prefix>weight" [dim] and "<prefix>bias" [dim] from a source with
  /// find(name) -> const TensorRef* (ParameterMap, a safetensors file). `fn` names the public call
  /// in errors. Nothing changes unless both are read successfully.
  template <class Source>
  void load(const Source& source, const std::string& prefix, const char* fn = "LayerNorm::load") {
    RowVector<T> w(dim()), b(dim());
    read_tensor(fn, prefix + "weight", detail::require(fn, source, prefix + "weight"), {dim()},
                w.data());
    read_tensor(fn, prefix + "bias", detail::require(fn, source, prefix + "bias"), {dim()},
                b.data());
    weight_.swap(w);
    bias_.swap(b);
  }

  /// Row-wise (x - mean) / sqrt(var + eps) * weight + bias; x [rows, dim] -> [rows, dim].
  template <class Derived>
  Matrix<T> forward(const Eigen::MatrixBase<Derived>& x) const {
    detail::assert_same_scalar<T, typename Derived::Scalar>();
    detail::check_shape("LayerNorm::forward", "x", x, -1, dim());
    return layer_norm(x, weight_, bias_, eps_);
  }

 private:
  template <class D>
  void check_vector(const char* fn, const char* name, const Eigen::MatrixBase<D>& v) const {
    if ((v.rows() != 1 && v.cols() != 1) || v.size() != dim())
      detail::fail(fn, std::string(name) + " is " + detail::shape_string(v.rows(), v.cols()) +
                           ", expected [1 x " + std::to_string(dim()) + "]");
  }

  RowVector<T> weight_, bias_;
  double eps_ = 1e-5;
};

}  // namespace retention
