// retention: the recurrent state of one head and the options shared by the three forms
// (docs/math.md §2).
#pragma once

#include <retention/core.hpp>

#include <string>

namespace retention {

/// State of one retention head after `position` tokens: S [dk, dv] (sum of decayed k^T v),
/// z [dk] (sum of decayed k, needed by the score normalisation) and the absolute position.
/// Scalar may be wider than the inputs' (e.g. a double state for float inputs, see docs/math.md
/// §1).
template <class T>
struct RetentionState {
  Matrix<T> S;
  Vector<T> z;
  Index position = 0;

  RetentionState() = default;
  /// A zero state for heads with key dim dk and value dim dv.
  RetentionState(Index dk, Index dv)
      : S(Matrix<T>::Zero(checked("dk", dk), checked_cols(dk, dv))),
        z(Vector<T>::Zero(dk)),
        position(0) {}

  Index key_dim() const { return S.rows(); }
  Index value_dim() const { return S.cols(); }
  /// Bytes held by S and z.
  std::size_t bytes() const { return static_cast<std::size_t>(S.size() + z.size()) * sizeof(T); }
  /// Back to the zero state at position 0 (shape kept).
  void reset() {
    S.setZero();
    z.setZero();
    position = 0;
  }

 private:
  // Sizes are checked before anything is allocated (a negative size must not reach Eigen).
  static Index checked(const char* name, Index value) {
    detail::check_positive("RetentionState", name, value);
    return value;
  }
  static Index checked_cols(Index dk, Index dv) {
    checked("dk", dk);  // argument evaluation order is unspecified: check dk here too
    checked("dv", dv);
    detail::checked_product("RetentionState", "dk * dv", dk, dv);
    return dv;
  }
};

/// Default query/key block size of the parallel form (RetentionOptions::tile = 0).
constexpr Index default_parallel_tile = 128;

/// Options of parallel_retention, recurrent_retention and chunkwise_retention.
/// StateScalar is the state's scalar type: the inputs' type by default, or double for float inputs
/// (a wider accumulator for heads with gamma within 2^-24 of 1).
template <class StateScalar>
struct RetentionOptions {
  Normalization normalization = Normalization::none;
  /// State carried in from earlier tokens (S_init, z_init, position); nullptr = zero state at 0.
  const RetentionState<StateScalar>* initial_state = nullptr;
  /// If set, receives the state after the last token. May point to *initial_state.
  RetentionState<StateScalar>* final_state = nullptr;
  /// Parallel form: query/key block size (extra memory O(T * tile)); 0 = default_parallel_tile.
  Index tile = 0;
};

namespace detail {

template <class StateScalar>
void check_state(const char* function, const RetentionState<StateScalar>& s, Index dk, Index dv,
                 const char* name = "initial_state") {
  if (s.S.rows() != dk || s.S.cols() != dv)
    fail(function, std::string(name) + ".S is " + shape_string(s.S.rows(), s.S.cols()) +
                       ", expected " + shape_string(dk, dv));
  if (s.z.size() != dk)
    fail(function, std::string(name) + ".z is " + shape_string(s.z.size(), 1) + ", expected " +
                       shape_string(dk, 1));
  if (s.position < 0)
    fail(function,
         std::string(name) + ".position is " + std::to_string(s.position) + ", expected >= 0");
}

}  // namespace detail
}  // namespace retention
