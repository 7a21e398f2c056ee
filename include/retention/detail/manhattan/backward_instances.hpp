// retention::detail: the per-head MaSA / MaSAD training kernels that compiled mode
// (RETENTION_COMPILED) builds once, in src/masa_backward_*.cpp: the forward that saves what the
// backward needs and the backward, for ManhattanDecay and QuadrantCausalDecay, in float and double.
// masa_backward.hpp includes this file in compiled mode, where it declares them `extern template`;
// the library's sources include it with RETENTION_COMPILED_BUILDING defined and instantiate them
// with the macro below.
#pragma once

#include <retention/decay.hpp>
#include <retention/masa_backward.hpp>

// clang-format off
#define RETENTION_DETAIL_MASA_TRAIN_KERNELS(PREFIX, T, Mask)                                       \
  PREFIX void masa_forward_head_checked<T, Mask>(                                                  \
      const GradConstMap<T>&, const GradConstMap<T>&, const GradConstMap<T>&, const Mask&, Index,  \
      Index, GradMap<T>, GradVec<T>);                                                              \
  PREFIX void masa_backward_head<T, Mask>(                                                         \
      const GradConstMap<T>&, const GradConstMap<T>&, const GradConstMap<T>&, const Mask&,         \
      const GradConstMap<T>&, const GradConstVec<T>&, const GradConstMap<T>&, Index, Index,        \
      GradMap<T>, GradMap<T>, GradMap<T>);                                                         \
  PREFIX void masad_forward_head_checked<T, Mask>(                                                 \
      const GradConstMap<T>&, const GradConstMap<T>&, const GradConstMap<T>&, const Mask&, Index,  \
      Index, GradMap<T>, GradMap<T>, GradVec<T>, GradVec<T>);                                      \
  PREFIX void masad_backward_head<T, Mask>(                                                        \
      const GradConstMap<T>&, const GradConstMap<T>&, const GradConstMap<T>&, const Mask&,         \
      const GradConstMap<T>&, const GradConstMap<T>&, const GradConstVec<T>&,                      \
      const GradConstVec<T>&, const GradConstMap<T>&, Index, Index, GradMap<T>, GradMap<T>,        \
      GradMap<T>);
// clang-format on

#if !defined(RETENTION_COMPILED_BUILDING)
namespace retention {
namespace detail {
RETENTION_DETAIL_MASA_TRAIN_KERNELS(extern template, float, ManhattanDecay)
RETENTION_DETAIL_MASA_TRAIN_KERNELS(extern template, float, QuadrantCausalDecay)
RETENTION_DETAIL_MASA_TRAIN_KERNELS(extern template, double, ManhattanDecay)
RETENTION_DETAIL_MASA_TRAIN_KERNELS(extern template, double, QuadrantCausalDecay)
}  // namespace detail
}  // namespace retention
#undef RETENTION_DETAIL_MASA_TRAIN_KERNELS
#endif
