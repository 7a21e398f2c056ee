# retention_extract_readme_sample(<README.md> <output.cpp>)
# Copies the FIRST ```cpp fenced block of the README into <output.cpp>, prefixed with a #line
# directive so that compiler errors point at README.md. Re-runs whenever README.md changes.
include_guard(GLOBAL)

function(retention_extract_readme_sample readme output)
  retention_extract_readme_block("${readme}" 1 "${output}")
endfunction()

# retention_extract_readme_block(<README.md> <n> <output.cpp>)
# Copies the n-th (1-based) ```cpp fenced block of the README, the same way.
function(retention_extract_readme_block readme n output)
  set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS "${readme}")
  file(READ "${readme}" text)
  set(rest "${text}")
  set(consumed 0)
  foreach(i RANGE 1 ${n})
    string(FIND "${rest}" "```cpp\n" open)
    if(open EQUAL -1)
      message(FATAL_ERROR "retention: ${readme} has fewer than ${n} ```cpp blocks")
    endif()
    math(EXPR skip "${open} + 7")
    math(EXPR consumed "${consumed} + ${skip}")
    string(SUBSTRING "${rest}" ${skip} -1 rest)
  endforeach()
  string(FIND "${rest}" "\n```" close)
  if(close EQUAL -1)
    message(FATAL_ERROR "retention: unterminated ```cpp block in ${readme}")
  endif()
  math(EXPR close "${close} + 1") # keep the block's last newline
  string(SUBSTRING "${rest}" 0 ${close} body)

  # Line number (1-based) of the first line of the block body.
  string(SUBSTRING "${text}" 0 ${consumed} before)
  string(REGEX MATCHALL "\n" newlines "${before}")
  list(LENGTH newlines line)
  math(EXPR line "${line} + 1")

  set(content "// Generated from README.md by cmake/RetentionReadmeSample.cmake; do not edit.\n")
  string(APPEND content "#line ${line} \"${readme}\"\n${body}")
  retention_write_if_changed("${output}" "${content}")
endfunction()

# retention_write_if_changed(<file> <content>): write verbatim, keeping the timestamp (and so
# avoiding a rebuild) when the content is unchanged.
function(retention_write_if_changed file content)
  if(EXISTS "${file}")
    file(READ "${file}" old)
    if(old STREQUAL content)
      return()
    endif()
  endif()
  file(WRITE "${file}" "${content}")
endfunction()
