// retention::detail: the per-head forward kernels that compiled mode (RETENTION_COMPILED) builds
// once, in src/forward_*.cpp: the three forms on row-major blocks (ConstRows / Rows, the one
// operand type every front hands them) with a CausalDecay, for float with a float or double state
// and for double. parallel.hpp, chunkwise.hpp and recurrent.hpp include this file at their end in
// compiled mode, where it declares them `extern template` (in the library's other sources too, so
// that the layers and the backward leave them to src/forward_*.cpp); those files include it with
// RETENTION_COMPILED_BUILDING_FORWARD defined and instantiate them with the macro below.
// The three form headers include none of each other, and each includes this file only after its
// own definitions, so all three are complete when the declarations below are read.
#pragma once

#include <retention/chunkwise.hpp>
#include <retention/decay.hpp>
#include <retention/parallel.hpp>
#include <retention/recurrent.hpp>

// clang-format off
#define RETENTION_DETAIL_FORWARD_KERNELS(PREFIX, T, S)                                             \
  PREFIX void parallel_retention_rows(                                                             \
      const Eigen::MatrixBase<ConstRows<T>>&, const Eigen::MatrixBase<ConstRows<T>>&,              \
      const Eigen::MatrixBase<ConstRows<T>>&, const CausalDecay&, Rows<T>&,                        \
      const RetentionOptions<S>&);                                                                 \
  PREFIX void chunkwise_retention_rows(                                                            \
      const Eigen::MatrixBase<ConstRows<T>>&, const Eigen::MatrixBase<ConstRows<T>>&,              \
      const Eigen::MatrixBase<ConstRows<T>>&, const CausalDecay&, Index, Rows<T>&,                 \
      const RetentionOptions<S>&);                                                                 \
  PREFIX void recurrent_retention_rows(                                                            \
      const Eigen::MatrixBase<ConstRows<T>>&, const Eigen::MatrixBase<ConstRows<T>>&,              \
      const Eigen::MatrixBase<ConstRows<T>>&, const CausalDecay&, Rows<T>&,                        \
      const RetentionOptions<S>&);
// clang-format on

#if !defined(RETENTION_COMPILED_BUILDING_FORWARD)
namespace retention {
namespace detail {
RETENTION_DETAIL_FORWARD_KERNELS(extern template, float, float)
RETENTION_DETAIL_FORWARD_KERNELS(extern template, float, double)
RETENTION_DETAIL_FORWARD_KERNELS(extern template, double, double)
}  // namespace detail
}  // namespace retention
#undef RETENTION_DETAIL_FORWARD_KERNELS
#endif
