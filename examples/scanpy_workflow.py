"""A scanpy user's workflow with tessera in place of scvi-tools, on the shipped PBMC data.

    python examples/scanpy_workflow.py [--data STORE] [--epochs N] [--out DIR]

Loads the counts with anndata, trains tessera.model.SCVI, builds scanpy's neighbour graph and
UMAP on the embedding, scores it with tessera.metrics.scib and writes a UMAP coloured by cell
type (``<out>/umap_cell_type.png``) and the scores (``<out>/scib.csv``). CI runs it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import anndata as ad
import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import scanpy as sc

import tessera

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/pbmc68k_counts.zarr"))
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--out", default="tessera-out/scanpy_workflow")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    adata = ad.read_zarr(args.data)  # raw counts in X, cell types in obs["cell_type"]

    # Exactly as with scvi-tools, with tessera.model in place of scvi.model.
    tessera.model.SCVI.setup_anndata(adata)
    model = tessera.model.SCVI(adata, n_latent=10)
    model.train(max_epochs=args.epochs, progress_bar=False)
    adata.obsm["X_tessera"] = model.get_latent_representation()
    last = model.history["elbo_validation"].iloc[-1, 0]
    print(f"trained {args.epochs} epochs: validation ELBO {last:.1f}")

    sc.pp.neighbors(adata, use_rep="X_tessera")
    sc.tl.umap(adata, random_state=0)
    sc.settings.figdir = out
    sc.pl.umap(adata, color="cell_type", save="_cell_type.png", show=False)

    scores = tessera.metrics.scib(adata, "X_tessera", "cell_type")
    scores.to_csv(out / "scib.csv")
    print(scores.to_string())
    print(f"wrote {out / 'umap_cell_type.png'} and {out / 'scib.csv'}")


if __name__ == "__main__":
    main()
