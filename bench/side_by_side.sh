#!/usr/bin/env bash
# Side by side on one store and the same 2 threads: scvi-tools' SCVI and tessera's VAE at scVI's
# size (2,000 genes, 128 hidden, 10 latent, NB, batch 128, Adam 1e-3, KL warm-up 400 epochs):
# training cells/s, the last epoch's validation ELBO, and `tessera eval`'s scIB metrics of both
# embeddings. Installs scvi-tools (pinned, bench/requirements-scvi.txt; ~6 GB with torch) in
# target/scvi-venv on first use.
#
#   bash bench/side_by_side.sh [--epochs 100] [--cells 10000] [--data STORE_OR_H5AD] [--seed 0]
#
# Without --data the store is simulated (3 batches, 8 cell types, the main job's default).
set -euo pipefail
cd "$(dirname "$0")/.."
epochs=100 cells=10000 data="" seed=0
while [ $# -gt 0 ]; do
  case "$1" in
    --epochs) epochs=$2; shift 2 ;;
    --cells) cells=$2; shift 2 ;;
    --data) data=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
work=target/side-by-side
source bench/scvi_venv.sh
cargo build --release -q -p tessera-cli
tessera=target/release/tessera
rm -rf "$work" && mkdir -p "$work"
# A private copy: both tools write their embedding into it.
if [ -z "$data" ]; then
  "$tessera" simulate "$work/data.zarr" --cells "$cells" --genes 2000 --batches 3 >/dev/null
else
  "$tessera" convert "$data" "$work/data.zarr" >/dev/null
fi
export RAYON_NUM_THREADS=2 MATMUL_NUM_THREADS=2 OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
echo "== tessera ($epochs epochs)"
printf '[train]\nseed = %d\n' "$seed" > "$work/seed.toml"
"$tessera" train --data "$work/data.zarr" --config "$work/seed.toml" --epochs "$epochs" --out "$work/tessera" | tail -n +1
echo "== scvi-tools ($epochs epochs)"
# On tessera's held-out cells, so the two validation ELBOs are over the same cells.
"$venv/bin/python" bench/scvi_train.py --data "$work/data.zarr" --epochs "$epochs" --threads 2 --seed "$seed" --validation-cells "$work/tessera/validation_cells.csv" > "$work/scvi.json"
"$tessera" eval --data "$work/data.zarr" --embedding-key X_scvi --out "$work/scvi" >/dev/null
"$venv/bin/python" - "$work" <<'PY'
import csv, json, sys
work = sys.argv[1]
rows = list(csv.DictReader(open(f"{work}/tessera/history.csv")))
seconds = sum(float(r["seconds"]) for r in rows)
cells = sum(float(r["cells_per_second"]) * float(r["seconds"]) for r in rows)
last = rows[-1]
ours = {"cells_per_s": cells / seconds, "validation_elbo": float(last["validation_reconstruction"]) + float(last["validation_kl"])}
scvi = json.load(open(f"{work}/scvi.json"))
ev = {k: json.load(open(f"{work}/{k}/eval.json"))["scores"] for k in ("tessera", "scvi")}
print(f"\n{'':28}{'tessera':>12}{'scvi-tools':>12}")
print(f"{'training cells/s':28}{ours['cells_per_s']:>12.0f}{scvi['cells_per_s']:>12.0f}   ({ours['cells_per_s'] / scvi['cells_per_s']:.2f}x)")
print(f"{'validation -ELBO (last)':28}{ours['validation_elbo']:>12.2f}{scvi['validation_elbo']:>12.2f}")
for key, name in [("silhouette_label", "cell-type ASW"), ("nmi", "NMI"), ("ari", "ARI"), ("clisi", "cLISI"),
                  ("silhouette_batch", "batch ASW"), ("ilisi", "iLISI"), ("graph_connectivity", "graph connectivity"),
                  ("bio_conservation", "bio conservation"), ("batch_correction", "batch correction"), ("total", "scIB total")]:
    a, b = ev["tessera"][key], ev["scvi"][key]
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"
    print(f"{name:28}{fmt(a):>12}{fmt(b):>12}")
print(f"\n{scvi['tool']}; results in {work}/")
PY
