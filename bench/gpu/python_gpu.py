"""The Python package's training on a device, for bench/gpu/check.sh: tessera.model.SCVI on an
AnnData Zarr store with scVI's defaults for a few epochs on ``--accelerator`` (gpu: the GPU
through the package's own engine), then its latent. Prints one JSON line: training cells/s
over the train call (data setup included), the last epoch's training ELBO, and whether every
latent value is finite with the expected shape."""

import argparse
import json
import time

import anndata as ad
import numpy as np

import tessera

p = argparse.ArgumentParser()
p.add_argument("--data", required=True, help="an AnnData Zarr store with obs/batch")
p.add_argument("--epochs", type=int, default=2)
p.add_argument("--accelerator", default="gpu")
args = p.parse_args()

adata = ad.read_zarr(args.data)
tessera.model.SCVI.setup_anndata(adata, batch_key="batch")
model = tessera.model.SCVI(adata)
started = time.perf_counter()
model.train(max_epochs=args.epochs, accelerator=args.accelerator, early_stopping=False,
            enable_progress_bar=False)
seconds = time.perf_counter() - started
latent = model.get_latent_representation()
n_train = adata.n_obs - int(np.floor(adata.n_obs * 0.1))
print(json.dumps({
    "tool": f"tessera {tessera.__version__} Python ({args.accelerator})",
    "cells_per_s": n_train * args.epochs / seconds,
    "elbo_train": float(model.history["elbo_train"].iloc[-1, 0]),
    "latent_ok": bool(latent.shape == (adata.n_obs, 10) and np.isfinite(latent).all()),
}))
