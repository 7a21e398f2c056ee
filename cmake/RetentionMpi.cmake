# Optional MPI for the context-parallel header (include/retention/mpi/context_parallel.hpp).
# retention_find_mpi() sets RETENTION_MPI_FOUND and, when found, RETENTION_MPIEXEC_ARGS: the
# launcher's own flags for running np ranks on one machine (Open MPI: --oversubscribe, so that
# 4 ranks run on a 2-core machine; root is allowed through the environment of each test).
include_guard(GLOBAL)

function(retention_find_mpi)
  if(TARGET MPI::MPI_CXX)
    set(found TRUE)
  else()
    find_package(MPI COMPONENTS CXX QUIET)
    set(found ${MPI_CXX_FOUND})
  endif()
  if(NOT found OR NOT MPIEXEC_EXECUTABLE)
    set(RETENTION_MPI_FOUND FALSE PARENT_SCOPE)
    return()
  endif()
  set(args ${MPIEXEC_PREFLAGS})
  # Open MPI refuses more ranks than cores unless told; other launchers do not know the flag.
  execute_process(COMMAND "${MPIEXEC_EXECUTABLE}" --version OUTPUT_VARIABLE version
                  ERROR_VARIABLE version RESULT_VARIABLE rc TIMEOUT 20)
  if(version MATCHES "Open MPI|OpenRTE")
    list(APPEND args --oversubscribe)
  endif()
  set(RETENTION_MPI_FOUND TRUE PARENT_SCOPE)
  set(RETENTION_MPIEXEC_ARGS ${args} PARENT_SCOPE)
endfunction()
