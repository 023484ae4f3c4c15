"""Writes the scvi-tools models python/tests/test_scvi_tools.py loads: tiny SCVI models saved by
scvi-tools (pinned in bench/requirements-scvi.txt) with their AnnData, and what scvi-tools
computes with them (expected.npz: the latent means and the decoder's proportions at them).

    target/scvi-venv/bin/python python/tests/data/make_scvi_tools_models.py [name ...]

Names given: only those models are written (each keeps its seed, its index here).
"""

import sys

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import scvi
import torch

HERE = Path(__file__).parent
MODELS = {
    # scvi-tools' defaults (ZINB, one θ per gene), batches and labels.
    "scvi_default": dict(setup=dict(batch_key="batch", labels_key="cell_type"), model={}),
    # NB, θ per gene and batch, 2 layers, the batch into the encoder too.
    "scvi_nb_2layers": dict(setup=dict(batch_key="batch"),
                            model=dict(gene_likelihood="nb", dispersion="gene-batch", n_layers=2,
                                       encode_covariates=True)),
    # No batch key: scvi-tools' single batch column.
    "scvi_no_batch": dict(setup={}, model=dict(gene_likelihood="nb")),
    # scArches' layers: LayerNorm instead of BatchNorm, 2 layers, the batch into the encoder.
    "scvi_layer_norm": dict(setup=dict(batch_key="batch"),
                            model=dict(gene_likelihood="nb", n_layers=2, encode_covariates=True,
                                       use_layer_norm="both", use_batch_norm="none")),
}


def data(seed):
    rng = np.random.default_rng(seed)
    n, g = 90, 40
    types = rng.integers(0, 3, n)
    rates = rng.gamma(1.0, 1.0, (3, g))[types] * rng.uniform(0.5, 2.0, (n, 1))
    obs = pd.DataFrame({"batch": pd.Categorical(rng.choice(["b0", "b1", "b2"], n)),
                        "cell_type": pd.Categorical(np.array(["T", "B", "NK"])[types])},
                       index=[f"cell{i}" for i in range(n)])
    var = pd.DataFrame(index=[f"gene{j}" for j in range(g)])
    return ad.AnnData(sp.csr_matrix(rng.poisson(rates).astype(np.float32)), obs=obs, var=var)


def expected(model, adata):
    """Latent means and the decoder's proportions at them, per cell (each cell's batch)."""
    module = model.module.eval()
    latent = model.get_latent_representation()
    tensors = next(iter(model._make_data_loader(adata=adata, batch_size=adata.n_obs, shuffle=False)))
    with torch.no_grad():
        inference = module.inference(**module._get_inference_input(tensors))
        z = inference["qz"].loc
        batch = tensors["batch"]
        px = module.generative(z, torch.zeros(z.shape[0], 1), batch)["px"]
    return {"latent": latent, "scale": px.scale.numpy()}


def main():
    torch.manual_seed(0)
    wanted = sys.argv[1:] or list(MODELS)
    for i, (name, spec) in enumerate(MODELS.items()):
        if name not in wanted:
            continue
        scvi.settings.seed = i
        adata = data(i)
        scvi.model.SCVI.setup_anndata(adata, **spec["setup"])
        model = scvi.model.SCVI(adata, n_hidden=16, n_latent=4, **spec["model"])
        model.train(max_epochs=5, accelerator="cpu", enable_progress_bar=False)
        folder = HERE / name
        model.save(folder, overwrite=True, save_anndata=True)
        np.savez(folder / "expected.npz", **expected(model, adata))
        print(name, sorted(p.name for p in folder.iterdir()))


if __name__ == "__main__":
    main()
