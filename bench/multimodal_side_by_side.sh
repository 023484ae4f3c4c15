#!/usr/bin/env bash
# Several modalities side by side, on 2 threads: tessera's joint model (product of experts, its
# defaults) against scvi-tools' totalVI on a CITE-seq-like store (RNA + proteins, proteins
# missing in batch 1: 30% of the cells) and against MultiVI on a multiome-like store (RNA +
# binary peaks, peaks missing in a random 30% of the cells). Both stores are the hard scenario
# (`tessera simulate --scenario hard`); the same simulation without missing cells holds the
# ground truth of what is missing. Per seed and store: training cells/s, `tessera eval`'s scIB
# metrics of each joint embedding, and the imputation of the missing modality on the cells that
# lack it (mean per-feature Pearson correlation of log(1 + x); AUROC for peaks). Each tool at
# its defaults (scvi-tools': bench/scvi_multimodal.py), the same epochs and validation cells.
#
#   bash bench/multimodal_side_by_side.sh [--seeds 0,1,2] [--epochs 100] [--cells 5000]
#                                         [--proteins 100] [--peaks 2000] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
epochs=100 cells=5000 seeds=0 proteins=100 peaks=2000 work=target/multimodal-side-by-side
while [ $# -gt 0 ]; do
  case "$1" in
    --epochs) epochs=$2; shift 2 ;;
    --cells) cells=$2; shift 2 ;;
    --seeds|--seed) seeds=$2; shift 2 ;;
    --proteins) proteins=$2; shift 2 ;;
    --peaks) peaks=$2; shift 2 ;;
    --out) work=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
source bench/scvi_venv.sh
cargo build --release -q -p tessera-cli
tessera=target/release/tessera
py=("$venv/bin/python" -W ignore)
rm -rf "$work" && mkdir -p "$work"
export RAYON_NUM_THREADS=2 MATMUL_NUM_THREADS=2 OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
for seed in ${seeds//,/ }; do
  for kind in cite multiome; do
    run="$work/seed$seed/$kind"
    mkdir -p "$run"
    if [ "$kind" = cite ]; then
      features=(--proteins "$proteins") holes=(--missing-batches 1) anchor=totalvi modality=prot
    else
      features=(--peaks "$peaks") holes=(--missing 0.3) anchor=multivi modality=atac
    fi
    sim=(simulate --scenario hard --cells "$cells" --seed "$seed" "${features[@]}")
    "$tessera" "${sim[@]}" "$run/truth.zarr" >/dev/null 2>&1
    "$tessera" "${sim[@]}" "${holes[@]}" "$run/data.zarr" >/dev/null 2>&1
    "${py[@]}" bench/side_by_side_report.py config "$seed" 1 > "$run/tessera.toml"
    echo "== seed $seed, $kind: tessera ($epochs epochs)"
    "$tessera" train --data "$run/data.zarr" --config "$run/tessera.toml" --epochs "$epochs" --out "$run/tessera" \
      --denoised >/dev/null 2>"$run/tessera.log"
    echo "== seed $seed, $kind: scvi-tools $anchor"
    "${py[@]}" bench/scvi_multimodal.py "$anchor" --data "$run/data.zarr" --epochs "$epochs" --seed "$seed" \
      --validation-cells "$run/tessera/validation_cells.csv" > "$run/$anchor.json" 2>"$run/$anchor.log"
    for arm in tessera "$anchor"; do
      "$tessera" eval --data "$run/data.zarr" --embedding-key "X_$arm" --out "$run/$arm" >/dev/null 2>&1
    done
    "${py[@]}" bench/scvi_multimodal.py impute --data "$run/data.zarr" --truth "$run/truth.zarr" \
      --modality "$modality" --keys "tessera_denoised_$modality,${anchor}_denoised_$modality" > "$run/impute.json"
  done
done
"${py[@]}" bench/side_by_side_report.py multimodal "$work" ${seeds//,/ }
