#!/usr/bin/env bash
# Builds what bench/gpu/check.sh runs on a bare GPU host (no Rust, no HDF5, no network): the
# tessera binary without default features (no HDF5) and the test binaries that touch a GPU,
# stripped and xz-compressed, and the Python package's wheel, into bench/gpu/bin (git-ignored;
# the device tool carries it; check.sh unpacks them). Prints their sizes: with .whl (wheels.sh)
# they must stay under 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=bench/gpu/bin
rm -rf "$out"; mkdir -p "$out"
cargo build --release --locked --no-default-features -p tessera-cli
cp target/release/tessera "$out/tessera"
# The test binaries: their paths from cargo's JSON messages (the hash in the name changes).
cargo test --release --locked --no-default-features --no-run \
  -p tessera-kernels --test cuda_parity -p tessera-models --test cuda_parity \
  -p tessera-worker --test nccl --message-format=json 2>/dev/null |
  python3 -c '
import json, sys, shutil
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        crate = m["package_id"].split("#")[0].rsplit("/", 1)[-1].replace("tessera-", "")
        name = m["target"]["name"]
        shutil.copy(m["executable"], "'"$out"'/" + crate + "_" + name)
'
strip "$out"/*
# Compressed for the trip (48 MB stripped, ~13 MB as .xz; check.sh unpacks them): the device
# takes 64 MiB in all, scvi-tools' wheels (.whl, wheels.sh) included.
xz -T0 -6 "$out"/*
# The Python package as a wheel (its module stripped; no HDF5 either), for the check's Python
# stage, installed there with pip --target beside scvi-tools' wheels (~10 MB, zipped already).
if command -v "${MATURIN:-maturin}" >/dev/null; then
  "${MATURIN:-maturin}" build --release --strip --locked -m python/Cargo.toml --compatibility linux --out "$out"
else
  echo "no maturin (pip install maturin, or set MATURIN): the check's Python stage will be skipped" >&2
fi
ls -la "$out"
du -ch "$out"/* | tail -1
