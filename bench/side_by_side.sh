#!/usr/bin/env bash
# Side by side on the same stores and 2 threads: scvi-tools' SCVI and tessera's VAE at scVI's
# size (128 hidden, 10 latent, NB, batch 128, Adam 1e-3, KL warm-up 400 epochs), over several
# seeds: training cells/s, the validation ELBO terms (both over tessera's held-out cells) and
# `tessera eval`'s scIB metrics of every embedding, per seed and as mean ± sd, their paired
# differences with 95% intervals, and tessera's weights run inside scvi-tools (the same latent
# and -ELBO if both compute the same model: bench/scvi_weights.py). Installs
# scvi-tools (pinned, bench/requirements-scvi.txt; ~6 GB with torch) in target/scvi-venv on
# first use.
#
#   bash bench/side_by_side.sh [--scenario hard|standard] [--data STORE_OR_H5AD] [--seeds 0,1,2]
#                              [--epochs 100] [--cells 10000] [--layers 1] [--batch-key batch]
#                              [--recipe RECIPE.toml] [--labels FRACTION] [--out DIR]
#
# Simulated stores (default: the hard scenario, `tessera simulate --scenario hard`) are drawn
# anew per seed; with --data the same store is trained with each seed. --layers 2 is the Census
# architecture. --recipe adds a third arm: tessera with the recipe's settings merged over the
# seed's (e.g. bench/recipes/hard.toml). --labels 0.3 keeps cell_type in 30% of the cells
# (obs/cell_type_partial) and compares scANVI-style training (bench/recipes/scanvi.toml over each
# tessera arm) with scvi-tools' SCANVI (after its SCVI); scIB is then scored on the full
# cell_type and each arm's accuracy on the unlabelled cells is reported.
set -euo pipefail
# Each tool's log goes to its run folder (seedN/<arm>.log).
cd "$(dirname "$0")/.."
epochs=100 cells=10000 data="" seeds=0,1,2 scenario=hard layers=1 batch_key=batch recipe="" labels="" work=target/side-by-side
while [ $# -gt 0 ]; do
  case "$1" in
    --epochs) epochs=$2; shift 2 ;;
    --cells) cells=$2; shift 2 ;;
    --data) data=$2; shift 2 ;;
    --seeds|--seed) seeds=$2; shift 2 ;;
    --scenario) scenario=$2; shift 2 ;;
    --layers) layers=$2; shift 2 ;;
    --batch-key) batch_key=$2; shift 2 ;;
    --recipe) recipe=$2; shift 2 ;;
    --labels) labels=$2; shift 2 ;;
    --out) work=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
source bench/scvi_venv.sh
cargo build --release -q -p tessera-cli
tessera=target/release/tessera
report=bench/side_by_side_report.py
rm -rf "$work" && mkdir -p "$work"
export RAYON_NUM_THREADS=2 MATMUL_NUM_THREADS=2 OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
arms=tessera
[ -z "$recipe" ] || arms=tessera,recipe
# Partial labels: every tessera arm trains the classifier on them; scvi-tools trains SCANVI.
supervised=() label_args=() scvi_labels=()
if [ -n "$labels" ]; then
  supervised=(bench/recipes/scanvi.toml)
  scvi_labels=(--labels-key cell_type_partial --prediction-key prediction_scvi)
fi
for seed in ${seeds//,/ }; do
  run="$work/seed$seed"
  mkdir -p "$run"
  # A private copy per seed: every arm writes its embedding into it.
  if [ -z "$data" ]; then
    "$tessera" simulate "$run/data.zarr" --scenario "$scenario" --cells "$cells" --seed "$seed" >/dev/null 2>&1
  else
    "$tessera" convert "$data" "$run/data.zarr" >/dev/null 2>&1
  fi
  [ -z "$labels" ] || "$venv/bin/python" -W ignore "$report" partial-labels "$run/data.zarr" "$labels" "$seed"
  for arm in ${arms//,/ }; do
    extra=""
    [ "$arm" = tessera ] || extra=$recipe
    "$venv/bin/python" "$report" config "$seed" "$layers" "$extra" "${supervised[@]}" > "$run/$arm.toml"
    [ -z "$labels" ] || label_args=(--label-key cell_type_partial --prediction-key "prediction_$arm")
    echo "== seed $seed: $arm ($epochs epochs, $layers layer(s))"
    "$tessera" train --data "$run/data.zarr" --config "$run/$arm.toml" --epochs "$epochs" --out "$run/$arm" \
      --embedding-key "X_$arm" "${label_args[@]}" >/dev/null 2>"$run/$arm.log"
    # Scored on every cell's type, not the partial labels the run trained on.
    [ -z "$labels" ] || "$tessera" eval --data "$run/data.zarr" --embedding-key "X_$arm" --label-key cell_type \
      --out "$run/$arm" >/dev/null 2>&1
  done
  echo "== seed $seed: scvi-tools"
  # On tessera's held-out cells (the same for every arm: they depend on the seed), so the
  # validation ELBOs are over the same cells.
  "$venv/bin/python" bench/scvi_train.py --data "$run/data.zarr" --epochs "$epochs" --threads 2 --seed "$seed" \
    --layers "$layers" --batch-key "$batch_key" --validation-cells "$run/tessera/validation_cells.csv" \
    --history "$run/scvi_history.csv" "${scvi_labels[@]}" > "$run/scvi.json" 2>"$run/scvi.log"
  "$tessera" eval --data "$run/data.zarr" --embedding-key X_scvi --out "$run/scvi" >/dev/null 2>&1
  # tessera's trained weights inside scvi-tools' SCVI: the same latent and -ELBO if the two
  # compute the same model (scVI's layout only: not with labels).
  [ -n "$labels" ] || "$venv/bin/python" -W ignore bench/scvi_weights.py --data "$run/data.zarr" \
    --model "$run/tessera" --batch-key "$batch_key" > "$run/tessera/in_scvi.json" 2>>"$run/scvi.log"
done
"$venv/bin/python" "$report" report "$work" "$arms,scvi" ${seeds//,/ }
