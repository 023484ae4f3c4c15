"""scvi-tools' multimodal models on tessera's simulated MuData stores, and the scores of the
multimodal side by side (bench/multimodal_side_by_side.sh).

  totalvi  --data STORE --epochs E --seed S --validation-cells CSV [--defaults]
      TOTALVI on mod/rna with mod/prot as its protein matrix (zeros where a cell lacks it:
      totalVI treats a batch without protein as missing). Writes the latent mean to the root's
      obsm/X_totalvi and the imputed proteins, (1 - pi) alpha beta at each cell's own batch, to
      obsm/totalvi_denoised_prot; prints one JSON line (seconds, cells/s).
  multivi  --data STORE --epochs E --seed S --validation-cells CSV
      MULTIVI on mod/rna and mod/atac (zeros where a cell lacks accessibility: MultiVI's mask).
      Writes obsm/X_multivi and obsm/multivi_denoised_atac (accessibility probabilities).
  impute   --data STORE --truth FULL --modality M --key K
      Scores the root's obsm/<K> (every cell's imputed modality M) on the cells that lack M in
      STORE against their counts in FULL (the same simulation without missing cells): the mean
      over features of the Pearson correlation of log(1 + x) with the imputation, and, for
      binary accessibility, the AUROC over all (cell, peak) entries. Prints one JSON object.

Both models train at scvi-tools' defaults except the epochs (every epoch, no early stopping, as
tessera trains here; --defaults: the model's own default epochs and early stopping) and the
validation cells (tessera's, so the split is the same).
"""

import argparse
import json
import time

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr


def modality_dense(mdata, name):
    """n_obs x features of modality `name` in global cell order, zeros where a cell lacks it,
    and the mask of cells that have it."""
    m = mdata.mod[name]
    rows = np.asarray(mdata.obsmap[name]).astype(np.int64)
    present = rows > 0
    x = m.X.toarray() if sp.issparse(m.X) else np.asarray(m.X)
    out = np.zeros((mdata.n_obs, m.n_vars), dtype=np.float32)
    out[present] = x[rows[present] - 1]
    return out, present


def split(n_obs, validation_cells):
    held = np.loadtxt(validation_cells, delimiter=",", skiprows=1, dtype=np.int64, ndmin=1)
    return [np.setdiff1d(np.arange(n_obs), held), held]


def write_root_obsm(store, arrays):
    group = zarr.open_group(store, mode="r+", use_consolidated=False)
    for key, value in arrays.items():
        ad.io.write_elem(group["obsm"], key, np.asarray(value, dtype=np.float32))
    zarr.consolidate_metadata(store)


def rna_anndata(mdata):
    rna, _ = modality_dense(mdata, "rna")
    adata = ad.AnnData(X=sp.csr_matrix(rna), obs=pd.DataFrame(index=mdata.obs_names.astype(str)))
    adata.obs["batch"] = mdata.obs["batch"].astype(str).values
    return adata


def train(model, args, indexing, **split_kwargs):
    """Trains on the given split (TOTALVI takes it as its own argument, MULTIVI through its data
    splitter): every one of --epochs, or with --defaults the model's own epochs and stopping."""
    schedule = {} if args.defaults else {"max_epochs": args.epochs, "early_stopping": False}
    started = time.perf_counter()
    model.train(check_val_every_n_epoch=1, accelerator="cpu", enable_progress_bar=False, **schedule,
                **split_kwargs)
    seconds = time.perf_counter() - started
    epochs = len(model.history["elbo_validation"])
    return {"seconds": seconds, "epochs": epochs, "cells_per_s": len(indexing[0]) * epochs / seconds}


def totalvi(args):
    import scvi
    mdata = md.read_zarr(args.data)
    adata = rna_anndata(mdata)
    adata.obsm["protein_expression"], _ = modality_dense(mdata, "prot")
    scvi.model.TOTALVI.setup_anndata(adata, batch_key="batch", protein_expression_obsm_key="protein_expression")
    model = scvi.model.TOTALVI(adata)
    indexing = split(adata.n_obs, args.validation_cells)
    out = train(model, args, indexing, external_indexing=indexing)
    _, proteins = model.get_normalized_expression(n_samples=1, return_mean=True, return_numpy=True)
    write_root_obsm(args.data, {"X_totalvi": model.get_latent_representation(),
                                "totalvi_denoised_prot": proteins})
    return out


def multivi(args):
    import scvi
    stored = md.read_zarr(args.data)
    obs = pd.DataFrame(index=stored.obs_names.astype(str))
    mods = {}
    for name in ("rna", "atac"):
        x, _ = modality_dense(stored, name)
        mods[name] = ad.AnnData(X=sp.csr_matrix(x), obs=obs.copy(),
                                var=pd.DataFrame(index=[f"{name}_{v}" for v in stored.mod[name].var_names]))
    # scvi-tools 1.4 sets MULTIVI up from a MuData whose modalities cover every cell.
    mdata = md.MuData(mods)
    mdata.obs["batch"] = stored.obs["batch"].astype(str).values
    scvi.model.MULTIVI.setup_mudata(mdata, batch_key="batch", modalities={"rna_layer": "rna", "atac_layer": "atac"})
    model = scvi.model.MULTIVI(mdata)
    indexing = split(mdata.n_obs, args.validation_cells)
    out = train(model, args, indexing, datasplitter_kwargs={"external_indexing": indexing})
    accessibility = model.get_normalized_accessibility(return_numpy=True)
    write_root_obsm(args.data, {"X_multivi": model.get_latent_representation(),
                                "multivi_denoised_atac": np.asarray(accessibility)})
    return out


def auroc(score, truth):
    """Area under the ROC curve of `score` for the binary `truth` (Mann-Whitney U, ties halved)."""
    ranks = pd.Series(score).rank().to_numpy()
    pos = truth.astype(bool)
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def mean_feature_correlation(imputed, truth):
    a = imputed - imputed.mean(0)
    b = truth - truth.mean(0)
    denom = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    keep = denom > 0
    return float(((a * b).sum(0)[keep] / denom[keep]).mean())


def impute(args):
    mdata = md.read_zarr(args.data)
    truth, _ = modality_dense(md.read_zarr(args.truth), args.modality)
    _, present = modality_dense(mdata, args.modality)
    missing = ~present
    target = np.log1p(truth[missing])
    imputed = np.asarray(mdata.obsm[args.key], dtype=np.float64)[missing]
    scores = {"cells": int(missing.sum()), "pearson": mean_feature_correlation(np.log1p(imputed), target)}
    if args.modality == "atac":
        scores["auroc"] = auroc(imputed.ravel(), truth[missing].ravel() > 0)
    return scores


def main():
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["totalvi", "multivi", "impute"])
    p.add_argument("--data", required=True)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--validation-cells")
    p.add_argument("--truth")
    p.add_argument("--modality")
    p.add_argument("--key")
    p.add_argument("--defaults", action="store_true")
    args = p.parse_args()
    if args.command == "impute":
        print(json.dumps(impute(args)))
        return
    import scvi
    import torch
    torch.set_num_threads(args.threads)
    scvi.settings.seed = args.seed
    scvi.settings.dl_num_workers = 0
    out = {"totalvi": totalvi, "multivi": multivi}[args.command](args)
    out["tool"] = f"scvi-tools {scvi.__version__} {args.command.upper()}"
    print(json.dumps(out))


if __name__ == "__main__":
    main()
