#!/usr/bin/env bash
# Models moved between tessera and scvi-tools 1.4.2 (pinned in bench/requirements-scvi.txt, its
# own venv in target/scvi-venv): tessera.model.SCVI trained and written with save_scvi_tools,
# read by scvi.model.SCVI.load; scvi.model.SCVI trained and saved, read by
# tessera.model.SCVI.load. Prints, per direction, the largest difference between what the
# training tool and the reading tool compute with the same model: latent means and the
# decoder's proportions at them. On a simulated hard-scenario store (10,000 cells, ZINB,
# scvi-tools' defaults).
#
#   bash bench/scvi_interop.sh [--cells 10000] [--epochs 20] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
cells=10000 epochs=20 out=target/scvi-interop
while [ $# -gt 0 ]; do
  case "$1" in
    --cells) cells=$2; shift 2 ;;
    --epochs) epochs=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
source bench/scvi_venv.sh
cargo build --release -q -p tessera-cli
rm -rf "$out" && mkdir -p "$out"
target/release/tessera simulate "$out/data.zarr" --scenario hard --cells "$cells" --seed 0 >/dev/null 2>&1
tessera_py=.venv/bin/python
py=bench/scvi_interop.py
"$tessera_py" -W ignore "$py" tessera-train "$out/data.zarr" "$out" "$epochs"
"$venv/bin/python" -W ignore "$py" scvi-train "$out/data.zarr" "$out" "$epochs" 2>"$out/scvi.log"
"$venv/bin/python" -W ignore "$py" scvi-read "$out/data.zarr" "$out" 2>>"$out/scvi.log"
"$tessera_py" -W ignore "$py" tessera-read "$out/data.zarr" "$out"
"$tessera_py" "$py" report "$out"
