// retention::detail::simd: the one vector type every hot kernel is written in.
//
// Kernels are templates over a lane count N and use Vec<T, N> with ordinary arithmetic (GCC and
// clang vector extensions) plus the helpers below. The code generated for a vector depends on the
// instruction set of the function it ends up in, not on the flags of the translation unit, so the
// same kernel source compiles to SSE2, AVX2+FMA and AVX-512 variants inside one binary
// (detail/simd/dispatch.hpp picks one at run time). N = 1 is a plain scalar, for ragged ends.
// Nothing here may be passed by value across a function boundary that is not inlined: a vector's
// calling convention depends on the instruction set, so every helper is always_inline and the
// kernels are inlined whole into their dispatch trampolines.
#pragma once

#include <retention/core.hpp>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#if defined(__GNUC__)
// "vector return without AVX enabled changes the ABI": true, and harmless here, since no vector
// crosses a call that is not inlined (see above).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace retention {
namespace detail {
namespace simd {

/// Widest vector any variant uses, in bytes: buffers the kernels read in whole vectors are padded
/// to a multiple of it, so that one layout serves every variant.
constexpr Index max_bytes = 64;
template <class T>
constexpr Index max_lanes = max_bytes / static_cast<Index>(sizeof(T));

#if !defined(__GNUC__) && !defined(__clang__)
#error "retention's kernels are written in GCC/clang vector extensions: use GCC, clang or clang-cl"
#endif
template <class T, int N>
struct VecOf {
  typedef T type __attribute__((vector_size(N * sizeof(T))));
};
template <class T>
struct VecOf<T, 1> {
  using type = T;
};

/// N lanes of T (N a power of two); Vec<T, 1> is T itself.
template <class T, int N>
using Vec = typename VecOf<T, N>::type;

/// N lanes from p (no alignment needed).
template <int N, class T>
[[gnu::always_inline]] inline Vec<T, N> load(const T* p) {
  Vec<T, N> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

/// Makes GCC hold v in a register from here on: it may not fold the load that produced v into the
/// instructions that use it. Under some tunings (-mtune=znver3, which -march=native picks on AMD
/// processors) a vector loaded once and used by R FMAs became R FMAs with a memory operand, one
/// load per use instead of one per step. clang checks an asm operand's size against the flags of
/// the translation unit, not against the kernel's target attribute, so it gets no barrier; nor
/// does GCC without optimisation, which rejects the constraint there.
template <class V>
[[gnu::always_inline]] inline void keep_in_register(V& v) {
#if defined(__OPTIMIZE__) && !defined(__clang__) && \
    (defined(__x86_64__) || (defined(__i386__) && defined(__SSE2__)))
  asm("" : "+v"(v));
#else
  (void)v;
#endif
}

/// Stores all lanes of v at p.
template <class T, class V>
[[gnu::always_inline]] inline void store(T* p, const V& v) {
  static_assert(sizeof(V) % sizeof(T) == 0, "store: lanes of another type");
  std::memcpy(p, &v, sizeof v);
}

// Rules for the helpers below. Each one works on whole vectors (a loop over lanes with a variable
// index is left to the compiler to turn back into vector code, which GCC gives up on inside the
// large flattened kernels, going lane by lane and moving accumulators to memory). A helper that
// returns a vector copies it into the returned object with memcpy, or writes an output argument:
// for a vector computed by arithmetic and returned, GCC warns about the vector calling convention
// at the end of the including file, where no pragma reaches. Addresses are only taken of copies,
// never of the caller's accumulators.

/// The bits of x as a To of the same size.
template <class To, class From>
[[gnu::always_inline]] inline To bitcast(const From& x) {
  static_assert(sizeof(To) == sizeof(From), "bitcast: sizes differ");
  const From copy = x;
  To y;
  std::memcpy(&y, &copy, sizeof y);
  return y;
}

/// N copies of x.
template <int N, class T>
[[gnu::always_inline]] inline Vec<T, N> splat(T x) {
  Vec<T, N> v;
  const Vec<T, N> t = x - Vec<T, N>{};  // x - 0 is x, -0 included
  std::memcpy(&v, &t, sizeof v);
  return v;
}

/// Lane-wise m ? a : b for a comparison mask m (all bits set or clear in each lane; N > 1).
template <class V, class M>
[[gnu::always_inline]] inline V select(const M& m, const V& a, const V& b) {
  const M bits = (bitcast<M>(a) & m) | (bitcast<M>(b) & ~m);
  V r;
  std::memcpy(&r, &bits, sizeof r);
  return r;
}

/// Lane-wise b > a ? b : a: a is kept where either is NaN.
template <int N, class T>
[[gnu::always_inline]] inline Vec<T, N> vmax(const Vec<T, N>& a, const Vec<T, N>& b) {
  Vec<T, N> r;
  if constexpr (N == 1) {
    r = b > a ? b : a;
  } else {
    const Vec<T, N> t = select(b > a, b, a);
    std::memcpy(&r, &t, sizeof r);
  }
  return r;
}

/// The low and high halves of v (N > 1). With a shuffle where the compiler has one (GCC from 12,
/// clang): through memory, GCC under -mtune=znver3 kept the vector being summed on the stack, an
/// accumulator across its whole loop for example, a store and a load in every step.
template <int N, class T, int... I>
[[gnu::always_inline]] inline void halves_by_index(const Vec<T, N>& v, Vec<T, N / 2>& lo,
                                                   Vec<T, N / 2>& hi,
                                                   std::integer_sequence<int, I...>) {
  if constexpr (N == 2) {  // Vec<T, 1> is T itself
    lo = v[0];
    hi = v[1];
  } else {
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
    lo = __builtin_shufflevector(v, v, I...);
    hi = __builtin_shufflevector(v, v, (I + N / 2)...);
#else
    const Vec<T, N> copy = v;
    std::memcpy(&lo, &copy, sizeof lo);
    std::memcpy(&hi, reinterpret_cast<const char*>(&copy) + sizeof lo, sizeof hi);
#endif
  }
}
template <int N, class T>
[[gnu::always_inline]] inline void halves(const Vec<T, N>& v, Vec<T, N / 2>& lo,
                                          Vec<T, N / 2>& hi) {
  halves_by_index<N, T>(v, lo, hi, std::make_integer_sequence<int, N / 2>{});
}

/// Sum of the lanes, by halves.
template <int N, class T>
[[gnu::always_inline]] inline T hsum(const Vec<T, N>& v) {
  if constexpr (N == 1) {
    return v;
  } else {
    Vec<T, N / 2> lo, hi;
    halves<N, T>(v, lo, hi);
    return hsum<N / 2, T>(lo + hi);
  }
}

/// Largest lane, by halves (NaN lanes as vmax treats them).
template <int N, class T>
[[gnu::always_inline]] inline T hmax(const Vec<T, N>& v) {
  if constexpr (N == 1) {
    return v;
  } else {
    Vec<T, N / 2> lo, hi;
    halves<N, T>(v, lo, hi);
    return hmax<N / 2, T>(vmax<N / 2, T>(lo, hi));
  }
}

/// exp(x) lane by lane for x <= 0, -inf and NaN included, into result: exp(-inf) = 0, NaN stays
/// NaN. Cody and Waite's reduction x = n ln 2 + r with |r| <= ln 2 / 2, then a polynomial in r
/// (Cephes' degree 7 for float, the degree 13 Taylor polynomial for double, whose truncation error
/// is below 5e-18 there), and 2^n written straight into the exponent bits. Arguments below the
/// normal range (x < -87.3 in float, x < -708.4 in double) give 0 instead of a subnormal. Largest
/// relative error on [-87, 0]: 2 ulp in float; 2 ulp in double on [-708, 0] (docs/math.md §6).
template <int N, class T>
[[gnu::always_inline]] inline void exp_nonpositive(Vec<T, N>& result, const Vec<T, N>& x) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "float or double");
  if constexpr (N == 1) {
    // One lane: the same steps on two.
    Vec<T, 2> e;
    exp_nonpositive<2, T>(e, splat<2>(x));
    result = e[0];
  } else {
    using V = Vec<T, N>;
    constexpr bool is_float = std::is_same_v<T, float>;
    using I = std::conditional_t<is_float, std::int32_t, std::int64_t>;
    using U = std::make_unsigned_t<I>;
    constexpr T lowest = is_float ? T(-88) : T(-709);
    constexpr T log2e = T(1.44269504088896340736);
    constexpr T ln2_hi = is_float ? T(0.693359375) : T(0.693145751953125);
    constexpr T ln2_lo = is_float ? T(-2.12194440e-4) : T(1.42860682030941723212e-6);
    const V lo = splat<N>(lowest);
    const V xc = select(x < lo, lo, x);   // clamped below, NaN kept (for r)
    const V xs = select(x >= lo, x, lo);  // also NaN replaced (for the integer n)
    // n = ceil(x log2 e - 1/2), the nearest integer for x <= 0, by truncation toward zero.
    const Vec<std::int32_t, N> ni =
        __builtin_convertvector(xs * log2e - T(0.5), Vec<std::int32_t, N>);
    const V n = __builtin_convertvector(ni, V);
    V r = xc - n * ln2_hi;
    r = r - n * ln2_lo;
    V y;
    if constexpr (is_float) {
      const V r2 = r * r;
      V p = T(1.9875691500e-4f) * r + T(1.3981999507e-3f);
      V p1 = T(4.1665795894e-2f) * r + T(1.6666665459e-1f);
      p = p * r + T(8.3334519073e-3f);
      p1 = p1 * r + T(5.0000001201e-1f);
      p = p * (r2 * r) + p1;
      y = p * r2 + (r + T(1));
    } else {
      // 1/k! for k = 13 .. 2, then 1 + r (1 + ...).
      constexpr double c[] = {1.6059043836821613e-10, 2.08767569878681e-9,   2.505210838544172e-8,
                              2.755731922398589e-7,   2.7557319223985893e-6, 2.48015873015873e-5,
                              1.984126984126984e-4,   1.388888888888889e-3,  8.333333333333333e-3,
                              4.1666666666666664e-2,  1.6666666666666666e-1, 0.5};
      V p = splat<N>(T(c[0]));
#pragma GCC unroll 16
      for (int k = 1; k < 12; ++k) p = p * r + T(c[k]);
      p = p * r + T(1);
      y = p * r + T(1);
    }
    // 2^n: n + bias in the exponent field; n = -bias (only below the clamp) gives +0.
    constexpr int mant = is_float ? 23 : 52;
    constexpr I bias = is_float ? 127 : 1023;
    const Vec<I, N> e = __builtin_convertvector(ni, Vec<I, N>) + bias;
    const Vec<U, N> bits = bitcast<Vec<U, N>>(e) << mant;
    result = y * bitcast<V>(bits);
  }
}

/// Lanes k / 2 of a (even k) and of b (odd k), from lane `first` on: one round of a perfect
/// shuffle of two rows.
template <int N, int first, class V, int... K>
[[gnu::always_inline]] inline void interleave(V& out, const V& a, const V& b,
                                              std::integer_sequence<int, K...>) {
  out = __builtin_shufflevector(a, b, (first + K / 2 + (K % 2) * N)...);
}

/// One round of transpose_block: out[2i] and out[2i + 1] interleave in[i] with in[i + N/2].
template <int N, class T>
[[gnu::always_inline]] inline void transpose_round(const Vec<T, N> (&in)[N], Vec<T, N> (&out)[N]) {
  using Lanes = std::make_integer_sequence<int, N>;
#pragma GCC unroll 32
  for (int i = 0; i < N / 2; ++i) {
    interleave<N, 0>(out[2 * i], in[i], in[i + N / 2], Lanes());
    interleave<N, N / 2>(out[2 * i + 1], in[i], in[i + N / 2], Lanes());
  }
}

/// In-register transpose of an N x N block held as N row vectors (N a power of two): after it,
/// rows[c] holds what was column c. log2(N) rounds of interleaving row i with row i + N/2, the
/// perfect shuffle that sorts lanes by their other index. The rounds alternate between rows and a
/// second array, all unrolled: a copy loop between rounds would leave the vectors in memory (g++
/// 12 turns it into a call to memcpy).
template <int N, class T>
[[gnu::always_inline]] inline void transpose_block(Vec<T, N> (&rows)[N]) {
  if constexpr (N > 1) {
    constexpr int rounds = N >= 16 ? 4 : N >= 8 ? 3 : N >= 4 ? 2 : 1;
    static_assert(N == 1 << rounds, "N: 2, 4, 8 or 16");
    Vec<T, N> other[N];
#pragma GCC unroll 4
    for (int k = 0; k + 1 < rounds; k += 2) {
      transpose_round<N, T>(rows, other);
      transpose_round<N, T>(other, rows);
    }
    if constexpr (rounds % 2 == 1) {
      transpose_round<N, T>(rows, other);
#pragma GCC unroll 32
      for (int i = 0; i < N; ++i) rows[i] = other[i];
    }
  }
}

/// Stores all lanes of v at p, which must be aligned to sizeof v, without bringing p's cache line
/// in (a non-temporal store, where the target has one): for output written once and not read
/// again soon, whose line would otherwise be read from memory before it is overwritten. Such
/// stores are weakly ordered: stream_fence() before the data is handed to another thread.
template <class T, class V>
[[gnu::always_inline]] inline void stream(T* p, const V& v) {
  static_assert(sizeof(V) % sizeof(T) == 0, "stream: lanes of another type");
#if defined(__clang__)
  if constexpr (sizeof(V) > sizeof(T)) {
    __builtin_nontemporal_store(v, reinterpret_cast<V*>(p));
    return;
  }
#elif defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && defined(__SSE2__)
  // GCC has no generic non-temporal store and declares its x86 builtins only where a header
  // enables their instruction set, so the instruction itself (AT&T|Intel syntax), in the variants
  // (dispatch.hpp) whose instruction set has vectors of this width, the only places one is
  // instantiated.
  constexpr bool single = std::is_same_v<T, float>, twin = std::is_same_v<T, double>;
  if constexpr ((single || twin) && (sizeof(V) == 64 || sizeof(V) == 32)) {
    if constexpr (single)
      asm volatile("{vmovntps %1, %0|vmovntps %0, %1}" : "=m"(*reinterpret_cast<V*>(p)) : "v"(v));
    else
      asm volatile("{vmovntpd %1, %0|vmovntpd %0, %1}" : "=m"(*reinterpret_cast<V*>(p)) : "v"(v));
    return;
  } else if constexpr ((single || twin) && sizeof(V) == 16) {
    if constexpr (single)
      asm volatile("{movntps %1, %0|movntps %0, %1}" : "=m"(*reinterpret_cast<V*>(p)) : "x"(v));
    else
      asm volatile("{movntpd %1, %0|movntpd %0, %1}" : "=m"(*reinterpret_cast<V*>(p)) : "x"(v));
    return;
  }
#endif
  store(p, v);
}

/// Orders the stream() stores before later stores (x86's sfence); nothing elsewhere.
[[gnu::always_inline]] inline void stream_fence() {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__SSE__)
  __builtin_ia32_sfence();
#endif
}

/// Hints that the cache line at p will be read soon, into L2 (for data larger than L1). In GCC an
/// asm statement: its pure-const analysis counts __builtin_prefetch as no effect, so a function
/// that only prefetches (masad_prefetch_rows) is found "const" and its calls are deleted wherever
/// it is not inlined first (bench_speed's -O2 build lost all of them).
[[gnu::always_inline]] inline void prefetch_l2(const void* p) {
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
  asm volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(p)));
#elif defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p, 0, 2);
#else
  (void)p;
#endif
}

}  // namespace simd
}  // namespace detail
}  // namespace retention

#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
