# Compiler settings for the project's OWN targets (tests, examples, benchmarks, header checks).
# Never applied to the INTERFACE target `retention`, so consumers keep their own flags.
include_guard(GLOBAL)
include(CheckCXXCompilerFlag)

# retention_set_warnings(<target>): strict warnings (and -Werror with RETENTION_WERROR).
function(retention_set_warnings target)
  if(MSVC)
    target_compile_options(${target} PRIVATE /W4 /permissive-)
    if(RETENTION_WERROR)
      target_compile_options(${target} PRIVATE /WX)
    endif()
  elseif(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic -Wshadow -Wconversion)
    if(CMAKE_CXX_COMPILER_ID MATCHES "Clang")
      # GoogleTest's TYPED_TEST_SUITE(Suite, Types) leaves its variadic `...` empty, which clang
      # flags under -Wpedantic; it is legal C++20 and harmless.
      target_compile_options(${target} PRIVATE -Wno-gnu-zero-variadic-macro-arguments)
    endif()
    if(RETENTION_WERROR)
      target_compile_options(${target} PRIVATE -Werror)
    endif()
  endif()
endfunction()

# retention_set_native(<target>): -march=native when RETENTION_NATIVE is ON and supported.
function(retention_set_native target)
  if(NOT RETENTION_NATIVE OR MSVC)
    return()
  endif()
  check_cxx_compiler_flag(-march=native RETENTION_HAS_MARCH_NATIVE)
  if(RETENTION_HAS_MARCH_NATIVE)
    target_compile_options(${target} PRIVATE -march=native)
    # GCC < 13 warns inside its own AVX-512 intrinsics (`__m512 __Y = __Y;`, GCC bug 105593)
    # whenever Eigen vectorises with AVX-512 (-Wmaybe-uninitialized, and -Wuninitialized in float
    # GEMMs); the warning is about GCC's header, not our code.
    if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND CMAKE_CXX_COMPILER_VERSION VERSION_LESS 13)
      target_compile_options(${target} PRIVATE -Wno-maybe-uninitialized -Wno-uninitialized)
    endif()
  endif()
endfunction()

# retention_own_target(<target>): both of the above.
function(retention_own_target target)
  retention_set_warnings(${target})
  retention_set_native(${target})
endfunction()

# retention_test_target(<target>): retention_own_target, and in Release builds the test programs'
# own optimisation level. They check results, not speed, and -O3 costs about a quarter more
# compile time than -O2 for the same code (CI builds every test on two cores).
set(RETENTION_TEST_OPTIMIZATION "-O2" CACHE STRING
    "Optimisation flag of the test programs in Release builds (empty: the build type's own)")
function(retention_test_target target)
  retention_own_target(${target})
  if(RETENTION_TEST_OPTIMIZATION AND NOT MSVC)
    target_compile_options(${target} PRIVATE $<$<CONFIG:Release>:${RETENTION_TEST_OPTIMIZATION}>)
  endif()
endfunction()
