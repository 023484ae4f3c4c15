"""scvi-tools' SCVI on an AnnData Zarr store, timed like `tessera train`: trains on the same
threads, writes the latent mean to obsm/<key> (consolidated, so every reader sees it) and
prints one JSON line: cells/s over the training call (validation each epoch included, as in
tessera's epoch times), the last epoch's alone (no start-up: what a long run sustains) and the
last epoch's validation ELBO terms. --accelerator gpu and the architecture options serve the
device check (bench/gpu/check.sh: the same store on the same GPU as `tessera train`); --key ''
writes nothing back.

With --labels-key (a partly labelled obs column, missing = unlabelled), scvi-tools' scANVI
workflow follows: SCANVI.from_scvi_model on the trained SCVI, trained for scvi-tools' default
epochs after pretraining (10 here); its latent goes to obsm/<key> and its predicted labels to
obs/<prediction-key>."""

import argparse
import json
import time

import anndata as ad
import numpy as np
import pandas as pd
import lightning
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
p.add_argument("--hidden", type=int, default=128)
p.add_argument("--latent", type=int, default=10)
p.add_argument("--batch-size", type=int, default=128)
p.add_argument("--accelerator", default="cpu", help="Lightning's: cpu or gpu")
p.add_argument("--load-sparse", action="store_true",
               help="scvi-tools' load_sparse_tensor: minibatches cross to the GPU as sparse tensors")
p.add_argument("--history", help="CSV to write the per-epoch validation ELBO terms to")
p.add_argument("--validation-cells", help="CSV with a `cell` column of obs rows to validate on (tessera's validation_cells.csv); default: scvi-tools' own random 10%%")
p.add_argument("--labels-key", help="partly labelled obs column: train scANVI after scVI")
p.add_argument("--prediction-key", default="prediction_scvi")
args = p.parse_args()


class EpochClock(lightning.pytorch.callbacks.Callback):
    """Wall seconds of each training epoch, its validation pass included (Lightning validates
    before on_train_epoch_end), as tessera's history.csv counts them."""

    def __init__(self):
        self.seconds = []

    def on_train_epoch_start(self, trainer, module):
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self.started)


torch.set_num_threads(args.threads)
scvi.settings.seed = args.seed
scvi.settings.dl_num_workers = 0
adata = ad.read_zarr(args.data)
batch_key = args.batch_key if args.batch_key in adata.obs else None
scvi.model.SCVI.setup_anndata(adata, batch_key=batch_key)
# scVI's defaults: 128 hidden, 10 latent, 1 layer, NB, gene dispersion, batch 128, Adam 1e-3.
model = scvi.model.SCVI(adata, n_hidden=args.hidden, n_latent=args.latent, n_layers=args.layers, gene_likelihood="nb")
split = {}
if args.validation_cells:
    held = np.loadtxt(args.validation_cells, delimiter=",", skiprows=1, dtype=np.int64, ndmin=1)
    train = np.setdiff1d(np.arange(adata.n_obs), held)
    # Both tools validate on the same cells: their validation ELBOs are then comparable.
    split = {"datasplitter_kwargs": {"external_indexing": [train, held]}}
clock = EpochClock()
common = dict(batch_size=args.batch_size, train_size=0.9, early_stopping=False, check_val_every_n_epoch=1,
              accelerator=args.accelerator, devices=1, enable_progress_bar=False, callbacks=[clock],
              load_sparse_tensor=args.load_sparse, **split)
started = time.perf_counter()
model.train(max_epochs=args.epochs, **common)
epochs = args.epochs
if args.labels_key:
    # scvi-tools marks unlabelled cells with a category; the store has missing values.
    labels = adata.obs[args.labels_key].astype("category")
    adata.obs[args.labels_key] = labels.cat.add_categories("Unknown").fillna("Unknown")
    model = scvi.model.SCANVI.from_scvi_model(model, unlabeled_category="Unknown", labels_key=args.labels_key)
    scanvi_epochs = 10  # scvi-tools' default after pretraining: min(10, max(2, heuristic / 3))
    model.train(max_epochs=scanvi_epochs, **common)
    epochs += scanvi_epochs
seconds = time.perf_counter() - started
n_train = len(model.train_indices)
history = model.history
last = lambda key: float(np.asarray(history[key]).ravel()[-1])
if args.history:
    keys = ["elbo_validation", "reconstruction_loss_validation", "kl_local_validation", "elbo_train"]
    table = {k: np.asarray(history[k]).ravel() for k in keys}
    with open(args.history, "w") as f:
        f.write("epoch," + ",".join(keys) + "\n")
        for e in range(len(table[keys[0]])):
            f.write(f"{e}," + ",".join(f"{table[k][e]:.6f}" for k in keys) + "\n")


def write_back():
    """The latent into obsm/<key> (and scANVI's predictions into obs), consolidated."""
    latent = model.get_latent_representation().astype(np.float32)
    group = zarr.open_group(args.data, mode="r+", use_consolidated=False)
    ad.io.write_elem(group["obsm"], args.key, latent)
    if args.labels_key:
        obs = ad.io.read_elem(group["obs"])
        obs[args.prediction_key] = pd.Categorical(model.predict(), categories=model._label_mapping)
        obs[args.prediction_key] = obs[args.prediction_key].cat.remove_categories(
            [c for c in ["Unknown"] if c in obs[args.prediction_key].cat.categories])
        ad.io.write_elem(group, "obs", obs)
    zarr.consolidate_metadata(args.data)


if args.key:
    write_back()
on = torch.cuda.get_device_name() if args.accelerator == "gpu" else f"{args.threads} threads"
print(json.dumps({
    "tool": f"scvi-tools {scvi.__version__} (torch {torch.__version__}, {on})",
    "model": ("SCANVI" if args.labels_key else "SCVI") + (", sparse minibatches" if args.load_sparse else ""),
    "epochs": epochs,
    "train_cells": n_train,
    "seconds": seconds,
    "cells_per_s": n_train * epochs / seconds,
    "last_epoch_cells_per_s": n_train / clock.seconds[-1],
    "validation_elbo": last("elbo_validation"),
    "validation_reconstruction": last("reconstruction_loss_validation"),
    "validation_kl": last("kl_local_validation"),
}))
