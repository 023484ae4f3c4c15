#!/usr/bin/env bash
# Builds the emulated CUDA driver and cuBLAS (kernels/emu) into OUT (default target/cuda-emu):
# libcuda.so with every kernel of kernels/src/ops/*/*.cu compiled by g++, libcublas.so,
# libnccl.so (ranks as processes of one machine, through shared memory). Then,
# with NVRTC on the loader's path as CI has it,
#   LD_LIBRARY_PATH=target/cuda-emu:$LD_LIBRARY_PATH cargo test -p tessera-kernels --test cuda_parity
# runs the CUDA side of the tests on the CPU. Not a GPU: see kernels/emu/emu.h.
# --asan (default OUT target/cuda-emu-asan): the kernels and device buffers under
# AddressSanitizer, so a kernel reading or writing outside a buffer fails with its source line;
# run with LD_PRELOAD="$(g++ -print-file-name=libasan.so)" ASAN_OPTIONS=detect_leaks=0.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cxx=${CXX:-g++}
flags=(-std=c++17 -O2 -g -fPIC -Wall -Wno-unused-function -I"$here")
default_out=$root/target/cuda-emu
if [ "${1:-}" = --asan ]; then
  shift
  flags+=(-fsanitize=address -fno-omit-frame-pointer)
  default_out=$root/target/cuda-emu-asan
fi
out=${1:-$default_out}
mkdir -p "$out/gen"
objects=()
for cu in "$root"/kernels/src/ops/*/*.cu; do
  family=$(basename "$cu" .cu)
  gen="$out/gen/$family.cpp"
  {
    echo "#include \"emu.h\""
    echo "#include \"registry.h\""
    echo "#include \"$cu\""
    python3 "$here/kernels.py" "$cu"
  } >"$gen"
  "$cxx" "${flags[@]}" -c "$gen" -o "$out/gen/$family.o"
  objects+=("$out/gen/$family.o")
done
# The soname libcublas and libnccl look the driver up by (stream.h); not libcuda.so.1, which
# NVRTC looks for (and would then call driver functions the emulator lacks).
"$cxx" "${flags[@]}" -shared -Wl,-soname,libcuda.so -o "$out/libcuda.so" "$here/driver.cpp" "${objects[@]}"
"$cxx" "${flags[@]}" -shared -o "$out/libcublas.so" "$here/cublas.cpp" -ldl
"$cxx" "${flags[@]}" -shared -o "$out/libnccl.so" "$here/nccl.cpp" -lrt -ldl
echo "built $out/libcuda.so ($(grep -ho 'EMU_KERNEL' "$out"/gen/*.cpp | wc -l) kernels), libcublas.so and libnccl.so"
