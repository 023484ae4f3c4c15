#!/usr/bin/env bash
# The CUDA side of the tests on the CPU, under the emulated driver (kernels/emu): the unit tests
# of kernels, the kernel and whole-model parity tests and NCCL's with the kernels
# under AddressSanitizer, then `train --device cuda` (one GPU, and two workers over NCCL)
# against the CPU (cli/tests/emulated_cuda.rs). NVRTC must be on
# LD_LIBRARY_PATH (as .ci/run sets it). Extra arguments go to cargo (CI: --all-features --locked).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash kernels/emu/build.sh
bash kernels/emu/build.sh --asan
export TESSERA_REQUIRE_DEVICE=1
# The test binaries, built by cargo first: the sanitizer is preloaded into them only (rustc and
# cargo run without it).
binaries() { # cargo test's target selection -> the test executables
  cargo test "${cargo_args[@]}" --no-run --message-format=json "$@" | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])'
}
cargo_args=("$@")
tests="$(binaries -p tessera-kernels --lib --test cuda_parity)
$(binaries -p tessera-models --test cuda_parity)
$(binaries -p tessera-worker --test nccl)"
asan=$(${CXX:-g++} -print-file-name=libasan.so)
for test in $tests; do
  echo "== $(basename "$test") on the emulated driver, kernels under AddressSanitizer"
  LD_PRELOAD="$asan" ASAN_OPTIONS=detect_leaks=0 \
    LD_LIBRARY_PATH="$PWD/target/cuda-emu-asan:$LD_LIBRARY_PATH" "$test" --show-output
done
# --workspace: the workspace run's features, so nothing is built again.
TESSERA_CUDA_EMULATOR="$PWD/target/cuda-emu" \
  cargo test "${cargo_args[@]}" --workspace --test emulated_cuda -- --show-output
