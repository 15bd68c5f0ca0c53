# metatt_torch_interface(<name>): an INTERFACE target that links LibTorch the
# way the pip wheel needs it; used by the main build (metatt_torch) and the
# standalone fuzz project (metatt_fuzz_torch). Call after find_package(Torch).
#
# torch's exported compile flags include -D_GLIBCXX_USE_CXX11_ABI=1 (wheel >= 2.7).
# The wheel's libtorch_cuda.so needs the CUDA libraries the wheel ships under
# site-packages/nvidia/*/lib (NCCL, cuDNN, ...), newer than the toolkit's in
# /usr/local/cuda. Link and run against those: -rpath-link for the linker and
# an old-style RPATH (inherited by transitive dependencies) for the loader;
# otherwise the toolkit's older NCCL gets picked up.
function(metatt_torch_interface name)
  add_library(${name} INTERFACE)
  target_link_libraries(${name} INTERFACE ${TORCH_LIBRARIES})
  target_include_directories(${name} SYSTEM INTERFACE ${TORCH_INCLUDE_DIRS})
  get_filename_component(_libdir "${TORCH_LIBRARY}" DIRECTORY)
  file(GLOB _nvidia_libdirs LIST_DIRECTORIES true "${_libdir}/../../nvidia/*/lib")
  foreach(d ${_libdir} ${_nvidia_libdirs})
    target_link_options(${name} INTERFACE "LINKER:-rpath-link,${d}" "LINKER:-rpath,${d}")
  endforeach()
  target_link_options(${name} INTERFACE "LINKER:--disable-new-dtags")
endfunction()
