#!/usr/bin/env bash
# Query mapping side by side on the same 2 threads: one simulated world split by batch into a
# reference (batches 0-1) and a query (batch 2, new); tessera (`train`, then `map`) and
# scvi-tools (SCVI with encode_covariates, then load_query_data + train), each on its own
# reference model with the same architecture and epochs: seconds to map the query and the label
# agreement of scArches' weighted kNN with the query's true cell types. Uses the pinned
# scvi-tools venv of bench/side_by_side.sh (target/scvi-venv).
#
#   bash bench/query_side_by_side.sh [--reference-cells 10000] [--query-cells 3000] \
#       [--genes 2000] [--reference-epochs 50] [--query-epochs 50]
set -euo pipefail
cd "$(dirname "$0")/.."
ref_cells=10000 query_cells=3000 genes=2000 ref_epochs=50 query_epochs=50
while [ $# -gt 0 ]; do
  case "$1" in
    --reference-cells) ref_cells=$2; shift 2 ;;
    --query-cells) query_cells=$2; shift 2 ;;
    --genes) genes=$2; shift 2 ;;
    --reference-epochs) ref_epochs=$2; shift 2 ;;
    --query-epochs) query_epochs=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
work=target/query-side-by-side
source bench/scvi_venv.sh
cargo build --release -q -p tessera-cli
tessera=target/release/tessera
rm -rf "$work" && mkdir -p "$work"
"$tessera" simulate "$work/reference.zarr" --cells "$ref_cells" --genes "$genes" --batches 3 --only-batches 0,1 --seed 11 >/dev/null
"$tessera" simulate "$work/query.zarr" --cells "$query_cells" --genes "$genes" --batches 3 --only-batches 2 --seed 11 >/dev/null
export RAYON_NUM_THREADS=2 MATMUL_NUM_THREADS=2 OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
printf '[model]\nencode_covariates = true\n' > "$work/reference.toml"
echo "== tessera"
"$tessera" train --data "$work/reference.zarr" --config "$work/reference.toml" --batch-key batch --label-key cell_type --epochs "$ref_epochs" --out "$work/model" >/dev/null
started=$(date +%s.%N)
"$tessera" map --model "$work/model" --data "$work/query.zarr" --epochs "$query_epochs" --out "$work/map"
echo "$(date +%s.%N) - $started" | bc > "$work/tessera_map_seconds"
echo "== scvi-tools"
"$venv/bin/python" bench/scvi_query.py --reference "$work/reference.zarr" --query "$work/query.zarr" --reference-epochs "$ref_epochs" --query-epochs "$query_epochs" --threads 2 | tee "$work/scvi.json"
"$venv/bin/python" - "$work" <<'PY'
import json, sys
work = sys.argv[1]
ours = json.load(open(f"{work}/map/map.json"))
# scvi-tools logs to stdout too: its report is the last line.
theirs = json.loads(open(f"{work}/scvi.json").read().strip().splitlines()[-1])
# The whole `tessera map` process (reading, surgery, fine-tuning, transfer, writing) against
# scvi-tools' load_query_data + train + latent + transfer (its reading not counted).
tessera_s = float(open(f"{work}/tessera_map_seconds").read())
print(f"\n{'':34}{'tessera':>12}{'scvi-tools':>12}")
print(f"{'map the query (s)':34}{tessera_s:>12.2f}{theirs['query_seconds'] + theirs['transfer_seconds']:>12.2f}   ({(theirs['query_seconds'] + theirs['transfer_seconds']) / tessera_s:.1f}x)")
print(f"{'label agreement (weighted kNN)':34}{ours['label_accuracy']:>12.4f}{theirs['label_accuracy']:>12.4f}")
print(f"\n{theirs['tool']}; results in {work}/")
PY
