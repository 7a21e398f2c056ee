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

# nm lines: an address (absent for undefined symbols), the symbol type, the demangled name.
set(undefined "\n[0-9a-fA-F]* *U ")
set(defines "\n[0-9a-fA-F]+ [TW] ")
set(failures "")
# Appends `problem` to failures unless `text` holds a match of `regex` (`present`) or holds none
# (`absent`).
function(expect text how regex problem)
  string(REGEX MATCHALL "${regex}" found "${text}")
  if((how STREQUAL "present" AND NOT found) OR (how STREQUAL "absent" AND found))
    set(failures "${failures}  ${problem}\n" PARENT_SCOPE)
  endif()
endfunction()

if(KERNELS)
  # Function templates of retention::detail, in float and in double.
  string(REPLACE "," ";" kernels "${KERNELS}")
  foreach(kernel IN LISTS kernels)
    set(name "void retention::detail::${kernel}<")
    expect("${object}" present "${undefined}${name}" "the object files do not refer to ${name}...>")
    expect("${object}" absent "${defines}${name}" "the object files define ${name}...>")
    foreach(type float double)
      expect("${library}" present "${defines}${name}[^\n]*${type}"
             "the library does not define ${name}... ${type} ...>")
    endforeach()
  endforeach()
  set(what "${KERNELS}")
else()
  # Per class: the members that hold the work (defined after the class, without `inline`), and one
  # of them that the test must call. A constructor is named with its parameter: the implicit move
  # and copy constructors are inline, and clang emits them in the objects.
  set(classes MultiScaleRetention ManhattanAttention)
  set(MultiScaleRetention_members "MultiScaleRetention\\(retention::MsrConfig" init_random
                                  make_state fused_of run prefill_impl step_impl step_batch_impl
                                  prefill_packed_impl)
  set(MultiScaleRetention_used run)
  set(ManhattanAttention_members "ManhattanAttention\\(retention::ManhattanAttentionConfig"
                                 set_gammas init_random fuse forward_impl)
  set(ManhattanAttention_used forward_impl)
  foreach(class IN LISTS classes)
    foreach(type float double)
      set(prefix "retention::${class}<${type}>::")
      set(used "${prefix}${${class}_used}")
      expect("${object}" present "${undefined}${used}\\("
             "the object files do not refer to ${used} (not compiled in compiled mode, or the test stopped using it)")
      foreach(member IN LISTS ${class}_members)
        if(NOT member MATCHES "[(]")
          string(APPEND member "\\(")
        endif()
        expect("${object}" absent "${defines}${prefix}${member}"
               "the object files define ${prefix}${member}")
        expect("${library}" present "${defines}${prefix}${member}"
               "the library does not define ${prefix}${member}")
      endforeach()
    endforeach()
  endforeach()
  set(what "the layers' instantiations")
endif()

if(failures)
  message(FATAL_ERROR "compiled mode:\n${failures}objects: ${OBJECTS}\nlibrary: ${LIBRARY}")
endif()
message(STATUS "compiled mode: ${OBJECTS} leave ${what} to ${LIBRARY}")
