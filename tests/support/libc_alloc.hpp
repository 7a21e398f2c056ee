// glibc's own allocation functions, for tests that interpose malloc and friends and must still
// reach the real allocator (support/alloc_counter.hpp, test_exceptions.cpp).
#pragma once

#include <cstddef>

extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
void __libc_free(void*);
}
