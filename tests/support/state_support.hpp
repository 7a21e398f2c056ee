// Test support: the reference's double state (S, z, position) as a library RetentionState.
#pragma once

#include <retention/state.hpp>

#include "reference/retention_reference.hpp"

namespace retention_test {

/// ref::State -> RetentionState<S> (S and z cast to S, same position).
template <class S>
retention::RetentionState<S> to_state(const retention_reference::State& s) {
  retention::RetentionState<S> out(s.S.rows(), s.S.cols());
  out.S = s.S.cast<S>();
  out.z = s.z.cast<S>();
  out.position = s.position;
  return out;
}

}  // namespace retention_test
