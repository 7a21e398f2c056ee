// Compiled mode (RETENTION_COMPILED): ManhattanAttention<double> instantiated once, here;
// translation units built with RETENTION_COMPILED link against this instead of instantiating it.
#define RETENTION_COMPILED_BUILDING 1
#include <retention/layers/rmt.hpp>

template class retention::ManhattanAttention<double>;
