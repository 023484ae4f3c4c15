#!/usr/bin/env bash
# The CUDA side of the tests on the CPU, under the emulated driver (kernels/emu): the unit tests
# of kernels, the kernel and whole-model parity tests and NCCL's with the kernels
# under AddressSanitizer and the device's work deferred (TESSERA_EMU_DEFER=1: run when the host
# or another stream waits for it, as late as a GPU may run it), then `train --device cuda` (one
# GPU, and two workers over NCCL) against the CPU (cli/tests/emulated_cuda.rs), with the work run
# at once and then deferred: the two extremes of when a GPU runs what the host queued. NVRTC must be on
# LD_LIBRARY_PATH (as .ci/run sets it). Extra arguments go to cargo (CI: --all-features --locked).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash kernels/emu/build.sh
bash kernels/emu/build.sh --asan
export TESSERA_REQUIRE_DEVICE=1
# The test binaries, built by cargo first: the sanitizer is preloaded into them only (rustc and
# cargo run without it).
# --workspace throughout: the workspace run's features, so nothing is built again; the filter
# keeps kernels' unit tests, both parity tests and NCCL's.
binaries() { # cargo test's target selection -> the test executables
  cargo test "${cargo_args[@]}" --workspace --no-run --message-format=json "$@" | python3 -c '
import json, sys
wanted = {("lib", "tessera_kernels"), ("test", "cuda_parity"), ("test", "nccl")}
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    if m["profile"]["test"] and (m["target"]["kind"][0], m["target"]["name"]) in wanted:
        print(m["executable"])'
}
cargo_args=("$@")
tests=$(binaries --lib --test cuda_parity --test nccl)
asan=$(${CXX:-g++} -print-file-name=libasan.so)
for test in $tests; do
  echo "== $(basename "$test") on the emulated driver, deferred, kernels under AddressSanitizer"
  # TESSERA_CUDA_POISON: a reused buffer reads NaN, as fresh emulated memory does (an op
  # reading what it did not write fails parity instead of reading an earlier step's values).
  TESSERA_EMU_DEFER=1 TESSERA_CUDA_POISON=1 LD_PRELOAD="$asan" ASAN_OPTIONS=detect_leaks=0 \
    LD_LIBRARY_PATH="$PWD/target/cuda-emu-asan:$LD_LIBRARY_PATH" "$test" --show-output
done
for defer in 0 1; do
  echo "== emulated_cuda, TESSERA_EMU_DEFER=$defer"
  TESSERA_EMU_DEFER=$defer TESSERA_CUDA_EMULATOR="$PWD/target/cuda-emu" \
    cargo test "${cargo_args[@]}" --workspace --test emulated_cuda -- --show-output
done
