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
# --recipe FILE adds a third arm: tessera with the recipe's settings (on its own copy of the
# store), e.g. bench/recipes/missing_modality.toml. --anchor-defaults trains the scvi-tools
# models for their own default epochs with their early stopping instead.
#
#   bash bench/multimodal_side_by_side.sh [--seeds 0,1,2] [--epochs 100] [--cells 5000]
#                                         [--proteins 100] [--peaks 2000] [--recipe FILE]
#                                         [--anchor-defaults] [--only cite|multiome] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
epochs=100 cells=5000 seeds=0 proteins=100 peaks=2000 recipe="" anchor_args=() kinds="cite multiome"
work=target/multimodal-side-by-side
while [ $# -gt 0 ]; do
  case "$1" in
    --epochs) epochs=$2; shift 2 ;;
    --cells) cells=$2; shift 2 ;;
    --seeds|--seed) seeds=$2; shift 2 ;;
    --proteins) proteins=$2; shift 2 ;;
    --peaks) peaks=$2; shift 2 ;;
    --recipe) recipe=$2; shift 2 ;;
    --anchor-defaults) anchor_args=(--defaults); shift ;;
    --only) kinds=$2; shift 2 ;;
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
  for kind in $kinds; do
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
    arms=tessera
    # The recipe arm writes its outputs into its own copy of the store.
    [ -z "$recipe" ] || { arms="tessera recipe"; cp -r "$run/data.zarr" "$run/recipe.zarr"; }
    for arm in $arms; do
      store="$run/data.zarr" extra=""
      [ "$arm" = tessera ] || { store="$run/recipe.zarr" extra=$recipe; }
      "${py[@]}" bench/side_by_side_report.py config "$seed" 1 "$extra" > "$run/$arm.toml"
      echo "== seed $seed, $kind: $arm ($epochs epochs)"
      "$tessera" train --data "$store" --config "$run/$arm.toml" --epochs "$epochs" --out "$run/$arm" \
        --embedding-key "X_$arm" --denoised >/dev/null 2>"$run/$arm.log"
      "${py[@]}" bench/scvi_multimodal.py impute --data "$store" --truth "$run/truth.zarr" --modality "$modality" \
        --key "tessera_denoised_$modality" > "$run/$arm/impute.json"
    done
    echo "== seed $seed, $kind: scvi-tools $anchor"
    mkdir -p "$run/$anchor"
    "${py[@]}" bench/scvi_multimodal.py "$anchor" --data "$run/data.zarr" --epochs "$epochs" --seed "$seed" \
      --validation-cells "$run/tessera/validation_cells.csv" "${anchor_args[@]}" > "$run/$anchor.json" 2>"$run/$anchor.log"
    "${py[@]}" bench/scvi_multimodal.py impute --data "$run/data.zarr" --truth "$run/truth.zarr" --modality "$modality" \
      --key "${anchor}_denoised_$modality" > "$run/$anchor/impute.json"
    for arm in $arms "$anchor"; do
      store="$run/data.zarr"
      [ "$arm" != recipe ] || store="$run/recipe.zarr"
      "$tessera" eval --data "$store" --embedding-key "X_$arm" --out "$run/$arm" >/dev/null 2>&1
    done
  done
done
"${py[@]}" bench/side_by_side_report.py multimodal "$work" "${kinds// /,}" ${seeds//,/ }
