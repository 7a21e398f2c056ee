// Compiled mode (RETENTION_COMPILED): the per-head backward kernels for CausalDecay with double
// inputs and a double state instantiated once, here (detail/retention/backward_instances.hpp lists
// them).
#define RETENTION_COMPILED_BUILDING 1
#include <retention/backward.hpp>
#include <retention/detail/retention/backward_instances.hpp>

namespace retention {
namespace detail {
RETENTION_DETAIL_BACKWARD_KERNELS(template, double, double)
}  // namespace detail
}  // namespace retention
