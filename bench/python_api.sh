#!/usr/bin/env bash
# tessera's Python package against scvi-tools' in one process, and against `tessera train`, on a
# simulated hard-scenario store (bench/python_api.py). Installs the package into the scvi-tools
# venv (target/scvi-venv, bench/scvi_venv.sh) from a wheel built here.
#
#   bash bench/python_api.sh [--cells 10000] [--epochs 100] [--seed 0]
set -euo pipefail
cd "$(dirname "$0")/.."
cells=10000 epochs=100 seed=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cells) cells=$2; shift 2 ;;
    --epochs) epochs=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
source bench/scvi_venv.sh
cargo build --release -q -p tessera-cli
"$venv/bin/pip" install -q "maturin>=1.9,<2"
PATH="$PWD/$venv/bin:$PATH" "$venv/bin/pip" install -q --no-build-isolation --force-reinstall --no-deps ./python
work=target/python-api
rm -rf "$work" && mkdir -p "$work"
target/release/tessera simulate "$work/data.zarr" --scenario hard --cells "$cells" --seed "$seed" >/dev/null 2>&1
export RAYON_NUM_THREADS=2 MATMUL_NUM_THREADS=2 OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
"$venv/bin/python" -W ignore bench/python_api.py --data "$work/data.zarr" --epochs "$epochs" --seed "$seed"
