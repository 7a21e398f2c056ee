// retention::detail: one image row of RMT's local context enhancement (a depthwise 5 x 5
// convolution, docs/math.md §4) as a dispatched kernel in explicit vectors, so that its speed
// does not depend on the compiler vectorising a loop itself (g++ does at -O3, not at -O2).
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

/// row[x, c] += sum_{i, j < 5} taps[5 i + j, c] v[(y + i - 2) W + x + j - 2, c] over the taps
/// whose source lies inside the height x width image (zero padding): v is the image's first token
/// row (row stride ldv), taps [25, C] (row stride ldt), row [width, C] (row stride ldr). One
/// vector of channels at a time, its 25 taps held in registers: each output vector is loaded and
/// stored once, with one load of v per tap.
struct LceRowKernel {
  template <class Isa, class T>
  static void run(const T* v, Index ldv, Index height, Index width, Index y, const T* taps,
                  Index ldt, Index C, T* row, Index ldr) {
    constexpr int N = simd::lanes<T, Isa>;
    using V = simd::Vec<T, N>;
    // Tap rows i whose source image row y + i - 2 exists.
    const int i_lo = static_cast<int>(std::max<Index>(0, 2 - y));
    const int i_hi = static_cast<int>(std::min<Index>(5, height + 2 - y));
    const Index Cv = C / N * N;
    for (Index c0 = 0; c0 < Cv; c0 += N) {
      V w[25];
#pragma GCC unroll 32
      for (int t = 0; t < 25; ++t) w[t] = simd::load<N>(taps + t * ldt + c0);
      for (Index x = 0; x < width; ++x) {
        // Taps j whose source column x + j - 2 exists.
        const int j_lo = static_cast<int>(std::max<Index>(0, 2 - x));
        const int j_hi = static_cast<int>(std::min<Index>(5, width + 2 - x));
        T* d = row + x * ldr + c0;
        V acc = simd::load<N>(d);
        if (j_lo == 0 && j_hi == 5) {
          for (int i = i_lo; i < i_hi; ++i) {
            const T* s = v + ((y + i - 2) * width + x - 2) * ldv + c0;
#pragma GCC unroll 8
            for (int j = 0; j < 5; ++j) acc += simd::load<N>(s + j * ldv) * w[5 * i + j];
          }
        } else {
          for (int i = i_lo; i < i_hi; ++i) {
            const T* s = v + ((y + i - 2) * width + x - 2) * ldv + c0;
            for (int j = j_lo; j < j_hi; ++j) acc += simd::load<N>(s + j * ldv) * w[5 * i + j];
          }
        }
        simd::store(d, acc);
      }
    }
    // The channels past the last whole vector, one at a time.
    if (Cv == C) return;
    for (Index x = 0; x < width; ++x) {
      const int j_lo = static_cast<int>(std::max<Index>(0, 2 - x));
      const int j_hi = static_cast<int>(std::min<Index>(5, width + 2 - x));
      for (Index c = Cv; c < C; ++c) {
        T acc = row[x * ldr + c];
        for (int i = i_lo; i < i_hi; ++i)
          for (int j = j_lo; j < j_hi; ++j)
            acc += v[((y + i - 2) * width + x + j - 2) * ldv + c] * taps[(5 * i + j) * ldt + c];
        row[x * ldr + c] = acc;
      }
    }
  }
};

}  // namespace detail
}  // namespace retention

#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
