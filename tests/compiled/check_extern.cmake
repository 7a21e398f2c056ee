# cmake -DNM=<nm> -DOBJECTS=<object files of a test compiled with RETENTION_COMPILED, |-separated>
#       -DLIBRARY=<the compiled-mode library> [-DKERNELS=<function>,...] -P check_extern.cmake
# Fails unless, for MultiScaleRetention and ManhattanAttention of float and double, the object files
# refer to the class's out-of-line members and define none of them (`extern template` kept their
# instantiation out), and the library defines every one of them. With KERNELS the same, instead, for
# those function templates of retention::detail (per-head kernels), in float and in double.
cmake_minimum_required(VERSION 3.21)

function(symbols file out)
  execute_process(COMMAND "${NM}" -C "${file}" OUTPUT_VARIABLE text RESULT_VARIABLE rc
                  ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${NM} -C ${file} failed (${rc}): ${err}")
  endif()
  # A leading newline so that every symbol line can be matched from its start.
  set(${out} "\n${text}" PARENT_SCOPE)
endfunction()

string(REPLACE "|" ";" objects "${OBJECTS}")
set(object "")
foreach(file IN LISTS objects)
  symbols("${file}" text)
  string(APPEND object "${text}")
endforeach()
symbols("${LIBRARY}" library)

if(KERNELS)
  set(failures "")
  string(REPLACE "," ";" kernels "${KERNELS}")
  foreach(kernel IN LISTS kernels)
    set(name "void retention::detail::${kernel}<")
    string(REGEX MATCHALL "\n *U ${name}" used "${object}")
    if(NOT used)
      string(APPEND failures "  the object files do not refer to ${name}...>\n")
    endif()
    string(REGEX MATCHALL "\n[0-9a-fA-F]+ [TW] ${name}" defined "${object}")
    if(defined)
      string(APPEND failures "  the object files define ${name}...>\n")
    endif()
    foreach(type float double)
      string(REGEX MATCHALL "\n[0-9a-fA-F]+ [TW] ${name}[^\n]*${type}" defined "${library}")
      if(NOT defined)
        string(APPEND failures "  the library does not define ${name}... ${type} ...>\n")
      endif()
    endforeach()
  endforeach()
  if(failures)
    message(FATAL_ERROR "compiled mode:\n${failures}objects: ${OBJECTS}\nlibrary: ${LIBRARY}")
  endif()
  message(STATUS "compiled mode: ${OBJECTS} leave ${KERNELS} to ${LIBRARY}")
  return()
endif()

# Per class: the members that hold the work (defined after the class, without `inline`), and one
# of them that the test must call.
set(classes MultiScaleRetention ManhattanAttention)
set(MultiScaleRetention_members MultiScaleRetention init_random make_state fused_of run
                                prefill_impl step_impl step_batch_impl prefill_packed_impl)
set(MultiScaleRetention_used run)
set(ManhattanAttention_members ManhattanAttention set_gammas init_random fuse forward_impl)
set(ManhattanAttention_used forward_impl)
set(failures "")
foreach(class IN LISTS classes)
  foreach(type float double)
    set(prefix "retention::${class}<${type}>::")
    # nm: an address (absent for undefined symbols), the symbol type, the demangled name.
    string(REGEX MATCHALL "\n[0-9a-fA-F]* *U ${prefix}${${class}_used}\\(" used "${object}")
    if(NOT used)
      string(APPEND failures "  the object files do not refer to ${prefix}${${class}_used} (not "
                             "compiled in compiled mode, or the test stopped using it)\n")
    endif()
    foreach(member IN LISTS ${class}_members)
      string(REGEX MATCHALL "\n[0-9a-fA-F]+ [TW] ${prefix}${member}\\(" defined "${object}")
      if(defined)
        string(APPEND failures "  the object files define ${prefix}${member}\n")
      endif()
      string(REGEX MATCHALL "\n[0-9a-fA-F]+ [TW] ${prefix}${member}\\(" defined "${library}")
      if(NOT defined)
        string(APPEND failures "  the library does not define ${prefix}${member}\n")
      endif()
    endforeach()
  endforeach()
endforeach()

if(failures)
  message(FATAL_ERROR "compiled mode:\n${failures}objects: ${OBJECTS}\nlibrary: ${LIBRARY}")
endif()
message(STATUS "compiled mode: ${OBJECTS} leave the layers' instantiations to ${LIBRARY}")
