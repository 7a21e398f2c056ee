# cmake -DMODE=<install|find_package|subdirectory|fetchcontent> ... -P run_consumer.cmake
#   install:      cmake --install BUILD_DIR --prefix PREFIX (fresh prefix each time)
#   other modes:  configure tests/consumer in BINARY_DIR with that mode, build it, run it.
cmake_minimum_required(VERSION 3.21)

function(run what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${MODE}: ${what} failed (${rc}): ${ARGN}")
  endif()
endfunction()

if(MODE STREQUAL "install")
  file(REMOVE_RECURSE "${PREFIX}")
  run("install" "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${PREFIX}")
  foreach(f include/retention/decay.hpp share/cmake/retention/retentionConfig.cmake
            share/cmake/retention/retentionConfigVersion.cmake
            share/cmake/retention/retentionTargets.cmake)
    if(NOT EXISTS "${PREFIX}/${f}")
      message(FATAL_ERROR "install: ${PREFIX}/${f} missing")
    endif()
  endforeach()
  return()
endif()

file(REMOVE_RECURSE "${BINARY_DIR}")
set(args -S "${CONSUMER_DIR}" -B "${BINARY_DIR}/build" -G "${GENERATOR}"
    "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}" "-DCMAKE_BUILD_TYPE=${BUILD_TYPE}"
    "-DEigen3_DIR=${Eigen3_DIR}" "-DRETENTION_USE_OPENMP=${USE_OPENMP}"
    "-DRETENTION_CONSUMER_MODE=${MODE}")
if(MAKE_PROGRAM)
  list(APPEND args "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
endif()
if(EXISTS "${SOURCE_DIR}/include/retention/retention.hpp")
  list(APPEND args -DRETENTION_CONSUMER_UMBRELLA=ON)
endif()

if(MODE STREQUAL "find_package")
  list(APPEND args "-DCMAKE_PREFIX_PATH=${PREFIX}" "-DRETENTION_EXPECTED_PREFIX=${PREFIX}")
elseif(MODE STREQUAL "subdirectory")
  list(APPEND args "-DRETENTION_SOURCE_DIR=${SOURCE_DIR}")
elseif(MODE STREQUAL "fetchcontent")
  # Pack what a release archive holds (no build trees, no .git) and fetch it by file:// URL.
  set(stage "${BINARY_DIR}/stage/retention-src")
  file(MAKE_DIRECTORY "${stage}")
  foreach(item CMakeLists.txt CMakePresets.json LICENSE README.md cmake include)
    if(EXISTS "${SOURCE_DIR}/${item}")
      file(COPY "${SOURCE_DIR}/${item}" DESTINATION "${stage}")
    endif()
  endforeach()
  set(archive "${BINARY_DIR}/retention-src.tar.gz")
  execute_process(COMMAND "${CMAKE_COMMAND}" -E tar czf "${archive}" retention-src
                  WORKING_DIRECTORY "${BINARY_DIR}/stage" RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "fetchcontent: packing the source tree failed")
  endif()
  list(APPEND args "-DRETENTION_ARCHIVE=file://${archive}")
else()
  message(FATAL_ERROR "unknown MODE '${MODE}'")
endif()

run("configure" "${CMAKE_COMMAND}" ${args})
run("build" "${CMAKE_COMMAND}" --build "${BINARY_DIR}/build")
run("run" "${BINARY_DIR}/build/consumer")
