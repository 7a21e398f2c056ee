// Compiled mode (RETENTION_COMPILED): the per-head forward kernels for CausalDecay with double
// inputs and a double state instantiated once, here (detail/retention/forward_instances.hpp lists
// them).
#define RETENTION_COMPILED_BUILDING_FORWARD 1
#include <retention/detail/retention/forward_instances.hpp>

namespace retention {
namespace detail {
RETENTION_DETAIL_FORWARD_KERNELS(template, double, double)
}  // namespace detail
}  // namespace retention
