#!/usr/bin/env bash
# Builds the emulated CUDA driver and cuBLAS (kernels/emu) into OUT (default
# target/cuda-emu): libcuda.so with every kernel of kernels/src/ops/*/*.cu compiled by g++,
# libcublas.so. Then, with NVRTC on the loader's path as CI has it,
#   TESSERA_CUDA_LIBS=target/cuda-emu cargo test -p tessera-kernels --test cuda_parity
# runs the CUDA side of the tests on the CPU. Not a GPU: see kernels/emu/emu.h.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${1:-$root/target/cuda-emu}
mkdir -p "$out/gen"
cxx=${CXX:-g++}
flags=(-std=c++17 -O2 -g -fPIC -Wall -Wno-unused-function -I"$here" ${EMU_CXXFLAGS:-})
objects=()
for cu in "$root"/kernels/src/ops/*/*.cu; do
  family=$(basename "$cu" .cu)
  gen="$out/gen/$family.cpp"
  {
    echo "#include \"emu.h\""
    echo "#include \"registry.h\""
    echo "#include \"$cu\""
    grep -oE 'extern "C" __global__ void [A-Za-z_0-9]+' "$cu" | awk '{print "EMU_KERNEL(" $5 ")"}'
  } >"$gen"
  "$cxx" "${flags[@]}" -c "$gen" -o "$out/gen/$family.o"
  objects+=("$out/gen/$family.o")
done
"$cxx" "${flags[@]}" -shared -o "$out/libcuda.so" "$here/driver.cpp" "${objects[@]}"
"$cxx" "${flags[@]}" -shared -o "$out/libcublas.so" "$here/cublas.cpp"
echo "built $out/libcuda.so ($(grep -ho 'EMU_KERNEL' "$out"/gen/*.cpp | wc -l) kernels) and $out/libcublas.so"
