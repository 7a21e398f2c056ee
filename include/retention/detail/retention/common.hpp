// retention::detail: checks and the output-row normalisation shared by the three retention forms.
#pragma once

#include <retention/core.hpp>
#include <retention/state.hpp>

#include <algorithm>
#include <cmath>
#include <type_traits>

#if defined(__SSE__) || defined(_M_X64)
#include <xmmintrin.h>
#define RETENTION_HAS_MXCSR 1
#endif

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

/// Rescales output rows per SPEC 2: row j (absolute position p0 + j) is divided by
/// sqrt(sum_{i<=p} gamma^i) and, for decay_and_score, further by max(|r_j| / sqrt(...), 1),
/// where r_j is the raw (not yet decay-normalised) signed score row sum.
template <class Mask, class DOut, class DR>
void normalize_rows(const Mask& decay, Normalization normalization, Index p0,
                    const Eigen::MatrixBase<DOut>& out_, const Eigen::MatrixBase<DR>& r) {
  if (normalization == Normalization::none) return;
  auto& out = const_cast<Eigen::MatrixBase<DOut>&>(out_);
  using T = typename DOut::Scalar;
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
/// DAZ); the caller's mode comes back on exit. Decay weights far from the diagonal pass through the
/// denormal range (float: gamma^d below 1.2e-38) on their way to exactly 0, and every arithmetic
/// operation on a denormal costs a microcode assist (measured: 6.7x slower for a whole head at
/// gamma = 0.96875, T = 4096). The flushed values are below 1.2e-38 (float) / 2.2e-308 (double)
/// in absolute value. No effect on other architectures.
class DenormalsFlushed {
 public:
  DenormalsFlushed() {
#if defined(RETENTION_HAS_MXCSR)
    saved_ = _mm_getcsr();
    _mm_setcsr(saved_ | 0x8040u);  // FTZ (bit 15) | DAZ (bit 6)
#endif
  }
  ~DenormalsFlushed() {
#if defined(RETENTION_HAS_MXCSR)
    _mm_setcsr(saved_);
#endif
  }
  DenormalsFlushed(const DenormalsFlushed&) = delete;
  DenormalsFlushed& operator=(const DenormalsFlushed&) = delete;

 private:
  unsigned saved_ = 0;
};

/// Casts an expression to the accumulator type; a no-op when the types agree.
template <class Acc, class Derived>
auto as_acc(const Eigen::MatrixBase<Derived>& x) -> decltype(x.template cast<Acc>()) {
  return x.template cast<Acc>();
}

}  // namespace detail
}  // namespace retention
