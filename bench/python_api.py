"""The Python package against scvi-tools and against the command line, in one run on the same
store and threads (run by bench/python_api.sh, in the scvi-tools venv with tessera installed):

- tessera.model.SCVI(adata).train() and scvi.model.SCVI(adata).train() on the same AnnData
  (scVI's defaults, early_stopping=False, the given epochs): training cells/s, from the call's
  wall time, data setup included, and the scIB scores of both embeddings (tessera.metrics.scib,
  the engine of `tessera eval`, against cell_type and batch);
- `tessera train` on the same store and settings: the wall time of the process (start-up and
  reading the store included), so the Python call's overhead is the difference.

Prints a table and one JSON line."""

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import scvi
import torch

import tessera

p = argparse.ArgumentParser()
p.add_argument("--data", required=True, help="an AnnData Zarr store with obs/batch")
p.add_argument("--epochs", type=int, default=100)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--tessera", default="target/release/tessera", help="the CLI binary")
args = p.parse_args()

torch.set_num_threads(args.threads)
scvi.settings.seed = args.seed
scvi.settings.dl_num_workers = 0
adata = ad.read_zarr(args.data)
n_train = adata.n_obs - int(np.floor(adata.n_obs * 0.1))
common = dict(max_epochs=args.epochs, batch_size=128, train_size=0.9, early_stopping=False,
              accelerator="cpu", enable_progress_bar=False)


def timed(train):
    started = time.perf_counter()
    train()
    return time.perf_counter() - started


# The same calls for both: only the module differs.
results = {}
for name, module in (("tessera.model.SCVI", tessera.model), ("scvi.model.SCVI", scvi.model)):
    copy = adata.copy()
    module.SCVI.setup_anndata(copy, batch_key="batch")
    model = module.SCVI(copy, n_hidden=128, n_latent=10, gene_likelihood="nb")
    kwargs = dict(common, seed=args.seed) if module is tessera.model else common
    seconds = timed(lambda: model.train(**kwargs))
    copy.obsm["X_embedding"] = model.get_latent_representation()
    scores = tessera.metrics.scib(copy, "X_embedding", "cell_type", "batch")["value"]
    results[name] = {"seconds": seconds, "cells_per_s": n_train * args.epochs / seconds,
                     "scib_total": scores["Total"], "bio": scores["Bio conservation"],
                     "batch": scores["Batch correction"]}

with tempfile.TemporaryDirectory() as tmp:
    config = Path(tmp) / "config.toml"
    # tessera.model.SCVI's settings: every epoch (no early stop), the seed.
    config.write_text(f"[train]\nseed = {args.seed}\nearly_stopping_patience = 1000000\n")
    store = Path(tmp) / "data.zarr"
    subprocess.run([args.tessera, "convert", args.data, str(store)], check=True,
                   capture_output=True)
    command = [args.tessera, "train", "--data", str(store), "--config", str(config), "--epochs",
               str(args.epochs), "--batch-key", "batch", "--out", str(Path(tmp) / "out")]
    seconds = timed(lambda: subprocess.run(command, check=True, capture_output=True))
    results["tessera train (CLI)"] = {"seconds": seconds,
                                      "cells_per_s": n_train * args.epochs / seconds}

anchor = results["scvi.model.SCVI"]["cells_per_s"]
print(f"{adata.n_obs} cells ({n_train} trained), {args.epochs} epochs, {args.threads} threads")
print(f"{'':24} {'seconds':>9} {'cells/s':>10} {'vs scvi-tools':>14} {'scIB total':>11}")
for name, r in results.items():
    total = f"{r['scib_total']:.4f}" if "scib_total" in r else "-"
    print(f"{name:24} {r['seconds']:9.2f} {r['cells_per_s']:10.0f} "
          f"{r['cells_per_s'] / anchor:13.1f}x {total:>11}")
overhead = results["tessera.model.SCVI"]["seconds"] - results["tessera train (CLI)"]["seconds"]
print(f"Python call - CLI process: {overhead:+.2f} s")
print(json.dumps({"cells": adata.n_obs, "epochs": args.epochs, "results": results,
                  "python_minus_cli_seconds": overhead}))
