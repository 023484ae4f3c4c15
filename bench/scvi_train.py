"""scvi-tools' SCVI on an AnnData Zarr store, timed like `tessera train`: trains on the same
threads, writes the latent mean to obsm/<key> (consolidated, so every reader sees it) and
prints one JSON line: cells/s over the training call (validation each epoch included, as in
tessera's epoch times) and the last epoch's validation ELBO terms."""

import argparse
import json
import time

import anndata as ad
import numpy as np
import scvi
import torch
import zarr

p = argparse.ArgumentParser()
p.add_argument("--data", required=True)
p.add_argument("--epochs", type=int, required=True)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--batch-key", default="batch")
p.add_argument("--key", default="X_scvi")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--layers", type=int, default=1)
p.add_argument("--history", help="CSV to write the per-epoch validation ELBO terms to")
p.add_argument("--validation-cells", help="CSV with a `cell` column of obs rows to validate on (tessera's validation_cells.csv); default: scvi-tools' own random 10%%")
args = p.parse_args()

torch.set_num_threads(args.threads)
scvi.settings.seed = args.seed
scvi.settings.dl_num_workers = 0
adata = ad.read_zarr(args.data)
batch_key = args.batch_key if args.batch_key in adata.obs else None
scvi.model.SCVI.setup_anndata(adata, batch_key=batch_key)
# scVI's defaults: 128 hidden, 10 latent, 1 layer, NB, gene dispersion, batch 128, Adam 1e-3.
model = scvi.model.SCVI(adata, n_hidden=128, n_latent=10, n_layers=args.layers, gene_likelihood="nb")
split = {}
if args.validation_cells:
    held = np.loadtxt(args.validation_cells, delimiter=",", skiprows=1, dtype=np.int64, ndmin=1)
    train = np.setdiff1d(np.arange(adata.n_obs), held)
    # Both tools validate on the same cells: their validation ELBOs are then comparable.
    split = {"datasplitter_kwargs": {"external_indexing": [train, held]}}
started = time.perf_counter()
model.train(
    max_epochs=args.epochs,
    batch_size=128,
    train_size=0.9,
    early_stopping=False,
    check_val_every_n_epoch=1,
    accelerator="cpu",
    enable_progress_bar=False,
    **split,
)
seconds = time.perf_counter() - started
n_train = len(model.train_indices)
history = model.history
last = lambda key: float(np.asarray(history[key]).ravel()[-1])
if args.history:
    keys = ["elbo_validation", "reconstruction_loss_validation", "kl_local_validation"]
    table = {k: np.asarray(history[k]).ravel() for k in keys}
    with open(args.history, "w") as f:
        f.write("epoch," + ",".join(keys) + "\n")
        for e in range(len(table[keys[0]])):
            f.write(f"{e}," + ",".join(f"{table[k][e]:.6f}" for k in keys) + "\n")
latent = model.get_latent_representation().astype(np.float32)

group = zarr.open_group(args.data, mode="r+", use_consolidated=False)
ad.io.write_elem(group["obsm"], args.key, latent)
zarr.consolidate_metadata(args.data)
print(json.dumps({
    "tool": f"scvi-tools {scvi.__version__} (torch {torch.__version__}, {args.threads} threads)",
    "epochs": args.epochs,
    "train_cells": n_train,
    "seconds": seconds,
    "cells_per_s": n_train * args.epochs / seconds,
    "validation_elbo": last("elbo_validation"),
    "validation_reconstruction": last("reconstruction_loss_validation"),
    "validation_kl": last("kl_local_validation"),
}))
