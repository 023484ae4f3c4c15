#!/usr/bin/env bash
# Fetches scvi-tools and what it imports beyond the GPU host's own Python (which has torch,
# lightning, numpy, pandas, scipy, h5py, xarray, numba, rich...) as wheels into .whl
# (git-ignored), for bench/gpu/check.sh's scvi-tools stage: carry ".whl" with the binaries
# (about 12 MB; with bench/gpu/bin's 13 MB under the device's 64 MiB). Versions: those of
# bench/requirements-scvi.txt and its venv. Needs pip and the package registry, not a GPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-python3}
out=.whl
rm -rf "$out"; mkdir -p "$out"
# The host's Python is 3.12 on x86-64.
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$out" scvi-tools==1.4.2 anndata==0.12.19 zarr==3.1.6 numcodecs==0.16.6 google-crc32c==1.9.0 \
  donfig==0.8.1.post1 array-api-compat==1.16.0 legacy-api-wrap==1.5 natsort==8.4.0 \
  scverse-misc==0.0.3 mudata==0.3.10 session-info2==0.4.1 ml-collections==1.1.0 \
  pyro-ppl==1.9.2 pyro-api==0.1.2 sparse==0.19.3
# docrep publishes only a source archive (pure Python): built here.
"$python" -m pip wheel -q --no-deps -w "$out" docrep==0.3.2
ls -la "$out"
du -ch "$out"/* | tail -1
