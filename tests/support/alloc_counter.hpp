// Counts the heap allocations of the whole process by interposing malloc and friends (operator new
// and Eigen's allocator end up in them too, in the test and in any library linked with it).
// Include it in ONE translation unit of a test program: it defines the C allocation functions.
#pragma once

#include "support/libc_alloc.hpp"

#include <atomic>
#include <cstddef>
#include <utility>

namespace alloc_counter {
inline std::atomic<long> allocations{0};
inline std::atomic<long> bytes{0};
inline std::atomic<bool> counting{false};
inline void count(std::size_t n) {
  if (!counting.load(std::memory_order_relaxed)) return;
  allocations.fetch_add(1);
  bytes.fetch_add(static_cast<long>(n));
}

/// Allocations made while f runs (any thread).
template <class F>
long allocations_during(F&& f) {
  allocations.store(0);
  bytes.store(0);
  counting.store(true);
  std::forward<F>(f)();
  counting.store(false);
  return allocations.load();
}

/// Bytes allocated while f runs.
template <class F>
long bytes_during(F&& f) {
  allocations_during(std::forward<F>(f));
  return bytes.load();
}
}  // namespace alloc_counter

extern "C" {
void* malloc(std::size_t n) {
  alloc_counter::count(n);
  return __libc_malloc(n);
}
void* calloc(std::size_t a, std::size_t b) {
  alloc_counter::count(a * b);
  return __libc_calloc(a, b);
}
void* realloc(void* p, std::size_t n) {
  alloc_counter::count(n);
  return __libc_realloc(p, n);
}
int posix_memalign(void** out, std::size_t align, std::size_t n) {
  alloc_counter::count(n);
  *out = __libc_memalign(align, n);
  return *out ? 0 : 12;  // ENOMEM
}
void* aligned_alloc(std::size_t align, std::size_t n) {
  alloc_counter::count(n);
  return __libc_memalign(align, n);
}
void free(void* p) { __libc_free(p); }
}
