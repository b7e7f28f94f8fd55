# Runs an example with its stdout on /dev/full, where every write fails (ENOSPC): the example must
# exit 1 and say so on stderr in one line, since what it prints is its result.
# Usage: cmake -DPROGRAM=path -P output_lost.cmake
cmake_minimum_required(VERSION 3.25)
execute_process(COMMAND ${PROGRAM} OUTPUT_FILE /dev/full RESULT_VARIABLE rc ERROR_VARIABLE err
                TIMEOUT 60)
if(NOT rc STREQUAL "1")
  message(FATAL_ERROR "${PROGRAM} with its output lost exited with ${rc}, expected 1\nstderr:\n${err}")
endif()
string(FIND "${err}" "output lost" at)
if(at EQUAL -1)
  message(FATAL_ERROR "${PROGRAM} did not say that its output was lost\nstderr:\n${err}")
endif()
