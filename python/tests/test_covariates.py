"""Covariates beside the batch (scvi-tools' categorical_covariate_keys and
continuous_covariate_keys): they reach the model, new cells are encoded and decoded with
them, query mapping carries them, and bad columns are refused naming the column."""

from __future__ import annotations

import json
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import tessera

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("TESSERA_SHARED_DATA", ROOT.parent / "shared" / "data"))
PBMC = SHARED / "pbmc68k_counts.zarr"
SCVI = tessera.model.SCVI
DONORS = np.array(["d0", "d1", "d2"])


def pbmc_with_covariates() -> ad.AnnData:
    assert PBMC.exists(), f"the shared PBMC store is missing at {PBMC}"
    adata = ad.read_zarr(PBMC)
    cells = np.arange(adata.n_obs)
    adata.obs["batch"] = np.where(cells % 2 == 0, "a", "b")
    adata.obs["donor"] = pd.Categorical(DONORS[cells % 3])
    adata.obs["depth"] = np.log1p(np.asarray(adata.X.sum(axis=1)).ravel()) - 7.0
    return adata


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[ad.AnnData, SCVI, Path]:
    adata = pbmc_with_covariates()
    SCVI.setup_anndata(
        adata, batch_key="batch", categorical_covariate_keys=["donor"],
        continuous_covariate_keys=["depth"],
    )
    model = SCVI(adata, n_latent=6, encode_covariates=True)
    model.train(max_epochs=8, seed=2, progress_bar=False)
    folder = tmp_path_factory.mktemp("covariates") / "model"
    model.save(folder)
    return adata, model, folder


def test_the_model_records_its_covariates_and_their_categories(trained):
    _, _, folder = trained
    config = json.loads((folder / "config.json").read_text())
    assert config["covariates"] == {
        "categorical": [["donor", ["d0", "d1", "d2"]]],
        "continuous": ["depth"],
    }
    assert config["batch_categories"] == ["a", "b"]


def test_covariates_change_the_encoding_and_the_decoded_expression(trained):
    adata, model, _ = trained
    z = model.get_latent_representation(adata.copy())
    expression = model.get_normalized_expression(adata.copy(), return_numpy=True)
    moved = adata.copy()
    moved.obs["donor"] = pd.Categorical(np.full(adata.n_obs, "d1"), categories=DONORS)
    same_donor = moved.obs["donor"].to_numpy() == adata.obs["donor"].to_numpy()
    z_moved = model.get_latent_representation(moved)
    # Only the cells whose donor changed move; the others are encoded exactly as before.
    np.testing.assert_array_equal(z_moved[same_donor], z[same_donor])
    assert np.abs(z_moved[~same_donor] - z[~same_donor]).max() > 1e-4
    deeper = adata.copy()
    deeper.obs["depth"] = adata.obs["depth"] + 1.0
    assert np.abs(model.get_normalized_expression(deeper, return_numpy=True) - expression).max() > 0
    # The loaded model reads them the same way.
    loaded = SCVI.load(trained[2], adata)
    np.testing.assert_array_equal(loaded.get_latent_representation(adata.copy()), z)


def test_a_category_the_model_never_saw_is_refused(trained):
    adata, model, _ = trained
    other = adata.copy()
    other.obs["donor"] = "d9"
    with pytest.raises(ValueError, match=r'donor: category "d9" is not one of the reference'):
        model.get_latent_representation(other)
    missing = adata.copy()
    del missing.obs["depth"]
    with pytest.raises(KeyError, match="depth"):
        model.get_latent_representation(missing)


def test_query_mapping_keeps_the_references_covariates(trained):
    adata, _, folder = trained
    query = adata[:200].copy()
    query.obs["batch"] = "q"
    del query.uns[tessera._anndata.SETUP_KEY]
    mapped = SCVI.load_query_data(query, folder)
    mapped.train(max_epochs=3, seed=0)
    z = mapped.get_latent_representation()
    assert z.shape == (200, 6) and np.all(np.isfinite(z))
    assert mapped.query_report_["new_batches"] == ["q"]
    unknown = adata[:50].copy()
    unknown.obs["donor"] = "d9"
    del unknown.uns[tessera._anndata.SETUP_KEY]
    query_model = SCVI.load_query_data(unknown, folder)
    with pytest.raises(ValueError, match=r'obs/donor: category "d9" is not one of the reference'):
        query_model.train(max_epochs=1)


def test_bad_covariate_columns_are_refused_naming_them():
    adata = pbmc_with_covariates()
    with pytest.raises(KeyError, match="nope"):
        SCVI.setup_anndata(adata, categorical_covariate_keys=["nope"])
    with pytest.raises(TypeError, match="a list of obs columns"):
        SCVI.setup_anndata(adata, categorical_covariate_keys="donor")
    with pytest.raises(TypeError, match=r"adata.obs\['donor'\] has dtype category"):
        SCVI.setup_anndata(adata, continuous_covariate_keys=["donor"])
    adata.obs.loc[adata.obs_names[3], "depth"] = np.nan
    with pytest.raises(ValueError, match=r"adata.obs\['depth'\] has missing"):
        SCVI.setup_anndata(adata, continuous_covariate_keys=["depth"])
