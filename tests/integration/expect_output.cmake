# Runs a program and checks its exit status and that every expected line appears in its output.
# Usage: cmake -DPROGRAM=path [-DARGS=a|b] -DEXPECT=line1|line2 [-DEXIT_CODE=0] -P expect_output.cmake
cmake_minimum_required(VERSION 3.25)
if(NOT DEFINED EXIT_CODE)
  set(EXIT_CODE 0)
endif()
string(REPLACE "|" ";" args "${ARGS}")
execute_process(COMMAND ${PROGRAM} ${args} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err
                TIMEOUT 60)
if(NOT rc STREQUAL "${EXIT_CODE}")
  message(FATAL_ERROR "${PROGRAM} exited with ${rc}, expected ${EXIT_CODE}\nstdout:\n${out}\nstderr:\n${err}")
endif()
string(REPLACE "|" ";" expected "${EXPECT}")
foreach(line IN LISTS expected)
  string(FIND "${out}" "${line}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "missing from the output of ${PROGRAM}: '${line}'\nstdout:\n${out}\nstderr:\n${err}")
  endif()
endforeach()
