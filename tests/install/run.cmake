# Builds and runs tests/install/consumer against duplex, in one of three modes:
#   package       install BUILD_DIR into a fresh prefix, then find_package(duplex) (and, if it
#                 was built with Asio, find_package(duplex COMPONENTS asio): asio_consumer)
#   pkgconfig     install into a fresh prefix, then compile with `pkg-config --cflags --libs duplex`
#   subdirectory  add_subdirectory(SOURCE_DIR)
# Usage: cmake -DMODE=... -DSOURCE_DIR=... -DBUILD_DIR=... -DWORK_DIR=... -DCXX=... -P run.cmake
cmake_minimum_required(VERSION 3.25)

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGN}\n${out}\n${err}")
  endif()
  set(last_output "${out}" PARENT_SCOPE)
endfunction()

file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})
set(consumer ${SOURCE_DIR}/tests/install/consumer)

if(MODE STREQUAL "package" OR MODE STREQUAL "pkgconfig")
  run(${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${WORK_DIR}/prefix)
endif()

if(MODE STREQUAL "package")
  run(${CMAKE_COMMAND} -S ${consumer} -B ${WORK_DIR}/build -DCMAKE_CXX_COMPILER=${CXX}
      -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix)
  run(${CMAKE_COMMAND} --build ${WORK_DIR}/build)
  run(${WORK_DIR}/build/consumer)
  # The asio component, if this duplex was built with it: find_package(duplex COMPONENTS asio)
  # and one asynchronous round trip; then, with its export file gone, the same find_package must
  # fail and say why.
  file(GLOB asio_targets ${WORK_DIR}/prefix/lib*/cmake/duplex/duplexAsioTargets*.cmake
       ${WORK_DIR}/prefix/lib/*/cmake/duplex/duplexAsioTargets*.cmake)
  if(asio_targets)
    set(main_output "${last_output}")
    set(asio_consumer ${SOURCE_DIR}/tests/install/asio_consumer)
    run(${CMAKE_COMMAND} -S ${asio_consumer} -B ${WORK_DIR}/asio-build
        -DCMAKE_CXX_COMPILER=${CXX} -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix)
    run(${CMAKE_COMMAND} --build ${WORK_DIR}/asio-build)
    run(${WORK_DIR}/asio-build/asio_consumer)
    set(asio_output "${last_output}")
    file(REMOVE ${asio_targets})
    execute_process(COMMAND ${CMAKE_COMMAND} -S ${asio_consumer} -B ${WORK_DIR}/asio-missing
                    -DCMAKE_CXX_COMPILER=${CXX} -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix
                    RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
    if(rc EQUAL 0 OR NOT "${out}${err}" MATCHES "built without Asio support")
      message(FATAL_ERROR "find_package(duplex COMPONENTS asio) without the component's files:\n"
        "exit ${rc}, expected a failure that says why\n${out}\n${err}")
    endif()
    set(last_output "${main_output}${asio_output}")
  else()
    message(STATUS "duplex was built without Asio: the asio component is not tested")
  endif()
elseif(MODE STREQUAL "subdirectory")
  run(${CMAKE_COMMAND} -S ${consumer} -B ${WORK_DIR}/build -DCMAKE_CXX_COMPILER=${CXX}
      -DDUPLEX_CONSUMER_MODE=subdirectory -DDUPLEX_SOURCE_DIR=${SOURCE_DIR})
  run(${CMAKE_COMMAND} --build ${WORK_DIR}/build -j2)
  # add_subdirectory must build the library only: no tests, tools or examples of duplex's own.
  if(EXISTS ${WORK_DIR}/build/duplex/tests OR EXISTS ${WORK_DIR}/build/duplex/tools)
    message(FATAL_ERROR "duplex built its tests or tools as a subproject")
  endif()
  run(${WORK_DIR}/build/consumer)
elseif(MODE STREQUAL "pkgconfig")
  file(GLOB pcdir LIST_DIRECTORIES true ${WORK_DIR}/prefix/lib*/pkgconfig ${WORK_DIR}/prefix/lib/*/pkgconfig)
  set(ENV{PKG_CONFIG_PATH} "${pcdir}")
  run(pkg-config --cflags --libs duplex)
  string(STRIP "${last_output}" flags)
  separate_arguments(flags UNIX_COMMAND "${flags}")
  run(${CXX} ${consumer}/main.cpp ${flags} -o ${WORK_DIR}/consumer)
  file(GLOB libdir LIST_DIRECTORIES true ${WORK_DIR}/prefix/lib*)
  set(ENV{LD_LIBRARY_PATH} "${libdir}")
  run(${WORK_DIR}/consumer)
else()
  message(FATAL_ERROR "unknown MODE '${MODE}'")
endif()
message(STATUS "${last_output}")
