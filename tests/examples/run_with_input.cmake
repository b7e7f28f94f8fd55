# Runs a program with a file as its stdin, and checks its exit status and that every expected
# line appears in its stdout (as expect_output.cmake does, which cannot feed stdin). An EXPECT
# entry may span several lines, to check that they come in that order and nothing between.
# Usage: cmake -DPROGRAM=path [-DARGS=a|b] -DINPUT_FILE=path -DEXPECT=line1|line2 [-DEXIT_CODE=0]
#              -P run_with_input.cmake
cmake_minimum_required(VERSION 3.25)
if(NOT DEFINED EXIT_CODE)
  set(EXIT_CODE 0)
endif()
if(NOT EXISTS "${INPUT_FILE}")
  message(FATAL_ERROR "INPUT_FILE '${INPUT_FILE}' does not exist")
endif()
string(REPLACE "|" ";" args "${ARGS}")
execute_process(COMMAND ${PROGRAM} ${args} INPUT_FILE ${INPUT_FILE}
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 60)
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
