// retention::detail: the in-register transpose of key rows that the score kernels read (K^T).
#pragma once

#include <retention/core.hpp>
#include <retention/detail/simd/dispatch.hpp>

#include <algorithm>

#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace retention {
namespace detail {

/// kt [dk, ld] = K^T of `rows` key rows of x (row stride ldx), zero beyond column `rows`, for the
/// vector width of Isa: whole N x N blocks go through registers (a scalar strided copy of K would
/// cost about as much as the logit product it feeds). When ld >= rows rounded up to N, a ragged
/// last block of rows is transposed whole as well, with zero rows standing in for the missing ones.
template <class Isa, class T>
[[gnu::always_inline]] inline void transpose_rows_isa(const T* x, Index ldx, Index rows, Index dk,
                                                      T* kt, Index ld) {
  constexpr int N = simd::lanes<T, Isa>;
  using V = simd::Vec<T, N>;
  for (Index c = 0; c < dk; ++c) std::fill(kt + c * ld + rows, kt + (c + 1) * ld, T(0));
  const Index c_full = dk / N * N;
  Index j0 = 0;
  for (; j0 < rows && (j0 + N <= rows || ld >= j0 + N); j0 += N) {
    const Index valid = std::min<Index>(N, rows - j0);
    for (Index c0 = 0; c0 < c_full; c0 += N) {
      V block[N];
#pragma GCC unroll 32
      for (int r = 0; r < N; ++r)
        block[r] = r < valid ? simd::load<N>(x + (j0 + r) * ldx + c0) : simd::splat<N>(T(0));
      simd::transpose_block<N, T>(block);
#pragma GCC unroll 32
      for (int r = 0; r < N; ++r) simd::store(kt + (c0 + r) * ld + j0, block[r]);
    }
    for (Index j = j0; j < j0 + valid; ++j)
      for (Index c = c_full; c < dk; ++c) kt[c * ld + j] = x[j * ldx + c];
  }
  for (Index j = j0; j < rows; ++j)
    for (Index c = 0; c < dk; ++c) kt[c * ld + j] = x[j * ldx + c];
}

struct TransposeRowsKernel {
  template <class Isa, class T>
  static void run(const T* x, Index ldx, Index rows, Index dk, T* kt, Index ld) {
    transpose_rows_isa<Isa>(x, ldx, rows, dk, kt, ld);
  }
};

/// transpose_rows_isa for the active instruction set.
template <class T>
void transpose_rows(const T* x, Index ldx, Index rows, Index dk, T* kt, Index ld) {
  simd::dispatch<TransposeRowsKernel>(x, ldx, rows, dk, kt, ld);
}

}  // namespace detail
}  // namespace retention

#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
