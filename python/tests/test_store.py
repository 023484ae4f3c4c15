"""A store-backed AnnData (tessera.read_zarr): training streams the Zarr store through the
engine's loader and writes nothing into it, with the same model as the in-memory AnnData."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr

import tessera

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("TESSERA_SHARED_DATA", ROOT.parent / "shared" / "data"))
PBMC = SHARED / "pbmc68k_counts.zarr"
PBMC_H5AD = SHARED / "pbmc68k_counts.h5ad"
SCVI = tessera.model.SCVI


@pytest.fixture()
def store(tmp_path) -> Path:
    """PBMC with a batch column, its counts in a layer and X log-normalised (as atlases ship)."""
    adata = ad.read_zarr(PBMC)
    adata.obs["batch"] = np.where(np.arange(adata.n_obs) % 3 == 0, "b", "a")
    partial = adata.obs["cell_type"].astype(str).to_numpy().copy()
    partial[np.arange(adata.n_obs) % 3 == 1] = "Unknown"
    adata.obs["partial"] = pd.Categorical(partial)
    adata.layers["counts"] = adata.X.copy()
    adata.X = adata.X.log1p()
    path = tmp_path / "pbmc.zarr"
    with ad.settings.override(allow_write_nullable_strings=True):
        adata.write_zarr(path)
    return path


def listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_a_store_backed_anndata_trains_the_in_memory_model_and_leaves_the_store_alone(store):
    before = listing(store)
    backed = tessera.read_zarr(store)
    assert backed.X is None and backed.shape == (700, 765)
    SCVI.setup_anndata(backed, layer="counts", batch_key="batch")
    streamed = SCVI(backed, n_latent=6)
    streamed.train(max_epochs=5, seed=3, progress_bar=False)

    memory = ad.read_zarr(store)
    SCVI.setup_anndata(memory, layer="counts", batch_key="batch")
    in_memory = SCVI(memory, n_latent=6)
    in_memory.train(max_epochs=5, seed=3, progress_bar=False)

    z = streamed.get_latent_representation()
    np.testing.assert_array_equal(z, in_memory.get_latent_representation())
    # Cells encoded again read the layer from the store, a subset included.
    np.testing.assert_array_equal(streamed.get_latent_representation(backed), z)
    np.testing.assert_array_equal(
        streamed.get_latent_representation(backed[[4, 2]].copy()), z[[4, 2]]
    )
    np.testing.assert_array_equal(
        streamed.get_normalized_expression(return_numpy=True),
        in_memory.get_normalized_expression(return_numpy=True),
    )
    assert listing(store) == before, "training wrote into the user's store"


def test_scanvi_on_a_store_leaves_out_the_unlabeled_category_as_in_memory(store):
    models = []
    for adata in (tessera.read_zarr(store), ad.read_zarr(store)):
        tessera.model.SCANVI.setup_anndata(
            adata, "partial", "Unknown", layer="counts", batch_key="batch"
        )
        model = tessera.model.SCANVI(adata, n_latent=6)
        model.train(max_epochs=4, seed=1, progress_bar=False)
        models.append(model)
    streamed, in_memory = models
    np.testing.assert_array_equal(
        streamed.get_latent_representation(), in_memory.get_latent_representation()
    )
    predicted = streamed.predict()
    assert "Unknown" not in set(predicted)
    np.testing.assert_array_equal(predicted, in_memory.predict())


def test_store_backed_setup_checks_the_store(store, tmp_path):
    backed = tessera.read_zarr(store)
    with pytest.warns(UserWarning, match=r"pbmc.zarr: adata.X does not look like counts"):
        SCVI.setup_anndata(backed, batch_key="batch")  # X holds log1p values
    with pytest.raises(KeyError, match="raw"):
        SCVI.setup_anndata(backed, layer="raw")
    backed.obs["donor"] = "d0"  # in memory only: the engine reads the store's obs
    SCVI.setup_anndata(backed, layer="counts", categorical_covariate_keys=["donor"])
    with pytest.raises(KeyError, match=r"'donor' is not in .*/obs"):
        SCVI(backed).train(max_epochs=1, progress_bar=False)
    with pytest.raises(ValueError, match="not a readable Zarr store"):
        tessera.read_zarr(tmp_path / "missing.zarr")
    zarr.open_group(tmp_path / "empty.zarr", mode="w")
    with pytest.raises(ValueError, match="has no obs: not an AnnData"):
        tessera.read_zarr(tmp_path / "empty.zarr")


def test_a_backed_h5ad_streams_from_the_file_and_trains_the_in_memory_model(monkeypatch):
    """``anndata.read_h5ad(path, backed="r")``: X is read from the file by the engine's loader
    (entries through h5py, never converted into a copy of the file), with the in-memory
    model."""
    before = PBMC_H5AD.stat().st_mtime_ns, PBMC_H5AD.stat().st_size
    reads: list[tuple[int, int]] = []
    original = tessera._anndata.backed_reader

    def spy(adata, layer):
        found = original(adata, layer)
        if found is None:
            return None
        indptr, nnz, read = found

        def counted(start, stop):
            reads.append((start, stop))
            return read(start, stop)

        return indptr, nnz, counted

    monkeypatch.setattr(tessera._anndata, "backed_reader", spy)
    backed = ad.read_h5ad(PBMC_H5AD, backed="r")
    SCVI.setup_anndata(backed)
    streamed = SCVI(backed, n_latent=6)
    streamed.train(max_epochs=3, seed=2, progress_bar=False)
    nnz = backed.X.group["data"].shape[0]
    # Every entry went through the reader (once here: the loader keeps what fits its cache
    # budget, as it does for a Zarr store; an atlas streams fetch by fetch every epoch).
    assert reads and sum(stop - start for start, stop in reads) >= nnz
    assert backed.isbacked and not sp.issparse(backed.X), "X was left in the file"

    memory = ad.read_h5ad(PBMC_H5AD)
    SCVI.setup_anndata(memory)
    in_memory = SCVI(memory, n_latent=6)
    in_memory.train(max_epochs=3, seed=2, progress_bar=False)
    z = streamed.get_latent_representation()
    np.testing.assert_array_equal(z, in_memory.get_latent_representation())
    # Encoding the backed AnnData again reads its X into memory: the same embedding.
    np.testing.assert_array_equal(streamed.get_latent_representation(backed), z)
    assert (PBMC_H5AD.stat().st_mtime_ns, PBMC_H5AD.stat().st_size) == before


def test_a_backed_x_that_is_not_csr_is_refused_with_the_way_out(tmp_path):
    path = tmp_path / "csc.h5ad"
    counts = sp.csc_matrix(np.arange(12, dtype=np.float32).reshape(4, 3))
    ad.AnnData(X=counts).write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    with pytest.raises(ValueError, match=r"backed X is csc.*to_memory"):
        SCVI.setup_anndata(backed)
