// retention::detail: checks and the output-row normalisation shared by the three retention forms.
#pragma once

#include <retention/core.hpp>
#include <retention/detail/overlap.hpp>
#include <retention/state.hpp>

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>

namespace retention {
namespace detail {

/// Static checks of a retention call: floating scalars, one scalar type, a causal mask, and a
/// state scalar at least as wide as the inputs.
template <class DQ, class DK, class DV, class Mask, class StateScalar>
constexpr void assert_retention_types() {
  using T = typename DQ::Scalar;
  assert_scalar<T>();
  assert_same_scalar<T, typename DK::Scalar>();
  assert_same_scalar<T, typename DV::Scalar>();
  assert_scalar<StateScalar>();
  static_assert(sizeof(StateScalar) >= sizeof(T),
                "retention: the state scalar must be at least as wide as the inputs' scalar");
  static_assert(Mask::is_causal,
                "retention: retention kernels need a causal mask (CausalDecay), which supplies the "
                "step, chunk, query and key factors");
}

/// Calls kernel(Q, K, V, out) with the inputs as ConstRows and the output as Rows (core.hpp), so
/// that the form kernel behind it is compiled once per scalar, mask and state type.
template <class DQ, class DK, class DV, class DOut, class Kernel>
void forward_on_rows(const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                     const Eigen::MatrixBase<DV>& V, DOut& out, Kernel&& kernel) {
  using T = typename DQ::Scalar;
  RowsOutput<T, DOut> o(out);
  kernel(ConstRows<T>(Q.derived()), ConstRows<T>(K.derived()), ConstRows<T>(V.derived()), o.rows);
  o.commit();
}

/// Runtime shape checks common to the forms: Q [T, dk], K [T, dk], V [T, dv], dk, dv >= 1.
template <class DQ, class DK, class DV>
void check_qkv(const char* function, const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
               const Eigen::MatrixBase<DV>& V) {
  if (Q.cols() < 1)
    fail(function, "Q is " + shape_string(Q.rows(), Q.cols()) + ", expected dk >= 1 columns");
  check_shape(function, "K", K, Q.rows(), Q.cols());
  check_shape(function, "V", V, Q.rows(), -1);
  if (V.cols() < 1)
    fail(function, "V is " + shape_string(V.rows(), V.cols()) + ", expected dv >= 1 columns");
}

/// Rejects a Normalization value outside the enum (a cast integer), which would otherwise fall
/// through to one of the branches.
inline void check_normalization_value(const char* function, Normalization n) {
  if (n != Normalization::none && n != Normalization::decay && n != Normalization::decay_and_score)
    fail(function, "normalization is not one of none, decay, decay_and_score (value " +
                       std::to_string(static_cast<int>(n)) + ")");
}

/// Rescales output rows per docs/math.md §2: row j (absolute position p0 + j) is divided by
/// sqrt(sum_{i<=p} gamma^i) and, for decay_and_score, further by max(|r_j| / sqrt(...), 1),
/// where r_j is the raw (not yet decay-normalised) signed score row sum.
template <class Mask, class DOut, class DR>
void normalize_rows(const Mask& decay, Normalization normalization, Index p0, DOut&& out,
                    const Eigen::MatrixBase<DR>& r) {
  assert_dense_output<DOut>();
  if (normalization == Normalization::none) return;
  using T = typename std::decay_t<DOut>::Scalar;
  for (Index j = 0; j < out.rows(); ++j) {
    const double s = std::sqrt(decay.decay_sum(p0 + j));
    double scale = 1.0 / s;
    if (normalization == Normalization::decay_and_score) {
      const double score = std::abs(static_cast<double>(r(j))) / s;
      scale /= std::max(score, 1.0);
    }
    out.row(j) *= static_cast<T>(scale);
  }
}

/// While alive, denormal results and operands are flushed to zero on this thread (x86 MXCSR FTZ and
/// DAZ); the caller's FTZ and DAZ bits come back on exit, and nothing else of the MXCSR is touched:
/// exception flags raised meanwhile (FE_INVALID from a NaN input) stay raised for the caller. Decay
/// weights far from the diagonal pass through the denormal range (float: gamma^d below 1.2e-38) on
/// their way to exactly 0, and every arithmetic operation on a denormal costs a microcode assist
/// (bench/results/design-measurements.md). The flushed values are
/// below 1.2e-38 (float) / 2.2e-308 (double) in absolute value. No effect on other architectures.
class DenormalsFlushed {
 public:
  // The compiler's builtins rather than <xmmintrin.h>: no header and no macro of ours reaches the
  // user's translation unit.
  DenormalsFlushed() {
#if defined(__SSE__) && (defined(__GNUC__) || defined(__clang__))
    saved_ = __builtin_ia32_stmxcsr() & kFlushBits;
    __builtin_ia32_ldmxcsr(__builtin_ia32_stmxcsr() | kFlushBits);
#endif
  }
  ~DenormalsFlushed() {
#if defined(__SSE__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_ia32_ldmxcsr((__builtin_ia32_stmxcsr() & ~kFlushBits) | saved_);
#endif
  }
  DenormalsFlushed(const DenormalsFlushed&) = delete;
  DenormalsFlushed& operator=(const DenormalsFlushed&) = delete;

 private:
  static constexpr unsigned kFlushBits = 0x8040u;  // FTZ (bit 15) | DAZ (bit 6)
  unsigned saved_ = 0;
};

/// Throws unless position + count fits in an Index (positions index the decay and the rotation).
inline void check_position_range(const char* function, const char* name, Index position,
                                 Index count) {
  Index end = 0;
  if (add_overflows(position, count, end))
    fail(function, std::string(name) + " + " + std::to_string(count) + " overflows (" + name +
                       " is " + std::to_string(position) + ")");
}

/// Rejects an output that shares memory with an input or a state of a retention call.
template <class DOut, class DQ, class DK, class DV, class Acc>
void check_retention_aliasing(const char* function, const Eigen::MatrixBase<DOut>& out,
                              const Eigen::MatrixBase<DQ>& Q, const Eigen::MatrixBase<DK>& K,
                              const Eigen::MatrixBase<DV>& V, const RetentionState<Acc>* init,
                              const RetentionState<Acc>* final_state) {
  check_no_overlap(function, "out", out, "Q", Q);
  check_no_overlap(function, "out", out, "K", K);
  check_no_overlap(function, "out", out, "V", V);
  if (init) {
    check_no_overlap(function, "out", out, "initial_state.S", init->S);
    check_no_overlap(function, "out", out, "initial_state.z", init->z);
  }
  if (final_state) {
    check_no_overlap(function, "out", out, "final_state.S", final_state->S);
    check_no_overlap(function, "out", out, "final_state.z", final_state->z);
  }
}

/// Casts an expression to the accumulator type; a no-op when the types agree.
template <class Acc, class Derived>
auto as_acc(const Eigen::MatrixBase<Derived>& x) -> decltype(x.template cast<Acc>()) {
  return x.template cast<Acc>();
}

}  // namespace detail
}  // namespace retention
