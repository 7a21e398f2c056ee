// retention::detail: the per-head backward kernels that compiled mode (RETENTION_COMPILED) builds
// once, in src/backward_*.cpp: the three forms on row-major blocks (ConstRows / Rows) with a
// CausalDecay, for float with a float or double state and for double. backward.hpp includes this
// file in compiled mode, where it declares them `extern template`; the library's sources include it
// with RETENTION_COMPILED_BUILDING defined and instantiate them with the macro below.
#pragma once

#include <retention/decay.hpp>
#include <retention/detail/retention/backward_chunkwise.hpp>
#include <retention/detail/retention/backward_kernels.hpp>
#include <retention/detail/retention/backward_parallel.hpp>
#include <retention/detail/retention/backward_recurrent.hpp>

// clang-format off
#define RETENTION_DETAIL_BACKWARD_KERNELS(PREFIX, T, S)                                            \
  PREFIX void parallel_backward(                                                                   \
      const Eigen::MatrixBase<ConstRows<T>>&, const Eigen::MatrixBase<ConstRows<T>>&,              \
      const Eigen::MatrixBase<ConstRows<T>>&, const CausalDecay&, Index,                           \
      const Eigen::MatrixBase<ConstRows<T>>&, Rows<T>&, Rows<T>&, Rows<T>&,                        \
      const BackwardArgs<S>&);                                                                     \
  PREFIX void chunkwise_backward(                                                                  \
      const Eigen::MatrixBase<ConstRows<T>>&, const Eigen::MatrixBase<ConstRows<T>>&,              \
      const Eigen::MatrixBase<ConstRows<T>>&, const CausalDecay&, Index,                           \
      const Eigen::MatrixBase<ConstRows<T>>&, Rows<T>&, Rows<T>&, Rows<T>&,                        \
      const BackwardArgs<S>&);                                                                     \
  PREFIX void recurrent_backward(                                                                  \
      const Eigen::MatrixBase<ConstRows<T>>&, const Eigen::MatrixBase<ConstRows<T>>&,              \
      const Eigen::MatrixBase<ConstRows<T>>&, const CausalDecay&,                                  \
      const Eigen::MatrixBase<ConstRows<T>>&, Rows<T>&, Rows<T>&, Rows<T>&,                        \
      const BackwardArgs<S>&);
// clang-format on

#if !defined(RETENTION_COMPILED_BUILDING)
namespace retention {
namespace detail {
RETENTION_DETAIL_BACKWARD_KERNELS(extern template, float, float)
RETENTION_DETAIL_BACKWARD_KERNELS(extern template, float, double)
RETENTION_DETAIL_BACKWARD_KERNELS(extern template, double, double)
}  // namespace detail
}  // namespace retention
#undef RETENTION_DETAIL_BACKWARD_KERNELS
#endif
