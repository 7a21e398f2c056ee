// retention: which SIMD instruction set the kernels run on (chosen at run time).
//
// The hot kernels (chunkwise chunks, the recurrent step, MaSA tiles and MaSAD lines, their exp) are
// compiled inside the headers for three x86-64 instruction sets, whatever flags the including file
// uses, and the best one the processor supports is picked on first use. A build without -march
// therefore runs them at the speed of a -march=native build; the rest of the library (Eigen's
// products, element-wise code) still follows the compiler flags. Other processors run the
// baseline variant, written for 16-byte vectors.
#pragma once

#include <retention/core.hpp>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

namespace retention {

/// Instruction sets the kernels are compiled for, in increasing order.
enum class Isa {
  baseline,  ///< x86-64's SSE2 (or the target's own 16-byte vectors elsewhere)
  avx2,      ///< AVX2 + FMA (x86-64-v3)
  avx512     ///< AVX-512 F/DQ/BW/VL (x86-64-v4)
};

inline const char* to_string(Isa isa) {
  switch (isa) {
    case Isa::baseline:
      return "baseline";
    case Isa::avx2:
      return "avx2";
    case Isa::avx512:
      return "avx512";
  }
  return "?";
}

namespace detail {

inline Isa detect_cpu_isa() {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  // __builtin_cpu_supports also checks that the operating system saves the wider registers.
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                  __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return v4 ? Isa::avx512 : v3 ? Isa::avx2 : Isa::baseline;
#else
  return Isa::baseline;
#endif
}

/// RETENTION_ISA=baseline|avx2|avx512 lowers the choice (for comparisons); a value the processor
/// cannot run, or any other text, is ignored.
inline Isa initial_isa(Isa cpu) {
  const char* env = std::getenv("RETENTION_ISA");
  if (env == nullptr) return cpu;
  for (Isa isa : {Isa::baseline, Isa::avx2, Isa::avx512})
    if (std::strcmp(env, to_string(isa)) == 0 && isa <= cpu) return isa;
  return cpu;
}

inline std::atomic<int>& active_isa_slot() {
  static std::atomic<int> slot{static_cast<int>(initial_isa(detect_cpu_isa()))};
  return slot;
}

}  // namespace detail

/// The best instruction set this processor runs.
inline Isa cpu_isa() {
  static const Isa isa = detail::detect_cpu_isa();
  return isa;
}

/// The instruction set the kernels use now: cpu_isa(), or what RETENTION_ISA or set_active_isa
/// chose.
inline Isa active_isa() {
  return static_cast<Isa>(detail::active_isa_slot().load(std::memory_order_relaxed));
}

/// Makes the kernels use `isa` from now on (for example to compare variants); throws shape_error
/// when the processor cannot run it. Calls already running finish on the variant they started.
inline void set_active_isa(Isa isa) {
  if (isa < Isa::baseline || isa > cpu_isa())
    throw shape_error(std::string("set_active_isa: isa ") + to_string(isa) +
                      " is not supported by this processor (best: " + to_string(cpu_isa()) + ")");
  detail::active_isa_slot().store(static_cast<int>(isa), std::memory_order_relaxed);
}

}  // namespace retention
