// Compiled mode (RETENTION_COMPILED): the per-head MaSA / MaSAD training kernels (forward with
// saved state, backward) for ManhattanDecay and QuadrantCausalDecay in double, instantiated once,
// here (detail/manhattan/backward_instances.hpp lists them).
#define RETENTION_COMPILED_BUILDING 1
#include <retention/detail/manhattan/backward_instances.hpp>
#include <retention/masa_backward.hpp>

namespace retention {
namespace detail {
RETENTION_DETAIL_MASA_TRAIN_KERNELS(template, double, ManhattanDecay)
RETENTION_DETAIL_MASA_TRAIN_KERNELS(template, double, QuadrantCausalDecay)
}  // namespace detail
}  // namespace retention
