#!/usr/bin/env bash
# UMAP of one embedding by tessera (`tessera plot`, laid out in Rust) and by umap-learn with
# scanpy's defaults (what `sc.pp.neighbors` + `sc.tl.umap` run: pynndescent, then umap-learn's
# SGD) side by side on the same cells
# and 2 threads: seconds, cells/s, and how well each 2-D layout keeps the embedding's 15 nearest
# neighbours and its cell types. The embedding is the ground-truth latent of a simulated hard
# scenario (4 lineages x 3 subtypes), so nothing depends on a model.
#
#   bash bench/umap_side_by_side.sh [CELLS=20000]
set -euo pipefail
cd "$(dirname "$0")/.."
cells=${1:-20000}
python=${TESSERA_PYTHON:-.venv/bin/python}
[ -x "$python" ] || bash .ci/setup
cargo build --release -q -p tessera-cli
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export RAYON_NUM_THREADS=2 NUMBA_NUM_THREADS=2 OMP_NUM_THREADS=2
target/release/tessera simulate "$work/sim.zarr" --scenario hard --cells "$cells" --genes 100 >/dev/null
start=$(date +%s.%N)
target/release/tessera plot --data "$work/sim.zarr" --embedding-key X_true_latent --max-cells 0 \
  --obsm-key X_umap --out "$work/tessera.png"
seconds=$(echo "$(date +%s.%N) - $start" | bc)
"$python" bench/umap_learn.py "$work/sim.zarr" "$seconds"
