# Optional system BLAS for Eigen's large products (issue 13).
#
# With EIGEN_USE_BLAS defined before any Eigen header, Eigen sends its matrix products (GEMM,
# GEMV, triangular products) to the Fortran-ABI BLAS symbols (sgemm_, dgemm_, ...). Eigen declares
# those symbols itself, so only the link line changes: no BLAS header is needed.
#
# retention_find_blas()
#   Finds a system BLAS once per configure, OpenBLAS first (it has kernels for recent x86 cores),
#   then whatever FindBLAS finds. A BLA_VENDOR set by the caller is respected as is. Sets, in the
#   caller's scope:
#     RETENTION_BLAS_FOUND       TRUE or FALSE
#     RETENTION_BLAS_VENDOR      the BLA_VENDOR that found it: "OpenBLAS", the caller's, or "All"
#     RETENTION_BLAS_LIBRARIES   the libraries to link (also as the imported target BLAS::BLAS)
#
# retention_use_blas(<target> [PRIVATE|INTERFACE|PUBLIC])
#   Adds EIGEN_USE_BLAS and the BLAS libraries to <target>; call retention_find_blas() first.
include_guard(GLOBAL)

function(retention_find_blas)
  set(found FALSE)
  set(existed FALSE)
  if(TARGET BLAS::BLAS)
    set(existed TRUE)
  endif()
  set(vendor "")
  if(DEFINED BLA_VENDOR AND NOT BLA_VENDOR STREQUAL "")
    find_package(BLAS QUIET)
    set(vendor "${BLA_VENDOR}")
  else()
    # The plain search may settle on the reference BLAS (Debian's libblas.so), which runs at a few
    # GFLOP/s and would make EIGEN_USE_BLAS a slowdown; ask for OpenBLAS by name first.
    set(BLA_VENDOR OpenBLAS)
    find_package(BLAS QUIET)
    set(vendor OpenBLAS)
    if(NOT BLAS_FOUND)
      unset(BLA_VENDOR)
      find_package(BLAS QUIET)
      set(vendor All)
    endif()
  endif()
  if(BLAS_FOUND)
    set(found TRUE)
    # FindBLAS makes a directory-scoped target; the retention target and the bench/ and tests/blas
    # directories must all see the same one.
    if(NOT existed AND TARGET BLAS::BLAS)
      set_target_properties(BLAS::BLAS PROPERTIES IMPORTED_GLOBAL TRUE)
    endif()
  else()
    set(vendor "")
  endif()
  if(NOT DEFINED CACHE{RETENTION_BLAS_REPORTED} OR NOT RETENTION_BLAS_REPORTED STREQUAL "${found}")
    if(found)
      message(STATUS "retention: BLAS found (${vendor}): ${BLAS_LIBRARIES}")
    else()
      message(STATUS "retention: no system BLAS found")
    endif()
    set(RETENTION_BLAS_REPORTED "${found}" CACHE INTERNAL "")
  endif()
  set(RETENTION_BLAS_FOUND ${found} PARENT_SCOPE)
  set(RETENTION_BLAS_VENDOR "${vendor}" PARENT_SCOPE)
  set(RETENTION_BLAS_LIBRARIES "${BLAS_LIBRARIES}" PARENT_SCOPE)
endfunction()

function(retention_use_blas target)
  set(scope PRIVATE)
  if(ARGC GREATER 1)
    set(scope ${ARGV1})
  endif()
  if(NOT TARGET BLAS::BLAS)
    message(FATAL_ERROR "retention_use_blas(${target}): call retention_find_blas() first; no BLAS::BLAS")
  endif()
  target_compile_definitions(${target} ${scope} EIGEN_USE_BLAS)
  target_link_libraries(${target} ${scope} BLAS::BLAS)
endfunction()
