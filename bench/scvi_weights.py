"""A trained tessera VAE's weights inside scvi-tools' SCVI, to check that the two compute the same
model: scvi-tools' latent means of every cell against the embedding tessera wrote, and scvi-tools'
validation -ELBO of tessera's weights (mean over draws) against tessera's own for the last epoch.
Runs in the scvi-tools venv (bench/scvi_venv.sh); prints one JSON line.

  python bench/scvi_weights.py --data STORE --model RUN_DIR [--key X_tessera] [--batch-key batch]
                               [--draws 20]

RUN_DIR is a `tessera train --out` folder (model.safetensors, config.json, validation_cells.csv,
history.csv) of an NB, gene-dispersion model without encoded covariates (scVI's layout).
"""

import argparse
import csv
import json
import struct

import anndata as ad
import numpy as np
import scvi
import torch

DTYPES = {"F32": np.float32, "F64": np.float64}


def read_safetensors(path):
    """name -> array (the format: an 8-byte little-endian header length, a JSON header, data)."""
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    body = raw[8 + n:]
    return {name: np.frombuffer(body[t["data_offsets"][0]:t["data_offsets"][1]], DTYPES[t["dtype"]])
            .reshape(t["shape"]) for name, t in header.items()}


def layer(w, prefix, ours, covariates=False):
    """tessera's layer `w` (w: in x out, wc: covariates x out) as torch's Linear + BatchNorm1d
    at `prefix` (weight: out x (in + covariates), the one-hot after the input, as FCLayers
    concatenates them)."""
    weight = ours[f"{w}.w"].T
    # Without batches neither has a batch column (scvi-tools drops a one-category one-hot).
    if covariates and f"{w}.wc" in ours:
        weight = np.concatenate([weight, ours[f"{w}.wc"].T], axis=1)
    out = {f"{prefix}.0.weight": weight, f"{prefix}.0.bias": ours[f"{w}.b"]}
    for theirs, mine in (("weight", "bn_gamma"), ("bias", "bn_beta"), ("running_mean", "bn_running_mean"),
                         ("running_var", "bn_running_var")):
        out[f"{prefix}.1.{theirs}"] = ours[f"{w}.{mine}"]
    return out


def to_scvi_state(ours, n_layers):
    """scvi-tools' VAE state_dict entries from tessera's tensors (scVI's layout)."""
    state = {"px_r": ours["log_theta"]}
    for i in range(n_layers):
        state.update(layer(f"encoder.{i}", f"z_encoder.encoder.fc_layers.Layer {i}", ours))
        # deeply_inject_covariates: every decoder layer sees the batch.
        state.update(layer(f"decoder.{i}", f"decoder.px_decoder.fc_layers.Layer {i}", ours, covariates=True))
    for head, theirs in (("mean", "mean_encoder"), ("logvar", "var_encoder")):
        state[f"z_encoder.{theirs}.weight"] = ours[f"encoder.{head}.w"].T
        state[f"z_encoder.{theirs}.bias"] = ours[f"encoder.{head}.b"]
    state["decoder.px_scale_decoder.0.weight"] = ours["decoder.main.w"].T
    state["decoder.px_scale_decoder.0.bias"] = ours["decoder.main.b"]
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--key", default="X_tessera")
    p.add_argument("--batch-key", default="batch")
    p.add_argument("--draws", type=int, default=10)
    args = p.parse_args()

    config = json.load(open(f"{args.model}/config.json"))
    m = config["model"]
    if (m["likelihood"], m["dispersion"], m["encode_covariates"]) != ("nb", "gene", False):
        raise SystemExit(f"{args.model}: expected an NB, gene-dispersion model without encoded covariates")
    adata = ad.read_zarr(args.data)
    batch_key = args.batch_key if args.batch_key in adata.obs else None
    scvi.model.SCVI.setup_anndata(adata, batch_key=batch_key)
    if batch_key and list(adata.obs[batch_key].cat.categories) != config["batch_categories"]:
        raise SystemExit(f"{args.data}: batches {list(adata.obs[batch_key].cat.categories)} are not the model's "
                         f"{config['batch_categories']}")
    model = scvi.model.SCVI(adata, n_hidden=m["n_hidden"], n_latent=m["n_latent"], n_layers=m["n_layers"],
                            dropout_rate=m["dropout"], gene_likelihood="nb")
    state = to_scvi_state(read_safetensors(f"{args.model}/model.safetensors"), m["n_layers"])
    missing, unexpected = model.module.load_state_dict(state, strict=False)
    # What tessera has no counterpart of: the library encoder (unused with the observed library),
    # the ZINB and per-cell dispersion heads (unused with NB, gene dispersion), BatchNorm counters.
    unused = ("l_encoder.", "decoder.px_r_decoder.", "decoder.px_dropout_decoder.", "num_batches_tracked")
    left = [k for k in missing if not any(u in k for u in unused)]
    if left or unexpected:
        raise SystemExit(f"weights not mapped: missing {left}, unexpected {list(unexpected)}")
    model.is_trained_ = True
    model.module.eval()

    latent = model.get_latent_representation()
    ours = np.asarray(adata.obsm[args.key], dtype=np.float64)
    held = np.loadtxt(f"{args.model}/validation_cells.csv", delimiter=",", skiprows=1, dtype=np.int64, ndmin=1)
    draws = []
    for d in range(args.draws):
        torch.manual_seed(d)
        # scvi-tools' get_elbo is the ELBO; its history's elbo_validation is the loss, -ELBO.
        draws.append(-float(model.get_elbo(indices=held)))
    last = list(csv.DictReader(open(f"{args.model}/history.csv")))[-1]
    tessera_elbo = float(last["validation_reconstruction"]) + float(last["validation_kl"])
    print(json.dumps({
        "cells": int(adata.n_obs),
        "latent_max_abs_diff": float(np.abs(latent - ours).max()),
        "latent_scale": float(np.abs(ours).max()),
        "validation_cells": int(len(held)),
        "scvi_validation_elbo_of_tessera_weights": float(np.mean(draws)),
        "scvi_elbo_draw_sd": float(np.std(draws)),
        "tessera_validation_elbo": tessera_elbo,
    }))


if __name__ == "__main__":
    main()
