// retention::detail: Linear's product y = x W^T + b in the instruction set the processor has, not
// the one the translation unit was compiled for (Eigen's GEMM follows the compiler flags, so a
// build without -march ran every layer's projections in SSE2).
//
// The blocking is the usual one for a product whose right operand is a weight: W^T is packed in
// panels of simd::Blocking's `packets` vectors of outputs over linear_depth_block inputs (a panel
// stays in L1 while every row block of x passes over it), linear_output_block outputs at a time
// (the packed block stays in L2), and x is taken linear_row_block rows at a time. Each row block
// accumulates in a simd::Block, broadcasting x's entries from its rows as they lie.
#pragma once

#include <retention/core.hpp>
#include <retention/detail/scratch.hpp>
#include <retention/detail/simd/block.hpp>
#include <retention/detail/simd/dispatch.hpp>
#include <retention/detail/simd/transpose.hpp>
#include <retention/isa.hpp>

#include <algorithm>
#include <type_traits>

#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace retention {
namespace detail {

/// Inputs per packed panel, outputs per packed block and rows of x per pass over a block.
constexpr Index linear_depth_block = 256;
constexpr Index linear_output_block = 512;
constexpr Index linear_row_block = 128;

/// Outputs per packed panel of T on Isa: the register block's width.
template <class T, class Isa>
constexpr Index linear_panel = simd::Blocking<T, Isa>::lanes* simd::Blocking<T, Isa>::packets;

/// linear_panel for an instruction set chosen at run time.
template <class T>
Index linear_panel_width(Isa isa) {
  switch (isa) {
    case Isa::avx512:
      return linear_panel<T, simd::Avx512>;
    case Isa::avx2:
      return linear_panel<T, simd::Avx2>;
    default:
      return linear_panel<T, simd::Sse2>;
  }
}

/// Values of a whole weight of n outputs and k inputs packed in panels of width pw: every depth
/// block holds all outputs rounded up to whole panels.
inline Index linear_packed_size(Index n, Index k, Index pw) { return (n + pw - 1) / pw * pw * k; }

/// The panels of W [n, k] (row stride ldw) over inputs [k0, k0 + kl): panel j holds outputs
/// [j pw, j pw + pw) as kl rows of pw values (zero beyond n), panels one after another.
struct LinearPackKernel {
  template <class Isa, class T>
  static void run(const T* w, Index ldw, Index n, Index kl, T* dst) {
    constexpr Index pw = linear_panel<T, Isa>;
    for (Index j0 = 0; j0 < n; j0 += pw)
      transpose_rows_isa<Isa>(w + j0 * ldw, ldw, std::min(pw, n - j0), kl, dst + j0 * kl, pw);
  }
};

/// One call's operands: y[:, 0 : n) = x W^T (+ bias), x [rows, k], W's rows [n, k].
template <class T>
struct LinearOperands {
  const T* x;
  Index ldx;
  const T* w;  ///< W's first output row (read when packed is null)
  Index ldw;
  /// The whole weight packed (LinearPackKernel over every depth block, linear_packed_size values)
  /// and the index of this call's first output in it, a multiple of the panel width; or null.
  const T* packed;
  Index packed_outputs;  ///< all outputs of the packed weight, rounded up to whole panels
  Index first_output;
  const T* bias;  ///< the first output's bias, or null
  T* y;
  Index ldy;
  Index rows, k, n;
  T* scratch;  ///< linear_depth_block x linear_output_block values when packed is null
};

template <int N>
using LinearInt = std::integral_constant<int, N>;

/// body(LinearInt<R>, i) for row blocks of R, R / 2, ..., 1 rows from row i up to m.
template <int R, class Body>
[[gnu::always_inline]] inline void linear_row_tail(Index m, Index i, Body& body) {
  if (i + R <= m) {
    body(LinearInt<R>(), i);
    i += R;
  }
  if constexpr (R > 1)
    linear_row_tail<R / 2>(m, i, body);
  else
    for (; i < m; ++i) body(LinearInt<1>(), i);
}

struct LinearProductKernel {
  template <class Isa, class T>
  static void run(const LinearOperands<T>* o) {
    using B = simd::Blocking<T, Isa>;
    constexpr int P = B::lanes, NP = B::packets, R = B::rows(NP);
    constexpr Index PW = linear_panel<T, Isa>;
    const Index rows = o->rows, k = o->k, n = o->n;
    for (Index k0 = 0; k0 < k; k0 += linear_depth_block) {
      const Index kl = std::min(linear_depth_block, k - k0);
      const bool first = k0 == 0;
      for (Index n0 = 0; n0 < n; n0 += linear_output_block) {
        const Index nl = std::min(linear_output_block, n - n0);
        const T* block;
        if (o->packed) {
          block = o->packed + k0 * o->packed_outputs + (o->first_output + n0) * kl;
        } else {
          LinearPackKernel::run<Isa>(o->w + n0 * o->ldw + k0, o->ldw, nl, kl, o->scratch);
          block = o->scratch;
        }
        for (Index m0 = 0; m0 < rows; m0 += linear_row_block) {
          const Index m1 = std::min(rows, m0 + linear_row_block);
          for (Index j0 = 0; j0 < nl; j0 += PW)
            panel<Isa, P, NP, R>(o, block + j0 * kl, k0, kl, n0 + j0, std::min(PW, nl - j0), m0, m1,
                                 first);
        }
      }
    }
  }

 private:
  /// Outputs [j, j + pw) of rows [m0, m1) over inputs [k0, k0 + kl) from one packed panel,
  /// starting from the bias (first depth block) or from what y holds.
  template <class Isa, int P, int NP, int R, class T>
  [[gnu::always_inline]] static void panel(const LinearOperands<T>* o, const T* pan, Index k0,
                                           Index kl, Index j, Index pw, Index m0, Index m1,
                                           bool first) {
    constexpr int PW = P * NP;
    alignas(64) T bias[PW];
    for (int c = 0; c < PW; ++c) bias[c] = (o->bias && c < pw) ? o->bias[j + c] : T(0);
    T* const y = o->y + j;
    const Index ldy = o->ldy;
    auto rows = [&](auto r_tag, Index i) __attribute__((always_inline)) {
      constexpr int RR = decltype(r_tag)::value;
      simd::Block<T, P, RR, NP> acc;
      // A ragged last panel goes through a full-width copy.
      alignas(64) T edge[RR * PW];
      if (first) {
#pragma GCC unroll 16
        for (int r = 0; r < RR; ++r)
#pragma GCC unroll 16
          for (int p = 0; p < NP; ++p) acc.acc[r][p] = simd::load<P>(bias + p * P);
      } else if (pw == PW) {
        acc.load(y + i * ldy, ldy);
      } else {
        for (int r = 0; r < RR; ++r)
          for (int c = 0; c < PW; ++c) edge[r * PW + c] = c < pw ? y[(i + r) * ldy + c] : T(0);
        acc.load(edge, PW);
      }
      acc.madd(o->x + i * o->ldx + k0, o->ldx, 1, pan, PW, kl);
      if (pw == PW) {
        acc.store(y + i * ldy, ldy);
      } else {
        acc.store(edge, PW);
        for (int r = 0; r < RR; ++r)
          for (Index c = 0; c < pw; ++c) y[(i + r) * ldy + c] = edge[r * PW + c];
      }
    };
    Index i = m0;
    for (; i + R <= m1; i += R) rows(LinearInt<R>(), i);
    linear_row_tail<R / 2>(m1, i, rows);
  }
};

/// Rows below which Linear keeps Eigen's products (one matrix-vector product a row): packing the
/// weight would cost more than the product of so few rows. A packed weight pays from two rows.
constexpr Index linear_kernel_min_rows = 4;
constexpr Index linear_kernel_min_rows_packed = 2;

/// Whether Linear's products run through LinearProductKernel (unless a BLAS takes them): on
/// processors with AVX2 or AVX-512, where Eigen's SSE2 products, or its own at the compiler's
/// instruction set, are slower (at SSE2 they are faster), for float and double.
template <class T>
bool linear_kernel_active() {
  return std::is_same_v<T, float> || std::is_same_v<T, double> ? active_isa() != Isa::baseline
                                                               : false;
}

/// Packs W [n, k] (row-major) whole for the active instruction set into dst
/// (linear_packed_size(n, k, linear_panel_width<T>(active_isa())) values).
template <class T>
void linear_pack(const T* w, Index ldw, Index n, Index k, T* dst) {
  const Index npad = linear_packed_size(n, 1, linear_panel_width<T>(active_isa()));
  for (Index k0 = 0; k0 < k; k0 += linear_depth_block) {
    const Index kl = std::min(linear_depth_block, k - k0);
    simd::dispatch<LinearPackKernel>(w + k0, ldw, n, kl, dst + k0 * npad);
  }
}

struct LinearScratchTag {};

/// Runs LinearProductKernel on o (o.scratch is set here when o.packed is null).
template <class T>
void linear_product(LinearOperands<T> o) {
  if (o.packed) {
    simd::dispatch<LinearProductKernel>(static_cast<const LinearOperands<T>*>(&o));
    return;
  }
  ThreadScratch<T, LinearScratchTag> scratch(linear_depth_block * linear_output_block);
  o.scratch = scratch.data();
  simd::dispatch<LinearProductKernel>(static_cast<const LinearOperands<T>*>(&o));
}

}  // namespace detail
}  // namespace retention

#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
