// retention::detail::simd: the register block every product kernel accumulates in, and the one
// rule that sizes it.
//
// The chunkwise kernels, MaSA's tiles and MaSAD's lines all compute small products C += A B where
// B's rows are read in whole vectors and A's entries are broadcast: a block of R rows x NP vectors
// of C stays in registers while the loop over the shared dimension streams A and B from cache, so
// each loaded vector of B serves R rows. Block is that block; Blocking says how large it may be.
#pragma once

#include <retention/core.hpp>
#include <retention/detail/simd/dispatch.hpp>

#include <type_traits>

#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace retention {
namespace detail {
namespace simd {

/// Rows of the padded operand buffers (MaSA's tiles, MaSAD's lines): buffers rounded up to whole
/// blocks of this many rows serve every instruction set's kernels, whose row blocks divide it.
constexpr Index layout_rows = 8;

/// Block sizes of T on Isa. A block of R rows x NP vectors holds R NP accumulators, and each step
/// of its product also holds NP vectors of B and one broadcast of A. Up to `accumulators` of them
/// (16 of AVX-512's 32 registers, 12 of 16 otherwise) leaves room for those and keeps enough
/// independent FMAs in flight to hide their latency on two FMA ports.
template <class T, class Isa>
struct Blocking {
  static constexpr int lanes = simd::lanes<T, Isa>;
  static constexpr int accumulators = Isa::registers >= 32 ? 16 : 12;
  /// Vectors per block row where a kernel is free to choose (the chunkwise kernels).
  static constexpr int packets = 2;
  /// The most rows of a block np vectors wide; with divides > 0, the most that also divide it
  /// (kernels whose row counts are padded to layout_rows).
  static constexpr int rows(int np, int divides = 0) {
    int r = accumulators / np;
    if (divides > 0)
      while (divides % r != 0) --r;
    return r;
  }
};

/// A block of R rows x NP vectors of W lanes of accumulators. Every loop has compile-time bounds,
/// so that, inlined, the block lives in registers.
template <class T, int W, int R, int NP>
struct Block {
  using Pk = Vec<T, W>;
  Pk acc[R][NP];

  [[gnu::always_inline]] void set_zero() {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int p = 0; p < NP; ++p) acc[r][p] = splat<W>(T(0));
  }
  /// acc = c[r, :] (row stride ldc).
  [[gnu::always_inline]] void load(const T* c, Index ldc) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int p = 0; p < NP; ++p) acc[r][p] = simd::load<W>(c + r * ldc + p * W);
  }
  /// acc = beta c[r, :].
  [[gnu::always_inline]] void load_scaled(const T* c, Index ldc, T beta) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int p = 0; p < NP; ++p) acc[r][p] = beta * simd::load<W>(c + r * ldc + p * W);
  }
  /// acc = s[r] c[r, :]: a scale per row.
  [[gnu::always_inline]] void load_row_scaled(const T* c, Index ldc, const T* s) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int p = 0; p < NP; ++p) acc[r][p] = s[r] * simd::load<W>(c + r * ldc + p * W);
  }
  /// acc[r, :] += sum_{k < n} a[r * ars + k * aks] b[k * ldb + :]: entries of a broadcast against
  /// vectors of b's rows.
  [[gnu::always_inline]] void madd(const T* a, Index ars, Index aks, const T* b, Index ldb,
                                   Index n) {
    for (Index k = 0; k < n; ++k) {
      Pk bk[NP];
#pragma GCC unroll 16
      for (int p = 0; p < NP; ++p) {
        // Pinned as a local: pinned as bk[p], GCC kept the whole array on the stack.
        Pk x = simd::load<W>(b + k * ldb + p * W);
        if constexpr (R > 1) keep_in_register(x);
        bk[p] = x;
      }
      const T* ak = a + k * aks;
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const T ar = ak[r * ars];
#pragma GCC unroll 16
        for (int p = 0; p < NP; ++p) acc[r][p] += ar * bk[p];
      }
    }
  }
  /// acc[r, :] *= s[r].
  [[gnu::always_inline]] void scale_rows(const T* s) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int p = 0; p < NP; ++p) acc[r][p] *= s[r];
  }
  /// acc[:, c] *= s[c]: a scale per column.
  [[gnu::always_inline]] void scale_columns(const T* s) {
#pragma GCC unroll 16
    for (int p = 0; p < NP; ++p) {
      const Pk f = simd::load<W>(s + p * W);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[r][p] *= f;
    }
  }
  [[gnu::always_inline]] void store(T* c, Index ldc) const {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int p = 0; p < NP; ++p) simd::store(c + r * ldc + p * W, acc[r][p]);
  }
};

}  // namespace simd
}  // namespace detail
}  // namespace retention

#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
