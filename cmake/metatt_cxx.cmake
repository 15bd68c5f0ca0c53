# The language settings every CMake project of this repository uses (the main
# build and the separately configured fuzz project): C++17, a compile database
# for tools, RelWithDebInfo unless the caller chose a build type.
set(CMAKE_CXX_STANDARD 17)
set(CMAKE_CXX_STANDARD_REQUIRED ON)
set(CMAKE_EXPORT_COMPILE_COMMANDS ON)
if(NOT CMAKE_BUILD_TYPE)
  set(CMAKE_BUILD_TYPE RelWithDebInfo)
endif()
