// retention::detail::simd: run-time choice among a kernel's instruction-set variants.
//
// A kernel is a struct K with `template <class Isa, class... A> static R run(A...)`, written in
// Vec<T, lanes<T, Isa>> (vec.hpp) with block sizes from Isa. dispatch<K>(args...) calls the
// variant for active_isa() through a trampoline that carries the instruction set as a `target`
// attribute and `flatten`, so the whole kernel is inlined into it and compiled for that set.
// Arguments are pointers and scalars only (no vector crosses the call).
#pragma once

#include <retention/detail/simd/vec.hpp>
#include <retention/isa.hpp>

#include <type_traits>

namespace retention {
namespace detail {
namespace simd {

/// The instruction sets as kernel parameters: vector width in bytes and vector register count.
struct Sse2 {
  static constexpr int bytes = 16, registers = 16;
};
struct Avx2 {
  static constexpr int bytes = 32, registers = 16;
};
struct Avx512 {
  static constexpr int bytes = 64, registers = 32;
};

/// Lanes of T in one vector of Isa.
template <class T, class Isa>
constexpr int lanes = Isa::bytes / static_cast<int>(sizeof(T));

template <class K, class... A>
[[gnu::flatten, gnu::noinline]] inline auto run_baseline(A... a) {
  return K::template run<Sse2>(a...);
}

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
template <class K, class... A>
__attribute__((target("avx2,fma,bmi,bmi2,popcnt,f16c"), flatten, noinline)) inline auto run_avx2(
    A... a) {
  return K::template run<Avx2>(a...);
}
template <class K, class... A>
__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,bmi,bmi2,popcnt,f16c"), flatten,
               noinline)) inline auto
run_avx512(A... a) {
  return K::template run<Avx512>(a...);
}
#endif

/// K's variant for instruction set Isa, known at compile time: for a kernel that calls others as
/// functions of their own (each trampoline is compiled and register-allocated on its own, where
/// one flattened function holding all of them allocates registers worse).
template <class Isa, class K, class... A>
inline auto call(A... a) {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  if constexpr (std::is_same_v<Isa, Avx512>)
    return run_avx512<K>(a...);
  else if constexpr (std::is_same_v<Isa, Avx2>)
    return run_avx2<K>(a...);
  else
    return run_baseline<K>(a...);
#else
  return run_baseline<K>(a...);
#endif
}

/// K's variant for the active instruction set, called with a...
template <class K, class... A>
inline auto dispatch(A... a) {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  switch (active_isa()) {
    case Isa::avx512:
      return run_avx512<K>(a...);
    case Isa::avx2:
      return run_avx2<K>(a...);
    default:
      break;
  }
#endif
  return run_baseline<K>(a...);
}

}  // namespace simd
}  // namespace detail
}  // namespace retention
